//! `--flamegraph`: a CPU profile of koogate under peak load.
//!
//! `perf record` samples the koogate process (all its threads) during an
//! extra closed-loop phase at peak load, run after the measured phases so
//! that perf's overhead disturbs no reported figure. `perf script` output is
//! folded with inferno's `collapse-perf` and drawn with inferno's
//! `flamegraph` into `bench/results/flame-<target>.svg`; the folded stacks
//! also give the report's profile summary: the functions most samples were
//! in (self time) and the share of samples in a few named groups
//! (allocator, log line, futex wake-ups, …).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::process::Command;

/// Sampling frequency (Hz) of `perf record`.
const FREQUENCY: &str = "999";
/// Functions listed in the summary.
const TOP: usize = 20;

/// What the folded stacks say.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Profile {
    /// The flame graph written.
    pub svg: String,
    /// `perf record --call-graph` mode used.
    pub call_graph: String,
    /// The samples' total weight (their periods, as inferno folds them: with perf's
    /// `cpu-clock` event, nanoseconds of CPU); the shares below are of this.
    pub weight: u64,
    /// Share of samples by the function they were in (self time), the largest first.
    pub top_self: Vec<(String, f64)>,
    /// Share of samples in named groups (see [`GROUPS`]).
    pub groups: BTreeMap<&'static str, f64>,
}

/// How a group is told: by the sampled function (`Self`) or by any frame of
/// the stack (`Inclusive`, its callees counted), by substrings of names.
enum Match {
    Self_(&'static [&'static str]),
    Inclusive(&'static [&'static str]),
    /// The thread (the stack's root frame: the thread's name).
    Thread(&'static [&'static str]),
}

/// The named groups of the summary.
const GROUPS: &[(&str, Match)] = &[
    (
        "allocator (malloc/free/realloc, self)",
        Match::Self_(&[
            "malloc",
            "free",
            "realloc",
            "calloc",
            "_int_",
            "tcache",
            "arena_",
            "sysmalloc",
            "mi_",
            "_mi_",
            "mimalloc",
            "memalign",
            "unlink_chunk",
            "consolidate",
        ]),
    ),
    ("log line on the call path (format + write, inclusive)", Match::Inclusive(&["http::log_call"])),
    ("log writer thread", Match::Thread(&["koogate-log-wri"])),
    ("stderr writes, any thread (inclusive)", Match::Inclusive(&["Stderr", "stdio::"])),
    ("futex (wake-ups, waits; inclusive)", Match::Inclusive(&["futex"])),
    ("fdatasync / fsync (inclusive)", Match::Inclusive(&["fdatasync", "fsync", "sync_data", "sync_all"])),
    ("verify (inclusive)", Match::Inclusive(&["verify::verify_v2", "verify::verify_v1"])),
    ("parse (inclusive)", Match::Inclusive(&["call::parse_v2", "call::parse_v1"])),
    ("plan (inclusive)", Match::Inclusive(&["Planner::plan"])),
    ("answer signing (inclusive)", Match::Inclusive(&["sign::body_sign"])),
    ("delivery (inclusive)", Match::Inclusive(&["koogate::delivery::"])),
    ("redis client (inclusive)", Match::Inclusive(&["redis::aio", "redis::cmd", "redis::parser", "redis::script"])),
    ("embedded store / redb (inclusive)", Match::Inclusive(&["redb::", "store::embedded"])),
    ("kernel network (inclusive)", Match::Inclusive(&["tcp_", "sock_", "__sys_sendto", "__sys_recvfrom"])),
];

/// Can `perf` sample here? `Err` says why not.
pub async fn available() -> Result<(), String> {
    let out = Command::new("perf")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("perf is not installed ({e})"))?;
    if !out.status.success() {
        return Err("`perf --version` failed".into());
    }
    let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid").ok();
    let level: i64 = paranoid.as_deref().map(str::trim).and_then(|p| p.parse().ok()).unwrap_or(2);
    // Attaching to another process needs level <= 1, or root (CAP_PERFMON).
    let root = is_root();
    if level > 1 && !root {
        return Err(format!("kernel.perf_event_paranoid is {level} (needs <= 1, or run as root)"));
    }
    Ok(())
}

/// Running as root (effective uid 0, from `/proc/self/status`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)).is_some_and(|u| u == "0")
    })
}

/// A `perf record` of `pid`, running for `secs`.
pub struct Recording {
    child: tokio::process::Child,
    data: PathBuf,
    call_graph: String,
}

