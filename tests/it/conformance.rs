//! Conformance with Huawei's published KooGallery pages (issue 13, callback side):
//! every item over real sockets, on both stores where the store is involved.
//! The matrix in docs/conformance.md points at these tests.

use std::collections::BTreeMap;

use crate::common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `request` on a fresh TCP connection and returns the raw answer bytes.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.expect("read");
    out
}

fn head_of(raw: &[u8]) -> String {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// 13.11: `Body-Sign` is written with exactly that case on the wire (V1 and V2),
/// checked on the raw bytes, not through a case-insensitive header map.
#[tokio::test]
async fn body_sign_header_has_the_documented_case_on_the_wire() {
    let gw = TestGateway::start(Backend::Embedded, "body-sign-case").await;
    let addr = gw.running().addr;

    let body = fixture("v2/01-newInstance.json");
    let query = koogate::tools::client::v2_query(AK, &body, now_ms(), &koogate::tools::client::nonce());
    let mut req = format!(
        "POST /koogallery/v2?{query} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let v2 = head_of(&raw_exchange(addr, &req).await);

    let v1_query =
        koogate::tools::client::v1_query(AK, &fixture_params("v1/01-newInstance-stored-value-cards.json"), now_ms());
    let req = format!("GET /koogallery/v1?{v1_query} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    let v1 = head_of(&raw_exchange(addr, req.as_bytes()).await);

    // A refusal is signed too.
    let req = "GET /koogallery/v1?activity=x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    let refused = head_of(&raw_exchange(addr, req.as_bytes()).await);

    for (what, head) in [("v2", &v2), ("v1", &v1), ("v1 refusal", &refused)] {
        println!("{what} answer head:\n{head}");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{what}: {head}");
        let line = head.lines().find(|l| l.to_ascii_lowercase().starts_with("body-sign:")).expect("a Body-Sign line");
        assert!(line.starts_with("Body-Sign: sign_type=\"HMAC-SHA256\", signature=\""), "{what}: {line:?}");
        assert!(head.contains("\r\nContent-Type: application/json;charset=UTF-8\r\n"), "{what}: {head}");
    }
    gw.stop().await;
}

const V1_INSTANCE: &str = "21ab9e22-5c60-5afb-b878-85ea829f9cda";

fn status_call(status: &str) -> BTreeMap<String, String> {
    params(&[
        ("activity", "instanceStatus"),
        ("instanceId", V1_INSTANCE),
        ("instanceStatus", status),
        ("testFlag", "0"),
    ])
}

/// 13.1: V1 `instanceStatus=NORMAL` (documented) unfreezes and makes
/// `subscription.unfrozen`; `UNFREEZE` stays a tolerated alias; anything else is 000002.
async fn v1_normal_unfreezes(backend: Backend) {
    let gw = TestGateway::start(backend, "v1-normal").await;
    assert_eq!(
        gw.v1_fixture("v1/01-newInstance-stored-value-cards.json").await.result_code().as_deref(),
        Some("000000")
    );
    for status in ["FREEZE", "NORMAL", "FREEZE", "UNFREEZE"] {
        let res = gw.v1(&status_call(status)).await;
        assert_eq!(res.result_code().as_deref(), Some("000000"), "{status}: {}", String::from_utf8_lossy(&res.body));
    }
    let res = gw.v1(&status_call("THAWED")).await;
    assert_eq!(res.result_code().as_deref(), Some("000002"));
    assert!(String::from_utf8_lossy(&res.body).contains("FREEZE or NORMAL"));
    gw.drain().await;
    let events = gw.events();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "subscription.created",
            "subscription.frozen",
            "subscription.unfrozen",
            "subscription.frozen",
            "subscription.unfrozen"
        ],
        "{backend:?}"
    );
    assert_eq!(events[2]["data"]["status"], "active");
    gw.stop().await;
}

#[tokio::test]
async fn v1_instance_status_normal_unfreezes() {
    for backend in BACKENDS {
        v1_normal_unfreezes(backend).await;
    }
}

/// 13.12: V1 has its own timestamp window (KOOGATE_V1_TIMESTAMP_SKEW_SECS, default
/// 4 h: KooGallery retries a purchase for 3 h); V2 keeps KOOGATE_TIMESTAMP_SKEW_SECS.
#[tokio::test]
async fn v1_timestamp_window_is_its_own_setting() {
    let gw = TestGateway::start(Backend::Redis, "v1-window").await;
    let call = fixture_params("v1/01-newInstance-stored-value-cards.json");
    let path = "/koogallery/v1";
    let at = |age_ms: i64| gw.client.v1(path, AK, &call, now_ms() - age_ms);
    // A URL resent 3 hours later (the last of KooGallery's hourly retries) is accepted.
    assert_eq!(at(3 * 3_600_000).await.unwrap().result_code().as_deref(), Some("000000"));
    let stale = at(4 * 3_600_000 + 60_000).await.unwrap();
    assert_eq!(stale.result_code().as_deref(), Some("000001"));
    assert!(String::from_utf8_lossy(&stale.body).contains("allowed 14400 s"));
    // V2 keeps its 60 s window.
    let old_v2 =
        gw.client.v2("/koogallery/v2", AK, &fixture("v2/01-newInstance.json"), now_ms() - 120_000).await.unwrap();
    assert_eq!(old_v2.result_code().as_deref(), Some("000001"));
    gw.stop().await;

    let gw =
        TestGateway::start_with(Backend::Embedded, "v1-window-set", &[("KOOGATE_V1_TIMESTAMP_SKEW_SECS", "120")]).await;
    let call = fixture_params("v1/01-newInstance-stored-value-cards.json");
    let old = gw.client.v1(path, AK, &call, now_ms() - 180_000).await.unwrap();
    assert_eq!(old.result_code().as_deref(), Some("000001"));
    let fresh = gw.client.v1(path, AK, &call, now_ms() - 90_000).await.unwrap();
    assert_eq!(fresh.result_code().as_deref(), Some("000000"));
    gw.stop().await;
}

/// 15.5: `authToken` is the V1 nonce. The same FREEZE URL sent again (KooGallery's
/// retry, or a replay) is answered with the first answer, byte for byte, and
/// changes nothing: after an unfreeze, a replayed FREEZE does not freeze again.
async fn v1_replay_changes_nothing(backend: Backend) {
    let gw = TestGateway::start(backend, "v1-replay").await;
    assert_eq!(
        gw.v1_fixture("v1/01-newInstance-stored-value-cards.json").await.result_code().as_deref(),
        Some("000000")
    );
    let path = "/koogallery/v1";
    let freeze_url = format!("{path}?{}", koogate::tools::client::v1_query(AK, &status_call("FREEZE"), now_ms()));
    let send = |url: String| {
        let c = &gw.client;
        async move { c.send(hyper::Method::GET, &url, &[], bytes::Bytes::new()).await.unwrap() }
    };
    let first = send(freeze_url.clone()).await;
    assert_eq!(first.result_code().as_deref(), Some("000000"));
    let again = send(freeze_url.clone()).await;
    assert_eq!(again.body, first.body);
    assert_eq!(again.body_sign, first.body_sign);
    assert_eq!(gw.v1(&status_call("NORMAL")).await.result_code().as_deref(), Some("000000"));
    let replayed = send(freeze_url.clone()).await;
    assert_eq!(replayed.body, first.body, "the replay is answered with the first answer");
    // The same for expireInstance and releaseInstance URLs.
    let release =
        params(&[("activity", "releaseInstance"), ("instanceId", V1_INSTANCE), ("orderId", "CS1906666666ABCDE")]);
    let release_url = format!("{path}?{}", koogate::tools::client::v1_query(AK, &release, now_ms()));
    assert_eq!(send(release_url.clone()).await.result_code().as_deref(), Some("000000"));
    assert_eq!(send(release_url).await.result_code().as_deref(), Some("000000"));
    gw.drain().await;
    let events = gw.events();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["subscription.created", "subscription.frozen", "subscription.unfrozen", "subscription.released"],
        "{backend:?}: a replayed URL made no event"
    );
    gw.stop().await;
}

