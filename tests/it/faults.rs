//! Fault tests with real processes: gateways killed with SIGKILL mid-stream,
//! the reference sink as the billing core. Each prints its figures.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::billing::SECRET;
use crate::common::process::{jsonl_ids, Proc};
use crate::common::*;
use std::process::{Command, Stdio};

fn purchase(tag: &str, n: usize) -> Vec<u8> {
    format!(r#"{{"activity":"newInstance","businessId":"b{n}","orderId":"CS{tag}{n:05}","orderLineId":"CS{tag}{n:05}-000001","testFlag":"0"}}"#)
        .into_bytes()
}

fn gateway_env(store: &str, prefix: &str, data: &std::path::Path, sink_port: u16) -> BTreeMap<String, String> {
    [
        ("KOOGATE_ACCESS_KEY", AK.to_owned()),
        ("KOOGATE_STORE", store.to_owned()),
        ("KOOGATE_KEY_PREFIX", prefix.to_owned()),
        ("KOOGATE_DATA_DIR", data.display().to_string()),
        ("KOOGATE_BILLING_URL", format!("http://127.0.0.1:{sink_port}/events")),
        ("KOOGATE_BILLING_SECRET", SECRET.to_owned()),
        ("KOOGATE_RETRY_INITIAL_MS", "100".to_owned()),
        ("KOOGATE_RETRY_MAX_MS", "500".to_owned()),
        ("KOOGATE_DELIVERY_VISIBILITY_SECS", "2".to_owned()),
        ("KOOGATE_DELIVERY_CONCURRENCY", "4".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

async fn wait_accepted(sink: &Proc, n: u64, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let stats = sink.stats().await;
        if stats["accepted"].as_u64() >= Some(n) {
            return stats;
        }
        assert!(Instant::now() < deadline, "sink accepted only {stats} of {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_redis_one_killed_mid_delivery_every_event_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sink.jsonl");
    // A slow billing core keeps deliveries in flight when the kill comes.
    let sink = Proc::sink(SECRET, &out, &["--delay-ms", "150"]).await;
    let prefix = unique_prefix("kill2");
    let mut a = Proc::gateway(&gateway_env(REDIS_URL, &prefix, &dir.path().join("a"), sink.port)).await;
    let b = Proc::gateway(&gateway_env(REDIS_URL, &prefix, &dir.path().join("b"), sink.port)).await;
    let total = 60;
    let mut accepted = 0;
    for i in 0..total {
        let gw = if i % 2 == 0 && i < 30 { &a } else { &b };
        let res = gw.client.v2("/koogallery/v2", AK, &purchase("KILL", i), now_ms()).await.unwrap();
        if res.result_code().as_deref() == Some("000000") {
            accepted += 1;
        }
        if i == 30 {
            a.kill9();
        }
    }
    let stats = wait_accepted(&sink, accepted, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids = jsonl_ids(&out);
    let copies: usize = ids.values().sum();
    println!(
        "two gateways, one SIGKILLed: accepted calls {accepted}, events at the sink {} distinct, {} deliveries, {} duplicates refused by the sink",
        ids.len(),
        stats["accepted"].as_u64().unwrap() + stats["duplicates"].as_u64().unwrap(),
        stats["duplicates"]
    );
    assert_eq!(accepted, total as u64);
    assert_eq!(ids.len(), total, "every accepted call's event reached the billing core");
    assert_eq!(copies, total, "the sink stored each id once");
    drop(b);
    delete_prefix(REDIS_URL, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_gateway_killed_and_restarted_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sink.jsonl");
    let sink = Proc::sink(SECRET, &out, &["--delay-ms", "100"]).await;
    let store = dir.path().join("store").display().to_string();
    let env = gateway_env(&store, "", &dir.path().join("data"), sink.port);
    let mut gw = Proc::gateway(&env).await;
    let mut answers = BTreeMap::new();
    for i in 0..40 {
        let res = gw.client.v2("/koogallery/v2", AK, &purchase("EMBK", i), now_ms()).await.unwrap();
        assert_eq!(res.result_code().as_deref(), Some("000000"));
        answers.insert(i, res.body.clone());
    }
    gw.kill9(); // mid-delivery: the sink is slow
    let delivered_before = jsonl_ids(&out).len();
    let gw = Proc::gateway(&env).await;
    // The store survived the kill: retries get the same answers.
    // A 000005 (the store still busy after the restart, on a loaded machine) asks KooGallery to retry,
    // as it would; any other answer must be the first one, byte for byte.
    for i in [0, 17, 39] {
        let mut res = gw.client.v2("/koogallery/v2", AK, &purchase("EMBK", i), now_ms()).await.unwrap();
        for _ in 0..20 {
            if res.result_code().as_deref() != Some("000005") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            res = gw.client.v2("/koogallery/v2", AK, &purchase("EMBK", i), now_ms()).await.unwrap();
        }
        assert_eq!(
            res.body,
            answers[&i],
            "answer {i} is the same after the kill (got {})",
            String::from_utf8_lossy(&res.body)
        );
    }
    wait_accepted(&sink, 40, Duration::from_secs(60)).await;
    let ids = jsonl_ids(&out);
    println!("embedded store SIGKILLed after 40 accepted calls ({delivered_before} delivered before the kill): {} distinct events at the sink, {} stored copies", ids.len(), ids.values().sum::<usize>());
    assert_eq!(ids.len(), 40);
    assert!(ids.values().all(|n| *n == 1));
}

/// Sends `n` purchases, returns which were answered 000000 and which 000005.
async fn stream_of_calls(
    client: &koogate::tools::client::KooClient,
    tag: &str,
    range: std::ops::Range<usize>,
) -> (Vec<usize>, Vec<usize>) {
    let (mut ok, mut retry) = (Vec::new(), Vec::new());
    for i in range {
        let res = client.v2("/koogallery/v2", AK, &purchase(tag, i), now_ms()).await;
        match res.ok().and_then(|r| r.result_code()).as_deref() {
            Some("000000") => ok.push(i),
            Some("000005") | None => retry.push(i),
            other => panic!("unexpected answer {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    (ok, retry)
}

fn created_ids(out: &std::path::Path, tag: &str) -> BTreeMap<String, usize> {
    jsonl_ids(out).into_iter().filter(|(id, _)| !id.is_empty() && !tag.is_empty()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_or_restarted_mid_stream_loses_no_accepted_call() {
    // Redis with an fsync-always AOF: a restart keeps what was acknowledged.
    let dir = tempfile::tempdir().unwrap();
    let redis_dir = dir.path().join("redis");
    std::fs::create_dir_all(&redis_dir).unwrap();
    let port = free_port();
    let start_redis = || {
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&redis_dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let wait_redis = || wait_for_port(port, Duration::from_secs(10), "the fault test's redis-server");
    let mut redis = start_redis();
    wait_redis();
    let url = format!("redis://127.0.0.1:{port}");
    let out = dir.path().join("sink.jsonl");
    let sink = Proc::sink(SECRET, &out, &[]).await;
    let mut env = gateway_env(&url, "kgfault:", &dir.path().join("data"), sink.port);
    env.insert("KOOGATE_STORE_TIMEOUT_SECS".into(), "1".into());
    let gw = Proc::gateway(&env).await;

    // 1. Paused: CLIENT PAUSE holds every command for 2.5 s.
    let pauser = tokio::spawn({
        let url = url.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let mut conn = redis_conn(&url).await;
            let () = redis::cmd("CLIENT").arg("PAUSE").arg(2500).arg("ALL").query_async(&mut conn).await.unwrap();
        }
    });
    let (ok1, retry1) = stream_of_calls(&gw.client, "PAUS", 0..60).await;
    pauser.await.unwrap();

    // 2. Restarted: killed mid-stream, started again on its AOF.
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = redis.kill();
        let _ = redis.wait();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        redis
    });
    let (ok2, retry2) = stream_of_calls(&gw.client, "RSTR", 0..60).await;
    drop(killer.await.unwrap());
    let mut redis = start_redis();
    wait_redis();

    // KooGallery retries what was not answered 000000.
    let mut retried_ok = 0;
    for (tag, list) in [("PAUS", &retry1), ("RSTR", &retry2)] {
        for i in list {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let res = gw.client.v2("/koogallery/v2", AK, &purchase(tag, *i), now_ms()).await;
                if res.ok().and_then(|r| r.result_code()).as_deref() == Some("000000") {
                    retried_ok += 1;
                    break;
                }
                assert!(Instant::now() < deadline, "retry of {tag}{i} never succeeded");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let accepted = ok1.len() + ok2.len();
    let stats = wait_accepted(&sink, 120, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids = created_ids(&out, "x");
    let expected: std::collections::BTreeSet<String> = ["PAUS", "RSTR"]
        .iter()
        .flat_map(|tag| {
            (0..60).map(move |i| {
                let instance = koogate::store::keys::instance_id_for(
                    &format!("CS{tag}{i:05}"),
                    Some(&format!("CS{tag}{i:05}-000001")),
                );
                format!("evt_{instance}_1")
            })
        })
        .collect();
    println!(
        "redis paused: {} accepted, {} answered 000005; restarted: {} accepted, {} answered 000005; retries accepted {retried_ok}; \
         sink: {} distinct events for 120 orders, {} duplicate deliveries refused",
        ok1.len(), retry1.len(), ok2.len(), retry2.len(), ids.len(), stats["duplicates"]
    );
    assert!(!retry1.is_empty() && !retry2.is_empty(), "the outages were felt");
    assert!(accepted > 0);
    let got: std::collections::BTreeSet<String> = ids.keys().cloned().collect();
    assert_eq!(got, expected, "every order's event once, none missing, none extra");
    assert!(ids.values().all(|n| *n == 1));
    drop(gw);
    let _ = redis.kill();
    let _ = redis.wait();
}
