//! `koogate-bench`: koogate against two bare-hyper baselines, in one run.
//!
//! Targets, each in its own process on loopback: A (bare hyper, fixed JSON:
//! the HTTP ceiling), B (bare hyper + one Redis EVALSHA per request: the
//! floor of any design that deduplicates in Redis), koogate on Redis and
//! koogate on its embedded store. For each, with the same connections and
//! durations: a warm-up of new orders, a closed-loop phase (peak
//! throughput), an open-loop phase at that peak and one at half of it, then
//! process, Redis and memory probes. Ratios are taken within the run because
//! the machine is noisy. See bench/README.md.
//!
//! ```sh
//! cargo build --release --bins && target/release/koogate-bench [--smoke]
//! ```

mod delivery;
mod http_sink;
mod load;
mod probe;
mod profile;
mod report;
mod targets;
mod usage;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use load::{Limit, Mix, PhaseStats, Workload};
use probe::{CpuSnapshot, Monitor, MonitorCounts, RedisCommands, RedisProbe, RedisWindow};
use report::{ProcessFigures, RunInfo, TargetReport};
use targets::{OwnRedis, Settings, Target, TargetKind};

/// The Redis of an external `--redis-url` default, when redis-server is not installed.
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

#[derive(Parser)]
#[command(
    name = "koogate-bench",
    about = "Benchmark koogate against bare-hyper baselines (open-loop load, one run, ratios)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    serve: Option<Serve>,
    #[command(flatten)]
    run: RunArgs,
}

/// The baselines run as subprocesses of this binary.
#[derive(Subcommand)]
enum Serve {
    /// Baseline A: bare hyper answering a fixed JSON body.
    #[command(hide = true)]
    BaselineA {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 900)]
        max_secs: u64,
    },
    /// Baseline B: bare hyper making one Redis EVALSHA per request.
    #[command(hide = true)]
    BaselineB {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        redis_url: String,
        #[arg(long)]
        prefix: String,
        #[arg(long, default_value_t = 900)]
        max_secs: u64,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Seconds of each open-loop phase (at peak, at half peak) [default: 8; smoke: 0.3].
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of the closed-loop peak-finding phase [default: duration / 2; smoke: 0.2].
    #[arg(long)]
    peak_secs: Option<f64>,
    /// Keep-alive connections of the load generator [default: 64; smoke: 4].
    #[arg(long)]
    connections: Option<usize>,
    /// Rate (calls/s) of the "at peak" phase for every target, instead of each target's own peak.
    #[arg(long)]
    rate: Option<f64>,
    /// Share of calls that retry an earlier newInstance (same body, fresh nonce).
    #[arg(long, default_value_t = 0.1)]
    dup_share: f64,
    /// Share of calls renewing an instance (refreshInstance, scene RENEWAL).
    #[arg(long, default_value_t = 0.3)]
    renew_share: f64,
    /// Share of calls releasing an instance created earlier in the run.
    #[arg(long, default_value_t = 0.05)]
    release_share: f64,
    /// New orders created before measuring (renewed and retried later) [default: 2000; smoke: 100].
    #[arg(long)]
    warmup: Option<u64>,
    /// Idle keep-alive connections held open for the RSS probe [default: 1000; smoke: 50].
    #[arg(long)]
    idle_connections: Option<usize>,
    /// A ~5-second run proving the harness works (tiny durations; no timing checks).
    #[arg(long)]
    smoke: bool,
    /// Where to write the JSON results [default: bench/results/latest.json; smoke: bench/results/smoke.tmp].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use this Redis (e.g. redis://127.0.0.1:6379) instead of a private redis-server started for the run.
    #[arg(long)]
    redis_url: Option<String>,
    /// Targets to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "a,b,redis,embedded")]
    targets: Vec<TargetKind>,
    /// The koogate binary [default: `koogate` next to this executable].
    #[arg(long)]
    koogate_bin: Option<PathBuf>,
    /// Run koogate inside the bench process (no per-process RSS/CPU figures then).
    #[arg(long)]
    in_process: bool,
    /// KOOGATE_LOG of the koogate process (`info` logs one line per call, as in production).
    #[arg(long, default_value = "info")]
    koogate_log: String,
    /// Fail (exit 1) when any phase of any target has more errors than this share.
    #[arg(long, default_value_t = 0.01)]
    max_error_rate: f64,
    /// Profile each koogate target with `perf` in an extra peak-load phase (after the measured ones) and
    /// draw a flame graph beside the results (`bench/results/flame-<target>.svg`); skipped when perf is unavailable.
    #[arg(long)]
    flamegraph: bool,
    /// `perf record --call-graph` mode of --flamegraph (`dwarf` unwinds code built without frame pointers).
    #[arg(long, default_value = "dwarf,16384")]
    perf_call_graph: String,
}

