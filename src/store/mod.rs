//! Dedup, nonce, ledger and outbox state, behind role traits.
//!
//! Each caller takes the role it uses; [`Store`] is all of them together
//! (what [`open`] hands out):
//!
//! | role | methods | used by |
//! |---|---|---|
//! | [`CallStore`] | `apply`, `ping`, `instance`, `order`, `enrich`, `redeem` | the gateway, readiness, enrichment, the admin API |
//! | [`Outbox`] | `outbox_claim`/`_ack`/`_touch`/`_len`/`_entries`, `attempts`, `record_attempt`, `settle`, `delivered_seq`, `oldest_pending_ms`, `dlq_list`, `dlq_redrive` | the delivery worker, the admin API |
//! | [`History`] | `history_get`, `history_list` (delivered events kept by `settle` for the retention window) | the admin API |
//! | [`OrderCache`] | `cached_order`, `cache_order` | enrichment |
//! | [`UsageLedger`] | `usage_*` | metering (intake, push), the admin API, `queryInstance` |
//! | [`AccountIndex`] | `account_*`, `instance_records` | the delivery step, the admin API, the gateway |
//!
//! - [`plan`]: the command language both backends interpret.
//! - [`keys`]: key layout, shards, instance ids.
//! - [`redis`]: the production backend (one EVALSHA per call, Cluster-ready);
//!   one file per role (`redis/{calls,outbox,history,orders,usage,accounts}.rs`), each
//!   Lua script beside the file that loads it.
//! - [`embedded`]: a redb file, the default when no Redis URL is given; the
//!   same files per role (`embedded/{calls,outbox,history,orders,usage,accounts}.rs`).

pub mod embedded;
pub mod keys;
pub mod plan;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::usage::{Decision, StoredUsage, UsageClaim, UsageRecord, UsageSettle, UsageStats};

pub use plan::{
    AttemptRecord, Attempts, Branch, DeadLetter, Delivered, EventSpec, OutboxEntry, Outcome, Plan, Record, Redeem,
};

/// A failure of the store itself (never of the caller's input).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("embedded store: {0}")]
    Embedded(String),
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("store answered something unexpected: {0}")]
    Protocol(String),
}

impl StoreError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Redis(_) => "redis",
            Self::Embedded(_) => "embedded",
            Self::Timeout(_) => "timeout",
            Self::Protocol(_) => "protocol",
        }
    }
}

/// Every role of a store together: what [`open`] hands out and the server
/// wires into each component. Callers take the narrowest role they use
/// ([`CallStore`], [`Outbox`], [`History`], [`OrderCache`], [`UsageLedger`],
/// [`AccountIndex`]); each backend implements each role in its own file.
pub trait Store:
    CallStore + Outbox + History + OrderCache + UsageLedger + AccountIndex + Send + Sync + 'static
{
    /// `"redis"` or `"embedded"`, for logs and metrics.
    fn backend(&self) -> &'static str;
}

/// The call path: a call's plan applied atomically, and the instance and
/// purchase order records it writes (read by the admin API, completed by
/// enrichment, redeemed once).
#[async_trait]
pub trait CallStore {
    /// Applies a plan atomically: all of it or nothing.
    async fn apply(&self, plan: &Plan) -> Result<Outcome, StoreError>;

    /// Is the store reachable and writable? (readiness)
    async fn ping(&self) -> Result<(), StoreError>;

    /// Reads one instance record (empty when unknown).
    async fn instance(&self, instance_id: &str) -> Result<Record, StoreError>;

    /// Reads one purchase order record (empty when unknown).
    async fn order(&self, order_id: &str) -> Result<Record, StoreError>;

    /// Writes facts learned from the order query API: into the instance
    /// record (when it exists) and the purchase order's record (when given).
    async fn enrich(
        &self,
        instance_id: &str,
        fields: &Record,
        order_id: Option<&str>,
        order_fields: &Record,
    ) -> Result<(), StoreError>;

    /// Redeems a purchase order once, atomically.
    async fn redeem(
        &self,
        order_id: &str,
        customer_id: &str,
        redeemed_by: &str,
        at: &str,
    ) -> Result<Redeem, StoreError>;
}

