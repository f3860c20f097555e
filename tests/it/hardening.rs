//! Issue 15: the JSONL target across rotation, unambiguous dedup keys, the
//! `metering_sn` registry under racing requests, admin paths, log abuse.
//! (The slow-body load test is tests/slow_body.rs: it needs the machine alone.)

use std::collections::BTreeSet;
use std::io::Read;
use std::time::Duration;

use crate::common::*;
use futures::StreamExt;
use serde_json::Value;

fn purchase(tag: &str, n: usize) -> Vec<u8> {
    format!(r#"{{"activity":"newInstance","businessId":"b-{tag}-{n}","orderId":"CS{tag}{n:04}","orderLineId":"CS{tag}{n:04}-000001","testFlag":"0"}}"#).into_bytes()
}

fn order_ids(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSONL line is JSON"))
        .filter_map(|e| e["data"]["order_id"].as_str().map(str::to_owned))
        .collect()
}

/// The file exists right after start-up; events written after the file was
/// renamed away, and after it was deleted, are all at the path; nothing is lost.
#[tokio::test]
async fn jsonl_target_follows_rename_and_delete() {
    let gw = TestGateway::start(Backend::Embedded, "rotation").await;
    let path = gw.events_path();
    assert!(path.exists(), "events.jsonl is created at start-up");
    let rotated = path.with_extension("jsonl.1");

    // Before: 20 events. Rename mid-stream, 20 more; delete (keeping a reader
    // open on the deleted file to see what reached it), 20 more.
    let mut all = Vec::new();
    let mut after_delete = Vec::new();
    let mut deleted_reader = None;
    for n in 0..60 {
        if n == 20 {
            std::fs::rename(&path, &rotated).unwrap();
        }
        if n == 40 {
            deleted_reader = Some(std::fs::File::open(&path).expect("the gateway recreated the path after the rename"));
            std::fs::remove_file(&path).unwrap();
        }
        let res = gw.v2(&purchase("ROT", n)).await;
        assert_eq!(res.result_code().as_deref(), Some("000000"));
        let id = format!("CSROT{n:04}");
        if n >= 40 {
            after_delete.push(id.clone());
        }
        all.push(id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.drain().await;

    let at_path = order_ids(&std::fs::read_to_string(&path).unwrap_or_default());
    let in_rotated = order_ids(&std::fs::read_to_string(&rotated).unwrap());
    let mut deleted = String::new();
    deleted_reader.unwrap().read_to_string(&mut deleted).unwrap();
    let in_deleted = order_ids(&deleted);
    println!(
        "rotation: {} events; {} in the renamed file, {} in the deleted file, {} at the path",
        all.len(),
        in_rotated.len(),
        in_deleted.len(),
        at_path.len()
    );
    let at_path_set: BTreeSet<&String> = at_path.iter().collect();
    let missing: Vec<&String> = after_delete.iter().filter(|id| !at_path_set.contains(id)).collect();
    assert!(missing.is_empty(), "events answered after the delete are not at the path: {missing:?}");
    let everywhere: BTreeSet<&String> = at_path.iter().chain(&in_rotated).chain(&in_deleted).collect();
    let lost: Vec<&String> = all.iter().filter(|id| !everywhere.contains(id)).collect();
    assert!(lost.is_empty(), "events lost: {lost:?}");
    gw.stop().await;
}

/// Order `A/B` line `C` and order `A` line `B/C` are two purchases: two
/// instances, two events (they shared the kept-answer key `new:A/B/C`).
async fn slashes_make_two_purchases(backend: Backend) {
    let gw = TestGateway::start(backend, "slashes").await;
    // Both orders in one shard (the kept-answer keys live in the order's shard):
    // order `{a}/{b}` line `C` and order `{a}` line `{b}/C`.
    let shard = koogate::store::keys::order_shard;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_uppercase();
    let a = format!("CS{tag}");
    let b = (0..10_000).map(|i| format!("B{i}")).find(|b| shard(&format!("{a}/{b}")) == shard(&a)).unwrap();
    let call = |order: &str, line: &str| {
        format!(
            r#"{{"activity":"newInstance","businessId":"b-{order}-{line}","orderId":"{order}","orderLineId":"{line}","testFlag":"0"}}"#
        )
    };
    let (first_call, second_call) = (call(&format!("{a}/{b}"), "C"), call(&a, &format!("{b}/C")));
    let first = gw.v2(first_call.as_bytes()).await;
    let second = gw.v2(second_call.as_bytes()).await;
    assert_eq!(first.result_code().as_deref(), Some("000000"));
    assert_eq!(second.result_code().as_deref(), Some("000000"));
    let (one, two) = (first.json().unwrap(), second.json().unwrap());
    assert_ne!(one["instanceId"], two["instanceId"], "two purchases, two instances ({backend:?})");
    gw.drain().await;
    let events = gw.events();
    let lines: BTreeSet<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["data"]["order_id"].as_str().unwrap().to_owned(),
                e["data"]["order_line_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(events.len(), 2, "two events ({backend:?}): {events:?}");
    assert_eq!(lines.len(), 2);
    // A retry of each is still answered with its own first answer, and makes no event.
    assert_eq!(gw.v2(first_call.as_bytes()).await.json().unwrap()["instanceId"], one["instanceId"]);
    assert_eq!(gw.v2(second_call.as_bytes()).await.json().unwrap()["instanceId"], two["instanceId"]);
    gw.drain().await;
    assert_eq!(gw.events().len(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn slashes_make_two_purchases_redis() {
    slashes_make_two_purchases(Backend::Redis).await;
}

#[tokio::test]
async fn slashes_make_two_purchases_embedded() {
    slashes_make_two_purchases(Backend::Embedded).await;
}

/// An answer kept by an older version under the legacy key
/// (`new:{orderId}/{orderLineId}`) is still returned to a retry.
async fn legacy_kept_answers_are_found(backend: Backend) {
    use koogate::store::keys::{instance_id_for, order_shard};
    use koogate::store::plan::{Branch, Plan, ANY};
    let gw = TestGateway::start(backend, "legacy-dedup").await;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_uppercase();
    let (order, line) = (format!("CSLEG{tag}"), format!("CSLEG{tag}-000001"));
    let instance = instance_id_for(&order, Some(&line));
    let kept = r#"{"resultCode":"000000","resultMsg":"success","instanceId":"kept-by-the-old-version"}"#;
    // What the old version's plan did: keep the answer under `new:{order}/{line}`.
    let old = Plan {
        shard: order_shard(&order),
        nonce: None,
        nonce_ttl_secs: 60,
        dedup: Some(format!("new:{order}/{line}")),
        dedup_legacy: None,
        subject: instance.clone(),
        order: None,
        branches: [(
            ANY.to_owned(),
            Branch { code: "000000".into(), answer: kept.into(), keep: true, ..Default::default() },
        )]
        .into(),
        read: Vec::new(),
        now_ms: now_ms(),
    };
    gw.running().store.apply(&old).await.unwrap();
    let body = format!(
        r#"{{"activity":"newInstance","businessId":"b-{tag}","orderId":"{order}","orderLineId":"{line}","testFlag":"0"}}"#
    );
    let res = gw.v2(body.as_bytes()).await;
    assert_eq!(res.json().unwrap()["instanceId"], "kept-by-the-old-version", "{backend:?}");
    gw.drain().await;
    assert!(gw.events().is_empty(), "a retry of a kept purchase makes no event ({backend:?})");
    gw.stop().await;
}

#[tokio::test]
async fn legacy_kept_answers_are_found_redis() {
    legacy_kept_answers_are_found(Backend::Redis).await;
}

#[tokio::test]
async fn legacy_kept_answers_are_found_embedded() {
    legacy_kept_answers_are_found(Backend::Embedded).await;
}

/// Identical usage records racing with the purchase of their instance: the
/// first are refused (unknown instance), a later one accepted. The refused ones
/// must not unregister the sn the accepted one holds, or a different record on
/// another instance is then accepted with the same sn (KooGallery dedups by sn:
/// one of the two is never billed).
async fn racing_registrations(store_url: &str, name: &str) {
    use koogate::usage::{Decision, UsageRecord};
    const TRIES: usize = 300;
    const RACERS: usize = 8;
    let gw = TestGateway::start_on(Backend::Redis, name, store_url, &[("KOOGATE_STORE", store_url)]).await;
    let store = std::sync::Arc::clone(&gw.running().store);
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_uppercase();
    let new_instance = |order: String| {
        let gw = &gw;
        async move {
            tokio::time::sleep(Duration::ZERO).await;
            let body = format!(
                r#"{{"activity":"newInstance","businessId":"b-{order}","orderId":"{order}","orderLineId":"{order}-000001","testFlag":"0"}}"#
            );
            let res = gw.v2(body.as_bytes()).await;
            res.json().unwrap()["instanceId"].as_str().unwrap().to_owned()
        }
    };
    let other = new_instance(format!("CSOTHER{tag}")).await;
    let record = |sn: &str, instance: &str| UsageRecord {
        metering_sn: sn.to_owned(),
        instance_id: instance.to_owned(),
        item: "api_calls".into(),
        begin: 1_700_000_000,
        end: 1_700_003_600,
        value_e4: 10_000,
    };
    let (mut split, mut duplicates) = (0, 0);
    for t in 0..TRIES {
        let order = format!("CSRACE{tag}{t:04}");
        let instance = koogate::store::keys::instance_id_for(&order, Some(&format!("{order}-000001")));
        let sn = format!("sn-{tag}-{t}");
        let racers = (0..RACERS).map(|i| {
            let (store, rec) = (std::sync::Arc::clone(&store), record(&sn, &instance));
            async move {
                tokio::time::sleep(Duration::from_micros(700 * i as u64)).await;
                store.usage_accept(&[rec], now_ms()).await.unwrap().remove(0)
            }
        });
        // The purchase lands somewhere among the racers (a different place each try).
        let purchase = async {
            tokio::time::sleep(Duration::from_micros(400 * (t % 12) as u64)).await;
            new_instance(order.clone()).await
        };
        let (decisions, _) = tokio::join!(futures::future::join_all(racers), purchase);
        let accepted = decisions.iter().filter(|d| matches!(d, Decision::Accepted | Decision::Duplicate)).count();
        if accepted > 0 && accepted < RACERS {
            split += 1;
        }
        // Another record with the same sn on another instance.
        let reuse = store.usage_accept(&[record(&sn, &other)], now_ms()).await.unwrap().remove(0);
        if accepted > 0 && matches!(reuse, Decision::Accepted) {
            duplicates += 1;
        }
    }
    println!(
        "racing registrations ({name}): {} requests in {TRIES} tries, {split} tries split between accepted and refused, {duplicates} duplicate sns",
        TRIES * RACERS
    );
    assert_eq!(duplicates, 0, "an sn was accepted for two records");
    gw.stop().await;
}

#[tokio::test]
async fn racing_registrations_single_redis() {
    racing_registrations(REDIS_URL, "race-single").await;
}

#[tokio::test]
async fn racing_registrations_redis_cluster() {
    let cluster = crate::common::cluster::Cluster::start();
    racing_registrations(&cluster.url(), "race-cluster").await;
}

const TOKEN: &str = "admin-token-hardening-5d1e";

async fn admin(gw: &TestGateway, method: hyper::Method, path: &str, body: Vec<u8>) -> (u16, Value) {
    gw.admin_json(method, path, Some(TOKEN), body).await
}

/// Admin paths are percent-decoded per segment; an oversized admin body is answered 413.
#[tokio::test]
async fn admin_paths_are_percent_decoded_and_big_bodies_get_413() {
    use hyper::Method;
    let gw = TestGateway::start_with(Backend::Embedded, "admin-paths", &[("KOOGATE_ADMIN_TOKEN", TOKEN)]).await;
    // An order id with a space (V1, which carries the customer id).
    let mut params = fixture_params("v1/01-newInstance-stored-value-cards.json");
    params.insert("orderId".into(), "CS ENC1".into());
    let customer = params["customerId"].clone();
    assert_eq!(gw.v1(&params).await.result_code().as_deref(), Some("000000"));
    let (status, order) =
        admin(&gw, Method::GET, &format!("/v1/orders/CS%20ENC1?customer_id={customer}"), vec![]).await;
    assert_eq!((status, order["order_id"].as_str()), (200, Some("CS ENC1")), "{order}");
    let redeem = serde_json::json!({"customer_id": customer, "redeemed_by": "ops"}).to_string().into_bytes();
    let (status, answer) = admin(&gw, Method::POST, "/v1/orders/CS%20ENC1/redeem", redeem).await;
    assert_eq!(status, 200, "{answer}");

    // A usage record whose metering_sn is not ASCII.
    let buy = r#"{"activity":"newInstance","businessId":"b-enc","orderId":"CSENC2","orderLineId":"CSENC2-000001","testFlag":"0"}"#;
    let instance = gw.v2(buy.as_bytes()).await.json().unwrap()["instanceId"].as_str().unwrap().to_owned();
    let sn = "sn-é/ü 1";
    // The last full hour: KooGallery (and intake) refuse periods older than 21 days.
    let end = chrono::Utc::now().timestamp() / 3600 * 3600;
    let t = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap().format("%Y%m%dT%H%M%SZ").to_string();
    let record = serde_json::json!({"records": [{"instance_id": instance, "begin_time": t(end - 3600),
        "end_time": t(end), "usage_value": "1", "metering_sn": sn}]});
    let (status, answer) = admin(&gw, Method::POST, "/v1/usage", record.to_string().into_bytes()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["records"][0]["status"], "accepted", "{answer}");
    let encoded = percent_encoding::utf8_percent_encode(sn, percent_encoding::NON_ALPHANUMERIC).to_string();
    let (status, shown) = admin(&gw, Method::GET, &format!("/v1/usage/records/{encoded}"), vec![]).await;
    assert_eq!((status, shown["metering_sn"].as_str()), (200, Some(sn)), "{shown}");

    // 10 MB bodies: 413, not a cut-off connection.
    let big = vec![b' '; 10 * 1024 * 1024];
    for path in ["/v1/usage", "/v1/dlq/redrive", "/v1/orders/CS%20ENC1/redeem"] {
        let (status, answer) = admin(&gw, Method::POST, path, big.clone()).await;
        assert_eq!(status, 413, "{path}: {answer}");
    }
    // The listener still serves.
    assert_eq!(admin(&gw, Method::GET, "/v1/usage", vec![]).await.0, 200);
    gw.stop().await;
}

/// Log abuse against a real `koogate serve` process (its stderr is the log):
/// a metering_sn with a newline forges no line, a 900 KB one makes a short
/// line, and a flood of bad signatures is logged at most 20 lines per second
/// with a count of the suppressed, while the metric counts every refusal.
async fn log_abuse(format: &str) {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("koogate.log");
    let (port, admin_port) = (free_port(), free_port());
    let prefix = unique_prefix("log-abuse");
    let mut env = base_env(Backend::Embedded, &prefix, dir.path(), REDIS_URL);
    env.insert("KOOGATE_LISTEN".into(), format!("127.0.0.1:{port}"));
    env.insert("KOOGATE_ADMIN_LISTEN".into(), format!("127.0.0.1:{admin_port}"));
    env.insert("KOOGATE_ADMIN_TOKEN".into(), TOKEN.into());
    env.insert("KOOGATE_LOG_FORMAT".into(), format.into());
    let mut child = Command::new(env!("CARGO_BIN_EXE_koogate"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&env)
        .stdout(std::fs::File::create(&log_path).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log_path).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let client = koogate::tools::client::KooClient::new(&format!("http://127.0.0.1:{port}"));
    let admin = koogate::tools::client::KooClient::new(&format!("http://127.0.0.1:{admin_port}"));
    let ready_by = std::time::Instant::now() + Duration::from_secs(20);
    while admin.send(hyper::Method::GET, "/healthz", &[], bytes::Bytes::new()).await.is_err() {
        assert!(std::time::Instant::now() < ready_by, "koogate did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let auth = format!("Bearer {TOKEN}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    for sn in ["sn-1\n2026-12-02T00:00:00.000000Z ERROR FORGED line", &"x".repeat(900_000)] {
        let body = serde_json::json!({"records": [{"instance_id": "no-such-instance", "begin_time": "20261101T000000Z",
            "end_time": "20261101T010000Z", "usage_value": "1", "metering_sn": sn}]});
        let res = admin.send(hyper::Method::POST, "/v1/usage", &headers, body.to_string().into()).await.unwrap();
        assert!(res.status == 200 || res.status == 400, "{}", res.status);
    }
    // 2,000 calls signed with another key, 16 at a time.
    const FLOOD: usize = 2_000;
    let started = std::time::Instant::now();
    let body =
        br#"{"activity":"newInstance","businessId":"b","orderId":"CSFLOOD","orderLineId":"CSFLOOD-1","testFlag":"0"}"#;
    futures::stream::iter(0..FLOOD)
        .for_each_concurrent(16, |_| {
            let client = &client;
            async move {
                let res = client.v2("/koogallery/v2", "not-the-access-key", body, now_ms()).await.unwrap();
                assert_eq!(res.result_code().as_deref(), Some("000001"));
            }
        })
        .await;
    let secs = started.elapsed().as_secs_f64();
    // The next refusal after the second is over carries the count of the suppressed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.v2("/koogallery/v2", "not-the-access-key", body, now_ms()).await.unwrap();
    let metrics = admin.send(hyper::Method::GET, "/metrics", &[], bytes::Bytes::new()).await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    child.kill().unwrap();
    child.wait().unwrap();

    let log = std::fs::read_to_string(&log_path).unwrap();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    let refused = log.lines().filter(|l| l.contains("call refused")).count();
    let summaries = log.lines().filter(|l| l.contains("suppressed")).count();
    println!(
        "log abuse ({format}): {} bytes of log, longest line {longest} B; {FLOOD} bad signatures in {secs:.1} s -> {refused} refusal lines, {summaries} summary lines",
        log.len()
    );
    assert!(!log.lines().any(|l| l.starts_with("2026-12-02T00:00:00.000000Z")), "a forged line:\n{log}");
    assert!(longest < 4096, "a line of {longest} bytes");
    let allowed = (secs.ceil() as usize + 2) * koogate::logfmt::PER_SECOND as usize;
    assert!(refused <= allowed, "{refused} refusal lines in {secs:.1} s (at most {allowed})");
    assert!(summaries >= 1 || refused == FLOOD, "no summary of suppressed lines");
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("koogate_") && l.contains("reason=\"bad_signature\"") && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(counted >= FLOOD as f64, "the metric counted {counted} of {FLOOD} refusals:\n{metrics}");
}

#[tokio::test]
async fn log_abuse_text() {
    log_abuse("text").await;
}

#[tokio::test]
async fn log_abuse_json() {
    log_abuse("json").await;
}

/// `SIGHUP` (logrotate's postrotate) makes a `koogate serve` with the JSONL
/// target reopen the file; the process keeps serving (unhandled, SIGHUP ends it).
#[tokio::test]
async fn sighup_reopens_the_events_file() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("koogate.log");
    let (port, admin_port) = (free_port(), free_port());
    let mut env = base_env(Backend::Embedded, &unique_prefix("sighup"), dir.path(), REDIS_URL);
    env.insert("KOOGATE_LISTEN".into(), format!("127.0.0.1:{port}"));
    env.insert("KOOGATE_ADMIN_LISTEN".into(), format!("127.0.0.1:{admin_port}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_koogate"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&env)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let client = koogate::tools::client::KooClient::new(&format!("http://127.0.0.1:{port}"));
    let ready_by = std::time::Instant::now() + Duration::from_secs(20);
    while client.send(hyper::Method::GET, "/readyz", &[], bytes::Bytes::new()).await.map(|r| r.status).ok() != Some(200)
    {
        assert!(std::time::Instant::now() < ready_by, "koogate did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = dir.path().join("data").join("events.jsonl");
    assert!(events.exists(), "created at start-up");
    let hup = Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    assert!(hup.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none(), "koogate survived SIGHUP");
    let res = client.v2("/koogallery/v2", AK, &purchase("HUP", 1), now_ms()).await.unwrap();
    assert_eq!(res.result_code().as_deref(), Some("000000"));
    let by = std::time::Instant::now() + Duration::from_secs(10);
    while order_ids(&std::fs::read_to_string(&events).unwrap_or_default()).is_empty() {
        assert!(std::time::Instant::now() < by, "the event did not reach the path");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("SIGHUP: the events file will be reopened"), "{log}");
}
