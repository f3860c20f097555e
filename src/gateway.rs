//! The gateway's decisions: from a raw KooGallery request to a signed answer.
//!
//! `handle_v2`/`handle_v1` verify, parse, plan and apply; [`Planner`] is the
//! pure part that turns a parsed call into a store [`Plan`] (what to write and
//! answer for every state the instance may be in), so the state machine of
//! instances is written once, here, and both stores only interpret it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use crate::events::{Contact, Credentials, EventType, SettlementKind, SkuMap};
use crate::metrics as m;
use crate::protocol::answer::{code_of, Answer, AppInfo, InstanceInfo, UsageInfo};
use crate::protocol::call::{Activity, Call, Purchase, Scene};
use crate::protocol::crypto::{self, EncryptType};
use crate::protocol::sign::body_sign;
use crate::protocol::verify::{verify_v1, verify_v2, AccessKeys};
use crate::protocol::{call, unconfirmed, Generation, Rejection, ResultCode};
use crate::secret::Secret;
use crate::store::keys::{
    self, instance_id_for, instance_id_for_item, instance_shard, item_purchase_dedup, order_line_field, v1_call_dedup,
};
use crate::store::plan::{ABSENT, ANY};
use crate::store::{Branch, EventSpec, Outcome, Plan, Record, Store, StoreError};

use crate::domain::field;
use crate::domain::status::{ACTIVE, EXPIRED, FROZEN, RELEASED};

/// Settings the gateway's decisions depend on.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Allowed |now − timestamp| of a V2 call, seconds.
    pub window_secs: u64,
    /// Allowed |now − timeStamp| of a V1 call, seconds (`KOOGATE_V1_TIMESTAMP_SKEW_SECS`).
    pub v1_window_secs: u64,
    /// `appInfo.frontEndUrl`.
    pub frontend_url: String,
    /// `appInfo.adminUrl`.
    pub admin_url: Option<String>,
    /// `encryptType` of newInstance answers.
    pub encrypt_type: EncryptType,
    /// Issue an initial user name and password in newInstance answers.
    pub issue_credentials: bool,
    pub sku_map: SkuMap,
    /// Longest wait for the store before answering 000005.
    pub store_timeout: Duration,
}

/// A signed answer, and what to log about the call.
#[derive(Debug)]
pub struct Reply {
    pub http_status: u16,
    pub body: String,
    pub body_sign: String,
    pub code: ResultCode,
    pub log: CallLog,
}

/// The facts of one call for its log line and metrics. No secrets in here.
#[derive(Debug, Default)]
pub struct CallLog {
    pub generation: &'static str,
    pub activity: &'static str,
    pub order_id: Option<String>,
    pub instance_id: Option<String>,
    pub test: bool,
    /// Why the call was refused (the resultMsg).
    pub reason: Option<String>,
    /// Answered from a kept answer (a retry).
    pub dedup: bool,
    pub event_id: Option<String>,
}

pub struct Gateway {
    keys: AccessKeys,
    store: Arc<dyn Store>,
    settings: Settings,
}

