//! Bad input: each case gets its code and a reason, and writes nothing.

use crate::common::*;
use bytes::Bytes;
use hyper::Method;
use koogate::tools::client::{v1_query, v2_query, CallResponse};

async fn assert_refused(gw: &TestGateway, what: &str, res: CallResponse, status: u16, code: &str, msg_contains: &str) {
    assert_eq!(res.status, status, "{what}: {}", String::from_utf8_lossy(&res.body));
    assert!(independent_body_sign_ok(AK, &res.body, res.body_sign.as_deref()), "{what}: refusals are signed too");
    assert_eq!(res.result_code().as_deref(), Some(code), "{what}: {}", String::from_utf8_lossy(&res.body));
    let msg = res.json().unwrap()["resultMsg"].as_str().unwrap().to_owned();
    assert!(msg.contains(msg_contains), "{what}: resultMsg {msg:?} should mention {msg_contains:?}");
    let _ = gw;
}

async fn bad_v2_cases(backend: Backend) {
    let gw = TestGateway::start(backend, "bad-v2").await;
    // Something real in the store first, so "nothing written" compares a non-empty state.
    assert_eq!(gw.v2_fixture("v2/01-newInstance.json").await.result_code().as_deref(), Some("000000"));
    gw.drain().await;
    let before = gw.snapshot().await;
    let good = fixture("v2/01-newInstance.json");
    let now = now_ms();

    // Body fixtures that are refused with 000002.
    for (rel, needle) in [
        ("v2/bad/unknown-activity.json", "unknown activity"),
        ("v2/bad/missing-order-line-id.json", "missing field orderLineId"),
        ("v2/bad/malformed-json.json", "not a JSON object"),
        ("v2/bad/wrong-type-huge-number.json", "orderId must be a string"),
        ("v2/bad/not-an-object.json", "not a JSON object"),
        ("v2/bad/non-utf8.json", "not a JSON object"),
        ("v2/bad/bad-expire-time.json", "expireTime"),
        ("v2/bad/unknown-scene.json", "scene"),
        ("v2/bad/unknown-status.json", "status must be FREEZE or UNFREEZE"),
    ] {
        let res = gw.v2_fixture(rel).await;
        assert_refused(&gw, rel, res, 200, "000002", needle).await;
    }

    let c = &gw.client;
    let path = "/koogallery/v2";
    // Authentication failures: 000001.
    let sig_of = |body: &[u8], ts: i64, nonce: &str| v2_query(AK, body, ts, nonce);
    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        ("wrong key", v2_query("another-key", &good, now, "n1"), good.clone(), "signature does not match"),
        (
            "body changed after signing",
            sig_of(&good, now, "n2"),
            [good.as_slice(), b" "].concat(),
            "signature does not match",
        ),
        ("stale timestamp", sig_of(&good, now - 61_000, "n3"), good.clone(), "away from the gateway clock"),
        ("future timestamp", sig_of(&good, now + 61_000, "n4"), good.clone(), "away from the gateway clock"),
        ("missing signature", format!("timestamp={now}&nonce=n5"), good.clone(), "missing query parameter signature"),
        (
            "missing nonce",
            sig_of(&good, now, "n6").replace("&nonce=n6", ""),
            good.clone(),
            "missing query parameter nonce",
        ),
        (
            "duplicate nonce key",
            format!("{}&nonce=other", sig_of(&good, now, "n7")),
            good.clone(),
            "appears more than once",
        ),
        (
            "short signature",
            sig_of(&good, now, "n8").replacen("signature=", "signature=0", 1),
            good.clone(),
            "wrong length",
        ),
        (
            "non-hex signature",
            format!("signature={}&timestamp={now}&nonce=n9", "g".repeat(64)),
            good.clone(),
            "wrong length or alphabet",
        ),
        (
            "timestamp not a number",
            format!("signature={}&timestamp=abc&nonce=n10", "0".repeat(64)),
            good.clone(),
            "not a valid timestamp",
        ),
    ];
    for (what, query, body, needle) in cases {
        let res = c.v2_raw(path, &query, &body).await.unwrap();
        assert_refused(&gw, what, res, 200, "000001", needle).await;
    }

    // Oversized body: 413 with a signed 000002, checked before reading when declared.
    let huge = vec![b' '; 65_537];
    let res = c.v2_raw(path, &v2_query(AK, &huge, now, "big"), &huge).await.unwrap();
    assert_refused(&gw, "oversized body", res, 413, "000002", "larger than 65536 bytes").await;
    // Wrong content type.
    let q = v2_query(AK, &good, now, "ct");
    let res = c
        .send(Method::POST, &format!("{path}?{q}"), &[("content-type", "text/plain")], Bytes::from(good.clone()))
        .await
        .unwrap();
    assert_refused(&gw, "wrong content type", res, 200, "000002", "Content-Type").await;
    // Wrong method and path: plain HTTP errors.
    assert_eq!(c.send(Method::GET, path, &[], Bytes::new()).await.unwrap().status, 405);
    assert_eq!(c.send(Method::POST, "/koogallery/v3", &[], Bytes::new()).await.unwrap().status, 404);
    assert_eq!(c.send(Method::POST, "/koogallery/v1", &[], Bytes::new()).await.unwrap().status, 405);

    assert_eq!(gw.snapshot().await, before, "refused calls wrote nothing");

    // A nonce replayed inside the window is refused; the first use went through.
    let body = fixture("v2/04-refreshInstance-renewal.json");
    let q = v2_query(AK, &body, now_ms(), "replayed-nonce-1");
    assert_eq!(c.v2_raw(path, &q, &body).await.unwrap().result_code().as_deref(), Some("000000"));
    gw.drain().await;
    let after_first = gw.snapshot().await;
    let res = c.v2_raw(path, &q, &body).await.unwrap();
    assert_refused(&gw, "replayed nonce", res, 200, "000001", "nonce was already used").await;
    assert_eq!(gw.snapshot().await, after_first, "a replay writes nothing");

    // Unknown instance: 000003, and nothing but the nonce is recorded.
    let res = gw.v2_fixture("v2/bad/unknown-instance.json").await;
    assert_refused(&gw, "unknown instance", res, 200, "000003", "does not exist").await;

    let metrics = gw.metrics().await;
    for reason in
        ["bad_signature", "stale_timestamp", "replayed_nonce", "body_too_large", "unknown_activity", "missing_field"]
    {
        assert!(metrics.contains(&format!("reason=\"{reason}\"")), "metric for {reason} missing");
    }
    gw.stop().await;
}

