//! One contract, two interpreters: a differential test of the stores.
//!
//! The Redis store (Lua scripts) and the embedded store (redb, Rust) interpret
//! the same [`Plan`]s and implement the same roles. A seeded random sequence
//! of operations runs through both: every V2 and V1 activity built by the
//! gateway's [`Planner`] (retries with a new nonce, repeated nonces,
//! `testFlag=1`, calls on released or unknown instances, a small pool of
//! orders so that calls collide), interleaved with the delivery worker's
//! outbox cycle, redemption, enrichment, the order cache, the account index
//! and the usage ledger. Every answer is compared with `==` (byte for byte:
//! the same plan object carries the same encrypted bytes to both stores), and
//! the whole state (every record field of every instance and order of the
//! pool, outbox, dead letters, delivered sequences, usage) every few steps and
//! at the end.
//!
//! `KOOGATE_DIFF_SEED=<n>` replays one seed (`KOOGATE_DIFF_OPS=<n>` sets its
//! length); a failure prints the seed, the step, the operation, the
//! difference and the command that replays it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use koogate::events::SkuMap;
use koogate::gateway::{linked_usage, v1_replay_guard, Planner, Settings};
use koogate::protocol::call::{parse_v1, parse_v2};
use koogate::protocol::crypto::{self, EncryptType};
use koogate::secret::Secret;
use koogate::store::keys::{instance_id_for, instance_id_for_item};
use koogate::store::{
    self, AttemptRecord, Attempts, DeadLetter, Delivered, HistoryIndex, HistoryQuery, OutboxEntry, Outcome, Record,
    Settle, Store, StoreSpec,
};

/// The default retention of delivered events (`KOOGATE_EVENT_RETENTION_SECS`).
const RETENTION: Duration = Duration::from_secs(2_592_000);
use koogate::usage::{StoredUsage, UsageRecord, UsageSettle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Seeds run by default: with [`DEFAULT_OPS`] each, enough to reach every
/// branch of every activity and every ledger rule many times.
const DEFAULT_SEEDS: [u64; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
const DEFAULT_OPS: usize = 300;
/// The whole state is compared every this many steps (and at the end).
const STATE_EVERY: usize = 10;
/// Claims take everything: how Redis spreads a smaller `max` over its 16
/// shards (`ceil(max / shards)` each) differs from the embedded store's one
/// sequence by design; the contract is "oldest first per shard", compared below.
const CLAIM_ALL: usize = 10_000;

fn settings() -> Settings {
    Settings {
        // A long window: no nonce expires during a run (Redis expires by the
        // wall clock, the embedded store by the plan's clock, which advances
        // at most 4 s a step: over 40,000 steps before a nonce could expire).
        window_secs: 86_400,
        v1_window_secs: 14_400,
        frontend_url: "https://console.example.com".into(),
        admin_url: Some("https://admin.example.com".into()),
        encrypt_type: EncryptType::Aes256,
        // Random credentials in every purchase's answer: the plan carries them to both stores.
        issue_credentials: true,
        sku_map: SkuMap::load(&fixtures().join("sku-map.toml")).unwrap(),
        store_timeout: Duration::from_secs(3),
    }
}

// ---------------------------------------------------------------- the pool

const V2_ORDERS: [&str; 3] = ["CSDIFF2A0000000001", "CSDIFF2B0000000002", "MOCKDIFF2C00000003"];
const V2_LINES: [&str; 2] = ["-000001", "-000002"];
const V1_ORDERS: [&str; 3] = ["CSDIFF1A0000000011", "CSDIFF1B0000000012", "MOCKDIFF1C00000013"];
/// V1 pay-per-use (chargingMode 0) and pay-per-use package (5) purchases: one instance per product.
const V1_PPU_ORDER: &str = "CSDIFF1P0000000021";
const V1_PKG_ORDER: &str = "CSDIFF1K0000000022";
const PPU_PRODUCTS: [&str; 2] = ["00301-ppu-a", "00301-ppu-b"];
const PKG_PRODUCT: &str = "00301-pkg";
const CUSTOMERS: [&str; 3] =
    ["68cbc86abc2018ab880d92f36422fa0e", "c0ffee00c0ffee00c0ffee00c0ffee00", "unknown-customer"];
const SKUS: [&str; 3] = ["svc-card-100", "6b1c2a3e-pro-edition", "0a4d1578-5295-46a7-92d4-7c803dccc51d"];
const UNKNOWN_INSTANCE: &str = "0f0f0f0f-0000-5000-8000-000000000000";

struct Pool {
    /// Every instance id a call of the pool can name, plus one nobody creates.
    instances: Vec<String>,
    /// V2 instances (by order line), V1 instances, pay-per-use items, packages.
    v2: Vec<(String, String, String)>,
    v1: Vec<(String, String)>,
    ppu: Vec<(String, String)>,
    pkg: (String, String),
    orders: Vec<String>,
}

impl Pool {
    fn new() -> Self {
        let mut v2 = Vec::new();
        for o in V2_ORDERS {
            for l in V2_LINES {
                let line = format!("{o}{l}");
                v2.push((o.to_owned(), line.clone(), instance_id_for(o, Some(&line))));
            }
        }
        let v1: Vec<_> = V1_ORDERS.iter().map(|o| ((*o).to_owned(), instance_id_for(o, None))).collect();
        let ppu: Vec<_> =
            PPU_PRODUCTS.iter().map(|p| ((*p).to_owned(), instance_id_for_item(V1_PPU_ORDER, None, p))).collect();
        let pkg = (PKG_PRODUCT.to_owned(), instance_id_for_item(V1_PKG_ORDER, None, PKG_PRODUCT));
        let mut instances: Vec<String> = v2.iter().map(|(_, _, i)| i.clone()).collect();
        instances.extend(v1.iter().map(|(_, i)| i.clone()));
        instances.extend(ppu.iter().map(|(_, i)| i.clone()));
        instances.push(pkg.1.clone());
        instances.push(UNKNOWN_INSTANCE.to_owned());
        let mut orders: Vec<String> = V2_ORDERS.iter().chain(&V1_ORDERS).map(|o| (*o).to_owned()).collect();
        orders.extend([V1_PPU_ORDER.to_owned(), V1_PKG_ORDER.to_owned(), "CSDIFFNOSUCHORDER".to_owned()]);
        Self { instances, v2, v1, ppu, pkg, orders }
    }
}

// ---------------------------------------------------------------- the run

#[derive(Clone, Debug)]
enum RawCall {
    V2(String),
    V1(BTreeMap<String, String>),
}

/// What one seed did, for the summary line.
#[derive(Default)]
struct Stats {
    ops: BTreeMap<&'static str, usize>,
    calls: usize,
    outcomes: BTreeMap<&'static str, usize>,
    /// Return values and state parts compared with `==`.
    comparisons: usize,
    /// Record fields (instance, order, outbox and dead-letter records, usage records) among them.
    fields: usize,
    /// The most delivered events the history held at a state check.
    kept: usize,
}

struct Run {
    seed: u64,
    step: usize,
    op: String,
    /// The steps since the last full state check (where a state difference came from).
    recent: Vec<String>,
    rng: StdRng,
    /// The simulated clock (UNIX ms), strictly increasing: every time stamp a
    /// store keeps comes from it, never from the wall clock.
    clock: i64,
    redis: Arc<dyn Store>,
    embedded: Arc<dyn Store>,
    settings: Settings,
    key: Secret,
    pool: Pool,
    /// Calls made so far (retries replay them) and nonces used (to repeat).
    history: Vec<RawCall>,
    nonces: Vec<String>,
    tokens: Vec<String>,
    next_nonce: u64,
    /// Entries each store handed out, by event id (their cursors differ).
    claimed: [BTreeMap<String, OutboxEntry>; 2],
    /// Every entry ever handed out (settling a stale copy is allowed too).
    seen: [BTreeMap<String, OutboxEntry>; 2],
    /// Usage records the worker claimed and has not settled.
    usage_claimed: Vec<UsageRecord>,
    sns: Vec<String>,
    stats: Stats,
}

fn replay_command(seed: u64, ops: usize) -> String {
    format!(
        "KOOGATE_DIFF_SEED={seed} KOOGATE_DIFF_OPS={ops} cargo test --test it differential::stores_agree -- --nocapture"
    )
}

/// A line diff (longest common subsequence) of two pretty-printed values:
/// changed lines marked `R` (Redis) and `E` (embedded), 3 lines of context.
fn diff(a: &str, b: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let mut lines: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            lines.push((' ', a[i]));
            (i, j) = (i + 1, j + 1);
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            lines.push(('E', b[j]));
            j += 1;
        } else {
            lines.push(('R', a[i]));
            i += 1;
        }
    }
    let near = |k: usize| lines[k.saturating_sub(3)..(k + 4).min(lines.len())].iter().any(|(t, _)| *t != ' ');
    let mut out = String::new();
    let mut shown = 0;
    for (k, (tag, line)) in lines.iter().enumerate() {
        if near(k) && shown < 60 {
            out.push_str(&format!("  {tag} {line}\n"));
            shown += 1;
        }
    }
    out
}

