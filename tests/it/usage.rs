//! Usage push (issue #9): intake verdicts, pushes to a real KooGallery usage
//! API on loopback (its own signature check), batches, faults, holds, the
//! usage dead-letter list, queryInstance's usageInfo. Real Redis and the
//! embedded store, real sockets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::kooapi::{self, e4, UsageApi};
use crate::common::{sample, wait_until, Backend, TestGateway};
use serde_json::{json, Value};

const TOKEN: &str = "usage-admin-token-0123456789";

fn env<'a>(api: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("KOOGATE_ADMIN_TOKEN", TOKEN),
        ("KOOGATE_MARKETPLACE_URL", api),
        ("KOOGATE_USAGE_POLL_MS", "20"),
        ("KOOGATE_RETRY_INITIAL_MS", "50"),
        ("KOOGATE_RETRY_MAX_MS", "200"),
    ];
    env.extend_from_slice(extra);
    env
}

async fn admin(gw: &TestGateway, method: hyper::Method, path: &str, body: Value) -> (u16, Value) {
    let body = if body.is_null() { bytes::Bytes::new() } else { bytes::Bytes::from(body.to_string()) };
    gw.admin_json(method, path, Some(TOKEN), body).await
}

async fn post_usage(gw: &TestGateway, records: Vec<Value>) -> (u16, Value) {
    admin(gw, hyper::Method::POST, "/v1/usage", json!({ "records": records })).await
}

/// A purchase; returns the instance id.
async fn buy(gw: &TestGateway, order: &str) -> String {
    let body = json!({"activity":"newInstance","businessId":uuid::Uuid::new_v4().to_string(),
        "orderId":order,"orderLineId":format!("{order}-000001"),"testFlag":"0"});
    let res = gw.v2(body.to_string().as_bytes()).await;
    assert_eq!(res.result_code().as_deref(), Some("000000"), "{}", String::from_utf8_lossy(&res.body));
    res.json().unwrap()["instanceId"].as_str().unwrap().to_owned()
}

async fn call(gw: &TestGateway, body: Value) {
    let res = gw.v2(body.to_string().as_bytes()).await;
    assert_eq!(res.result_code().as_deref(), Some("000000"), "{body}: {}", String::from_utf8_lossy(&res.body));
}

/// The start of hour 0: midnight UTC of 18 days ago (KooGallery takes usage
/// whose begin_time is within 21 days; koogate within 20), fixed for the run.
fn base() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| (chrono::Utc::now().timestamp() - 18 * 86_400).div_euclid(86_400) * 86_400)
}

/// `secs` after hour 0 in `format`.
fn at(secs: i64, format: &str) -> String {
    chrono::DateTime::from_timestamp(base() + secs, 0).unwrap().format(format).to_string()
}

/// Hour `h` (from 18 days ago) as KooGallery's time format.
fn hour(h: u32) -> String {
    at(i64::from(h) * 3600, "%Y%m%dT%H%M%SZ")
}

fn rec(instance: &str, h: u32, value: &str, sn: &str) -> Value {
    json!({"instance_id": instance, "begin_time": hour(h), "end_time": hour(h + 1), "usage_value": value, "metering_sn": sn})
}

/// A sample's value (metrics are process-wide: tests running beside this one add to them).
fn metric(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series}"))
}

fn statuses(answer: &Value) -> Vec<String> {
    answer["records"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap().to_owned()).collect()
}

async fn record_status(gw: &TestGateway, sn: &str) -> Value {
    admin(gw, hyper::Method::GET, &format!("/v1/usage/records/{sn}"), Value::Null).await.1
}