#[tokio::test]
async fn v1_replayed_url_is_answered_from_the_first_call_and_changes_nothing() {
    for backend in BACKENDS {
        v1_replay_changes_nothing(backend).await;
    }
}

const PPU_ORDER: &str = "CS2512010000PPU01";

fn ppu_purchase(order: &str, product: &str, mode: &str) -> BTreeMap<String, String> {
    params(&[
        ("activity", "newInstance"),
        ("businessId", &uuid::Uuid::new_v4().to_string()),
        ("customerId", "68cbc86abc2018ab880d92f36422fa0e"),
        ("customerName", "acme"),
        ("orderId", order),
        ("productId", product),
        ("skuCode", "ppu-sku"),
        ("chargingMode", mode),
        ("testFlag", "0"),
    ])
}

/// 13.2: V1 pay-per-use (`chargingMode` 0) and pay-per-use package (5) are
/// accepted; one instance per billing item, keyed on orderId + productId; a
/// retry of the same orderId + productId gets the same answer byte for byte.
async fn v1_pay_per_use_items(backend: Backend) {
    let gw = TestGateway::start(backend, "v1-ppu").await;
    let first = gw.v1(&ppu_purchase(PPU_ORDER, "00301-666666-0--1", "0")).await;
    let second = gw.v1(&ppu_purchase(PPU_ORDER, "00301-666666-0--2", "0")).await;
    let package = gw.v1(&ppu_purchase("CS2512010000PKG01", "00301-666666-0--9", "5")).await;
    for res in [&first, &second, &package] {
        assert_eq!(res.result_code().as_deref(), Some("000000"), "{}", String::from_utf8_lossy(&res.body));
    }
    let id = |r: &koogate::tools::client::CallResponse| r.json().unwrap()["instanceId"].as_str().unwrap().to_owned();
    assert_ne!(id(&first), id(&second), "same order, another productId: another instance");
    assert_eq!(id(&first), koogate::store::keys::instance_id_for_item(PPU_ORDER, None, "00301-666666-0--1"));
    // KooGallery's retry (new businessId, new timeStamp): the same answer, byte for byte.
    let retry = gw.v1(&ppu_purchase(PPU_ORDER, "00301-666666-0--1", "0")).await;
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.body_sign, first.body_sign);
    // The item-less purchase of that order is another key: not answered from an item.
    let mut no_product = ppu_purchase(PPU_ORDER, "x", "0");
    no_product.remove("productId");
    let refused = gw.v1(&no_product).await;
    assert_eq!(refused.result_code().as_deref(), Some("000002"));
    assert!(String::from_utf8_lossy(&refused.body).contains("productId"));

    gw.drain().await;
    let events = gw.events();
    let mut created: Vec<&Value> = events.iter().filter(|e| e["type"] == "subscription.created").collect();
    assert_eq!(created.len(), 3, "{backend:?}: one event per billing item, none for the retry");
    created.sort_by_key(|e| e["data"]["product_id"].as_str().unwrap().to_owned());
    assert_eq!(created[0]["data"]["charging_mode"], "ON_DEMAND");
    assert_eq!(created[0]["data"]["instance_id"], id(&first).as_str());
    assert_eq!(created[1]["data"]["instance_id"], id(&second).as_str());
    assert_eq!(created[2]["data"]["charging_mode"], "ON_DEMAND_PKG");
    gw.stop().await;
}

