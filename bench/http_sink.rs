//! Delivery to HTTP at peak load: the `koogate` binary on Redis, delivering
//! to the reference sink (`koogate sink`, in its own process) while calls
//! come in as fast as it answers them (closed loop, the peak phase's
//! connections and duration), then the clock runs until every event created
//! during the load has been delivered: the events/s delivered while under
//! load and the outbox's drain time after the load stopped. Counts come from
//! the gateway's `/metrics` (`koogate_events_created_total`, and
//! `koogate_delivery_attempts_total` of the outcomes that take an event out of
//! the outbox: `probe::event_counts`; the sink accepts everything, so that is
//! delivered) and the sink's `/stats`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::delivery::{reference_sink, SECRET};
use crate::load::{self, Limit, Mix, Workload};
use crate::probe;
use crate::targets::{Settings, Target, TargetKind};

#[derive(Clone, Debug, Default, Serialize)]
pub struct HttpSink {
    /// Calls accepted during the load and its length.
    pub calls: u64,
    pub load_secs: f64,
    pub calls_per_sec: f64,
    /// Events created by those calls (each is delivered once).
    pub events_created: u64,
    /// Events delivered while the load ran, per second.
    pub events_per_sec_under_load: f64,
    /// From the end of the load until every event created was delivered (`None`: not within the limit).
    pub drain_secs: Option<f64>,
    /// Events created and not delivered when the wait ended.
    pub left: u64,
    /// Events created / (load + drain time): the sustained delivery rate.
    pub events_per_sec: f64,
    /// The sink's own count of events it accepted (signature checked), over the whole phase.
    pub sink_accepted: Option<u64>,
    /// Where the sink ran: `koogate sink` process or in-process.
    pub sink: &'static str,
}

/// The reference sink, in its own process when the koogate binary is there.
enum Sink {
    Process(Child),
    InProcess(koogate::tools::sink::RunningSink),
}

async fn start_sink(s: &Settings, addr: SocketAddr) -> anyhow::Result<Sink> {
    if s.in_process || !s.koogate_bin.is_file() {
        let sink = koogate::tools::sink::start(reference_sink(addr)).await?;
        return Ok(Sink::InProcess(sink));
    }
    let mut cmd = Command::new(&s.koogate_bin);
    for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("KOOGATE_")) {
        cmd.env_remove(name);
    }
    let child = cmd
        .args(["sink", "--listen", &addr.to_string(), "--secret", SECRET])
        .env("KOOGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run koogate sink")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while load::get(addr, "/stats").await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "koogate sink did not listen on {addr} within 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Sink::Process(child))
}

impl Sink {
    fn name(&self) -> &'static str {
        match self {
            Sink::Process(_) => "koogate sink (own process)",
            Sink::InProcess(_) => "in-process",
        }
    }

    async fn stop(self) {
        match self {
            Sink::InProcess(sink) => sink.stop().await,
            Sink::Process(mut child) => {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            }
        }
    }
}

/// Waits until every event created so far has left the outbox, at most `max`; the seconds waited, if it was.
async fn wait_delivered(admin: SocketAddr, since: (u64, u64), created: u64, max: Duration) -> (Option<f64>, u64) {
    let start = Instant::now();
    loop {
        let done = match probe::event_counts(admin).await {
            Ok((_, done)) => done.saturating_sub(since.1),
            Err(_) => 0,
        };
        let left = created.saturating_sub(done);
        if left == 0 {
            return (Some(start.elapsed().as_secs_f64()), 0);
        }
        if start.elapsed() >= max {
            return (None, left);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the phase: warm-up, then peak load with delivery to the sink, then the drain.
pub async fn measure(
    s: &Settings,
    warmup: u64,
    connections: usize,
    load_time: Duration,
    mix: Mix,
    max_drain: Duration,
) -> anyhow::Result<HttpSink> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let sink_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let sink = start_sink(s, sink_addr).await?;
    let env = BTreeMap::from([
        ("KOOGATE_BILLING_URL".to_owned(), format!("http://{sink_addr}/events")),
        ("KOOGATE_BILLING_SECRET".to_owned(), SECRET.to_owned()),
        ("KOOGATE_KEY_PREFIX".to_owned(), format!("{}http:", s.run_prefix)),
    ]);
    let target = match Target::start_with(TargetKind::Redis, s, "http_sink", env).await {
        Ok(t) => t,
        Err(e) => {
            sink.stop().await;
            return Err(e);
        }
    };
    let outcome = run(&target, warmup, connections, load_time, mix, max_drain).await;
    target.stop().await;
    let sink_accepted = match (&outcome, &sink) {
        (Ok(_), _) => sink_accepted(sink_addr).await,
        _ => None,
    };
    let name = sink.name();
    sink.stop().await;
    outcome.map(|mut r| {
        r.sink_accepted = sink_accepted;
        r.sink = name;
        r
    })
}

async fn sink_accepted(addr: SocketAddr) -> Option<u64> {
    let (_, body) = load::get(addr, "/stats").await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v.get("accepted")?.as_u64()
}

async fn run(
    t: &Target,
    warmup: u64,
    connections: usize,
    load_time: Duration,
    mix: Mix,
    max_drain: Duration,
) -> anyhow::Result<HttpSink> {
    let admin = t.admin_addr.context("koogate has no admin listener")?;
    let warm = Arc::new(Workload::warm_up());
    load::closed_loop(t.addr, &warm, connections, Limit::Calls(warmup)).await?;
    let workload = Arc::new(Workload::after(&warm, mix));
    let before = probe::event_counts(admin).await?;
    // The warm-up's events first, so that the load starts on an empty outbox.
    let (_, left) = wait_delivered(admin, (0, 0), before.0, max_drain).await;
    anyhow::ensure!(left == 0, "the warm-up's events were not delivered within {max_drain:?} ({left} left)");
    let before = probe::event_counts(admin).await?;

    let stats = load::closed_loop(t.addr, &workload, connections, Limit::Time(load_time)).await?;
    let loaded = probe::event_counts(admin).await?;
    let created = loaded.0.saturating_sub(before.0);
    let delivered_under_load = loaded.1.saturating_sub(before.1);
    let (drain_secs, left) = wait_delivered(admin, before, created, max_drain).await;
    let load_secs = stats.secs.max(f64::EPSILON);
    let total_secs = load_secs + drain_secs.unwrap_or(max_drain.as_secs_f64());
    Ok(HttpSink {
        calls: stats.accepted,
        load_secs,
        calls_per_sec: stats.accepted as f64 / load_secs,
        events_created: created,
        events_per_sec_under_load: delivered_under_load as f64 / load_secs,
        drain_secs,
        left,
        events_per_sec: created.saturating_sub(left) as f64 / total_secs,
        sink_accepted: None,
        sink: "",
    })
}
