//! The usage step of `account-settlement-usage`: what the billing core and
//! KooGallery do between the purchases and the final queryInstance.
//!
//! 1. `adm postUsage`: the [`UsagePlan`]'s records are posted to the
//!    gateway's `POST /v1/usage` (admin listener, bearer token); every record
//!    must be accepted (or a duplicate of an accepted one).
//! 2. `sim usageReceived`: the simulated usage API (`GET /sim/usage`) is
//!    polled until it has received every `metering_sn` (bounded by
//!    [`UsageTarget::wait`]); then, per instance, what KooGallery counted must
//!    be what the gateway accepted: no record lost, none counted twice, none
//!    on another instance.
//!
//! 3. `adm accountView`: the buyer's account on the gateway's account view
//!    (`GET /v1/accounts/{customer_id}`, account settlement binding) must list
//!    every instance bought, active, with the usage KooGallery took and
//!    nothing left unpushed.
//!
//! The final queryInstance then checks `usageInfo.usageValue` of each
//! instance ([`super::scenario::Step::expect_usage`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::report::CallRecord;
use super::scenario::{PlannedUsage, UsagePlan};
use super::usage::{format_e4, UsageSimStats, STATS_PATH};
use crate::secret::Secret;

/// Where the usage scenario posts usage, and where it reads what KooGallery received.
#[derive(Clone, Debug)]
pub struct UsageTarget {
    /// Base URL of the gateway's admin listener, e.g. `http://127.0.0.1:9090`.
    pub admin_url: String,
    /// Its bearer token (`KOOGATE_ADMIN_TOKEN`).
    pub admin_token: Secret,
    /// Base URL of the simulator serving the usage API (its `GET /sim/usage`).
    pub market_url: String,
    /// Longest wait for KooGallery to receive every record, and for the
    /// gateway's queryInstance to answer the totals.
    pub wait: Duration,
}

impl UsageTarget {
    /// With a 30 s wait.
    pub fn new(admin_url: &str, admin_token: Secret, market_url: &str) -> Self {
        Self {
            admin_url: admin_url.trim_end_matches('/').to_owned(),
            admin_token,
            market_url: market_url.trim_end_matches('/').to_owned(),
            wait: Duration::from_secs(30),
        }
    }
}

/// What the usage step did.
pub struct FlowOutcome {
    /// Its rows in the report.
    pub rows: Vec<CallRecord>,
    /// KooGallery received every record: worth waiting for the gateway to settle them.
    pub received_all: bool,
}

/// The gateway's answer to `POST /v1/usage`.
#[derive(Debug, Default, Deserialize)]
struct IntakeAnswer {
    #[serde(default)]
    records: Vec<Verdict>,
}

#[derive(Debug, Deserialize)]
struct Verdict {
    #[serde(default)]
    metering_sn: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    reason: Option<String>,
}

fn row(step: usize, generation: &'static str, activity: &str, n: usize) -> CallRecord {
    CallRecord {
        step,
        generation,
        activity: activity.to_owned(),
        order_id: None,
        http_status: None,
        result_code: None,
        expect: format!("{n}/{n}"),
        instance_id: None,
        signature_ok: false,
        attempts: 0,
        latency_ms: 0.0,
        violations: Vec::new(),
    }
}

/// RFC 3339 for even hours, KooGallery's compact format for odd ones: the
/// gateway takes both.
fn period_time(secs: i64, hour: i64) -> String {
    let format = if hour % 2 == 0 { "%Y-%m-%dT%H:%M:%SZ" } else { "%Y%m%dT%H%M%SZ" };
    chrono::DateTime::from_timestamp(secs, 0).map(|t| t.format(format).to_string()).unwrap_or_default()
}

/// The `POST /v1/usage` body of the plan, instance ids filled in.
pub fn intake_body(records: &[PlannedUsage], ids: &BTreeMap<String, String>) -> Value {
    let records: Vec<Value> = records
        .iter()
        .map(|r| {
            let hour = (r.begin.div_euclid(3600)).rem_euclid(24);
            json!({
                "instance_id": ids.get(&r.var).cloned().unwrap_or_default(),
                "begin_time": period_time(r.begin, hour),
                "end_time": period_time(r.end, hour),
                "usage_value": format_e4(r.value_e4),
                "metering_sn": r.metering_sn,
            })
        })
        .collect();
    json!({ "records": records })
}

