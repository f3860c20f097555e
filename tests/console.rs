//! The operator console (`/console` on the admin listener) in a real browser: Debian's
//! `chromium`, headless, driven through `chromedriver` (WebDriver, the `fantoccini` crate).
//!
//! A gateway on Redis delivers to a billing core on loopback that refuses one order's event
//! (HTTP 400: a dead letter) and every event whose order id carries markup; a KooGallery usage
//! API on loopback refuses the usage records whose `metering_sn` carries markup. The browser
//! logs in, finds the dead event by its order id, opens it, redrives it and sees it delivered;
//! visits every page (events, dead letters, orders, accounts, an instance, usage) at 1280 px and
//! some at phone width (390 px), writing a screenshot of each under
//! `target/console-screenshots/`; and renders the markup-carrying order ids and metering_sn
//! to check they show as text and nothing of them runs.
//!
//! Without chromium or chromedriver the test says so loudly and passes, unless
//! `REQUIRE_BROWSER_TEST` is set (scripts/test sets it once it has installed them): then it fails.
//! Its own binary (not tests/it): it needs a browser and takes a while.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::billing::{ok, Billing, SECRET};
use common::kooapi::{self, UsageApi};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const TOKEN: &str = "console-admin-token-5d1c9e2a";
/// Where app.js keeps the token (sessionStorage).
const TOKEN_KEY: &str = "koogate.console.token";
const CUSTOMER: &str = "68cbc86abc2018ab880d92f36422fa0e";
const ORDER_OK: &str = "CSCONSOLEOK0001";
const ORDER_DEAD: &str = "CSCONSOLEDEAD001";
/// Caller-controlled strings that would run if the console put them into the DOM as HTML.
const ORDER_SCRIPT: &str = r#"CS<script>window.__xss="order-script"</script>"#;
const ORDER_IMG: &str = r#"CS<img src=x onerror=window.__xss="order-img">"#;
const SN_SCRIPT: &str = r#"sn<script>window.__xss="sn-script"</script>"#;
const SN_IMG: &str = r#"sn<img src=x onerror=window.__xss="sn-img">"#;
const SN_OK: &str = "sn-console-ok-1";

/// The first of `names` found on PATH.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()))
}

fn screenshots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("console-screenshots")
}

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(chromedriver: &Path) -> Self {
        let port = free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        wait_for_port(port, Duration::from_secs(20), "chromedriver");
        Self { child, url: format!("http://127.0.0.1:{port}") }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, chromium: &Path, profile: &Path) -> Client {
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium.display().to_string(),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--hide-scrollbars", "--force-device-scale-factor=1",
                     format!("--user-data-dir={}", profile.display())],
        },
    });
    let caps = match caps {
        Value::Object(map) => map,
        _ => unreachable!("a JSON object"),
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector).capabilities(caps).connect(&driver.url).await.expect("a chromium session")
}