pub fn start(pid: u32, secs: f64, data: &Path, call_graph: &str) -> anyhow::Result<Recording> {
    let child = Command::new("perf")
        .args(["record", "-F", FREQUENCY, "--call-graph", call_graph, "-p", &pid.to_string(), "-o"])
        .arg(data)
        .args(["--", "sleep", &format!("{secs:.2}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run perf record")?;
    Ok(Recording { child, data: data.to_path_buf(), call_graph: call_graph.to_owned() })
}

impl Recording {
    /// Waits for the recording to end, then folds it and writes the flame graph to `svg`.
    pub async fn finish(mut self, svg: &Path, title: &str) -> anyhow::Result<Profile> {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("perf record did not stop")??;
        anyhow::ensure!(status.success(), "perf record failed ({status})");
        let script = Command::new("perf")
            .args(["script", "--no-inline", "-i"])
            .arg(&self.data)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .await
            .context("cannot run perf script")?;
        anyhow::ensure!(script.status.success(), "perf script failed ({})", script.status);
        let _ = std::fs::remove_file(&self.data);
        let folded = fold(&script.stdout)?;
        let mut profile = summarize(&folded);
        profile.call_graph = self.call_graph.clone();
        draw(&folded, svg, title)?;
        profile.svg = svg.display().to_string();
        Ok(profile)
    }
}

/// `perf script` output → folded stacks (`root;…;leaf count` lines).
fn fold(perf_script: &[u8]) -> anyhow::Result<String> {
    use inferno::collapse::Collapse;
    let mut options = inferno::collapse::perf::Options::default();
    options.nthreads = 1;
    let mut folder = inferno::collapse::perf::Folder::from(options);
    let mut out = Vec::new();
    folder.collapse(perf_script, &mut out).context("folding perf script output")?;
    String::from_utf8(out).context("folded stacks are not UTF-8")
}

fn draw(folded: &str, svg: &Path, title: &str) -> anyhow::Result<()> {
    if let Some(dir) = svg.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    let file = std::fs::File::create(svg).with_context(|| format!("cannot create {}", svg.display()))?;
    inferno::flamegraph::from_lines(&mut options, folded.lines(), std::io::BufWriter::new(file))
        .with_context(|| format!("cannot draw {}", svg.display()))
}

/// Self-time shares and group shares of folded stacks.
fn summarize(folded: &str) -> Profile {
    let mut total = 0u64;
    let mut by_leaf: BTreeMap<String, u64> = BTreeMap::new();
    let mut groups: BTreeMap<&'static str, u64> = GROUPS.iter().map(|(name, _)| (*name, 0)).collect();
    for line in folded.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else { continue };
        let Ok(count) = count.trim().parse::<u64>() else { continue };
        total += count;
        let frames: Vec<&str> = stack.split(';').collect();
        let leaf = frames.last().copied().unwrap_or("");
        *by_leaf.entry(short(leaf)).or_default() += count;
        for (name, how) in GROUPS {
            let hit = match how {
                Match::Self_(pats) => pats.iter().any(|p| leaf.contains(p)),
                Match::Inclusive(pats) => frames.iter().any(|f| pats.iter().any(|p| f.contains(p))),
                Match::Thread(pats) => frames.first().is_some_and(|root| pats.iter().any(|p| root.contains(p))),
            };
            if hit {
                *groups.entry(name).or_default() += count;
            }
        }
    }
    let share = |n: u64| if total == 0 { 0.0 } else { n as f64 / total as f64 };
    let mut top: Vec<(String, u64)> = by_leaf.into_iter().collect();
    top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    Profile {
        svg: String::new(),
        call_graph: String::new(),
        weight: total,
        top_self: top.into_iter().take(TOP).map(|(f, n)| (f, share(n))).collect(),
        groups: groups.into_iter().map(|(k, n)| (k, share(n))).collect(),
    }
}

/// A function name without its generic arguments' clutter, at most 100 characters.
fn short(frame: &str) -> String {
    frame.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_of_folded_stacks() {
        let folded = "tokio-runtime-w;koogate::http::log_call;std::io::stdio::Stderr::write;__libc_write 3\n\
                      tokio-runtime-w;koogate::gateway::Gateway::run;malloc 1\n\
                      koogate-log-wri;std::io::stdio::Stderr::write 4\n\
                      tokio-runtime-w;_mi_free_generic 2\n";
        let p = summarize(folded);
        assert_eq!(p.weight, 10);
        assert_eq!(p.groups["allocator (malloc/free/realloc, self)"], 0.3);
        assert_eq!(p.groups["log line on the call path (format + write, inclusive)"], 0.3);
        assert_eq!(p.groups["log writer thread"], 0.4);
        assert_eq!(p.groups["stderr writes, any thread (inclusive)"], 0.7);
        assert_eq!(p.top_self[0], ("std::io::stdio::Stderr::write".to_owned(), 0.4));
    }
}
