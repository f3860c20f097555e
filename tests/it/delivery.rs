//! Delivery to a real billing-core HTTP server: nothing lost, each id once,
//! ordered per instance, retried, dead-lettered, redriven; and the `Sink`
//! contract, the same for the HTTP and the JSONL sink (`sink_contract`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::billing::{ok, Arrival, Billing, SECRET};
use crate::common::*;
use hyper::Method;

const TOKEN: &str = "admin-token-for-tests-7f3a";

fn delivery_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KOOGATE_BILLING_URL", url.to_owned()),
        ("KOOGATE_BILLING_SECRET", SECRET.to_owned()),
        ("KOOGATE_RETRY_INITIAL_MS", "100".to_owned()),
        ("KOOGATE_RETRY_MAX_MS", "1000".to_owned()),
        ("KOOGATE_DELIVERY_TIMEOUT_SECS", "1".to_owned()),
        ("KOOGATE_ADMIN_TOKEN", TOKEN.to_owned()),
    ]
}

async fn start(backend: Backend, name: &str, url: &str, more: &[(&str, &str)]) -> TestGateway {
    let env = delivery_env(url);
    let mut pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    pairs.extend_from_slice(more);
    TestGateway::start_with(backend, name, &pairs).await
}

/// Distinct ids, each delivered (2xx) exactly once?
fn once_each(delivered: &[Arrival]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in delivered {
        *counts.entry(a.id.clone()).or_insert(0) += 1;
    }
    counts
}

/// Per instance, the sequence numbers in delivery order.
fn seqs_by_instance(delivered: &[Arrival]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for a in delivered {
        let (subject, seq) = koogate::store::plan::parse_event_id(&a.id).unwrap();
        out.entry(subject.to_owned()).or_default().push(seq);
    }
    out
}

async fn billing_down_then_up(backend: Backend) {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/billing/events");
    let gw = start(backend, "down-up", &url, &[]).await;
    for rel in fixture_files("v2") {
        assert_eq!(gw.v2_fixture(&rel).await.result_code().as_deref(), Some("000000"), "{rel}");
    }
    tokio::time::sleep(Duration::from_millis(800)).await; // attempts fail: connection refused
    let billing = Billing::start_on(format!("127.0.0.1:{port}").parse().unwrap(), |_, _, _| ok()).await;
    let delivered = billing.wait_delivered(12, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered_after = billing.delivered();
    let counts = once_each(&delivered_after);
    println!(
        "{backend:?}: billing down then up: 12 accepted transitions, {} distinct ids delivered, max copies {}",
        counts.len(),
        counts.values().max().unwrap()
    );
    assert_eq!(counts.len(), 12, "the debug probe's event is not forwarded");
    assert!(counts.values().all(|n| *n == 1), "each id once: {counts:?}");
    assert!(billing.arrivals().iter().all(|a| a.signature_ok), "every delivery is signed");
    for (instance, seqs) in seqs_by_instance(&delivered) {
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, sorted, "instance {instance} delivered in order");
    }
    let renewed = delivered.iter().find(|a| a.event["type"] == "subscription.renewed").unwrap();
    assert_eq!(renewed.event["data"]["expire_time"], "2027-11-24T02:36:18.256Z");
    gw.drain().await;
    billing.stop();
    gw.stop().await;
}

#[tokio::test]
async fn billing_down_then_up_every_event_once_redis() {
    billing_down_then_up(Backend::Redis).await;
}

#[tokio::test]
async fn billing_down_then_up_every_event_once_embedded() {
    billing_down_then_up(Backend::Embedded).await;
}

