//! Measurements besides latency: process RSS and CPU from `/proc`, Redis
//! command counts (`INFO commandstats`), Redis memory per stored order, the
//! gateway's outbox depth from `/metrics`, and cleaning up the run's keys.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use koogate::store::keys::{instance_shard, Keys};
use redis::aio::MultiplexedConnection;
use serde::Serialize;

use crate::load::{self, Created};

const MIB: f64 = 1024.0 * 1024.0;

// ------------------------------------------------------------------- /proc

/// `VmRSS` and `VmHWM` (peak RSS) of a process, in MiB.
pub fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok()
    };
    Some((kib("VmRSS:")? * 1024.0 / MIB, kib("VmHWM:")? * 1024.0 / MIB))
}

/// utime + stime of a process, in seconds.
pub fn cpu_secs(pid: u32, ticks_per_sec: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_sec)
}

/// Busy CPU seconds of the whole machine (all cores), from `/proc/stat`:
/// user, nice, system and steal. Interrupt time is left out: loopback
/// traffic is processed in softirq time, which no process is charged with.
fn machine_busy_secs(ticks_per_sec: f64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(7).unwrap_or(&0.0);
    Some(busy / ticks_per_sec)
}

/// CPU seconds used so far by the machine and by the processes of the run.
pub struct CpuSnapshot {
    at: Instant,
    machine: Option<f64>,
    bench: Option<f64>,
    target: Option<f64>,
    redis: Option<f64>,
}

/// CPU used over a window.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CpuWindow {
    pub secs: f64,
    pub target_secs: Option<f64>,
    pub redis_secs: Option<f64>,
    pub bench_secs: Option<f64>,
    /// CPU used by other processes of the machine, as a share of all cores:
    /// a high value means the figures of this target were disturbed.
    pub background_share: Option<f64>,
}

impl CpuSnapshot {
    pub fn take(target: Option<u32>, redis: Option<u32>, ticks: f64) -> Self {
        Self {
            at: Instant::now(),
            machine: machine_busy_secs(ticks),
            bench: cpu_secs(std::process::id(), ticks),
            target: target.and_then(|p| cpu_secs(p, ticks)),
            redis: redis.and_then(|p| cpu_secs(p, ticks)),
        }
    }

    pub fn until(&self, later: &CpuSnapshot) -> CpuWindow {
        let d = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (a - b).max(0.0));
        let secs = later.at.duration_since(self.at).as_secs_f64();
        let (target, redis, bench) =
            (d(later.target, self.target), d(later.redis, self.redis), d(later.bench, self.bench));
        let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        let background = d(later.machine, self.machine).filter(|_| secs > 0.0).map(|machine| {
            let ours = target.unwrap_or(0.0) + redis.unwrap_or(0.0) + bench.unwrap_or(0.0);
            ((machine - ours) / (secs * cores)).clamp(0.0, 1.0)
        });
        CpuWindow { secs, target_secs: target, redis_secs: redis, bench_secs: bench, background_share: background }
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when that fails).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

// ------------------------------------------------------------------- Redis

/// Commands of koogate's outbox forwarder, when no MONITOR audit could tell.
pub const FORWARDER_COMMANDS: &[&str] = &["xreadgroup", "xautoclaim", "xack", "xdel", "xlen", "xgroup|create"];
/// Commands the bench itself sends during a window.
const OWN_COMMANDS: &[&str] = &["info", "echo"];

pub struct RedisProbe {
    conn: MultiplexedConnection,
}

/// One `INFO commandstats` line: calls and microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CmdStat {
    pub calls: u64,
    pub usec: u64,
}