async fn wait_status(gw: &TestGateway, sn: &str, status: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let r = record_status(gw, sn).await;
        if r["status"] == status {
            return r;
        }
        assert!(Instant::now() < deadline, "{sn} never became {status}: {r}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn intake_verdicts(backend: Backend) {
    let api = UsageApi::start(|_, _| kooapi::taken()).await;
    let url = api.url();
    let gw = TestGateway::start_with(backend, "usage-intake", &env(&url, &[("KOOGATE_USAGE_PUSH", "false")])).await;
    let a = buy(&gw, "CSUSAGEINTAKEA").await;
    let b = buy(&gw, "CSUSAGEINTAKEB").await;

    let (status, first) = post_usage(
        &gw,
        vec![
            rec(&a, 0, "1.5", "sn-a0"),
            rec(&a, 1, "2", "sn-a1"),
            rec(&b, 0, "0.0001", "sn-b0"),
            json!({"instance_id": a, "begin_time": at(7200, "%Y-%m-%dT%H:%M:%SZ"), "end_time": at(10_800, "%Y-%m-%dT%H:%M:%S+00:00"),
                   "usage_value": 3.25, "metering_sn": "sn-a2"}),
            json!({"instance_id": a, "begin_time": hour(0), "end_time": hour(1), "usage_value": "7",
                   "metering_sn": "sn-a0-pkg", "relate_pkg_instance": "pkg-1"}),
        ],
    )
    .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(statuses(&first), ["accepted"; 5], "{first}");
    assert_eq!(first["accepted"], 5);

    let (status, second) = post_usage(
        &gw,
        vec![
            rec(&a, 0, "1.5", "sn-a0"),                      // the same record again
            rec(&a, 0, "1.6", "sn-a0"),                      // same sn, other value
            rec(&b, 0, "1.5", "sn-a1"),                      // sn of another instance's record
            json!({"instance_id": a, "begin_time": at(1800, "%Y%m%dT%H%M%SZ"), "end_time": at(5400, "%Y%m%dT%H%M%SZ"),
                   "usage_value": "1", "metering_sn": "sn-overlap"}),
            rec(&a, 3, "1", "sn-a3"),                        // adjacent: fine
            rec("no-such-instance", 0, "1", "sn-ghost"),
            rec(&a, 4, "0", "sn-zero"),
            rec(&a, 4, "1.00001", "sn-5dec"),
            json!({"instance_id": a, "begin_time": hour(6), "end_time": hour(5), "usage_value": "1", "metering_sn": "sn-back"}),
            json!({"instance_id": a, "begin_time": hour(6), "end_time": hour(7), "usage_value": "1"}),
        ],
    )
    .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(
        statuses(&second),
        [
            "duplicate",
            "rejected",
            "rejected",
            "rejected",
            "accepted",
            "rejected",
            "rejected",
            "rejected",
            "rejected",
            "rejected"
        ],
        "{second}"
    );
    let reasons: Vec<&str> =
        second["records"].as_array().unwrap().iter().map(|r| r["reason"].as_str().unwrap_or("")).collect();
    for (i, needle) in [
        (1, "already used for a different record"),
        (2, "already used for a different record"),
        (3, "overlaps the accepted period of metering_sn sn-a1"),
        (5, "not known"),
        (6, "greater than 0"),
        (7, "more than 4 decimals"),
        (8, "end_time must be after begin_time"),
        (9, "metering_sn is missing"),
    ] {
        assert!(reasons[i].contains(needle), "record {i}: {:?} lacks {needle:?}", reasons[i]);
    }
    assert_eq!(
        (second["accepted"].as_u64(), second["duplicate"].as_u64(), second["rejected"].as_u64()),
        (Some(1), Some(1), Some(8))
    );

    // An instance from a KooGallery debug call (testFlag=1) has nothing to bill.
    let body = json!({"activity":"newInstance","businessId":"b-debug","orderId":"CSUSAGEDEBUG",
        "orderLineId":"CSUSAGEDEBUG-000001","testFlag":"1"});
    let probe = gw.v2(body.to_string().as_bytes()).await.json().unwrap()["instanceId"].as_str().unwrap().to_owned();
    let (_, debug) = post_usage(&gw, vec![rec(&probe, 0, "1", "sn-debug")]).await;
    assert_eq!(statuses(&debug), ["rejected"], "{debug}");
    assert!(debug["records"][0]["reason"].as_str().unwrap().contains("debug call"), "{debug}");

    // The refused sn-overlap left nothing behind: the same sn is free for a good record.
    let (_, third) = post_usage(&gw, vec![rec(&a, 5, "1", "sn-overlap")]).await;
    assert_eq!(statuses(&third), ["accepted"], "{third}");

    // Unreadable requests change nothing (once the debug call's event has left the outbox).
    gw.drain().await;
    let before = gw.snapshot().await;
    for (body, needle) in [
        (json!({"nothing": []}), "\"records\" is missing"),
        (json!({"records": []}), "empty"),
        (
            json!({"records": (0..1001).map(|i| rec(&a, 100 + i, "1", &format!("x{i}"))).collect::<Vec<_>>()}),
            "at most 1000",
        ),
    ] {
        let (status, answer) = admin(&gw, hyper::Method::POST, "/v1/usage", body).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer["message"].as_str().unwrap().contains(needle), "{answer}");
    }
    let auth = format!("Bearer {TOKEN}");
    let res = gw
        .admin
        .send(
            hyper::Method::POST,
            "/v1/usage",
            &[("authorization", auth.as_str())],
            bytes::Bytes::from_static(b"{not json"),
        )
        .await
        .unwrap();
    assert_eq!(res.status, 400);
    let res = gw
        .admin
        .send(
            hyper::Method::POST,
            "/v1/usage",
            &[],
            bytes::Bytes::from(json!({"records": [rec(&a, 9, "1", "sn-noauth")]}).to_string()),
        )
        .await
        .unwrap();
    assert_eq!(res.status, 401, "usage intake needs the admin token");
    assert_eq!(gw.snapshot().await, before, "a refused request wrote something");

    let stats = admin(&gw, hyper::Method::GET, "/v1/usage", Value::Null).await.1;
    assert_eq!(stats["unpushed"], 7, "{stats}");
    assert!(api.calls().is_empty(), "KOOGATE_USAGE_PUSH=false pushed anyway");
    let metrics = gw.metrics().await;
    assert!(metric(&metrics, "koogate_usage_records_total{verdict=\"accepted\"}") >= 7.0, "{metrics}");
    gw.stop().await;
    api.stop();
}

#[tokio::test]
async fn intake_verdicts_redis() {
    intake_verdicts(Backend::Redis).await;
}

#[tokio::test]
async fn intake_verdicts_embedded() {
    intake_verdicts(Backend::Embedded).await;
}

