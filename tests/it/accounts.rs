//! Account settlement binding (issue #16): the account view, the resource
//! view and the binding check, against the simulator's order query and usage
//! APIs on loopback. Real Redis and the embedded store, real sockets.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::{fixture_params, Backend, TestGateway, AK};
use hyper::Method;
use koogate::secret::Secret;
use koogate::tools::simulate::orders::{new_run_id, run_order_id, SIM_BUYER};
use koogate::tools::simulate::{MarketConfig, MarketServer};
use serde_json::{json, Value};

const TOKEN: &str = "accounts-admin-token-0123456789";

async fn market() -> MarketServer {
    let mut config = MarketConfig::new("127.0.0.1:0".parse().unwrap());
    config.usage_key = Some(Secret::new(AK));
    MarketServer::start(config).await.unwrap()
}

async fn gateway(backend: Backend, market: &MarketServer, name: &str) -> TestGateway {
    let url = market.url();
    TestGateway::start_with(
        backend,
        name,
        &[
            ("KOOGATE_MARKETPLACE_URL", &url),
            ("KOOGATE_MARKETPLACE_AK", "sim-ak"),
            ("KOOGATE_MARKETPLACE_SK", "sim-sk"),
            ("KOOGATE_ADMIN_TOKEN", TOKEN),
            ("KOOGATE_USAGE_POLL_MS", "20"),
            ("KOOGATE_RETRY_INITIAL_MS", "50"),
            ("KOOGATE_RETRY_MAX_MS", "200"),
        ],
    )
    .await
}

async fn admin(gw: &TestGateway, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map_or_else(bytes::Bytes::new, |b| bytes::Bytes::from(b.to_string()));
    gw.admin_json(method, path, Some(TOKEN), body).await
}

async fn account(gw: &TestGateway, customer: &str) -> (u16, Value) {
    admin(gw, Method::GET, &format!("/v1/accounts/{customer}"), None).await
}

async fn verify(gw: &TestGateway, customer: &str, instance: Option<&str>) -> (u16, Value) {
    let body = instance.map(|i| json!({ "instance_id": i }));
    admin(gw, Method::POST, &format!("/v1/accounts/{customer}/verify"), body).await
}

/// Waits until the account view satisfies `done`.
async fn account_until(gw: &TestGateway, customer: &str, what: &str, done: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, view) = account(gw, customer).await;
        if done(status, &view) {
            return view;
        }
        assert!(Instant::now() < deadline, "account {customer} never showed {what}: {status} {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ids(view: &Value) -> BTreeSet<String> {
    view["instances"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap().to_owned()).collect()
}

async fn v2_ok(gw: &TestGateway, body: Value) -> Value {
    let res = gw.v2(body.to_string().as_bytes()).await;
    assert_eq!(res.result_code().as_deref(), Some("000000"), "{body}: {}", String::from_utf8_lossy(&res.body));
    res.json().unwrap()
}

async fn buy_v2(gw: &TestGateway, order: &str) -> String {
    let body = json!({"activity": "newInstance", "businessId": uuid::Uuid::new_v4().to_string(),
        "orderId": order, "orderLineId": format!("{order}-000001"), "testFlag": "0"});
    v2_ok(gw, body).await["instanceId"].as_str().unwrap().to_owned()
}

async fn status(gw: &TestGateway, instance: &str, status: &str) {
    v2_ok(gw, json!({"activity": "updateInstanceStatus", "instanceId": instance, "status": status, "testFlag": "0"}))
        .await;
}

async fn release(gw: &TestGateway, instance: &str) {
    v2_ok(gw, json!({"activity": "releaseInstance", "instanceId": instance, "testFlag": "0"})).await;
}

/// A record of the hour that ended `hours_ago` full hours ago (within
/// KooGallery's 21 days, never in the future).
fn usage(instance: &str, value: &str, sn: &str, hours_ago: i64) -> Value {
    let end = chrono::Utc::now().timestamp() / 3600 * 3600 - hours_ago * 3600;
    let t = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap().format("%Y%m%dT%H%M%SZ").to_string();
    json!({"instance_id": instance, "begin_time": t(end - 3600), "end_time": t(end), "usage_value": value, "metering_sn": sn})
}

