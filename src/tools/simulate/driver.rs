//! The scenario driver: calls a gateway exactly as KooGallery does (signed
//! with the product's access key by [`KooClient`]), retries what KooGallery
//! retries, and checks every answer.
//!
//! KooGallery retries a call that got no answer, a transport error, a status
//! other than 200, or `000005` (about hourly, for hours); here the schedule is
//! compressed ([`RetryPolicy`]). Every attempt has a fresh timestamp and nonce,
//! and a newInstance a new `businessId`.
//!
//! Protocol violations: an unsigned or mis-signed answer (every `Body-Sign` is
//! checked with [`verify_body_sign`]), a non-JSON body, a `resultCode` other
//! than expected, a successful newInstance without `instanceId` or
//! `appInfo.frontEndUrl` or with an id other than its order line's
//! ([`crate::store::keys::instance_id_for`]), a retried newInstance answered with another
//! `instanceId`, a retry not answered byte for byte as the first call, and no
//! usable answer once the retries are spent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use super::orders::{is_run_id, new_run_id};
use super::report::{CallRecord, Report, ScenarioReport, Skipped};
use super::scenario::{Rendered, Scenario, Step, NAMES};
use super::usage::parse_decimal_e4;
use super::usage_flow::{self, UsageTarget};
use super::SimulateError;
use crate::backoff::Schedule;
use crate::protocol::sign::verify_body_sign;
use crate::secret::Secret;
use crate::tools::client::{CallResponse, ClientError, KooClient};

/// The gateway under test.
#[derive(Clone, Debug)]
pub struct GatewayTarget {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub v2_path: String,
    pub v1_path: String,
    /// The product's access key (KooGallery signs calls and checks answers with it).
    pub access_key: Secret,
}

impl GatewayTarget {
    /// With the default paths `/koogallery/v2` and `/koogallery/v1`.
    pub fn new(url: &str, access_key: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_owned(),
            v2_path: "/koogallery/v2".into(),
            v1_path: "/koogallery/v1".into(),
            access_key: Secret::new(access_key),
        }
    }
}

/// KooGallery's retries, compressed: `retries` more attempts, waiting
/// `first_delay`, then twice as long each time (200 ms, 400 ms, 800 ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub retries: u32,
    pub first_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { retries: 3, first_delay: Duration::from_millis(200) }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        let schedule = Schedule {
            initial: self.first_delay,
            max: Duration::from_secs(3600),
            max_attempts: u32::MAX,
            give_up_after: Duration::MAX,
        };
        schedule.ceiling(retry)
    }
}

/// What to run, against what.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub target: GatewayTarget,
    pub retry: RetryPolicy,
    /// How long an attempt waits for its answer (KooGallery: 5 s).
    pub timeout: Duration,
    /// Suffix of the run's order ids (see [`super::orders::is_run_id`]).
    pub run_id: String,
    /// Scenario names; empty: all of them.
    pub scenarios: Vec<String>,
    /// The gateway's admin API and the simulator's usage API, for the usage
    /// scenario (`None`: it is skipped).
    pub usage: Option<UsageTarget>,
}

impl RunOptions {
    /// Every scenario, default retries, a 5 s timeout, a fresh run id.
    pub fn new(target: GatewayTarget) -> Self {
        Self {
            target,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(5),
            run_id: new_run_id(),
            scenarios: Vec::new(),
            usage: None,
        }
    }
}

/// The scenarios `names` (all when empty; repeats dropped) for run `run_id`.
pub fn select(names: &[String], run_id: &str) -> Result<Vec<Scenario>, SimulateError> {
    if !is_run_id(run_id) {
        return Err(SimulateError::RunId(run_id.to_owned()));
    }
    if names.is_empty() {
        return Ok(Scenario::all(run_id));
    }
    let mut out: Vec<Scenario> = Vec::new();
    for name in names {
        let scenario = Scenario::named(name, run_id)
            .ok_or_else(|| SimulateError::UnknownScenario { name: name.clone(), known: NAMES.join(", ") })?;
        if !out.iter().any(|s| s.name == scenario.name) {
            out.push(scenario);
        }
    }
    Ok(out)
}

