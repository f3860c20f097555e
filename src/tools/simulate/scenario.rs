//! The scenarios: named sequences of calls KooGallery makes, each with the
//! result code it expects.
//!
//! Order ids carry the run id (`SIMSUBNEW-R1A2B3C4`) so a rerun against the
//! same gateway starts fresh; the debug probes use KooGallery's fixed mock
//! orders and must pass on every rerun.
//!
//! `account-settlement-usage` also has a [`UsagePlan`]: between its calls,
//! the driver posts usage to the gateway's admin API (as the billing core
//! does) and waits for the simulated usage API to receive all of it.

use std::collections::BTreeMap;

use super::orders::{self, line_id, run_order_id, scenario_order, MOCK_BUYER, SIM_BUYER};
use crate::protocol::Generation;
use crate::store::keys::instance_id_for;

/// The value of one field of a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    Text(String),
    /// The instance id an earlier newInstance of the scenario answered, by capture name.
    Instance(String),
    /// Several captured instance ids, comma-joined (queryInstance).
    Instances(Vec<String>),
    /// A fresh UUID on every attempt (newInstance's `businessId`: new on every call, even retries).
    BusinessId,
}

/// One call of a scenario.
#[derive(Clone, Debug)]
pub struct Step {
    pub generation: Generation,
    pub activity: String,
    /// The order the call is about (for the report).
    pub order_id: Option<String>,
    /// Every field but `activity` (V2: body members; V1: query parameters).
    pub fields: Vec<(String, Field)>,
    /// The `resultCode` KooGallery expects.
    pub expect: String,
    /// newInstance: remember the answered `instanceId` under this name.
    pub capture: Option<String>,
    /// newInstance: the id the order line must get ([`instance_id_for`]).
    pub expect_instance: Option<String>,
    /// The answer must be byte for byte the answer to this earlier step (0-based).
    pub same_answer_as: Option<usize>,
    /// queryInstance: `usageInfo.usageValue` each captured instance must
    /// answer, in units of 0.0001 (by capture name).
    pub expect_usage: Vec<(String, i64)>,
    /// newInstance: the answered `instanceId` must differ from these captures
    /// (Huawei: one pay-per-use order with several productIds has several instances).
    pub distinct_from: Vec<String>,
}

/// One hour of one workspace's usage, as the billing core posts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedUsage {
    /// Capture name of the instance.
    pub var: String,
    pub metering_sn: String,
    /// The period, UNIX seconds.
    pub begin: i64,
    pub end: i64,
    /// In units of 0.0001.
    pub value_e4: i64,
}

/// Usage posted to the gateway's admin API in the middle of a scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsagePlan {
    /// Posted after this many steps (0-based index of the step it precedes).
    pub after: usize,
    pub records: Vec<PlannedUsage>,
}

impl UsagePlan {
    /// `hours` hourly records per capture, from `day_start` (UNIX seconds), with
    /// values of up to 4 decimals. The `metering_sn`s carry the run id and the hour.
    pub fn hourly(after: usize, vars: &[&str], run_id: &str, day_start: i64, hours: i64) -> Self {
        let mut records = Vec::new();
        for (w, var) in (1i64..).zip(vars) {
            for h in 0..hours {
                let begin = day_start + h * 3600;
                let stamp = chrono::DateTime::from_timestamp(begin, 0)
                    .map(|t| t.format("%Y%m%d%H").to_string())
                    .unwrap_or_default();
                records.push(PlannedUsage {
                    var: (*var).to_owned(),
                    metering_sn: format!("SIMPPU-{run_id}-{var}-{stamp}"),
                    begin,
                    end: begin + 3600,
                    // 1.2345 × workspace + 0.1001 × hour: every decimal place used, some trailing zeros
                    value_e4: 12_345 * w + 1_001 * h,
                });
            }
        }
        Self { after, records }
    }

    /// Total per capture name, in units of 0.0001.
    pub fn totals(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for r in &self.records {
            *out.entry(r.var.clone()).or_insert(0) += r.value_e4;
        }
        out
    }
}

/// The start (UNIX seconds) of the UTC day before `now_secs`.
pub fn previous_day(now_secs: i64) -> i64 {
    (now_secs.div_euclid(86_400) - 1) * 86_400
}

/// A call ready to sign and send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendered {
    /// The JSON body.
    V2(Vec<u8>),
    /// The query parameters (without `timeStamp`/`authToken`).
    V1(BTreeMap<String, String>),
}

