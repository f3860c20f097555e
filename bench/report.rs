//! The results: one object per target, the headline ratios and figures,
//! a table on stdout and `bench/results/latest.json`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::{json, Value};

use crate::load::{Mix, PhaseStats};
use crate::probe::{self, RedisCommands, RedisMemory};
use crate::targets::TargetKind;

/// koogate's own process, or a baseline's.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessFigures {
    pub pid: u32,
    /// Right after start.
    pub rss_start_mib: f64,
    /// After the load phases.
    pub rss_after_load_mib: f64,
    /// With the idle keep-alive connections open, after the load phases.
    pub rss_idle_conns_mib: f64,
    /// With the idle keep-alive connections open, right after start (before any load).
    pub rss_idle_conns_fresh_mib: Option<f64>,
    pub idle_connections: usize,
    /// `VmHWM` at the end.
    pub rss_peak_mib: f64,
    /// user + system CPU over the peak, at-peak and half-peak phases.
    pub cpu_secs: f64,
    pub cpu_secs_per_10k_calls: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Phases {
    /// One call on each idle connection, right after start.
    pub idle_connections_fresh: Option<PhaseStats>,
    pub warmup: Option<PhaseStats>,
    /// Closed loop: the peak throughput.
    pub peak: Option<PhaseStats>,
    /// Open loop at the peak rate (or `--rate`).
    pub at_peak: Option<PhaseStats>,
    /// Open loop at half the peak rate.
    pub at_half_peak: Option<PhaseStats>,
    pub idle_connections: Option<PhaseStats>,
    /// `--flamegraph`: the extra closed loop at peak load under `perf record`.
    pub profiled_peak: Option<PhaseStats>,
}

impl Phases {
    fn all(&self) -> impl Iterator<Item = &PhaseStats> {
        [
            &self.idle_connections_fresh,
            &self.warmup,
            &self.peak,
            &self.at_peak,
            &self.at_half_peak,
            &self.idle_connections,
            &self.profiled_peak,
        ]
        .into_iter()
        .flatten()
    }
}

/// Everything measured about one target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TargetReport {
    pub label: &'static str,
    /// Set when the target could not start or a phase failed.
    pub error: Option<String>,
    pub phases: Phases,
    pub process: Option<ProcessFigures>,
    /// Baseline B and koogate (redis): command counts over the measured phases.
    pub redis: Option<RedisCommands>,
    pub redis_memory: Option<RedisMemory>,
    /// CPU over the measured phases (peak, at peak, at half peak).
    pub cpu: Option<probe::CpuWindow>,
    /// koogate: the waits for the outbox to drain after each phase (bounded).
    pub outbox_drains: Vec<probe::Drain>,
    /// koogate: µs per call by stage over the peak phase (`koogate_call_stage_seconds_total`),
    /// and `request` (arrival to answer, the log line excluded).
    pub stages_usec_per_call: Option<BTreeMap<String, f64>>,
    /// `--flamegraph`: the profile summary and the flame graph's path.
    pub profile: Option<crate::profile::Profile>,
}

impl TargetReport {
    pub fn new(kind: TargetKind) -> Self {
        Self { label: kind.label(), ..Self::default() }
    }

    pub fn peak_rps(&self) -> Option<f64> {
        self.phases.peak.as_ref().map(|p| p.rps)
    }

    pub fn p99_over_p50_at_half_peak(&self) -> Option<f64> {
        self.phases.at_half_peak.as_ref().filter(|p| p.p50_ms > 0.0).map(|p| p.p99_ms / p.p50_ms)
    }

    pub fn errors(&self) -> u64 {
        self.phases.all().map(|p| p.errors).sum()
    }

    /// The worst error rate of any phase.
    pub fn worst_error_rate(&self) -> f64 {
        self.phases.all().map(|p| p.error_rate).fold(0.0, f64::max)
    }