/// Runs `script` (WebDriver execute: `arguments[i]` are `args`) and returns its value.
async fn js(c: &Client, script: &str, args: Vec<Value>) -> Value {
    c.execute(script, args).await.unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Moves to a console route (a hash change: the page, its session and its listeners stay).
async fn go(c: &Client, hash: &str) {
    // The browser may write some characters of the fragment percent-encoded: wait for its spelling.
    let hash = js(c, "location.hash = arguments[0]; return location.hash;", vec![json!(hash)]).await;
    wait_rendered(c, hash.as_str().unwrap_or("")).await;
}

/// Waits until the page the browser is on now (after a click on a link) is rendered.
async fn wait_current(c: &Client) {
    let hash = js(c, "return location.hash;", vec![]).await;
    wait_rendered(c, hash.as_str().unwrap_or("")).await;
}

/// Waits until the view shows the page of `hash`, loaded.
async fn wait_rendered(c: &Client, hash: &str) {
    let script = "const v = document.getElementById('view'); \
                  return !!v && v.dataset.hash === arguments[0] && v.getAttribute('aria-busy') === 'false' \
                    && location.hash === arguments[0];";
    let deadline = Instant::now() + Duration::from_secs(15);
    while js(c, script, vec![json!(hash)]).await != Value::Bool(true) {
        assert!(Instant::now() < deadline, "the console did not render {hash}: {}", view_text(c).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many times the console has rendered a page.
async fn generation(c: &Client) -> u64 {
    let n =
        js(c, "const v = document.getElementById('view'); return v ? Number(v.dataset.generation || 0) : 0;", vec![])
            .await;
    n.as_u64().unwrap_or(0)
}

/// Waits until the page has been rendered again after `before` (an action's refresh) and is loaded.
async fn wait_refreshed(c: &Client, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let busy = js(
            c,
            "const v = document.getElementById('view'); return !v || v.getAttribute('aria-busy') !== 'false';",
            vec![],
        )
        .await;
        if generation(c).await > before && busy == Value::Bool(false) {
            return;
        }
        assert!(Instant::now() < deadline, "the page was not refreshed after the action");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn view_text(c: &Client) -> String {
    js(c, "const v = document.getElementById('view'); return v ? v.innerText : '';", vec![])
        .await
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// Waits until the element at `css` shows `needle`; returns its text.
async fn wait_text(c: &Client, css: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = js(c, "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", vec![json!(css)])
            .await;
        let t = t.as_str().unwrap_or("").to_owned();
        if t.contains(needle) {
            return t;
        }
        assert!(Instant::now() < deadline, "{css} never showed {needle:?}; it shows {t:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fill(c: &Client, css: &str, value: &str) {
    let field = c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
    field.clear().await.expect("clear");
    field.send_keys(value).await.expect("type");
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).click().await.expect("click");
}

/// A screenshot of the whole page at `width` px, as `target/console-screenshots/{name}.png`.
async fn shot(c: &Client, name: &str, width: u32) -> PathBuf {
    c.set_window_size(width, 900).await.expect("window size");
    let height = js(c, "return document.documentElement.scrollHeight;", vec![]).await.as_u64().unwrap_or(900);
    let height = u32::try_from(height).unwrap_or(4000).clamp(600, 4000);
    // The window's frame takes part of the height: ask for more, the screenshot is the viewport.
    c.set_window_size(width, height + 140).await.expect("window size");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let dir = screenshots_dir();
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, &png).expect("write screenshot");
    c.set_window_size(1280, 900).await.expect("window size");
    println!("screenshot {} ({} bytes)", path.display(), png.len());
    path
}

/// Nothing injected ran or even tried to: no flag set, no alert, no element made from the
/// strings (img, extra script), no CSP violation reported; and each string shows as text.
async fn assert_inert(c: &Client, page: &str, shown: &[&str]) {
    let state = js(
        c,
        "return { xss: typeof window.__xss, alerted: !!window.__alerted, imgs: document.images.length, \
                  scripts: document.scripts.length, csp: window.__csp || null };",
        vec![],
    )
    .await;
    assert_eq!(state["xss"], "undefined", "{page}: injected code ran: {state}");
    assert_eq!(state["alerted"], false, "{page}: an alert was raised: {state}");
    assert_eq!(state["imgs"], 0, "{page}: an <img> was made from data: {state}");
    assert_eq!(state["scripts"], 1, "{page}: a <script> was made from data: {state}");
    assert_eq!(state["csp"], json!([]), "{page}: CSP violations (something tried to run): {state}");
    let text = view_text(c).await;
    for s in shown {
        assert!(text.contains(s), "{page}: {s:?} is not shown literally:\n{text}");
    }
}

fn v1_purchase(order: &str) -> std::collections::BTreeMap<String, String> {
    let mut p = fixture_params("v1/01-newInstance-stored-value-cards.json");
    p.insert("orderId".into(), order.into());
    p.insert("businessId".into(), uuid::Uuid::new_v4().to_string());
    p.insert("customerId".into(), CUSTOMER.into());
    p
}

fn hour(ago: i64) -> String {
    let t = (chrono::Utc::now().timestamp() - ago * 3600).div_euclid(3600) * 3600;
    chrono::DateTime::from_timestamp(t, 0).unwrap().format("%Y%m%dT%H%M%SZ").to_string()
}

fn usage(instance: &str, ago: i64, sn: &str) -> Value {
    json!({"instance_id": instance, "begin_time": hour(ago), "end_time": hour(ago - 1), "usage_value": "2.5", "metering_sn": sn})
}

/// The gateway and its loopback neighbours, set up as the scenario needs them.
struct World {
    gw: TestGateway,
    billing: Billing,
    usage_api: UsageApi,
    /// While set, the billing core refuses ORDER_DEAD's event.
    refuse: Arc<AtomicBool>,
    instance_ok: String,
}

async fn world() -> World {
    let refuse = Arc::new(AtomicBool::new(true));
    let r = Arc::clone(&refuse);
    let billing = Billing::start(move |_, _, event| {
        let text = event.to_string();
        if text.contains('<') || (text.contains(ORDER_DEAD) && r.load(Ordering::SeqCst)) {
            (400, Duration::ZERO)
        } else {
            ok()
        }
    })
    .await;
    let usage_api = UsageApi::start(|_, records| {
        if records.iter().any(|r| r["metering_sn"].as_str().is_some_and(|s| s.contains('<'))) {
            kooapi::refused("metering_sn is not valid")
        } else {
            kooapi::taken()
        }
    })
    .await;
    let (billing_url, usage_url) = (billing.url(), usage_api.url());
    let gw = TestGateway::start_with(
        Backend::Redis,
        "console",
        &[
            ("KOOGATE_ADMIN_TOKEN", TOKEN),
            ("KOOGATE_BILLING_URL", &billing_url),
            ("KOOGATE_BILLING_SECRET", SECRET),
            ("KOOGATE_RETRY_INITIAL_MS", "100"),
            ("KOOGATE_RETRY_MAX_MS", "500"),
            ("KOOGATE_MARKETPLACE_URL", &usage_url),
            ("KOOGATE_USAGE_POLL_MS", "20"),
        ],
    )
    .await;
    let mut instance_ok = String::new();
    for order in [ORDER_OK, ORDER_DEAD, ORDER_SCRIPT, ORDER_IMG] {
        let res = gw.v1(&v1_purchase(order)).await;
        let answer = res.json().unwrap_or(Value::Null);
        assert_eq!(answer["resultCode"], "000000", "{order}: {answer}");
        if order == ORDER_OK {
            instance_ok = answer["instanceId"].as_str().expect("an instance id").to_owned();
        }
    }
    let admin = |path: &'static str| gw.admin_json(hyper::Method::GET, path, Some(TOKEN), bytes::Bytes::new());
    wait_until("three dead letters", Duration::from_secs(20), async || {
        admin("/v1/dlq").await.1["dead_letters"].as_array().is_some_and(|d| d.len() == 3)
    })
    .await;
    billing.wait_delivered(1, Duration::from_secs(20)).await;
    // The operator's own app redeems the stored-value cards of one order: the order page shows it.
    let redeem = json!({"customer_id": CUSTOMER, "redeemed_by": "console-test"}).to_string();
    let path = format!("/v1/orders/{ORDER_OK}/redeem");
    let (status, answer) = gw.admin_json(hyper::Method::POST, &path, Some(TOKEN), redeem).await;
    assert_eq!(status, 200, "{answer}");
    let records =
        vec![usage(&instance_ok, 6, SN_OK), usage(&instance_ok, 5, SN_SCRIPT), usage(&instance_ok, 4, SN_IMG)];
    let (status, answer) =
        gw.admin_json(hyper::Method::POST, "/v1/usage", Some(TOKEN), json!({ "records": records }).to_string()).await;
    assert_eq!((status, &answer["accepted"]), (200, &json!(3)), "{answer}");
    wait_until("two dead usage records", Duration::from_secs(20), async || {
        admin("/v1/usage/dlq").await.1["dead_letters"].as_array().is_some_and(|d| d.len() == 2)
    })
    .await;
    World { gw, billing, usage_api, refuse, instance_ok }
}

/// The console's files carry their security headers on the real listener (no browser needed).
async fn check_headers(gw: &TestGateway) {
    for (path, kind) in
        [("/console", "text/html"), ("/console/app.js", "text/javascript"), ("/console/app.css", "text/css")]
    {
        let url = format!("http://{}{path}", gw.running().admin_addr);
        let res = reqwest::get(&url).await.expect("the console answers");
        let header = |n: &str| res.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert_eq!(res.status(), 200, "{path}");
        assert!(header("content-type").starts_with(kind), "{path}: {}", header("content-type"));
        assert_eq!(header("content-security-policy"), koogate::console::CONTENT_SECURITY_POLICY, "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("referrer-policy"), "no-referrer");
        assert_eq!(header("cache-control"), "no-store");
        assert!(header("set-cookie").is_empty(), "no cookie");
    }
    // The files need no token; the data does.
    let (status, _) = gw.admin_json(hyper::Method::GET, "/v1/dlq", None, bytes::Bytes::new()).await;
    assert_eq!(status, 401);
}

/// The scenario in the browser. Returns the screenshots written.
async fn drive(c: &Client, w: &World) -> Vec<(PathBuf, &'static str)> {
    let mut shots = Vec::new();
    let base = format!("http://{}/console", w.gw.running().admin_addr);
    c.goto(&base).await.expect("open the console");
    // Record anything the page's policy refuses, and any alert, from here on (hash routes keep this window).
    js(
        c,
        "window.__csp = []; document.addEventListener('securitypolicyviolation', \
           (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI)); \
         window.alert = () => { window.__alerted = true; };",
        vec![],
    )
    .await;
    c.wait().for_element(Locator::Css("#login:not([hidden])")).await.expect("the login form");
    shots.push((shot(c, "01-login-desktop", 1280).await, "the login form (desktop, 1280 px)"));

    // A wrong token is refused and not kept; the right one opens the events page.
    fill(c, "#token", "not-the-token").await;
    click(c, "#login button[type=submit]").await;
    wait_text(c, "#login-error", "refused").await;
    assert_eq!(js(c, "return sessionStorage.getItem(arguments[0]);", vec![json!(TOKEN_KEY)]).await, Value::Null);
    fill(c, "#token", TOKEN).await;
    click(c, "#login button[type=submit]").await;
    wait_rendered(c, "#/events").await;
    let cookies = js(c, "return document.cookie + '|' + localStorage.length;", vec![]).await;
    assert_eq!(cookies, "|0", "the token is in sessionStorage only");

    // Find the dead event by its order id.
    fill(c, "#f-order_id", ORDER_DEAD).await;
    click(c, "#events-form button[type=submit]").await;
    let hash = format!("#/events?order_id={ORDER_DEAD}&limit=100");
    wait_rendered(c, &hash).await;
    let row = wait_text(c, "table.events tbody", ORDER_DEAD).await;
    assert!(row.contains("dead") && row.contains("billing core answered HTTP 400"), "{row}");
    shots.push((shot(c, "02-events-desktop", 1280).await, "events filtered by order id: the dead purchase event"));

    // Open it, redrive it (the billing core takes it now), see it delivered.
    click(c, "table.events tbody tr td a").await;
    let event_hash = js(c, "return location.hash;", vec![]).await.as_str().unwrap_or("").to_owned();
    assert!(event_hash.starts_with("#/events/"), "{event_hash}");
    wait_rendered(c, &event_hash).await;
    let facts = wait_text(c, "#view", "subscription.created").await;
    assert!(facts.contains(ORDER_DEAD) && facts.contains("dead"), "{facts}");
    shots.push((
        shot(c, "03-event-dead-desktop", 1280).await,
        "one dead event: facts, attempts, event body, Redrive button",
    ));
    w.refuse.store(false, Ordering::SeqCst);
    click(c, "#redrive").await;
    wait_text(c, "#view dd[data-key=status]", "delivered").await;
    assert!(
        w.billing.delivered().iter().any(|a| a.event.to_string().contains(ORDER_DEAD)),
        "the billing core got the redriven event"
    );
    shots.push((shot(c, "04-event-delivered-desktop", 1280).await, "the same event after Redrive: delivered"));

    // Dead letters: the two events whose order ids carry markup, shown as text.
    // From the navigation bar, as an operator would.
    click(c, "#nav a[data-page=dead]").await;
    wait_current(c).await;
    let listed = wait_text(c, "table.dead tbody", ORDER_SCRIPT).await;
    assert!(listed.contains(ORDER_IMG) && !listed.contains(ORDER_DEAD), "{listed}");
    assert_eq!(
        js(c, "return document.querySelectorAll('table.dead tbody input[type=checkbox]').length;", vec![]).await,
        2
    );
    assert_inert(c, "dead letters", &[ORDER_SCRIPT, ORDER_IMG]).await;
    shots.push((
        shot(c, "05-dead-letters-desktop", 1280).await,
        "dead letters: checkboxes, Redrive selected/all, Recover since; order ids with markup shown as text",
    ));
    // Redriving them: the billing core refuses them again, they come back.
    click(c, "#select-all").await;
    let before = generation(c).await;
    click(c, "#redrive-selected").await;
    wait_text(c, "#flash", "Redriven: 2").await;
    wait_refreshed(c, before).await;
    // Recover since a time: every event that died since then back into the outbox.
    js(c, "document.getElementById('f-since').value = '2026-01-01T00:00';", vec![]).await;
    click(c, "#recover-form button[type=submit]").await;
    let recovered = wait_text(c, "#flash", "ecover").await;
    assert!(recovered.contains("Recovered"), "{recovered}");

    // The events page and one event with markup in the order id.
    let hash = format!("#/events?order_id={}", urlencode(ORDER_IMG));
    go(c, &hash).await;
    // The recovery asked the dead-letters page to refresh in 800 ms; moving on must cancel that,
    // or the timer re-renders this page under the operator (a form being filled in is wiped).
    let shown = generation(c).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(generation(c).await, shown, "a refresh asked for on the dead-letters page re-rendered the next page");
    wait_text(c, "table.events tbody", ORDER_IMG).await;
    assert_inert(c, "events (markup order id)", &[ORDER_IMG]).await;
    click(c, "table.events tbody tr td a").await;
    let h = js(c, "return location.hash;", vec![]).await.as_str().unwrap_or("").to_owned();
    wait_rendered(c, &h).await;
    wait_text(c, "#view", "subscription.created").await;
    assert_inert(c, "event (markup order id)", &[ORDER_IMG]).await;

    // Orders: facts and stored-value redemption status; then the order id with a script in it.
    go(c, "#/orders").await;
    fill(c, "#f-order_id", ORDER_OK).await;
    fill(c, "#f-customer_id", CUSTOMER).await;
    click(c, "#orders-form button[type=submit]").await;
    wait_rendered(c, &format!("#/orders?order_id={ORDER_OK}&customer_id={CUSTOMER}")).await;
    let order = wait_text(c, "#redemption", "Stored value redeemed at").await;
    assert!(order.contains("by console-test"), "{order}");
    let order = view_text(c).await;
    assert!(
        order.contains(ORDER_OK) && order.contains(&w.instance_ok) && order.contains("stored_value_card"),
        "{order}"
    );
    shots.push((shot(c, "06-orders-desktop", 1280).await, "an order: facts, redemption status, instances, settlement"));
    go(c, &format!("#/orders?order_id={}&customer_id={CUSTOMER}", urlencode(ORDER_SCRIPT))).await;
    wait_text(c, "#view h2", ORDER_SCRIPT).await;
    wait_text(c, "#redemption", "Stored value not redeemed").await;
    assert_inert(c, "orders (markup order id)", &[ORDER_SCRIPT]).await;
    shots.push((
        shot(c, "07-orders-markup-desktop", 1280).await,
        "the order whose id carries a <script>: shown as text",
    ));

    // Accounts, paged, and one instance.
    go(c, &format!("#/accounts?customer_id={CUSTOMER}&limit=20")).await;
    let account = wait_text(c, "table.instances tbody", &w.instance_ok).await;
    assert!(account.contains(ORDER_OK) && account.contains(ORDER_DEAD), "both delivered purchases: {account}");
    shots.push((shot(c, "08-accounts-desktop", 1280).await, "an account: its instances, newest first, with paging"));
    // Two a page: the second page has the two oldest purchases.
    go(c, &format!("#/accounts?customer_id={CUSTOMER}&limit=2")).await;
    wait_text(c, "#view .count", "instances 1–2 of 4").await;
    click(c, "#next").await;
    wait_current(c).await;
    let older = wait_text(c, "#view", "instances 3–4 of 4").await;
    assert!(older.contains(ORDER_OK) && older.contains(ORDER_DEAD) && !older.contains(ORDER_IMG), "{older}");
    assert!(c.find(Locator::Css("#prev")).await.is_ok(), "a link back to the newer page");
    go(c, &format!("#/instances/{}", w.instance_ok)).await;
    wait_text(c, "#view", ORDER_OK).await;
    shots.push((
        shot(c, "09-instance-desktop", 1280).await,
        "one instance: facts, account, usage per item, order lines, events",
    ));

    // Usage: gauges, the dead usage records (markup metering_sn), one record, one instance.
    go(c, &format!("#/usage?sn={}", urlencode(SN_SCRIPT))).await;
    wait_text(c, "#usage-record", SN_SCRIPT).await;
    let dead = wait_text(c, "table.usage-dead tbody", SN_IMG).await;
    assert!(dead.contains(SN_SCRIPT) && dead.contains("MKT.0100"), "{dead}");
    assert_inert(c, "usage (markup metering_sn)", &[SN_SCRIPT, SN_IMG]).await;
    // Redriving the dead usage records: KooGallery refuses them again.
    js(
        c,
        "document.querySelectorAll('table.usage-dead tbody input[type=checkbox]').forEach((b) => b.click());",
        vec![],
    )
    .await;
    let before = generation(c).await;
    click(c, "#usage-redrive-selected").await;
    wait_text(c, "#flash", "Redriven: 2").await;
    wait_refreshed(c, before).await;
    shots.push((
        shot(c, "10-usage-desktop", 1280).await,
        "usage: gauges, a record by metering_sn, dead usage records; metering_sn with markup shown as text",
    ));
    go(c, &format!("#/usage?instance_id={}", w.instance_ok)).await;
    let per_instance = view_text(c).await;
    assert!(
        per_instance.contains(SN_OK)
            && per_instance.contains("accepted total")
            && per_instance.contains("pushed total"),
        "per-instance usage: counts, totals and records: {per_instance}"
    );
    assert_inert(c, "usage of an instance", &[]).await;
    shots.push((shot(c, "11-usage-instance-desktop", 1280).await, "usage of one instance: counts, totals, records"));

    // Phone width: the pages reflow, tables scroll sideways.
    go(c, "#/events").await;
    c.set_window_size(390, 844).await.expect("phone size");
    let width = js(c, "return window.innerWidth;", vec![]).await.as_u64().unwrap_or(0);
    assert!(width <= 420, "the phone-width window is {width} px wide");
    let overflow = js(c, "return document.documentElement.scrollWidth - window.innerWidth;", vec![]).await;
    assert!(overflow.as_i64().is_some_and(|o| o <= 0), "the page itself scrolls sideways at phone width: {overflow}");
    shots.push((shot(c, "12-events-phone", 390).await, "events at phone width (390 px)"));
    go(c, &event_hash).await;
    shots.push((shot(c, "13-event-phone", 390).await, "the delivered event at phone width"));
    go(c, "#/usage").await;
    shots.push((shot(c, "14-usage-phone", 390).await, "usage at phone width"));
    go(c, "#/dead").await;
    shots.push((shot(c, "15-dead-letters-phone", 390).await, "dead letters at phone width"));

    // Logout forgets the token; a refused token (401) sends back to the login form.
    click(c, "#logout").await;
    c.wait().for_element(Locator::Css("#login:not([hidden])")).await.expect("the login form after logout");
    assert_eq!(js(c, "return sessionStorage.getItem(arguments[0]);", vec![json!(TOKEN_KEY)]).await, Value::Null);
    js(c, "sessionStorage.setItem(arguments[0], 'stale-token'); location.hash = '#/usage';", vec![json!(TOKEN_KEY)])
        .await;
    wait_text(c, "#login-error", "sign in again").await;
    assert_eq!(js(c, "return sessionStorage.getItem(arguments[0]);", vec![json!(TOKEN_KEY)]).await, Value::Null);
    assert_inert(c, "after logout", &[]).await;
    shots
}

fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser_and_shows_caller_strings_as_text() {
    let w = world().await;
    check_headers(&w.gw).await;
    let required = std::env::var("REQUIRE_BROWSER_TEST").is_ok_and(|v| !v.is_empty() && v != "0");
    let (Some(chromium), Some(chromedriver)) =
        (on_path(&["chromium", "chromium-browser", "google-chrome"]), on_path(&["chromedriver"]))
    else {
        let banner = "!".repeat(78);
        // Straight to the process's stderr: the test harness would swallow eprintln! of a passing test.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n{banner}\n!! tests/console.rs: chromium or chromedriver is not installed: the browser test of\n\
             !! the operator console DID NOT RUN (apt-get install chromium chromium-driver; scripts/test does).\n{banner}\n"
        );
        assert!(!required, "REQUIRE_BROWSER_TEST is set but chromium/chromedriver are missing");
        w.gw.stop().await;
        return;
    };
    // A failure screenshot from an earlier run would only mislead.
    let _ = std::fs::remove_file(screenshots_dir().join("failure.png"));
    let driver = Driver::start(&chromedriver);
    let profile = tempfile::tempdir().expect("a profile dir");
    let c = browser(&driver, &chromium, profile.path()).await;
    // Run the scenario and close the browser whatever happened, then report.
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(drive(&c, &w))).await;
    if outcome.is_err() {
        // What the page showed when the scenario failed, for whoever reads the failure.
        if let Ok(png) = c.screenshot().await {
            let path = screenshots_dir().join("failure.png");
            let _ = std::fs::create_dir_all(screenshots_dir()).and_then(|()| std::fs::write(&path, png));
            eprintln!("the page at the failure: {}", path.display());
        }
    }
    let _ = c.close().await;
    drop(driver);
    let World { gw, billing, usage_api, .. } = w;
    billing.stop();
    usage_api.stop();
    gw.stop().await;
    match outcome {
        Ok(shots) => {
            println!("console screenshots:");
            for (path, what) in &shots {
                println!("  {}: {what}", path.display());
            }
            assert!(shots.len() >= 12, "a screenshot of each page");
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