impl RedisProbe {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("bad Redis URL {url}"))?;
        let conn = tokio::time::timeout(Duration::from_secs(3), client.get_multiplexed_async_connection())
            .await
            .with_context(|| format!("Redis at {url} did not answer within 3 s"))?
            .with_context(|| format!("Redis at {url} is not reachable"))?;
        let mut probe = Self { conn };
        let pong: String = redis::cmd("PING").query_async(&mut probe.conn).await?;
        anyhow::ensure!(pong == "PONG", "Redis answered PING with {pong:?}");
        Ok(probe)
    }

    /// `INFO commandstats` as command → stats.
    pub async fn commandstats(&mut self) -> anyhow::Result<BTreeMap<String, CmdStat>> {
        let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut self.conn).await?;
        Ok(info
            .lines()
            .filter_map(|line| {
                let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let get = |k: &str| stats.split(',').find_map(|kv| kv.strip_prefix(k)?.parse().ok());
                Some((name.to_owned(), CmdStat { calls: get("calls=")?, usec: get("usec=")? }))
            })
            .collect())
    }

    /// The redis-server's pid, when it runs on this machine (for its CPU time).
    pub async fn local_pid(&mut self) -> Option<u32> {
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut self.conn).await.ok()?;
        let pid: u32 = info.lines().find_map(|l| l.strip_prefix("process_id:"))?.trim().parse().ok()?;
        std::path::Path::new(&format!("/proc/{pid}/stat")).exists().then_some(pid)
    }

    pub async fn version(&mut self) -> Option<String> {
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut self.conn).await.ok()?;
        info.lines().find_map(|l| l.strip_prefix("redis_version:")).map(|v| v.trim().to_owned())
    }

    async fn memory_usage(&mut self, key: &str) -> anyhow::Result<Option<u64>> {
        Ok(redis::cmd("MEMORY").arg("USAGE").arg(key).arg("SAMPLES").arg(0).query_async(&mut self.conn).await?)
    }

    /// Bytes Redis holds per stored order (instance hash + kept answer + order
    /// hash), per kept renewal answer, and per remembered nonce.
    pub async fn memory_per_order(
        &mut self,
        prefix: &str,
        orders: &[Created],
        renewals: &[(String, String)],
    ) -> anyhow::Result<RedisMemory> {
        let keys = Keys::new(prefix);
        let mut mem = RedisMemory::default();
        let (mut inst, mut ans, mut order) = (Vec::new(), Vec::new(), Vec::new());
        for o in orders.iter().take(200) {
            let shard = instance_shard(&o.instance_id);
            let dedup = format!("new:{}/{}", o.order_id, o.order_line_id);
            inst.extend(self.memory_usage(&keys.instance(&o.instance_id)).await?);
            ans.extend(self.memory_usage(&keys.answer(shard, &dedup)).await?);
            order.extend(self.memory_usage(&keys.order(&o.order_id)).await?);
        }
        mem.sampled_orders = inst.len().min(ans.len()).min(order.len());
        mem.instance_bytes = mean(&inst);
        mem.answer_bytes = mean(&ans);
        mem.order_bytes = mean(&order);
        mem.bytes_per_order = mem.instance_bytes + mem.answer_bytes + mem.order_bytes;

        let mut renewal = Vec::new();
        for (instance_id, order_id) in renewals {
            let dedup = format!("refresh:{instance_id}:{order_id}/{order_id}-000001:RENEWAL");
            renewal.extend(self.memory_usage(&keys.answer(instance_shard(instance_id), &dedup)).await?);
        }
        mem.sampled_renewals = renewal.len();
        mem.bytes_per_renewal_answer = mean(&renewal);

        let nonce_keys = self.scan(&format!("{prefix}{{s*}}:nonce:*"), 50, 50).await?;
        let mut nonce = Vec::new();
        for key in &nonce_keys {
            nonce.extend(self.memory_usage(key).await?);
        }
        mem.sampled_nonces = nonce.len();
        mem.bytes_per_nonce = mean(&nonce);
        Ok(mem)
    }

    /// Up to `want` keys matching `pattern`, in at most `rounds` SCAN rounds.
    async fn scan(&mut self, pattern: &str, want: usize, rounds: usize) -> anyhow::Result<Vec<String>> {
        let mut cursor = 0u64;
        let mut out = Vec::new();
        for _ in 0..rounds {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.conn)
                .await?;
            out.extend(keys);
            cursor = next;
            if cursor == 0 || out.len() >= want {
                break;
            }
        }
        out.truncate(want);
        Ok(out)
    }

    /// Deletes every key under `prefix`; returns how many. Bounded in rounds and time.
    pub async fn delete_prefix(&mut self, prefix: &str) -> anyhow::Result<u64> {
        let pattern = format!("{prefix}*");
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut cursor = 0u64;
        let mut deleted = 0u64;
        for _ in 0..1_000_000 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(5000)
                .query_async(&mut self.conn)
                .await?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut self.conn).await?;
                deleted += n;
            }
            cursor = next;
            if cursor == 0 {
                return Ok(deleted);
            }
            anyhow::ensure!(Instant::now() < deadline, "deleting {pattern} took over 120 s; {deleted} deleted so far");
        }
        anyhow::bail!("deleting {pattern}: SCAN did not finish")
    }
}

