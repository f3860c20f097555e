//! Conformance with Huawei's published KooGallery pages (issue 13, callback side):
//! every item over real sockets, on both stores where the store is involved.
//! The matrix in docs/conformance.md points at these tests.

mod common;

use std::collections::BTreeMap;

use common::*;
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
    let query = koogate::client::v2_query(AK, &body, now_ms(), &koogate::client::nonce());
    let mut req = format!(
        "POST /koogallery/v2?{query} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let v2 = head_of(&raw_exchange(addr, &req).await);

    let v1_query = koogate::client::v1_query(AK, &fixture_params("v1/01-newInstance-stored-value-cards.json"), now_ms());
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
    params(&[("activity", "instanceStatus"), ("instanceId", V1_INSTANCE), ("instanceStatus", status), ("testFlag", "0")])
}

/// 13.1: V1 `instanceStatus=NORMAL` (documented) unfreezes and makes
/// `subscription.unfrozen`; `UNFREEZE` stays a tolerated alias; anything else is 000002.
async fn v1_normal_unfreezes(backend: Backend) {
    let gw = TestGateway::start(backend, "v1-normal").await;
    assert_eq!(gw.v1_fixture("v1/01-newInstance-stored-value-cards.json").await.result_code().as_deref(), Some("000000"));
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
