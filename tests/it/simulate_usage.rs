//! `koogate simulate` as KooGallery's usage API: signature, sorted body,
//! record checks, refused instances, deduplication by `metering_sn`, failures
//! and lost answers on purpose; and the `account-settlement-usage` scenario
//! against real gateways (a day of hourly usage of 3 workspaces).

use crate::common::*;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use koogate::marketplace::usage::{canonical_body, signature_headers, PushOutcome, PushRecord, UsageApi, USAGE_PATH};
use koogate::secret::Secret;
use koogate::store::keys::instance_id_for;
use koogate::tools::simulate::orders::{line_id, run_order_id};
use koogate::tools::simulate::{
    run_scenarios, GatewayTarget, MarketConfig, MarketServer, Report, RetryPolicy, RunOptions, UsageSimStats,
    UsageTarget, USAGE_SCENARIO,
};
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "usage-admin-token-1";

/// Midnight UTC two days ago (KooGallery takes a begin_time within 21 days), as `yyyyMMdd`.
fn day() -> String {
    (chrono::Utc::now() - chrono::Duration::days(2)).format("%Y%m%d").to_string()
}

fn rec(sn: &str, instance: &str, value: &str) -> PushRecord {
    let d = day();
    PushRecord {
        instance_id: instance.into(),
        record_time: format!("{d}T011000Z"),
        begin_time: format!("{d}T000000Z"),
        end_time: format!("{d}T010000Z"),
        usage_value: value.into(),
        metering_sn: sn.into(),
        relate_pkg_instance: None,
    }
}

async fn usage_market(key: Option<&str>) -> MarketServer {
    let mut config = MarketConfig::new("127.0.0.1:0".parse().unwrap());
    config.usage_key = key.map(Secret::new);
    config.refuse_instances = BTreeSet::from(["ghost-instance".to_owned()]);
    MarketServer::start(config).await.unwrap()
}

/// A push of `body` as sent, signed over `signed` (normally the same) with `key`.
async fn raw_push(addr: SocketAddr, body: &str, signed: &str, key: &str, ts_ms: i64) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://{addr}{USAGE_PATH}"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in signature_headers(key, signed, ts_ms, &koogate::tools::client::nonce()) {
        req = req.header(name, value);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, serde_json::from_slice(&res.bytes().await.unwrap()).unwrap())
}