    /// Why this target fails the run, if it does.
    pub fn failure(&self, max_error_rate: f64) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(e.clone());
        }
        let worst = self.worst_error_rate();
        (worst > max_error_rate).then(|| {
            let samples: Vec<&String> = self.phases.all().flat_map(|p| &p.error_samples).take(3).collect();
            format!("error rate {:.2}% above {:.2}%; e.g. {samples:?}", worst * 100.0, max_error_rate * 100.0)
        })
    }

    fn json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut v {
            let at_peak = self.phases.at_peak.as_ref();
            let half = self.phases.at_half_peak.as_ref();
            map.insert("peak_rps".into(), json!(self.peak_rps()));
            map.insert("rps".into(), json!(at_peak.map(|p| p.rps)));
            map.insert("p50_ms".into(), json!(at_peak.map(|p| p.p50_ms)));
            map.insert("p99_ms".into(), json!(at_peak.map(|p| p.p99_ms)));
            map.insert("p999_ms".into(), json!(at_peak.map(|p| p.p999_ms)));
            map.insert("half_peak_rps".into(), json!(half.map(|p| p.rps)));
            map.insert("half_peak_p50_ms".into(), json!(half.map(|p| p.p50_ms)));
            map.insert("half_peak_p99_ms".into(), json!(half.map(|p| p.p99_ms)));
            map.insert("half_peak_p999_ms".into(), json!(half.map(|p| p.p999_ms)));
            map.insert("p99_over_p50_at_half_peak".into(), json!(self.p99_over_p50_at_half_peak()));
            map.insert("errors".into(), json!(self.errors()));
        }
        v
    }
}

/// How the run was made.
#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    pub smoke: bool,
    pub duration_secs: f64,
    pub peak_secs: f64,
    pub connections: usize,
    /// `--rate`, when given (else each target's own peak).
    pub rate: Option<f64>,
    pub mix: Mix,
    /// The rest of the mix: distinct new orders.
    pub new_order_share: f64,
    pub warmup_calls: u64,
    pub idle_connections: usize,
    pub redis_url: String,
    pub redis_mode: &'static str,
    pub redis_version: Option<String>,
    /// `git describe --always --dirty` of the measured source.
    pub koogate_revision: Option<String>,
    pub koogate_log: String,
    pub in_process: bool,
    pub total_secs: f64,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// A goal to report against (never asserted).
fn goal(value: Option<f64>, cmp: &str, target: f64) -> Value {
    let met = value.map(|v| match cmp {
        ">=" => v >= target,
        "<=" => v <= target,
        _ => (v - target).abs() < 0.005,
    });
    json!({ "value": value, "goal": format!("{cmp} {target}"), "met": met })
}

