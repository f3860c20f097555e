//! The Redis backend: one `EVALSHA` of `apply.lua` per call.
//!
//! The script is sent with `EVALSHA`; when Redis answers `NOSCRIPT` (first
//! use, or after a restart or `SCRIPT FLUSH`) it is loaded and run again.
//! The outbox is one stream per shard with consumer group `koogate`.
//!
//! This file holds the plumbing every role shares (the connection,
//! `query_all`, `every_shard`, reply decoding); each role of
//! [`crate::store::Store`] is implemented in its own file, beside the Lua
//! scripts it loads: `calls` (`apply.lua`, `redeem.lua`), `outbox`
//! (`settle.lua`, `redrive.lua`), `history` (written by `settle.lua`),
//! `orders`, `usage` (`usage_*.lua`) and `accounts`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisFuture, Value};

use super::keys::{instance_shard, Keys, SHARDS};
use super::plan::Record;
use super::{Store, StoreError};

mod accounts;
mod calls;
mod history;
mod orders;
mod outbox;
mod usage;

const GROUP: &str = "koogate";

/// A standalone or cluster connection; both multiplex and reconnect.
/// One per store, cloned per call: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

pub struct RedisStore {
    conn: Conn,
    keys: Keys,
    accounts: accounts::Scripts,
    calls: calls::Scripts,
    outbox: outbox::Scripts,
    usage: usage::Scripts,
    /// How long delivered events are kept in the history (zero: none).
    retention: Duration,
}

impl RedisStore {
    /// Connects (and fails fast when Redis does not answer).
    /// Delivered events are kept in the history for `retention`.
    pub async fn connect(url: &str, cluster: bool, prefix: &str, retention: Duration) -> Result<Self, StoreError> {
        let conn = if cluster {
            let client = redis::cluster::ClusterClientBuilder::new(vec![url.to_owned()])
                .connection_timeout(Duration::from_secs(2))
                .response_timeout(Duration::from_secs(3))
                .build()?;
            Conn::Cluster(client.get_async_connection().await?)
        } else {
            let client = redis::Client::open(url)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Duration::from_secs(2))
                .set_response_timeout(Duration::from_secs(3))
                .set_number_of_retries(2)
                .set_max_delay(500);
            Conn::Single(ConnectionManager::new_with_config(client, config).await?)
        };
        let store = Self {
            conn,
            keys: Keys::new(prefix),
            accounts: accounts::Scripts::new(),
            calls: calls::Scripts::new(),
            outbox: outbox::Scripts::new(),
            usage: usage::Scripts::new(),
            retention,
        };
        store.ensure_groups().await?;
        Ok(store)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Creates the consumer group of every outbox stream (idempotent).
    async fn ensure_groups(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        for key in self.keys.outboxes() {
            let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&key)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Runs commands, each tagged with the shard its key lives in, in as few
    /// round trips as the deployment allows: one pipeline on a standalone
    /// Redis; on a cluster one pipeline per shard (a pipeline must not cross
    /// slots there), all at once. Replies come back in the commands' order.
    async fn query_all<T: redis::FromRedisValue>(&self, cmds: Vec<(u8, Cmd)>) -> Result<Vec<T>, redis::RedisError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match &self.conn {
            Conn::Single(_) => {
                let mut pipe = redis::pipe();
                for (_, cmd) in &cmds {
                    pipe.add_command(cmd.clone());
                }
                let mut conn = self.conn.clone();
                pipe.query_async(&mut conn).await
            }
            Conn::Cluster(_) => {
                let mut groups: BTreeMap<u8, Vec<(usize, Cmd)>> = BTreeMap::new();
                for (i, (shard, cmd)) in cmds.into_iter().enumerate() {
                    groups.entry(shard).or_default().push((i, cmd));
                }
                let total = groups.values().map(Vec::len).sum();
                let runs = groups.into_values().map(|group| {
                    let mut conn = self.conn.clone();
                    async move {
                        let mut pipe = redis::pipe();
                        for (_, cmd) in &group {
                            pipe.add_command(cmd.clone());
                        }
                        let replies: Vec<T> = pipe.query_async(&mut conn).await?;
                        Ok::<_, redis::RedisError>(group.into_iter().map(|(i, _)| i).zip(replies).collect::<Vec<_>>())
                    }
                });
                let mut slots: Vec<Option<T>> = (0..total).map(|_| None).collect();
                for (i, reply) in futures::future::try_join_all(runs).await?.into_iter().flatten() {
                    slots[i] = Some(reply);
                }
                slots
                    .into_iter()
                    .map(|r| {
                        r.ok_or_else(|| redis::RedisError::from((ErrorKind::ResponseError, "missing pipeline reply")))
                    })
                    .collect()
            }
        }
    }
}

impl RedisStore {
    /// Instance records, in the order asked (an unknown id gives an empty
    /// record): one `HGETALL` each, pipelined per shard.
    async fn read_instances<'a>(&self, ids: impl Iterator<Item = &'a str>) -> Result<Vec<Record>, StoreError> {
        let cmds =
            ids.map(|id| (instance_shard(id), redis::cmd("HGETALL").arg(self.keys.instance(id)).clone())).collect();
        let replies: Vec<Value> = self.query_all(cmds).await?;
        Ok(replies.iter().map(record_of).collect())
    }
}

/// One command per shard, for `query_all` (gauges and lists that span every shard).
fn every_shard(build: impl Fn(u8) -> Cmd) -> Vec<(u8, Cmd)> {
    (0..SHARDS).map(|shard| (shard, build(shard))).collect()
}

fn bytes(v: &Value) -> Option<String> {
    redis::from_redis_value::<String>(v).ok()
}

fn record_of(v: &Value) -> Record {
    redis::from_redis_value::<HashMap<String, String>>(v).map(|m| m.into_iter().collect()).unwrap_or_default()
}

impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }
}

/// Is this error worth retrying (connection trouble) rather than a bug?
pub fn is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.kind() == ErrorKind::TryAgain
}
