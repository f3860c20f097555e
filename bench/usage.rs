//! Usage push throughput: records/s from the usage ledger to KooGallery's
//! usage API (the simulator's, which checks every signature and counts each
//! metering_sn once), and how many were lost or doubled.
//!
//! A gateway (Redis store, in-process) with pushing off takes a backlog of
//! hourly records for a number of instances through `POST /v1/usage` (the
//! intake rate). Then a second gateway on the same store, pushing on, starts
//! and the clock runs until the simulator holds every record.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::{json, Value};

use crate::load;
use crate::targets::{koogate_env, Settings, TargetKind};

const TOKEN: &str = "bench-usage-admin-token";

#[derive(Clone, Debug, Serialize)]
pub struct Usage {
    pub records: usize,
    pub instances: usize,
    /// Records accepted per second by `POST /v1/usage` (1000 per request).
    pub intake_records_per_sec: f64,
    /// Records per second from the ledger into the simulator.
    pub pushed_records_per_sec: f64,
    pub push_calls: u64,
    /// Accepted records the simulator never got.
    pub lost: u64,
    /// Records the simulator counted more than once (it deduplicates by metering_sn: must be 0).
    pub doubled: u64,
    /// Total accepted equals total at the simulator (exact, units of 0.0001).
    pub totals_equal: bool,
}

/// Hour `h` from midnight UTC 18 days ago: KooGallery takes usage whose begin_time is within 21 days
/// (koogate within 20).
fn hour(h: usize) -> String {
    let day = (chrono::Utc::now().timestamp() - 18 * 86_400).div_euclid(86_400) * 86_400;
    let secs = day + i64::try_from(h).unwrap_or(0) * 3600;
    chrono::DateTime::from_timestamp(secs, 0).map(|t| t.format("%Y%m%dT%H%M%SZ").to_string()).unwrap_or_default()
}

async fn start(s: &Settings, market: &str, push: bool) -> anyhow::Result<koogate::server::Running> {
    let mut env = koogate_env(TargetKind::Redis, s);
    env.insert("KOOGATE_KEY_PREFIX".into(), format!("{}usage:", s.run_prefix));
    env.insert("KOOGATE_DATA_DIR".into(), s.work_dir.join("usage").display().to_string());
    env.insert("KOOGATE_MARKETPLACE_URL".into(), market.into());
    env.insert("KOOGATE_ADMIN_TOKEN".into(), TOKEN.into());
    env.insert("KOOGATE_USAGE_PUSH".into(), push.to_string());
    env.insert("KOOGATE_USAGE_POLL_MS".into(), "20".into());
    let config = koogate::config::Config::from_parts(env, None).map_err(|e| anyhow::anyhow!("usage settings: {e}"))?;
    koogate::server::start(config).await.context("koogate could not start for the usage phase")
}

/// Runs the usage measurement: `instances` × `per_instance` hourly records.
pub async fn measure(s: &Settings, instances: usize, per_instance: usize) -> anyhow::Result<Usage> {
    let mut config = koogate::tools::simulate::MarketConfig::new("127.0.0.1:0".parse()?);
    config.usage_key = Some(koogate::secret::Secret::new(load::ACCESS_KEY));
    let market = koogate::tools::simulate::MarketServer::start(config).await?;
    let outcome = async {
        let intake = start(s, &market.url(), false).await?;
        let client = koogate::tools::client::KooClient::new(&format!("http://{}", intake.addr));
        let admin = koogate::tools::client::KooClient::new(&format!("http://{}", intake.admin_addr));
        let mut ids = Vec::with_capacity(instances);
        for i in 0..instances {
            let body = json!({"activity":"newInstance","businessId":format!("bu{i}"),
                "orderId":format!("CSUSAGE{i:07}"),"orderLineId":format!("CSUSAGE{i:07}-1"),"testFlag":"0"});
            let now = chrono::Utc::now().timestamp_millis();
            let res = client.v2("/koogallery/v2", load::ACCESS_KEY, body.to_string().as_bytes(), now).await?;
            let id = res.json().and_then(|j| j["instanceId"].as_str().map(str::to_owned));
            ids.push(id.context("a usage-phase purchase was not answered with an instanceId")?);
        }
        let auth = format!("Bearer {TOKEN}");
        let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
        let mut accepted_e4: i64 = 0;
        let t0 = Instant::now();
        let mut records: Vec<Value> = Vec::with_capacity(1000);
        let mut posted = 0usize;
        for (n, id) in ids.iter().enumerate() {
            for h in 0..per_instance {
                let e4 = i64::try_from((n * 7919 + h * 104_729) % 99_999 + 1).unwrap_or(1);
                accepted_e4 += e4;
                records.push(json!({"instance_id": id, "begin_time": hour(h), "end_time": hour(h + 1),
                    "usage_value": koogate::usage::record::format_e4(e4), "metering_sn": format!("bench-{n}-{h}")}));
                if records.len() == 1000 || (n + 1 == ids.len() && h + 1 == per_instance) {
                    let body = json!({ "records": std::mem::take(&mut records) }).to_string();
                    let res = admin.send(hyper::Method::POST, "/v1/usage", &headers, body.into()).await?;
                    let answer: Value = serde_json::from_slice(&res.body)?;
                    posted += answer["accepted"].as_u64().unwrap_or(0) as usize;
                }
            }
        }
        let intake_secs = t0.elapsed().as_secs_f64();
        let total = instances * per_instance;
        anyhow::ensure!(posted == total, "only {posted} of {total} usage records were accepted");
        intake.stop().await;

        let pusher = start(s, &market.url(), true).await?;
        let t1 = Instant::now();
        let deadline = t1 + Duration::from_secs(120);
        while (market.usage_stats().records as usize) < total {
            anyhow::ensure!(Instant::now() < deadline, "the usage backlog did not reach the simulator within 120 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let push_secs = t1.elapsed().as_secs_f64();
        pusher.stop().await;
        let stats = market.usage_stats();
        let at_market: i64 = stats
            .instances
            .values()
            .map(|i| koogate::tools::simulate::usage::parse_decimal_e4(&i.total).unwrap_or(i64::MIN / 4))
            .sum();
        Ok(Usage {
            records: total,
            instances,
            intake_records_per_sec: total as f64 / intake_secs,
            pushed_records_per_sec: total as f64 / push_secs,
            push_calls: stats.calls,
            lost: (total as u64).saturating_sub(stats.records),
            doubled: stats.records.saturating_sub(total as u64),
            totals_equal: at_market == accepted_e4,
        })
    }
    .await;
    market.stop().await;
    outcome
}