#[tokio::test]
async fn v1_pay_per_use_gets_one_instance_per_billing_item() {
    for backend in BACKENDS {
        v1_pay_per_use_items(backend).await;
    }
}

const ADMIN_TOKEN: &str = "conformance-admin-token-0123456789";

fn v1_query_instance(ids: &[&str]) -> BTreeMap<String, String> {
    params(&[("activity", "queryInstance"), ("instanceId", &ids.join(",")), ("testFlag", "0")])
}

/// The `info` of a V1 queryInstance answer (13.3: GET, answered like V2's).
async fn query_v1(gw: &TestGateway, ids: &[&str]) -> Vec<Value> {
    let res = gw.v1(&v1_query_instance(ids)).await;
    assert_eq!(res.result_code().as_deref(), Some("000000"), "{}", String::from_utf8_lossy(&res.body));
    assert!(independent_body_sign_ok(AK, &res.body, res.body_sign.as_deref()));
    res.json().unwrap()["info"].as_array().unwrap().clone()
}

fn usage_of<'a>(info: &'a [Value], id: &str) -> &'a Vec<Value> {
    let entry = info.iter().find(|i| i["instanceId"] == id).unwrap_or_else(|| panic!("no info for {id}"));
    entry["usageInfo"].as_array().unwrap_or_else(|| panic!("usageInfo of {id} is not an array: {entry}"))
}