/// Runs the selected scenarios (at once, each call after call) and reports.
pub async fn run_scenarios(opts: &RunOptions) -> Result<Report, SimulateError> {
    let (scenarios, skipped): (Vec<Scenario>, Vec<Scenario>) =
        select(&opts.scenarios, &opts.run_id)?.into_iter().partition(|s| s.usage.is_none() || opts.usage.is_some());
    let skipped = skipped
        .into_iter()
        .map(|s| Skipped {
            name: s.name.to_owned(),
            why:
                "it posts usage to the gateway's admin API: give --admin URL and --admin-token (or KOOGATE_ADMIN_TOKEN)"
                    .into(),
        })
        .collect();
    reqwest::Url::parse(&opts.target.url).map_err(|_| SimulateError::GatewayUrl(opts.target.url.clone()))?;
    let client = KooClient::new(&opts.target.url).with_timeout(opts.timeout);
    let http = reqwest::Client::builder().timeout(opts.timeout).build().map_err(std::io::Error::other)?;
    let usage = Arc::new(opts.usage.clone());
    let target = Arc::new(opts.target.clone());
    let mut tasks = tokio::task::JoinSet::new();
    let mut reports: Vec<Option<ScenarioReport>> = vec![None; scenarios.len()];
    let names: Vec<(String, String)> = scenarios.iter().map(|s| (s.name.to_owned(), s.about.to_owned())).collect();
    for (i, scenario) in scenarios.into_iter().enumerate() {
        let (client, target, retry) = (client.clone(), Arc::clone(&target), opts.retry);
        let (http, usage) = (http.clone(), Arc::clone(&usage));
        tasks.spawn(async move {
            let usage = usage.as_ref().as_ref().map(|u| (&http, u));
            (i, run_one(&client, &target, retry, usage, &scenario).await)
        });
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok((i, report)) = done {
            if let Some(slot) = reports.get_mut(i) {
                *slot = Some(report);
            }
        }
    }
    let scenarios = reports
        .into_iter()
        .zip(names)
        .map(|(report, (name, about))| {
            report.unwrap_or(ScenarioReport {
                name,
                about,
                calls: Vec::new(),
                aborted: Some("the scenario's task failed".into()),
            })
        })
        .collect();
    Ok(Report { run_id: opts.run_id.clone(), gateway: opts.target.url.clone(), scenarios, skipped })
}

/// Where a scenario's calls go and how they are retried (as KooGallery retries).
#[derive(Clone, Copy)]
struct Caller<'a> {
    client: &'a KooClient,
    target: &'a GatewayTarget,
    retry: RetryPolicy,
}

/// One scenario, call after call (and its usage step, see [`usage_flow`]).
async fn run_one(
    client: &KooClient,
    target: &GatewayTarget,
    retry: RetryPolicy,
    usage: Option<(&reqwest::Client, &UsageTarget)>,
    scenario: &Scenario,
) -> ScenarioReport {
    let caller = Caller { client, target, retry };
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut answers: Vec<Option<Bytes>> = Vec::new();
    let mut calls: Vec<CallRecord> = Vec::new();
    let mut aborted = None;
    // Until when a queryInstance with usage expectations asks again while the totals are not there yet.
    let mut usage_deadline = None;
    for (i, step) in scenario.steps.iter().enumerate() {
        if let Some(plan) = scenario.usage.as_ref().filter(|p| p.after == i) {
            let Some((http, usage)) = usage else {
                aborted = Some("the usage step needs the gateway's admin API (--admin, --admin-token)".into());
                break;
            };
            match usage_flow::run(http, usage, plan, &vars, calls.len() + 1).await {
                Ok(outcome) => {
                    calls.extend(outcome.rows);
                    usage_deadline = outcome.received_all.then(|| Instant::now() + usage.wait);
                }
                Err(why) => {
                    aborted = Some(why);
                    break;
                }
            }
        }
        if let Some(var) = step.missing(&vars) {
            aborted = Some(format!(
                "step {} ({}) not sent: no instance id for {var:?} (its newInstance failed)",
                i + 1,
                step.activity
            ));
            break;
        }
        let n = calls.len() + 1;
        let (mut record, body) = match usage_deadline.filter(|_| !step.expect_usage.is_empty()) {
            Some(until) => call_until_usage(caller, step, &vars, n, until).await,
            None => call(caller, step, &vars, n).await,
        };
        if let (Some(var), Some(id), Some("000000")) =
            (&step.capture, record.instance_id.clone(), record.result_code.as_deref())
        {
            for other in &step.distinct_from {
                if vars.get(other) == Some(&id) {
                    record.violations.push(format!(
                        "instanceId {id} was answered for {other:?} too: each pay-per-use billing item (orderId + productId) needs its own instance"
                    ));
                }
            }
            match vars.get(var) {
                Some(prev) if *prev != id => record
                    .violations
                    .push(format!("instanceId {id} differs from {prev}, answered before for the same order line")),
                Some(_) => {}
                None => {
                    vars.insert(var.clone(), id);
                }
            }
        }
        if let Some(j) = step.same_answer_as {
            match (answers.get(j).cloned().flatten(), &body) {
                (Some(first), Some(this)) if first != *this => record.violations.push(format!(
                    "answer differs from the answer to step {} (a retry must be answered byte for byte as the first call)",
                    j + 1
                )),
                (Some(_), Some(_)) => {}
                _ => record.violations.push(format!("cannot compare with step {}: a call got no answer", j + 1)),
            }
        }
        answers.push(body);
        calls.push(record);
    }
    ScenarioReport { name: scenario.name.to_owned(), about: scenario.about.to_owned(), calls, aborted }
}

