//! Order enrichment against the simulator's order query API (real sockets,
//! AK/SK checked as API Gateway does).

use std::time::{Duration, Instant};

use crate::common::billing::{ok, Billing, SECRET};
use crate::common::*;
use hyper::Method;
use koogate::marketplace::order::{CredentialFault, OrderApi, OrderError};
use koogate::secret::Secret;

const BUYER: &str = "459bbbec25d24749b2eb83be37b602a8";
const TOKEN: &str = "enrich-admin-token";

#[tokio::test]
async fn the_order_query_client_against_the_simulator() {
    let m = market().await;
    let api = OrderApi::new(&m.url(), Secret::new("sim-ak"), Secret::new("sim-sk"), Duration::from_secs(2)).unwrap();
    let (_, info) = api.query("MOCKPERIODYEARNEW", Some("MOCKPERIODYEARNEW-000001")).await.unwrap();
    let f = info.facts(Some("MOCKPERIODYEARNEW-000001"));
    assert_eq!(f.customer_id.as_deref(), Some(BUYER));
    assert_eq!(f.quantity, Some(50));

    let wrong =
        OrderApi::new(&m.url(), Secret::new("sim-ak"), Secret::new("not-the-sk"), Duration::from_secs(2)).unwrap();
    let refused = wrong.query("MOCKPERIODYEARNEW", None).await.unwrap_err();
    assert!(
        matches!(refused, OrderError::Credentials { status: 401, fault: CredentialFault::Signature, .. }),
        "{refused:?}"
    );
    // No "not found" code is documented: an unknown order is input validation, HTTP 500 MKT.0100.
    let unknown = api.query("CSNOSUCHORDER", None).await.unwrap_err();
    assert!(matches!(&unknown, OrderError::Invalid { status: 500, code, .. } if code == "MKT.0100"), "{unknown:?}");
    m.set_failing(true);
    let down = api.query("MOCKONETIMENEW", None).await.unwrap_err();
    assert!(matches!(down, OrderError::Unavailable { status: 500, .. }), "{down:?}");
    m.set_failing(false);
    assert!(api.query("MOCKONETIMENEW", Some("MOCKONETIMENEW-000001")).await.is_ok());
    m.stop().await;
}

