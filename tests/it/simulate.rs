//! `koogate simulate`: the order query API as API Gateway guards it, every
//! scenario against real gateways on both stores, violations detected, the
//! KooGallery retry behaviour, and the binary.

use crate::common::*;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use koogate::marketplace::apig;
use koogate::store::keys::instance_id_for;
use koogate::tools::simulate::market::ORDER_QUERY_PATH;
use koogate::tools::simulate::orders::{line_id, run_order_id};
use koogate::tools::simulate::{run_scenarios, GatewayTarget, OrderBook, Report, RetryPolicy, RunOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const SCENARIO_CALLS: usize = 35;

/// A GET of the order query API signed as `koogate`'s client signs it.
async fn order_query(
    addr: SocketAddr,
    order: &str,
    line: Option<&str>,
    ak: &str,
    sk: &str,
    date: chrono::DateTime<chrono::Utc>,
) -> (u16, Value) {
    let mut query = vec![("orderId".to_owned(), order.to_owned())];
    if let Some(line) = line {
        query.push(("orderLineId".to_owned(), line.to_owned()));
    }
    let host = addr.to_string();
    let date = date.format(apig::DATE_FORMAT).to_string();
    let headers = vec![
        ("host".to_owned(), host.clone()),
        ("x-sdk-date".to_owned(), date.clone()),
        ("content-type".to_owned(), "application/json".to_owned()),
    ];
    let authorization =
        apig::Request { method: "GET", path: ORDER_QUERY_PATH, query: &query, headers: &headers, body: b"" }
            .authorization(ak, sk);
    let url = reqwest::Url::parse_with_params(&format!("http://{addr}{ORDER_QUERY_PATH}"), &query).unwrap();
    let res = reqwest::Client::new()
        .get(url)
        .header("host", host)
        .header("x-sdk-date", date)
        .header("content-type", "application/json")
        .header("authorization", authorization)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, serde_json::from_slice(&res.bytes().await.unwrap()).unwrap())
}