/// The run's parameters after defaults and `--smoke`.
struct Ctx {
    info: RunInfo,
    warmup: u64,
    /// Calls of the MONITOR audit of Redis commands.
    audit_calls: u64,
    drain_max: Duration,
    /// Pause before reading RSS with the idle connections open.
    settle: Duration,
    ticks: f64,
    max_error_rate: f64,
    out: PathBuf,
    settings: Settings,
    /// `--flamegraph`: the `perf record --call-graph` mode.
    flamegraph: Option<String>,
}

impl Ctx {
    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.info.duration_secs)
    }
    fn peak(&self) -> Duration {
        Duration::from_secs_f64(self.info.peak_secs)
    }
}

/// The run's scratch directory, removed at the end.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match start(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("koogate-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn start(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.serve {
        Some(Serve::BaselineA { listen, max_secs }) => {
            targets::serve_baseline(listen, None, max_secs).await?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Serve::BaselineB { listen, redis_url, prefix, max_secs }) => {
            targets::serve_baseline(listen, Some((redis_url, prefix)), max_secs).await?;
            Ok(ExitCode::SUCCESS)
        }
        None => run(cli.run).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let smoke = args.smoke;
    let pick = |given: Option<f64>, full: f64, small: f64| given.unwrap_or(if smoke { small } else { full });
    let duration = pick(args.duration, 8.0, 0.3);
    let peak_secs = pick(args.peak_secs, (duration / 2.0).max(1.0), 0.2);
    let connections = args.connections.unwrap_or(if smoke { 4 } else { 64 });
    let warmup = args.warmup.unwrap_or(if smoke { 100 } else { 2000 });
    let idle_connections = args.idle_connections.unwrap_or(if smoke { 50 } else { 1000 });
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(if smoke { "bench/results/smoke.tmp" } else { "bench/results/latest.json" }));
    let mix = Mix { duplicate: args.dup_share, renewal: args.renew_share, release: args.release_share };
    let shares = [mix.duplicate, mix.renewal, mix.release];
    anyhow::ensure!(
        shares.iter().all(|s| (0.0..=1.0).contains(s)) && shares.iter().sum::<f64>() <= 1.0,
        "--dup-share, --renew-share and --release-share must be in 0..1 and add up to at most 1"
    );
    anyhow::ensure!(duration > 0.0 && peak_secs > 0.0, "--duration and --peak-secs must be positive");
    anyhow::ensure!(connections > 0, "--connections must be at least 1");
    anyhow::ensure!(args.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
    let mut kinds = args.targets.clone();
    kinds.sort();
    kinds.dedup();

    let needs_binary = !args.in_process && kinds.iter().any(|k| k.is_koogate());
    let koogate_bin = if needs_binary {
        targets::koogate_binary(args.koogate_bin.as_deref())?
    } else {
        args.koogate_bin.clone().unwrap_or_default()
    };
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let work = WorkDir(std::env::temp_dir().join(format!("koogate-bench-{run_id}")));
    std::fs::create_dir_all(&work.0).with_context(|| format!("cannot create {}", work.0.display()))?;

    let needs_redis = kinds.iter().any(|k| k.uses_redis());
    let mut own_redis = None;
    let (redis_url, redis_mode) = match &args.redis_url {
        Some(url) => (url.clone(), "external (--redis-url)"),
        None if !needs_redis => (DEFAULT_REDIS_URL.to_owned(), "unused"),
        None => match OwnRedis::start(&work.0.join("redis")).await? {
            Some(own) => {
                let url = own.url.clone();
                own_redis = Some(own);
                (url, "private redis-server started by the bench")
            }
            None => {
                eprintln!("koogate-bench: redis-server is not installed; using {DEFAULT_REDIS_URL}");
                (DEFAULT_REDIS_URL.to_owned(), "external (redis-server not installed)")
            }
        },
    };
    let mut redis = None;
    let mut redis_error = None;
    if needs_redis {
        match RedisProbe::connect(&redis_url).await {
            Ok(p) => redis = Some(p),
            Err(e) => redis_error = Some(format!("{e:#}")),
        }
    }
    let redis_version = match redis.as_mut() {
        Some(r) => r.version().await,
        None => None,
    };
    let ctx = Ctx {
        info: RunInfo {
            smoke,
            duration_secs: duration,
            peak_secs,
            connections,
            rate: args.rate,
            mix,
            new_order_share: mix.new_orders(),
            warmup_calls: warmup,
            idle_connections,
            redis_url: redis_url.clone(),
            redis_mode,
            redis_version,
            koogate_revision: revision(),
            koogate_log: args.koogate_log.clone(),
            in_process: args.in_process,
            total_secs: 0.0,
        },
        warmup,
        audit_calls: if smoke { 100 } else { 1000 },
        drain_max: Duration::from_secs(if smoke { 1 } else { 10 }),
        settle: Duration::from_millis(if smoke { 50 } else { 300 }),
        ticks: probe::clock_ticks(),
        max_error_rate: args.max_error_rate,
        flamegraph: args.flamegraph.then(|| args.perf_call_graph.clone()),
        out,
        settings: Settings {
            redis_url: redis_url.clone(),
            run_prefix: format!("kgbench:{run_id}:"),
            work_dir: work.0.clone(),
            koogate_bin,
            in_process: args.in_process,
            koogate_log: args.koogate_log.clone(),
            max_secs: 900,
        },
    };

    let mut reports = BTreeMap::new();
    for kind in kinds {
        eprintln!("== {}", kind.label());
        let target_started = Instant::now();
        let report = match (&redis_error, kind.uses_redis()) {
            (Some(e), true) => TargetReport { error: Some(format!("could not start: {e}")), ..TargetReport::new(kind) },
            _ => bench_target(kind, &ctx, &mut redis).await,
        };
        if let Some(e) = &report.error {
            eprintln!("   {} failed: {e}", kind.label());
        }
        eprintln!("   ({:.1} s)", target_started.elapsed().as_secs_f64());
        reports.insert(kind, report);
    }
    let delivery = if redis_error.is_none() && needs_redis {
        eprintln!("== delivery: outbox -> sink");
        let (backlog, steady) = if smoke { (100, 50) } else { (5000, 1000) };
        match delivery::measure(&ctx.settings, backlog, steady, if smoke { 100.0 } else { 250.0 }).await {
            Ok(d) => {
                eprintln!(
                    "   {} events drained at {:.0} events/s; steady {}/s: lag p50 <= {:?} s, p99 <= {:?} s",
                    d.backlog_events, d.events_per_sec, d.steady_rate, d.lag_p50_secs, d.lag_p99_secs
                );
                Some(d)
            }
            Err(e) => {
                eprintln!("   delivery phase failed: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let delivery_http = if redis_error.is_none() && kinds_have_redis(&reports) {
        eprintln!("== delivery at peak: koogate (redis) -> koogate sink over HTTP");
        let max_drain = Duration::from_secs(if smoke { 5 } else { 30 });
        match http_sink::measure(&ctx.settings, ctx.warmup, connections, ctx.peak(), mix, max_drain).await {
            Ok(d) => {
                eprintln!(
                    "   {} calls at {:.0}/s created {} events; delivered {:.0} events/s under load, drained {} after the load stopped ({:.0} events/s in all)",
                    d.calls,
                    d.calls_per_sec,
                    d.events_created,
                    d.events_per_sec_under_load,
                    d.drain_secs.map_or_else(|| format!("NOT within {max_drain:?} ({} left)", d.left), |s| format!("in {s:.2} s")),
                    d.events_per_sec
                );
                Some(d)
            }
            Err(e) => {
                eprintln!("   HTTP delivery phase failed: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let usage = if redis_error.is_none() && needs_redis {
        eprintln!("== usage push: ledger -> simulated KooGallery usage API");
        let (instances, per_instance) = if smoke { (2, 100) } else { (20, 1000) };
        match usage::measure(&ctx.settings, instances, per_instance).await {
            Ok(u) => {
                eprintln!(
                    "   {} records: intake {:.0} records/s, pushed {:.0} records/s in {} calls; lost {}, doubled {}, totals equal: {}",
                    u.records, u.intake_records_per_sec, u.pushed_records_per_sec, u.push_calls, u.lost, u.doubled, u.totals_equal
                );
                Some(u)
            }
            Err(e) => {
                eprintln!("   usage phase failed: {e:#}");
                None
            }
        }
    } else {
        None
    };
    if let Some(mut own) = own_redis.take() {
        own.stop().await;
    } else if let Some(r) = redis.as_mut() {
        match r.delete_prefix(&ctx.settings.run_prefix).await {
            Ok(n) => eprintln!("== deleted {n} Redis keys under {}", ctx.settings.run_prefix),
            Err(e) => eprintln!("== could not delete the Redis keys under {}: {e:#}", ctx.settings.run_prefix),
        }
    }
    drop(work);

    let mut info = ctx.info.clone();
    info.total_secs = started.elapsed().as_secs_f64();
    let mut summary = report::build(&info, &reports);
    summary["delivery"] = serde_json::to_value(&delivery)?;
    summary["delivery_http"] = serde_json::to_value(&delivery_http)?;
    summary["usage"] = serde_json::to_value(&usage)?;
    if delivery.is_some() || delivery_http.is_some() {
        report::add_delivery_goals(
            &mut summary,
            delivery.as_ref().map(|d| d.events_per_sec),
            delivery_http.as_ref().map(|d| d.drain_secs),
        );
    }
    println!("{}", report::table(&info, &reports, &summary));
    if let Some(d) = &delivery_http {
        println!(
            "delivery at peak to koogate sink (HTTP): {:.0} calls/s, {:.0} events/s delivered under load, outbox drained {} after the load ({:.0} events/s sustained)\n",
            d.calls_per_sec,
            d.events_per_sec_under_load,
            d.drain_secs.map_or_else(|| format!("NOT ({} left)", d.left), |s| format!("in {s:.2} s")),
            d.events_per_sec
        );
    }
    report::write(&ctx.out, &summary)?;
    println!("results written to {} ({:.1} s in all)", ctx.out.display(), info.total_secs);

    let mut failures: Vec<String> = reports
        .iter()
        .filter_map(|(k, r)| r.failure(ctx.max_error_rate).map(|why| format!("{}: {why}", k.label())))
        .collect();
    if let Some(u) = usage.as_ref().filter(|u| u.lost > 0 || u.doubled > 0 || !u.totals_equal) {
        failures.push(format!("usage push: lost {}, doubled {}, totals equal: {}", u.lost, u.doubled, u.totals_equal));
    }
    if failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for f in &failures {
            eprintln!("koogate-bench: FAILED {f}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// Starts a target, measures it, stops it. Never fails: errors land in the report.
async fn bench_target(kind: TargetKind, ctx: &Ctx, redis: &mut Option<RedisProbe>) -> TargetReport {
    let mut report = TargetReport::new(kind);
    let target = match Target::start(kind, &ctx.settings).await {
        Ok(t) => t,
        Err(e) => {
            report.error = Some(format!("could not start: {e:#}"));
            return report;
        }
    };
    let pid = target.pid.map_or_else(|| "in-process".to_owned(), |p| format!("pid {p}"));
    eprintln!("   listening on {} ({pid})", target.addr);
    if let Err(e) = measure(&target, ctx, redis, &mut report).await {
        report.error = Some(format!("{e:#}"));
    }
    target.stop().await;
    report
}

fn progress(name: &str, p: &PhaseStats) {
    let rate = p.target_rate.map(|r| format!(" at {r:.0}/s")).unwrap_or_default();
    eprintln!(
        "   {name:<16} {} loop{rate}: {:>8.0} rps  p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  {} errors{}",
        p.mode,
        p.rps,
        p.p50_ms,
        p.p99_ms,
        p.p999_ms,
        p.errors,
        if p.unsent > 0 { format!(", {} unsent", p.unsent) } else { String::new() }
    );
}

/// Waits (bounded) for koogate's outbox to drain between phases, so that one
/// phase's backlog does not load the next; not timed as load.
async fn drain(target: &Target, ctx: &Ctx, report: &mut TargetReport, after: &'static str) {
    if let Some(admin) = target.admin_addr {
        let drain = probe::drain_outbox(admin, ctx.drain_max, after).await;
        if drain.left.is_some_and(|d| d > 0.0) {
            eprintln!("   outbox not drained after {:.1} s: {:.0} events left", drain.secs, drain.left.unwrap_or(0.0));
        }
        report.outbox_drains.push(drain);
    }
}

async fn measure(
    t: &Target,
    ctx: &Ctx,
    redis: &mut Option<RedisProbe>,
    report: &mut TargetReport,
) -> anyhow::Result<()> {
    let conns = ctx.info.connections;
    let rss_start = t.pid.and_then(probe::rss_mib);

    // The footprint of idle keep-alive connections on a fresh process…
    let fresh = Arc::new(Workload::new_orders_from(1_000_000_000));
    let idle = load::idle_connections(t.addr, &fresh, ctx.info.idle_connections).await?;
    tokio::time::sleep(ctx.settle).await;
    let rss_idle_fresh = t.pid.and_then(probe::rss_mib);
    progress("idle conns, fresh", &idle.stats);
    report.phases.idle_connections_fresh = Some(idle.stats.clone());
    drop(idle);

    // Warm-up: new orders only; they become the instances renewed and retried later.
    let warm = Arc::new(Workload::warm_up());
    let w = load::closed_loop(t.addr, &warm, conns, Limit::Calls(ctx.warmup)).await?;
    progress("warm-up", &w);
    report.phases.warmup = Some(w);
    let workload = Arc::new(Workload::after(&warm, ctx.info.mix));
    drain(t, ctx, report, "warm-up").await;

    let redis_pid = match redis.as_mut() {
        Some(r) => r.local_pid().await,
        None => None,
    };
    let mut redis = if t.kind.uses_redis() { redis.as_mut() } else { None };
    let redis_before = match redis {
        Some(ref mut r) => Some(r.commandstats().await?),
        None => None,
    };
    let cpu_before = CpuSnapshot::take(t.pid, redis_pid, ctx.ticks);

    let stages_before = match t.admin_addr {
        Some(admin) => probe::call_stages(admin).await,
        None => None,
    };
    let peak = load::closed_loop(t.addr, &workload, conns, Limit::Time(ctx.peak())).await?;
    progress("peak", &peak);
    if let (Some(admin), Some(before)) = (t.admin_addr, &stages_before) {
        if let Some(after) = probe::call_stages(admin).await {
            report.stages_usec_per_call = Some(probe::stages_per_call(before, &after));
        }
    }
    anyhow::ensure!(peak.rps > 0.0, "no call was answered in the peak phase: {:?}", peak.error_samples);
    report.phases.peak = Some(peak.clone());
    drain(t, ctx, report, "peak").await;

    let rate = ctx.info.rate.unwrap_or(peak.rps);
    let at_peak = load::open_loop(t.addr, &workload, conns, rate, ctx.duration()).await?;
    progress("at peak", &at_peak);
    report.phases.at_peak = Some(at_peak.clone());
    drain(t, ctx, report, "at peak").await;

    let half = load::open_loop(t.addr, &workload, conns, peak.rps / 2.0, ctx.duration()).await?;
    progress("at half peak", &half);
    report.phases.at_half_peak = Some(half.clone());
    drain(t, ctx, report, "at half peak").await;

    let accepted = peak.accepted + at_peak.accepted + half.accepted;
    let cpu = cpu_before.until(&CpuSnapshot::take(t.pid, redis_pid, ctx.ticks));
    report.cpu = Some(cpu);
    if let Some(share) = cpu.background_share.filter(|s| *s > 0.1) {
        eprintln!("   warning: other processes used {:.0}% of the CPU meanwhile; figures disturbed", share * 100.0);
    }
    let call_script = match t.kind {
        TargetKind::B => redis::Script::new(targets::BASELINE_B_SCRIPT).get_hash().to_owned(),
        _ => probe::koogate_call_script(),
    };
    if let (Some(r), Some(before)) = (redis, redis_before) {
        let after = r.commandstats().await?;
        let redis_cpu = cpu.redis_secs;
        let sample = sample_scripts(t, ctx, (&workload, conns, peak.rps / 2.0), r, &call_script).await;
        let audit = match audit_redis_commands(t, ctx, &workload, r).await {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("   MONITOR audit skipped ({e:#}); the forwarder's commands are told apart by name");
                None
            }
        };
        report.redis = Some(RedisCommands::new(RedisWindow {
            before: &before,
            after: &after,
            accepted_calls: accepted,
            redis_cpu_secs: redis_cpu,
            audit,
            call_script: &call_script,
            sample,
        }));
        if t.kind == TargetKind::Redis {
            let prefix = ctx.settings.prefix_of(t.kind);
            let memory = r.memory_per_order(&prefix, workload.pool(), &workload.renewal_samples()).await?;
            report.redis_memory = Some(memory);
        }
    }
    if let Some(call_graph) = ctx.flamegraph.as_deref().filter(|_| t.kind.is_koogate()) {
        match profile_peak(t, ctx, &workload, call_graph).await {
            Ok(Some((stats, profile))) => {
                eprintln!("   flame graph: {} (sample weight {})", profile.svg, profile.weight);
                report.phases.profiled_peak = Some(stats);
                report.profile = Some(profile);
            }
            Ok(None) => {}
            Err(e) => eprintln!("   flame graph failed: {e:#}"),
        }
    }
    let rss_after_load = t.pid.and_then(probe::rss_mib);

    // … and after the load (the heap grown under load stays: a steady-state figure).
    let idle = load::idle_connections(t.addr, &workload, ctx.info.idle_connections).await?;
    tokio::time::sleep(ctx.settle).await;
    let rss_idle = t.pid.and_then(probe::rss_mib);
    progress("idle conns", &idle.stats);
    report.phases.idle_connections = Some(idle.stats.clone());
    drop(idle);

    if let (Some(pid), Some((start, _)), Some((after_load, _)), Some((with_idle, peak_rss))) =
        (t.pid, rss_start, rss_after_load, rss_idle)
    {
        let cpu = cpu.target_secs.unwrap_or(0.0);
        report.process = Some(ProcessFigures {
            pid,
            rss_start_mib: start,
            rss_after_load_mib: after_load,
            rss_idle_conns_mib: with_idle,
            rss_idle_conns_fresh_mib: rss_idle_fresh.map(|(rss, _)| rss),
            idle_connections: ctx.info.idle_connections,
            rss_peak_mib: peak_rss,
            cpu_secs: cpu,
            cpu_secs_per_10k_calls: probe::per_10k(cpu, accepted),
        });
    }
    Ok(())
}

/// Does the run have koogate on Redis (for the HTTP delivery phase)?
fn kinds_have_redis(reports: &BTreeMap<TargetKind, TargetReport>) -> bool {
    reports.contains_key(&TargetKind::Redis)
}

/// Where the flame graph of a target goes: beside the results file
/// (`flame-redis.svg`; `.svg.tmp` beside a `.tmp` results file, as the smoke's).
fn flame_path(ctx: &Ctx, kind: TargetKind) -> PathBuf {
    let name = kind.key().trim_start_matches("koogate_");
    let tmp = ctx.out.extension().is_some_and(|e| e == "tmp");
    ctx.out.with_file_name(format!("flame-{name}.svg{}", if tmp { ".tmp" } else { "" }))
}

/// `--flamegraph`: an extra closed loop at peak load under `perf record`,
/// after the measured phases (perf's overhead disturbs none of them).
async fn profile_peak(
    t: &Target,
    ctx: &Ctx,
    workload: &Arc<Workload>,
    call_graph: &str,
) -> anyhow::Result<Option<(PhaseStats, profile::Profile)>> {
    let Some(pid) = t.pid else {
        eprintln!("   flame graph skipped: koogate runs inside the bench (--in-process)");
        return Ok(None);
    };
    if let Err(why) = profile::available().await {
        eprintln!("   flame graph skipped: {why}");
        return Ok(None);
    }
    let data = ctx.settings.work_dir.join(format!("perf-{}.data", t.kind.key()));
    let recording = profile::start(pid, ctx.info.peak_secs, &data, call_graph)?;
    // perf attaches to every thread first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = load::closed_loop(t.addr, workload, ctx.info.connections, Limit::Time(ctx.peak())).await?;
    progress("profiled peak", &stats);
    let title = format!("koogate-bench: {} at peak load, {:.0} calls/s (perf -F 999)", t.kind.label(), stats.rps);
    let profile = recording.finish(&flame_path(ctx, t.kind), &title).await?;
    drain(t, ctx, &mut TargetReport::new(t.kind), "profiled peak").await;
    Ok(Some((stats, profile)))
}

/// Each script's own Redis time, from `SLOWLOG` (every command logged, which
/// slows Redis: so in a phase of its own after the measured ones), under load
/// at `rate` for a quarter of a phase (at most 1 s, after as long a lead-in).
async fn sample_scripts(
    t: &Target,
    ctx: &Ctx,
    (workload, conns, rate): (&Arc<Workload>, usize, f64),
    r: &mut RedisProbe,
    call_script: &str,
) -> Option<probe::ScriptSample> {
    let window = (ctx.duration() / 4).min(Duration::from_secs(1));
    let sampling = async {
        tokio::time::sleep(window).await;
        r.sample_scripts(call_script, window).await
    };
    let (load, sample) = tokio::join!(load::open_loop(t.addr, workload, conns, rate, window * 3), sampling);
    drain(t, ctx, &mut TargetReport::default(), "SLOWLOG sample").await;
    match (load, sample) {
        (Ok(_), Ok(sample)) => Some(sample),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("   SLOWLOG sample of the scripts skipped ({e:#})");
            None
        }
    }
}

/// A short closed-loop run under `MONITOR` (after the measured phases: MONITOR
/// slows Redis down), telling the commands a script runs from those a client
/// sends. Returns the counts and the calls accepted meanwhile.
async fn audit_redis_commands(
    t: &Target,
    ctx: &Ctx,
    workload: &Arc<Workload>,
    probe: &mut RedisProbe,
) -> anyhow::Result<(MonitorCounts, u64)> {
    let monitor = Monitor::start(&ctx.settings.redis_url).await?;
    let conns = ctx.info.connections.min(8);
    let calls = load::closed_loop(t.addr, workload, conns, Limit::Calls(ctx.audit_calls)).await;
    let counts = monitor.stop(probe).await;
    let calls = calls?;
    progress("MONITOR audit", &calls);
    Ok((counts, calls.answered))
}

/// `git describe --always --dirty` of the source tree, when there is one.
fn revision() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "describe", "--always", "--dirty"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}