impl Step {
    fn new(generation: Generation, activity: &str, order_id: Option<&str>) -> Self {
        Self {
            generation,
            activity: activity.to_owned(),
            order_id: order_id.map(str::to_owned),
            fields: Vec::new(),
            expect: "000000".into(),
            capture: None,
            expect_instance: None,
            same_answer_as: None,
            expect_usage: Vec::new(),
            distinct_from: Vec::new(),
        }
    }

    fn text(mut self, name: &str, value: impl Into<String>) -> Self {
        self.fields.push((name.to_owned(), Field::Text(value.into())));
        self
    }

    fn field(mut self, name: &str, value: Field) -> Self {
        self.fields.push((name.to_owned(), value));
        self
    }

    fn instance(self, var: &str) -> Self {
        self.field("instanceId", Field::Instance(var.to_owned()))
    }

    fn test_flag(self, test: bool) -> Self {
        self.text("testFlag", if test { "1" } else { "0" })
    }

    pub fn is_new_instance(&self) -> bool {
        self.activity == "newInstance"
    }

    /// The capture names this step needs.
    pub fn needs(&self) -> Vec<&str> {
        let mut out = Vec::new();
        for (_, f) in &self.fields {
            match f {
                Field::Instance(v) => out.push(v.as_str()),
                Field::Instances(vs) => out.extend(vs.iter().map(String::as_str)),
                Field::Text(_) | Field::BusinessId => {}
            }
        }
        out
    }

    /// The first capture this step needs that `vars` lacks.
    pub fn missing<'a>(&'a self, vars: &BTreeMap<String, String>) -> Option<&'a str> {
        self.needs().into_iter().find(|v| !vars.contains_key(*v))
    }

    /// The instance ids a queryInstance asks for.
    pub fn queried_instances(&self, vars: &BTreeMap<String, String>) -> Vec<String> {
        self.fields
            .iter()
            .filter(|(name, _)| name == "instanceId")
            .flat_map(|(_, f)| match f {
                Field::Instance(v) => vec![vars.get(v).cloned().unwrap_or_default()],
                Field::Instances(vs) => vs.iter().map(|v| vars.get(v).cloned().unwrap_or_default()).collect(),
                Field::Text(t) => t.split(',').map(|s| s.trim().to_owned()).collect(),
                Field::BusinessId => Vec::new(),
            })
            .collect()
    }

    /// The call with captures filled in and a fresh `businessId`.
    pub fn render(&self, vars: &BTreeMap<String, String>) -> Rendered {
        let mut values = BTreeMap::new();
        values.insert("activity".to_owned(), self.activity.clone());
        for (name, f) in &self.fields {
            let value = match f {
                Field::Text(t) => t.clone(),
                Field::Instance(v) => vars.get(v).cloned().unwrap_or_default(),
                Field::Instances(vs) => {
                    vs.iter().map(|v| vars.get(v).cloned().unwrap_or_default()).collect::<Vec<_>>().join(",")
                }
                Field::BusinessId => uuid::Uuid::new_v4().to_string(),
            };
            values.insert(name.clone(), value);
        }
        match self.generation {
            Generation::V2 => {
                let object: serde_json::Map<String, serde_json::Value> =
                    values.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
                Rendered::V2(serde_json::Value::Object(object).to_string().into_bytes())
            }
            Generation::V1 => Rendered::V1(values),
        }
    }
}

/// A V2 newInstance of an order's only line, remembered as `var`.
fn v2_new(order_id: &str, test: bool, var: &str) -> Step {
    let line = line_id(order_id);
    let mut step = Step::new(Generation::V2, "newInstance", Some(order_id))
        .field("businessId", Field::BusinessId)
        .text("orderId", order_id)
        .text("orderLineId", &line)
        .test_flag(test);
    step.capture = Some(var.to_owned());
    step.expect_instance = Some(instance_id_for(order_id, Some(&line)));
    step
}

/// A V2 refreshInstance with the new order `order_id` (a template's expiry).
fn v2_refresh(var: &str, order_id: &str, template: &str, scene: &str) -> Step {
    let expire = scenario_order(template).and_then(|o| o.expire_time).unwrap_or("20271231235959");
    Step::new(Generation::V2, "refreshInstance", Some(order_id))
        .instance(var)
        .text("orderId", order_id)
        .text("orderLineId", line_id(order_id))
        .text("scene", scene)
        .text("expireTime", expire)
        .text("productId", orders::SIM_PRODUCT)
        .test_flag(false)
}