/// RFC 3339 UTC with milliseconds, as every time in events.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl Gateway {
    pub fn new(keys: AccessKeys, store: Arc<dyn Store>, settings: Settings) -> Self {
        Self { keys, store, settings }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The key answers are signed with when no call verified (refusals).
    pub fn current_key(&self) -> &Secret {
        self.keys.current()
    }

    /// A V2 call: `POST` with a JSON body and `signature`/`timestamp`/`nonce`.
    pub async fn handle_v2(&self, raw_query: &str, body: &[u8], now_ms: i64) -> Reply {
        let mut log = CallLog { generation: "v2", activity: "unknown", ..CallLog::default() };
        let started = Instant::now();
        let verified = verify_v2(&self.keys, raw_query, body, now_ms, self.settings.window_secs);
        let started = m::stage_since(m::Stage::Verify, started);
        let verified = match verified {
            Ok(v) => v,
            Err(rejection) => return self.reject(self.keys.current(), peek_v2(log, body), &rejection),
        };
        let parsed = call::parse_v2(body);
        m::stage_since(m::Stage::Parse, started);
        let call = match parsed {
            Ok(call) => call,
            Err(rejection) => return self.reject(verified.key, peek_v2(log, body), &rejection),
        };
        self.run(&call, Some(&verified.nonce), None, verified.key, now_ms, &mut log).await.finish(log)
    }

    /// A V1 call: `GET` with everything in the query string.
    pub async fn handle_v1(&self, raw_query: &str, now_ms: i64) -> Reply {
        let mut log = CallLog { generation: "v1", activity: "unknown", ..CallLog::default() };
        let started = Instant::now();
        let verified = verify_v1(&self.keys, raw_query, now_ms, self.settings.v1_window_secs);
        let started = m::stage_since(m::Stage::Verify, started);
        let verified = match verified {
            Ok(v) => v,
            Err(rejection) => {
                let params = form_urlencoded::parse(raw_query.as_bytes()).into_owned().collect();
                return self.reject(self.keys.current(), peek(log, &params), &rejection);
            }
        };
        let parsed = call::parse_v1(&verified.params, verified.key.expose(), self.settings.encrypt_type);
        m::stage_since(m::Stage::Parse, started);
        let call = match parsed {
            Ok(call) => call,
            Err(rejection) => return self.reject(verified.key, peek(log, &verified.params), &rejection),
        };
        if let Activity::NewInstance { purchase, order_id, .. } = &call.activity {
            for u in &purchase.undecryptable {
                m::undecryptable_field(u.field);
                // The reason only: never the ciphertext, the key or a decrypted byte.
                tracing::warn!(
                    field = u.field,
                    reason = %u.why,
                    order_id = %order_id,
                    encrypt_type = self.settings.encrypt_type.code(),
                    "V1 contact field cannot be decrypted with the access key and KOOGATE_ENCRYPT_TYPE; the purchase goes on without it"
                );
            }
        }
        // No store nonce on V1: a repeated URL is answered from its kept answer (v1_replay_guard).
        self.run(&call, None, Some(&verified.auth_token), verified.key, now_ms, &mut log).await.finish(log)
    }

    /// A refusal before anything was written: signed with `key`, code of the rejection.
    pub fn reject(&self, key: &Secret, mut log: CallLog, rejection: &Rejection) -> Reply {
        m::rejected(log.generation, rejection.reason());
        log.reason = Some(rejection.to_string());
        let code = rejection.code();
        let http_status = if matches!(rejection, Rejection::BodyTooLarge { .. }) { 413 } else { 200 };
        signed(key, http_status, Answer::new(code, rejection.to_string()).to_body(), code, log)
    }

    /// An answer to a call KooGallery should retry (overload, shutdown).
    pub fn unavailable(&self, generation: &'static str, why: &str) -> Reply {
        let log = CallLog { generation, activity: "unknown", reason: Some(why.to_owned()), ..CallLog::default() };
        let code = ResultCode::InternalError;
        signed(self.keys.current(), 503, Answer::new(code, why).to_body(), code, log)
    }

    async fn run<'k>(
        &self,
        call: &Call,
        nonce: Option<&str>,
        v1_auth_token: Option<&str>,
        key: &'k Secret,
        now_ms: i64,
        log: &mut CallLog,
    ) -> Pending<'k> {
        log.activity = call.activity.name(call.generation);
        log.order_id = call.activity.order_id().map(str::to_owned);
        log.instance_id = call.activity.instance_id().map(str::to_owned);
        log.test = call.test;
        let planned = Instant::now();
        let planner = Planner { settings: &self.settings, key, now_ms };
        let mut plan = planner.plan(call, nonce);
        if let Some(token) = v1_auth_token {
            v1_replay_guard(&mut plan, token);
        }
        log.instance_id = log.instance_id.take().or_else(|| Some(plan.subject.clone()));
        let started = m::stage_since(m::Stage::Plan, planned);

        let applied = tokio::time::timeout(self.settings.store_timeout, self.store.apply(&plan)).await;
        let elapsed = started.elapsed();
        m::stage(m::Stage::Store, elapsed);
        m::store_latency(self.store.backend(), elapsed);
        let outcome = match applied {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                m::store_error(self.store.backend(), e.kind());
                tracing::error!(error = %e, activity = log.activity, "store failed; answering 000005 so KooGallery retries");
                return Pending::internal(key, "internal error: the gateway could not store the call; please retry");
            }
            Err(_) => {
                m::store_error(self.store.backend(), "timeout");
                tracing::error!(timeout = ?self.settings.store_timeout, activity = log.activity, "store timed out; answering 000005 so KooGallery retries");
                return Pending::internal(key, "internal error: the gateway's store timed out; please retry");
            }
        };
        match outcome {
            Outcome::Replay => {
                let rejection = Rejection::ReplayedNonce;
                m::rejected(log.generation, rejection.reason());
                log.reason = Some(rejection.to_string());
                Pending::answer(key, Answer::new(rejection.code(), rejection.to_string()).to_body())
            }
            Outcome::Kept { answer, .. } => {
                log.dedup = true;
                m::dedup_hit(log.generation, log.activity);
                Pending::answer(key, answer)
            }
            Outcome::Applied { answer, event_id, .. } => {
                if let Some(id) = &event_id {
                    m::event_created();
                    log.event_id = Some(id.clone());
                }
                Pending::answer(key, answer)
            }
            Outcome::Read { records } => match self.package_usage(&plan.read, &records).await {
                Ok(linked) => Pending::answer(key, planner.query_answer(&plan.read, &records, &linked)),
                Err(e) => {
                    m::store_error(self.store.backend(), e.kind());
                    tracing::error!(error = %e, "store failed reading a package's linked usage; answering 000005");
                    Pending::internal(
                        key,
                        "internal error: the gateway could not read the package's usage; please retry",
                    )
                }
            },
        }
    }
}