#[tokio::test]
async fn order_query_api_checks_signatures_like_api_gateway() {
    let market = market().await;
    let addr = market.addr;
    let now = chrono::Utc::now();

    let (status, body) =
        order_query(addr, "MOCKPERIODYEARNEW", Some("MOCKPERIODYEARNEW-000001"), "sim-ak", "sim-sk", now).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["resultCode"], "MKT.0000");
    assert_eq!(body["resultMsg"], "Success");
    let info = &body["orderInfo"];
    assert_eq!(info["orderId"], "MOCKPERIODYEARNEW");
    assert_eq!(info["orderType"], "NEW");
    assert_eq!(info["orderLine"][0]["orderLineId"], "MOCKPERIODYEARNEW-000001");
    assert_eq!(info["orderLine"][0]["productInfo"][0]["linearValue"], 50);
    assert_eq!(info["buyerInfo"]["customerId"], "459bbbec25d24749b2eb83be37b602a8");

    // a scenario order of any run: the stored-value cards
    let order = run_order_id("SIMSVCCARDS", "RTEST42");
    let (status, body) = order_query(addr, &order, Some(&line_id(&order)), "sim-ak", "sim-sk", now).await;
    assert_eq!(status, 200);
    let line = &body["orderInfo"]["orderLine"][0];
    assert_eq!(line["orderLineId"], format!("{order}-000001"));
    assert_eq!(line["chargingMode"], "ONE_TIME");
    assert_eq!(line["productInfo"][0]["skuCode"], "svc-card-100");
    assert_eq!(line["productInfo"][0]["linearValue"], 50);
    assert_eq!(line["currencyAfterDiscount"], "5000.00");

    let (status, body) = order_query(addr, "MOCKONETIMENEW", None, "sim-ak", "wrong-sk", now).await;
    assert_eq!(status, 401);
    assert_eq!(body["error_code"], "APIGW.0301");
    assert!(body["error_msg"].as_str().unwrap().starts_with("Incorrect IAM authentication information: verify aksk"));

    let (status, body) = order_query(addr, "MOCKONETIMENEW", None, "other-ak", "sim-sk", now).await;
    assert_eq!((status, body["error_code"].as_str()), (401, Some("APIGW.0301")));
    assert!(body["error_msg"].as_str().unwrap().contains("ak not exist"));

    let stale = now - chrono::Duration::minutes(16);
    let (status, body) = order_query(addr, "MOCKONETIMENEW", None, "sim-ak", "sim-sk", stale).await;
    assert_eq!((status, body["error_code"].as_str()), (401, Some("APIGW.0301")), "{body}");
    let ahead = now + chrono::Duration::minutes(16);
    assert_eq!(order_query(addr, "MOCKONETIMENEW", None, "sim-ak", "sim-sk", ahead).await.0, 401);
    let fourteen = now - chrono::Duration::minutes(14);
    assert_eq!(order_query(addr, "MOCKONETIMENEW", None, "sim-ak", "sim-sk", fourteen).await.0, 200);

    let unsigned =
        reqwest::get(format!("http://{addr}{ORDER_QUERY_PATH}?orderId=MOCKONETIMENEW")).await.unwrap().status();
    assert_eq!(unsigned.as_u16(), 401);

    let (status, body) = order_query(addr, "CS0000000000NOSUCH", None, "sim-ak", "sim-sk", now).await;
    // Huawei documents no "not found" code: input validation, HTTP 500 MKT.0100.
    assert_eq!(status, 500);
    assert_eq!(body["resultCode"], "MKT.0100");
    assert_eq!(body["resultMsg"], "Failure of input parameter");
    let (_, body) = order_query(addr, "MOCKONETIMENEW", Some("MOCKONETIMENEW-000002"), "sim-ak", "sim-sk", now).await;
    assert_eq!(body["resultCode"], "MKT.0100");

    market.set_failing(true);
    let (status, _) = order_query(addr, "MOCKONETIMENEW", None, "sim-ak", "sim-sk", now).await;
    assert_eq!(status, 500);
    market.set_failing(false);
    let (status, body) = order_query(addr, "MOCKONETIMENEW", None, "sim-ak", "sim-sk", now).await;
    assert_eq!((status, body["resultCode"].as_str()), (200, Some("MKT.0000")));

    market.set_fail_share(1.0);
    assert_eq!(order_query(addr, "MOCKONETIMENEW", None, "sim-ak", "sim-sk", now).await.0, 500);
    market.set_fail_share(0.0);

    let stats = market.stats();
    assert_eq!(stats.requests, 13, "{stats:?}");
    assert_eq!((stats.found, stats.not_found, stats.unauthorized, stats.failed_on_purpose), (4, 2, 5, 2), "{stats:?}");
    assert_eq!(market.queried().get("MOCKONETIMENEW"), Some(&3));
    let over_http: Value =
        serde_json::from_slice(&reqwest::get(format!("http://{addr}/stats")).await.unwrap().bytes().await.unwrap())
            .unwrap();
    assert_eq!(over_http["requests"], 13);

    // orders can be added while serving
    market.insert_order(serde_json::json!({"orderId": "CSADDED", "orderType": "NEW", "orderLine": []})).unwrap();
    let (_, body) = order_query(addr, "CSADDED", None, "sim-ak", "sim-sk", now).await;
    assert_eq!(body["orderInfo"]["orderType"], "NEW");
    market.stop().await;
}

#[test]
fn the_orders_fixture_is_the_generated_book() {
    let path = fixtures().join("orders.json");
    let generated = OrderBook::generated();
    if std::env::var_os("KOOGATE_WRITE_FIXTURES").is_some() {
        let text = serde_json::to_string_pretty(&generated.to_json()).unwrap();
        std::fs::write(&path, format!("{text}\n")).unwrap();
    }
    let loaded = OrderBook::load(&path).unwrap();
    assert_eq!(
        loaded, generated,
        "fixtures/orders.json is stale: KOOGATE_WRITE_FIXTURES=1 cargo test --test it simulate::the_orders_fixture"
    );
}

fn assert_clean(report: &Report) {
    assert!(report.ok(), "{}", report.table());
    assert_eq!(report.calls(), SCENARIO_CALLS, "{}", report.table());
    assert_eq!(report.summary(), format!("7 scenarios, {SCENARIO_CALLS} calls, 0 violations"));
    for s in &report.scenarios {
        for c in &s.calls {
            assert!(c.signature_ok && c.http_status == Some(200), "{}", report.table());
            assert_eq!(c.result_code.as_deref(), Some("000000"));
        }
    }
}