fn mean(values: &[u64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<u64>() as f64 / values.len() as f64
    }
}

/// Redis memory per stored item (`MEMORY USAGE`, averaged over samples).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RedisMemory {
    /// `inst` + `ans:new:…` + `order` keys of one order.
    pub bytes_per_order: f64,
    pub instance_bytes: f64,
    pub answer_bytes: f64,
    pub order_bytes: f64,
    pub sampled_orders: usize,
    /// A renewal's kept answer (`ans:refresh:…`, kept without expiry).
    pub bytes_per_renewal_answer: f64,
    pub sampled_renewals: usize,
    /// A remembered nonce (expires after twice the timestamp window).
    pub bytes_per_nonce: f64,
    pub sampled_nonces: usize,
}

/// SHA1 of the script of koogate's call path (what `redis::Script` sends).
/// Redis's own timing of each script, sampled with `SLOWLOG` (threshold 0)
/// for a short window under load: `INFO commandstats` sums every `EVALSHA`
/// into one figure, and a settle run of hundreds of events is not the same
/// cost as a call's run. What the sample gives is the call script's share of
/// the script time, and the mean time of a run of each script.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScriptSample {
    /// Seconds sampled.
    pub secs: f64,
    /// Runs of the call script in the sample, and their mean time (µs).
    pub call_runs: u64,
    pub call_usec_per_run: f64,
    /// Runs of every other script (delivery's settle, …), and their mean time (µs).
    pub other_runs: u64,
    pub other_usec_per_run: f64,
    /// The call script's share of all script time in the sample.
    pub call_share: f64,
    /// Events settled in the sample (`settle.lua`'s `HGET <record> delivered_seq`, one per event),
    /// and the other scripts' time per settled event (µs).
    pub settled_events: u64,
    pub other_usec_per_settled_event: f64,
}

