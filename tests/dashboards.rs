//! The Grafana dashboard and the Prometheus alert rules under deploy/ use only
//! metrics the gateway really exports.
//!
//! A gateway on Redis delivering to the reference billing sink gets good calls,
//! a retry and a bad signature; a second gateway on a private Redis that is put
//! to sleep (`DEBUG SLEEP`) produces store timeouts and overload rejections;
//! a third one pushes usage records to a KooGallery usage API on loopback that
//! takes some and refuses one.
//! Then every `koogate_*` name in the dashboard's PromQL and in alerts.yml must
//! be a sample of the `/metrics` exposition: a counter or gauge by its own
//! name, a histogram by `<name>_bucket`, `_sum` or `_count`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::kooapi::{self, UsageApi};
use common::*;
use serde_json::{json, Value};

const DASHBOARD: &str = "deploy/grafana/dashboards/koogate.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const SINK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every identifier `koogate_[a-z0-9_]+` in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("koogate_") {
        let start = i + pos;
        let mut end = start + "koogate_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_')
        {
            end += 1;
        }
        let standalone = (start == 0 || !ident(bytes[start - 1])) && (end == bytes.len() || !ident(bytes[end]));
        if standalone && end > start + "koogate_".len() {
            out.push(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// PromQL of the dashboard: every panel target's `expr` (rows nest panels)
/// and the query of every query variable, with where it was found.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(map) => {
                let path = match map.get("title") {
                    Some(Value::String(title)) => format!("{path} {title:?}"),
                    _ => path.to_owned(),
                };
                if let Some(Value::String(expr)) = map.get("expr") {
                    out.push((path.clone(), expr.clone()));
                }
                for (k, child) in map {
                    walk(child, &format!("{path}.{k}"), out);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    walk(child, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], "panels", &mut out);
    let variables = dashboard["templating"]["list"].as_array().cloned().unwrap_or_default();
    for var in variables.iter().filter(|v| v["type"] == "query") {
        let query = match &var["query"] {
            Value::String(q) => q.clone(),
            other => other["query"].as_str().unwrap_or_default().to_owned(),
        };
        out.push((format!("variable {}", var["name"]), query));
    }
    out
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The `expr:` values of a Prometheus rule file: plain scalars, quoted, or
/// block scalars (`|`, `>`) continued by more-indented lines.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start().trim_start_matches("- ");
        i += 1;
        let Some(rest) = trimmed.strip_prefix("expr:") else { continue };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let mut block = String::new();
            while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > indent(line)) {
                block.push_str(lines[i].trim());
                block.push('\n');
                i += 1;
            }
            out.push(block);
        } else {
            out.push(rest.trim_matches(|c| c == '"' || c == '\'').to_owned());
        }
    }
    out
}

/// `# TYPE` of every metric family and the name of every sample line.
struct Exposition {
    types: BTreeMap<String, String>,
    samples: BTreeSet<String>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut types = BTreeMap::new();
        let mut samples = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_owned(), kind.to_owned());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                samples.insert(name.to_owned());
            }
        }
        Self { types, samples }
    }

    /// Why `name`, as a query writes it, is not a series this exposition has (None: it is).
    fn problem(&self, name: &str) -> Option<String> {
        if !self.samples.contains(name) {
            return Some(match self.types.get(name).map(String::as_str) {
                Some("histogram" | "summary") => {
                    format!("{name} is a histogram: query {name}_bucket, {name}_sum or {name}_count")
                }
                _ => format!("{name} has no sample in /metrics"),
            });
        }
        if let Some(kind) = self.types.get(name) {
            return (!matches!(kind.as_str(), "counter" | "gauge" | "untyped"))
                .then(|| format!("{name} is a {kind}, queried by its family name"));
        }
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s))?;
        match self.types.get(family).map(String::as_str) {
            Some("histogram") => None,
            Some("summary") if !name.ends_with("_bucket") => None,
            Some(kind) => Some(format!("{name}: {family} is a {kind}, not a histogram")),
            None => Some(format!("{name} has no # TYPE line for {family}")),
        }
    }
}