#[tokio::test]
async fn every_scenario_passes_against_both_stores() {
    let market = market().await;
    let market_url = market.url();
    for backend in BACKENDS {
        let env = [
            ("KOOGATE_MARKETPLACE_URL", market_url.as_str()),
            ("KOOGATE_MARKETPLACE_AK", "sim-ak"),
            ("KOOGATE_MARKETPLACE_SK", "sim-sk"),
        ];
        let gw = TestGateway::start_with(backend, "simulate", &env).await;
        let target = GatewayTarget::new(&format!("http://{}", gw.running().addr), AK);

        let mut first = RunOptions::new(target.clone());
        first.run_id = "RFIRST".into();
        let report = run_scenarios(&first).await.unwrap();
        assert_clean(&report);
        let lifecycle = report.scenarios.iter().find(|s| s.name == "account-settlement-lifecycle").unwrap();
        let order = run_order_id("SIMSUBNEW", "RFIRST");
        let expected = instance_id_for(&order, Some(&line_id(&order)));
        assert_eq!(lifecycle.calls[0].instance_id.as_deref(), Some(expected.as_str()));
        assert_eq!(lifecycle.calls.len(), 7);
        let probes = report.scenarios.iter().find(|s| s.name == "debug-probes").unwrap();
        let probe_id = instance_id_for("MOCKPERIODYEARNEW", Some("MOCKPERIODYEARNEW-000001"));
        assert_eq!(probes.calls[0].instance_id.as_deref(), Some(probe_id.as_str()));

        // A rerun against the same gateway: fresh orders, the same probes.
        let report = run_scenarios(&RunOptions::new(target.clone())).await.unwrap();
        assert_clean(&report);

        gw.drain().await;
        let types: BTreeSet<String> =
            gw.events().iter().filter_map(|e| e["type"].as_str().map(str::to_owned)).collect();
        for t in [
            "subscription.created",
            "subscription.renewed",
            "subscription.frozen",
            "subscription.unfrozen",
            "subscription.changed",
            "subscription.converted",
            "subscription.expired",
            "subscription.released",
        ] {
            assert!(types.contains(t), "{backend:?}: no {t} event in {types:?}");
        }
        let cards = gw
            .events()
            .into_iter()
            .find(|e| e["data"]["order_id"] == run_order_id("SIMV1CARDS", "RFIRST"))
            .expect("the V1 card purchase made an event");
        assert_eq!(cards["data"]["settlement"]["kind"], "stored_value_card", "{cards}");
        assert_eq!(cards["data"]["settlement"]["cards"], 50, "{cards}");
        gw.stop().await;
    }
    // Whether the gateway asked the order API depends on its enrichment; the scenarios do not.
    eprintln!("order query API stats: {:?}", market.stats());
    market.stop().await;
}

#[tokio::test]
async fn a_gateway_with_another_access_key_is_a_violation() {
    let gw = TestGateway::start_with(Backend::Embedded, "simulate-badkey", &[("KOOGATE_ACCESS_KEY", "other")]).await;
    let mut opts = RunOptions::new(GatewayTarget::new(&format!("http://{}", gw.running().addr), AK));
    opts.scenarios = vec!["account-settlement-lifecycle".into()];
    let report = run_scenarios(&opts).await.unwrap();
    assert!(!report.ok());
    let call = &report.scenarios[0].calls[0];
    assert_eq!(call.result_code.as_deref(), Some("000001"), "{}", report.table());
    assert_eq!(call.attempts, 1, "000001 is not retried");
    assert!(!call.signature_ok);
    let lines = report.violation_lines().join("\n");
    assert!(lines.contains("resultCode 000001"), "{lines}");
    assert!(lines.contains("bad Body-Sign"), "{lines}");
    assert!(report.scenarios[0].aborted.is_some(), "later calls need the instance id");
    assert_eq!(report.summary(), "1 scenarios, 1 calls, 3 violations");
    gw.stop().await;
}

/// What a scripted fake gateway answers to its n-th request.
#[derive(Clone)]
enum Fake {
    /// This status, unsigned, plain text.
    Status(u16),
    /// 200 with this body, unsigned.
    Unsigned(&'static str),
    /// 200 with this result code, signed; success carries the order line's instance id (+ `suffix`).
    Signed(&'static str, &'static str),
}

struct FakeGateway {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, Value)>>>,
    shutdown: CancellationToken,
}