/// `first, second, third and 4 more`.
fn some_of(items: &[String]) -> String {
    let shown = items.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
    match items.len() {
        0..=3 => shown,
        n => format!("{shown} and {} more", n - 3),
    }
}

/// Runs the usage step; `Err`: not run (an instance id is missing).
pub async fn run(
    http: &reqwest::Client,
    target: &UsageTarget,
    plan: &UsagePlan,
    vars: &BTreeMap<String, String>,
    first_step: usize,
) -> Result<FlowOutcome, String> {
    let mut ids = BTreeMap::new();
    for r in &plan.records {
        let id = vars
            .get(&r.var)
            .ok_or_else(|| format!("usage not posted: no instance id for {:?} (its newInstance failed)", r.var))?;
        ids.insert(r.var.clone(), id.clone());
    }
    let (posted, accepted) = post(http, target, plan, &ids, first_step).await;
    let accepted_all = posted.violations.is_empty();
    let received = await_received(http, target, plan, &ids, &accepted, first_step + 1).await;
    let received_all = accepted_all && received.violations.is_empty();
    let mut rows = vec![posted, received];
    if received_all {
        rows.push(await_account(http, target, &ids, &accepted, first_step + 2).await);
    }
    Ok(FlowOutcome { rows, received_all })
}

/// The account the usage scenario's orders were bought by (the simulator's order book).
const BUYER: &str = super::orders::SIM_BUYER.customer_id;