/// Activity names a refusal's log line may carry (anything else stays "unknown").
const ACTIVITY_NAMES: &[&str] = &[
    "newInstance",
    "refreshInstance",
    "updateInstanceStatus",
    "instanceStatus",
    "expireInstance",
    "releaseInstance",
    "queryInstance",
    "orderNotify",
    "upgradeInstance",
    "upgrade",
    "changeInstanceCheck",
];

/// What a refused call said it was (activity, order id), when that much could be read: for the log line only.
fn peek(mut log: CallLog, fields: &std::collections::BTreeMap<String, String>) -> CallLog {
    if let Some(name) = fields.get("activity").and_then(|a| ACTIVITY_NAMES.iter().find(|n| **n == a.as_str())) {
        log.activity = name;
    }
    log.order_id = fields
        .get("orderId")
        .filter(|o| o.len() <= 64 && o.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .cloned();
    log
}

fn peek_v2(log: CallLog, body: &[u8]) -> CallLog {
    let fields: std::collections::BTreeMap<String, String> = serde_json::from_slice::<Map<String, Value>>(body)
        .map(|m| m.into_iter().filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_owned()))).collect())
        .unwrap_or_default();
    peek(log, &fields)
}

impl Gateway {
    /// See [`linked_usage`]: package queries only, every other query stays one round trip.
    async fn package_usage(&self, ids: &[String], records: &[Record]) -> Result<LinkedUsage, StoreError> {
        linked_usage(self.store.as_ref(), ids, records).await
    }
}

/// For each pay-per-use package instance among the records a queryInstance
/// read, the records of the instances whose usage was deducted from it: its
/// queryInstance lists every billing item linked to the package. A read of
/// the package's links and one of those records (package queries only).
/// Public so that the stores' differential test answers queries as the gateway does.
pub async fn linked_usage(store: &dyn Store, ids: &[String], records: &[Record]) -> Result<LinkedUsage, StoreError> {
    let mut out = LinkedUsage::new();
    for (id, record) in ids.iter().zip(records) {
        if record.get("charging_mode").map(String::as_str) != Some(call::PAY_PER_USE_PACKAGE) {
            continue;
        }
        let links = store.usage_package_links(id).await?;
        let linked = store.instance_records(&links).await?;
        out.insert(id.clone(), links.into_iter().zip(linked).collect());
    }
    Ok(out)
}

/// Package instance id → (linked instance id, its record).
pub type LinkedUsage = std::collections::BTreeMap<String, Vec<(String, Record)>>;

/// An answer body waiting to be signed and logged.
struct Pending<'k> {
    key: &'k Secret,
    body: String,
}

impl<'k> Pending<'k> {
    fn answer(key: &'k Secret, body: String) -> Self {
        Self { key, body }
    }
    fn internal(key: &'k Secret, msg: &str) -> Self {
        Self { key, body: Answer::new(ResultCode::InternalError, msg).to_body() }
    }
    fn finish(self, mut log: CallLog) -> Reply {
        let code = code_of(&self.body).unwrap_or(ResultCode::InternalError);
        if code != ResultCode::Success && log.reason.is_none() {
            log.reason = serde_json::from_str::<Answer>(&self.body).ok().map(|a| a.result_msg);
        }
        signed(self.key, 200, self.body, code, log)
    }
}