impl FakeGateway {
    /// Answers request n with `script[n]`, the last entry ever after.
    async fn start(script: Vec<Fake>) -> Self {
        let listener = koogate::http::bind("127.0.0.1:0".parse().unwrap(), "fake gateway").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let shutdown = CancellationToken::new();
        let limits = koogate::http::ListenerLimits {
            max_connections: 64,
            max_conns_per_peer: 0,
            header_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(1),
        };
        let (state, script) = (Arc::clone(&seen), Arc::new(script));
        let handler = move |req: Request<Incoming>| {
            let (seen, script) = (Arc::clone(&state), Arc::clone(&script));
            async move {
                let query = req.uri().query().unwrap_or("").to_owned();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let json: Value = serde_json::from_slice(&body).unwrap_or_default();
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push((query, json.clone()));
                    seen.len() - 1
                };
                let step = script.get(n).or(script.last()).cloned().unwrap();
                let (status, text, signed) = match step {
                    Fake::Status(s) => (s, "internal error".to_owned(), false),
                    Fake::Unsigned(b) => (200, b.to_owned(), false),
                    Fake::Signed(code, suffix) => {
                        let id = instance_id_for(
                            json["orderId"].as_str().unwrap_or(""),
                            Some(json["orderLineId"].as_str().unwrap_or("")),
                        );
                        let text = if code == "000000" {
                            format!(
                                r#"{{"resultCode":"000000","resultMsg":"success","instanceId":"{id}{suffix}","encryptType":"1","appInfo":{{"frontEndUrl":"https://x.example"}}}}"#
                            )
                        } else {
                            format!(r#"{{"resultCode":"{code}","resultMsg":"busy","instanceId":"{id}{suffix}"}}"#)
                        };
                        (200, text, true)
                    }
                };
                let mut res = Response::new(Full::new(Bytes::from(text.clone())));
                *res.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                if signed {
                    let sign = koogate::protocol::sign::body_sign(AK, text.as_bytes());
                    res.headers_mut().insert("Body-Sign", sign.parse().unwrap());
                }
                res
            }
        };
        tokio::spawn(koogate::http::serve(listener, limits, shutdown.clone(), handler));
        Self { addr, seen, shutdown }
    }

    fn options(&self) -> RunOptions {
        let mut opts = RunOptions::new(GatewayTarget::new(&format!("http://{}", self.addr), AK));
        opts.scenarios = vec!["retry-dedup".into()];
        opts.retry = RetryPolicy { retries: 3, first_delay: Duration::from_millis(10) };
        opts.timeout = Duration::from_secs(2);
        opts
    }

    fn seen(&self) -> Vec<(String, Value)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test]