impl RedisProbe {
    /// Samples `SLOWLOG` for `window` (every command logged), then puts the
    /// slow-log settings back as they were and empties it.
    pub async fn sample_scripts(&mut self, call_script: &str, window: Duration) -> anyhow::Result<ScriptSample> {
        let get = |name: &'static str| redis::cmd("CONFIG").arg("GET").arg(name).clone();
        let (threshold, max_len): (Vec<String>, Vec<String>) = redis::pipe()
            .add_command(get("slowlog-log-slower-than"))
            .add_command(get("slowlog-max-len"))
            .query_async(&mut self.conn)
            .await?;
        let set = |name: &str, value: &str| redis::cmd("CONFIG").arg("SET").arg(name).arg(value).clone();
        let () = redis::pipe()
            .add_command(set("slowlog-max-len", "500000"))
            .ignore()
            .add_command(redis::cmd("SLOWLOG").arg("RESET").clone())
            .ignore()
            .add_command(set("slowlog-log-slower-than", "0"))
            .ignore()
            .query_async(&mut self.conn)
            .await?;
        let started = Instant::now();
        tokio::time::sleep(window).await;
        let restore =
            |pair: &[String], name: &str, default: &str| set(name, pair.get(1).map_or(default, String::as_str));
        let () = restore(&threshold, "slowlog-log-slower-than", "10000").query_async(&mut self.conn).await?;
        let secs = started.elapsed().as_secs_f64();
        let entries: Vec<redis::Value> = redis::cmd("SLOWLOG").arg("GET").arg(-1).query_async(&mut self.conn).await?;
        let () = redis::pipe()
            .add_command(redis::cmd("SLOWLOG").arg("RESET").clone())
            .ignore()
            .add_command(restore(&max_len, "slowlog-max-len", "128"))
            .ignore()
            .query_async(&mut self.conn)
            .await?;
        let (mut call, mut other, mut settled) = ((0u64, 0u64), (0u64, 0u64), 0u64);
        for entry in &entries {
            // [id, unix time, duration µs, [command, args…], client, name]
            let redis::Value::Array(fields) = entry else { continue };
            let duration = fields.get(2).and_then(|v| redis::from_redis_value::<u64>(v).ok());
            let args = fields.get(3).and_then(|v| redis::from_redis_value::<Vec<String>>(v).ok());
            let (Some(duration), Some(args)) = (duration, args) else { continue };
            let command = args.first().map(|c| c.to_ascii_lowercase());
            if command.as_deref() == Some("hget") && args.get(2).is_some_and(|f| f == "delivered_seq") {
                settled += 1;
            }
            if command.as_deref() != Some("evalsha") {
                continue;
            }
            let bucket = if args.get(1).is_some_and(|sha| sha == call_script) { &mut call } else { &mut other };
            bucket.0 += 1;
            bucket.1 += duration;
        }
        let mean = |(runs, usec): (u64, u64)| if runs > 0 { usec as f64 / runs as f64 } else { 0.0 };
        let total = call.1 + other.1;
        Ok(ScriptSample {
            secs,
            call_runs: call.0,
            call_usec_per_run: mean(call),
            other_runs: other.0,
            other_usec_per_run: mean(other),
            call_share: if total > 0 { call.1 as f64 / total as f64 } else { 0.0 },
            settled_events: settled,
            other_usec_per_settled_event: if settled > 0 { other.1 as f64 / settled as f64 } else { 0.0 },
        })
    }
}

pub fn koogate_call_script() -> String {
    redis::Script::new(include_str!("../src/store/redis/apply.lua")).get_hash().to_owned()
}

/// Redis commands per accepted call.
///
/// A short `MONITOR` audit after the measured phases gives the call path
/// exactly: how many times the call's script runs per call (network round
/// trips) and the commands it runs (Redis counts those like any other).
/// `INFO commandstats` deltas over the measured phases give the totals; the
/// difference is what koogate sends besides answering calls (the outbox
/// forwarder: XREADGROUP, XAUTOCLAIM, its own script, …).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RedisCommands {
    /// Calls accepted in the measured phases.
    pub accepted_calls: u64,
    /// Runs of the call-path script per call (audit; else every EVALSHA per call).
    pub round_trips_per_call: f64,
    /// Call path per call: the script runs plus the commands they run.
    pub commands_per_call: f64,
    /// The call-path script (SHA1) and how it was identified.
    pub call_script: Option<String>,
    pub script_commands_per_run: Option<f64>,
    /// Every command per call over the measured phases (the bench's INFO excluded).
    pub all_commands_per_call: f64,
    /// Every EVALSHA per call (call path and forwarder scripts).
    pub all_evalsha_per_call: f64,
    /// `all_commands_per_call - commands_per_call`: the outbox forwarder's share.
    pub forwarder_commands_per_call: f64,
    /// Mean time Redis spent in one EVALSHA, all scripts (including the commands they ran).
    pub evalsha_usec: f64,
    /// Redis time (`INFO commandstats` usec) per call, every command of the window.
    pub usec_per_call: f64,
    /// The call-path script's share of it, per call: the EVALSHA time times
    /// the call script's share of script time in the `SLOWLOG` sample (without
    /// a sample: its share of EVALSHA runs, as if every script took the same
    /// mean time, which overstates it: a settle run covers many events).
    pub call_script_usec_per_call: f64,
    /// How the call script's share was found: "slowlog sample" or "share of runs".
    pub call_script_share_from: &'static str,
    /// The `SLOWLOG` sample of each script's own timing, under load (half peak).
    pub script_sample: Option<ScriptSample>,
    /// The rest: the outbox forwarder's commands and scripts (delivery), per call.
    pub delivery_usec_per_call: f64,
    /// redis-server CPU (user + system) per 10k accepted calls, when Redis runs here.
    pub redis_cpu_secs_per_10k_calls: Option<f64>,
    /// Delta of every command's count over the measured phases.
    pub per_command: BTreeMap<String, u64>,
    /// The MONITOR audit (absent when it could not run: then the forwarder's
    /// share is told apart by command names).
    pub audit: Option<MonitorCounts>,
    /// Calls answered during the audit.
    pub audit_calls: u64,
}