fn signed(key: &Secret, http_status: u16, body: String, code: ResultCode, log: CallLog) -> Reply {
    m::call(log.generation, log.activity, code.as_str());
    let started = Instant::now();
    let body_sign = body_sign(key.expose(), body.as_bytes());
    m::stage_since(m::Stage::Sign, started);
    Reply { http_status, body, body_sign, code, log }
}

/// KooGallery probes production twice a day with debug calls on the same mock
/// orders. A mock order line always maps to the same instance, so once a probe
/// released it, the next cycle's probes would meet a released instance and get
/// 000003. For debug calls (and only those) a released instance behaves as an
/// active one again.
fn revive_released_test_instance(plan: &mut Plan) {
    let released_is_refused =
        plan.branches.get(RELEASED).is_some_and(|b| b.code == ResultCode::InstanceNotFound.as_str());
    if let (true, Some(active)) = (released_is_refused, plan.branches.get(ACTIVE).cloned()) {
        let mut revived = active;
        if revived.event.is_some() || !revived.set.is_empty() {
            revived.set.entry("status".into()).or_insert_with(|| ACTIVE.into());
        }
        plan.branches.insert(RELEASED.into(), revived);
    }
}

/// Issue 15.5: `authToken` is the V1 nonce ([`unconfirmed::V1_NONCE_PARAM`]).
/// A V1 call that changes state and has no kept answer of its own
/// (instanceStatus, expireInstance, releaseInstance) keeps its successful
/// answer under its token, so a replay of the same URL inside the window is
/// answered byte for byte as the first call and changes nothing. Purchases,
/// renewals and upgrades already keep theirs (by order); reads change nothing.
/// Refusals are not kept: a repeat is decided again (it changed nothing either).
pub fn v1_replay_guard(plan: &mut Plan, auth_token: &str) {
    if plan.dedup.is_some() || !plan.read.is_empty() {
        return;
    }
    plan.dedup = Some(v1_call_dedup(auth_token));
    for branch in plan.branches.values_mut() {
        if branch.code == ResultCode::Success.as_str() {
            branch.keep = true;
        }
    }
}

/// Turns a call into a plan. Pure: no I/O, the clock is `now_ms`.
pub struct Planner<'a> {
    pub settings: &'a Settings,
    /// The key that verified the call (encrypts appInfo fields).
    pub key: &'a Secret,
    pub now_ms: i64,
}

fn success() -> String {
    Answer::success().to_body()
}

fn not_found(instance_id: &str, why: &str) -> Branch {
    let answer = Answer::new(ResultCode::InstanceNotFound, format!("instance {instance_id} {why}")).to_body();
    Branch { code: ResultCode::InstanceNotFound.as_str().into(), answer, ..Branch::default() }
}

fn ok_noop() -> Branch {
    Branch { code: ResultCode::Success.as_str().into(), answer: success(), ..Branch::default() }
}

fn put(map: &mut Record, field: &str, value: Option<&str>) {
    if let Some(v) = value {
        map.insert(field.to_owned(), v.to_owned());
    }
}

fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.to_owned()
}