async fn binding(backend: Backend) {
    let m = market().await;
    let gw = gateway(backend, &m, "accounts").await;
    let run = new_run_id();
    let buyer = SIM_BUYER.customer_id;

    // Three pay-per-use workspaces of one account (V2: the buyer comes from the order query) …
    let mut mine = BTreeSet::new();
    for template in ["SIMPPUWSA", "SIMPPUWSB", "SIMPPUWSC"] {
        mine.insert(buy_v2(&gw, &run_order_id(template, &run)).await);
    }
    // … and one V1 purchase of another account (the buyer is in the call).
    let other = format!("acct-v1-{run}");
    let mut params = fixture_params("v1/01-newInstance-stored-value-cards.json");
    params.insert("customerId".into(), other.clone());
    params.insert("orderId".into(), format!("CSACCTV1{run}"));
    let res = gw.v1(&params).await;
    assert_eq!(res.result_code().as_deref(), Some("000000"), "{}", String::from_utf8_lossy(&res.body));
    let v1_instance = res.json().unwrap()["instanceId"].as_str().unwrap().to_owned();

    let view = account_until(&gw, buyer, "its three instances", |s, v| s == 200 && v["total"] == 3).await;
    assert_eq!(ids(&view), mine, "exactly the account's three instances");
    for i in view["instances"].as_array().unwrap() {
        assert_eq!(i["status"], "active");
        assert_eq!(i["charging_mode"], "ON_DEMAND", "{i}");
        assert_eq!(i["resource_id"], i["instance_id"]);
        assert_eq!(i["customer_id"], buyer);
    }
    let created: Vec<&str> =
        view["instances"].as_array().unwrap().iter().map(|i| i["created_at"].as_str().unwrap()).collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first: {created:?}");
    let other_view = account_until(&gw, &other, "its V1 instance", |s, v| s == 200 && v["total"] == 1).await;
    assert_eq!(ids(&other_view), BTreeSet::from([v1_instance.clone()]));

    // Pages.
    let (s, page) = admin(&gw, Method::GET, &format!("/v1/accounts/{buyer}?limit=2"), None).await;
    assert_eq!((s, page["instances"].as_array().unwrap().len(), page["next_offset"].clone()), (200, 2, json!(2)));
    let (_, rest) = admin(&gw, Method::GET, &format!("/v1/accounts/{buyer}?offset=2&limit=2"), None).await;
    assert_eq!(rest["instances"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next_offset"], Value::Null);
    let (s, bad) = admin(&gw, Method::GET, &format!("/v1/accounts/{buyer}?limit=0"), None).await;
    assert_eq!((s, bad["error"].as_str()), (400, Some("bad_query")));

    // Usage: what was accepted is pushed and shows per instance.
    let values = ["1.5", "2.25", "0.0001"];
    let records: Vec<Value> =
        mine.iter().zip(values).enumerate().map(|(n, (i, v))| usage(i, v, &format!("acct-{run}-{n}"), 1)).collect();
    let (s, answer) = admin(&gw, Method::POST, "/v1/usage", Some(json!({ "records": records }))).await;
    assert_eq!(s, 200, "{answer}");
    let pushed = account_until(&gw, buyer, "its usage pushed", |_, v| {
        v["instances"].as_array().is_some_and(|is| is.iter().all(|i| i["usage"]["pushed"] != "0"))
    })
    .await;
    for (i, v) in mine.iter().zip(values) {
        let shown = pushed["instances"].as_array().unwrap().iter().find(|x| x["instance_id"] == *i).unwrap();
        assert_eq!(shown["usage"]["pushed"], v, "{shown}");
        assert_eq!(shown["usage"]["items"][0]["pushed"], v, "one billing item: {shown}");
    }
    let settled = account_until(&gw, buyer, "nothing left unpushed", |_, v| {
        v["instances"].as_array().is_some_and(|is| is.iter().all(|i| i["usage"]["unpushed"] == "0"))
    })
    .await;
    assert_eq!(settled["total"], 3);

    // The resource view: account, order line, events.
    let first = mine.iter().next().unwrap().clone();
    let (s, resource) = admin(&gw, Method::GET, &format!("/v1/instances/{first}"), None).await;
    assert_eq!(s, 200, "{resource}");
    assert_eq!(resource["account"]["customer_id"], buyer);
    assert_eq!(resource["account_pending"], false);
    assert_eq!(resource["order_lines"].as_array().unwrap().len(), 1, "{resource}");
    assert_eq!(resource["event_ids"], json!([format!("evt_{first}_1")]));
    let (s, missing) = admin(&gw, Method::GET, "/v1/instances/no-such-instance", None).await;
    assert_eq!((s, missing["error"].as_str()), (404, Some("not_found")));

    // Binding check: active; frozen for the frozen one; idempotent, no write.
    let (s, ok) = verify(&gw, buyer, None).await;
    assert_eq!((s, ok["active"].as_bool()), (200, Some(true)), "{ok}");
    assert_eq!(ok["instances"].as_array().unwrap().len(), 3);
    status(&gw, &first, "FREEZE").await;
    gw.drain().await; // nothing moves in the background while the store is compared
    let before = gw.snapshot().await;
    let (s, frozen) = verify(&gw, buyer, Some(&first)).await;
    assert_eq!((s, frozen["error"].as_str()), (409, Some("frozen")), "{frozen}");
    let (s, again) = verify(&gw, buyer, Some(&first)).await;
    assert_eq!((s, &again), (409, &frozen), "the same answer twice");
    let (s, still) = verify(&gw, buyer, None).await;
    assert_eq!((s, still["instances"].as_array().unwrap().len()), (200, 2), "two stay active: {still}");
    assert_eq!(gw.snapshot().await, before, "the binding check writes nothing");
    // Usage of a frozen instance is accepted and held: it shows as unpushed.
    let held = usage(&first, "4", &format!("acct-{run}-held"), 0);
    let (s, answer) = admin(&gw, Method::POST, "/v1/usage", Some(json!({ "records": [held] }))).await;
    assert_eq!((s, answer["accepted"].as_u64()), (200, Some(1)), "{answer}");
    let (_, resource) = admin(&gw, Method::GET, &format!("/v1/instances/{first}"), None).await;
    assert_eq!((&resource["usage"]["unpushed"], &resource["usage"]["pushed"]), (&json!("4"), &json!(values[0])));
    let (s, foreign) = verify(&gw, buyer, Some(&v1_instance)).await;
    assert_eq!((s, foreign["error"].as_str()), (404, Some("no_subscription")), "another account's instance");

    // Unknown account.
    let (s, unknown) = account(&gw, "no-such-account").await;
    assert_eq!((s, unknown["error"].as_str()), (404, Some("not_found")), "{unknown}");
    let (s, unknown) = verify(&gw, "no-such-account", None).await;
    assert_eq!((s, unknown["error"].as_str()), (404, Some("no_subscription")));

    // A purchase whose order query keeps failing is pending, then appears under its account.
    m.set_failing(true);
    let late_run = new_run_id();
    let late = buy_v2(&gw, &run_order_id("SIMPPUWSA", &late_run)).await;
    let waiting = account_until(&gw, buyer, "a pending purchase", |_, v| v["enrichment_pending"] == 1).await;
    assert_eq!(waiting["total"], 3, "not listed before its buyer is known");
    let (_, pending) = admin(&gw, Method::GET, &format!("/v1/instances/{late}"), None).await;
    assert_eq!((pending["account_pending"].as_bool(), &pending["account"]), (Some(true), &Value::Null), "{pending}");
    m.set_failing(false);
    let view = account_until(&gw, buyer, "the late purchase", |_, v| v["total"] == 4).await;
    assert_eq!(view["enrichment_pending"], 0);
    assert_eq!(view["instances"][0]["instance_id"], late, "newest first");

    // Released: every instance of the account.
    for i in mine.iter().chain([&late]) {
        release(&gw, i).await;
    }
    let (s, released) = verify(&gw, buyer, None).await;
    assert_eq!((s, released["error"].as_str()), (409, Some("released")), "{released}");
    let view = account(&gw, buyer).await.1;
    assert!(view["instances"].as_array().unwrap().iter().all(|i| i["status"] == "released"), "{view}");

    let metrics = gw.metrics().await;
    assert!(metrics.contains(r#"koogate_account_lookups_total{kind="verify",outcome="frozen"}"#), "{metrics}");
    gw.stop().await;
    m.stop().await;
}

#[tokio::test]
async fn binding_on_redis() {
    binding(Backend::Redis).await;
}

#[tokio::test]
async fn binding_on_embedded() {
    binding(Backend::Embedded).await;
}

/// Redis commands of a KooGallery call and of an account look-up, from
/// `INFO commandstats` of a private Redis: the call stays one EVALSHA and
/// never touches the account index; the look-up reads the index once.
#[tokio::test]
async fn redis_work_of_a_call_and_of_a_lookup() {
    let redis = crate::common::OwnRedis::start();
    // Delivery fails once and waits 10 minutes: the account link is written at that first attempt.
    let dead_billing = format!("http://127.0.0.1:{}/events", crate::common::free_port());
    let gw = TestGateway::start_on(
        Backend::Redis,
        "accounts-commandstats",
        &redis.url(),
        &[
            ("KOOGATE_ADMIN_TOKEN", TOKEN),
            ("KOOGATE_BILLING_URL", &dead_billing),
            ("KOOGATE_BILLING_SECRET", crate::common::billing::SECRET),
            ("KOOGATE_RETRY_INITIAL_MS", "600000"),
        ],
    )
    .await;
    let customer = "acct-commandstats";
    let mut params = fixture_params("v1/01-newInstance-stored-value-cards.json");
    params.insert("customerId".into(), customer.into());
    assert_eq!(gw.v1(&params).await.result_code().as_deref(), Some("000000"));
    account_until(&gw, customer, "its instance", |s, v| s == 200 && v["total"] == 1).await;

    let url = redis.url();
    let stats = || crate::common::commandstats(&url);
    let before = stats().await;
    let calls = ["v2/01-newInstance.json", "v2/02-newInstance-stored-value-cards.json", "v2/01-newInstance.json"];
    for rel in calls {
        assert_eq!(gw.v2_fixture(rel).await.result_code().as_deref(), Some("000000"), "{rel}");
    }
    let after_calls = stats().await;
    let (s, view) = account(&gw, customer).await;
    assert_eq!((s, view["total"].as_u64()), (200, Some(1)));
    let after_lookup = stats().await;
    let delta = |a: &std::collections::BTreeMap<String, u64>, b: &std::collections::BTreeMap<String, u64>, c: &str| {
        b.get(c).copied().unwrap_or(0) - a.get(c).copied().unwrap_or(0)
    };
    println!(
        "{} KooGallery calls: evalsha={} zadd={} zrevrange={}; one account look-up: zrevrange={} zcard={} hgetall={}",
        calls.len(),
        delta(&before, &after_calls, "evalsha"),
        delta(&before, &after_calls, "zadd"),
        delta(&before, &after_calls, "zrevrange"),
        delta(&after_calls, &after_lookup, "zrevrange"),
        delta(&after_calls, &after_lookup, "zcard"),
        delta(&after_calls, &after_lookup, "hgetall"),
    );
    assert_eq!(delta(&before, &after_calls, "evalsha"), calls.len() as u64, "one EVALSHA per call");
    assert_eq!(delta(&before, &after_calls, "zrevrange"), 0, "calls never read the account index");
    assert_eq!(delta(&after_calls, &after_lookup, "zrevrange"), 1, "the look-up reads the index once");
    assert_eq!(delta(&after_calls, &after_lookup, "hgetall"), 1, "and its one instance record");
    gw.stop().await;
}

/// `koogate accounts show|verify` and `koogate instances show` against a running gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_accounts_and_instances() {
    let gw = TestGateway::start_with(Backend::Redis, "accounts-cli", &[("KOOGATE_ADMIN_TOKEN", TOKEN)]).await;
    let customer = format!("acct-cli-{}", new_run_id());
    let mut params = fixture_params("v1/01-newInstance-stored-value-cards.json");
    params.insert("customerId".into(), customer.clone());
    params.insert("orderId".into(), format!("CSACCTCLI{}", new_run_id()));
    let res = gw.v1(&params).await;
    let instance = res.json().unwrap()["instanceId"].as_str().unwrap().to_owned();
    account_until(&gw, &customer, "its instance", |s, v| s == 200 && v["total"] == 1).await;

    let admin_url = format!("http://{}", gw.running().admin_addr);
    let cli = |args: Vec<String>| {
        let admin = admin_url.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_koogate"))
                .args(&args)
                .arg("--admin")
                .arg(&admin)
                .env("KOOGATE_ADMIN_TOKEN", TOKEN)
                .env("NO_COLOR", "1")
                .output()
                .await
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    let (code, out, err) = cli(s(&["accounts", "show", &customer])).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("account {customer}: 1 instance(s)")) && out.contains(&instance), "{out}");
    assert!(out.contains("RESOURCE ID") && out.contains("active"), "{out}");
    let (code, out, _) = cli(s(&["accounts", "show", &customer, "--json"])).await;
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((code, json["instances"][0]["instance_id"].as_str()), (Some(0), Some(instance.as_str())));
    let (code, out, _) = cli(s(&["instances", "show", &instance])).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("account:     {customer}")) && out.contains(&format!("evt_{instance}_1")), "{out}");
    let (code, out, _) = cli(s(&["accounts", "verify", &customer])).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("active: "), "{out}");
    let (code, out, err) = cli(s(&["accounts", "show", "no-such-account"])).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("HTTP 404"), "{err}");
    let (code, out, _) = cli(s(&["accounts", "verify", "no-such-account"])).await;
    assert_eq!(code, Some(1));
    assert!(out.contains("not active (no_subscription)"), "{out}");
    let (code, _, err) = cli(s(&["instances", "show", "no-such-instance"])).await;
    assert_eq!(code, Some(1), "{err}");

    // Without AK/SK a V2 purchase cannot learn its account: not "pending", but said why.
    let v2 = buy_v2(&gw, &format!("CSACCTNOAKSK{}", new_run_id())).await;
    let (status, view) = admin(&gw, Method::GET, &format!("/v1/instances/{v2}"), None).await;
    assert_eq!((status, view["account_pending"].as_bool()), (200, Some(false)), "{view}");
    assert!(view["account_note"].as_str().is_some_and(|n| n.contains("KOOGATE_MARKETPLACE_AK/SK")), "{view}");
    gw.stop().await;
}