/// The measured window and the audit, as `RedisCommands::new` takes them.
pub struct RedisWindow<'a> {
    pub before: &'a BTreeMap<String, CmdStat>,
    pub after: &'a BTreeMap<String, CmdStat>,
    pub accepted_calls: u64,
    pub redis_cpu_secs: Option<f64>,
    /// MONITOR counts and the calls answered meanwhile.
    pub audit: Option<(MonitorCounts, u64)>,
    /// SHA1 of the call-path script.
    pub call_script: &'a str,
    /// Each script's own timing, sampled under load.
    pub sample: Option<ScriptSample>,
}

impl RedisCommands {
    pub fn new(w: RedisWindow<'_>) -> Self {
        let mut per_command = BTreeMap::new();
        for (name, a) in w.after {
            let b = w.before.get(name).copied().unwrap_or_default();
            let d = a.calls.saturating_sub(b.calls);
            if d > 0 {
                per_command.insert(name.clone(), d);
            }
        }
        let delta = |name: &str| per_command.get(name).copied().unwrap_or(0);
        let usec = |name: &str| {
            let a = w.after.get(name).copied().unwrap_or_default();
            let b = w.before.get(name).copied().unwrap_or_default();
            a.usec.saturating_sub(b.usec)
        };
        let own: u64 = OWN_COMMANDS.iter().map(|c| delta(c)).sum();
        let all_usec = top_level_usec(w.after.keys().map(String::as_str), usec, w.audit.as_ref().map(|(m, _)| m));
        let script_usec = usec("evalsha") + usec("eval");
        let total = per_command.values().sum::<u64>().saturating_sub(own);
        let evalsha = delta("evalsha") + delta("eval");
        let accepted = w.accepted_calls;
        let per = |n: f64| if accepted > 0 { n / accepted as f64 } else { 0.0 };
        let audited = w.audit.as_ref().filter(|(_, answered)| *answered > 0).and_then(|(m, answered)| {
            let (sha, runs) = m.call_script(w.call_script)?;
            Some((sha, runs.runs as f64 / *answered as f64, runs.commands_per_run()))
        });
        let (call_script, round_trips, per_run, commands_per_call) = match audited {
            Some((sha, trips, per_run)) => (Some(sha), trips, Some(per_run), trips * (1.0 + per_run)),
            None => {
                let forwarder: u64 = FORWARDER_COMMANDS.iter().map(|c| delta(c)).sum();
                (None, per(evalsha as f64), None, per(total.saturating_sub(forwarder) as f64))
            }
        };
        let all = per(total as f64);
        // The call script's runs among all EVALSHA runs (1 without an audit: every script is the call's).
        let runs_share = if evalsha > 0 { (round_trips * accepted as f64 / evalsha as f64).min(1.0) } else { 0.0 };
        let sampled = w.sample.as_ref().filter(|s| s.call_runs > 0);
        let (call_share, call_script_share_from) = match sampled {
            Some(s) => (s.call_share, "slowlog sample"),
            None => (runs_share, "share of runs"),
        };
        let call_script_usec = per(script_usec as f64 * call_share);
        let (audit, audit_calls) = match w.audit {
            Some((m, n)) => (Some(m), n),
            None => (None, 0),
        };
        Self {
            accepted_calls: accepted,
            round_trips_per_call: round_trips,
            commands_per_call,
            call_script,
            script_commands_per_run: per_run,
            all_commands_per_call: all,
            all_evalsha_per_call: per(evalsha as f64),
            forwarder_commands_per_call: (all - commands_per_call).max(0.0),
            evalsha_usec: if delta("evalsha") > 0 { usec("evalsha") as f64 / delta("evalsha") as f64 } else { 0.0 },
            redis_cpu_secs_per_10k_calls: w.redis_cpu_secs.map(|s| per_10k(s, accepted)),
            usec_per_call: per(all_usec as f64),
            call_script_usec_per_call: call_script_usec,
            call_script_share_from,
            script_sample: w.sample.clone(),
            delivery_usec_per_call: (per(all_usec as f64) - call_script_usec).max(0.0),
            per_command,
            audit,
            audit_calls,
        }
    }
}