impl Planner<'_> {
    fn now(&self) -> String {
        rfc3339(ms_to_time(self.now_ms))
    }

    fn plan_for(&self, subject: &str, nonce: Option<&str>) -> Plan {
        Plan {
            shard: instance_shard(subject),
            nonce: nonce.map(str::to_owned),
            // Long enough to cover the whole window on both sides of the clock.
            nonce_ttl_secs: self.settings.window_secs.saturating_mul(2).max(1),
            dedup: None,
            dedup_legacy: None,
            subject: subject.to_owned(),
            order: None,
            branches: Default::default(),
            read: Vec::new(),
            now_ms: self.now_ms,
        }
    }

    fn event(&self, kind: EventType, test: bool, change: Map<String, Value>) -> Option<EventSpec> {
        Some(EventSpec {
            kind: kind.as_str().to_owned(),
            occurred_at: self.now(),
            test,
            change: Value::Object(change).to_string(),
        })
    }

    /// A transition: set `set` (plus `updated_at`), emit `kind`, answer success.
    fn transition(
        &self,
        mut set: Record,
        kind: EventType,
        call: &Call,
        change: Map<String, Value>,
        keep: bool,
    ) -> Branch {
        set.insert(field::UPDATED_AT.into(), self.now());
        Branch {
            code: ResultCode::Success.as_str().into(),
            answer: success(),
            keep,
            set,
            event: self.event(kind, call.test, change),
            ..Branch::default()
        }
    }

    /// The plan of a call, for every status its instance may have.
    pub fn plan(&self, call: &Call, nonce: Option<&str>) -> Plan {
        let mut plan = self.plan_activity(call, nonce);
        // A nonce is remembered for the whole window on both sides of the clock.
        let window = match call.generation {
            Generation::V1 => self.settings.v1_window_secs,
            Generation::V2 => self.settings.window_secs,
        };
        plan.nonce_ttl_secs = window.saturating_mul(2).max(1);
        if call.test {
            revive_released_test_instance(&mut plan);
        }
        plan
    }

    fn plan_activity(&self, call: &Call, nonce: Option<&str>) -> Plan {
        match &call.activity {
            Activity::NewInstance { order_id, order_line_id, business_id, purchase } => {
                self.plan_new(call, nonce, order_id, order_line_id.as_deref(), business_id, purchase)
            }
            Activity::RefreshInstance {
                instance_id,
                order_id,
                order_line_id,
                scene,
                expire_time,
                product_id,
                amount,
                period_type,
                period_number,
            } => {
                let mut plan = self.plan_for(instance_id, nonce);
                plan.set_dedup(keys::dedup_refresh(instance_id, order_id, order_line_id.as_deref(), scene.as_str()));
                let expire = expire_time.map(rfc3339);
                let mut set = Record::new();
                put(&mut set, "expire_time", expire.as_deref());
                put(&mut set, "product_id", product_id.as_deref());
                put(&mut set, "period_type", period_type.as_deref());
                put(&mut set, "period_number", period_number.as_deref());
                if *scene == Scene::TrialToFormal {
                    set.insert("trial".into(), flag(false));
                }
                let mut change = Map::new();
                change.insert("order_id".into(), json!(order_id));
                change.insert("order_line_id".into(), json!(order_line_id));
                change.insert("scene".into(), json!(scene.as_str()));
                change.insert("amount".into(), json!(amount));
                let kind = match scene {
                    Scene::Renewal => EventType::Renewed,
                    Scene::TrialToFormal => EventType::Converted,
                    Scene::UnsubscribeRenewalPeriod => EventType::RenewalCancelled,
                    Scene::RenewalChange => EventType::Changed,
                };
                // A renewal keeps a frozen instance frozen (UNFREEZE follows);
                // an expired V1 instance is active again.
                plan.branches.insert(ACTIVE.into(), self.transition(set.clone(), kind, call, change.clone(), true));
                plan.branches.insert(FROZEN.into(), self.transition(set.clone(), kind, call, change.clone(), true));
                set.insert(field::STATUS.into(), ACTIVE.into());
                plan.branches.insert(EXPIRED.into(), self.transition(set, kind, call, change, true));
                plan.branches.insert(RELEASED.into(), not_found(instance_id, "was released"));
                plan.branches.insert(ANY.into(), not_found(instance_id, "does not exist"));
                plan
            }
            Activity::UpdateStatus { instance_id, freeze } => {
                let mut plan = self.plan_for(instance_id, nonce);
                let (to, kind, from): (&str, EventType, &[&str]) = if *freeze {
                    (FROZEN, EventType::Frozen, &[ACTIVE])
                } else {
                    (ACTIVE, EventType::Unfrozen, &[FROZEN, EXPIRED])
                };
                for status in from {
                    let set = Record::from([(field::STATUS.to_owned(), to.to_owned())]);
                    let change = Map::from_iter([("previous_status".to_owned(), json!(status))]);
                    plan.branches.insert((*status).into(), self.transition(set, kind, call, change, false));
                }
                for status in [ACTIVE, FROZEN, EXPIRED] {
                    plan.branches.entry(status.into()).or_insert_with(ok_noop);
                }
                plan.branches.insert(RELEASED.into(), not_found(instance_id, "was released"));
                plan.branches.insert(ANY.into(), not_found(instance_id, "does not exist"));
                plan
            }
            Activity::ExpireInstance { instance_id, order_id } => {
                let mut plan = self.plan_for(instance_id, nonce);
                let change = Map::from_iter([(field::ORDER_ID.to_owned(), json!(order_id))]);
                for status in [ACTIVE, FROZEN] {
                    let set = Record::from([(field::STATUS.to_owned(), EXPIRED.to_owned())]);
                    plan.branches
                        .insert(status.into(), self.transition(set, EventType::Expired, call, change.clone(), false));
                }
                plan.branches.insert(EXPIRED.into(), ok_noop());
                plan.branches.insert(RELEASED.into(), not_found(instance_id, "was released"));
                plan.branches.insert(ANY.into(), not_found(instance_id, "does not exist"));
                plan
            }
            Activity::ReleaseInstance { instance_id, order_id, order_line_id } => {
                let mut plan = self.plan_for(instance_id, nonce);
                let mut change = Map::new();
                change.insert("order_id".into(), json!(order_id));
                change.insert("order_line_id".into(), json!(order_line_id));
                for status in [ACTIVE, FROZEN, EXPIRED] {
                    let set = Record::from([
                        ("status".to_owned(), RELEASED.to_owned()),
                        ("released_at".to_owned(), self.now()),
                    ]);
                    plan.branches
                        .insert(status.into(), self.transition(set, EventType::Released, call, change.clone(), false));
                }
                // Releasing twice answers success and does nothing again.
                plan.branches.insert(RELEASED.into(), ok_noop());
                plan.branches.insert(ANY.into(), not_found(instance_id, "does not exist"));
                plan
            }
            Activity::QueryInstance { instance_ids } => {
                let mut plan = self.plan_for(&instance_ids[0], nonce);
                plan.read = instance_ids.clone();
                plan
            }
            Activity::OrderNotify { order_id, order_line_id } => {
                let subject = instance_id_for(order_id, Some(order_line_id));
                let mut plan = self.plan_for(&subject, nonce);
                plan.set_dedup(keys::dedup_notify(order_id, order_line_id));
                let mut change = Map::new();
                change.insert("order_id".into(), json!(order_id));
                change.insert("order_line_id".into(), json!(order_line_id));
                let mut branch = self.transition(Record::new(), EventType::OrderUpdated, call, change, true);
                branch.set.clear();
                plan.branches.insert(ANY.into(), branch);
                plan
            }
            Activity::Upgrade { instance_id, order_id, order_line_id, sku_code, product_id, quantity } => {
                let mut plan = self.plan_for(instance_id, nonce);
                plan.set_dedup(keys::dedup_upgrade(instance_id, order_id, order_line_id.as_deref()));
                let mut set = Record::new();
                put(&mut set, "sku_code", sku_code.as_deref());
                put(&mut set, "product_id", product_id.as_deref());
                put(&mut set, "quantity", quantity.as_deref());
                if sku_code.is_some() {
                    let cards = quantity.as_deref().and_then(|q| q.parse().ok());
                    if let Some(s) = self.settings.sku_map.settle(sku_code.as_deref(), cards, None) {
                        set.insert("settlement".into(), json!(s).to_string());
                    }
                }
                let mut change = Map::new();
                change.insert("order_id".into(), json!(order_id));
                change.insert("order_line_id".into(), json!(order_line_id));
                for status in [ACTIVE, FROZEN, EXPIRED] {
                    plan.branches.insert(
                        status.into(),
                        self.transition(set.clone(), EventType::Changed, call, change.clone(), true),
                    );
                }
                plan.branches.insert(RELEASED.into(), not_found(instance_id, "was released"));
                plan.branches.insert(ANY.into(), not_found(instance_id, "does not exist"));
                plan
            }
            Activity::ChangeInstanceCheck { instance_id, product_info } => {
                let mut plan = self.plan_for(instance_id, nonce);
                let target = product_info.as_ref().and_then(unconfirmed::change_check_sku);
                let allowed = match target.map(|sku| self.settings.sku_map.kind_of(sku)) {
                    Some(Some(SettlementKind::StoredValueCard)) => Err(format!(
                        "invalid request: a subscription cannot change into the stored-value card SKU {}",
                        target.unwrap_or_default()
                    )),
                    _ => Ok(()),
                };
                let branch = match allowed {
                    Ok(()) => ok_noop(),
                    Err(msg) => Branch {
                        code: ResultCode::InvalidParam.as_str().into(),
                        answer: Answer::new(ResultCode::InvalidParam, msg).to_body(),
                        ..Branch::default()
                    },
                };
                for status in [ACTIVE, FROZEN, EXPIRED] {
                    plan.branches.insert(status.into(), branch.clone());
                }
                plan.branches.insert(RELEASED.into(), not_found(instance_id, "was released"));
                plan.branches.insert(ANY.into(), not_found(instance_id, "does not exist"));
                plan
            }
        }
    }

    fn plan_new(
        &self,
        call: &Call,
        nonce: Option<&str>,
        order_id: &str,
        order_line_id: Option<&str>,
        business_id: &str,
        purchase: &Purchase,
    ) -> Plan {
        // Pay-per-use: one instance per billing item, keyed on orderId +
        // productId (Huawei's V1 subscription and V2 newInstance pages). A V2
        // call names no productId: its order line keeps one instance
        // (unconfirmed::V2_PAY_PER_USE_INSTANCE_PER_LINE).
        let item = purchase.product_id.as_deref().filter(|_| call::is_pay_per_use(purchase.charging_mode.as_deref()));
        let (instance_id, dedup) = match item {
            Some(product_id) => (
                instance_id_for_item(order_id, order_line_id, product_id),
                item_purchase_dedup(order_id, order_line_id, product_id),
            ),
            None => (instance_id_for(order_id, order_line_id), keys::dedup_new(order_id, order_line_id)),
        };
        let mut plan = self.plan_for(&instance_id, nonce);
        plan.set_dedup(dedup);
        plan.order = Some(order_id.to_owned());

        let key = crypto::derive_key(self.key.expose(), self.settings.encrypt_type);
        let credentials = self.settings.issue_credentials.then(|| Credentials {
            user_name: format!("kg{}", &instance_id.replace('-', "")[..12]),
            password: crypto::random_iv(),
        });
        let app_info = AppInfo {
            front_end_url: self.settings.frontend_url.clone(),
            admin_url: self.settings.admin_url.clone(),
            user_name: credentials.as_ref().and_then(|c| crypto::encrypt(&key, &c.user_name).ok()),
            password: credentials.as_ref().and_then(|c| crypto::encrypt(&key, &c.password).ok()),
            memo: None,
        };
        let mut answer = Answer::success();
        answer.instance_id = Some(instance_id.clone());
        answer.encrypt_type = Some(self.settings.encrypt_type.code().to_owned());
        answer.app_info = Some(app_info.clone());
        let answer = answer.to_body();

        let now = self.now();
        let mut set = Record::new();
        set.insert(field::STATUS.into(), ACTIVE.into());
        set.insert("instance_id".into(), instance_id.clone());
        set.insert(field::ORDER_ID.into(), order_id.to_owned());
        put(&mut set, field::ORDER_LINE_ID, order_line_id);
        set.insert("business_id".into(), business_id.to_owned());
        set.insert("protocol".into(), call.generation.as_str().into());
        set.insert("test".into(), flag(call.test));
        set.insert("trial".into(), flag(purchase.trial));
        set.insert(field::CREATED_AT.into(), now.clone());
        set.insert("app_info".into(), json!(app_info).to_string());
        put(&mut set, field::CUSTOMER_ID, purchase.customer_id.as_deref());
        put(&mut set, "customer_name", purchase.customer_name.as_deref());
        put(&mut set, "user_id", purchase.user_id.as_deref());
        put(&mut set, "user_name", purchase.user_name.as_deref());
        put(&mut set, "product_id", purchase.product_id.as_deref());
        put(&mut set, "sku_code", purchase.sku_code.as_deref());
        put(&mut set, "charging_mode", purchase.charging_mode.as_deref());
        put(&mut set, "period_type", purchase.period_type.as_deref());
        put(&mut set, "period_number", purchase.period_number.as_deref());
        put(&mut set, "amount", purchase.amount.as_deref());
        put(&mut set, "quantity", purchase.quantity.as_deref());
        put(&mut set, "expire_time", purchase.expire_time.map(rfc3339).as_deref());
        let cards = purchase.quantity.as_deref().and_then(|q| q.parse().ok());
        if let Some(s) = self.settings.sku_map.settle(purchase.sku_code.as_deref(), cards, purchase.amount.as_deref()) {
            set.insert("settlement".into(), json!(s).to_string());
        }

        let mut order_set = Record::new();
        order_set.insert(order_line_field(order_line_id, item), instance_id.clone());
        order_set.insert(field::CREATED_AT.into(), now);
        put(&mut order_set, field::CUSTOMER_ID, purchase.customer_id.as_deref());

        let mut change = Map::new();
        change.insert("order_id".into(), json!(order_id));
        change.insert("order_line_id".into(), json!(order_line_id));
        if purchase.mobile_phone.is_some() || purchase.email.is_some() || !purchase.undecryptable.is_empty() {
            let contact = Contact {
                mobile_phone: purchase.mobile_phone.clone(),
                email: purchase.email.clone(),
                undecryptable: purchase.undecryptable.iter().map(|u| u.field.to_owned()).collect(),
            };
            change.insert("contact".into(), json!(contact));
        }
        if let Some(c) = &credentials {
            change.insert("credentials".into(), json!(c));
        }
        let mut create = self.transition(set, EventType::Created, call, change, true);
        create.answer = answer.clone();
        create.order_set = order_set;
        plan.branches.insert(ABSENT.into(), create);
        // The instance exists but its kept answer does not (cannot happen
        // through this gateway): answer again with the same instance id.
        plan.branches.insert(
            ANY.into(),
            Branch { code: ResultCode::Success.as_str().into(), answer, keep: true, ..Branch::default() },
        );
        plan
    }

    /// The queryInstance answer from the records read.
    pub fn query_answer(&self, ids: &[String], records: &[Record], linked: &LinkedUsage) -> String {
        let info: Vec<InstanceInfo> = ids
            .iter()
            .zip(records)
            .filter(|(_, r)| r.get(field::STATUS).is_some_and(|s| !s.is_empty()))
            .map(|(id, r)| InstanceInfo {
                instance_id: id.clone(),
                app_info: r.get("app_info").and_then(|a| serde_json::from_str(a).ok()).unwrap_or_else(|| AppInfo {
                    front_end_url: self.settings.frontend_url.clone(),
                    ..AppInfo::default()
                }),
                usage_info: usage_info(id, r, linked.get(id).map_or(&[][..], Vec::as_slice), self.now_ms),
            })
            .collect();
        if info.is_empty() {
            let msg = format!("no instance of {} exists", ids.join(","));
            return Answer::new(ResultCode::InstanceNotFound, msg).to_body();
        }
        let mut answer = Answer::success();
        answer.info = Some(info);
        answer.to_body()
    }
}