fn purchase(n: usize) -> Vec<u8> {
    format!(r#"{{"activity":"newInstance","businessId":"b-{n}","orderId":"CSRETRY{n:04}","orderLineId":"CSRETRY{n:04}-000001","testFlag":"0"}}"#).into_bytes()
}

#[tokio::test]
async fn failures_and_timeouts_are_retried_with_growing_gaps() {
    // Attempts 1, 2, 4: HTTP 500; attempt 3: slower than the 1 s timeout; attempt 5: accepted.
    let billing = Billing::start(|_, attempt, _| match attempt {
        1 | 2 | 4 => (500, Duration::ZERO),
        3 => (503, Duration::from_millis(1500)),
        _ => ok(),
    })
    .await;
    let gw = start(Backend::Redis, "retry", &billing.url(), &[]).await;
    let n = 8;
    for i in 0..n {
        assert_eq!(gw.v2(&purchase(i)).await.result_code().as_deref(), Some("000000"));
    }
    billing.wait_delivered(n, Duration::from_secs(60)).await;
    let arrivals = billing.arrivals();
    let mut gaps: Vec<Vec<f64>> = vec![Vec::new(); 4];
    for id in arrivals.iter().map(|a| a.id.clone()).collect::<BTreeSet<_>>() {
        let times: Vec<&Arrival> = arrivals.iter().filter(|a| a.id == id).collect();
        assert_eq!(times.len(), 5, "{id}: five attempts");
        for k in 0..4 {
            // from the end of attempt k to the start of attempt k+1
            let end_of_k = if k == 2 { times[k].at + Duration::from_millis(1000) } else { times[k].at };
            gaps[k].push(times[k + 1].at.saturating_duration_since(end_of_k).as_secs_f64());
        }
    }
    let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    let means: Vec<f64> = gaps.iter().map(mean).collect();
    println!("mean gap before retry 1..4 (s): {means:.3?}; ceilings 0.1, 0.2, 0.4, 0.8 plus polling");
    for (k, g) in gaps.iter().enumerate() {
        let ceiling = 0.1 * f64::from(1u32 << k) + 0.6;
        assert!(g.iter().all(|x| *x <= ceiling), "retry {} waited longer than its ceiling: {g:?}", k + 1);
    }
    assert!(means[3] > means[0], "gaps grow: {means:?}");
    assert!(once_each(&billing.delivered()).values().all(|c| *c == 1));
    let metrics = gw.metrics().await;
    assert!(metrics.contains("koogate_delivery_attempts_total{outcome=\"failed_retryable\"}"), "{metrics}");
    billing.stop();
    gw.stop().await;
}

async fn admin(
    gw: &TestGateway,
    method: Method,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    gw.admin_json(method, path, token, body.to_owned()).await
}

// Multi-threaded: the CLI runs as a blocking child process while the gateway serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_dead_lettered_later_events_flow_and_redrive_delivers_it() {
    let refuse = Arc::new(AtomicBool::new(true));
    let r = Arc::clone(&refuse);
    let billing = Billing::start(move |_, _, event| {
        if event["type"] == "subscription.created" && r.load(Ordering::SeqCst) {
            (400, Duration::ZERO)
        } else {
            ok()
        }
    })
    .await;
    for backend in BACKENDS {
        refuse.store(true, Ordering::SeqCst);
        let gw = start(backend, "dlq", &billing.url(), &[]).await;
        assert_eq!(gw.v2_fixture("v2/01-newInstance.json").await.result_code().as_deref(), Some("000000"));
        assert_eq!(gw.v2_fixture("v2/04-refreshInstance-renewal.json").await.result_code().as_deref(), Some("000000"));
        let created = "evt_028e3b0c-7d93-5e10-9156-f940561c8e6a_1";
        let deadline = Instant::now() + Duration::from_secs(10);
        let dlq = loop {
            let (status, body) = admin(&gw, Method::GET, "/v1/dlq", "", Some(TOKEN)).await;
            assert_eq!(status, 200);
            if body["dead_letters"].as_array().is_some_and(|d| !d.is_empty()) {
                break body;
            }
            assert!(Instant::now() < deadline, "the 400 did not reach the dead-letter queue");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let dead = &dlq["dead_letters"][0];
        assert_eq!(dead["id"], created);
        assert_eq!(dead["attempts"], 1, "a 400 is not retried");
        assert_eq!(dead["last_error"], "billing core answered HTTP 400");
        assert_eq!(dead["event"]["type"], "subscription.created");
        // The renewal is not held up forever behind a dead letter.
        let delivered = billing.wait_delivered(1, Duration::from_secs(10)).await;
        assert!(delivered.iter().any(|a| a.id.ends_with("_2")));
        let (status, shown) = admin(&gw, Method::GET, &format!("/v1/events/{created}"), "", Some(TOKEN)).await;
        assert_eq!((status, shown["status"].as_str()), (200, Some("dead")));
        // The renewal reached the billing core; its settle may still be on its way: then the
        // order's events are the dead purchase and the renewal, delivered (kept in the history).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, listed) = admin(&gw, Method::GET, "/v1/events?order_id=CS2211181819B4LVS", "", Some(TOKEN)).await;
            let events = listed["events"].as_array().unwrap();
            let status: Vec<(&str, &str)> =
                events.iter().map(|e| (e["id"].as_str().unwrap(), e["status"].as_str().unwrap())).collect();
            if !status.iter().any(|(_, s)| *s == "pending") {
                let renewed = "evt_028e3b0c-7d93-5e10-9156-f940561c8e6a_2";
                assert_eq!(status, [(created, "dead"), (renewed, "delivered")], "{listed}");
                break;
            }
            assert!(Instant::now() < deadline, "the delivered renewal is still pending: {listed}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The billing core is fixed; the operator redrives with the CLI.
        let cli = |args: &[&str]| {
            std::process::Command::new(env!("CARGO_BIN_EXE_koogate"))
                .args(args)
                .arg("--admin")
                .arg(format!("http://{}", gw.running().admin_addr))
                .env("KOOGATE_ADMIN_TOKEN", TOKEN)
                .output()
                .unwrap()
        };
        let list = cli(&["dlq", "list"]);
        assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
        let text = String::from_utf8_lossy(&list.stdout);
        assert!(text.contains(created) && text.contains("1 dead letter(s)"), "{text}");
        refuse.store(false, Ordering::SeqCst);
        let redrive = cli(&["dlq", "redrive", created]);
        assert!(redrive.status.success(), "{}", String::from_utf8_lossy(&redrive.stderr));
        assert!(String::from_utf8_lossy(&redrive.stdout).contains("redriven: 1"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !billing.delivered().iter().any(|a| a.id == created) {
            assert!(Instant::now() < deadline, "redriven event was not delivered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, after) = admin(&gw, Method::GET, "/v1/dlq", "", Some(TOKEN)).await;
        assert!(after["dead_letters"].as_array().unwrap().is_empty());
        // The billing core has it; the gateway settles it right after the answer.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, shown) = admin(&gw, Method::GET, &format!("/v1/events/{created}"), "", Some(TOKEN)).await;
            if shown["status"] == "delivered" {
                break;
            }
            assert!(Instant::now() < deadline, "still {shown}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!cli(&["dlq", "redrive", created]).status.success(), "redriving a missing id fails");
        billing.arrivals.lock().unwrap().clear();
        gw.stop().await;
    }
    billing.stop();
}

#[tokio::test]
async fn order_is_kept_per_instance_while_other_instances_flow() {
    let a_instance = "028e3b0c-7d93-5e10-9156-f940561c8e6a";
    let billing =
        Billing::start(
            move |id, attempt, _| {
                if id == format!("evt_{a_instance}_1") && attempt <= 3 {
                    (500, Duration::ZERO)
                } else {
                    ok()
                }
            },
        )
        .await;
    let gw = start(Backend::Redis, "order", &billing.url(), &[("KOOGATE_RETRY_INITIAL_MS", "300")]).await;
    for rel in
        ["v2/01-newInstance.json", "v2/04-refreshInstance-renewal.json", "v2/10-updateInstanceStatus-freeze.json"]
    {
        assert_eq!(gw.v2_fixture(rel).await.result_code().as_deref(), Some("000000"));
    }
    for i in 0..5 {
        assert_eq!(gw.v2(&purchase(100 + i)).await.result_code().as_deref(), Some("000000"));
    }
    let delivered = billing.wait_delivered(8, Duration::from_secs(30)).await;
    let order = seqs_by_instance(&delivered);
    assert_eq!(order[a_instance], vec![1, 2, 3], "A's events in order, each once");
    let a_first = delivered.iter().position(|a| a.id.starts_with(&format!("evt_{a_instance}"))).unwrap();
    let others_before = delivered[..a_first].len();
    println!("order: {others_before} events of other instances delivered while A's first event was retrying");
    assert_eq!(others_before, 5, "other instances were not held up");
    let a_attempts = billing.arrivals().iter().filter(|x| x.id.starts_with(&format!("evt_{a_instance}"))).count();
    assert_eq!(a_attempts, 6, "3 failed attempts of A's first event, then A's 3 events once each");
    billing.stop();
    gw.stop().await;
}

async fn ledger(backend: Backend) {
    let billing = Billing::start(|_, _, _| ok()).await;
    let gw = start(backend, "ledger", &billing.url(), &[]).await;
    assert_eq!(
        gw.v1_fixture("v1/01-newInstance-stored-value-cards.json").await.result_code().as_deref(),
        Some("000000")
    );
    let customer = "68cbc86abc2018ab880d92f36422fa0e";
    let (status, order) =
        admin(&gw, Method::GET, &format!("/v1/orders/CS1906666666ABCDE?customer_id={customer}"), "", Some(TOKEN)).await;
    assert_eq!(status, 200, "{order}");
    assert_eq!(order["cards"], 50);
    assert_eq!(order["total_cny"], 5000);
    assert_eq!(order["status"], "paid");
    assert_eq!(order["sku_code"], "svc-card-100");
    assert_eq!(order["instance_id"], "21ab9e22-5c60-5afb-b878-85ea829f9cda");
    assert!(order["redeemed"].is_null());
    let (status, _) =
        admin(&gw, Method::GET, "/v1/orders/CS1906666666ABCDE?customer_id=someone-else", "", Some(TOKEN)).await;
    assert_eq!(status, 404, "another customer learns nothing");
    let (status, _) = admin(&gw, Method::GET, "/v1/orders/CSNOSUCHORDER?customer_id=x", "", Some(TOKEN)).await;
    assert_eq!(status, 404);

    let redeem = |by: &str| format!(r#"{{"customer_id":"{customer}","redeemed_by":"{by}"}}"#);
    let (status, wrong) = admin(
        &gw,
        Method::POST,
        "/v1/orders/CS1906666666ABCDE/redeem",
        r#"{"customer_id":"x","redeemed_by":"u"}"#,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 404, "{wrong}");
    let (status, first) =
        admin(&gw, Method::POST, "/v1/orders/CS1906666666ABCDE/redeem", &redeem("billing-user-1"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["redeemed"]["redeemed_by"], "billing-user-1");
    let (status, again) =
        admin(&gw, Method::POST, "/v1/orders/CS1906666666ABCDE/redeem", &redeem("billing-user-2"), Some(TOKEN)).await;
    assert_eq!(status, 409);
    assert_eq!(again["error"], "already_redeemed");
    assert_eq!(again["redeemed"]["redeemed_by"], "billing-user-1", "the first redemption's details");

    // A released (refunded) order cannot be redeemed.
    let mut refunded = fixture_params("v1/01-newInstance-stored-value-cards.json");
    refunded.insert("orderId".into(), "CS1906666666REFND".into());
    let res = gw.v1(&refunded).await;
    let instance = res.json().unwrap()["instanceId"].as_str().unwrap().to_owned();
    let release: BTreeMap<String, String> =
        [("activity", "releaseInstance"), ("instanceId", instance.as_str()), ("orderId", "CS1906666666REFND")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    assert_eq!(gw.v1(&release).await.result_code().as_deref(), Some("000000"));
    let (status, body) =
        admin(&gw, Method::POST, "/v1/orders/CS1906666666REFND/redeem", &redeem("u"), Some(TOKEN)).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("order_released")));

    // Concurrent redeems of one order: exactly one wins.
    let mut again = fixture_params("v1/01-newInstance-stored-value-cards.json");
    again.insert("orderId".into(), "CS1906666666RACES".into());
    assert_eq!(gw.v1(&again).await.result_code().as_deref(), Some("000000"));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let c = gw.admin.clone();
            let body = redeem(&format!("racer-{i}"));
            tokio::spawn(async move {
                let auth = format!("Bearer {TOKEN}");
                c.send(
                    Method::POST,
                    "/v1/orders/CS1906666666RACES/redeem",
                    &[("authorization", auth.as_str())],
                    body.into(),
                )
                .await
                .unwrap()
                .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 19);

    // The admin API refuses missing and wrong tokens.
    assert_eq!(admin(&gw, Method::GET, "/v1/dlq", "", None).await.0, 401);
    assert_eq!(admin(&gw, Method::GET, "/v1/dlq", "", Some("admin-token-for-tests-7f3b")).await.0, 401);
    assert_eq!(admin(&gw, Method::GET, "/v1/dlq", "", Some("short")).await.0, 401);
    billing.stop();
    gw.stop().await;
}

#[tokio::test]
async fn order_ledger_redeems_once_redis() {
    ledger(Backend::Redis).await;
}

#[tokio::test]
async fn order_ledger_redeems_once_embedded() {
    ledger(Backend::Embedded).await;
}

#[tokio::test]
async fn admin_api_is_off_without_a_token() {
    let gw = TestGateway::start(Backend::Embedded, "admin-off").await;
    let (status, body) = admin(&gw, Method::GET, "/v1/dlq", "", Some("anything")).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("admin_api_off")));
    let res = gw.admin.send(Method::GET, "/metrics", &[], bytes::Bytes::new()).await.unwrap();
    assert_eq!(res.status, 200);
    gw.stop().await;
}

async fn restart_resumes(backend: Backend) {
    // Billing slow: stop the gateway with deliveries in flight, start it again on the same store.
    let billing = Billing::start(|_, _, _| (200, Duration::from_millis(300))).await;
    let settings = [
        ("KOOGATE_DELIVERY_CONCURRENCY", "2"),
        ("KOOGATE_SHUTDOWN_GRACE_SECS", "1"),
        ("KOOGATE_DELIVERY_VISIBILITY_SECS", "1"),
    ];
    let mut gw = start(backend, "restart", &billing.url(), &settings).await;
    for i in 0..12 {
        let res = gw.v2(&purchase(200 + i)).await;
        assert_eq!(res.result_code().as_deref(), Some("000000"));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    // SIGTERM's path: stop accepting, finish in-flight deliveries within the grace; then the next start.
    let env = delivery_env(&billing.url());
    let mut pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    pairs.extend_from_slice(&settings);
    let before_restart = {
        let running = gw.running.take().unwrap();
        running.stop().await;
        once_each(&billing.delivered()).len()
    };
    gw.restart(&pairs).await;
    billing.wait_delivered(12, Duration::from_secs(30)).await;
    let counts = once_each(&billing.delivered());
    println!(
        "{backend:?}: graceful stop after {before_restart} of 12 delivered; after restart {} delivered, max copies {}",
        counts.len(),
        counts.values().max().unwrap()
    );
    assert_eq!(counts.len(), 12);
    gw.stop().await;
    billing.stop();
}

#[tokio::test]
async fn graceful_stop_leaves_the_rest_for_the_next_start_redis() {
    restart_resumes(Backend::Redis).await;
}

#[tokio::test]
async fn graceful_stop_leaves_the_rest_for_the_next_start_embedded() {
    restart_resumes(Backend::Embedded).await;
}

#[tokio::test]
async fn a_flapping_and_slow_billing_core_loses_nothing_and_keeps_order() {
    // Half the attempts fail (5xx), some answer after the 1 s attempt timeout, by a fixed pattern.
    let billing = Billing::start(|id, attempt, _| {
        let h = id.bytes().fold(attempt as u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        match h % 4 {
            0 | 1 => (503, Duration::ZERO),
            2 if attempt < 4 => (200, Duration::from_millis(1300)), // too slow: the gateway gives up, the billing core got it
            _ => ok(),
        }
    })
    .await;
    let gw = start(Backend::Redis, "flapping", &billing.url(), &[("KOOGATE_RETRY_MAX_MS", "400")]).await;
    // Three instances, each bought, renewed, frozen, unfrozen and released.
    let mut expected = 0;
    for n in 0..3 {
        let order = format!("CSFLAP{n:03}");
        let line = format!("{order}-000001");
        let buy = format!(
            r#"{{"activity":"newInstance","businessId":"b{n}","orderId":"{order}","orderLineId":"{line}","testFlag":"0"}}"#
        );
        let res = gw.v2(buy.as_bytes()).await;
        let id = res.json().unwrap()["instanceId"].as_str().unwrap().to_owned();
        let calls = [
            format!(
                r#"{{"activity":"refreshInstance","instanceId":"{id}","orderId":"R{order}","orderLineId":"R{line}","scene":"RENEWAL","expireTime":"20281124023618","testFlag":"0"}}"#
            ),
            format!(r#"{{"activity":"updateInstanceStatus","instanceId":"{id}","status":"FREEZE","testFlag":"0"}}"#),
            format!(r#"{{"activity":"updateInstanceStatus","instanceId":"{id}","status":"UNFREEZE","testFlag":"0"}}"#),
            format!(r#"{{"activity":"releaseInstance","instanceId":"{id}","testFlag":"0"}}"#),
        ];
        for c in calls {
            assert_eq!(gw.v2(c.as_bytes()).await.result_code().as_deref(), Some("000000"));
        }
        expected += 5;
    }
    billing.wait_delivered(expected, Duration::from_secs(60)).await;
    let arrivals = billing.arrivals();
    let accepted = billing.delivered();
    // Order per instance: the first 2xx of each event comes after the first 2xx of its predecessor.
    let mut first_ok: Vec<&Arrival> = Vec::new();
    for a in &accepted {
        if !first_ok.iter().any(|f| f.id == a.id) {
            first_ok.push(a);
        }
    }
    for (instance, seqs) in seqs_by_instance(&first_ok.iter().map(|a| (*a).clone()).collect::<Vec<_>>()) {
        assert_eq!(seqs, vec![1, 2, 3, 4, 5], "instance {instance}");
    }
    let copies = accepted.len() - first_ok.len();
    println!(
        "flapping and slow billing core: {expected} events, {} attempts, {} distinct delivered, {copies} extra copies of slow answers (deduplicated by id)",
        arrivals.len(),
        first_ok.len()
    );
    assert_eq!(first_ok.len(), expected);
    gw.drain().await;
    billing.stop();
    gw.stop().await;
}

/// The `Sink` contract, the same for both targets: the worker, run over one
/// outbox, delivers every event once, each instance's events in order, the
/// same bytes through either sink; a target that is down at first (the
/// billing core answering 503, the events file's directory blocked by a
/// file) holds every event back for retries and loses none.
mod sink_contract {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use koogate::backoff::Schedule;
    use koogate::delivery::jsonl::JsonlSink;
    use koogate::delivery::webhook::{key_of, WebhookSink};
    use koogate::delivery::{self, Sink};
    use koogate::events::SkuMap;
    use koogate::gateway::{Planner, Settings};
    use koogate::protocol::call::parse_v2;
    use koogate::protocol::crypto::EncryptType;
    use koogate::secret::Secret;
    use koogate::store::{self, Outcome, Store, StoreSpec};
    use tokio_util::sync::CancellationToken;

    use crate::common::billing::{ok, Billing, SECRET};
    use crate::common::{fixture, fixture_files, AK};

    /// Calls whose events fill the outbox: the V2 lifecycle fixtures, then four
    /// instances bought, renewed, frozen, unfrozen and released.
    fn calls() -> Vec<Vec<u8>> {
        let mut calls: Vec<Vec<u8>> = fixture_files("v2").iter().map(|rel| fixture(rel)).collect();
        for n in 0..4 {
            let order = format!("CSSINK{n:03}");
            let line = format!("{order}-000001");
            let id = koogate::store::keys::instance_id_for(&order, Some(&line));
            for call in [
                format!(
                    r#"{{"activity":"newInstance","businessId":"s{n}","orderId":"{order}","orderLineId":"{line}","testFlag":"0"}}"#
                ),
                format!(
                    r#"{{"activity":"refreshInstance","instanceId":"{id}","orderId":"R{order}","orderLineId":"R{line}","scene":"RENEWAL","expireTime":"20281124023618","testFlag":"0"}}"#
                ),
                format!(
                    r#"{{"activity":"updateInstanceStatus","instanceId":"{id}","status":"FREEZE","testFlag":"0"}}"#
                ),
                format!(
                    r#"{{"activity":"updateInstanceStatus","instanceId":"{id}","status":"UNFREEZE","testFlag":"0"}}"#
                ),
                format!(r#"{{"activity":"releaseInstance","instanceId":"{id}","testFlag":"0"}}"#),
            ] {
                calls.push(call.into_bytes());
            }
        }
        calls
    }

    /// An embedded store whose outbox holds the events of [`calls`], at fixed
    /// times (so two stores hold the same entries); the ids the worker must send.
    async fn filled_store(dir: &Path) -> (Arc<dyn Store>, BTreeSet<String>) {
        let store = store::open(&StoreSpec::Embedded(dir.to_path_buf()), "", Duration::from_secs(3600)).await.unwrap();
        let settings = Settings {
            window_secs: 60,
            v1_window_secs: 14_400,
            frontend_url: "https://console.example.com".into(),
            admin_url: None,
            encrypt_type: EncryptType::Aes256,
            issue_credentials: false,
            sku_map: SkuMap::default(),
            store_timeout: Duration::from_secs(3),
        };
        let key = Secret::new(AK);
        for (i, body) in calls().iter().enumerate() {
            let call = parse_v2(body).unwrap();
            let planner = Planner { settings: &settings, key: &key, now_ms: 1_764_000_000_000 + i as i64 * 1000 };
            let outcome = store.apply(&planner.plan(&call, Some(&format!("sink-{i}")))).await.unwrap();
            assert_ne!(outcome, Outcome::Replay, "call {i}");
        }
        let entries = store.outbox_entries().await.unwrap();
        let expected: BTreeSet<String> = entries.iter().filter(|e| !e.test).map(|e| e.id.clone()).collect();
        assert!(entries.iter().any(|e| e.test), "a testFlag=1 event is in the outbox, to be skipped");
        (store, expected)
    }

    /// Runs the worker over `store` into `sink`: first with the target down
    /// until the store holds a failed attempt, then up until the outbox is empty.
    /// Returns the first failure's text.
    async fn run(store: &Arc<dyn Store>, sink: Arc<dyn Sink>, up: impl FnOnce()) -> String {
        let settings = delivery::Settings {
            forward_test: false,
            schedule: Schedule {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(200),
                max_attempts: 10_000,
                give_up_after: Duration::from_secs(3600),
            },
            visibility: Duration::from_secs(30),
            concurrency: 4,
            order_wait: Duration::from_secs(30),
        };
        let worker = delivery::Worker::new(Arc::clone(store), sink, settings, None);
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(worker.run(shutdown.clone(), Duration::from_secs(5)));
        let deadline = Instant::now() + Duration::from_secs(30);
        let failure = loop {
            let entries = store.outbox_entries().await.unwrap();
            let attempts = store.attempts(&entries).await.unwrap();
            if let Some(error) = attempts.into_iter().flatten().find_map(|a| a.last_error) {
                break error;
            }
            let dead = store.dlq_list().await.unwrap();
            assert!(dead.is_empty(), "a transient failure was dead-lettered: {:?}", dead[0].attempts.last_error);
            assert!(Instant::now() < deadline, "no failed attempt recorded while the target is down");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        up();
        let deadline = Instant::now() + Duration::from_secs(60);
        while store.outbox_len().await.unwrap() > 0 {
            assert!(Instant::now() < deadline, "{} events still in the outbox", store.outbox_len().await.unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        running.await.unwrap();
        assert!(store.dlq_list().await.unwrap().is_empty(), "nothing dead-lettered");
        failure
    }

    /// What a sink received, in arrival order, checked against the contract;
    /// the body of each id.
    fn check(sink: &str, expected: &BTreeSet<String>, received: Vec<(String, Vec<u8>)>) -> BTreeMap<String, Vec<u8>> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (id, body) in &received {
            *counts.entry(id).or_default() += 1;
            let event: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(event["id"], id.as_str(), "{sink}: the body is the event of that id");
            let (subject, seq) = koogate::store::plan::parse_event_id(id).unwrap();
            seqs.entry(subject.to_owned()).or_default().push(seq);
        }
        let got: BTreeSet<String> = counts.keys().map(|id| (*id).to_owned()).collect();
        assert_eq!(&got, expected, "{sink}: every event but the test ones, no other");
        assert!(counts.values().all(|n| *n == 1), "{sink}: each event once: {counts:?}");
        for (instance, seqs) in &seqs {
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{sink}: instance {instance} in order: {seqs:?}");
        }
        let longest = seqs.values().map(Vec::len).max().unwrap_or(0);
        assert!(longest >= 5, "some instance has several events to keep in order");
        received.into_iter().collect()
    }

    async fn through_http() -> BTreeMap<String, Vec<u8>> {
        let dir = tempfile::tempdir().unwrap();
        let (store, expected) = filled_store(dir.path()).await;
        let up = Arc::new(AtomicBool::new(false));
        let billing = {
            let up = Arc::clone(&up);
            Billing::start(move |_, _, _| if up.load(Ordering::SeqCst) { ok() } else { (503, Duration::ZERO) }).await
        };
        let sink =
            WebhookSink::new(billing.url().parse().unwrap(), key_of(SECRET).unwrap(), Duration::from_secs(5)).unwrap();
        assert_eq!(sink.name(), billing.url());
        let failure = run(&store, Arc::new(sink), || up.store(true, Ordering::SeqCst)).await;
        assert_eq!(failure, "billing core answered HTTP 503");
        let arrivals = billing.arrivals();
        assert!(arrivals.iter().all(|a| a.signature_ok), "every request is signed");
        let delivered = billing.delivered();
        println!(
            "HTTP sink: {} events delivered after {} refused attempts",
            delivered.len(),
            arrivals.len() - delivered.len()
        );
        billing.stop();
        check("HTTP", &expected, delivered.into_iter().map(|a| (a.id, a.body.to_vec())).collect())
    }

    async fn through_jsonl() -> BTreeMap<String, Vec<u8>> {
        let dir = tempfile::tempdir().unwrap();
        let (store, expected) = filled_store(&dir.path().join("store")).await;
        // The file's directory cannot be created while a file has its name.
        let blocked: PathBuf = dir.path().join("out");
        std::fs::write(&blocked, b"").unwrap();
        let path = blocked.join("events.jsonl");
        let sink = JsonlSink::start(path.clone());
        assert_eq!(sink.name(), path.display().to_string());
        let failure = run(&store, Arc::new(sink), || std::fs::remove_file(&blocked).unwrap()).await;
        assert!(failure.starts_with(&format!("cannot append to {}", path.display())), "{failure}");
        let text = std::fs::read(&path).unwrap();
        assert!(text.ends_with(b"\n"), "every line ends");
        let received: Vec<(String, Vec<u8>)> = text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|line| {
                let event: serde_json::Value = serde_json::from_slice(line).unwrap();
                (event["id"].as_str().unwrap().to_owned(), line.to_vec())
            })
            .collect();
        println!("JSONL sink: {} events appended after the directory was freed", received.len());
        check("JSONL", &expected, received)
    }

    #[tokio::test]
    async fn both_sinks_deliver_every_event_once_in_order_with_the_same_bytes() {
        let http = through_http().await;
        let jsonl = through_jsonl().await;
        assert_eq!(http.len(), 32, "12 fixture events and 4 instances × 5");
        assert_eq!(http.len(), jsonl.len());
        for (id, body) in &http {
            assert_eq!(
                Some(body),
                jsonl.get(id),
                "{id}: the HTTP body and the JSONL line are the same bytes:\n{}\n{:?}",
                String::from_utf8_lossy(body),
                jsonl.get(id).map(|b| String::from_utf8_lossy(b).into_owned())
            );
        }
    }
}

/// The reference sink keeps only its `keep_events` most recent events for `GET /events` (a long load test must
/// not grow it without bound), yet every id it ever accepted, also those read back from `--out` at a restart,
/// is still answered as a duplicate and not stored again.
#[tokio::test]
async fn the_reference_sink_keeps_recent_events_and_remembers_every_id() {
    use koogate::delivery::webhook;
    use koogate::tools::client::KooClient;
    use koogate::tools::sink::{start as start_sink, SinkConfig};

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sink.jsonl");
    let config = SinkConfig {
        out: Some(out.clone()),
        keep_events: 3,
        ..SinkConfig::new("127.0.0.1:0".parse().unwrap(), SECRET)
    };
    let key = webhook::key_of(SECRET).unwrap();
    let post = |client: KooClient, id: String| {
        let key = key.clone();
        async move {
            let body = serde_json::json!({ "id": id, "type": "test" }).to_string();
            let ts = chrono::Utc::now().timestamp();
            let sig = webhook::sign(&key, &id, ts, body.as_bytes());
            let res = client
                .send(
                    Method::POST,
                    "/events",
                    &[("webhook-id", &id), ("webhook-timestamp", &ts.to_string()), ("webhook-signature", &sig)],
                    bytes::Bytes::from(body),
                )
                .await
                .unwrap();
            assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
            serde_json::from_slice::<serde_json::Value>(&res.body).unwrap()["status"].as_str().unwrap().to_owned()
        }
    };
    let get = |client: KooClient, path: &'static str| async move {
        let res = client.send(Method::GET, path, &[], bytes::Bytes::new()).await.unwrap();
        assert_eq!(res.status, 200);
        serde_json::from_slice::<serde_json::Value>(&res.body).unwrap()
    };
    let ids_of = |events: &serde_json::Value| -> Vec<String> {
        events.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect()
    };

    let sink = start_sink(config.clone()).await.unwrap();
    let client = KooClient::new(&format!("http://{}", sink.addr));
    for i in 1..=5 {
        assert_eq!(post(client.clone(), format!("evt_{i}")).await, "accepted");
    }
    assert_eq!(ids_of(&get(client.clone(), "/events").await), ["evt_3", "evt_4", "evt_5"]);
    // evt_1 is no longer kept in memory, but it is still a duplicate.
    assert_eq!(post(client.clone(), "evt_1".into()).await, "duplicate");
    let stats = get(client.clone(), "/stats").await;
    assert_eq!(
        (stats["accepted"].as_u64(), stats["duplicates"].as_u64(), stats["kept"].as_u64()),
        (Some(5), Some(1), Some(3))
    );
    sink.stop().await;

    // A restart reads --out back: the last three are kept again, every id is seen.
    let sink = start_sink(config).await.unwrap();
    let client = KooClient::new(&format!("http://{}", sink.addr));
    assert_eq!(ids_of(&get(client.clone(), "/events").await), ["evt_3", "evt_4", "evt_5"]);
    assert_eq!(post(client.clone(), "evt_2".into()).await, "duplicate");
    assert_eq!(post(client.clone(), "evt_6".into()).await, "accepted");
    assert_eq!(ids_of(&get(client.clone(), "/events").await), ["evt_4", "evt_5", "evt_6"]);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 6, "each accepted event is in --out once");
    sink.stop().await;

    // An --out it cannot read back refuses the start (it would forget the ids in it), naming the file.
    let unreadable = dir.path().join("a-directory.jsonl");
    std::fs::create_dir(&unreadable).unwrap();
    let refused = start_sink(SinkConfig {
        out: Some(unreadable.clone()),
        ..SinkConfig::new("127.0.0.1:0".parse().unwrap(), SECRET)
    })
    .await;
    let message = refused.err().expect("a directory as --out is refused").to_string();
    let expected = format!("--out {}: cannot read the events already accepted: ", unreadable.display());
    assert!(message.starts_with(&expected), "{message}");
}