/// The outbox of settlement events (written by [`CallStore::apply`]): the
/// delivery worker's claim / touch / attempt / settle cycle, the delivered
/// sequence of each instance, the dead-letter list, and inspection.
#[async_trait]
pub trait Outbox {
    /// Takes about `max` events from the outbox for `consumer`, oldest first
    /// per shard (a sharded store asks each shard for `max / shards`, rounded
    /// up, so it may hand out a few more than `max`). Entries stay in the outbox until settled or acknowledged.
    /// With `stale`, entries another consumer claimed and left untouched that
    /// long (it died) are taken over first; that scan costs a command per
    /// shard, so callers ask for it only now and then.
    async fn outbox_claim(
        &self,
        consumer: &str,
        max: usize,
        stale: Option<Duration>,
    ) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Removes delivered entries from the outbox.
    async fn outbox_ack(&self, entries: &[OutboxEntry]) -> Result<(), StoreError>;

    /// Number of events in the outbox (claimed or not).
    async fn outbox_len(&self) -> Result<u64, StoreError>;

    /// Keeps claimed entries from being taken over while this consumer still
    /// holds them (they wait behind an earlier event of their instance).
    async fn outbox_touch(&self, consumer: &str, entries: &[OutboxEntry]) -> Result<(), StoreError>;

    /// The delivery bookkeeping of entries (none before the first attempt).
    async fn attempts(&self, entries: &[OutboxEntry]) -> Result<Vec<Option<Attempts>>, StoreError>;

    /// Records a failed attempt and when to try again.
    async fn record_attempt(&self, entry: &OutboxEntry, attempts: &Attempts) -> Result<(), StoreError>;

    /// Entries left the outbox: delivered (`dead` = None) or dead-lettered.
    /// For each, atomically advances its instance's delivered sequence and
    /// removes it; an entry delivered now ([`Settle::delivered`]) is kept in
    /// the [`History`] in the same step (unless the retention is 0), and
    /// history past the retention is pruned. One batch costs a round trip (a
    /// script per shard on Redis, one transaction embedded), whatever its size.
    async fn settle(&self, settles: &[Settle<'_>]) -> Result<(), StoreError>;

    /// The highest delivered (or dead-lettered) sequence of each instance.
    async fn delivered_seq(&self, subjects: &[&str]) -> Result<Vec<u64>, StoreError>;

    /// Every entry still in the outbox (inspection).
    async fn outbox_entries(&self) -> Result<Vec<OutboxEntry>, StoreError>;

    /// When the oldest event still in the outbox was accepted (UNIX ms).
    async fn oldest_pending_ms(&self) -> Result<Option<i64>, StoreError>;

    /// Every dead letter, oldest first (ties: by event id).
    async fn dlq_list(&self) -> Result<Vec<DeadLetter>, StoreError>;

    /// Puts a dead letter back into the outbox; false when there is none with that id.
    async fn dlq_redrive(&self, event_id: &str) -> Result<bool, StoreError>;

    /// May the delivery worker settle one batch while it claims and starts the
    /// next? Yes for a store that serves concurrent commands (Redis: the
    /// settle's round trip overlaps the claim's). No for one whose every write
    /// is a durable, serialized transaction (embedded: overlapping settles
    /// became more, smaller fsync'd transactions that took 40 % of the call
    /// path's peak), so it settles in step, as a batch between rounds.
    fn settle_concurrently(&self) -> bool {
        false
    }
}

/// Delivered events kept for the retention window (`KOOGATE_EVENT_RETENTION_SECS`),
/// written by [`Outbox::settle`]: found by event id, or listed newest first by
/// delivery time, instance or order. What is past the retention is never
/// answered, even before it is pruned.
///
/// Redis: the kept event under its own key (`hist:<event id>`, `PEXPIRE`d),
/// indexed by sorted sets of its shard (by time, trimmed by `ZREMRANGEBYSCORE`
/// once per settle batch; per order id, each expiring a retention after its
/// newest member; reads skip members past the cutoff); an instance's events
/// are found by their ids, `evt_<instance>_<1..seq>`, without an index.
/// Embedded: a table by event id and index tables keyed by time, pruned in
/// the settle transaction (a bounded number per transaction) and at open.
#[async_trait]
pub trait History {
    /// A kept delivered event.
    async fn history_get(&self, event_id: &str) -> Result<Option<Delivered>, StoreError>;

    /// Kept delivered events that [`HistoryQuery`] selects, newest first
    /// (ties: greater event id first), at most `limit`.
    async fn history_list(&self, query: &HistoryQuery) -> Result<Vec<Delivered>, StoreError>;
}

/// Which index [`History::history_list`] reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryIndex {
    /// Every kept event.
    All,
    /// The events of one instance.
    Instance(String),
    /// The events naming an order id (the transition's, or the purchase order's).
    Order(String),
}

/// What [`History::history_list`] selects: an index, a window of delivery
/// times (UNIX ms, both ends included) and how many at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryQuery {
    pub index: HistoryIndex,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: usize,
}

