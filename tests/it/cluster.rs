//! A real local Redis Cluster (3 masters, started here): the Lua script, the
//! outbox and the ledger work, and the keys of one order share one slot.

use std::time::{Duration, Instant};

use crate::common::cluster::Cluster;
use crate::common::*;

#[tokio::test]
async fn the_gateway_runs_on_a_redis_cluster() {
    let cluster = Cluster::start();
    let url = format!("redis+cluster://127.0.0.1:{}", cluster.ports[0]);
    let usage_api = kooapi::UsageApi::start(|_, _| kooapi::taken()).await;
    let usage_url = usage_api.url();
    let gw = TestGateway::start_on(
        Backend::Redis,
        "cluster",
        &url,
        &[
            ("KOOGATE_STORE", &url),
            ("KOOGATE_ADMIN_TOKEN", "t0ken"),
            ("KOOGATE_MARKETPLACE_URL", &usage_url),
            ("KOOGATE_USAGE_POLL_MS", "20"),
        ],
    )
    .await;
    for rel in fixture_files("v2").into_iter().chain(fixture_files("v1")) {
        let res = if rel.starts_with("v1/") { gw.v1_fixture(&rel).await } else { gw.v2_fixture(&rel).await };
        assert_eq!(res.result_code().as_deref(), Some("000000"), "{rel}: {}", String::from_utf8_lossy(&res.body));
        assert!(independent_body_sign_ok(AK, &res.body, res.body_sign.as_deref()));
    }
    // A retry answered from the kept answer; a query across shards.
    let first = gw.v2_fixture("v2/01-newInstance.json").await;
    assert_eq!(first.json().unwrap()["instanceId"], "028e3b0c-7d93-5e10-9156-f940561c8e6a");
    let ids = [
        "028e3b0c-7d93-5e10-9156-f940561c8e6a",
        "1119022f-e030-5c83-bf39-f86b7c1ef4fb",
        "25d3fb37-0e31-538a-9441-18fe9f5e4232",
        "21ab9e22-5c60-5afb-b878-85ea829f9cda",
    ];
    let shards: std::collections::BTreeSet<u8> = ids.iter().map(|i| koogate::store::keys::instance_shard(i)).collect();
    assert!(shards.len() > 1, "the query spans shards");
    let query = format!(r#"{{"activity":"queryInstance","instanceId":"{}"}}"#, ids.join(","));
    let res = gw.v2(query.as_bytes()).await;
    assert_eq!(res.result_code().as_deref(), Some("000000"), "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.json().unwrap()["info"].as_array().unwrap().len(), 4);

    // The outbox drains through the consumer group on every shard.
    gw.drain().await;
    let events = gw.events();
    println!("redis cluster (3 masters): {} events delivered from the outbox", events.len());
    assert_eq!(events.len(), 12 + 7);
    // Each delivered event is kept in the history, settle.lua's keys in one slot; found across nodes.
    let res = gw
        .admin
        .send(
            hyper::Method::GET,
            "/v1/events?status=delivered&limit=1000",
            &[("authorization", "Bearer t0ken")],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    let kept: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
    assert_eq!(kept["events"].as_array().map(Vec::len), Some(events.len()), "{kept}");

    // The ledger's redeem script runs too.
    let auth = "Bearer t0ken";
    let body = r#"{"customer_id":"68cbc86abc2018ab880d92f36422fa0e","redeemed_by":"u1"}"#;
    let res = gw
        .admin
        .send(hyper::Method::POST, "/v1/orders/CS1906666666ABCDE/redeem", &[("authorization", auth)], body.into())
        .await
        .unwrap();
    assert_eq!(res.status, 409, "released in the V1 lifecycle: {}", String::from_utf8_lossy(&res.body));

    // Every key of one order and its instance hashes to one slot.
    let keys = koogate::store::keys::Keys::new(&gw.prefix);
    let instance = koogate::store::keys::instance_id_for("CS2211181819B4LVS", Some("CS2211181819B4LVS-000001"));
    let shard = koogate::store::keys::instance_shard(&instance);
    let order_keys = [
        keys.instance(&instance),
        keys.order("CS2211181819B4LVS"),
        keys.answer(shard, "new:CS2211181819B4LVS/CS2211181819B4LVS-000001"),
        keys.nonce(shard, "anything"),
        keys.outbox(shard),
        keys.attempts(shard),
        keys.dlq(shard),
        keys.history(&format!("evt_{instance}_1")),
        keys.history_by_time(shard),
        keys.history_by_order(shard, "CS2311181819R3NEW"),
    ];
    let slots: std::collections::BTreeSet<u16> = order_keys.iter().map(|k| cluster.keyslot(k)).collect();
    println!("keys of order CS2211181819B4LVS: {} keys, slots {slots:?}", order_keys.len());
    assert_eq!(slots.len(), 1, "{order_keys:?}");

    // Usage: records of instances in different shards, a metering_sn reused across shards refused,
    // every record pushed once, totals in queryInstance.
    let mut usage_instances = Vec::new();
    for order in ["CSCLUSTERUSAGE1", "CSCLUSTERUSAGE5", "CSCLUSTERUSAGE9"] {
        let body = format!(
            r#"{{"activity":"newInstance","businessId":"b-{order}","orderId":"{order}","orderLineId":"{order}-1"}}"#
        );
        let res = gw.v2(body.as_bytes()).await;
        usage_instances.push(res.json().unwrap()["instanceId"].as_str().unwrap().to_owned());
    }
    let usage_shards: std::collections::BTreeSet<u8> =
        usage_instances.iter().map(|i| koogate::store::keys::instance_shard(i)).collect();
    assert!(usage_shards.len() > 1, "usage spans shards: {usage_instances:?}");
    let mut records: Vec<serde_json::Value> = Vec::new();
    // Two days ago (KooGallery takes usage within 21 days).
    let day = chrono::Utc::now() - chrono::Duration::days(2);
    let (d1, d2) = (day.format("%Y%m%d").to_string(), (day + chrono::Duration::days(1)).format("%Y%m%d").to_string());
    for (n, inst) in usage_instances.iter().enumerate() {
        for h in 0..24 {
            records.push(serde_json::json!({"instance_id": inst, "begin_time": format!("{d1}T{h:02}0000Z"),
                "end_time": format!("{d1}T{h:02}5959Z"), "usage_value": "1.5", "metering_sn": format!("c{n}-{h}")}));
        }
    }
    records.push(serde_json::json!({"instance_id": usage_instances[1], "begin_time": format!("{d2}T000000Z"),
        "end_time": format!("{d2}T010000Z"), "usage_value": "1", "metering_sn": "c0-0"}));
    let res = gw
        .admin
        .send(
            hyper::Method::POST,
            "/v1/usage",
            &[("authorization", auth)],
            serde_json::json!({"records": records}).to_string().into(),
        )
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
    assert_eq!((answer["accepted"].as_u64(), answer["rejected"].as_u64()), (Some(72), Some(1)), "{answer}");
    assert!(answer["records"][72]["reason"].as_str().unwrap().contains("already used"), "{answer}");
    usage_api.wait_records(72, Duration::from_secs(20)).await;
    assert!(usage_api.records().values().all(|(_, n)| *n == 1));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let query = format!(r#"{{"activity":"queryInstance","instanceId":"{}"}}"#, usage_instances.join(","));
        let res = gw.v2(query.as_bytes()).await;
        let info = res.json().unwrap()["info"].clone();
        if info.as_array().unwrap().iter().all(|i| i["usageInfo"][0]["usageValue"] == "36") {
            break;
        }
        assert!(Instant::now() < deadline, "queryInstance does not show the pushed usage: {info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let inst = &usage_instances[0];
    let shard = koogate::store::keys::instance_shard(inst);
    let usage_keys = [
        keys.instance(inst),
        keys.usage_record(inst, "c0-0"),
        keys.usage_pending(shard),
        keys.usage_unpushed(shard),
        keys.usage_dlq(shard),
        format!("{}{}", keys.shard_prefix(shard), koogate::usage::period_index(inst, "")),
    ];
    let slots: std::collections::BTreeSet<u16> = usage_keys.iter().map(|k| cluster.keyslot(k)).collect();
    println!(
        "usage on the cluster: 72 records over {} shards pushed once; {} keys of one instance in slots {slots:?}",
        usage_shards.len(),
        usage_keys.len()
    );
    assert_eq!(slots.len(), 1, "{usage_keys:?}");
    usage_api.stop();
    gw.stop().await;
}

/// The account index on a cluster (issue #16): one account's purchases live in
/// many shards (slots), its index in the customer's own slot; the account
/// view and the binding check gather them across nodes.
#[tokio::test]
async fn the_account_index_spans_a_redis_cluster() {
    let cluster = Cluster::start();
    let url = format!("redis+cluster://127.0.0.1:{}", cluster.ports[0]);
    let gw = TestGateway::start_on(Backend::Redis, "cluster-accounts", &url, &[("KOOGATE_ADMIN_TOKEN", "t0ken")]).await;
    let customer = "acct-cluster-0123456789abcdef";
    let mut instances = std::collections::BTreeSet::new();
    for n in 0..8 {
        let mut params = fixture_params("v1/01-newInstance-stored-value-cards.json");
        params.insert("customerId".into(), customer.into());
        params.insert("orderId".into(), format!("CSACCTCLUSTER{n}"));
        let res = gw.v1(&params).await;
        assert_eq!(res.result_code().as_deref(), Some("000000"), "{}", String::from_utf8_lossy(&res.body));
        instances.insert(res.json().unwrap()["instanceId"].as_str().unwrap().to_owned());
    }
    let shards: std::collections::BTreeSet<u8> =
        instances.iter().map(|i| koogate::store::keys::instance_shard(i)).collect();
    assert!(shards.len() > 2, "the purchases span shards: {shards:?}");
    let nodes: std::collections::BTreeSet<u16> = instances
        .iter()
        .map(|i| cluster.keyslot(&koogate::store::keys::Keys::new(&gw.prefix).instance(i)) / 5462)
        .collect();

    let get = |path: String| {
        let admin = &gw.admin;
        async move {
            let res = admin.send(hyper::Method::GET, &path, &[("authorization", "Bearer t0ken")], "".into()).await;
            let res = res.unwrap();
            (res.status, serde_json::from_slice::<serde_json::Value>(&res.body).unwrap())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let view = loop {
        let (status, view) = get(format!("/v1/accounts/{customer}")).await;
        if status == 200 && view["total"] == 8 {
            break view;
        }
        assert!(Instant::now() < deadline, "the account never listed its 8 instances: {status} {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let listed: std::collections::BTreeSet<String> =
        view["instances"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(listed, instances);
    assert!(view["instances"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["status"] == "active" && i["customer_id"] == customer));
    let res = gw
        .admin
        .send(
            hyper::Method::POST,
            &format!("/v1/accounts/{customer}/verify"),
            &[("authorization", "Bearer t0ken")],
            "".into(),
        )
        .await
        .unwrap();
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let keys = koogate::store::keys::Keys::new(&gw.prefix);
    println!(
        "account index on the cluster: 8 instances in {} shards on {} node(s), index key in slot {}",
        shards.len(),
        nodes.len(),
        cluster.keyslot(&keys.account(customer))
    );
    gw.stop().await;
}
