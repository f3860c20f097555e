//! Server limits: slow-loris headers and bodies, the in-flight cap.

use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or `within` passes); returns what was read and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut buf = Vec::new();
    let deadline = Instant::now() + within;
    loop {
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&buf).into_owned(), true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return (String::from_utf8_lossy(&buf).into_owned(), false),
        }
    }
}

#[tokio::test]
async fn slow_headers_and_bodies_are_cut_off() {
    let gw = TestGateway::start_with(Backend::Embedded, "slowloris", &[("KOOGATE_REQUEST_TIMEOUT_SECS", "1")]).await;
    let addr = gw.running().addr;
    let before = gw.snapshot().await;

    // Headers that never end.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /koogallery/v2?signature=x HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    println!("slow headers: connection closed after {:?}", started.elapsed());
    assert!(closed, "the connection is closed");
    assert!(started.elapsed() < Duration::from_secs(4));

    // A body that never arrives in full.
    let body = fixture("v2/01-newInstance.json");
    let query = koogate::tools::client::v2_query(AK, &body, now_ms(), "slowbody1");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /koogallery/v2?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..10]).await.unwrap();
    let started = Instant::now();
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    println!("slow body: answered after {:?}", started.elapsed());
    assert!(answer.contains("000002") && answer.contains("body not received"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(4));

    // A truncated body (the client gives up half-way): nothing is written.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..20]).await.unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.snapshot().await, before, "nothing was written");
    gw.stop().await;
}

#[tokio::test]
async fn over_the_in_flight_cap_calls_are_answered_at_once() {
    // Two calls hold the two slots: their bodies are in, and they wait on a
    // store that does not answer (slow bodies hold no slot: tests/slow_body.rs).
    let redis = OwnRedis::start_with(&["--enable-debug-command", "local"]);
    let gw = TestGateway::start_on(
        Backend::Redis,
        "inflight",
        &redis.url(),
        &[("KOOGATE_MAX_INFLIGHT", "2"), ("KOOGATE_STORE_TIMEOUT_SECS", "5")],
    )
    .await;
    let sleeping = redis.sleep(1.5).await;
    let holders: Vec<_> = (0..2)
        .map(|i| {
            let client = gw.client.clone();
            tokio::spawn(async move {
                let body = format!(
                    r#"{{"activity":"newInstance","businessId":"b-{i}","orderId":"CSHOLD{i}","orderLineId":"CSHOLD{i}-1","testFlag":"0"}}"#
                );
                client.v2("/koogallery/v2", AK, body.as_bytes(), now_ms()).await.unwrap()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let res = gw.v2_fixture("v2/13-newInstance-trial.json").await;
    let took = started.elapsed();
    println!("third call over a cap of 2: HTTP {} {:?} after {took:?}", res.status, res.result_code());
    assert_eq!(res.status, 503);
    assert_eq!(res.result_code().as_deref(), Some("000005"), "retryable");
    assert!(independent_body_sign_ok(AK, &res.body, res.body_sign.as_deref()));
    // The holders are served normally once the store answers.
    sleeping.await.unwrap();
    for h in holders {
        assert_eq!(h.await.unwrap().result_code().as_deref(), Some("000000"));
    }
    assert!(gw.metrics().await.contains("koogate_overload_rejections_total"));
    gw.stop().await;
}