/// The oldest delivery time (UNIX ms) still within `retention` at `now_ms`:
/// older kept events are pruned, and never answered meanwhile.
pub fn retention_cutoff(now_ms: i64, retention: Duration) -> i64 {
    now_ms.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX))
}

/// Answers of KooGallery's order query API, cached per order line for
/// enrichment (see [`crate::delivery::enrich`]).
#[async_trait]
pub trait OrderCache {
    /// A cached order query answer of an order line (raw JSON), if fresh.
    async fn cached_order(&self, order_id: &str, line: &str) -> Result<Option<String>, StoreError>;

    /// Caches an order query answer for `ttl`.
    async fn cache_order(&self, order_id: &str, line: &str, answer: &str, ttl: Duration) -> Result<(), StoreError>;
}

/// The usage ledger of account settlement (see [`crate::usage`]): each backend
/// implements it in its own `usage` module.
#[async_trait]
pub trait UsageLedger {
    /// Decides and stores usage records, in order (see [`crate::usage::decide`]):
    /// every accepted record is stored, with its period and its `metering_sn`,
    /// before this returns.
    async fn usage_accept(&self, records: &[UsageRecord], now_ms: i64) -> Result<Vec<Decision>, StoreError>;

    /// Takes about `max` usage records due by `now_ms` (a sharded store may
    /// hand out a few more, as [`Outbox::outbox_claim`]; the pusher sends them
    /// in batches of at most `max`) and leases them until `now_ms + lease`
    /// (another replica takes them over after that).
    async fn usage_claim(&self, max: usize, now_ms: i64, lease: Duration) -> Result<Vec<UsageClaim>, StoreError>;

    /// Settles claimed records. Only a still pending record changes.
    async fn usage_settle(&self, settles: &[(UsageRecord, UsageSettle)], now_ms: i64) -> Result<(), StoreError>;

    /// One usage record by `metering_sn`.
    async fn usage_get(&self, metering_sn: &str) -> Result<Option<StoredUsage>, StoreError>;

    /// Every record in the usage dead-letter list, oldest first.
    async fn usage_dead(&self) -> Result<Vec<StoredUsage>, StoreError>;

    /// Puts a dead usage record back to be pushed; false when no dead record has that sn.
    async fn usage_redrive(&self, metering_sn: &str, now_ms: i64) -> Result<bool, StoreError>;

    /// Gauges: unpushed records, the oldest one's acceptance time, dead records.
    async fn usage_stats(&self) -> Result<UsageStats, StoreError>;

    /// The instances whose accepted usage named this package instance
    /// (`relate_pkg_instance`), sorted: the package's queryInstance lists
    /// their usage of it. Linked when a record is accepted (and again when it
    /// is pushed, so a crash between the steps loses no link).
    async fn usage_package_links(&self, package_id: &str) -> Result<Vec<String>, StoreError>;

    /// The usage records accepted for an instance, newest acceptance first
    /// (ties: greater `metering_sn` first), at most `max`, and how many it has
    /// in all (the admin API's per-instance usage view).
    async fn usage_of_instance(&self, instance_id: &str, max: usize) -> Result<(Vec<StoredUsage>, u64), StoreError>;
}

/// One page of an account's instances (see [`AccountIndex::account_instances`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountPage {
    /// Instance ids, newest purchase first.
    pub instance_ids: Vec<String>,
    /// How many instances the account holds in all.
    pub total: u64,
}

/// The account index of account settlement (see [`crate::accounts`]): which
/// instances a Huawei Cloud account (KooGallery `customerId`) holds. It is
/// written where the account becomes known, in the delivery step (a V1
/// purchase names its buyer; a V2 purchase learns it from the order query),
/// never on the call path. Each backend implements it in its own `accounts`
/// module.
#[async_trait]
pub trait AccountIndex {
    /// Links an instance to the account that bought it, with its purchase
    /// time (UNIX ms), and clears its pending mark. Idempotent: an instance
    /// already linked keeps its first link.
    async fn account_link(&self, customer_id: &str, instance_id: &str, created_ms: i64) -> Result<(), StoreError>;