/// 2,400 hourly records on three instances: batches of at most 1000, every
/// record at KooGallery once, totals equal, queryInstance reports them.
async fn pushes_once_in_batches(backend: Backend) {
    let api = UsageApi::start(|_, _| kooapi::taken()).await;
    let url = api.url();
    let mut gw =
        TestGateway::start_with(backend, "usage-batches", &env(&url, &[("KOOGATE_USAGE_PUSH", "false")])).await;
    let instances = [buy(&gw, "CSUSAGEBATCH1").await, buy(&gw, "CSUSAGEBATCH2").await, buy(&gw, "CSUSAGEBATCH3").await];
    let mut accepted: BTreeMap<String, i64> = BTreeMap::new();
    for (n, inst) in instances.iter().enumerate() {
        let records: Vec<Value> = (0..800u32)
            .map(|h| rec(inst, h, &format!("{}.{:04}", h % 7 + 1, (h * 37 + n as u32) % 10_000), &format!("b{n}-{h}")))
            .collect();
        for r in &records {
            *accepted.entry(inst.clone()).or_default() += e4(r["usage_value"].as_str().unwrap());
        }
        let (status, answer) = post_usage(&gw, records).await;
        assert_eq!((status, answer["accepted"].as_u64()), (200, Some(800)), "{answer}");
    }
    // Turn pushing on: a second gateway on the same store (Redis) or the same one restarted (embedded).
    gw.restart(&env(&url, &[])).await;
    let started = Instant::now();
    api.wait_records(2400, Duration::from_secs(60)).await;
    let took = started.elapsed();
    let calls = api.calls();
    let sizes: Vec<usize> = calls.iter().map(|c| c.sns.len()).collect();
    assert!(sizes.iter().all(|s| *s <= 1000), "a batch over 1000: {sizes:?}");
    assert!(sizes.contains(&1000), "2400 due records should fill a batch: {sizes:?}");
    assert!(calls.iter().all(|c| c.signature_ok && c.sorted), "every push is signed over a sorted body");
    let records = api.records();
    assert!(records.values().all(|(_, n)| *n == 1), "a record arrived twice without a failure");
    assert_eq!(api.totals(), accepted, "totals at KooGallery differ from totals accepted");
    println!(
        "usage push ({backend:?}): 2400 records in {} calls, {:.0} records/s, lost 0, doubled 0",
        calls.len(),
        2400.0 / took.as_secs_f64()
    );

    // The ledger says pushed; queryInstance answers the totals.
    wait_status(&gw, "b2-799", "pushed", Duration::from_secs(5)).await;
    let stats = admin(&gw, hyper::Method::GET, "/v1/usage", Value::Null).await.1;
    assert_eq!((stats["unpushed"].as_u64(), stats["dead"].as_u64()), (Some(0), Some(0)), "{stats}");
    let ids = instances.join(",");
    let res = gw.v2(json!({"activity":"queryInstance","instanceId":ids}).to_string().as_bytes()).await;
    let answer = res.json().unwrap();
    for info in answer["info"].as_array().unwrap() {
        let id = info["instanceId"].as_str().unwrap();
        let usage = &info["usageInfo"][0];
        assert_eq!(info["usageInfo"].as_array().map(Vec::len), Some(1), "{answer}");
        assert_eq!(e4(usage["usageValue"].as_str().unwrap()), accepted[id], "{answer}");
        assert_eq!(usage["statisticalTime"], hour(800), "{answer}");
    }
    let metrics = gw.metrics().await;
    assert!(metric(&metrics, "koogate_usage_pushed_total") >= 2400.0, "{metrics}");
    gw.stop().await;
    api.stop();
}

#[tokio::test]
async fn pushes_once_in_batches_redis() {
    pushes_once_in_batches(Backend::Redis).await;
}

#[tokio::test]
async fn pushes_once_in_batches_embedded() {
    pushes_once_in_batches(Backend::Embedded).await;
}

/// KooGallery stores a batch and answers too late: the push times out and
/// is retried with the same metering_sns, which KooGallery counts once.
#[tokio::test]
async fn a_timeout_after_receipt_is_retried_with_the_same_metering_sn() {
    let api = UsageApi::start(|n, _| {
        let mut r = kooapi::taken();
        if n <= 2 {
            r.delay = Duration::from_millis(1500);
        }
        r
    })
    .await;
    let url = api.url();
    let gw =
        TestGateway::start_with(Backend::Redis, "usage-timeout", &env(&url, &[("KOOGATE_USAGE_TIMEOUT_MS", "300")]))
            .await;
    let inst = buy(&gw, "CSUSAGETIMEOUT").await;
    let records: Vec<Value> = (0..24).map(|h| rec(&inst, h, "1.25", &format!("t-{h}"))).collect();
    assert_eq!(post_usage(&gw, records).await.1["accepted"], 24);
    wait_status(&gw, "t-23", "pushed", Duration::from_secs(20)).await;
    let calls = api.calls();
    let arrivals: u32 = api.records().values().map(|(_, n)| n).sum();
    assert!(calls.len() >= 3, "expected two timed-out calls and a retry: {}", calls.len());
    assert!(arrivals >= 48, "the retry should have carried the same records again: {arrivals}");
    assert_eq!(api.records().len(), 24, "KooGallery counts each metering_sn once");
    assert_eq!(api.totals()[&inst], 24 * 12_500);
    let r = record_status(&gw, "t-0").await;
    assert!(r["attempts"].as_u64().unwrap() >= 1 && r["last_error"].as_str().unwrap().contains("timed out"), "{r}");
    println!(
        "timeout after receipt: {} calls, {arrivals} arrivals of 24 records, counted 24, lost 0, doubled 0",
        calls.len()
    );
    gw.stop().await;
    api.stop();
}