impl Run {
    /// Compares what the two stores answered; on a difference, fails with everything needed to replay it.
    fn same<T: PartialEq + Debug>(&mut self, what: &str, redis: T, embedded: T) -> T {
        self.stats.comparisons += 1;
        if redis != embedded {
            let (r, e) = (format!("{redis:#?}"), format!("{embedded:#?}"));
            panic!(
                "\nSTORES DIVERGE: seed {seed}, step {step}, op {op}\n  compared: {what}\n  (R = redis, E = embedded)\n{d}\n  steps since the last state check:\n{recent}\n  replay: {cmd}\n",
                seed = self.seed,
                step = self.step,
                op = self.op,
                recent = self.recent.iter().map(|r| format!("    {r}\n")).collect::<String>(),
                d = diff(&r, &e),
                cmd = replay_command(self.seed, self.step + 1),
            );
        }
        redis
    }

    fn count_fields(&mut self, records: &[&Record]) {
        self.stats.fields += records.iter().map(|r| r.len()).sum::<usize>();
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        items.choose(&mut self.rng).unwrap()
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.gen_bool(p)
    }

    fn compact(&self, offset_days: i64) -> String {
        let t = chrono::DateTime::from_timestamp_millis(self.clock + offset_days * 86_400_000).unwrap();
        t.format("%Y%m%d%H%M%S").to_string()
    }