async fn enriched_purchase(backend: Backend) {
    let m = market().await;
    m.set_failing(true); // the order API is down when the purchase arrives
    let billing = Billing::start(|_, _, _| ok()).await;
    let url = m.url();
    let burl = billing.url();
    let gw = TestGateway::start_with(
        backend,
        "enrich",
        &[
            ("KOOGATE_MARKETPLACE_URL", &url),
            ("KOOGATE_MARKETPLACE_AK", "sim-ak"),
            ("KOOGATE_MARKETPLACE_SK", "sim-sk"),
            ("KOOGATE_BILLING_URL", &burl),
            ("KOOGATE_BILLING_SECRET", SECRET),
            ("KOOGATE_RETRY_INITIAL_MS", "100"),
            ("KOOGATE_RETRY_MAX_MS", "300"),
            ("KOOGATE_ADMIN_TOKEN", TOKEN),
        ],
    )
    .await;
    let order = format!("SIMSVCCARDS-{}", koogate::tools::simulate::orders::new_run_id());
    let line = format!("{order}-000001");
    let body = |business: &str| {
        format!(
            r#"{{"activity":"newInstance","businessId":"{business}","orderId":"{order}","orderLineId":"{line}","testFlag":"0"}}"#
        )
    };
    let started = Instant::now();
    let first = gw.v2(body("b-1").as_bytes()).await;
    assert_eq!(first.result_code().as_deref(), Some("000000"));
    assert!(started.elapsed() < Duration::from_secs(1), "answered at once, not after the order API");
    let instance = first.json().unwrap()["instanceId"].as_str().unwrap().to_owned();

    // KooGallery retries while the enrichment is pending: same answer, no second event.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let retry = gw.v2(body("b-2").as_bytes()).await;
    assert_eq!(retry.body, first.body);
    assert!(billing.delivered().is_empty(), "nothing is delivered before enrichment");
    let auth = format!("Bearer {TOKEN}");
    let res = gw
        .admin
        .send(
            Method::GET,
            &format!("/v1/events?instance_id={instance}"),
            &[("authorization", &auth)],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    let pending: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
    let last_error = pending["events"][0]["last_error"].as_str().unwrap_or("").to_owned();
    assert!(last_error.contains("order query"), "{pending}");
    // A freeze arrives meanwhile: it waits behind the purchase.
    let freeze =
        format!(r#"{{"activity":"updateInstanceStatus","instanceId":"{instance}","status":"FREEZE","testFlag":"0"}}"#);
    assert_eq!(gw.v2(freeze.as_bytes()).await.result_code().as_deref(), Some("000000"));

    m.set_failing(false); // the API is back
    let delivered = billing.wait_delivered(2, Duration::from_secs(20)).await;
    let created: Vec<_> = delivered.iter().filter(|a| a.event["type"] == "subscription.created").collect();
    assert_eq!(created.len(), 1, "one event");
    let data = &created[0].event["data"];
    println!(
        "{backend:?}: purchase enriched after the API came back: customer {}, {} cards, total {}",
        data["customer_id"], data["settlement"]["cards"], data["settlement"]["total_cny"]
    );
    assert_eq!(data["enriched"], true);
    assert_eq!(data["customer_id"], BUYER);
    assert_eq!(data["sku_code"], "svc-card-100");
    assert_eq!(data["charging_mode"], "ONE_TIME");
    assert_eq!(data["amount"], "5000.00");
    assert_eq!(data["order_type"], "NEW");
    assert_eq!(
        data["settlement"],
        serde_json::json!({"kind":"stored_value_card","cards":50,"face_value_cny":100,"total_cny":5000})
    );
    // The freeze went out after the purchase, carrying the facts learned since.
    assert_eq!(delivered.last().unwrap().event["type"], "subscription.frozen");
    assert_eq!(delivered.last().unwrap().event["data"]["customer_id"], BUYER);
    assert_eq!(delivered.last().unwrap().event["data"]["settlement"]["cards"], 50);

    // The ledger now knows the V2 buyer: the card order can be checked and redeemed.
    let res = gw
        .admin
        .send(
            Method::GET,
            &format!("/v1/orders/{order}?customer_id={BUYER}"),
            &[("authorization", &auth)],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    let facts: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
    assert_eq!(
        (res.status, facts["cards"].as_u64(), facts["total_cny"].as_u64()),
        (200, Some(50), Some(5000)),
        "{facts}"
    );
    // A second purchase event would have asked again; the answer is cached.
    assert!(m.stats().requests >= 1);
    billing.stop();
    gw.stop().await;
    m.stop().await;
}

#[tokio::test]
async fn a_purchase_event_carries_the_buyer_and_50_cards_only_after_enrichment_redis() {
    enriched_purchase(Backend::Redis).await;
}

#[tokio::test]
async fn a_purchase_event_carries_the_buyer_and_50_cards_only_after_enrichment_embedded() {
    enriched_purchase(Backend::Embedded).await;
}

#[tokio::test]
async fn debug_probes_enrich_from_mock_orders_and_revive_a_released_mock_instance() {
    let m = market().await;
    let url = m.url();
    let gw = TestGateway::start_with(
        Backend::Embedded,
        "probes",
        &[
            ("KOOGATE_MARKETPLACE_URL", &url),
            ("KOOGATE_MARKETPLACE_AK", "sim-ak"),
            ("KOOGATE_MARKETPLACE_SK", "sim-sk"),
            ("KOOGATE_FORWARD_TEST_EVENTS", "true"),
        ],
    )
    .await;
    let probe = fixture("v2/15-newInstance-debug-probe.json");
    let res = gw.v2(&probe).await;
    let instance = res.json().unwrap()["instanceId"].as_str().unwrap().to_owned();
    let call = |activity: &str, extra: &str| {
        format!(r#"{{"activity":"{activity}","instanceId":"{instance}",{extra}"testFlag":"1"}}"#).into_bytes()
    };
    assert_eq!(gw.v2(&call("releaseInstance", "")).await.result_code().as_deref(), Some("000000"));
    // The next probe cycle: same mock order, same instance, which the last cycle released.
    assert_eq!(gw.v2(&probe).await.body, res.body);
    assert_eq!(
        gw.v2(&call("updateInstanceStatus", r#""status":"FREEZE","#)).await.result_code().as_deref(),
        Some("000000")
    );
    assert_eq!(
        gw.v2(&call("updateInstanceStatus", r#""status":"UNFREEZE","#)).await.result_code().as_deref(),
        Some("000000")
    );
    let renew = r#""orderId":"MOCKMONTYRENEW","orderLineId":"MOCKMONTYRENEW-000001","scene":"RENEWAL","expireTime":"20271121235959","#;
    assert_eq!(gw.v2(&call("refreshInstance", renew)).await.result_code().as_deref(), Some("000000"));
    // A real (non-debug) call on a released instance is still refused.
    let real =
        format!(r#"{{"activity":"updateInstanceStatus","instanceId":"{instance}","status":"FREEZE","testFlag":"0"}}"#);
    assert_eq!(
        gw.v2(real.as_bytes()).await.result_code().as_deref(),
        Some("000000"),
        "the debug calls left the instance active again"
    );
    gw.drain().await;
    let events = gw.events();
    let created = events.iter().find(|e| e["type"] == "subscription.created").unwrap();
    assert_eq!(created["data"]["test"], true);
    assert_eq!(created["data"]["enriched"], true);
    assert_eq!(created["data"]["customer_id"], BUYER);
    assert_eq!(
        created["data"]["settlement"]["cards"], 50,
        "the mock order's SKU is a card SKU in fixtures/sku-map.toml"
    );
    wait_until("fewer than 6 events written", Duration::from_secs(5), async || gw.events().len() >= 6).await;
    gw.stop().await;
    m.stop().await;
}

/// A KooGallery stand-in answering every order query with one documented error.
async fn answering(status: u16, body: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = serve_http(listener, move |_req| async move {
        let mut res = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
        *res.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        res
    });
    (url, task)
}

/// 13.9: each documented order query error is read from Huawei's table, on real sockets.
#[tokio::test]
async fn order_query_errors_follow_the_documented_table() {
    let cases: [(u16, &'static str, &str); 6] = [
        (401, r#"{"resultCode":"MKT.0150","resultMsg":"Illegal operation"}"#, "credentials_illegal_operation"),
        (401, r#"{"resultCode":"MKT.0151","resultMsg":"No authority"}"#, "credentials_no_authority"),
        (401, r#"{"resultCode":"MKT.0154","resultMsg":"Illegal token"}"#, "credentials_illegal_token"),
        (500, r#"{"resultCode":"MKT.0100","resultMsg":"Failure of input parameter"}"#, "invalid"),
        (406, r#"{"resultCode":"MKT.0250","resultMsg":"Access frequency overlimit"}"#, "rate_limited"),
        (500, r#"{"resultCode":"MKT.0999","resultMsg":"System internal error."}"#, "unavailable"),
    ];
    for (status, body, label) in cases {
        let (url, task) = answering(status, body).await;
        let api = OrderApi::new(&url, Secret::new("sim-ak"), Secret::new("sim-sk"), Duration::from_secs(2)).unwrap();
        let e = api.query("MOCKPERIODYEARNEW", None).await.unwrap_err();
        println!("HTTP {status} {body} -> {label}: {e}");
        assert_eq!(e.label(), label, "{e}");
        if label.starts_with("credentials_") {
            assert!(e.to_string().contains("refused our credentials"), "{e}");
            assert!(!e.to_string().contains("sim-sk"), "no secret in messages");
        }
        task.abort();
    }
}

/// Issue 13.8: when the order query's host cannot be reached (a closed
/// loopback port: connection refused) the fallback host answers; a refusal
/// (HTTP 500) is never taken to the fallback. The answering host is reported.
#[tokio::test]
async fn the_order_query_falls_back_when_the_host_cannot_be_reached() {
    let fallback = market().await;
    let closed = format!("http://127.0.0.1:{}", free_port());
    let api = OrderApi::with_fallbacks(
        &closed,
        &[fallback.url()],
        Secret::new("sim-ak"),
        Secret::new("sim-sk"),
        Duration::from_secs(2),
    )
    .unwrap();
    let (host, answer) = api.query_on("MOCKPERIODYEARNEW", Some("MOCKPERIODYEARNEW-000001")).await;
    let (_, info) = answer.unwrap();
    assert_eq!(info.facts(None).customer_id.as_deref(), Some(BUYER));
    assert_eq!(host, fallback.url().trim_start_matches("http://"), "the fallback answered");
    assert_eq!(fallback.stats().found, 1);

    // Both unreachable: a transport error naming both hosts.
    let none = OrderApi::with_fallbacks(
        &closed,
        &[format!("http://127.0.0.1:{}", free_port())],
        Secret::new("sim-ak"),
        Secret::new("sim-sk"),
        Duration::from_secs(2),
    )
    .unwrap();
    let e = none.query("MOCKPERIODYEARNEW", None).await.unwrap_err();
    assert!(matches!(&e, OrderError::Transport(m) if m.matches("Connection refused").count() == 2), "{e:?}");

    // A primary that answers, even with a failure, is not skipped.
    let primary = market().await;
    primary.set_failing(true);
    let api = OrderApi::with_fallbacks(
        &primary.url(),
        &[fallback.url()],
        Secret::new("sim-ak"),
        Secret::new("sim-sk"),
        Duration::from_secs(2),
    )
    .unwrap();
    let (host, answer) = api.query_on("MOCKONETIMENEW", None).await;
    assert!(matches!(answer, Err(OrderError::Unavailable { status: 500, .. })), "{answer:?}");
    assert_eq!(host, primary.url().trim_start_matches("http://"));
    assert_eq!(fallback.stats().requests, 1, "the fallback was not asked again");
    primary.stop().await;
    fallback.stop().await;
}