fn v2_status(var: &str, status: &str) -> Step {
    Step::new(Generation::V2, "updateInstanceStatus", None).instance(var).text("status", status).test_flag(false)
}

fn v2_release(var: &str, order_id: Option<&str>, test: bool) -> Step {
    let mut step = Step::new(Generation::V2, "releaseInstance", order_id).instance(var);
    if let Some(order) = order_id {
        step = step.text("orderId", order).text("orderLineId", line_id(order));
    }
    step.test_flag(test)
}

fn v1(activity: &str, order_id: Option<&str>) -> Step {
    Step::new(Generation::V1, activity, order_id)
}

/// A V1 newInstance of `order_id` with the given purchase parameters, remembered as `var`.
fn v1_new(order_id: &str, var: &str, params: &[(&str, &str)]) -> Step {
    let mut step = v1("newInstance", Some(order_id)).field("businessId", Field::BusinessId).text("orderId", order_id);
    for (k, v) in params {
        step = step.text(k, *v);
    }
    step.capture = Some(var.to_owned());
    step.expect_instance = Some(instance_id_for(order_id, None));
    step.test_flag(false)
}

/// A V1 pay-per-use purchase of one billing item, written from Huawei's V1
/// Subscription page (not from the gateway): `chargingMode` `0` (pay-per-use)
/// or `5` (package), and "if a specification in an order has multiple
/// pay-per-use billing items, create instances for these billing items
/// separately based on orderId (the same order ID) and productId (different
/// product IDs)"
/// (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/en-us_topic_0070649013.html>).
/// No expected id: how the seller derives it is the seller's business.
fn v1_ppu_new(order_id: &str, product_id: &str, charging_mode: &str, var: &str) -> Step {
    let mut step = v1("newInstance", Some(order_id))
        .field("businessId", Field::BusinessId)
        .text("orderId", order_id)
        .text("customerId", SIM_BUYER.customer_id)
        .text("customerName", SIM_BUYER.customer_name)
        .text("productId", product_id)
        .text("skuCode", orders::SIM_SKU_PRO)
        .text("chargingMode", charging_mode)
        .text("trialFlag", "0")
        .test_flag(false);
    step.capture = Some(var.to_owned());
    step
}

/// V1 Instance Query (GET), mandatory for pay-per-use products
/// (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649081.html>):
/// every queried pay-per-use instance must answer `usageInfo` as an array
/// with `usageValue` and `statisticalTime` in each entry; nothing was used yet.
fn v1_query(vars: &[&str]) -> Step {
    let mut step = v1("queryInstance", None)
        .field("instanceId", Field::Instances(vars.iter().map(|v| (*v).to_owned()).collect()))
        .test_flag(false);
    step.expect_usage = vars.iter().map(|v| ((*v).to_owned(), 0)).collect();
    step
}

/// V1 Resource Status Change: `FREEZE` or `NORMAL`
/// (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/en-us_topic_0070649069.html>).
fn v1_status(var: &str, status: &str) -> Step {
    v1("instanceStatus", None).instance(var).text("instanceStatus", status).test_flag(false)
}

/// A named sequence of calls.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    /// What it covers, in one line.
    pub about: &'static str,
    pub steps: Vec<Step>,
    /// Usage to post between the calls (needs the gateway's admin API).
    pub usage: Option<UsagePlan>,
}

/// Every scenario, in the order they are reported.
pub const NAMES: [&str; 8] = [
    "stored-value-cards",
    "account-settlement-lifecycle",
    "trial-converted",
    "debug-probes",
    "retry-dedup",
    "v1-lifecycle",
    V1_PAY_PER_USE,
    USAGE_SCENARIO,
];

/// The V1 pay-per-use lifecycle (issue 13.13).
pub const V1_PAY_PER_USE: &str = "v1-pay-per-use";

/// The scenario that pushes usage (run only with the gateway's admin API).
pub const USAGE_SCENARIO: &str = "account-settlement-usage";
/// Workspaces (instances) of the usage scenario, and hours of usage of each.
pub const USAGE_WORKSPACES: [&str; 3] = ["wsA", "wsB", "wsC"];
pub const USAGE_HOURS: i64 = 24;

