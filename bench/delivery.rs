//! Delivery throughput: events/s from the outbox to a local sink, and the
//! latency from accepted to delivered.
//!
//! A gateway (Redis store, in-process) is given a billing URL where nothing
//! listens yet; a burst of purchases fills its outbox (their attempts fail
//! and back off at most 100 ms). Then the reference sink starts on that port
//! and the clock runs until it has accepted every event: the backlog's
//! drain rate. Afterwards, with the sink up, calls at a steady rate measure
//! accepted → delivered from the gateway's own `koogate_delivery_lag_seconds`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::load;
use crate::targets::{koogate_env, Settings, TargetKind};

/// The signing secret shared by koogate and the reference sink in the delivery phases.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The reference sink as the delivery phases run it: accepts everything at once, keeps nothing on disk.
pub fn reference_sink(listen: std::net::SocketAddr) -> koogate::tools::sink::SinkConfig {
    koogate::tools::sink::SinkConfig::new(listen, SECRET)
}

#[derive(Clone, Debug, Serialize)]
pub struct Delivery {
    /// Events in the backlog drained.
    pub backlog_events: usize,
    /// Backlog drain rate, outbox → sink.
    pub events_per_sec: f64,
    /// Calls of the steady phase and their rate.
    pub steady_events: usize,
    pub steady_rate: f64,
    /// Accepted → delivered in the steady phase (upper bounds of histogram buckets).
    pub lag_p50_secs: Option<f64>,
    pub lag_p99_secs: Option<f64>,
}

fn purchase(tag: &str, n: usize) -> Vec<u8> {
    format!(
        r#"{{"activity":"newInstance","businessId":"b{n}","orderId":"CS{tag}{n:07}","orderLineId":"CS{tag}{n:07}-000001","testFlag":"0"}}"#
    )
    .into_bytes()
}

/// Sends `n` purchases, `concurrency` at a time (or at `rate` per second).
async fn send(
    client: &koogate::tools::client::KooClient,
    tag: &str,
    n: usize,
    concurrency: usize,
    rate: Option<f64>,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..n {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        while tasks.len() >= concurrency {
            tasks.join_next().await;
        }
        let (client, body) = (client.clone(), purchase(tag, i));
        tasks.spawn(async move {
            let now = chrono::Utc::now().timestamp_millis();
            client.v2("/koogallery/v2", load::ACCESS_KEY, &body, now).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        let res = done.context("a call task failed")??;
        anyhow::ensure!(
            res.result_code().as_deref() == Some("000000"),
            "a delivery-phase call was answered {:?}",
            res.result_code()
        );
    }
    Ok(())
}

/// `koogate_delivery_lag_seconds` buckets: upper bound → cumulative count.
fn lag_buckets(exposition: &str) -> BTreeMap<String, f64> {
    exposition
        .lines()
        .filter(|l| l.starts_with("koogate_delivery_lag_seconds_bucket{"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?.to_owned();
            let v = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, v))
        })
        .collect()
}

/// The smallest bucket bound holding quantile `q` of the difference of two snapshots.
fn quantile(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, q: f64) -> Option<f64> {
    let mut bounds: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(le, v)| {
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((bound, v - before.get(le).copied().unwrap_or(0.0)))
        })
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = bounds.last()?.1;
    if total <= 0.0 {
        return None;
    }
    bounds.iter().find(|(_, c)| *c >= q * total).map(|(b, _)| *b)
}

async fn metrics(admin: std::net::SocketAddr) -> anyhow::Result<String> {
    let (_, body) = load::get(admin, "/metrics").await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Runs the delivery measurement.
pub async fn measure(s: &Settings, backlog: usize, steady: usize, steady_rate: f64) -> anyhow::Result<Delivery> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut env = koogate_env(TargetKind::Redis, s);
    env.insert("KOOGATE_KEY_PREFIX".into(), format!("{}dlv:", s.run_prefix));
    env.insert("KOOGATE_DATA_DIR".into(), s.work_dir.join("delivery").display().to_string());
    env.insert("KOOGATE_BILLING_URL".into(), format!("http://127.0.0.1:{port}/events"));
    env.insert("KOOGATE_BILLING_SECRET".into(), SECRET.into());
    env.insert("KOOGATE_RETRY_INITIAL_MS".into(), "50".into());
    env.insert("KOOGATE_RETRY_MAX_MS".into(), "100".into());
    let config =
        koogate::config::Config::from_parts(env, None).map_err(|e| anyhow::anyhow!("delivery settings: {e}"))?;
    let running = koogate::server::start(config).await.context("koogate could not start for the delivery phase")?;
    let client = koogate::tools::client::KooClient::new(&format!("http://{}", running.addr));
    let admin = running.admin_addr;

    let outcome = async {
        send(&client, "DLVB", backlog, 32, None).await?;
        let sink = koogate::tools::sink::start(reference_sink(format!("127.0.0.1:{port}").parse()?)).await?;
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(90);
        while (sink.stats().accepted.load(Ordering::Relaxed) as usize) < backlog {
            anyhow::ensure!(Instant::now() < deadline, "the backlog did not drain within 90 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drain = t0.elapsed().as_secs_f64();

        let before = lag_buckets(&metrics(admin).await?);
        send(&client, "DLVS", steady, 32, Some(steady_rate)).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while (sink.stats().accepted.load(Ordering::Relaxed) as usize) < backlog + steady {
            anyhow::ensure!(Instant::now() < deadline, "the steady phase did not drain within 30 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = lag_buckets(&metrics(admin).await?);
        sink.stop().await;
        Ok(Delivery {
            backlog_events: backlog,
            events_per_sec: backlog as f64 / drain,
            steady_events: steady,
            steady_rate,
            lag_p50_secs: quantile(&before, &after, 0.5),
            lag_p99_secs: quantile(&before, &after, 0.99),
        })
    }
    .await;
    running.stop().await;
    outcome
}
