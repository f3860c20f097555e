//! Redis specifics: one EVALSHA per call, script reload after SCRIPT FLUSH,
//! and duplicate storms on both stores.

use std::sync::Arc;

use crate::common::*;

#[tokio::test]
async fn one_evalsha_per_accepted_call_and_reload_after_script_flush() {
    let redis = OwnRedis::start();
    // Delivery goes nowhere (connection refused, long backoff), so the only EVALSHAs are the calls'.
    let dead_billing = format!("http://127.0.0.1:{}/events", free_port());
    let gw = TestGateway::start_on(
        Backend::Redis,
        "commandstats",
        &redis.url(),
        &[
            ("KOOGATE_BILLING_URL", &dead_billing),
            ("KOOGATE_BILLING_SECRET", crate::common::billing::SECRET),
            ("KOOGATE_RETRY_INITIAL_MS", "600000"),
        ],
    )
    .await;
    // Warm up: the first call loads the script (NOSCRIPT → SCRIPT LOAD → EVALSHA).
    assert_eq!(gw.v2_fixture("v2/01-newInstance.json").await.result_code().as_deref(), Some("000000"));

    let before = commandstats(&redis.url()).await;
    let calls = [
        "v2/02-newInstance-stored-value-cards.json",
        "v2/04-refreshInstance-renewal.json",
        "v2/10-updateInstanceStatus-freeze.json",
        "v2/11-updateInstanceStatus-unfreeze.json",
        "v2/01-newInstance.json", // a retry
        "v2/03-queryInstance.json",
    ];
    for rel in calls {
        assert_eq!(gw.v2_fixture(rel).await.result_code().as_deref(), Some("000000"), "{rel}");
    }
    let after = commandstats(&redis.url()).await;
    let delta = |cmd: &str| after.get(cmd).copied().unwrap_or(0) - before.get(cmd).copied().unwrap_or(0);
    println!(
        "commandstats delta over {} calls: evalsha={} eval={} script={}",
        calls.len(),
        delta("evalsha"),
        delta("eval"),
        delta("script|load")
    );
    assert_eq!(delta("evalsha"), calls.len() as u64, "exactly one EVALSHA per call");
    assert_eq!(delta("eval"), 0);
    assert_eq!(delta("script|load"), 0, "the script is loaded once");

    // A fresh script cache (restart, failover, SCRIPT FLUSH): reloaded transparently.
    let mut conn = redis_conn(&redis.url()).await;
    let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut conn).await.unwrap();
    let res = gw.v2_fixture("v2/12-releaseInstance.json").await;
    assert_eq!(res.result_code().as_deref(), Some("000000"));
    let reloaded = commandstats(&redis.url()).await;
    assert_eq!(reloaded.get("script|load").copied().unwrap_or(0) - after.get("script|load").copied().unwrap_or(0), 1);
    let pending = gw.running().store.outbox_entries().await.unwrap();
    let types: Vec<&str> = pending.iter().map(|e| e.kind.as_str()).collect();
    assert!(types.contains(&"subscription.released"), "the call after the flush stored its event: {types:?}");
    gw.stop().await;
}

async fn duplicate_storm(backend: Backend) {
    let gw = Arc::new(TestGateway::start(backend, "storm").await);
    let body = fixture("v2/01-newInstance.json");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let gw = Arc::clone(&gw);
        let body = body.clone();
        // Each its own connection and nonce: KooGallery retrying in parallel.
        tasks.push(tokio::spawn(async move {
            let client = koogate::tools::client::KooClient::new(&format!("http://{}", gw.running().addr));
            client.v2("/koogallery/v2", AK, &body, now_ms()).await.unwrap()
        }));
    }
    let mut bodies = std::collections::BTreeSet::new();
    for t in tasks {
        let res = t.await.unwrap();
        assert_eq!(res.result_code().as_deref(), Some("000000"));
        bodies.insert(res.body.to_vec());
    }
    assert_eq!(bodies.len(), 1, "50 concurrent duplicates got one answer");
    gw.drain().await;
    let events = gw.events();
    println!("{backend:?}: 50 concurrent duplicates -> {} distinct answers, {} events", bodies.len(), events.len());
    assert_eq!(events.len(), 1, "one event");
    assert_eq!(events[0]["type"], "subscription.created");
    let gw = Arc::into_inner(gw).expect("all tasks are done");
    gw.stop().await;
}

#[tokio::test]
async fn duplicate_storm_redis() {
    duplicate_storm(Backend::Redis).await;
}

#[tokio::test]
async fn duplicate_storm_embedded() {
    duplicate_storm(Backend::Embedded).await;
}

#[tokio::test]
async fn readiness_follows_the_store() {
    let redis = OwnRedis::start();
    let gw = TestGateway::start_on(Backend::Redis, "ready", &redis.url(), &[("KOOGATE_STORE_TIMEOUT_SECS", "1")]).await;
    let get = |path: &'static str| {
        let c = gw.client.clone();
        async move { c.send(hyper::Method::GET, path, &[], bytes::Bytes::new()).await.unwrap().status }
    };
    assert_eq!(get("/healthz").await, 200);
    assert_eq!(get("/readyz").await, 200);
    drop(redis); // the store goes away
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(get("/readyz").await, 503);
    assert_eq!(get("/healthz").await, 200, "liveness does not depend on the store");
    // A call during the outage gets a retryable 000005, never a success.
    let res = gw.v2_fixture("v2/01-newInstance.json").await;
    assert_eq!(res.result_code().as_deref(), Some("000005"), "{}", String::from_utf8_lossy(&res.body));
    assert!(independent_body_sign_ok(AK, &res.body, res.body_sign.as_deref()));
    gw.stop().await;
}