impl Scenario {
    /// Every scenario for run `run_id`.
    pub fn all(run_id: &str) -> Vec<Scenario> {
        NAMES.iter().filter_map(|name| Self::named(name, run_id)).collect()
    }

    /// The scenario called `name`, for run `run_id`.
    pub fn named(name: &str, run_id: &str) -> Option<Scenario> {
        let id = |template: &str| run_order_id(template, run_id);
        let mut usage = None;
        let (name, about, steps) = match name {
            "stored-value-cards" => {
                let v1_order = id("SIMV1CARDS");
                (
                    "stored-value-cards",
                    "50 stored-value cards of 100 CNY bought once: V2 newInstance (details from the order query API) and V1 newInstance (details in the call)",
                    vec![
                        v2_new(&id("SIMSVCCARDS"), false, "cards"),
                        v1_new(
                            &v1_order,
                            "v1cards",
                            &[
                                ("customerId", MOCK_BUYER.customer_id),
                                ("customerName", MOCK_BUYER.customer_name),
                                ("productId", orders::SVC_PRODUCT),
                                ("skuCode", orders::SVC_SKU),
                                ("chargingMode", "3"),
                                ("orderAmount", "5000.00"),
                                ("trialFlag", "0"),
                            ],
                        ),
                    ],
                )
            }
            "account-settlement-lifecycle" => {
                let renew = id("SIMSUBRENEW");
                let late = id("SIMSUBRENEWLATE");
                let upgrade = id("SIMSUBUPGRADE");
                let unsub = id("SIMSUBUNSUB");
                (
                    "account-settlement-lifecycle",
                    "a V2 monthly subscription bought, renewed, frozen at expiry, renewed late and unfrozen, upgraded, unsubscribed",
                    vec![
                        v2_new(&id("SIMSUBNEW"), false, "sub"),
                        v2_refresh("sub", &renew, "SIMSUBRENEW", "RENEWAL"),
                        v2_status("sub", "FREEZE"),
                        v2_refresh("sub", &late, "SIMSUBRENEWLATE", "RENEWAL"),
                        v2_status("sub", "UNFREEZE"),
                        Step::new(Generation::V2, "upgradeInstance", Some(&upgrade))
                            .instance("sub")
                            .text("orderId", &upgrade)
                            .text("orderLineId", line_id(&upgrade))
                            .test_flag(false),
                        v2_release("sub", Some(&unsub), false),
                    ],
                )
            }
            "trial-converted" => {
                let formal = id("SIMTRIALFORMAL");
                (
                    "trial-converted",
                    "a V2 trial (orderType TRIAL) converted to a paid subscription (refreshInstance TRIAL_TO_FORMAL)",
                    vec![
                        v2_new(&id("SIMTRIALNEW"), false, "trial"),
                        v2_refresh("trial", &formal, "SIMTRIALFORMAL", "TRIAL_TO_FORMAL"),
                    ],
                )
            }
            "debug-probes" => (
                "debug-probes",
                "KooGallery's twice-daily probes (testFlag 1, fixed mock orders): newInstance, queryInstance, releaseInstance; must pass on every rerun",
                vec![
                    v2_new("MOCKPERIODYEARNEW", true, "probe"),
                    v2_new("MOCKONETIMENEW", true, "probe_once"),
                    Step::new(Generation::V2, "queryInstance", None)
                        .field("instanceId", Field::Instances(vec!["probe".into(), "probe_once".into()]))
                        .test_flag(true),
                    v2_release("probe", None, true),
                    v2_release("probe_once", None, true),
                ],
            ),
            "retry-dedup" => {
                let order = id("SIMDEDUPNEW");
                let mut again = v2_new(&order, false, "dedup");
                again.same_answer_as = Some(0);
                (
                    "retry-dedup",
                    "KooGallery retrying a purchase: the same newInstance again (new businessId, nonce, timestamp) is answered byte for byte as the first",
                    vec![v2_new(&order, false, "dedup"), again],
                )
            }
            "v1-lifecycle" => {
                let order = id("SIMV1SUB");
                let renew = id("SIMV1RENEW");
                (
                    "v1-lifecycle",
                    "a V1 monthly subscription: newInstance, refreshInstance, instanceStatus FREEZE and NORMAL (unfreeze), expireInstance, releaseInstance",
                    vec![
                        v1_new(
                            &order,
                            "v1sub",
                            &[
                                ("customerId", SIM_BUYER.customer_id),
                                ("customerName", SIM_BUYER.customer_name),
                                ("productId", orders::SIM_PRODUCT),
                                ("skuCode", orders::SIM_SKU_PRO),
                                ("chargingMode", "1"),
                                ("periodType", "month"),
                                ("periodNumber", "1"),
                                ("orderAmount", "99.00"),
                                ("expireTime", "20261226235959"),
                                ("trialFlag", "0"),
                            ],
                        ),
                        v1("refreshInstance", Some(&renew))
                            .instance("v1sub")
                            .text("orderId", &renew)
                            .text("productId", orders::SIM_PRODUCT)
                            .text("expireTime", "20270126235959")
                            .text("periodType", "month")
                            .text("periodNumber", "1")
                            .text("orderAmount", "99.00")
                            .test_flag(false),
                        v1("instanceStatus", None).instance("v1sub").text("instanceStatus", "FREEZE").test_flag(false),
                        v1("instanceStatus", None).instance("v1sub").text("instanceStatus", "NORMAL").test_flag(false),
                        v1("expireInstance", Some(&order)).instance("v1sub").text("orderId", &order).test_flag(false),
                        v1("releaseInstance", Some(&order))
                            .instance("v1sub")
                            .text("orderId", &order)
                            .text("orderAmount", "0")
                            .test_flag(false),
                    ],
                )
            }
            V1_PAY_PER_USE => {
                let order = id("SIMV1PPU");
                let package = id("SIMV1PKG");
                let (item_a, item_b) = (format!("{}-1", orders::SIM_PRODUCT), format!("{}-2", orders::SIM_PRODUCT));
                let mut second = v1_ppu_new(&order, &item_b, "0", "ppuB");
                second.distinct_from = vec!["ppuA".into()];
                // KooGallery's retry of the first item (a new businessId and timeStamp):
                // the same instance and the same answer, byte for byte.
                let mut retry = v1_ppu_new(&order, &item_a, "0", "ppuA");
                retry.same_answer_as = Some(0);
                let mut pkg = v1_ppu_new(&package, &item_a, "5", "ppuPkg");
                pkg.distinct_from = vec!["ppuA".into(), "ppuB".into()];
                let release = |var: &str, order: &str| {
                    v1("releaseInstance", Some(order))
                        .instance(var)
                        .text("orderId", order)
                        .text("orderAmount", "0")
                        .test_flag(false)
                };
                (
                    V1_PAY_PER_USE,
                    "a V1 pay-per-use order with two billing items (one orderId, two productIds: two instances), a retry, a pay-per-use package, queryInstance with usageInfo arrays, instanceStatus FREEZE and NORMAL, releaseInstance",
                    vec![
                        v1_ppu_new(&order, &item_a, "0", "ppuA"),
                        second,
                        retry,
                        pkg,
                        v1_query(&["ppuA", "ppuB", "ppuPkg"]),
                        v1_status("ppuA", "FREEZE"),
                        v1_status("ppuA", "NORMAL"),
                        v1_query(&["ppuA"]),
                        release("ppuA", &order),
                        release("ppuB", &order),
                        release("ppuPkg", &package),
                    ],
                )
            }
            USAGE_SCENARIO => {
                let day = previous_day(chrono::Utc::now().timestamp());
                let plan = UsagePlan::hourly(3, &USAGE_WORKSPACES, run_id, day, USAGE_HOURS);
                let mut query = Step::new(Generation::V2, "queryInstance", None)
                    .field("instanceId", Field::Instances(USAGE_WORKSPACES.iter().map(|v| (*v).to_owned()).collect()))
                    .test_flag(false);
                query.expect_usage = plan.totals().into_iter().collect();
                usage = Some(plan);
                let mut steps: Vec<Step> = orders::USAGE_ORDERS
                    .iter()
                    .zip(USAGE_WORKSPACES)
                    .map(|(order, var)| v2_new(&id(order.id), false, var))
                    .collect();
                steps.push(query);
                (
                    USAGE_SCENARIO,
                    "one customer buys a pay-per-use product for 3 workspaces (V2 newInstance, ON_DEMAND); a day of hourly usage of each is posted to the gateway's admin API; KooGallery must receive every record once and queryInstance must answer each total",
                    steps,
                )
            }
            _ => return None,
        };
        Some(Scenario { name, about, steps, usage })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_a_scenario_and_orders_carry_the_run_id() {
        let all = Scenario::all("RTEST1");
        assert_eq!(all.iter().map(|s| s.name).collect::<Vec<_>>(), NAMES);
        assert_eq!(all.iter().map(|s| s.steps.len()).sum::<usize>(), 39);
        assert_eq!(all.iter().filter(|s| s.usage.is_some()).map(|s| s.name).collect::<Vec<_>>(), [USAGE_SCENARIO]);
        for s in &all {
            for step in &s.steps {
                if let Some(order) = &step.order_id {
                    assert!(s.name == "debug-probes" || order.ends_with("-RTEST1"), "{order}");
                }
            }
        }
        assert!(Scenario::named("nope", "R1").is_none());
    }

    #[test]
    fn every_v2_template_the_scenarios_use_is_in_the_book() {
        let book = orders::OrderBook::generated().with_usage_orders();
        for s in Scenario::all("RBOOK") {
            for step in s.steps.iter().filter(|s| s.generation == Generation::V2) {
                if let Some(order) = &step.order_id {
                    assert!(book.lookup(order, Some(&line_id(order))).is_some(), "{order} not in the book");
                }
            }
        }
    }

    #[test]
    fn rendering_fills_captures_and_a_fresh_business_id() {
        let step = v2_new("SIMSUBNEW-R1", false, "sub");
        let vars = BTreeMap::new();
        let (Rendered::V2(a), Rendered::V2(b)) = (step.render(&vars), step.render(&vars)) else { panic!() };
        assert_ne!(a, b, "businessId is new on every attempt");
        let json: serde_json::Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(json["activity"], "newInstance");
        assert_eq!(json["orderLineId"], "SIMSUBNEW-R1-000001");
        assert_eq!(
            step.expect_instance.as_deref(),
            Some(instance_id_for("SIMSUBNEW-R1", Some("SIMSUBNEW-R1-000001")).as_str())
        );

        let query = Step::new(Generation::V2, "queryInstance", None)
            .field("instanceId", Field::Instances(vec!["a".into(), "b".into()]));
        let mut vars = BTreeMap::new();
        vars.insert("a".to_owned(), "id-a".to_owned());
        assert_eq!(query.missing(&vars), Some("b"));
        vars.insert("b".to_owned(), "id-b".to_owned());
        assert_eq!(query.missing(&vars), None);
        assert_eq!(query.queried_instances(&vars), ["id-a", "id-b"]);
        let Rendered::V2(body) = query.render(&vars) else { panic!() };
        assert_eq!(String::from_utf8(body).unwrap(), r#"{"activity":"queryInstance","instanceId":"id-a,id-b"}"#);
    }

    #[test]
    fn the_usage_plan_is_a_day_of_hourly_records_per_workspace() {
        let day = previous_day(1_767_323_045); // 2026-01-02T03:04:05Z
        assert_eq!(day, 1_767_225_600); // 2026-01-01T00:00:00Z
        assert_eq!(previous_day(1_767_225_600), 1_767_139_200);
        let s = Scenario::named(USAGE_SCENARIO, "RUSE1").unwrap();
        let plan = s.usage.as_ref().unwrap();
        assert_eq!(plan.after, 3);
        assert_eq!(plan.records.len(), 72);
        assert!(s.steps[..3].iter().all(Step::is_new_instance));
        assert_eq!(s.steps[3].activity, "queryInstance");
        let sns: std::collections::BTreeSet<&str> = plan.records.iter().map(|r| r.metering_sn.as_str()).collect();
        assert_eq!(sns.len(), 72, "every metering_sn is unique");
        assert!(sns.iter().all(|sn| sn.len() <= 64 && sn.contains("-RUSE1-")));
        let a = UsagePlan::hourly(0, &["a", "b"], "R1", day, 24);
        assert_eq!(a.records[0].metering_sn, "SIMPPU-R1-a-2026010100");
        assert_eq!(a.records[23].metering_sn, "SIMPPU-R1-a-2026010123");
        assert_eq!((a.records[1].begin, a.records[1].end), (day + 3600, day + 7200));
        // a: 24 × 1.2345 + 0.1001 × (0 + … + 23); b: 24 × 2.469 + the same
        assert_eq!(a.totals(), BTreeMap::from([("a".into(), 572_556), ("b".into(), 868_836)]));
        let expected: Vec<(String, i64)> = plan.totals().into_iter().collect();
        assert_eq!(s.steps[3].expect_usage, expected);
        assert_eq!(s.steps[3].needs(), USAGE_WORKSPACES);
    }
}