/// Store timeouts (`koogate_store_errors_total`) and overload rejections
/// (`koogate_overload_rejections_total`): one call in flight at most, the
/// store asleep for longer than the store timeout, three calls at once.
async fn produce_store_errors_and_overload() {
    let redis = OwnRedis::start_with(&["--enable-debug-command", "local"]);
    let gw = TestGateway::start_on(
        Backend::Redis,
        "dashboards-faults",
        &redis.url(),
        &[("KOOGATE_MAX_INFLIGHT", "1"), ("KOOGATE_STORE_TIMEOUT_SECS", "1")],
    )
    .await;
    let (mut overloaded, mut store_failed) = (false, false);
    for _ in 0..3 {
        let asleep = redis.sleep(2.5).await;
        let (a, b, c) = tokio::join!(
            gw.v2_fixture("v2/01-newInstance.json"),
            gw.v2_fixture("v2/09-orderNotify.json"),
            gw.v2_fixture("v2/04-refreshInstance-renewal.json"),
        );
        for res in [a, b, c] {
            let code = res.result_code();
            overloaded |= res.status == 503 && code.as_deref() == Some("000005");
            store_failed |= res.status == 200 && code.as_deref() == Some("000005");
        }
        asleep.await.unwrap();
        if overloaded && store_failed {
            break;
        }
    }
    assert!(overloaded, "a call beyond KOOGATE_MAX_INFLIGHT=1 is answered 503/000005");
    assert!(store_failed, "a call on a store asleep past KOOGATE_STORE_TIMEOUT_SECS is answered 000005");
    tokio::time::timeout(Duration::from_secs(20), gw.stop()).await.expect("the faults gateway stops");
}

/// The usage push series (`koogate_usage_*`): records posted with every
/// verdict (accepted, duplicate, rejected), pushed to a KooGallery usage API on
/// loopback that takes them but one, which it refuses (a split batch, a
/// dead letter). Metrics are process-wide: the main gateway's /metrics shows them.
async fn produce_usage_push() {
    const TOKEN: &str = "dashboards-usage-token-0123456789";
    let api = UsageApi::start(|_, records| {
        if records.iter().any(|r| r["metering_sn"] == "dash-u-bad") {
            kooapi::refused("instance does not exist")
        } else {
            kooapi::taken()
        }
    })
    .await;
    let url = api.url();
    let gw = TestGateway::start_with(
        Backend::Redis,
        "dashboards-usage",
        &[("KOOGATE_ADMIN_TOKEN", TOKEN), ("KOOGATE_MARKETPLACE_URL", url.as_str()), ("KOOGATE_USAGE_POLL_MS", "20")],
    )
    .await;
    let bought = gw.v2_fixture("v2/01-newInstance.json").await;
    let instance =
        bought.json().expect("newInstance answers JSON")["instanceId"].as_str().expect("an instanceId").to_owned();
    let hour = |h: i64| {
        let day = (chrono::Utc::now().timestamp() - 2 * 86_400).div_euclid(86_400) * 86_400; // within 20 days
        let t = chrono::DateTime::from_timestamp(day + h * 3600, 0).unwrap();
        t.format("%Y%m%dT%H%M%SZ").to_string()
    };
    let usage = |from: i64, to: i64, sn: &str| {
        let (begin, end) = (hour(from), hour(to));
        json!({"instance_id": instance, "begin_time": begin, "end_time": end, "usage_value": "1", "metering_sn": sn})
    };
    let rec = |h: i64, sn: &str| usage(h, h + 1, sn);
    let auth = format!("Bearer {TOKEN}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let post = |records: Vec<Value>| {
        let body = bytes::Bytes::from(json!({ "records": records }).to_string());
        gw.admin.send(hyper::Method::POST, "/v1/usage", &headers, body)
    };
    let first = post(vec![rec(0, "dash-u-0"), rec(1, "dash-u-1"), rec(2, "dash-u-bad")]).await.expect("answered");
    assert_eq!(first.status, 200, "{}", String::from_utf8_lossy(&first.body));
    // A duplicate (same metering_sn again) and a rejected record (it ends before it begins).
    let second = post(vec![rec(0, "dash-u-0"), usage(5, 4, "dash-u-backwards")]).await.expect("answered");
    assert_eq!(second.status, 200, "{}", String::from_utf8_lossy(&second.body));
    api.wait_records(2, Duration::from_secs(15)).await;
    wait_until(
        "the refused usage record never reached the usage dead-letter list",
        Duration::from_secs(15),
        async || gw.metrics().await.contains("koogate_usage_refused_total{"),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(20), gw.stop()).await.expect("the usage gateway stops");
    api.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    // What the dashboard and the alerts query.
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let panel_exprs = dashboard_exprs(&dashboard);
    assert!(panel_exprs.len() >= 15, "{DASHBOARD}: only {} PromQL expressions found", panel_exprs.len());
    for (place, expr) in &panel_exprs {
        for name in metric_names(expr) {
            wanted.entry(name).or_default().insert(format!("{DASHBOARD} {place}"));
        }
    }
    let alerts = read(ALERTS);
    let alert_exprs = rule_exprs(&alerts);
    let alert_names: Vec<&str> =
        alerts.lines().filter_map(|l| l.trim_start().strip_prefix("- alert:")).map(str::trim).collect();
    assert!(alert_names.len() >= 4, "{ALERTS}: only {} alerts found", alert_names.len());
    assert_eq!(alert_exprs.len(), alert_names.len(), "{ALERTS}: every alert has one expr that was read");
    for (alert, expr) in alert_names.iter().zip(&alert_exprs) {
        let names = metric_names(expr);
        if !expr.contains("up{") {
            assert!(!names.is_empty(), "{ALERTS}: {alert} queries no koogate metric: {expr}");
        }
        for name in names {
            wanted.entry(name).or_default().insert(format!("{ALERTS} {alert}"));
        }
    }
    assert!(wanted.len() >= 10, "only {} distinct metric names referenced: {:?}", wanted.len(), wanted.keys());

    // A gateway with traffic of every kind, delivering to the reference sink.
    let sink =
        koogate::tools::sink::start(koogate::tools::sink::SinkConfig::new("127.0.0.1:0".parse().unwrap(), SINK_SECRET))
            .await
            .expect("the sink starts");
    let billing_url = format!("http://{}/events", sink.addr);
    let gw = TestGateway::start_with(
        Backend::Redis,
        "dashboards",
        &[("KOOGATE_BILLING_URL", billing_url.as_str()), ("KOOGATE_BILLING_SECRET", SINK_SECRET)],
    )
    .await;
    let first = gw.v2_fixture("v2/01-newInstance.json").await;
    assert_eq!(first.result_code().as_deref(), Some("000000"), "newInstance: {:?}", first.json());
    let retry = gw.v2_fixture("v2/01-newInstance.json").await;
    assert_eq!(retry.result_code().as_deref(), Some("000000"), "a retried newInstance gets the kept answer");
    let renewal = gw.v2_fixture("v2/04-refreshInstance-renewal.json").await;
    assert_eq!(renewal.result_code().as_deref(), Some("000000"), "renewal: {:?}", renewal.json());
    let forged = gw.client.v2("/koogallery/v2", "wrong-key", &fixture("v2/01-newInstance.json"), now_ms()).await;
    assert_eq!(forged.expect("answered").result_code().as_deref(), Some("000001"), "a bad signature is refused");
    gw.drain().await;

    produce_store_errors_and_overload().await;
    produce_usage_push().await;

    // Gauges are set by background tasks every 2-5 s: scrape until all are there, 15 s at most.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (text, problems) = loop {
        let text = gw.metrics().await;
        let exposition = Exposition::parse(&text);
        let problems: Vec<String> = wanted
            .iter()
            .filter_map(|(name, places)| {
                exposition.problem(name).map(|why| {
                    let places: Vec<&str> = places.iter().map(String::as_str).take(3).collect();
                    format!("{why} (used in {})", places.join(", "))
                })
            })
            .collect();
        if problems.is_empty() || Instant::now() >= deadline {
            break (text, problems);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("koogate_"))
        .collect();
    assert!(
        problems.is_empty(),
        "the dashboard or the alert rules query metrics the gateway does not export:\n  {}\nexported families: {exported:?}",
        problems.join("\n  ")
    );
    let unused: Vec<&str> = exported
        .iter()
        .copied()
        .filter(|family| {
            !wanted.keys().any(|w| w == family || w.strip_prefix(family).is_some_and(|s| s.starts_with('_')))
        })
        .collect();
    if !unused.is_empty() {
        eprintln!("exported but on no dashboard panel or alert: {unused:?}");
    }

    gw.stop().await;
    sink.stop().await;
}