    fn test_flag(&mut self) -> &'static str {
        if self.chance(0.12) {
            "1"
        } else {
            "0"
        }
    }

    // ------------------------------------------------------------ calls

    fn new_v2_call(&mut self) -> RawCall {
        let (order, line, instance) = self.pick(&self.pool.v2.clone()).clone();
        let test = self.test_flag();
        let other = self.pick(&self.pool.instances.clone()).clone();
        let target = if self.chance(0.85) { instance } else { other };
        let renewal_order = format!("CSDIFFRENEW{:07}", self.rng.gen_range(0..3));
        let body = match self.rng.gen_range(0..9) {
            0 | 1 => {
                serde_json::json!({"activity": "newInstance", "businessId": format!("biz-{}", self.rng.gen_range(0..3)),
                "orderId": order, "orderLineId": line, "testFlag": test})
            }
            2 => {
                let days = self.rng.gen_range(30..400);
                let expire = format!("{}123", self.compact(days));
                let scene = *self.pick(&["RENEWAL", "TRIAL_TO_FORMAL", "UNSUBSCRIBE_RENEWAL_PERIOD", "RENEWAL_CHANGE"]);
                let mut b = serde_json::json!({"activity": "refreshInstance", "instanceId": target,
                    "orderId": renewal_order, "orderLineId": format!("{renewal_order}-000001"), "scene": scene,
                    "expireTime": expire, "testFlag": test});
                if self.chance(0.5) {
                    b["productId"] = "OFFI461867333479178241".into();
                }
                b
            }
            3 => serde_json::json!({"activity": "updateInstanceStatus", "instanceId": target,
                "status": *self.pick(&["FREEZE", "UNFREEZE"]), "testFlag": test}),
            4 => serde_json::json!({"activity": "releaseInstance", "instanceId": target,
                "orderId": format!("CSDIFFRELEASE{}", self.rng.gen_range(0..2)), "orderLineId": "x-000001", "testFlag": test}),
            5 => {
                let n = self.rng.gen_range(1..=3);
                let ids: Vec<String> = (0..n).map(|_| self.pick(&self.pool.instances.clone()).clone()).collect();
                serde_json::json!({"activity": "queryInstance", "instanceId": ids.join(","), "testFlag": test})
            }
            6 => {
                serde_json::json!({"activity": "orderNotify", "orderId": order, "orderLineId": line, "testFlag": test})
            }
            7 => serde_json::json!({"activity": "upgradeInstance", "instanceId": target, "orderId": renewal_order,
                "orderLineId": format!("{renewal_order}-000002"), "testFlag": test}),
            _ => serde_json::json!({"activity": "changeInstanceCheck", "instanceId": target,
                "productInfo": {"productId": "OFFI461867333479178241", "skuCode": *self.pick(&SKUS)}, "testFlag": test}),
        };
        RawCall::V2(body.to_string())
    }

    fn new_v1_call(&mut self) -> RawCall {
        let test = self.test_flag().to_owned();
        let mut instances: Vec<String> = self.pool.v1.iter().map(|(_, i)| i.clone()).collect();
        instances.extend(self.pool.ppu.iter().map(|(_, i)| i.clone()));
        instances.push(self.pool.pkg.1.clone());
        let target = if self.chance(0.9) { self.pick(&instances).clone() } else { UNKNOWN_INSTANCE.to_owned() };
        let mut p: BTreeMap<String, String> = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            p.insert(k.to_owned(), v.to_owned());
        };
        put("testFlag", &test);
        let other_order = format!("CSDIFF1RENEW{:06}", self.rng.gen_range(0..3));
        match self.rng.gen_range(0..9) {
            0..=2 => {
                put("activity", "newInstance");
                put("businessId", &format!("biz1-{}", self.rng.gen_range(0..3)));
                put("customerId", CUSTOMERS[self.rng.gen_range(0..2)]);
                put("customerName", "acme-observability");
                put("userId", "2a5c1e0f9b8d4c7e");
                put("userName", "ops-lead");
                put("expireTime", &self.compact(365));
                put("trialFlag", if self.rng.gen_bool(0.2) { "1" } else { "0" });
                match self.rng.gen_range(0..4) {
                    0 => {
                        put("orderId", V1_PPU_ORDER);
                        put("chargingMode", "0");
                        put("productId", PPU_PRODUCTS[self.rng.gen_range(0..2)]);
                    }
                    1 => {
                        put("orderId", V1_PKG_ORDER);
                        put("chargingMode", "5");
                        put("productId", PKG_PRODUCT);
                    }
                    _ => {
                        put("orderId", V1_ORDERS[self.rng.gen_range(0..3)]);
                        put("chargingMode", if self.rng.gen_bool(0.5) { "1" } else { "3" });
                        put("productId", "00301-666666-0--0");
                        put("skuCode", SKUS[self.rng.gen_range(0..3)]);
                        put("orderAmount", "5000.00");
                        put("periodType", "year");
                        put("periodNumber", "1");
                    }
                }
                let key = crypto::derive_key(AK, EncryptType::Aes256);
                match self.rng.gen_range(0..3) {
                    0 => put("email", &crypto::encrypt(&key, "ops@example.com").unwrap()),
                    1 => put("mobilePhone", "bm90LWVuY3J5cHRlZA=="),
                    _ => {}
                }
            }
            3 => {
                put("activity", "refreshInstance");
                put("instanceId", &target);
                put("orderId", &other_order);
                put("productId", "00301-666666-0--0");
                put("expireTime", &self.compact(730));
                put("periodType", "year");
                put("periodNumber", "1");
                put("orderAmount", if self.rng.gen_bool(0.3) { "0" } else { "5000.00" });
                if self.rng.gen_bool(0.3) {
                    put("trialToFormal", "1");
                }
            }
            4 => {
                put("activity", "upgrade");
                put("instanceId", &target);
                put("orderId", &other_order);
                put("productId", "00301-666666-0--0");
                put("skuCode", SKUS[self.rng.gen_range(0..3)]);
                put("amount", &self.rng.gen_range(1..5).to_string());
            }
            5 => {
                put("activity", "instanceStatus");
                put("instanceId", &target);
                put("instanceStatus", if self.rng.gen_bool(0.5) { "FREEZE" } else { "NORMAL" });
            }
            6 => {
                put("activity", "expireInstance");
                put("instanceId", &target);
                put("orderId", V1_ORDERS[0]);
            }
            7 => {
                put("activity", "releaseInstance");
                put("instanceId", &target);
                put("orderId", V1_ORDERS[1]);
                put("orderAmount", "0");
            }
            _ => {
                put("activity", "queryInstance");
                let extra = instances[self.rng.gen_range(0..instances.len())].clone();
                put("instanceId", &format!("{target},{extra}"));
            }
        }
        RawCall::V1(p)
    }

    /// Plans a call as the gateway does and applies the same plan to both stores.
    async fn call(&mut self) {
        let raw = match self.rng.gen_range(0..10) {
            // A retry of an earlier call (a new nonce; V1: its own token or the same URL again).
            0..=2 if !self.history.is_empty() => self.pick(&self.history.clone()).clone(),
            0..=5 => self.new_v2_call(),
            _ => self.new_v1_call(),
        };
        self.history.push(raw.clone());
        self.stats.calls += 1;
        // A repeated nonce (a replay) or a new one; V1: a new authToken or an earlier one (the same URL again).
        let (repeat, pool) = match &raw {
            RawCall::V2(_) => (self.rng.gen_bool(0.12), self.nonces.clone()),
            RawCall::V1(_) => (self.rng.gen_bool(0.3), self.tokens.clone()),
        };
        let nonce = match pool.choose(&mut self.rng) {
            Some(old) if repeat => old.clone(),
            _ => {
                self.next_nonce += 1;
                format!("n-{}", self.next_nonce)
            }
        };
        let planner = Planner { settings: &self.settings, key: &self.key, now_ms: self.clock };
        let plan = match &raw {
            RawCall::V2(body) => {
                let call = parse_v2(body.as_bytes()).unwrap_or_else(|r| panic!("{body}: {r}"));
                self.nonces.push(nonce.clone());
                self.op = format!("v2 call {body} nonce={nonce}");
                planner.plan(&call, Some(&nonce))
            }
            RawCall::V1(params) => {
                let call =
                    parse_v1(params, AK, self.settings.encrypt_type).unwrap_or_else(|r| panic!("{params:?}: {r}"));
                // As the gateway: no store nonce, the authToken guards a replayed URL.
                self.tokens.push(nonce.clone());
                self.op = format!("v1 call {params:?} authToken={nonce}");
                let mut plan = planner.plan(&call, None);
                v1_replay_guard(&mut plan, &nonce);
                plan
            }
        };
        let r = self.redis.apply(&plan).await.unwrap();
        let e = self.embedded.apply(&plan).await.unwrap();
        let outcome = self.same("the call's outcome", r, e);
        let kind = match &outcome {
            Outcome::Replay => "replay",
            Outcome::Kept { .. } => "kept",
            Outcome::Applied { event_id: Some(_), .. } => "applied+event",
            Outcome::Applied { .. } => "applied",
            Outcome::Read { .. } => "read",
        };
        *self.stats.outcomes.entry(kind).or_default() += 1;
        if let Outcome::Read { records } = &outcome {
            self.count_fields(&records.iter().collect::<Vec<_>>());
            // The answer as the gateway builds it, package usage included.
            let lr = linked_usage(self.redis.as_ref(), &plan.read, records).await.unwrap();
            let le = linked_usage(self.embedded.as_ref(), &plan.read, records).await.unwrap();
            let planner = Planner { settings: &self.settings, key: &self.key, now_ms: self.clock };
            let (ar, ae) =
                (planner.query_answer(&plan.read, records, &lr), planner.query_answer(&plan.read, records, &le));
            self.same("queryInstance's linked package usage", lr, le);
            self.same("queryInstance's answer", ar, ae);
        }
    }

    // ------------------------------------------------------------ delivery

    fn entry_ids(&mut self, from_seen: bool) -> Vec<String> {
        let map = if from_seen { &self.seen[0] } else { &self.claimed[0] };
        let ids: Vec<String> = map.keys().filter(|id| self.seen[1].contains_key(*id)).cloned().collect();
        let n = self.rng.gen_range(0..=ids.len().min(4));
        ids.choose_multiple(&mut self.rng, n).cloned().collect()
    }

    fn entries(&self, ids: &[String], store: usize) -> Vec<OutboxEntry> {
        ids.iter().filter_map(|id| self.claimed[store].get(id).or_else(|| self.seen[store].get(id)).cloned()).collect()
    }

    async fn delivery(&mut self) {
        let consumer = *self.pick(&["worker-a", "worker-b"]);
        match self.rng.gen_range(0..11) {
            0..=2 => {
                let stale = *self.pick(&[None, Some(Duration::ZERO), Some(Duration::from_secs(3_600))]);
                self.op = format!("outbox_claim({consumer}, {CLAIM_ALL}, {stale:?})");
                let r = self.redis.outbox_claim(consumer, CLAIM_ALL, stale).await.unwrap();
                let e = self.embedded.outbox_claim(consumer, CLAIM_ALL, stale).await.unwrap();
                let (nr, ne) = (per_shard(&r), per_shard(&e));
                self.count_fields(&r.iter().map(|x| &x.record).collect::<Vec<_>>());
                self.same("the claimed entries, per shard in order", nr, ne);
                for (store, entries) in [r, e].into_iter().enumerate() {
                    for entry in entries {
                        self.seen[store].insert(entry.id.clone(), entry.clone());
                        self.claimed[store].insert(entry.id.clone(), entry);
                    }
                }
            }
            3 => {
                let ids = self.entry_ids(false);
                self.op = format!("outbox_ack({ids:?})");
                self.redis.outbox_ack(&self.entries(&ids, 0)).await.unwrap();
                self.embedded.outbox_ack(&self.entries(&ids, 1)).await.unwrap();
                for map in &mut self.claimed {
                    map.retain(|id, _| !ids.contains(id));
                }
            }
            4 => {
                let ids = self.entry_ids(false);
                self.op = format!("outbox_touch({consumer}, {ids:?})");
                self.redis.outbox_touch(consumer, &self.entries(&ids, 0)).await.unwrap();
                self.embedded.outbox_touch(consumer, &self.entries(&ids, 1)).await.unwrap();
            }
            5 => {
                let ids = self.entry_ids(true);
                self.op = format!("attempts({ids:?})");
                let r = self.redis.attempts(&self.entries(&ids, 0)).await.unwrap();
                let e = self.embedded.attempts(&self.entries(&ids, 1)).await.unwrap();
                self.same("attempts", r, e);
            }
            6 => {
                let ids = self.entry_ids(false);
                let Some(id) = ids.first() else { return };
                let attempts = Attempts {
                    attempts: self.rng.gen_range(1..9),
                    first_attempt_ms: self.clock - 5_000,
                    next_attempt_ms: self.clock + self.rng.gen_range(1_000..60_000),
                    last_error: self.chance(0.7).then(|| "billing core answered 503".to_owned()),
                    log: vec![AttemptRecord {
                        at_ms: self.clock - 5_000,
                        status: Some(503),
                        duration_ms: 40,
                        response: Some("busy".into()),
                        error: Some("billing core answered HTTP 503".into()),
                    }],
                };
                self.op = format!("record_attempt({id}, {attempts:?})");
                self.redis.record_attempt(&self.entries(std::slice::from_ref(id), 0)[0], &attempts).await.unwrap();
                self.embedded.record_attempt(&self.entries(std::slice::from_ref(id), 1)[0], &attempts).await.unwrap();
            }
            7 | 8 => {
                // A batch, as the worker settles: delivered and dead-lettered mixed.
                let from_seen = self.chance(0.15);
                let ids = self.entry_ids(from_seen);
                if ids.is_empty() {
                    return;
                }
                let dead: Vec<bool> = ids.iter().map(|_| self.chance(0.4)).collect();
                let attempts = Attempts {
                    attempts: 12,
                    first_attempt_ms: self.clock - 90_000,
                    next_attempt_ms: 0,
                    last_error: Some("410 Gone".into()),
                    log: Vec::new(),
                };
                // Delivered ones are kept in the history with an attempt log; a few leave without a delivery.
                let kept: Vec<bool> = ids.iter().map(|_| self.chance(0.8)).collect();
                let delivered_attempts = Attempts {
                    attempts: 2,
                    first_attempt_ms: self.clock - 1_000,
                    next_attempt_ms: 0,
                    last_error: Some("billing core answered HTTP 503".into()),
                    log: vec![
                        AttemptRecord {
                            at_ms: self.clock - 1_000,
                            status: Some(503),
                            duration_ms: 12,
                            response: Some("{\"error\":\"busy\"}".into()),
                            error: Some("billing core answered HTTP 503".into()),
                        },
                        AttemptRecord {
                            at_ms: self.clock - 10,
                            status: Some(200),
                            duration_ms: 9,
                            ..Default::default()
                        },
                    ],
                };
                self.op = format!("settle({ids:?}, dead={dead:?}, kept={kept:?})");
                for (store, s) in [(0, Arc::clone(&self.redis)), (1, Arc::clone(&self.embedded))] {
                    let entries = self.entries(&ids, store);
                    let letters: Vec<Option<DeadLetter>> = entries
                        .iter()
                        .zip(&dead)
                        .map(|(entry, &dead)| {
                            dead.then(|| DeadLetter {
                                entry: entry.clone(),
                                attempts: attempts.clone(),
                                dead_at_ms: self.clock,
                            })
                        })
                        .collect();
                    let delivered: Vec<Option<Delivered>> = entries
                        .iter()
                        .zip(&dead)
                        .zip(&kept)
                        .map(|((entry, &dead), &kept)| {
                            (!dead && kept).then(|| Delivered {
                                entry: entry.clone(),
                                attempts: delivered_attempts.clone(),
                                delivered_at_ms: self.clock,
                            })
                        })
                        .collect();
                    let settles: Vec<Settle<'_>> = entries
                        .iter()
                        .zip(&letters)
                        .zip(&delivered)
                        .map(|((entry, dead), delivered)| Settle {
                            entry,
                            dead: dead.as_ref(),
                            delivered: delivered.as_ref(),
                        })
                        .collect();
                    s.settle(&settles).await.unwrap();
                    for id in &ids {
                        self.claimed[store].remove(id);
                    }
                }
            }
            9 => {
                let subjects = self.pool.instances.clone();
                let subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
                self.op = "delivered_seq(pool)".into();
                let r = self.redis.delivered_seq(&subjects).await.unwrap();
                let e = self.embedded.delivered_seq(&subjects).await.unwrap();
                self.same("delivered_seq", r, e);
            }
            _ => {
                let dead = self.embedded.dlq_list().await.unwrap();
                let id = match self.rng.gen_range(0..4) {
                    0 => format!("evt_{UNKNOWN_INSTANCE}_1"),
                    1 => "not-an-event-id".to_owned(),
                    _ => match dead.choose(&mut self.rng) {
                        Some(d) => d.entry.id.clone(),
                        None => format!("evt_{}_1", self.pool.instances[0]),
                    },
                };
                self.op = format!("dlq_redrive({id})");
                let r = self.redis.dlq_redrive(&id).await.unwrap();
                let e = self.embedded.dlq_redrive(&id).await.unwrap();
                self.same("dlq_redrive", r, e);
            }
        }
    }

    // ------------------------------------------------------------ orders, accounts

    async fn ledger(&mut self) {
        let orders = self.pool.orders.clone();
        let instances = self.pool.instances.clone();
        match self.rng.gen_range(0..8) {
            0 | 1 => {
                let order = self.pick(&orders).clone();
                // Mostly the right customer (the order's own), else another or an unknown one.
                let own = self.embedded.order(&order).await.unwrap().get("customer_id").cloned();
                let customer = match own {
                    Some(own) if self.chance(0.7) => own,
                    _ => self.pick(&CUSTOMERS).to_string(),
                };
                let customer = customer.as_str();
                let at = koogate::gateway::rfc3339(chrono::DateTime::from_timestamp_millis(self.clock).unwrap());
                self.op = format!("redeem({order}, {customer})");
                let r = self.redis.redeem(&order, customer, "admin:ops", &at).await.unwrap();
                let e = self.embedded.redeem(&order, customer, "admin:ops", &at).await.unwrap();
                self.same("redeem", r, e);
            }
            2 => {
                // As enrichment: facts of the order query API into the instance and its order.
                let instance = self.pick(&instances).clone();
                let order = self.pick(&orders).clone();
                let customer = *self.pick(&CUSTOMERS[..2]);
                let fields = Record::from([
                    ("customer_id".to_owned(), customer.to_owned()),
                    ("sku_code".to_owned(), self.pick(&SKUS).to_string()),
                    ("enriched_at".to_owned(), self.clock.to_string()),
                ]);
                let order_fields = Record::from([("customer_id".to_owned(), customer.to_owned())]);
                let empty = self.chance(0.2);
                self.op = format!("enrich({instance}, {order}, {customer}, empty={empty})");
                let (f, of) = if empty { (Record::new(), Record::new()) } else { (fields, order_fields) };
                self.redis.enrich(&instance, &f, Some(&order), &of).await.unwrap();
                self.embedded.enrich(&instance, &f, Some(&order), &of).await.unwrap();
            }
            3 => {
                let order = self.pick(&orders).clone();
                let line = format!("{order}-00000{}", self.rng.gen_range(1..3));
                if self.chance(0.5) {
                    let answer = format!("{{\"orderId\":\"{order}\",\"n\":{}}}", self.rng.gen_range(0..100));
                    // Whole seconds: Redis keeps a TTL under a second as one second.
                    let ttl = Duration::from_secs(self.rng.gen_range(60..600));
                    self.op = format!("cache_order({order}, {line}, {ttl:?})");
                    self.redis.cache_order(&order, &line, &answer, ttl).await.unwrap();
                    self.embedded.cache_order(&order, &line, &answer, ttl).await.unwrap();
                } else {
                    self.op = format!("cached_order({order}, {line})");
                    let r = self.redis.cached_order(&order, &line).await.unwrap();
                    let e = self.embedded.cached_order(&order, &line).await.unwrap();
                    self.same("cached_order", r, e);
                }
            }
            4 => {
                let instance = self.pick(&instances).clone();
                let customer = *self.pick(&CUSTOMERS[..2]);
                let created = self.clock - self.rng.gen_range(0..3) * 1_000;
                self.op = format!("account_link({customer}, {instance}, {created})");
                self.redis.account_link(customer, &instance, created).await.unwrap();
                self.embedded.account_link(customer, &instance, created).await.unwrap();
            }
            5 => {
                let instance = self.pick(&instances).clone();
                self.op = format!("account_pending({instance})");
                self.redis.account_pending(&instance, self.clock).await.unwrap();
                self.embedded.account_pending(&instance, self.clock).await.unwrap();
            }
            6 => {
                let customer = *self.pick(&CUSTOMERS);
                let (offset, limit) = (self.rng.gen_range(0..3), self.rng.gen_range(0..5));
                self.op = format!("account_instances({customer}, {offset}, {limit})");
                let r = self.redis.account_instances(customer, offset, limit).await.unwrap();
                let e = self.embedded.account_instances(customer, offset, limit).await.unwrap();
                self.same("account_instances", r, e);
            }
            _ => {
                self.op = "accounts_pending()".into();
                let r = self.redis.accounts_pending().await.unwrap();
                let e = self.embedded.accounts_pending().await.unwrap();
                self.same("accounts_pending", r, e);
            }
        }
    }

    // ------------------------------------------------------------ usage

    fn usage_record(&mut self) -> UsageRecord {
        let mut usage_instances: Vec<String> = self.pool.ppu.iter().map(|(_, i)| i.clone()).collect();
        usage_instances.push(self.pool.pkg.1.clone());
        usage_instances.push(self.pool.v1[0].1.clone());
        usage_instances.push(self.pool.v2[0].2.clone());
        usage_instances.push(self.pool.v1[2].1.clone());
        usage_instances.push(UNKNOWN_INSTANCE.to_owned());
        let instance = self.pick(&usage_instances).clone();
        let item = if self.chance(0.3) { self.pool.pkg.1.clone() } else { String::new() };
        // Hour periods of the last two days (intake refuses older than 20 days), some half-overlapping.
        let hour = (self.clock / 1000).div_euclid(3_600) * 3_600;
        let begin = hour - self.rng.gen_range(1..48) * 3_600 + if self.chance(0.15) { 1_800 } else { 0 };
        let sn = self.pick(&self.sns.clone()).clone();
        UsageRecord {
            metering_sn: sn,
            instance_id: instance,
            item,
            begin,
            end: begin + 3_600,
            value_e4: self.rng.gen_range(1..50_000),
        }
    }

    async fn usage(&mut self) {
        match self.rng.gen_range(0..10) {
            0..=2 => {
                let n = self.rng.gen_range(1..=3);
                let mut records: Vec<UsageRecord> = (0..n).map(|_| self.usage_record()).collect();
                if n > 1 && self.chance(0.2) {
                    // The same record twice in one request.
                    records[1] = records[0].clone();
                }
                self.op = format!("usage_accept({records:?})");
                let r = self.redis.usage_accept(&records, self.clock).await.unwrap();
                let e = self.embedded.usage_accept(&records, self.clock).await.unwrap();
                self.same("usage_accept decisions", r, e);
            }
            3 | 4 => {
                let lease = Duration::from_secs(*self.pick(&[0, 60]));
                self.op = format!("usage_claim({CLAIM_ALL}, {lease:?})");
                let r = self.redis.usage_claim(CLAIM_ALL, self.clock, lease).await.unwrap();
                let e = self.embedded.usage_claim(CLAIM_ALL, self.clock, lease).await.unwrap();
                // Redis claims shard by shard, the embedded store by due time: compare by sn.
                let by_sn = |claims: Vec<koogate::usage::UsageClaim>| -> BTreeMap<String, (StoredUsage, String)> {
                    claims
                        .into_iter()
                        .map(|c| (c.stored.record.metering_sn.clone(), (c.stored, c.instance_status)))
                        .collect()
                };
                let claims = self.same("usage_claim", by_sn(r), by_sn(e));
                self.stats.fields += claims.len() * 17;
                self.usage_claimed = claims.into_values().map(|(s, _)| s.record).collect();
            }
            5 | 6 => {
                let mut settles = Vec::new();
                let claimed = std::mem::take(&mut self.usage_claimed);
                for record in claimed {
                    let settle = match self.rng.gen_range(0..5) {
                        0 | 1 => UsageSettle::Pushed,
                        2 => UsageSettle::Retry {
                            attempts: self.rng.gen_range(1..5),
                            at_ms: self.clock + self.rng.gen_range(0..20_000),
                            error: "KooGallery answered 500".into(),
                        },
                        3 => UsageSettle::Hold { at_ms: self.clock + 10_000 },
                        _ => UsageSettle::Dead { code: "MKT.9004".into(), msg: "too old".into() },
                    };
                    settles.push((record, settle));
                }
                self.op = format!("usage_settle({settles:?})");
                self.redis.usage_settle(&settles, self.clock).await.unwrap();
                self.embedded.usage_settle(&settles, self.clock).await.unwrap();
            }
            7 => {
                let dead = self.embedded.usage_dead().await.unwrap();
                let sn = match dead.choose(&mut self.rng) {
                    Some(d) if self.rng.gen_bool(0.7) => d.record.metering_sn.clone(),
                    _ => self.pick(&self.sns.clone()).clone(),
                };
                self.op = format!("usage_redrive({sn})");
                let r = self.redis.usage_redrive(&sn, self.clock).await.unwrap();
                let e = self.embedded.usage_redrive(&sn, self.clock).await.unwrap();
                self.same("usage_redrive", r, e);
            }
            8 => {
                let sn = self.pick(&self.sns.clone()).clone();
                self.op = format!("usage_get({sn})");
                let r = self.redis.usage_get(&sn).await.unwrap();
                let e = self.embedded.usage_get(&sn).await.unwrap();
                self.same("usage_get", r, e);
            }
            _ => {
                self.op = "usage_stats()".into();
                let r = self.redis.usage_stats().await.unwrap();
                let e = self.embedded.usage_stats().await.unwrap();
                self.same("usage_stats", r, e);
            }
        }
    }

    // ------------------------------------------------------------ state

    /// Everything both stores hold about the pool, compared part by part.
    async fn compare_state(&mut self) {
        let instances = self.pool.instances.clone();
        for id in &instances {
            let r = self.redis.instance(id).await.unwrap();
            let e = self.embedded.instance(id).await.unwrap();
            self.count_fields(&[&r]);
            self.same(&format!("instance record {id}"), r, e);
        }
        let r = self.redis.instance_records(&instances).await.unwrap();
        let e = self.embedded.instance_records(&instances).await.unwrap();
        self.same("instance_records(pool)", r, e);
        for id in &instances {
            let r = self.redis.usage_of_instance(id, 5).await.unwrap();
            let e = self.embedded.usage_of_instance(id, 5).await.unwrap();
            self.same(&format!("usage_of_instance({id}, 5)"), r, e);
        }
        for id in self.pool.orders.clone() {
            let r = self.redis.order(&id).await.unwrap();
            let e = self.embedded.order(&id).await.unwrap();
            self.count_fields(&[&r]);
            self.same(&format!("order record {id}"), r, e);
        }
        let r = self.redis.outbox_entries().await.unwrap();
        let e = self.embedded.outbox_entries().await.unwrap();
        self.count_fields(&r.iter().map(|x| &x.record).collect::<Vec<_>>());
        self.same("outbox_entries, per shard in order", per_shard(&r), per_shard(&e));
        // The delivery bookkeeping of every entry still in the outbox, by event id.
        let ar = self.redis.attempts(&r).await.unwrap();
        let ae = self.embedded.attempts(&e).await.unwrap();
        let by_id = |entries: &[OutboxEntry], attempts: Vec<Option<Attempts>>| -> BTreeMap<String, Option<Attempts>> {
            entries.iter().map(|x| x.id.clone()).zip(attempts).collect()
        };
        self.same("attempts of the outbox", by_id(&r, ar), by_id(&e, ae));
        let r = self.redis.outbox_len().await.unwrap();
        let e = self.embedded.outbox_len().await.unwrap();
        self.same("outbox_len", r, e);
        // Redis dates the oldest entry by its stream id (when it was added,
        // wall clock), the embedded store by the event's occurred_at: compare
        // whether there is one.
        let r = self.redis.oldest_pending_ms().await.unwrap().is_some();
        let e = self.embedded.oldest_pending_ms().await.unwrap().is_some();
        self.same("oldest_pending_ms is some", r, e);
        let r = self.redis.dlq_list().await.unwrap();
        let e = self.embedded.dlq_list().await.unwrap();
        self.count_fields(&r.iter().map(|d| &d.entry.record).collect::<Vec<_>>());
        self.same("dlq_list", without_cursors(r), without_cursors(e));
        // The history: everything, by instance, by order, by window, and by id.
        let query = |index: HistoryIndex| HistoryQuery { index, since_ms: None, until_ms: None, limit: 1000 };
        let r = self.redis.history_list(&query(HistoryIndex::All)).await.unwrap();
        let e = self.embedded.history_list(&query(HistoryIndex::All)).await.unwrap();
        let ids: Vec<String> = e.iter().map(|d| d.entry.id.clone()).collect();
        self.stats.kept = self.stats.kept.max(e.len());
        self.same("history_list(all)", without_history_cursors(r), without_history_cursors(e.clone()));
        for id in instances.iter().take(4) {
            let q = query(HistoryIndex::Instance(id.clone()));
            let r = self.redis.history_list(&q).await.unwrap();
            let e = self.embedded.history_list(&q).await.unwrap();
            self.same(&format!("history_list(instance {id})"), without_history_cursors(r), without_history_cursors(e));
        }
        // Purchase orders (found through their lines' instances on Redis) and
        // the renewal and upgrade orders (found through their own index).
        let renewals = (0..3).flat_map(|i| [format!("CSDIFFRENEW{i:07}"), format!("CSDIFF1RENEW{i:06}")]);
        for order in self.pool.orders.clone().into_iter().chain(renewals) {
            let q = query(HistoryIndex::Order(order.clone()));
            let r = self.redis.history_list(&q).await.unwrap();
            let e = self.embedded.history_list(&q).await.unwrap();
            self.same(&format!("history_list(order {order})"), without_history_cursors(r), without_history_cursors(e));
        }
        if let Some(middle) = e.get(e.len() / 2) {
            let q = HistoryQuery {
                index: HistoryIndex::All,
                since_ms: Some(middle.delivered_at_ms - 3_000),
                until_ms: Some(middle.delivered_at_ms),
                limit: 5,
            };
            let r = self.redis.history_list(&q).await.unwrap();
            let e = self.embedded.history_list(&q).await.unwrap();
            self.same("history_list(window)", without_history_cursors(r), without_history_cursors(e));
        }
        for id in ids.iter().take(3).chain([&format!("evt_{UNKNOWN_INSTANCE}_1")]) {
            let r = self.redis.history_get(id).await.unwrap();
            let e = self.embedded.history_get(id).await.unwrap();
            self.same(&format!("history_get({id})"), without_history_cursors(r), without_history_cursors(e));
        }
        let subjects: Vec<&str> = instances.iter().map(String::as_str).collect();
        let r = self.redis.delivered_seq(&subjects).await.unwrap();
        let e = self.embedded.delivered_seq(&subjects).await.unwrap();
        self.same("delivered_seq(pool)", r, e);
        for sn in self.sns.clone() {
            let r = self.redis.usage_get(&sn).await.unwrap();
            let e = self.embedded.usage_get(&sn).await.unwrap();
            self.stats.fields += if r.is_some() { 17 } else { 0 };
            self.same(&format!("usage record {sn}"), r, e);
        }
        let r = self.redis.usage_dead().await.unwrap();
        let e = self.embedded.usage_dead().await.unwrap();
        self.same("usage_dead", r, e);
        let r = self.redis.usage_stats().await.unwrap();
        let e = self.embedded.usage_stats().await.unwrap();
        self.same("usage_stats", r, e);
        let package = self.pool.pkg.1.clone();
        let r = self.redis.usage_package_links(&package).await.unwrap();
        let e = self.embedded.usage_package_links(&package).await.unwrap();
        self.same("usage_package_links", r, e);
        let r = self.redis.accounts_pending().await.unwrap();
        let e = self.embedded.accounts_pending().await.unwrap();
        self.same("accounts_pending", r, e);
        for customer in CUSTOMERS {
            let r = self.redis.account_instances(customer, 0, 100).await.unwrap();
            let e = self.embedded.account_instances(customer, 0, 100).await.unwrap();
            self.same(&format!("account_instances({customer})"), r, e);
        }
    }
}