#[tokio::test]
async fn bad_v2_input_is_refused_and_writes_nothing_redis() {
    bad_v2_cases(Backend::Redis).await;
}

#[tokio::test]
async fn bad_v2_input_is_refused_and_writes_nothing_embedded() {
    bad_v2_cases(Backend::Embedded).await;
}

async fn bad_v1_cases(backend: Backend) {
    let gw = TestGateway::start(backend, "bad-v1").await;
    assert_eq!(
        gw.v1_fixture("v1/01-newInstance-stored-value-cards.json").await.result_code().as_deref(),
        Some("000000")
    );
    gw.drain().await;
    let before = gw.snapshot().await;
    for (rel, needle) in [
        ("v1/bad/unknown-activity.json", "unknown activity"),
        ("v1/bad/missing-order-id.json", "missing field orderId"),
        ("v1/bad/bad-charging-mode.json", "chargingMode"),
    ] {
        let res = gw.v1_fixture(rel).await;
        assert_refused(&gw, rel, res, 200, "000002", needle).await;
    }
    let params = fixture_params("v1/02-refreshInstance.json");
    let c = &gw.client;
    let path = "/koogallery/v1";
    let good = v1_query(AK, &params, now_ms());
    let cases = vec![
        ("wrong key", v1_query("another-key", &params, now_ms()), "signature does not match"),
        // V1's own window (KOOGATE_V1_TIMESTAMP_SKEW_SECS, default 4 h).
        ("stale", v1_query(AK, &params, now_ms() - 4 * 3_600_000 - 61_000), "away from the gateway clock"),
        ("tampered", good.replace("orderAmount=5000.00", "orderAmount=1.00"), "signature does not match"),
        ("missing token", good.split("&authToken=").next().unwrap().to_owned(), "missing query parameter authToken"),
        ("bad token", format!("{}&authToken=%%%", good.split("&authToken=").next().unwrap()), "wrong length"),
        ("malformed timestamp", good.replace("timeStamp=", "timeStamp=9"), "not a valid timestamp"),
    ];
    for (what, query, needle) in cases {
        let res = c.send(Method::GET, &format!("{path}?{query}"), &[], Bytes::new()).await.unwrap();
        assert_refused(&gw, what, res, 200, "000001", needle).await;
    }
    // A parameter sent twice is ambiguous (which one was signed?): invalid, 000002.
    let res = c.send(Method::GET, &format!("{path}?{good}&orderId=CS1"), &[], Bytes::new()).await.unwrap();
    assert_refused(&gw, "duplicate key", res, 200, "000002", "appears more than once").await;
    assert_eq!(gw.snapshot().await, before, "refused calls wrote nothing");
    gw.stop().await;
}

#[tokio::test]
async fn bad_v1_input_is_refused_and_writes_nothing_redis() {
    bad_v1_cases(Backend::Redis).await;
}

#[tokio::test]
async fn bad_v1_input_is_refused_and_writes_nothing_embedded() {
    bad_v1_cases(Backend::Embedded).await;
}

#[tokio::test]
async fn timestamps_just_inside_the_window_are_accepted() {
    let gw = TestGateway::start_with(Backend::Redis, "skew", &[("KOOGATE_TIMESTAMP_SKEW_SECS", "30")]).await;
    let body = fixture("v2/01-newInstance.json");
    let inside = gw.client.v2("/koogallery/v2", AK, &body, now_ms() - 29_000).await.unwrap();
    assert_eq!(inside.result_code().as_deref(), Some("000000"));
    let outside = gw.client.v2("/koogallery/v2", AK, &body, now_ms() - 31_500).await.unwrap();
    assert_eq!(outside.result_code().as_deref(), Some("000001"));
    // 10-digit seconds are accepted (the signature covers the timestamp as sent).
    let ts = (now_ms() / 1000 + 20).to_string();
    let q = format!(
        "signature={}&timestamp={ts}&nonce=tensecs",
        koogate::protocol::sign::v2_request_signature(AK, "tensecs", &ts, &body)
    );
    assert_eq!(gw.client.v2_raw("/koogallery/v2", &q, &body).await.unwrap().result_code().as_deref(), Some("000000"));
    gw.stop().await;
}