/// Commands koogate sends itself (not from a script), when no MONITOR audit could tell.
const TOP_LEVEL_COMMANDS: &[&str] = &["xreadgroup", "xautoclaim", "xclaim", "xlen", "xgroup|create", "ping"];

/// Redis time of the commands clients sent, the scripts' commands not counted
/// again: Redis adds a script's commands to their own `commandstats` lines and
/// their time to the `EVALSHA` that ran them too, so summing every line counts
/// it twice. With an audit, a command seen both from clients and from scripts
/// counts by its clients' share of the audited runs; without, only scripts and
/// the forwarder's known commands count.
fn top_level_usec<'a>(
    names: impl Iterator<Item = &'a str>,
    usec: impl Fn(&str) -> u64,
    audit: Option<&MonitorCounts>,
) -> u64 {
    let known = |name: &str| f64::from(u8::from(TOP_LEVEL_COMMANDS.contains(&name)));
    let share = |name: &str| -> f64 {
        if matches!(name, "evalsha" | "eval") {
            return 1.0;
        }
        if OWN_COMMANDS.contains(&name) {
            return 0.0;
        }
        match audit {
            Some(m) => {
                let client = m.client.get(name).copied().unwrap_or(0) as f64;
                let scripted: u64 = m.scripts.values().filter_map(|r| r.commands.get(name)).sum();
                if client + scripted as f64 > 0.0 {
                    client / (client + scripted as f64)
                } else {
                    known(name)
                }
            }
            None => known(name),
        }
    };
    names.map(|name| usec(name) as f64 * share(name)).sum::<f64>().round() as u64
}

pub fn per_10k(secs: f64, calls: u64) -> f64 {
    if calls == 0 {
        0.0
    } else {
        secs / calls as f64 * 10_000.0
    }
}

// ----------------------------------------------------------------- MONITOR

/// Commands seen by `MONITOR` during an audit window: which ones clients
/// sent (network round trips) and, per script, how often it ran and which
/// commands it ran (`[0 lua]` lines follow the `EVALSHA` line of their script).
#[derive(Clone, Debug, Default, Serialize)]
pub struct MonitorCounts {
    /// Commands sent by clients, by name.
    pub client: BTreeMap<String, u64>,
    /// Per script (SHA1, or `eval`): runs and the commands it ran.
    pub scripts: BTreeMap<String, ScriptRuns>,
    /// Lines read (bounded).
    pub lines: u64,
    #[serde(skip)]
    current: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ScriptRuns {
    pub runs: u64,
    pub commands: BTreeMap<String, u64>,
}

impl ScriptRuns {
    pub fn commands_per_run(&self) -> f64 {
        if self.runs == 0 {
            0.0
        } else {
            self.commands.values().sum::<u64>() as f64 / self.runs as f64
        }
    }
}

impl MonitorCounts {
    fn add(&mut self, line: &str) {
        // +1732595000.123456 [0 127.0.0.1:52342] "evalsha" "<sha>" "5" …   then   … [0 lua] "hget" "…"
        let Some((origin, rest)) = line.split_once(']') else { return };
        let mut quoted = rest.split('"').skip(1).step_by(2);
        let Some(name) = quoted.next().map(str::to_ascii_lowercase) else { return };
        self.lines += 1;
        if origin.ends_with(" lua") {
            let script = self.current.clone().unwrap_or_else(|| "unknown".into());
            *self.scripts.entry(script).or_default().commands.entry(name).or_default() += 1;
            return;
        }
        self.current = match name.as_str() {
            "evalsha" => quoted.next().map(str::to_ascii_lowercase),
            "eval" => Some("eval".into()),
            _ => None,
        };
        if let Some(script) = &self.current {
            self.scripts.entry(script.clone()).or_default().runs += 1;
        }
        *self.client.entry(name).or_default() += 1;
    }