/// One record KooGallery refuses: the batch is split, the others go through,
/// the refused one lands in the usage dead-letter list with KooGallery's
/// code, and a redrive pushes it once KooGallery takes it.
async fn refused_records_are_dead_lettered_and_redriven(backend: Backend) {
    let accept_bad = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&accept_bad);
    let api = UsageApi::start(move |_, records| {
        let bad = records.iter().any(|r| r["metering_sn"] == "r-bad");
        if bad && !flag.load(std::sync::atomic::Ordering::SeqCst) {
            kooapi::refused("instance does not exist")
        } else {
            kooapi::taken()
        }
    })
    .await;
    let url = api.url();
    let mut gw =
        TestGateway::start_with(backend, "usage-refused", &env(&url, &[("KOOGATE_USAGE_PUSH", "false")])).await;
    let inst = buy(&gw, "CSUSAGEREFUSED").await;
    let mut records: Vec<Value> = (0..9).map(|h| rec(&inst, h, "2", &format!("r-{h}"))).collect();
    records.insert(4, rec(&inst, 20, "5", "r-bad"));
    assert_eq!(post_usage(&gw, records).await.1["accepted"], 10);
    gw.restart(&env(&url, &[])).await;
    let dead = wait_status(&gw, "r-bad", "dead", Duration::from_secs(20)).await;
    assert_eq!(dead["code"].as_str(), Some("MKT.0100"), "{dead}");
    let message = dead["message"].as_str().unwrap_or_default();
    assert!(message.contains("input validation failed") && message.contains("instance does not exist"), "{dead}");
    api.wait_records(9, Duration::from_secs(10)).await;
    assert!(!api.records().contains_key("r-bad"));
    let (_, dlq) = admin(&gw, hyper::Method::GET, "/v1/usage/dlq", Value::Null).await;
    let letters = dlq["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{dlq}");
    // The instance's usage view: counts by state, totals, newest first (one
    // acceptance time: ties go to the greater metering_sn).
    let (status, view) =
        admin(&gw, hyper::Method::GET, &format!("/v1/usage/instances/{inst}?limit=3"), Value::Null).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["counts"], json!({"pending": 0, "pushed": 9, "held": 0, "dead": 1}), "{view}");
    assert_eq!(view["totals"], json!({"accepted": "23", "pushed": "18"}), "{view}");
    assert_eq!((view["total"].clone(), view["counted"].clone()), (json!(10), json!(10)), "{view}");
    let shown: Vec<&str> =
        view["records"].as_array().unwrap().iter().map(|r| r["metering_sn"].as_str().unwrap()).collect();
    assert_eq!(shown, ["r-bad", "r-8", "r-7"], "{view}");
    let (status, bad) =
        admin(&gw, hyper::Method::GET, &format!("/v1/usage/instances/{inst}?limit=0"), Value::Null).await;
    assert_eq!((status, bad["error"].as_str()), (400, Some("bad_query")), "{bad}");
    let (status, _) = admin(&gw, hyper::Method::GET, "/v1/usage/instances/no-such-instance", Value::Null).await;
    assert_eq!(status, 404);
    assert_eq!(letters[0]["metering_sn"], "r-bad");
    let metrics = gw.metrics().await;
    assert!(metric(&metrics, "koogate_usage_refused_total{reason=\"refused\"}") >= 1.0, "{metrics}");

    // The operator looks with the CLI, KooGallery is fixed, the CLI redrives.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_koogate"))
            .args(args)
            .arg("--admin")
            .arg(format!("http://{}", gw.running().admin_addr))
            .env("KOOGATE_ADMIN_TOKEN", TOKEN)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = cli(&["dlq", "--usage", "list"]);
    assert!(
        listed.contains("r-bad") && listed.contains("MKT.0100") && listed.contains("1 dead usage record(s)"),
        "{listed}"
    );
    assert!(cli(&["dlq", "--usage", "show", "r-bad"]).contains("\"status\": \"dead\""));
    let usage = cli(&["instances", "usage", &inst, "--limit", "2"]);
    assert!(
        usage.contains("pending 0, held 0, pushed 9, dead 1") && usage.contains("accepted 23, pushed 18"),
        "{usage}"
    );
    assert!(usage.contains("r-bad") && usage.contains("r-8") && !usage.contains("r-7"), "{usage}");
    accept_bad.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(cli(&["dlq", "--usage", "redrive", "r-bad"]).contains("redriven: 1"));
    let (status, redriven) = admin(&gw, hyper::Method::POST, "/v1/usage/dlq/redrive", json!({"ids": ["r-nope"]})).await;
    assert_eq!((status, redriven["missing"].clone()), (200, json!(["r-nope"])));
    wait_status(&gw, "r-bad", "pushed", Duration::from_secs(10)).await;
    assert_eq!(api.records()["r-bad"].1, 1);
    assert_eq!(api.totals()[&inst], 9 * 20_000 + 50_000);
    let (_, dlq) = admin(&gw, hyper::Method::GET, "/v1/usage/dlq", Value::Null).await;
    assert_eq!(dlq["dead_letters"], json!([]));
    gw.stop().await;
    api.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_records_are_dead_lettered_and_redriven_redis() {
    refused_records_are_dead_lettered_and_redriven(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_records_are_dead_lettered_and_redriven_embedded() {
    refused_records_are_dead_lettered_and_redriven(Backend::Embedded).await;
}

/// Frozen: accepted, held, pushed after UNFREEZE. Released: new usage
/// refused, usage accepted before the release still pushed.
async fn freeze_and_release_rules(backend: Backend) {
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&down);
    let api = UsageApi::start(move |_, _| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            kooapi::failing()
        } else {
            kooapi::taken()
        }
    })
    .await;
    let url = api.url();
    let gw = TestGateway::start_with(backend, "usage-freeze", &env(&url, &[("KOOGATE_USAGE_HOLD_SECS", "1")])).await;
    let inst = buy(&gw, "CSUSAGEFREEZE").await;
    call(&gw, json!({"activity":"updateInstanceStatus","instanceId":inst,"status":"FREEZE"})).await;
    let (_, answer) = post_usage(&gw, vec![rec(&inst, 0, "3", "f-0")]).await;
    assert_eq!(statuses(&answer), ["accepted"], "usage of a frozen instance is accepted (and held)");
    wait_status(&gw, "f-0", "held", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(api.calls().is_empty(), "usage of a frozen instance was pushed");
    assert_eq!(record_status(&gw, "f-0").await["status"], "held");
    let (_, view) = admin(&gw, hyper::Method::GET, &format!("/v1/usage/instances/{inst}"), Value::Null).await;
    assert_eq!(view["counts"], json!({"pending": 0, "pushed": 0, "held": 1, "dead": 0}), "{view}");
    assert_eq!(view["totals"], json!({"accepted": "3", "pushed": "0"}), "{view}");

    call(&gw, json!({"activity":"updateInstanceStatus","instanceId":inst,"status":"UNFREEZE"})).await;
    wait_status(&gw, "f-0", "pushed", Duration::from_secs(10)).await;

    // Accepted while KooGallery is down, then the instance is released: still pushed.
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(statuses(&post_usage(&gw, vec![rec(&inst, 1, "4", "f-1")]).await.1), ["accepted"]);
    wait_until("no failed push seen", Duration::from_secs(10), async || api.calls().iter().any(|c| c.status == 500))
        .await;
    call(&gw, json!({"activity":"releaseInstance","instanceId":inst})).await;
    let (_, after) = post_usage(&gw, vec![rec(&inst, 2, "5", "f-2")]).await;
    assert_eq!(statuses(&after), ["rejected"]);
    assert!(after["records"][0]["reason"].as_str().unwrap().contains("released"), "{after}");
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_status(&gw, "f-1", "pushed", Duration::from_secs(10)).await;
    assert_eq!(api.totals()[&inst], 70_000);
    assert!(!api.records().contains_key("f-2"));
    gw.stop().await;
    api.stop();
}