    /// Marks an instance whose account is not known yet (its order query is
    /// still failing). Idempotent; [`AccountIndex::account_link`] clears it.
    async fn account_pending(&self, instance_id: &str, since_ms: i64) -> Result<(), StoreError>;

    /// Instances whose account is not known yet.
    async fn accounts_pending(&self) -> Result<u64, StoreError>;

    /// The account's instance ids from `offset`, at most `limit`, newest
    /// purchase first (ties: greater instance id first), and the total.
    async fn account_instances(&self, customer_id: &str, offset: u64, limit: u64) -> Result<AccountPage, StoreError>;

    /// The records of several instances, in the order asked (an unknown id
    /// gives an empty record).
    async fn instance_records(&self, instance_ids: &[String]) -> Result<Vec<Record>, StoreError>;
}

/// One entry leaving the outbox ([`Outbox::settle`]): dead-lettered with
/// `dead`, delivered now with `delivered` (kept in the [`History`]), or
/// neither (settled without a delivery: a test event not forwarded, or a stale
/// claim of an event settled before).
#[derive(Clone, Copy, Debug)]
pub struct Settle<'a> {
    pub entry: &'a OutboxEntry,
    pub dead: Option<&'a DeadLetter>,
    pub delivered: Option<&'a Delivered>,
}

impl<'a> Settle<'a> {
    /// Delivered now: kept in the history.
    pub fn delivered(delivered: &'a Delivered) -> Self {
        Self { entry: &delivered.entry, dead: None, delivered: Some(delivered) }
    }

    /// Leaves the outbox without a delivery to keep.
    pub fn skipped(entry: &'a OutboxEntry) -> Self {
        Self { entry, dead: None, delivered: None }
    }

    /// Dead-lettered.
    pub fn dead(dead: &'a DeadLetter) -> Self {
        Self { entry: &dead.entry, dead: Some(dead), delivered: None }
    }
}

/// The store the delivery worker works on, beside `shared` (the calls'): on
/// Redis a connection of its own, so that a claim or settle of hundreds of
/// events does not queue the calls' scripts behind it on one socket; the
/// embedded store is one locked file, shared.
pub async fn open_for_delivery(
    spec: &StoreSpec,
    prefix: &str,
    retention: Duration,
    shared: &Arc<dyn Store>,
) -> Result<Arc<dyn Store>, StoreError> {
    match spec {
        StoreSpec::Embedded(_) => Ok(Arc::clone(shared)),
        StoreSpec::Redis(_) | StoreSpec::RedisCluster(_) => open(spec, prefix, retention).await,
    }
}

/// Opens the store a `KOOGATE_STORE` value names, keeping delivered events
/// for `retention` (`KOOGATE_EVENT_RETENTION_SECS`; zero keeps none).
pub async fn open(spec: &StoreSpec, prefix: &str, retention: Duration) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match spec {
        StoreSpec::Redis(url) => Arc::new(redis::RedisStore::connect(url, false, prefix, retention).await?),
        StoreSpec::RedisCluster(url) => Arc::new(redis::RedisStore::connect(url, true, prefix, retention).await?),
        StoreSpec::Embedded(dir) => Arc::new(embedded::EmbeddedStore::open(dir, retention)?),
    })
}

/// Where state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    Redis(String),
    RedisCluster(String),
    Embedded(std::path::PathBuf),
}

impl StoreSpec {
    /// `redis://…`/`rediss://…`, `redis+cluster://…`, or a directory path.
    pub fn parse(value: &str) -> Self {
        if let Some(rest) = value.strip_prefix("redis+cluster://") {
            Self::RedisCluster(format!("redis://{rest}"))
        } else if let Some(rest) = value.strip_prefix("rediss+cluster://") {
            Self::RedisCluster(format!("rediss://{rest}"))
        } else if value.starts_with("redis://") || value.starts_with("rediss://") || value.starts_with("redis+unix://")
        {
            Self::Redis(value.to_owned())
        } else {
            Self::Embedded(value.into())
        }
    }
}