/// Waits until the gateway's account view shows what was bought and pushed.
async fn await_account(
    http: &reqwest::Client,
    target: &UsageTarget,
    ids: &BTreeMap<String, String>,
    accepted: &[PlannedUsage],
    step: usize,
) -> CallRecord {
    let mut record = row(step, "adm", "accountView", ids.len());
    let url = format!("{}/v1/accounts/{BUYER}?limit=500", target.admin_url);
    let started = Instant::now();
    let deadline = started + target.wait;
    loop {
        record.attempts += 1;
        let view = match http.get(&url).bearer_auth(target.admin_token.expose()).send().await {
            Ok(res) => {
                record.http_status = Some(res.status().as_u16());
                let body = res.bytes().await.unwrap_or_default();
                serde_json::from_slice::<Value>(&body).map_err(|e| format!("the account view is not JSON: {e}"))
            }
            Err(e) => Err(format!("no answer from {url}: {}", crate::error_chain(&e))),
        };
        record.violations = match view {
            Ok(view) => account_mismatches(&view, ids, accepted),
            Err(why) => vec![why],
        };
        if record.violations.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    record.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let shown = ids.len() - record.violations.iter().filter(|v| v.contains("does not list")).count();
    record.result_code = Some(format!("{shown}/{}", ids.len()));
    record
}

/// How the account view differs from what was bought and pushed, in words.
pub fn account_mismatches(view: &Value, ids: &BTreeMap<String, String>, accepted: &[PlannedUsage]) -> Vec<String> {
    let listed = view["instances"].as_array().cloned().unwrap_or_default();
    if listed.is_empty() {
        let why = view["message"].as_str().unwrap_or("no instances");
        return vec![format!(
            "the account view of {BUYER} lists nothing ({why}); is the gateway's KOOGATE_MARKETPLACE_AK/SK this \
             simulator's, so it learns the buyer from the order query?"
        )];
    }
    let mut out = Vec::new();
    for (var, id) in ids {
        let Some(shown) = listed.iter().find(|i| i["instance_id"] == *id) else {
            out.push(format!("the account view of {BUYER} does not list {var} ({id})"));
            continue;
        };
        let expected: i64 = accepted.iter().filter(|r| r.var == *var).map(|r| r.value_e4).sum();
        if shown["status"] != "active" {
            out.push(format!("{var} ({id}) is {} in the account view, not active", shown["status"]));
        }
        if shown["usage"]["pushed"] != format_e4(expected).as_str() || shown["usage"]["unpushed"] != "0" {
            out.push(format!(
                "{var} ({id}): the account view shows {} pushed and {} unpushed; {} was accepted and taken by KooGallery",
                shown["usage"]["pushed"],
                shown["usage"]["unpushed"],
                format_e4(expected)
            ));
        }
    }
    out
}

/// Posts the plan's records; the row and the records accepted (or duplicates of accepted ones).
async fn post(
    http: &reqwest::Client,
    target: &UsageTarget,
    plan: &UsagePlan,
    ids: &BTreeMap<String, String>,
    step: usize,
) -> (CallRecord, Vec<PlannedUsage>) {
    let n = plan.records.len();
    let mut record = row(step, "adm", "postUsage", n);
    let body = intake_body(&plan.records, ids).to_string();
    let url = format!("{}/v1/usage", target.admin_url);
    let mut wait = Duration::from_millis(200);
    let started = Instant::now();
    let answer = loop {
        record.attempts += 1;
        let sent = http
            .post(&url)
            .bearer_auth(target.admin_token.expose())
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        // Posting again is safe: what was stored answers `duplicate`.
        let retry = match &sent {
            Err(e) => Some(format!("no answer: {}", crate::error_chain(e))),
            Ok(res) if res.status().is_server_error() => Some(format!("HTTP {}", res.status().as_u16())),
            Ok(_) => None,
        };
        match retry {
            Some(why) if record.attempts < 4 => {
                tracing::info!(%why, attempt = record.attempts, "posting usage again");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Some(why) => break Err(why),
            None => break sent.map_err(|e| e.to_string()),
        }
    };
    record.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let res = match answer {
        Ok(res) => res,
        Err(why) => {
            record.violations.push(format!("usage not posted after {} attempts: {why}", record.attempts));
            return (record, Vec::new());
        }
    };
    let status = res.status().as_u16();
    record.http_status = Some(status);
    let text = res.bytes().await.unwrap_or_default();
    if status != 200 {
        let snippet: String = String::from_utf8_lossy(&text).chars().take(200).collect();
        record.violations.push(format!("POST /v1/usage answered HTTP {status}: {snippet}"));
        return (record, Vec::new());
    }
    let answer: IntakeAnswer = match serde_json::from_slice(&text) {
        Ok(a) => a,
        Err(e) => {
            record.violations.push(format!("POST /v1/usage answer is not the expected JSON: {e}"));
            return (record, Vec::new());
        }
    };
    let verdicts: BTreeMap<&str, &Verdict> = answer.records.iter().map(|v| (v.metering_sn.as_str(), v)).collect();
    let (mut accepted, mut refused, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for r in &plan.records {
        match verdicts.get(r.metering_sn.as_str()) {
            Some(v) if v.status == "accepted" || v.status == "duplicate" => accepted.push(r.clone()),
            Some(v) => refused.push(format!(
                "{} {}: {}",
                r.metering_sn,
                v.status,
                v.reason.as_deref().unwrap_or("no reason given")
            )),
            None => missing.push(r.metering_sn.clone()),
        }
    }
    record.result_code = Some(format!("{}/{n}", accepted.len()));
    if !refused.is_empty() {
        record.violations.push(format!("{} records not accepted: {}", refused.len(), some_of(&refused)));
    }
    if !missing.is_empty() {
        record.violations.push(format!("no verdict for {} records: {}", missing.len(), some_of(&missing)));
    }
    (record, accepted)
}

/// Reads `GET /sim/usage`.
async fn sim_stats(http: &reqwest::Client, target: &UsageTarget) -> Result<(u16, UsageSimStats), String> {
    let res =
        http.get(format!("{}{STATS_PATH}", target.market_url)).send().await.map_err(|e| crate::error_chain(&e))?;
    let status = res.status().as_u16();
    let body = res.bytes().await.map_err(|e| e.to_string())?;
    let stats = serde_json::from_slice(&body).map_err(|e| format!("HTTP {status}, not usage stats: {e}"))?;
    Ok((status, stats))
}

/// Waits until KooGallery received every posted record, then compares.
async fn await_received(
    http: &reqwest::Client,
    target: &UsageTarget,
    plan: &UsagePlan,
    ids: &BTreeMap<String, String>,
    accepted: &[PlannedUsage],
    step: usize,
) -> CallRecord {
    let n = plan.records.len();
    let mut record = row(step, "sim", "usageReceived", n);
    let started = Instant::now();
    let deadline = started + target.wait;
    let mut last_error = None;
    let mut stats = None;
    loop {
        record.attempts += 1;
        match sim_stats(http, target).await {
            Ok((status, s)) => {
                record.http_status = Some(status);
                let done = plan.records.iter().all(|r| s.metering_sns.contains_key(&r.metering_sn));
                stats = Some(s);
                if done {
                    break;
                }
            }
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    record.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let Some(stats) = stats else {
        let why = last_error.unwrap_or_default();
        record.violations.push(format!("cannot read {}{STATS_PATH}: {why}", target.market_url));
        return record;
    };
    record.violations = compare(plan, ids, accepted, &stats, target.wait);
    let received = plan.records.iter().filter(|r| stats.metering_sns.contains_key(&r.metering_sn)).count();
    record.result_code = Some(format!("{received}/{n}"));
    let retried =
        plan.records.iter().filter(|r| stats.metering_sns.get(&r.metering_sn).is_some_and(|x| x.receipts > 1));
    let retried = retried.count();
    if retried > 0 {
        tracing::info!(records = retried, "usage records reached KooGallery more than once (retries), counted once");
    }
    record
}

/// What KooGallery received against what the gateway accepted, in words.
pub fn compare(
    plan: &UsagePlan,
    ids: &BTreeMap<String, String>,
    accepted: &[PlannedUsage],
    stats: &UsageSimStats,
    wait: Duration,
) -> Vec<String> {
    let mut out = Vec::new();
    let id_of = |var: &str| ids.get(var).cloned().unwrap_or_default();
    let missing: Vec<String> = plan
        .records
        .iter()
        .filter(|r| !stats.metering_sns.contains_key(&r.metering_sn))
        .map(|r| r.metering_sn.clone())
        .collect();
    if !missing.is_empty() {
        let hint = if missing.len() == plan.records.len() {
            " (does the gateway's KOOGATE_MARKETPLACE_URL point at this simulator? if not, pass --usage-api)"
        } else {
            ""
        };
        out.push(format!(
            "{} of {} records never reached KooGallery within {}s: {}{hint}",
            missing.len(),
            plan.records.len(),
            wait.as_secs(),
            some_of(&missing)
        ));
        return out;
    }
    for r in &plan.records {
        let Some(got) = stats.metering_sns.get(&r.metering_sn) else { continue };
        let id = id_of(&r.var);
        if got.instance_id != id {
            out.push(format!(
                "metering_sn {} reached KooGallery for instance {}, not {id}",
                r.metering_sn, got.instance_id
            ));
        } else if got.value_e4 != r.value_e4 {
            out.push(format!(
                "metering_sn {} reached KooGallery with usage_value {}, posted {}",
                r.metering_sn,
                got.usage_value,
                format_e4(r.value_e4)
            ));
        }
    }
    let mut expected: BTreeMap<String, (i64, u64)> = BTreeMap::new();
    for r in accepted {
        let e = expected.entry(r.var.clone()).or_default();
        e.0 += r.value_e4;
        e.1 += 1;
    }
    for (var, (total, records)) in expected {
        let id = id_of(&var);
        let (got_total, got_records) = stats.instances.get(&id).map_or((0, 0), |i| (i.total_e4, i.records));
        if got_total != total {
            out.push(format!(
                "KooGallery counted {} for {var} ({id}); the gateway accepted {}",
                format_e4(got_total),
                format_e4(total)
            ));
        }
        if got_records != records {
            out.push(format!(
                "KooGallery holds {got_records} distinct records of {var} ({id}); {records} were accepted"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::simulate::scenario::previous_day;
    use crate::tools::simulate::usage::{InstanceUsage, Receipt};

    fn setup() -> (UsagePlan, BTreeMap<String, String>, UsageSimStats) {
        let plan = UsagePlan::hourly(0, &["a", "b"], "R1", previous_day(1_767_323_045), 3);
        let ids = BTreeMap::from([("a".to_owned(), "id-a".to_owned()), ("b".to_owned(), "id-b".to_owned())]);
        let mut stats = UsageSimStats::default();
        for r in &plan.records {
            let id = ids[&r.var].clone();
            stats.metering_sns.insert(
                r.metering_sn.clone(),
                Receipt {
                    instance_id: id.clone(),
                    usage_value: format_e4(r.value_e4),
                    value_e4: r.value_e4,
                    receipts: 1,
                },
            );
            let i = stats.instances.entry(id).or_insert_with(InstanceUsage::default);
            i.total_e4 += r.value_e4;
            i.records += 1;
        }
        (plan, ids, stats)
    }

    #[test]
    fn the_intake_body_names_the_instances_in_both_time_formats() {
        let (plan, ids, _) = setup();
        let body = intake_body(&plan.records, &ids);
        let records = body["records"].as_array().unwrap();
        assert_eq!(records.len(), 6);
        assert_eq!(records[0]["instance_id"], "id-a");
        assert_eq!(records[0]["begin_time"], "2026-01-01T00:00:00Z");
        assert_eq!(records[1]["begin_time"], "20260101T010000Z");
        assert_eq!(records[1]["end_time"], "20260101T020000Z");
        assert_eq!(records[0]["usage_value"], "1.2345");
        assert_eq!(records[3]["instance_id"], "id-b");
        assert_eq!(records[3]["usage_value"], "2.469");
    }

    #[test]
    fn a_faithful_koogallery_has_no_violations_and_every_fault_is_named() {
        let (plan, ids, stats) = setup();
        let wait = Duration::from_secs(30);
        assert_eq!(compare(&plan, &ids, &plan.records, &stats, wait), Vec::<String>::new());

        let mut lost = stats.clone();
        lost.metering_sns.remove(&plan.records[2].metering_sn);
        let v = compare(&plan, &ids, &plan.records, &lost, wait);
        assert!(v[0].starts_with("1 of 6 records never reached KooGallery within 30s"), "{v:?}");

        let mut doubled = stats.clone();
        if let Some(i) = doubled.instances.get_mut("id-a") {
            i.total_e4 += plan.records[0].value_e4;
            i.records += 1;
        }
        let v = compare(&plan, &ids, &plan.records, &doubled, wait);
        assert!(v.iter().any(|l| l.contains("KooGallery counted") && l.contains("for a (id-a)")), "{v:?}");
        assert!(v.iter().any(|l| l.contains("4 distinct records of a")), "{v:?}");

        let mut moved = stats.clone();
        if let Some(r) = moved.metering_sns.get_mut(&plan.records[0].metering_sn) {
            r.instance_id = "id-b".into();
        }
        let v = compare(&plan, &ids, &plan.records, &moved, wait);
        assert!(v.iter().any(|l| l.contains("for instance id-b, not id-a")), "{v:?}");

        // A record the gateway refused must not have reached KooGallery.
        let v = compare(&plan, &ids, &plan.records[1..], &stats, wait);
        assert!(v.iter().any(|l| l.contains("the gateway accepted")), "{v:?}");
    }

    #[test]
    fn the_account_view_must_list_every_instance_with_its_usage() {
        let (plan, ids, _) = setup();
        let total = |var: &str| format_e4(plan.records.iter().filter(|r| r.var == var).map(|r| r.value_e4).sum());
        let entry = |id: &str, var: &str, status: &str| json!({"instance_id": id, "status": status, "usage": {"pushed": total(var), "unpushed": "0"}});
        let good = json!({"instances": [entry("id-b", "b", "active"), entry("id-a", "a", "active"), entry("x", "a", "active")]});
        assert_eq!(account_mismatches(&good, &ids, &plan.records), Vec::<String>::new());

        let missing = json!({"instances": [entry("id-b", "b", "active")]});
        let v = account_mismatches(&missing, &ids, &plan.records);
        assert!(v[0].contains("does not list a (id-a)"), "{v:?}");
        let frozen = json!({"instances": [entry("id-b", "b", "frozen"), entry("id-a", "a", "active")]});
        assert!(account_mismatches(&frozen, &ids, &plan.records)[0].contains("is \"frozen\""));
        let mut short = good.clone();
        short["instances"][1]["usage"]["unpushed"] = json!("1");
        assert!(account_mismatches(&short, &ids, &plan.records)[0].contains("1\" unpushed"));
        let none = json!({"error": "not_found", "message": "account x holds no instance"});
        assert!(account_mismatches(&none, &ids, &plan.records)[0].contains("KOOGATE_MARKETPLACE_AK/SK"));
    }

    #[test]
    fn long_lists_are_cut() {
        let items: Vec<String> = (1..=5).map(|i| i.to_string()).collect();
        assert_eq!(some_of(&items), "1, 2, 3 and 2 more");
        assert_eq!(some_of(&items[..2]), "1, 2");
    }
}