#[tokio::test]
async fn freeze_and_release_rules_redis() {
    freeze_and_release_rules(Backend::Redis).await;
}

#[tokio::test]
async fn freeze_and_release_rules_embedded() {
    freeze_and_release_rules(Backend::Embedded).await;
}

/// The gateway process is SIGKILLed while KooGallery holds a push: after a
/// restart the leased records are pushed again with the same metering_sns,
/// KooGallery counts each once, and the ledger ends with nothing unpushed.
async fn killed_mid_push(backend: Backend) {
    use crate::common::process::Proc;
    let api = UsageApi::start(|n, _| {
        let mut r = kooapi::taken();
        if n == 1 {
            r.delay = Duration::from_secs(5);
        }
        r
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = crate::common::unique_prefix("usage-kill");
    let mut env = crate::common::base_env(backend, &prefix, dir.path(), crate::common::REDIS_URL);
    for (k, v) in env_of(&api.url()) {
        env.insert(k.into(), v);
    }
    let mut gw = Proc::gateway(&env).await;
    let admin = koogate::tools::client::KooClient::new(&format!("http://127.0.0.1:{}", gw.admin_port));
    let body = json!({"activity":"newInstance","businessId":"b-kill","orderId":"CSUSAGEKILL","orderLineId":"CSUSAGEKILL-1","testFlag":"0"});
    let res = gw
        .client
        .v2("/koogallery/v2", crate::common::AK, body.to_string().as_bytes(), crate::common::now_ms())
        .await
        .unwrap();
    let inst = res.json().unwrap()["instanceId"].as_str().unwrap().to_owned();
    let mut accepted = 0;
    for chunk in 0..3u32 {
        let records: Vec<Value> =
            (0..500).map(|h| rec(&inst, chunk * 500 + h, "0.5", &format!("k-{}", chunk * 500 + h))).collect();
        let auth = format!("Bearer {TOKEN}");
        let res = admin
            .send(
                hyper::Method::POST,
                "/v1/usage",
                &[("authorization", auth.as_str())],
                json!({"records": records}).to_string().into(),
            )
            .await
            .unwrap();
        let answer: Value = serde_json::from_slice(&res.body).unwrap();
        accepted += answer["accepted"].as_u64().unwrap();
    }
    assert_eq!(accepted, 1500);
    wait_until("no push started", Duration::from_secs(10), async || !api.calls().is_empty()).await;
    gw.kill9(); // KooGallery has the first batch and has not answered
    let in_flight = api.calls()[0].sns.len();
    let gw = Proc::gateway(&env).await;
    api.wait_records(1500, Duration::from_secs(30)).await;
    let admin = koogate::tools::client::KooClient::new(&format!("http://127.0.0.1:{}", gw.admin_port));
    let auth = format!("Bearer {TOKEN}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let res = admin
            .send(hyper::Method::GET, "/v1/usage", &[("authorization", auth.as_str())], bytes::Bytes::new())
            .await
            .unwrap();
        let stats: Value = serde_json::from_slice(&res.body).unwrap();
        if stats["unpushed"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the ledger still has unpushed records: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let arrivals: u32 = api.records().values().map(|(_, n)| n).sum();
    assert_eq!(api.records().len(), 1500, "lost records");
    assert!(arrivals as usize >= 1500 + in_flight, "the killed push was not repeated: {arrivals} arrivals");
    assert_eq!(api.totals()[&inst], 1500 * 5_000, "KooGallery's total differs from the accepted total");
    println!(
        "killed mid-push ({backend:?}): {in_flight} records in flight, {arrivals} arrivals, 1500 counted, lost 0, doubled 0"
    );
    drop(gw);
    if backend == Backend::Redis {
        crate::common::delete_prefix(crate::common::REDIS_URL, &prefix).await;
    }
    api.stop();
}

fn env_of(api: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KOOGATE_ADMIN_TOKEN", TOKEN.into()),
        ("KOOGATE_MARKETPLACE_URL", api.into()),
        ("KOOGATE_USAGE_POLL_MS", "20".into()),
        ("KOOGATE_USAGE_LEASE_SECS", "1".into()),
    ]
}

#[tokio::test]
async fn killed_mid_push_redis() {
    killed_mid_push(Backend::Redis).await;
}

#[tokio::test]
async fn killed_mid_push_embedded() {
    killed_mid_push(Backend::Embedded).await;
}

/// Issue 13.5: KooGallery's documented answers. Record faults (even under
/// HTTP 500) are isolated by splitting and dead-lettered with their code and
/// a readable reason, and a failed multi-record batch is never sent again as
/// such; `500 MKT.9003` splits; `500 MKT.0999` is retried with the same
/// metering_sn; `400 MKT.0102` holds every record (never dead-lettered) and
/// is counted, until the key is fixed.
async fn answers_as_documented(backend: Backend) {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    let bad_sign = Arc::new(AtomicBool::new(false));
    let internal_errors = Arc::new(AtomicU32::new(0));
    let (flag, errors) = (Arc::clone(&bad_sign), Arc::clone(&internal_errors));
    let api = UsageApi::start(move |_, records| {
        if flag.load(Ordering::SeqCst) {
            return kooapi::fault(400, "MKT.0102", "Invalid body sign");
        }
        let has = |sn: &str| records.iter().any(|r| r["metering_sn"] == sn);
        if records.len() > 4 {
            kooapi::fault(500, "MKT.9003", "Usage records extends size limit.")
        } else if has("d-9001") {
            kooapi::fault(500, "MKT.9001", "Instance ID not found.")
        } else if has("d-9002") {
            kooapi::fault(500, "MKT.9002", "Invalid usage enties.")
        } else if has("d-0150") {
            kooapi::fault(401, "MKT.0150", "Illegal operation")
        } else if has("d-0999") && errors.fetch_add(1, Ordering::SeqCst) == 0 {
            kooapi::failing()
        } else {
            kooapi::taken()
        }
    })
    .await;
    let url = api.url();
    let push_env = env(&url, &[("KOOGATE_USAGE_HOLD_SECS", "1")]);
    let mut gw =
        TestGateway::start_with(backend, "usage-answers", &env(&url, &[("KOOGATE_USAGE_PUSH", "false")])).await;
    let inst = buy(&gw, "CSUSAGEANSWERS").await;
    let sns = ["d-0", "d-9001", "d-1", "d-2", "d-9002", "d-3", "d-0150", "d-4", "d-0999", "d-5"];
    let records: Vec<Value> = sns.iter().enumerate().map(|(h, sn)| rec(&inst, h as u32, "1", sn)).collect();
    assert_eq!(post_usage(&gw, records).await.1["accepted"], 10);
    gw.restart(&push_env).await;
    for (sn, code, reason) in [
        ("d-9001", "MKT.9001", "does not know the instance"),
        ("d-9002", "MKT.9002", "invalid usage entities"),
        ("d-0150", "MKT.0150", "not of a product of this seller"),
    ] {
        let dead = wait_status(&gw, sn, "dead", Duration::from_secs(20)).await;
        assert_eq!(dead["code"].as_str(), Some(code), "{dead}");
        assert!(dead["message"].as_str().unwrap_or_default().contains(reason), "{dead}");
    }
    for sn in ["d-0", "d-1", "d-2", "d-3", "d-4", "d-5", "d-0999"] {
        wait_status(&gw, sn, "pushed", Duration::from_secs(20)).await;
    }
    assert!(record_status(&gw, "d-0999").await["attempts"].as_u64().unwrap_or(0) >= 1, "MKT.0999 was retried");
    assert!(api.records().values().all(|(_, n)| *n == 1), "each record stored once");
    let calls = api.calls();
    // A batch refused for a record fault (or split) is never sent again as such; one answered
    // MKT.0999 (a KooGallery fault) may be: it is retried with the same metering_sn.
    for failed in calls.iter().filter(|c| c.status != 200 && c.sns.len() > 1 && c.code != "MKT.0999") {
        let again = calls.iter().filter(|c| c.sns == failed.sns).count();
        assert_eq!(again, 1, "a refused batch of {} records was sent again: {:?}", failed.sns.len(), failed.sns);
    }
    println!(
        "{backend:?}: 10 records, 3 record faults under HTTP 500/401 isolated in {} calls ({} answered MKT.9003)",
        calls.len(),
        calls.iter().filter(|c| c.status == 500 && c.sns.len() > 4).count()
    );

    // 400 MKT.0102: a configuration fault. Records are held and counted, never dead-lettered.
    bad_sign.store(true, Ordering::SeqCst);
    let before = api.calls().len();
    let held: Vec<Value> = (0..3).map(|i| rec(&inst, 20 + i, "2", &format!("c-{i}"))).collect();
    assert_eq!(post_usage(&gw, held).await.1["accepted"], 3);
    wait_until("the records were not pushed again after the hold interval", Duration::from_secs(10), async || {
        api.calls()[before..].iter().filter(|c| c.status == 400).count() >= 2
    })
    .await;
    for i in 0..3 {
        let r = record_status(&gw, &format!("c-{i}")).await;
        assert_eq!(r["status"], "pending", "{r}");
        assert!(r["last_error"].as_str().unwrap_or_default().contains("MKT.0102"), "{r}");
        assert_eq!(r["attempts"], 0, "a configuration fault is not an attempt: {r}");
    }
    let metrics = gw.metrics().await;
    assert!(metric(&metrics, "koogate_usage_push_config_faults_total{code=\"MKT.0102\"}") >= 2.0, "{metrics}");
    let (_, dlq) = admin(&gw, hyper::Method::GET, "/v1/usage/dlq", Value::Null).await;
    assert_eq!(dlq["dead_letters"].as_array().map(Vec::len), Some(3), "only the 3 record faults: {dlq}");
    bad_sign.store(false, Ordering::SeqCst); // the operator fixed the key
    for i in 0..3 {
        wait_status(&gw, &format!("c-{i}"), "pushed", Duration::from_secs(10)).await;
    }
    gw.stop().await;
    api.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_as_documented_redis() {
    answers_as_documented(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_as_documented_embedded() {
    answers_as_documented(Backend::Embedded).await;
}

/// Issue 13.7: with KOOGATE_MARKETPLACE_AK/SK set, every push carries API
/// Gateway's signature (`Authorization` + `X-Sdk-Date`) over the bytes sent,
/// beside `ts`/`nonce`/`signature`; the stand-in verifies both on its own.
/// A wrong SK is refused by API Gateway (401): a configuration fault, held.
/// KOOGATE_USAGE_APIG_SIGN=false turns it off.
#[tokio::test]
async fn pushes_carry_the_api_gateway_signature() {
    let api = UsageApi::start(|_, _| kooapi::taken()).await;
    let url = api.url();
    let signed = [
        ("KOOGATE_MARKETPLACE_AK", kooapi::APIG_AK),
        ("KOOGATE_MARKETPLACE_SK", kooapi::APIG_SK),
        ("KOOGATE_USAGE_HOLD_SECS", "1"),
    ];
    let mut gw = TestGateway::start_with(Backend::Redis, "usage-apig", &env(&url, &signed)).await;
    let inst = buy(&gw, "CSUSAGEAPIG").await;
    assert_eq!(post_usage(&gw, vec![rec(&inst, 0, "1", "g-0"), rec(&inst, 1, "2", "g-1")]).await.1["accepted"], 2);
    wait_status(&gw, "g-1", "pushed", Duration::from_secs(10)).await;
    let calls = api.calls();
    assert!(!calls.is_empty() && calls.iter().all(|c| c.apig == Some(true) && c.signature_ok && c.sorted), "{calls:?}");

    // A wrong SK: API Gateway refuses (401 APIGW.0301), the record is held, not dead-lettered.
    let wrong = [
        ("KOOGATE_MARKETPLACE_AK", kooapi::APIG_AK),
        ("KOOGATE_MARKETPLACE_SK", "not-the-sk"),
        ("KOOGATE_USAGE_HOLD_SECS", "1"),
    ];
    gw.restart(&env(&url, &wrong)).await;
    assert_eq!(post_usage(&gw, vec![rec(&inst, 2, "1", "g-2")]).await.1["accepted"], 1);
    wait_until("no push with the wrong SK", Duration::from_secs(10), async || {
        api.calls().iter().any(|c| c.apig == Some(false))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = record_status(&gw, "g-2").await;
    assert_eq!(r["status"], "pending", "{r}");
    assert!(r["last_error"].as_str().unwrap_or_default().contains("APIGW.0301"), "{r}");
    assert!(!format!("{r}").contains("not-the-sk"), "no secret in the ledger");

    // Turned off: only ts/nonce/signature.
    let mut off = signed.to_vec();
    off.push(("KOOGATE_USAGE_APIG_SIGN", "false"));
    let before = api.calls().len();
    gw.restart(&env(&url, &off)).await;
    wait_status(&gw, "g-2", "pushed", Duration::from_secs(10)).await;
    let later = api.calls()[before..].to_vec();
    assert!(!later.is_empty() && later.iter().all(|c| c.apig.is_none() && c.signature_ok), "{later:?}");
    gw.stop().await;
    api.stop();
}

/// Issue 13.8: the usage push retries on the fallback host when the primary
/// cannot be reached (a closed loopback port), with the same records and
/// metering_sn; the push metrics say which host answered.
async fn falls_back_when_the_host_cannot_be_reached(backend: Backend) {
    let api = UsageApi::start(|_, _| kooapi::taken()).await;
    let fallback = api.url();
    let closed = format!("http://127.0.0.1:{}", crate::common::free_port());
    let gw = TestGateway::start_with(
        backend,
        "usage-fallback",
        &env(&closed, &[("KOOGATE_MARKETPLACE_FALLBACK_URLS", fallback.as_str())]),
    )
    .await;
    let inst = buy(&gw, "CSUSAGEFALLBACK").await;
    let records: Vec<Value> = (0..5).map(|h| rec(&inst, h, "1.5", &format!("fb-{h}"))).collect();
    assert_eq!(post_usage(&gw, records).await.1["accepted"], 5);
    wait_status(&gw, "fb-4", "pushed", Duration::from_secs(10)).await;
    assert_eq!(api.records().len(), 5);
    assert!(api.records().values().all(|(_, n)| *n == 1));
    let metrics = gw.metrics().await;
    let host = fallback.trim_start_matches("http://");
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("koogate_usage_push_calls_total{")
                && l.contains(&format!("host=\"{host}\""))
                && l.contains("outcome=\"taken\"")
        })
        .unwrap_or_else(|| panic!("no taken push labelled host={host}:\n{metrics}"));
    println!("{backend:?}: primary {closed} refused the connection; {line}");
    gw.stop().await;
    api.stop();
}

#[tokio::test]
async fn falls_back_when_the_host_cannot_be_reached_redis() {
    falls_back_when_the_host_cannot_be_reached(Backend::Redis).await;
}

#[tokio::test]
async fn falls_back_when_the_host_cannot_be_reached_embedded() {
    falls_back_when_the_host_cannot_be_reached(Backend::Embedded).await;
}

/// A record whose period began `days_ago` days ago (one hour long).
fn aged(instance: &str, days_ago: i64, sn: &str) -> Value {
    let begin = chrono::Utc::now().timestamp() - days_ago * 86_400;
    let t = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap().format("%Y%m%dT%H%M%SZ").to_string();
    json!({"instance_id": instance, "begin_time": t(begin), "end_time": t(begin + 3600), "usage_value": "1", "metering_sn": sn})
}

/// Issue 13.6: intake refuses a begin_time KooGallery would refuse (more than
/// 21 days old; koogate refuses from 20 days on). With the default cadence
/// (KOOGATE_USAGE_POLL_MS=1000) a record is pushed within seconds of being
/// accepted, well inside Huawei's "first 15 minutes after the period": the
/// accept → pushed latency is measured and printed.
#[tokio::test]
async fn the_21_day_rule_and_the_push_latency() {
    let api = UsageApi::start(|_, _| kooapi::taken()).await;
    let url = api.url();
    let gw = TestGateway::start_with(
        Backend::Redis,
        "usage-cadence",
        &[("KOOGATE_ADMIN_TOKEN", TOKEN), ("KOOGATE_MARKETPLACE_URL", url.as_str())],
    )
    .await;
    let inst = buy(&gw, "CSUSAGECADENCE").await;
    let (_, answer) = post_usage(&gw, vec![aged(&inst, 22, "old-22"), aged(&inst, 21, "old-21")]).await;
    assert_eq!(statuses(&answer), ["rejected", "rejected"], "{answer}");
    let reason = answer["records"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("more than 21 days") && reason.contains("MKT.9004"), "{answer}");

    // The period that just ended, posted at once, 10 times: accept -> pushed.
    let mut latencies = Vec::new();
    for i in 0..10u32 {
        let end = chrono::Utc::now().timestamp() / 60 * 60 - i64::from(9 - i) * 60;
        let t = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap().format("%Y%m%dT%H%M%SZ").to_string();
        let sn = format!("cad-{i}");
        let r = json!({"instance_id": inst, "begin_time": t(end - 60), "end_time": t(end), "usage_value": "1", "metering_sn": sn});
        let posted = Instant::now();
        assert_eq!(statuses(&post_usage(&gw, vec![r]).await.1), ["accepted"]);
        let pushed = wait_status(&gw, &sn, "pushed", Duration::from_secs(20)).await;
        let observed = posted.elapsed();
        let ms =
            |f: &str| chrono::DateTime::parse_from_rfc3339(pushed[f].as_str().unwrap()).unwrap().timestamp_millis();
        latencies.push((ms("pushed_at") - ms("accepted_at"), observed.as_millis()));
    }
    let mut ledger: Vec<i64> = latencies.iter().map(|(l, _)| *l).collect();
    ledger.sort_unstable();
    println!(
        "accept -> pushed latency (default KOOGATE_USAGE_POLL_MS=1000, 10 records): ledger min {} ms, median {} ms, max {} ms; observed by the caller up to {} ms",
        ledger[0],
        ledger[5],
        ledger[9],
        latencies.iter().map(|(_, o)| *o).max().unwrap_or(0)
    );
    gw.stop().await;
    api.stop();
}

/// Issue 13.6: usage held for a frozen instance that nears KooGallery's
/// 21-day limit is counted in koogate_usage_held_near_expiry.
async fn held_usage_near_expiry_is_counted(backend: Backend) {
    let api = UsageApi::start(|_, _| kooapi::taken()).await;
    let url = api.url();
    let gw =
        TestGateway::start_with(backend, "usage-near-expiry", &env(&url, &[("KOOGATE_USAGE_HOLD_SECS", "1")])).await;
    let inst = buy(&gw, "CSUSAGENEAREXPIRY").await;
    call(&gw, json!({"activity":"updateInstanceStatus","instanceId":inst,"status":"FREEZE"})).await;
    let (_, answer) = post_usage(&gw, vec![aged(&inst, 19, "ne-19"), aged(&inst, 1, "ne-1")]).await;
    assert_eq!(statuses(&answer), ["accepted", "accepted"], "{answer}");
    wait_status(&gw, "ne-19", "held", Duration::from_secs(5)).await;
    // Metrics are process-wide: other gateways of this binary set the gauge too; look until ours shows.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = gw.metrics().await;
        if metric(&metrics, "koogate_usage_held_near_expiry") >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "koogate_usage_held_near_expiry never counted the 19-day-old held record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(api.calls().is_empty(), "held usage was pushed");
    call(&gw, json!({"activity":"updateInstanceStatus","instanceId":inst,"status":"UNFREEZE"})).await;
    wait_status(&gw, "ne-19", "pushed", Duration::from_secs(10)).await;
    gw.stop().await;
    api.stop();
}

#[tokio::test]
async fn held_usage_near_expiry_is_counted_redis() {
    held_usage_near_expiry_is_counted(Backend::Redis).await;
}

#[tokio::test]
async fn held_usage_near_expiry_is_counted_embedded() {
    held_usage_near_expiry_is_counted(Backend::Embedded).await;
}