/// `usageInfo[]` of a pay-per-use instance (its charging mode says so, or
/// usage was pushed for it): one entry per billing item, the usage KooGallery
/// has taken and up to when. The instance's own item (records without
/// `relate_pkg_instance`) comes first, then one entry per package it is linked
/// to, naming it (`unconfirmed::USAGE_INFO_RELATED_INSTANCE`). A pay-per-use
/// package lists every billing item linked to it: the usage each linked
/// instance had deducted from it, naming that instance. An entry with nothing
/// pushed yet says `0` as of `now` (`unconfirmed::usage_statistical_time`).
fn usage_info(id: &str, record: &Record, linked: &[(String, Record)], now_ms: i64) -> Option<Vec<UsageInfo>> {
    let pushed = record.contains_key(field::USAGE_E4);
    let pay_per_use = record.get("charging_mode").is_some_and(|m| m.starts_with("ON_DEMAND"));
    if !pushed && !pay_per_use {
        return None;
    }
    let when = |end: Option<i64>| unconfirmed::usage_statistical_time(end.unwrap_or(now_ms.div_euclid(1000)));
    // Items of the package taken by linked instances (their `usage_e4:<package>`).
    let (e4_field, end_field) = crate::domain::item_usage_fields(id);
    let num = |r: &Record, f: &str| r.get(f).and_then(|v| v.parse::<i64>().ok());
    let deducted: Vec<UsageInfo> = linked
        .iter()
        .filter_map(|(other, r)| {
            let value = num(r, &e4_field).filter(|v| *v != 0)?;
            Some(UsageInfo {
                usage_value: crate::usage::record::format_e4(value),
                statistical_time: when(num(r, &end_field)),
                related_instance_id: Some(other.clone()),
            })
        })
        .collect();
    // KooGallery's view: what it took. A package item shows once something of
    // it was pushed; the instance's own item when something of it was, or
    // when nothing of a package was.
    let all = crate::usage::item_usage(record);
    let package_pushed = !deducted.is_empty() || all.iter().any(|i| i.related_instance.is_some() && i.pushed_e4 != 0);
    let shown = |i: &crate::usage::ItemUsage| i.pushed_e4 != 0 || (i.related_instance.is_none() && !package_pushed);
    let items = all.into_iter().filter(shown).map(|item| UsageInfo {
        usage_value: crate::usage::record::format_e4(item.pushed_e4),
        statistical_time: when(item.pushed_until),
        related_instance_id: item.related_instance,
    });
    Some(items.chain(deducted).collect())
}
