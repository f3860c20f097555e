//! The Redis backend: one `EVALSHA` of `apply.lua` per call.
//!
//! The script is sent with `EVALSHA`; when Redis answers `NOSCRIPT` (first
//! use, or after a restart or `SCRIPT FLUSH`) it is loaded and run again.
//! The outbox is one stream per shard with consumer group `koogate`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply};
use redis::{Cmd, ErrorKind, Pipeline, RedisFuture, Script, Value};

use super::keys::{instance_shard, Keys, SHARDS};
use super::plan::{Attempts, DeadLetter, OutboxEntry, Outcome, Plan, Record, Redeem};
use super::{Store, StoreError};
use crate::domain::field;

mod accounts;
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
    script: Script,
    settle: Script,
    redrive: Script,
    redeem: Script,
    usage: usage::Scripts,
}

impl RedisStore {
    /// Connects (and fails fast when Redis does not answer).
    pub async fn connect(url: &str, cluster: bool, prefix: &str) -> Result<Self, StoreError> {
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
            script: Script::new(include_str!("apply.lua")),
            settle: Script::new(include_str!("settle.lua")),
            redrive: Script::new(include_str!("redrive.lua")),
            redeem: Script::new(include_str!("redeem.lua")),
            usage: usage::Scripts::new(),
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

    /// Reads never-delivered entries, one `XREADGROUP` per shard (a single
    /// multi-stream read would cross slots on a cluster).
    async fn read_new(&self, consumer: &str, max: usize) -> Result<Vec<OutboxEntry>, redis::RedisError> {
        let keys = self.keys.outboxes();
        let per_shard = max.div_ceil(usize::from(SHARDS)).max(1);
        let cmds = keys
            .iter()
            .enumerate()
            .map(|(shard, key)| {
                let opts = StreamReadOptions::default().group(GROUP, consumer).count(per_shard);
                let mut cmd = redis::cmd("XREADGROUP");
                cmd.arg(&opts).arg("STREAMS").arg(key).arg(">");
                (shard as u8, cmd)
            })
            .collect();
        let replies: Vec<Option<StreamReadReply>> = self.query_all(cmds).await?;
        let mut out = Vec::new();
        for reply in replies.into_iter().flatten() {
            for stream in reply.keys {
                let shard = shard_of_stream(&keys, &stream.key);
                out.extend(stream.ids.iter().filter_map(|id| entry_from_stream(shard, id)));
            }
        }
        Ok(out)
    }
}

fn shard_of_stream(keys: &[String], key: &str) -> u8 {
    keys.iter().position(|k| k == key).unwrap_or(0) as u8
}

fn field(id: &StreamId, name: &str) -> Option<String> {
    id.map.get(name).and_then(|v| redis::from_redis_value::<String>(v).ok())
}

/// Rebuilds an outbox entry from a stream entry. Malformed entries are
/// skipped with a log line (they cannot have come from `apply.lua`).
fn entry_from_stream(shard: u8, id: &StreamId) -> Option<OutboxEntry> {
    let parse = || -> Option<OutboxEntry> {
        let record: HashMap<String, String> = serde_json::from_str(&field(id, "record")?).ok()?;
        let change = match serde_json::from_str(&field(id, "change")?).ok()? {
            serde_json::Value::Object(map) => map,
            _ => return None,
        };
        Some(OutboxEntry {
            cursor: id.id.clone(),
            shard,
            id: field(id, "id")?,
            kind: field(id, "type")?,
            occurred_at: field(id, "occurred_at")?,
            test: field(id, "test")? == "1",
            record: record.into_iter().collect(),
            change,
            redrive: field(id, "redrive").as_deref() == Some("1"),
        })
    };
    let entry = parse();
    if entry.is_none() {
        tracing::error!(stream_id = %id.id, shard, "outbox entry is malformed; skipped");
    }
    entry
}

/// One command per shard, for [`RedisStore::query_all`] (gauges and lists that span every shard).
fn every_shard(build: impl Fn(u8) -> Cmd) -> Vec<(u8, Cmd)> {
    (0..SHARDS).map(|shard| (shard, build(shard))).collect()
}

fn bytes(v: &Value) -> Option<String> {
    redis::from_redis_value::<String>(v).ok()
}

fn record_of(v: &Value) -> Record {
    redis::from_redis_value::<HashMap<String, String>>(v).map(|m| m.into_iter().collect()).unwrap_or_default()
}

/// Turns the script's reply into an [`Outcome`].
fn outcome_of(reply: Vec<Value>) -> Result<Outcome, StoreError> {
    let bad = || StoreError::Protocol(format!("unexpected script reply {reply:?}"));
    let tag = reply.first().and_then(bytes).ok_or_else(bad)?;
    let text = |i: usize| reply.get(i).and_then(bytes).ok_or_else(bad);
    Ok(match tag.as_str() {
        "replay" => Outcome::Replay,
        "kept" => Outcome::Kept { code: text(1)?, answer: text(2)? },
        "read" => Outcome::Read { records: reply[1..].iter().map(record_of).collect() },
        "applied" => {
            let event_id = text(3)?;
            Outcome::Applied {
                code: text(1)?,
                answer: text(2)?,
                event_id: (!event_id.is_empty()).then_some(event_id),
                prior_status: text(4)?,
            }
        }
        _ => return Err(bad()),
    })
}

#[async_trait]
impl Store for RedisStore {
    async fn apply(&self, plan: &Plan) -> Result<Outcome, StoreError> {
        let json = serde_json::to_string(plan).map_err(|e| StoreError::Protocol(e.to_string()))?;
        let shard = plan.shard;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.keys.nonce(shard, plan.nonce.as_deref().unwrap_or("-")))
            .key(self.keys.answer(shard, plan.dedup.as_deref().unwrap_or("-")))
            .key(self.keys.instance(&plan.subject))
            // Unused key slots repeat the nonce key: same shard, never written.
            .key(match &plan.order {
                Some(order) => self.keys.order(order),
                None => self.keys.nonce(shard, "-"),
            })
            .key(self.keys.outbox(shard))
            .key(match &plan.dedup_legacy {
                Some(legacy) => self.keys.answer(shard, legacy),
                None => self.keys.nonce(shard, "-"),
            });
        // On a cluster the script cannot read records of other shards: those
        // are read beside it (a query naming instances of several shards).
        let cluster = matches!(self.conn, Conn::Cluster(_));
        let in_script = |id: &str| !cluster || instance_shard(id) == shard;
        let (here, elsewhere): (Vec<&String>, Vec<&String>) = plan.read.iter().partition(|id| in_script(id));
        for id in &here {
            invocation.key(self.keys.instance(id));
        }
        invocation.arg(json);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = invocation.invoke_async(&mut conn).await?;
        match outcome_of(reply)? {
            Outcome::Read { records } if !elsewhere.is_empty() => {
                let cmds = elsewhere
                    .iter()
                    .map(|id| {
                        let mut cmd = redis::cmd("HGETALL");
                        cmd.arg(self.keys.instance(id));
                        (instance_shard(id), cmd)
                    })
                    .collect();
                let others: Vec<HashMap<String, String>> = self.query_all(cmds).await?;
                let (mut here_records, mut other_records) = (records.into_iter(), others.into_iter());
                let merged = plan
                    .read
                    .iter()
                    .map(|id| {
                        let next = if in_script(id) {
                            here_records.next()
                        } else {
                            other_records.next().map(|m| m.into_iter().collect())
                        };
                        next.unwrap_or_default()
                    })
                    .collect();
                Ok(Outcome::Read { records: merged })
            }
            other => Ok(other),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn outbox_claim(
        &self,
        consumer: &str,
        max: usize,
        stale: Option<Duration>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        // Entries a dead consumer claimed and never acknowledged come first.
        let mut out = Vec::new();
        let mut conn = self.conn.clone();
        let min_idle = stale.map(|s| u64::try_from(s.as_millis()).unwrap_or(u64::MAX));
        let scan = if min_idle.is_some() { self.keys.outboxes() } else { Vec::new() };
        for (shard, key) in scan.iter().enumerate() {
            let min_idle = min_idle.unwrap_or(u64::MAX);
            if out.len() >= max {
                break;
            }
            let opts = StreamAutoClaimOptions::default().count(max - out.len());
            let claimed: Result<StreamAutoClaimReply, _> =
                redis::Cmd::xautoclaim_options(key, GROUP, consumer, min_idle, "0-0", opts)
                    .query_async(&mut conn)
                    .await;
            match claimed {
                Ok(reply) => out.extend(reply.claimed.iter().filter_map(|id| entry_from_stream(shard as u8, id))),
                Err(e) if e.code() == Some("NOGROUP") => {
                    // A non-persistent Redis restarted: recreate the groups.
                    self.ensure_groups().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if out.len() < max {
            match self.read_new(consumer, max - out.len()).await {
                Ok(new) => out.extend(new),
                Err(e) if e.code() == Some("NOGROUP") => self.ensure_groups().await?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    async fn outbox_ack(&self, entries: &[OutboxEntry]) -> Result<(), StoreError> {
        let mut cmds = Vec::new();
        for e in entries {
            let key = self.keys.outbox(e.shard);
            let mut ack = redis::cmd("XACK");
            ack.arg(&key).arg(GROUP).arg(&e.cursor);
            let mut del = redis::cmd("XDEL");
            del.arg(&key).arg(&e.cursor);
            cmds.push((e.shard, ack));
            cmds.push((e.shard, del));
        }
        let _: Vec<i64> = self.query_all(cmds).await?;
        Ok(())
    }

    async fn outbox_len(&self) -> Result<u64, StoreError> {
        let cmds = every_shard(|shard| redis::cmd("XLEN").arg(self.keys.outbox(shard)).clone());
        let lens: Vec<u64> = self.query_all(cmds).await?;
        Ok(lens.iter().sum())
    }

    async fn instance(&self, instance_id: &str) -> Result<Record, StoreError> {
        let mut conn = self.conn.clone();
        let map: HashMap<String, String> =
            redis::cmd("HGETALL").arg(self.keys.instance(instance_id)).query_async(&mut conn).await?;
        Ok(map.into_iter().collect())
    }

    async fn outbox_touch(&self, consumer: &str, entries: &[OutboxEntry]) -> Result<(), StoreError> {
        let cmds = entries
            .iter()
            .map(|e| {
                let mut cmd = redis::cmd("XCLAIM");
                cmd.arg(self.keys.outbox(e.shard)).arg(GROUP).arg(consumer).arg(0).arg(&e.cursor).arg("JUSTID");
                (e.shard, cmd)
            })
            .collect();
        let _: Vec<Value> = self.query_all(cmds).await?;
        Ok(())
    }

    async fn attempts(&self, entries: &[OutboxEntry]) -> Result<Vec<Option<Attempts>>, StoreError> {
        let cmds = entries
            .iter()
            .map(|e| {
                let mut cmd = redis::cmd("HGET");
                cmd.arg(self.keys.attempts(e.shard)).arg(&e.id);
                (e.shard, cmd)
            })
            .collect();
        let raw: Vec<Option<String>> = self.query_all(cmds).await?;
        Ok(raw.into_iter().map(|r| r.and_then(|json| serde_json::from_str(&json).ok())).collect())
    }

    async fn record_attempt(&self, entry: &OutboxEntry, attempts: &Attempts) -> Result<(), StoreError> {
        let json = serde_json::to_string(attempts).map_err(|e| StoreError::Protocol(e.to_string()))?;
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HSET")
            .arg(self.keys.attempts(entry.shard))
            .arg(&entry.id)
            .arg(json)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn settle(&self, entry: &OutboxEntry, dead: Option<&DeadLetter>) -> Result<(), StoreError> {
        let (subject, seq) = entry.subject_seq();
        let dead = match dead {
            Some(d) => serde_json::to_string(d).map_err(|e| StoreError::Protocol(e.to_string()))?,
            None => String::new(),
        };
        let mut conn = self.conn.clone();
        let _: i64 = self
            .settle
            .key(self.keys.instance(subject))
            .key(self.keys.outbox(entry.shard))
            .key(self.keys.attempts(entry.shard))
            .key(self.keys.dlq(entry.shard))
            .arg(&entry.id)
            .arg(seq)
            .arg(&entry.cursor)
            .arg(GROUP)
            .arg(dead)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn delivered_seq(&self, subjects: &[&str]) -> Result<Vec<u64>, StoreError> {
        let cmds = subjects
            .iter()
            .map(|s| {
                let mut cmd = redis::cmd("HGET");
                cmd.arg(self.keys.instance(s)).arg("delivered_seq");
                (instance_shard(s), cmd)
            })
            .collect();
        let raw: Vec<Option<u64>> = self.query_all(cmds).await?;
        Ok(raw.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn outbox_entries(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let cmds = every_shard(|shard| redis::cmd("XRANGE").arg(self.keys.outbox(shard)).arg("-").arg("+").clone());
        let replies: Vec<redis::streams::StreamRangeReply> = self.query_all(cmds).await?;
        Ok(replies
            .iter()
            .enumerate()
            .flat_map(|(shard, r)| r.ids.iter().filter_map(move |id| entry_from_stream(shard as u8, id)))
            .collect())
    }

    async fn oldest_pending_ms(&self) -> Result<Option<i64>, StoreError> {
        let cmds = every_shard(|shard| {
            redis::cmd("XRANGE").arg(self.keys.outbox(shard)).arg("-").arg("+").arg("COUNT").arg(1).clone()
        });
        let replies: Vec<redis::streams::StreamRangeReply> = self.query_all(cmds).await?;
        // A stream id starts with the milliseconds it was added at.
        Ok(replies
            .iter()
            .filter_map(|r| r.ids.first())
            .filter_map(|id| id.id.split_once('-').and_then(|(ms, _)| ms.parse().ok()))
            .min())
    }

    async fn dlq_list(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let cmds = every_shard(|shard| redis::cmd("HVALS").arg(self.keys.dlq(shard)).clone());
        let replies: Vec<Vec<String>> = self.query_all(cmds).await?;
        let mut out: Vec<DeadLetter> =
            replies.iter().flatten().filter_map(|json| serde_json::from_str(json).ok()).collect();
        out.sort_by_key(|d| d.dead_at_ms);
        Ok(out)
    }

    async fn dlq_redrive(&self, event_id: &str) -> Result<bool, StoreError> {
        let Some((subject, _)) = super::plan::parse_event_id(event_id) else { return Ok(false) };
        let shard = instance_shard(subject);
        let mut conn = self.conn.clone();
        let raw: Option<String> =
            redis::cmd("HGET").arg(self.keys.dlq(shard)).arg(event_id).query_async(&mut conn).await?;
        let Some(dead) = raw.and_then(|json| serde_json::from_str::<DeadLetter>(&json).ok()) else { return Ok(false) };
        let e = &dead.entry;
        let record = serde_json::to_string(&e.record).map_err(|err| StoreError::Protocol(err.to_string()))?;
        let change = serde_json::Value::Object(e.change.clone()).to_string();
        let moved: i64 = self
            .redrive
            .key(self.keys.dlq(shard))
            .key(self.keys.outbox(shard))
            .arg(event_id)
            .arg(&["id", &e.id, "type", &e.kind, "occurred_at", &e.occurred_at][..])
            .arg(&["test", if e.test { "1" } else { "0" }, "record", &record, "change", &change, "redrive", "1"][..])
            .invoke_async(&mut conn)
            .await?;
        Ok(moved == 1)
    }

    async fn order(&self, order_id: &str) -> Result<Record, StoreError> {
        let mut conn = self.conn.clone();
        let map: HashMap<String, String> =
            redis::cmd("HGETALL").arg(self.keys.order(order_id)).query_async(&mut conn).await?;
        Ok(map.into_iter().collect())
    }

    async fn redeem(
        &self,
        order_id: &str,
        customer_id: &str,
        redeemed_by: &str,
        at: &str,
    ) -> Result<Redeem, StoreError> {
        let order = self.order(order_id).await?;
        let mut invocation = self.redeem.prepare_invoke();
        invocation.key(self.keys.order(order_id));
        for (field, instance) in &order {
            if field.starts_with("line:") {
                invocation.key(self.keys.instance(instance));
            }
        }
        invocation.arg(customer_id).arg(redeemed_by).arg(at);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = invocation.invoke_async(&mut conn).await?;
        let tag = reply.first().and_then(bytes).unwrap_or_default();
        let record = || reply.get(1).map(record_of).unwrap_or_default();
        Ok(match tag.as_str() {
            "released" => Redeem::Released,
            "already" => Redeem::Already(record()),
            "redeemed" => Redeem::Redeemed(record()),
            _ => Redeem::NotFound,
        })
    }

    async fn cached_order(&self, order_id: &str, line: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("GET").arg(self.keys.order_cache(order_id, line)).query_async(&mut conn).await?)
    }

    async fn cache_order(&self, order_id: &str, line: &str, answer: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let secs = ttl.as_secs().max(1);
        let () = redis::cmd("SET")
            .arg(self.keys.order_cache(order_id, line))
            .arg(answer)
            .arg("EX")
            .arg(secs)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn enrich(
        &self,
        instance_id: &str,
        fields: &Record,
        order_id: Option<&str>,
        order_fields: &Record,
    ) -> Result<(), StoreError> {
        // Separate commands: the order of an upgrade may live in another slot than its instance.
        let mut conn = self.conn.clone();
        if !fields.is_empty() {
            let key = self.keys.instance(instance_id);
            let exists: bool = redis::cmd("HEXISTS").arg(&key).arg(field::STATUS).query_async(&mut conn).await?;
            if exists {
                let () = redis::cmd("HSET").arg(&key).arg(fields).query_async(&mut conn).await.map(|_: i64| ())?;
            }
        }
        if let (Some(order), false) = (order_id, order_fields.is_empty()) {
            let key = self.keys.order(order);
            let exists: bool = redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await?;
            if exists {
                let () =
                    redis::cmd("HSET").arg(&key).arg(order_fields).query_async(&mut conn).await.map(|_: i64| ())?;
            }
        }
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

/// Is this error worth retrying (connection trouble) rather than a bug?
pub fn is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.kind() == ErrorKind::TryAgain
}