/// Outbox entries by shard, in their order, without the backend's cursor
/// (a stream id on Redis, a sequence number in the embedded store).
fn per_shard(entries: &[OutboxEntry]) -> BTreeMap<u8, Vec<OutboxEntry>> {
    let mut out: BTreeMap<u8, Vec<OutboxEntry>> = BTreeMap::new();
    for e in entries {
        out.entry(e.shard).or_default().push(OutboxEntry { cursor: String::new(), ..e.clone() });
    }
    out
}

/// Kept events without the backend's cursor of the entry (it left the outbox).
fn without_history_cursors<I: IntoIterator<Item = Delivered>>(kept: I) -> Vec<Delivered> {
    kept.into_iter()
        .map(|mut d| {
            d.entry.cursor = String::new();
            d
        })
        .collect()
}

fn without_cursors(dead: Vec<DeadLetter>) -> Vec<DeadLetter> {
    dead.into_iter()
        .map(|mut d| {
            d.entry.cursor = String::new();
            d
        })
        .collect()
}

/// Runs one seed through both stores; returns its summary line.
async fn run_seed(seed: u64, ops: usize) -> String {
    let prefix = unique_prefix(&format!("diff{seed}"));
    let redis = store::open(&StoreSpec::Redis(REDIS_URL.into()), &prefix, RETENTION).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let embedded = store::open(&StoreSpec::Embedded(dir.path().to_owned()), "", RETENTION).await.unwrap();
    let mut run = Run {
        seed,
        step: 0,
        op: "start".into(),
        recent: Vec::new(),
        rng: StdRng::seed_from_u64(seed),
        clock: now_ms(),
        redis,
        embedded,
        settings: settings(),
        key: Secret::new(AK),
        pool: Pool::new(),
        history: Vec::new(),
        nonces: Vec::new(),
        tokens: Vec::new(),
        next_nonce: 0,
        claimed: Default::default(),
        seen: Default::default(),
        usage_claimed: Vec::new(),
        sns: (0..10).map(|i| format!("sn-{seed}-{i}")).collect(),
        stats: Stats::default(),
    };
    for step in 0..ops {
        run.step = step;
        run.clock += run.rng.gen_range(1..4_000);
        let kind = match run.rng.gen_range(0..100) {
            0..=44 => "call",
            45..=69 => "delivery",
            70..=81 => "ledger",
            _ => "usage",
        };
        *run.stats.ops.entry(kind).or_default() += 1;
        run.op = format!("{kind} step with nothing to act on");
        match kind {
            "call" => run.call().await,
            "delivery" => run.delivery().await,
            "ledger" => run.ledger().await,
            _ => run.usage().await,
        }
        run.recent.push(format!("step {step}: {}", run.op));
        if step % STATE_EVERY == STATE_EVERY - 1 || step + 1 == ops {
            run.op = format!("{} (then the state check)", run.op);
            run.compare_state().await;
            run.recent.clear();
        }
    }
    delete_prefix(REDIS_URL, &prefix).await;
    let s = &run.stats;
    let activities: BTreeSet<String> = run
        .history
        .iter()
        .map(|c| match c {
            RawCall::V2(b) => {
                format!("v2:{}", serde_json::from_str::<serde_json::Value>(b).unwrap()["activity"].as_str().unwrap())
            }
            RawCall::V1(p) => format!("v1:{}", p["activity"]),
        })
        .collect();
    format!(
        "seed {seed}: {ops} ops {:?}; {} calls {:?} over {} activities; {} comparisons, {} record fields compared; \
         up to {} delivered events in the history",
        s.ops,
        s.calls,
        s.outcomes,
        activities.len(),
        s.comparisons,
        s.fields,
        s.kept
    )
}