async fn an_unsigned_answer_is_a_violation() {
    let fake = FakeGateway::start(vec![Fake::Unsigned(r#"{"resultCode":"000000"}"#)]).await;
    let report = run_scenarios(&fake.options()).await.unwrap();
    assert!(!report.ok());
    let lines = report.violation_lines().join("\n");
    assert!(lines.contains("unsigned"), "{lines}");
    assert!(lines.contains("without instanceId"), "{lines}");

    let fake = FakeGateway::start(vec![Fake::Unsigned("<html>oops</html>")]).await;
    let report = run_scenarios(&fake.options()).await.unwrap();
    assert!(report.violation_lines().join("\n").contains("not JSON"), "{}", report.table());
}

#[tokio::test]
async fn failures_are_retried_as_koogallery_retries() {
    // 500, then 000005, then success: three attempts of the first call, one of the second.
    let fake =
        FakeGateway::start(vec![Fake::Status(500), Fake::Signed("000005", ""), Fake::Signed("000000", "")]).await;
    let report = run_scenarios(&fake.options()).await.unwrap();
    assert!(report.ok(), "{}", report.table());
    let calls = &report.scenarios[0].calls;
    assert_eq!((calls[0].attempts, calls[1].attempts), (3, 1), "{}", report.table());
    let seen = fake.seen();
    assert_eq!(seen.len(), 4);
    let nonces: BTreeSet<&str> =
        seen.iter().filter_map(|(q, _)| q.split('&').find(|p| p.starts_with("nonce="))).collect();
    let businesses: BTreeSet<&str> = seen.iter().filter_map(|(_, b)| b["businessId"].as_str()).collect();
    assert_eq!((nonces.len(), businesses.len()), (4, 4), "fresh nonce and businessId on every attempt");
    assert!(seen.iter().all(|(_, b)| b["orderId"] == seen[0].1["orderId"]));

    // Never recovering: the retries are spent and that is a violation.
    let fake = FakeGateway::start(vec![Fake::Status(503)]).await;
    let report = run_scenarios(&fake.options()).await.unwrap();
    assert_eq!(fake.seen().len(), 8, "two calls, four attempts each");
    assert!(report.violation_lines().join("\n").contains("HTTP 503 after 4 attempts"), "{}", report.table());

    // A retried newInstance answered with another instance id.
    let fake = FakeGateway::start(vec![Fake::Signed("000005", "-a"), Fake::Signed("000000", "")]).await;
    let report = run_scenarios(&fake.options()).await.unwrap();
    let lines = report.violation_lines().join("\n");
    assert!(lines.contains("retried newInstance answered instanceId"), "{lines}");

    // A second purchase answered with another id than the first.
    let fake = FakeGateway::start(vec![Fake::Signed("000000", ""), Fake::Signed("000000", "x")]).await;
    let report = run_scenarios(&fake.options()).await.unwrap();
    let lines = report.violation_lines().join("\n");
    assert!(lines.contains("byte for byte"), "{lines}");
    assert!(lines.contains("is not the id of its order line"), "{lines}");
}

fn koogate_bin() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_koogate"));
    cmd.env_remove("KOOGATE_ACCESS_KEY")
        .env_remove("KOOGATE_MARKETPLACE_AK")
        .env_remove("KOOGATE_MARKETPLACE_SK")
        .env("KOOGATE_LOG", "warn")
        .kill_on_drop(true);
    cmd
}

async fn run_bin(args: &[&str]) -> std::process::Output {
    let child = koogate_bin().args(args).output();
    tokio::time::timeout(Duration::from_secs(120), child).await.expect("koogate simulate finishes").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_every_scenario_and_exits_with_the_verdict() {
    let gw = TestGateway::start(Backend::Embedded, "simulate-bin").await;
    let url = format!("http://{}", gw.running().addr);

    let out = run_bin(&["simulate", "--listen", "127.0.0.1:0", "--gateway", &url, "--key", AK]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("7 scenarios, {SCENARIO_CALLS} calls, 0 violations")), "{stdout}");
    assert!(stdout.contains("KOOGATE_MARKETPLACE_URL=http://127.0.0.1:"), "{stdout}");

    let out = run_bin(&[
        "simulate",
        "--listen",
        "127.0.0.1:0",
        "--gateway",
        &url,
        "--key",
        "wrong-key",
        "--scenario",
        "debug-probes",
        "--retries",
        "0",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 scenarios, 2 calls, 5 violations"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("resultCode 000001"));

    let out =
        run_bin(&["simulate", "--listen", "127.0.0.1:0", "--gateway", &url, "--key", AK, "--scenario", "x"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario \"x\""));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_order_api_until_sigterm() {
    let port = free_port();
    let orders = fixtures().join("orders.json");
    let listen = format!("127.0.0.1:{port}");
    let mut child = koogate_bin()
        .args(["simulate", "--serve-only", "--listen", &listen, "--ak", "my-ak", "--orders"])
        .arg(&orders)
        .env("KOOGATE_MARKETPLACE_SK", "my-sk")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr: SocketAddr = listen.parse().unwrap();
    wait_until("simulate --serve-only did not start", Duration::from_secs(20), async || {
        reqwest::get(format!("http://{addr}/healthz")).await.is_ok()
    })
    .await;
    let (status, body) =
        order_query(addr, "MOCKMONTYRENEW", Some("MOCKMONTYRENEW-000001"), "my-ak", "my-sk", chrono::Utc::now()).await;
    assert_eq!((status, body["orderInfo"]["orderType"].as_str()), (200, Some("RENEW")));
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.unwrap().unwrap();
    assert!(status.success());
}

/// The V1 pay-per-use scenario follows Huawei's pages, not the gateway: a
/// gateway answering one instance for two billing items of one order, and
/// queryInstance answers without `usageInfo[]`, are violations.
#[tokio::test]
async fn v1_pay_per_use_scenario_catches_one_instance_for_two_billing_items() {
    let fake = FakeGateway::start(vec![Fake::Signed("000000", "")]).await;
    let mut opts = fake.options();
    opts.scenarios = vec!["v1-pay-per-use".into()];
    let report = run_scenarios(&opts).await.unwrap();
    let lines = report.violation_lines().join("\n");
    assert!(lines.contains("each pay-per-use billing item (orderId + productId) needs its own instance"), "{lines}");
    assert!(lines.contains("queryInstance answer has no info for"), "{lines}");
    let seen = fake.seen();
    assert!(seen.iter().any(|(q, _)| q.contains("chargingMode=0") && q.contains("activity=newInstance")), "{seen:?}");
    assert!(seen.iter().any(|(q, _)| q.contains("instanceStatus=NORMAL")), "{seen:?}");
}