async fn sim_usage_over_http(addr: SocketAddr) -> UsageSimStats {
    let body = reqwest::get(format!("http://{addr}/sim/usage")).await.unwrap().bytes().await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn the_usage_api_verifies_checks_and_deduplicates() {
    let market = usage_market(Some(AK)).await;
    let addr = market.addr;
    let api = UsageApi::new(&market.url(), Secret::new(AK), Duration::from_secs(5)).unwrap();

    // A correctly signed push is taken and counted exactly.
    let first = [rec("sn-1", "inst-a", "1.2345"), rec("sn-2", "inst-a", "0.0005"), rec("sn-3", "inst-b", "7")];
    assert_eq!(api.push(&first).await, PushOutcome::Taken);
    let stats = market.usage_stats();
    assert_eq!((stats.calls, stats.taken_calls, stats.records, stats.duplicates), (1, 1, 3, 0), "{stats:?}");
    assert_eq!(stats.instances["inst-a"].total, "1.235");
    assert_eq!(stats.instances["inst-a"].total_e4, 12_350);
    assert_eq!(stats.instances["inst-b"].total, "7");

    let now = now_ms();
    let good = canonical_body(&[rec("sn-4", "inst-a", "1")]);

    // Wrong key: 400 MKT.0102 "Invalid body sign" (documented), nothing stored.
    let (status, body) = raw_push(addr, &good, &good, "wrong-key", now).await;
    assert_eq!((status, body["error_code"].as_str()), (400, Some("MKT.0102")), "{body}");
    assert!(body["error_msg"].as_str().unwrap().contains("signature"), "{body}");
    // Stale ts: 400 MKT.0102.
    let (status, body) = raw_push(addr, &good, &good, AK, now - 6 * 60 * 1000).await;
    assert_eq!((status, body["error_code"].as_str()), (400, Some("MKT.0102")), "{body}");
    assert!(body["error_msg"].as_str().unwrap().contains("5 minutes"), "{body}");
    // Keys not sorted (but signed over the sorted form): 400, nothing stored.
    let d = day();
    let unsorted = format!(
        r#"{{"usage_records":[{{"usage_value":"1","metering_sn":"sn-4","instance_id":"inst-a","begin_time":"{d}T000000Z","end_time":"{d}T010000Z","record_time":"{d}T011000Z"}}]}}"#
    );
    let (status, body) = raw_push(addr, &unsorted, &good, AK, now).await;
    assert_eq!((status, body["error_code"].as_str()), (400, Some("MKT.0102")), "{body}");
    assert!(body["error_msg"].as_str().unwrap().contains("keys sorted"), "{body}");
    // An invalid record (5 decimals) refuses the whole call: 500 MKT.0100 (input validation).
    let invalid = canonical_body(&[rec("sn-4", "inst-a", "1"), rec("sn-5", "inst-a", "0.00001")]);
    let (status, body) = raw_push(addr, &invalid, &invalid, AK, now).await;
    assert_eq!((status, body["error_code"].as_str()), (500, Some("MKT.0100")), "{body}");
    assert!(body["error_msg"].as_str().unwrap().contains("usage_records[1].usage_value"), "{body}");
    // More than 1000 records: 500 MKT.9003.
    let many: Vec<PushRecord> = (0..1001).map(|i| rec(&format!("many-{i}"), "inst-a", "1")).collect();
    let many = canonical_body(&many);
    let (status, body) = raw_push(addr, &many, &many, AK, now).await;
    assert_eq!((status, body["error_code"].as_str()), (500, Some("MKT.9003")), "{body}");
    // A begin_time more than 21 days ago: 500 MKT.9004.
    let old_day = (chrono::Utc::now() - chrono::Duration::days(22)).format("%Y%m%d").to_string();
    let old = PushRecord {
        begin_time: format!("{old_day}T000000Z"),
        end_time: format!("{old_day}T010000Z"),
        ..rec("sn-old", "inst-a", "1")
    };
    assert!(matches!(api.push(&[old]).await, PushOutcome::RecordFault { code, .. } if code == "MKT.9004"));

    // A batch naming an instance KooGallery does not know: 500 MKT.9001, nothing of it stored.
    let with_ghost = [rec("sn-6", "inst-a", "2"), rec("sn-7", "ghost-instance", "3")];
    match api.push(&with_ghost).await {
        PushOutcome::RecordFault { code, msg } => {
            assert_eq!(code, "MKT.9001");
            assert!(msg.contains("instance ghost-instance does not exist"), "{msg}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let stats = market.usage_stats();
    assert_eq!(stats.records, 3, "nothing of the refused calls was stored: {stats:?}");
    assert!(!stats.metering_sns.contains_key("sn-4") && !stats.metering_sns.contains_key("sn-6"));
    assert_eq!((stats.unauthorized_calls, stats.refused_calls), (3, 4), "{stats:?}");

    // The same metering_sn again: success, counted once, one duplicate receipt.
    assert_eq!(api.push(&first[..1]).await, PushOutcome::Taken);
    let stats = market.usage_stats();
    assert_eq!((stats.records, stats.duplicates, stats.conflicts), (3, 1, 0), "{stats:?}");
    assert_eq!(stats.metering_sns["sn-1"].receipts, 2);
    assert_eq!(stats.instances["inst-a"].total_e4, 12_350, "a duplicate is not counted again");

    // Fail share 1.0: HTTP 500 MKT.0999, nothing stored.
    market.set_usage_fail_share(1.0);
    let (status, body) = raw_push(addr, &good, &good, AK, now_ms()).await;
    assert_eq!((status, body["error_code"].as_str()), (500, Some("MKT.0999")), "{body}");
    assert!(matches!(api.push(&[rec("sn-8", "inst-a", "1")]).await, PushOutcome::Retry(_)));
    market.set_usage_fail_share(0.0);
    let stats = market.usage_stats();
    assert_eq!((stats.failed_calls, stats.records), (2, 3), "{stats:?}");
    assert!(!stats.metering_sns.contains_key("sn-8"));

    // A lost answer: stored, then answered after the caller gave up; the retry is a duplicate.
    market.set_usage_delay_after_store(Duration::from_millis(1500), 1.0);
    let impatient = UsageApi::new(&market.url(), Secret::new(AK), Duration::from_millis(300)).unwrap();
    let lost = [rec("sn-9", "inst-b", "0.5")];
    assert!(matches!(impatient.push(&lost).await, PushOutcome::Retry(_)));
    let stats = market.usage_stats();
    assert_eq!(stats.delayed_answers, 1);
    assert_eq!(stats.metering_sns["sn-9"].receipts, 1, "KooGallery has the record although the answer was lost");
    market.set_usage_delay_after_store(Duration::ZERO, 0.0);
    assert_eq!(impatient.push(&lost).await, PushOutcome::Taken);
    let stats = market.usage_stats();
    assert_eq!((stats.records, stats.duplicates), (4, 2), "{stats:?}");
    assert_eq!(stats.instances["inst-b"].total, "7.5");

    // The same stats over HTTP; other methods on the usage path are not an API.
    assert_eq!(sim_usage_over_http(addr).await, market.usage_stats());
    let get = reqwest::get(format!("http://{addr}{USAGE_PATH}")).await.unwrap();
    assert_eq!(get.status().as_u16(), 404);
    market.stop().await;
}

#[tokio::test]
async fn without_a_key_every_usage_call_is_refused() {
    let market = usage_market(None).await;
    let body = canonical_body(&[rec("sn-1", "inst-a", "1")]);
    let (status, answer) = raw_push(market.addr, &body, &body, AK, now_ms()).await;
    assert_eq!((status, answer["error_code"].as_str()), (400, Some("MKT.0102")), "{answer}");
    assert!(answer["error_msg"].as_str().unwrap().contains("--key"), "{answer}");
    assert_eq!(market.usage_stats().records, 0);
    market.stop().await;
}

/// The total of workspace `w` (1-based) in the scenario: 24 × 1.2345 × w + 0.1001 × (0 + … + 23).
fn expected_total(w: i64) -> String {
    let e4 = 24 * 12_345 * w + 1_001 * 276;
    koogate::tools::simulate::usage::format_e4(e4)
}

fn workspace_ids(run_id: &str) -> Vec<String> {
    ["SIMPPUWSA", "SIMPPUWSB", "SIMPPUWSC"]
        .iter()
        .map(|t| {
            let order = run_order_id(t, run_id);
            instance_id_for(&order, Some(&line_id(&order)))
        })
        .collect()
}

async fn usage_gateway(backend: Backend, name: &str, market: &MarketServer, extra: &[(&str, &str)]) -> TestGateway {
    let url = market.url();
    let mut env = vec![
        ("KOOGATE_MARKETPLACE_URL", url.as_str()),
        ("KOOGATE_MARKETPLACE_AK", "sim-ak"),
        ("KOOGATE_MARKETPLACE_SK", "sim-sk"),
        ("KOOGATE_USAGE_POLL_MS", "50"),
        ("KOOGATE_ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    env.extend_from_slice(extra);
    TestGateway::start_with(backend, name, &env).await
}

fn usage_run(gw: &TestGateway, market: &MarketServer, run_id: &str) -> RunOptions {
    let mut opts = RunOptions::new(GatewayTarget::new(&format!("http://{}", gw.running().addr), AK));
    opts.scenarios = vec![USAGE_SCENARIO.into()];
    opts.run_id = run_id.into();
    opts.retry = RetryPolicy { retries: 3, first_delay: Duration::from_millis(50) };
    let admin = format!("http://{}", gw.running().admin_addr);
    opts.usage = Some(UsageTarget::new(&admin, Secret::new(ADMIN_TOKEN), &market.url()));
    opts
}

/// The scenario passed and KooGallery holds exactly each workspace's day.
fn assert_settled(report: &Report, stats: &UsageSimStats, run_id: &str) {
    assert!(report.ok(), "{}", report.table());
    assert_eq!(report.summary(), "1 scenarios, 7 calls, 0 violations", "{}", report.table());
    let calls = &report.scenarios[0].calls;
    let activities: Vec<&str> = calls.iter().map(|c| c.activity.as_str()).collect();
    assert_eq!(
        activities,
        ["newInstance", "newInstance", "newInstance", "postUsage", "usageReceived", "accountView", "queryInstance"]
    );
    assert_eq!(calls[3].result_code.as_deref(), Some("72/72"));
    assert_eq!(calls[4].result_code.as_deref(), Some("72/72"));
    let ids = workspace_ids(run_id);
    for (w, id) in (1..).zip(&ids) {
        assert_eq!(calls[w as usize - 1].instance_id.as_deref(), Some(id.as_str()));
        let got = &stats.instances[id];
        assert_eq!((got.total.as_str(), got.records), (expected_total(w).as_str(), 24), "{id}");
    }
    let ours: Vec<_> = stats.metering_sns.iter().filter(|(sn, _)| sn.contains(&format!("-{run_id}-"))).collect();
    assert_eq!(ours.len(), 72, "every record reached KooGallery");
    assert!(ours.iter().all(|(_, r)| ids.contains(&r.instance_id)));
}

#[tokio::test]
async fn the_usage_scenario_settles_a_day_of_three_workspaces() {
    let mut config = MarketConfig::new("127.0.0.1:0".parse().unwrap());
    config.usage_key = Some(Secret::new(AK));
    let market = MarketServer::start(config).await.unwrap();
    let gw = usage_gateway(Backend::Embedded, "simulate-usage", &market, &[]).await;

    let report = run_scenarios(&usage_run(&gw, &market, "RUSAGE1")).await.unwrap();
    let stats = market.usage_stats();
    assert_settled(&report, &stats, "RUSAGE1");
    assert_eq!((stats.records, stats.failed_calls, stats.unauthorized_calls, stats.refused_calls), (72, 0, 0, 0));
    // The enrichment saw pay-per-use orders.
    assert!(market.queried().keys().any(|o| o.starts_with("SIMPPUWSA-RUSAGE1")), "{:?}", market.queried());
    gw.stop().await;
    market.stop().await;
}

#[tokio::test]
async fn failed_pushes_and_lost_answers_are_retried_and_counted_once() {
    let mut config = MarketConfig::new("127.0.0.1:0".parse().unwrap());
    config.usage_key = Some(Secret::new(AK));
    let market = std::sync::Arc::new(MarketServer::start(config).await.unwrap());
    let extra =
        [("KOOGATE_USAGE_TIMEOUT_MS", "300"), ("KOOGATE_RETRY_INITIAL_MS", "50"), ("KOOGATE_USAGE_BATCH", "10")];
    let gw = usage_gateway(Backend::Redis, "simulate-usage-faults", &market, &extra).await;

    // First every usage call fails; after two failures, answers are lost once; then all goes well.
    market.set_usage_fail_share(1.0);
    let faults = {
        let market = std::sync::Arc::clone(&market);
        tokio::spawn(async move {
            while market.usage_stats().failed_calls < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            market.set_usage_delay_after_store(Duration::from_millis(1200), 1.0);
            market.set_usage_fail_share(0.0);
            while market.usage_stats().delayed_answers < 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            market.set_usage_delay_after_store(Duration::ZERO, 0.0);
        })
    };
    let report = run_scenarios(&usage_run(&gw, &market, "RUSAGE2")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), faults).await.expect("the faults happened").unwrap();
    let stats = market.usage_stats();
    assert_settled(&report, &stats, "RUSAGE2");
    assert!(stats.failed_calls >= 2, "{stats:?}");
    assert!(stats.delayed_answers >= 1, "{stats:?}");
    assert!(stats.duplicates >= 1, "a batch whose answer was lost was pushed again: {stats:?}");
    assert_eq!((stats.records, stats.conflicts), (72, 0));
    gw.stop().await;
    if let Ok(market) = std::sync::Arc::try_unwrap(market) {
        market.stop().await;
    }
}

#[tokio::test]
async fn usage_koogallery_refuses_is_a_violation() {
    let mut config = MarketConfig::new("127.0.0.1:0".parse().unwrap());
    config.usage_key = Some(Secret::new(AK));
    config.refuse_instances = BTreeSet::from([workspace_ids("RUSAGE3")[1].clone()]);
    let market = MarketServer::start(config).await.unwrap();
    let gw = usage_gateway(Backend::Embedded, "simulate-usage-refused", &market, &[]).await;
    let mut opts = usage_run(&gw, &market, "RUSAGE3");
    if let Some(usage) = opts.usage.as_mut() {
        usage.wait = Duration::from_secs(3);
    }
    let report = run_scenarios(&opts).await.unwrap();
    assert!(!report.ok());
    let lines = report.violation_lines().join("\n");
    assert!(lines.contains("#5 usageReceived: 24 of 72 records never reached KooGallery within 3s"), "{lines}");
    assert!(lines.contains("#6 queryInstance: wsB"), "{lines}");
    let stats = market.usage_stats();
    assert_eq!(stats.records, 48, "{stats:?}");
    assert!(stats.refused_calls >= 1);
    gw.stop().await;
    market.stop().await;
}

#[tokio::test]
async fn without_the_admin_api_the_usage_scenario_is_skipped() {
    let mut opts = RunOptions::new(GatewayTarget::new("http://127.0.0.1:9", AK));
    opts.scenarios = vec![USAGE_SCENARIO.into(), "nope".into()];
    assert!(run_scenarios(&opts).await.is_err(), "unknown names are still refused");
    opts.scenarios = vec![USAGE_SCENARIO.into()];
    let report = run_scenarios(&opts).await.unwrap();
    assert!(report.scenarios.is_empty());
    assert_eq!(report.skipped.len(), 1);
    assert!(report.skipped[0].why.contains("--admin"), "{:?}", report.skipped);
    assert!(report.table().contains("account-settlement-usage: skipped"), "{}", report.table());
    assert_eq!(report.summary(), "0 scenarios, 0 calls, 0 violations");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["skipped"][0]["name"], json!(USAGE_SCENARIO));
}

fn koogate_bin() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_koogate"));
    cmd.env_remove("KOOGATE_ACCESS_KEY")
        .env_remove("KOOGATE_ADMIN_TOKEN")
        .env_remove("KOOGATE_MARKETPLACE_AK")
        .env_remove("KOOGATE_MARKETPLACE_SK")
        .env("KOOGATE_LOG", "warn")
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_the_usage_scenario_with_admin_flags() {
    let port = free_port();
    let sim_url = format!("http://127.0.0.1:{port}");
    let env = [
        ("KOOGATE_MARKETPLACE_URL", sim_url.as_str()),
        // The simulator's keys: the gateway learns the buyer of each purchase (the account view step).
        ("KOOGATE_MARKETPLACE_AK", "sim-ak"),
        ("KOOGATE_MARKETPLACE_SK", "sim-sk"),
        ("KOOGATE_USAGE_POLL_MS", "50"),
        ("KOOGATE_RETRY_INITIAL_MS", "50"),
        ("KOOGATE_ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    let gw = TestGateway::start_with(Backend::Embedded, "simulate-usage-bin", &env).await;
    let gateway = format!("http://{}", gw.running().addr);
    let admin = format!("http://{}", gw.running().admin_addr);
    let listen = format!("127.0.0.1:{port}");
    let args =
        ["simulate", "--listen", &listen, "--gateway", &gateway, "--scenario", USAGE_SCENARIO, "--admin", &admin];
    let child = koogate_bin().args(args).env("KOOGATE_ACCESS_KEY", AK).env("KOOGATE_ADMIN_TOKEN", ADMIN_TOKEN).output();
    let out = tokio::time::timeout(Duration::from_secs(120), child).await.expect("koogate simulate finishes").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 scenarios, 7 calls, 0 violations"), "{stdout}");
    assert!(stdout.contains("usage API: ") && stdout.contains(" 72 records"), "{stdout}");
    assert!(!stdout.contains(ADMIN_TOKEN) && !stdout.contains(AK), "no secret is printed");

    // Without the token the scenario is skipped, said so, and the run passes.
    let args =
        ["simulate", "--listen", "127.0.0.1:0", "--gateway", &gateway, "--scenario", USAGE_SCENARIO, "--admin", &admin];
    let out = koogate_bin().args(args).env("KOOGATE_ACCESS_KEY", AK).output().await.unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("account-settlement-usage: skipped"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin without --admin-token"));
    gw.stop().await;
}

/// Issue 13.7/13.8/13.13: the simulator as API Gateway verifies the AK/SK
/// signature of a push (on the bytes as sent) beside ts/nonce/signature, and
/// plays the fallback host behind a primary that refuses connections.
#[tokio::test]
async fn the_simulator_verifies_the_api_gateway_signature_and_plays_the_fallback_host() {
    let mut config = MarketConfig::new("127.0.0.1:0".parse().unwrap());
    config.usage_key = Some(Secret::new(AK));
    config.usage_require_apig = true;
    let market = MarketServer::start(config).await.unwrap();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let both = UsageApi::with_fallbacks(&closed, &[market.url()], Secret::new(AK), Duration::from_secs(5))
        .unwrap()
        .with_apig(Secret::new("sim-ak"), Secret::new("sim-sk"));
    let pushed = both.push_on(&[rec("apig-1", "inst-a", "1")]).await;
    assert_eq!(pushed.outcome, PushOutcome::Taken);
    assert_eq!(pushed.host, market.url().trim_start_matches("http://"), "the fallback answered");

    // A wrong SK: API Gateway's 401 APIGW.0301, a configuration fault; nothing stored.
    let wrong = UsageApi::new(&market.url(), Secret::new(AK), Duration::from_secs(5))
        .unwrap()
        .with_apig(Secret::new("sim-ak"), Secret::new("not-the-sk"));
    let refused = wrong.push(&[rec("apig-2", "inst-a", "1")]).await;
    assert!(matches!(&refused, PushOutcome::ConfigFault { code, .. } if code == "APIGW.0301"), "{refused:?}");
    // Required but not sent: refused too.
    let unsigned = UsageApi::new(&market.url(), Secret::new(AK), Duration::from_secs(5)).unwrap();
    assert!(matches!(unsigned.push(&[rec("apig-3", "inst-a", "1")]).await, PushOutcome::ConfigFault { .. }));
    let stats = market.usage_stats();
    assert_eq!((stats.records, stats.unauthorized_calls), (1, 2), "{stats:?}");
    assert!(stats.metering_sns.contains_key("apig-1"));
    market.stop().await;
}