/// 13.3 + 13.4: V1 queryInstance (GET) answers like V2's, and `usageInfo` is an
/// array: one entry per billing item, `statisticalTime` in every entry (the
/// query time while nothing was pushed), a package-linked item naming the package.
async fn v1_query_usage_info(backend: Backend) {
    let api = crate::common::kooapi::UsageApi::start(|_, _| crate::common::kooapi::taken()).await;
    let url = api.url();
    let env = [
        ("KOOGATE_ADMIN_TOKEN", ADMIN_TOKEN),
        ("KOOGATE_MARKETPLACE_URL", url.as_str()),
        ("KOOGATE_USAGE_POLL_MS", "20"),
    ];
    let gw = TestGateway::start_with(backend, "v1-query-usage", &env).await;
    let id = |r: koogate::tools::client::CallResponse| r.json().unwrap()["instanceId"].as_str().unwrap().to_owned();
    let a = id(gw.v1(&ppu_purchase(PPU_ORDER, "00301-666666-0--1", "0")).await);
    let b = id(gw.v1(&ppu_purchase(PPU_ORDER, "00301-666666-0--2", "0")).await);
    let pkg = id(gw.v1(&ppu_purchase("CS2512010000PKG01", "00301-666666-0--9", "5")).await);
    let period = id(gw.v1_fixture("v1/01-newInstance-stored-value-cards.json").await);

    let info = query_v1(&gw, &[&a, &b, &pkg, &period, "no-such-instance"]).await;
    assert_eq!(info.len(), 4, "unknown ids are left out: {info:?}");
    for inst in [&a, &b, &pkg] {
        let usage = usage_of(&info, inst);
        assert_eq!(usage.len(), 1, "{usage:?}");
        assert_eq!(usage[0]["usageValue"], "0");
        let t = usage[0]["statisticalTime"].as_str().expect("statisticalTime even before any push");
        assert_eq!(t.len(), 16, "{t}");
    }
    let period_info = info.iter().find(|i| i["instanceId"] == period.as_str()).unwrap();
    assert!(period_info.get("usageInfo").is_none(), "a period instance has no usageInfo: {period_info}");
    assert_eq!(period_info["appInfo"]["frontEndUrl"], "https://console.example.com/koogallery");

    // Usage of `a`: two own periods and one deducted from the package.
    let hour0 = (now_ms() / 1000 / 3600 - 3) * 3600;
    let at =
        |h: i64| chrono::DateTime::from_timestamp(hour0 + h * 3600, 0).unwrap().format("%Y%m%dT%H%M%SZ").to_string();
    let rec = |h: i64, v: &str, sn: &str, pkg: Option<&str>| {
        let mut r = serde_json::json!({"instance_id": a, "begin_time": at(h), "end_time": at(h + 1), "usage_value": v, "metering_sn": sn});
        if let Some(p) = pkg {
            r["relate_pkg_instance"] = Value::from(p);
        }
        r
    };
    let records = serde_json::json!({"records": [
        rec(0, "1.5", "conf-sn-1", None),
        rec(1, "2", "conf-sn-2", None),
        rec(0, "0.25", "conf-sn-3", Some(&pkg)),
    ]});
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let res = gw.admin.send(hyper::Method::POST, "/v1/usage", &headers, records.to_string().into()).await.unwrap();
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    api.wait_records(3, std::time::Duration::from_secs(20)).await;

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let usage = loop {
        let info = query_v1(&gw, &[&a, &b]).await;
        let usage = usage_of(&info, &a).clone();
        if usage.len() == 2 && usage[0]["usageValue"] == "3.5" {
            assert_eq!(usage_of(&info, &b)[0]["usageValue"], "0");
            break usage;
        }
        assert!(std::time::Instant::now() < deadline, "queryInstance does not show the pushed usage: {usage:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    println!("{backend:?} usageInfo of a: {usage:?}");
    assert_eq!(usage[0]["statisticalTime"], at(2));
    assert!(usage[0].get("relatedInstanceId").is_none());
    assert_eq!(usage[1]["usageValue"], "0.25");
    assert_eq!(usage[1]["relatedInstanceId"], pkg.as_str());
    assert_eq!(usage[1]["statisticalTime"], at(1));
    // The package lists every billing item linked to it: what `a` had deducted from it, naming `a`.
    let info = query_v1(&gw, &[&pkg]).await;
    let package = usage_of(&info, &pkg);
    println!("{backend:?} usageInfo of the package: {package:?}");
    assert_eq!(package.len(), 1, "{package:?}");
    assert_eq!(package[0]["usageValue"], "0.25");
    assert_eq!(package[0]["relatedInstanceId"], a.as_str());
    assert_eq!(package[0]["statisticalTime"], at(1));
    gw.stop().await;
    api.stop();
}

#[tokio::test]
async fn v1_query_instance_answers_usage_info_arrays() {
    for backend in BACKENDS {
        v1_query_usage_info(backend).await;
    }
}

/// 13.10: V1 contact fields are decrypted with the product's key size
/// (KOOGATE_ENCRYPT_TYPE), and one that cannot be decrypted does not fail the
/// purchase: accepted, marked in the event, counted in a metric.
async fn v1_contact_fields(backend: Backend) {
    use koogate::protocol::crypto::{derive_key, encrypt, EncryptType};
    let gw = TestGateway::start_with(backend, "v1-contact", &[("KOOGATE_ENCRYPT_TYPE", "2")]).await;
    let mut call = fixture_params("v1/01-newInstance-stored-value-cards.json");
    call.insert("mobilePhone".into(), encrypt(&derive_key(AK, EncryptType::Aes128), "13800000000").unwrap());
    // Encrypted with the 32-byte key although the product says AES-128: undecryptable.
    let wrong = encrypt(&derive_key(AK, EncryptType::Aes256), "ops@acme.example").unwrap();
    call.insert("email".into(), wrong.clone());
    let res = gw.v1(&call).await;
    assert_eq!(res.result_code().as_deref(), Some("000000"), "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.json().unwrap()["encryptType"], "2");
    // The fixture with a phone that is not even Base64 is a purchase too.
    let bad = gw.v1_fixture("v1/bad/undecryptable-phone.json").await;
    assert_eq!(bad.result_code().as_deref(), Some("000000"), "{}", String::from_utf8_lossy(&bad.body));

    gw.drain().await;
    let events = gw.events();
    assert_eq!(events.len(), 2, "{events:?}");
    let first = events.iter().find(|e| e["data"]["order_id"] == "CS1906666666ABCDE").unwrap();
    assert_eq!(first["data"]["contact"]["mobile_phone"], "13800000000");
    assert_eq!(first["data"]["contact"]["email"], Value::Null);
    assert_eq!(first["data"]["contact"]["undecryptable"], serde_json::json!(["email"]));
    let second = events.iter().find(|e| e["data"]["order_id"] == "CS1906666666BADPH").unwrap();
    assert_eq!(second["data"]["contact"]["undecryptable"], serde_json::json!(["mobilePhone"]));
    let text = std::fs::read_to_string(gw.events_path()).unwrap();
    assert!(!text.contains(&wrong) && !text.contains("not-base64"), "no ciphertext in events");
    let metrics = gw.metrics().await;
    for field in ["email", "mobilePhone"] {
        let series = format!("koogate_v1_undecryptable_fields_total{{field=\"{field}\"}}");
        assert!(metrics.lines().any(|l| l.starts_with(&series)), "no {series} in:\n{metrics}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn v1_undecryptable_contact_field_does_not_fail_the_purchase() {
    for backend in BACKENDS {
        v1_contact_fields(backend).await;
    }
}