    /// The runs of `sha`, else of the script run most often.
    pub fn call_script(&self, sha: &str) -> Option<(String, &ScriptRuns)> {
        if let Some(runs) = self.scripts.get(sha) {
            return Some((sha.to_owned(), runs));
        }
        self.scripts.iter().max_by_key(|(_, r)| r.runs).map(|(k, r)| (format!("{k} (most runs)"), r))
    }
}

/// A running `MONITOR` (on its own raw connection, read until stopped).
pub struct Monitor {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<MonitorCounts>,
    /// Echoed at the end: every line before it has been read once it is seen.
    marker: String,
}

/// Most lines an audit reads, and longest it runs: MONITOR is never left on.
const MONITOR_MAX_LINES: u64 = 5_000_000;
const MONITOR_MAX_TIME: Duration = Duration::from_secs(60);

impl Monitor {
    pub async fn start(url: &str) -> anyhow::Result<Self> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let info = redis::Client::open(url)?.get_connection_info().clone();
        let addr = match &info.addr {
            redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
            other => anyhow::bail!("MONITOR audit needs a plain TCP Redis, not {other:?}"),
        };
        anyhow::ensure!(info.redis.password.is_none(), "MONITOR audit does not authenticate");
        let stream = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(&addr))
            .await
            .context("connecting for MONITOR timed out")??;
        let mut reader = tokio::io::BufReader::new(stream);
        reader.get_mut().write_all(b"MONITOR\r\n").await?;
        let mut first = String::new();
        tokio::time::timeout(Duration::from_secs(3), reader.read_line(&mut first)).await.context("MONITOR")??;
        anyhow::ensure!(first.starts_with("+OK"), "MONITOR answered {first:?}");
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let marker = format!("kgbench-monitor-end-{}", uuid::Uuid::new_v4().simple());
        let end = marker.clone();
        let task = tokio::spawn(async move {
            let mut counts = MonitorCounts::default();
            let deadline = tokio::time::sleep(MONITOR_MAX_TIME);
            tokio::pin!(deadline);
            let mut line = String::new();
            while counts.lines < MONITOR_MAX_LINES {
                line.clear();
                tokio::select! {
                    _ = &mut stopped => break,
                    () = &mut deadline => break,
                    read = reader.read_line(&mut line) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) if line.contains(&end) => break,
                        Ok(_) => counts.add(line.trim_end()),
                    },
                }
            }
            counts
        });
        Ok(Self { stop, task, marker })
    }

    /// Sends the end marker through `probe`, reads every line up to it, and
    /// stops (the connection closes, which ends MONITOR).
    pub async fn stop(self, probe: &mut RedisProbe) -> MonitorCounts {
        let echoed: Result<String, _> = redis::cmd("ECHO").arg(&self.marker).query_async(&mut probe.conn).await;
        let mut task = self.task;
        if echoed.is_ok() {
            if let Ok(joined) = tokio::time::timeout(Duration::from_secs(5), &mut task).await {
                return joined.unwrap_or_default();
            }
        }
        let _ = self.stop.send(());
        task.await.unwrap_or_default()
    }
}

// ---------------------------------------------------------------- /metrics