/// A queryInstance with usage expectations, asked again (every 100 ms, until
/// `until`) while its totals are not all there: the gateway adds a record to
/// an instance's usage only once KooGallery's answer to the push came back.
/// The record counts every attempt.
async fn call_until_usage(
    caller: Caller<'_>,
    step: &Step,
    vars: &BTreeMap<String, String>,
    n: usize,
    until: Instant,
) -> (CallRecord, Option<Bytes>) {
    let mut attempts = 0;
    loop {
        let (mut record, body) = call(caller, step, vars, n).await;
        attempts += record.attempts;
        let json: Option<Value> = body.as_deref().and_then(|b| serde_json::from_slice(b).ok());
        let settled = json.as_ref().is_none_or(|j| usage_mismatches(step, vars, j).is_empty());
        if settled || Instant::now() >= until {
            record.attempts = attempts;
            return (record, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How a queryInstance answer's `usageInfo` differs from [`Step::expect_usage`].
/// Huawei documents `usageInfo` as `UsageInfo[]`: one entry per billing item,
/// each with `usageValue` and `statisticalTime`; the instance's total is the
/// sum of its entries.
fn usage_mismatches(step: &Step, vars: &BTreeMap<String, String>, json: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let info = json.get("info").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for (var, total) in &step.expect_usage {
        let id = vars.get(var).map(String::as_str).unwrap_or_default();
        let Some(item) = info.iter().find(|i| i.get("instanceId").and_then(Value::as_str) == Some(id)) else {
            continue; // "no info for" is reported by the queryInstance check
        };
        let expected = super::usage::format_e4(*total);
        let entries = match item.get("usageInfo") {
            Some(Value::Array(entries)) if !entries.is_empty() => entries,
            Some(Value::Array(_)) | None => {
                out.push(format!("{var} ({id}): no usageInfo entry; expected {expected}"));
                continue;
            }
            Some(other) => {
                out.push(format!("{var} ({id}): usageInfo is not an array (UsageInfo[]): {other}"));
                continue;
            }
        };
        let mut sum = 0i64;
        let mut bad = false;
        for (n, entry) in entries.iter().enumerate() {
            if entry.get("statisticalTime").and_then(Value::as_str).is_none_or(str::is_empty) {
                out.push(format!("{var} ({id}): usageInfo[{n}] has no statisticalTime"));
            }
            match entry.get("usageValue").and_then(Value::as_str).map(parse_decimal_e4) {
                Some(Ok(v)) => sum += v,
                Some(Err(e)) => {
                    out.push(format!("{var} ({id}): usageInfo[{n}].usageValue is not a decimal: {e}"));
                    bad = true;
                }
                None => {
                    out.push(format!("{var} ({id}): usageInfo[{n}] has no usageValue"));
                    bad = true;
                }
            }
        }
        if !bad && sum != *total {
            let got = super::usage::format_e4(sum);
            out.push(format!(
                "{var} ({id}): usageInfo[].usageValue sum to {got}, expected {expected} (the usage posted)"
            ));
        }
    }
    out
}

/// Why the answer's `Body-Sign` is not acceptable, if it is not.
fn signature_problem(access_key: &str, res: &CallResponse) -> Option<String> {
    match res.body_sign.as_deref() {
        None => Some("unsigned: the answer has no Body-Sign header".into()),
        Some(header) if !verify_body_sign(access_key, &res.body, header) => {
            Some("bad Body-Sign: not the HMAC-SHA256 of the body under the product's access key".into())
        }
        Some(_) => None,
    }
}

/// Why KooGallery would retry this outcome, if it would.
fn retry_reason(sent: &Result<CallResponse, ClientError>) -> Option<String> {
    match sent {
        Err(e) => Some(format!("no answer: {e}")),
        Ok(res) if res.status != 200 => Some(format!("HTTP {}", res.status)),
        Ok(res) if res.result_code().as_deref() == Some("000005") => Some("resultCode 000005".into()),
        Ok(_) => None,
    }
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(80).collect()
}

/// One call with its retries; the record and the last answer's body.
async fn call(
    caller: Caller<'_>,
    step: &Step,
    vars: &BTreeMap<String, String>,
    n: usize,
) -> (CallRecord, Option<Bytes>) {
    let Caller { client, target, retry } = caller;
    let mut record = CallRecord {
        step: n,
        generation: step.generation.as_str(),
        activity: step.activity.clone(),
        order_id: step.order_id.clone(),
        http_status: None,
        result_code: None,
        expect: step.expect.clone(),
        instance_id: None,
        signature_ok: false,
        attempts: 0,
        latency_ms: 0.0,
        violations: Vec::new(),
    };
    let key = target.access_key.expose();
    let mut first_instance: Option<String> = None;
    let last = loop {
        record.attempts += 1;
        let started = Instant::now();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let sent = match step.render(vars) {
            Rendered::V2(body) => client.v2(&target.v2_path, key, &body, now_ms).await,
            Rendered::V1(params) => client.v1(&target.v1_path, key, &params, now_ms).await,
        };
        record.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        if let (true, Ok(res)) = (step.is_new_instance(), &sent) {
            let id = res.json().and_then(|j| j.get("instanceId")?.as_str().map(str::to_owned));
            match (id, &first_instance) {
                (Some(id), Some(prev)) if id != *prev => record
                    .violations
                    .push(format!("retried newInstance answered instanceId {id}, an earlier attempt {prev}")),
                (Some(id), None) => first_instance = Some(id),
                _ => {}
            }
        }
        match retry_reason(&sent) {
            Some(reason) if record.attempts <= retry.retries => {
                if let Ok(res) = &sent {
                    if res.status == 200 {
                        if let Some(problem) = signature_problem(key, res) {
                            record.violations.push(format!("attempt {}: {problem}", record.attempts));
                        }
                    }
                }
                let wait = retry.delay(record.attempts);
                tracing::info!(activity = %step.activity, attempt = record.attempts, %reason, ?wait, "retrying as KooGallery would");
                tokio::time::sleep(wait).await;
            }
            _ => break sent,
        }
    };
    let body = judge(&mut record, step, vars, key, last);
    (record, body)
}

/// Checks the last answer of a call as KooGallery would.
fn judge(
    record: &mut CallRecord,
    step: &Step,
    vars: &BTreeMap<String, String>,
    key: &str,
    last: Result<CallResponse, ClientError>,
) -> Option<Bytes> {
    let tries = if record.attempts > 1 { format!(" after {} attempts", record.attempts) } else { String::new() };
    let res = match last {
        Ok(res) => res,
        Err(e) => {
            record.violations.push(format!("no answer{tries}: {e}"));
            return None;
        }
    };
    record.http_status = Some(res.status);
    let problem = signature_problem(key, &res);
    record.signature_ok = problem.is_none();
    let json: Option<Value> = serde_json::from_slice(&res.body).ok();
    let text = |name: &str| json.as_ref().and_then(|j| j.get(name)?.as_str().map(str::to_owned));
    record.result_code = text("resultCode");
    record.instance_id = text("instanceId").filter(|id| !id.is_empty());
    if res.status != 200 {
        let code = record.result_code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default();
        record.violations.push(format!("HTTP {}{code}{tries}", res.status));
        return Some(res.body);
    }
    record.violations.extend(problem);
    let Some(json) = json.as_ref() else {
        record.violations.push(format!("not JSON: {:?}", snippet(&res.body)));
        return Some(res.body);
    };
    let Some(code) = record.result_code.clone() else {
        record.violations.push("answer without resultCode".into());
        return Some(res.body);
    };
    if code != step.expect {
        let msg = text("resultMsg").unwrap_or_default();
        record.violations.push(format!("resultCode {code} ({msg}), expected {}{tries}", step.expect));
    }
    if code != "000000" {
        return Some(res.body);
    }
    if step.is_new_instance() {
        match (&record.instance_id, &step.expect_instance) {
            (None, _) => record.violations.push("successful newInstance answer without instanceId".into()),
            (Some(id), Some(expected)) if id != expected => record
                .violations
                .push(format!("instanceId {id} is not the id of its order line ({expected}, from instance_id_for)")),
            _ => {}
        }
        let front_end = json.pointer("/appInfo/frontEndUrl").and_then(Value::as_str).filter(|u| !u.is_empty());
        if front_end.is_none() {
            record.violations.push("successful newInstance answer without appInfo.frontEndUrl".into());
        }
    }
    if step.activity == "queryInstance" {
        let answered: Vec<&str> = json
            .get("info")
            .and_then(Value::as_array)
            .map(|info| info.iter().filter_map(|i| i.get("instanceId")?.as_str()).collect())
            .unwrap_or_default();
        for id in step.queried_instances(vars) {
            if !answered.contains(&id.as_str()) {
                record.violations.push(format!("queryInstance answer has no info for {id}"));
            }
        }
        record.violations.extend(usage_mismatches(step, vars, json));
    }
    Some(res.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double() {
        let p = RetryPolicy::default();
        let ms: Vec<u128> = (1..=3).map(|r| p.delay(r).as_millis()).collect();
        assert_eq!(ms, [200, 400, 800]);
    }

    #[test]
    fn selection_checks_names_and_run_ids() {
        assert_eq!(select(&[], "R1").unwrap().len(), NAMES.len());
        let two = select(&["debug-probes".into(), "retry-dedup".into(), "debug-probes".into()], "R1").unwrap();
        assert_eq!(two.iter().map(|s| s.name).collect::<Vec<_>>(), ["debug-probes", "retry-dedup"]);
        assert!(matches!(select(&["nope".into()], "R1"), Err(SimulateError::UnknownScenario { .. })));
        assert!(matches!(select(&[], "1-2"), Err(SimulateError::RunId(_))));
    }

    #[test]
    fn what_koogallery_retries() {
        let res = |status: u16, body: &str| {
            Ok(CallResponse { status, body: Bytes::from(body.to_owned()), body_sign: None, content_type: None })
        };
        assert!(retry_reason(&Err(ClientError::Timeout(Duration::from_secs(5)))).is_some());
        assert!(retry_reason(&res(503, "")).is_some());
        assert!(retry_reason(&res(200, r#"{"resultCode":"000005"}"#)).is_some());
        assert!(retry_reason(&res(200, r#"{"resultCode":"000001"}"#)).is_none());
        assert!(retry_reason(&res(200, "not json")).is_none());
    }

    #[test]
    fn usage_totals_are_compared_exactly() {
        let scenario = Scenario::named(super::super::scenario::USAGE_SCENARIO, "R1").unwrap();
        let mut step = scenario.steps[3].clone();
        step.expect_usage = vec![("a".into(), 12_345), ("b".into(), 20_000)];
        let vars = BTreeMap::from([("a".to_owned(), "id-a".to_owned()), ("b".to_owned(), "id-b".to_owned())]);
        let answer = |a: &str, b: Value| {
            serde_json::json!({"resultCode": "000000", "info": [
                {"instanceId": "id-a", "usageInfo": [{"usageValue": a, "statisticalTime": "20261201T000000Z"}]},
                {"instanceId": "id-b", "usageInfo": b},
            ]})
        };
        let t = "20261201T000000Z";
        let ok = answer(
            "1.2345",
            serde_json::json!([{"usageValue": "1.5", "statisticalTime": t}, {"usageValue": "0.5", "statisticalTime": t, "relatedInstanceId": "p"}]),
        );
        assert_eq!(usage_mismatches(&step, &vars, &ok), Vec::<String>::new());
        let off = answer("1.2346", serde_json::json!({"usageValue": "2"}));
        let v = usage_mismatches(&step, &vars, &off);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("usageInfo[].usageValue sum to 1.2346, expected 1.2345"), "{v:?}");
        assert!(v[1].contains("usageInfo is not an array"), "{v:?}");
        let untimed = answer("1.2345", serde_json::json!([{"usageValue": "2"}]));
        let v = usage_mismatches(&step, &vars, &untimed);
        assert_eq!(v, vec!["b (id-b): usageInfo[0] has no statisticalTime".to_owned()]);
    }
}