#[test]
fn metric_names_and_rule_exprs_are_read_as_written() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(koogate_request_duration_seconds_bucket{instance=~"$i"}[5m]))) / koogate_ready"#
        ),
        ["koogate_request_duration_seconds_bucket", "koogate_ready"]
    );
    assert!(metric_names("my_koogate_thing + koogate_ + xkoogate_ready").is_empty());
    let yaml = "groups:\n  - rules:\n      - alert: A\n        expr: |\n          sum(koogate_a)\n          and koogate_b\n        for: 5m\n      - alert: B\n        expr: 'koogate_c > 0'\n";
    assert_eq!(rule_exprs(yaml), ["sum(koogate_a)\nand koogate_b\n", "koogate_c > 0"]);
    let exposition = Exposition::parse(
        "# TYPE koogate_x_total counter\nkoogate_x_total{a=\"b\"} 1\n# TYPE koogate_h_seconds histogram\nkoogate_h_seconds_bucket{le=\"+Inf\"} 1\nkoogate_h_seconds_sum 0.1\nkoogate_h_seconds_count 1\n",
    );
    assert_eq!(exposition.problem("koogate_x_total"), None);
    assert_eq!(exposition.problem("koogate_h_seconds_bucket"), None);
    assert_eq!(exposition.problem("koogate_h_seconds_count"), None);
    assert!(exposition.problem("koogate_h_seconds").is_some(), "a histogram is queried by its series");
    assert!(exposition.problem("koogate_x_total_count").is_some());
    assert!(exposition.problem("koogate_missing_total").is_some());
}
