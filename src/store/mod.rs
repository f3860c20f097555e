//! Dedup, nonce, ledger and outbox state, behind one trait.
//!
//! - [`plan`]: the command language both backends interpret.
//! - [`keys`]: key layout, shards, instance ids.
//! - [`redis`]: the production backend (one EVALSHA per call, Cluster-ready).
//! - [`embedded`]: a redb file, the default when no Redis URL is given.

pub mod embedded;
pub mod keys;
pub mod plan;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use plan::{Branch, EventSpec, OutboxEntry, Outcome, Plan, Record};

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

/// What the gateway needs from a store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies a plan atomically: all of it or nothing.
    async fn apply(&self, plan: &Plan) -> Result<Outcome, StoreError>;

    /// Is the store reachable and writable? (readiness)
    async fn ping(&self) -> Result<(), StoreError>;

    /// Takes up to `max` events from the outbox for `consumer`, oldest first
    /// per shard. Entries stay in the outbox until [`Store::outbox_ack`]; ones
    /// claimed by a consumer that died are handed out again after `stale`.
    async fn outbox_claim(&self, consumer: &str, max: usize, stale: Duration) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Removes delivered entries from the outbox.
    async fn outbox_ack(&self, entries: &[OutboxEntry]) -> Result<(), StoreError>;

    /// Number of events in the outbox (claimed or not).
    async fn outbox_len(&self) -> Result<u64, StoreError>;

    /// Reads one instance record (empty when unknown).
    async fn instance(&self, instance_id: &str) -> Result<Record, StoreError>;

    /// `"redis"` or `"embedded"`, for logs and metrics.
    fn backend(&self) -> &'static str;
}

/// Opens the store a `KOOGATE_STORE` value names.
pub async fn open(spec: &StoreSpec, prefix: &str) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match spec {
        StoreSpec::Redis(url) => Arc::new(redis::RedisStore::connect(url, false, prefix).await?),
        StoreSpec::RedisCluster(url) => Arc::new(redis::RedisStore::connect(url, true, prefix).await?),
        StoreSpec::Embedded(dir) => Arc::new(embedded::EmbeddedStore::open(dir)?),
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