/// The whole report as JSON.
pub fn build(run: &RunInfo, reports: &BTreeMap<TargetKind, TargetReport>) -> Value {
    let get = |k: TargetKind| reports.get(&k);
    let rps = |k: TargetKind| get(k).and_then(TargetReport::peak_rps);
    let kg = get(TargetKind::Redis);
    let process = kg.and_then(|r| r.process.as_ref());
    let redis = kg.and_then(|r| r.redis.as_ref());
    let ratio_b = ratio(rps(TargetKind::Redis), rps(TargetKind::B));
    let ratio_a = ratio(rps(TargetKind::Redis), rps(TargetKind::A));
    let embedded = ratio(rps(TargetKind::Embedded), rps(TargetKind::Redis));
    let round_trips = redis.map(|r| r.round_trips_per_call);
    let p99_p50 = kg.and_then(TargetReport::p99_over_p50_at_half_peak);
    let rss_idle = process.map(|p| p.rss_idle_conns_mib);
    let embedded_kg = get(TargetKind::Embedded);
    let embedded_process = embedded_kg.and_then(|r| r.process.as_ref());
    let redis_usec = redis.map(|r| {
        json!({
            "call_script": r.call_script_usec_per_call,
            "delivery": r.delivery_usec_per_call,
            "all": r.usec_per_call,
            "redis_cpu": r.redis_cpu_secs_per_10k_calls.map(|s| s / 10_000.0 * 1e6),
            "call_script_run": r.script_sample.as_ref().map(|s| s.call_usec_per_run),
            "settle_per_event": r.script_sample.as_ref().map(|s| s.other_usec_per_settled_event),
        })
    });
    let jsonl_drain = drained_after_peak(kg);
    let profile_groups = |r: Option<&TargetReport>| {
        r.and_then(|r| r.profile.as_ref()).map(|p| json!({ "svg": p.svg, "weight": p.weight, "groups": p.groups }))
    };
    let targets: serde_json::Map<String, Value> = reports.iter().map(|(k, r)| (k.key().to_owned(), r.json())).collect();
    json!({
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "duration_secs": run.duration_secs,
        "connections": run.connections,
        "run": run,
        "targets": targets,
        "ratio_vs_baseline_b": ratio_b,
        "ratio_vs_baseline_a": ratio_a,
        "embedded_vs_redis": embedded,
        "redis_round_trips_per_call": round_trips,
        "redis_commands_per_call": redis.map(|r| r.commands_per_call),
        "redis_script_commands_per_run": redis.and_then(|r| r.script_commands_per_run),
        "redis_all_evalsha_per_call": redis.map(|r| r.all_evalsha_per_call),
        "redis_all_commands_per_call": redis.map(|r| r.all_commands_per_call),
        "redis_forwarder_commands_per_call": redis.map(|r| r.forwarder_commands_per_call),
        "redis_evalsha_usec": redis.map(|r| r.evalsha_usec),
        "p99_over_p50_at_half_peak": p99_p50,
        "rss_peak_mib": process.map(|p| p.rss_peak_mib),
        "rss_1000_idle_conns_mib": rss_idle,
        "rss_1000_idle_conns_fresh_mib": process.and_then(|p| p.rss_idle_conns_fresh_mib),
        "idle_connections": process.map(|p| p.idle_connections),
        "cpu_secs_per_10k_calls": process.map(|p| p.cpu_secs_per_10k_calls),
        "redis_bytes_per_order": kg.and_then(|r| r.redis_memory.as_ref()).map(|m| m.bytes_per_order),
        "redis_usec_per_call": redis_usec,
        "stage_usec_per_call": kg.and_then(|r| r.stages_usec_per_call.clone()),
        "stage_usec_per_call_embedded": embedded_kg.and_then(|r| r.stages_usec_per_call.clone()),
        "rss_peak_mib_embedded": embedded_process.map(|p| p.rss_peak_mib),
        "rss_1000_idle_conns_mib_embedded": embedded_process.map(|p| p.rss_idle_conns_mib),
        "jsonl_drain_after_peak_secs": jsonl_drain.flatten(),
        "jsonl_drain_after_peak_secs_embedded": drained_after_peak(embedded_kg).flatten(),
        "profile": profile_groups(kg),
        "profile_embedded": profile_groups(embedded_kg),
        "goals": {
            "throughput_vs_baseline_b": goal(ratio_b, ">=", 0.6),
            "redis_round_trips_per_call": goal(round_trips, "==", 1.0),
            "p99_over_p50_at_half_peak": tail_goal(p99_p50, get(TargetKind::B).and_then(TargetReport::p99_over_p50_at_half_peak)),
            "rss_1000_idle_conns_mib": goal(rss_idle, "<=", 40.0),
            "redis_usec_per_call": goal(redis.map(|r| r.usec_per_call), "<=", 12.0),
            "embedded_vs_redis": goal(embedded, ">=", 0.5),
            "rss_peak_mib_embedded": goal(embedded_process.map(|p| p.rss_peak_mib), "<=", 64.0),
            "delivery_jsonl_drain_secs": drain_goal(jsonl_drain),
        },
        "delivery": null,
        "delivery_http": null,
    })
}

/// p99/p50 at half peak: at most 3, or at worst no more than baseline B's own
/// in the same run (issue 18: B's tail is the machine's and load generator's).
fn tail_goal(value: Option<f64>, baseline_b: Option<f64>) -> Value {
    let met = value.map(|v| v <= 3.0 || baseline_b.is_some_and(|b| v <= b));
    let b = baseline_b.map_or_else(|| "-".to_owned(), |b| format!("{b:.2}"));
    json!({ "value": value, "goal": format!("<= 3 or <= baseline B's ({b})"), "met": met })
}

/// How long the outbox (JSONL target) took to drain after the "at peak"
/// phase: `Some(None)` when it had not within the bench's wait.
fn drained_after_peak(r: Option<&TargetReport>) -> Option<Option<f64>> {
    let drain = r?.outbox_drains.iter().find(|d| d.after == "at peak")?;
    Some((drain.left == Some(0.0)).then_some(drain.secs))
}

/// The outbox drained within 5 s after the peak load (not drained: not met).
fn drain_goal(drain: Option<Option<f64>>) -> Value {
    let mut drained = goal(drain.flatten(), "<=", 5.0);
    if drain.is_some_and(|d| d.is_none()) {
        drained["met"] = json!(false);
    }
    drained
}

