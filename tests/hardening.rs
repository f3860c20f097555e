//! Issue 15: the JSONL target across rotation, unambiguous dedup keys, the
//! `metering_sn` registry under racing requests, admin paths, log abuse.
//! (The slow-body load test is tests/slow_body.rs: it needs the machine alone.)

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::time::Duration;

use common::*;
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
    let cluster = common::cluster::Cluster::start();
    racing_registrations(&cluster.url(), "race-cluster").await;
}

const TOKEN: &str = "admin-token-hardening-5d1e";

async fn admin(gw: &TestGateway, method: hyper::Method, path: &str, body: Vec<u8>) -> (u16, Value) {
    let auth = format!("Bearer {TOKEN}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let res = gw.admin.send(method, path, &headers, bytes::Bytes::from(body)).await.expect("admin API answers");
    (res.status, serde_json::from_slice(&res.body).unwrap_or(Value::Null))
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
    let record = serde_json::json!({"records": [{"instance_id": instance, "begin_time": "20261101T000000Z",
        "end_time": "20261101T010000Z", "usage_value": "1", "metering_sn": sn}]});
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