#[tokio::test]
async fn stores_agree() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let ops = env("KOOGATE_DIFF_OPS").map_or(DEFAULT_OPS, |n| n as usize);
    let seeds: Vec<u64> = match env("KOOGATE_DIFF_SEED") {
        Some(seed) => vec![seed],
        None => DEFAULT_SEEDS.to_vec(),
    };
    for seed in seeds {
        let summary = run_seed(seed, ops).await;
        println!("{summary}");
        assert!(ops < 100 || !summary.ends_with(" up to 0 delivered events in the history"), "{summary}");
    }
}

#[tokio::test]
async fn outbox_entries_not_acknowledged_are_handed_out_again() {
    for backend in BACKENDS {
        let prefix = unique_prefix("stale");
        let dir = tempfile::tempdir().unwrap();
        let spec = match backend {
            Backend::Redis => StoreSpec::Redis(REDIS_URL.into()),
            Backend::Embedded => StoreSpec::Embedded(dir.path().to_owned()),
        };
        let store = store::open(&spec, &prefix, RETENTION).await.unwrap();
        let settings = settings();
        let key = Secret::new(AK);
        let planner = Planner { settings: &settings, key: &key, now_ms: now_ms() };
        let call = parse_v2(&fixture("v2/01-newInstance.json")).unwrap();
        store.apply(&planner.plan(&call, None)).await.unwrap();
        let first = store.outbox_claim("a", 10, Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!(first.len(), 1);
        // Claimed by "a", not stale yet: nobody else gets it.
        assert!(store.outbox_claim("b", 10, Some(Duration::from_secs(60))).await.unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(60)).await;
        // "a" died: after the visibility timeout "b" takes it over.
        // Without asking for the takeover scan, nothing is taken over.
        assert!(store.outbox_claim("b", 10, None).await.unwrap().is_empty());
        let again = store.outbox_claim("b", 10, Some(Duration::from_millis(50))).await.unwrap();
        assert_eq!(again.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), vec![first[0].id.clone()], "{backend:?}");
        store.outbox_ack(&again).await.unwrap();
        assert_eq!(store.outbox_len().await.unwrap(), 0);
        let record = store.instance("028e3b0c-7d93-5e10-9156-f940561c8e6a").await.unwrap();
        assert_eq!(record.get("status").map(String::as_str), Some("active"));
        delete_prefix(REDIS_URL, &prefix).await;
    }
}