/// The delivery goals, once the delivery phases ran: the backlog drained to
/// the HTTP sink at 10k events/s or more, and the outbox drained within 5 s
/// after the peak load.
pub fn add_delivery_goals(summary: &mut Value, backlog_events_per_sec: Option<f64>, drain: Option<Option<f64>>) {
    summary["goals"]["delivery_events_per_sec"] = goal(backlog_events_per_sec, ">=", 10_000.0);
    summary["goals"]["delivery_http_drain_secs"] = drain_goal(drain);
}

pub fn write(path: &Path, report: &Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(report)? + "\n";
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// The table printed at the end of a run (also pasted into bench/README.md).
pub fn table(run: &RunInfo, reports: &BTreeMap<TargetKind, TargetReport>, summary: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "koogate-bench: {} connections, peak {:.1} s closed loop, then {:.1} s open loop at peak and at half peak\n\n",
        run.connections, run.peak_secs, run.duration_secs
    ));
    out.push_str(&format!(
        "{:<22} {:>9} | {:>9} {:>7} {:>7} {:>8} {:>6} | {:>9} {:>7} {:>7} {:>8} {:>7} | {:>8} {:>8} {:>8} {:>6}\n",
        "target",
        "peak rps",
        "rps",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "½ rps",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "p99/p50",
        "cpu/10k",
        "RSS MiB",
        "idle MiB",
        "bg cpu"
    ));
    for r in reports.values() {
        let at = r.phases.at_peak.as_ref();
        let half = r.phases.at_half_peak.as_ref();
        let p = r.process.as_ref();
        out.push_str(&format!(
            "{:<22} {:>9} | {:>9} {:>7} {:>7} {:>8} {:>6} | {:>9} {:>7} {:>7} {:>8} {:>7} | {:>8} {:>8} {:>8} {:>6}\n",
            r.label,
            num(r.peak_rps(), 0),
            num(at.map(|p| p.rps), 0),
            num(at.map(|p| p.p50_ms), 2),
            num(at.map(|p| p.p99_ms), 2),
            num(at.map(|p| p.p999_ms), 2),
            r.errors(),
            num(half.map(|p| p.rps), 0),
            num(half.map(|p| p.p50_ms), 2),
            num(half.map(|p| p.p99_ms), 2),
            num(half.map(|p| p.p999_ms), 2),
            num(r.p99_over_p50_at_half_peak(), 2),
            num(p.map(|p| p.cpu_secs_per_10k_calls), 2),
            num(p.map(|p| p.rss_peak_mib), 1),
            num(p.map(|p| p.rss_idle_conns_mib), 1),
            r.cpu.and_then(|c| c.background_share).map_or_else(|| "-".to_owned(), |s| format!("{:.0}%", s * 100.0)),
        ));
        if let Some(e) = &r.error {
            out.push_str(&format!("    error: {e}\n"));
        }
    }
    out.push('\n');
    let f = |key: &str| summary.get(key).and_then(Value::as_f64);
    let b_usec = reports.get(&TargetKind::B).and_then(|r| r.redis.as_ref()).map(|r| r.evalsha_usec);
    let goal_met = |key: &str| match summary.pointer(&format!("/goals/{key}/met")).and_then(Value::as_bool) {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "n/a",
    };
    let lines: [(&str, String, &str); 17] = [
        ("koogate(redis) / baseline B throughput", num(f("ratio_vs_baseline_b"), 2), "throughput_vs_baseline_b"),
        ("koogate(redis) / baseline A throughput", num(f("ratio_vs_baseline_a"), 2), ""),
        ("embedded / redis throughput", num(f("embedded_vs_redis"), 2), "embedded_vs_redis"),
        ("Redis round trips per call", num(f("redis_round_trips_per_call"), 3), "redis_round_trips_per_call"),
        ("Redis commands per call (script's included)", num(f("redis_commands_per_call"), 2), ""),
        ("  + outbox forwarder commands per call", num(f("redis_forwarder_commands_per_call"), 2), ""),
        (
            "Redis time per EVALSHA, µs (koogate / B)",
            format!("{} / {}", num(f("redis_evalsha_usec"), 1), num(b_usec, 1)),
            "",
        ),
        ("p99/p50 at half peak, koogate(redis)", num(f("p99_over_p50_at_half_peak"), 2), "p99_over_p50_at_half_peak"),
        (
            "RSS MiB with idle keep-alive connections",
            format!("{} ({} conns)", num(f("rss_1000_idle_conns_mib"), 1), num(f("idle_connections"), 0)),
            "rss_1000_idle_conns_mib",
        ),
        ("  the same on a fresh process (before any load)", num(f("rss_1000_idle_conns_fresh_mib"), 1), ""),
        ("CPU seconds per 10k calls, koogate(redis)", num(f("cpu_secs_per_10k_calls"), 2), ""),
        (
            "Redis µs per call, all commands (commandstats)",
            num(summary.pointer("/redis_usec_per_call/all").and_then(Value::as_f64), 1),
            "redis_usec_per_call",
        ),
        ("RSS MiB at peak, koogate(embedded)", num(f("rss_peak_mib_embedded"), 1), "rss_peak_mib_embedded"),
        (
            "delivery to the HTTP sink, backlog drain events/s",
            num(summary.pointer("/delivery/events_per_sec").and_then(Value::as_f64), 0),
            "delivery_events_per_sec",
        ),
        (
            "outbox drained after the peak, s (HTTP sink)",
            num(summary.pointer("/delivery_http/drain_secs").and_then(Value::as_f64), 2),
            "delivery_http_drain_secs",
        ),
        (
            "JSONL drain after peak, s (redis / embedded)",
            format!(
                "{} / {}",
                num(f("jsonl_drain_after_peak_secs"), 2),
                num(f("jsonl_drain_after_peak_secs_embedded"), 2)
            ),
            "delivery_jsonl_drain_secs",
        ),
        ("Redis bytes per stored order", num(f("redis_bytes_per_order"), 0), ""),
    ];
    for (what, value, goal_key) in lines {
        let status = if goal_key.is_empty() {
            String::new()
        } else {
            let g = summary.pointer(&format!("/goals/{goal_key}/goal")).and_then(Value::as_str).unwrap_or("");
            format!("   goal {g}: {}", goal_met(goal_key))
        };
        out.push_str(&format!("{what:<46} {value:>16}{status}\n"));
    }
    if let Some(r) = reports.get(&TargetKind::Redis).and_then(|r| r.redis.as_ref()) {
        out.push_str(&format!(
            "{:<46} {:>16}   (call script's share: {})\n",
            "Redis µs per call: call script / delivery",
            format!("{:.1} / {:.1}", r.call_script_usec_per_call, r.delivery_usec_per_call),
            r.call_script_share_from
        ));
        if let Some(s) = &r.script_sample {
            out.push_str(&format!(
                "{:<46} {:>16}   ({} / {} runs, {} events settled in {:.1} s, SLOWLOG)\n",
                "Redis µs per call-script run / settled event",
                format!("{:.1} / {:.1}", s.call_usec_per_run, s.other_usec_per_settled_event),
                s.call_runs,
                s.other_runs,
                s.settled_events,
                s.secs
            ));
        }
    }
    for kind in [TargetKind::Redis, TargetKind::Embedded] {
        let Some(stages) = reports.get(&kind).and_then(|r| r.stages_usec_per_call.as_ref()) else { continue };
        let order = ["verify", "parse", "plan", "store", "sign", "log", "request"];
        let text: Vec<String> = order.iter().filter_map(|s| stages.get(*s).map(|v| format!("{} {v:.1}", s))).collect();
        out.push_str(&format!("µs per call by stage, {}: {}\n", kind.label(), text.join(", ")));
    }
    for r in reports.values() {
        let Some(p) = &r.profile else { continue };
        out.push_str(&format!("profile of {} ({}), share of samples:\n", r.label, p.svg));
        for (group, share) in &p.groups {
            out.push_str(&format!("  {group:<56} {:>5.1} %\n", share * 100.0));
        }
        for (f, share) in p.top_self.iter().take(10) {
            out.push_str(&format!("    self {:>5.1} %  {f}\n", share * 100.0));
        }
    }
    if let Some(m) = reports.get(&TargetKind::Redis).and_then(|r| r.redis_memory.as_ref()) {
        out.push_str(&format!(
            "{:<46} {:>16}\n{:<46} {:>16}\n",
            "Redis bytes per kept renewal answer",
            format!("{:.0}", m.bytes_per_renewal_answer),
            "Redis bytes per remembered nonce (TTL)",
            format!("{:.0}", m.bytes_per_nonce),
        ));
    }
    out
}