/// The admin listener's `/metrics` text.
pub async fn metrics_text(admin: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = load::get(admin, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The value of one series (`name` or `name{labels}` exactly as exported).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `koogate_call_stage_seconds_total` by stage, plus `request` (the
/// `koogate_request_duration_seconds_sum` of V2 calls) and `calls` (their count).
pub async fn call_stages(admin: SocketAddr) -> Option<BTreeMap<String, f64>> {
    let text = metrics_text(admin).await.ok()?;
    let mut out: BTreeMap<String, f64> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("koogate_call_stage_seconds_total{stage=\"")?;
            let (stage, value) = rest.split_once("\"} ")?;
            Some((stage.to_owned(), value.trim().parse().ok()?))
        })
        .collect();
    if out.is_empty() {
        return None;
    }
    out.insert("request".into(), sample(&text, r#"koogate_request_duration_seconds_sum{generation="v2"}"#)?);
    out.insert("calls".into(), sample(&text, r#"koogate_request_duration_seconds_count{generation="v2"}"#)?);
    Some(out)
}

/// Microseconds per call by stage between two [`call_stages`] snapshots;
/// `request` is the whole time from arrival to answer (the log line comes after it).
pub fn stages_per_call(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let calls = after.get("calls").copied().unwrap_or(0.0) - before.get("calls").copied().unwrap_or(0.0);
    after
        .iter()
        .filter(|(k, _)| k.as_str() != "calls" && calls > 0.0)
        .map(|(k, v)| (k.clone(), (v - before.get(k).copied().unwrap_or(0.0)) / calls * 1e6))
        .collect()
}

/// Events created and events that left the outbox (delivered, dead-lettered
/// or skipped as test events) since the gateway started, from its `/metrics`
/// counters, which move at once (the `koogate_outbox_depth` gauge is refreshed
/// only every few seconds).
pub async fn event_counts(admin: SocketAddr) -> anyhow::Result<(u64, u64)> {
    let text = metrics_text(admin).await?;
    let get = |series: &str| sample(&text, series).unwrap_or(0.0) as u64;
    let created = get("koogate_events_created_total");
    let left_outbox = ["delivered", "dead_lettered", "skipped_test"]
        .iter()
        .map(|outcome| get(&format!("koogate_delivery_attempts_total{{outcome=\"{outcome}\"}}")))
        .sum();
    Ok((created, left_outbox))
}

/// Events in the outbox now: created and not yet out of it.
async fn outbox_left(admin: SocketAddr) -> Option<f64> {
    let (created, out) = event_counts(admin).await.ok()?;
    Some(created.saturating_sub(out) as f64)
}

/// How a wait for the outbox to drain ended.
#[derive(Clone, Debug, Serialize)]
pub struct Drain {
    /// The phase it followed.
    pub after: &'static str,
    pub secs: f64,
    /// Events still in the outbox when the wait ended (`None`: unknown).
    pub left: Option<f64>,
}

/// Waits until the outbox is empty, at most `max` (polled every 50 ms).
pub async fn drain_outbox(admin: SocketAddr, max: Duration, after: &'static str) -> Drain {
    let start = Instant::now();
    let mut left = outbox_left(admin).await;
    while left.is_some_and(|d| d > 0.0) && start.elapsed() < max {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = outbox_left(admin).await;
    }
    Drain { after, secs: start.elapsed().as_secs_f64(), left }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scripts_commands_are_not_counted_twice() {
        let mut audit = MonitorCounts::default();
        for line in [
            r#"+1.0 [0 127.0.0.1:1] "evalsha" "abc" "1" "k""#,
            r#"+1.0 [0 lua] "hset" "k" "f" "v""#,
            r#"+1.0 [0 lua] "get" "k""#,
            r#"+1.0 [0 127.0.0.1:1] "get" "k""#,
            r#"+1.0 [0 127.0.0.1:2] "xreadgroup" "GROUP" "g" "c""#,
        ] {
            audit.add(line);
        }
        let usec = |name: &str| match name {
            "evalsha" => 100,
            "hset" => 40,
            "get" => 30,
            "xreadgroup" => 7,
            "xautoclaim" => 5,
            "info" => 1000,
            _ => 0,
        };
        let names = ["evalsha", "hset", "get", "xreadgroup", "xautoclaim", "info"];
        // EVALSHA in full; GET by its clients' share (1 of 2); XREADGROUP from a
        // client; XAUTOCLAIM, not audited, as a known forwarder command; HSET ran
        // only in the script and the bench's INFO is not koogate's.
        assert_eq!(top_level_usec(names.into_iter(), usec, Some(&audit)), 100 + 15 + 7 + 5);
        assert_eq!(top_level_usec(names.into_iter(), usec, None), 100 + 7 + 5);
    }
}
