//! The outbox on Redis ([`Outbox`]): one stream per shard with consumer
//! group `koogate`, attempts and dead letters in per-shard hashes;
//! `settle.lua` and `redrive.lua` move an entry out of (or back into) its
//! stream atomically; `settle.lua` also keeps a delivered event in the
//! history (read in `history.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply};
use redis::{Script, Value};

use super::{every_shard, Conn, RedisStore, GROUP};
use crate::store::keys::{instance_shard, SHARDS};
use crate::store::{retention_cutoff, Attempts, DeadLetter, Outbox, OutboxEntry, Record, Settle, StoreError};

/// Events per settle.lua run at most (Lua's `unpack` has a limit).
const SETTLE_CHUNK: usize = 256;

pub(super) struct Scripts {
    settle: Script,
    redrive: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self { settle: Script::new(include_str!("settle.lua")), redrive: Script::new(include_str!("redrive.lua")) }
    }
}

impl RedisStore {
    /// Reads never-delivered entries: one `XREADGROUP` of every shard's
    /// stream on a standalone Redis, one per shard on a cluster (a multi-stream
    /// read there would cross slots).
    async fn read_new(&self, consumer: &str, max: usize) -> Result<Vec<OutboxEntry>, redis::RedisError> {
        let keys = self.keys.outboxes();
        let per_shard = max.div_ceil(usize::from(SHARDS)).max(1);
        let read = |streams: &[String]| {
            let opts = StreamReadOptions::default().group(GROUP, consumer).count(per_shard);
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg(&opts).arg("STREAMS").arg(streams);
            for _ in streams {
                cmd.arg(">");
            }
            cmd
        };
        let cmds = match self.conn {
            Conn::Single(_) => vec![(0, read(&keys))],
            Conn::Cluster(_) => {
                keys.iter().enumerate().map(|(shard, key)| (shard as u8, read(std::slice::from_ref(key)))).collect()
            }
        };
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

    /// One settle.lua run over groups of one shard each (the layout is
    /// described at the top of the script), with the retention (ms) and the
    /// history's cutoff (UNIX ms) of the whole batch.
    fn settle_run(
        &self,
        run: &[(u8, &[&Settle<'_>])],
        retention: u64,
        cutoff: i64,
    ) -> Result<redis::ScriptInvocation<'_>, StoreError> {
        let mut invocation = self.outbox.settle.prepare_invoke();
        invocation.arg(GROUP).arg(retention).arg(cutoff);
        for &(shard, group) in run {
            invocation
                .key(self.keys.outbox(shard))
                .key(self.keys.attempts(shard))
                .key(self.keys.dlq(shard))
                .key(self.keys.history_by_time(shard));
            invocation.arg(group.len());
            for s in group {
                let (subject, seq) = s.entry.subject_seq();
                let dead = s.dead.map(to_json).transpose()?.unwrap_or_default();
                let kept = s.delivered.filter(|_| retention > 0);
                let history = kept.map(to_json).transpose()?.unwrap_or_default();
                let record = self.keys.instance(subject);
                let order = crate::store::plan::entry_indexed_order_id(s.entry);
                let by_order = order.map_or_else(|| record.clone(), |o| self.keys.history_by_order(shard, o));
                invocation.key(&record).key(self.keys.history(&s.entry.id)).key(by_order);
                invocation
                    .arg(&s.entry.id)
                    .arg(seq)
                    .arg(&s.entry.cursor)
                    .arg(dead)
                    .arg(history)
                    .arg(kept.map_or(0, |d| d.delivered_at_ms))
                    .arg(u8::from(order.is_some()));
            }
        }
        Ok(invocation)
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Protocol(e.to_string()))
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
        // `fields`: the record as HGETALL's flat list (apply.lua); `record`: a
        // JSON object (redrive.lua, and entries written before `fields`).
        let record: Record = match field(id, "fields") {
            Some(flat) => {
                let flat: Vec<String> = serde_json::from_str(&flat).ok()?;
                let mut pairs = flat.into_iter();
                let mut record = Record::new();
                while let (Some(k), Some(v)) = (pairs.next(), pairs.next()) {
                    record.insert(k, v);
                }
                record
            }
            None => serde_json::from_str(&field(id, "record")?).ok()?,
        };
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
            record,
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

#[async_trait]
impl Outbox for RedisStore {
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
        // One HMGET per shard for the whole batch.
        let mut by_shard: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
        for (i, e) in entries.iter().enumerate() {
            by_shard.entry(e.shard).or_default().push(i);
        }
        let cmds = by_shard
            .iter()
            .map(|(&shard, idx)| {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(self.keys.attempts(shard));
                for &i in idx {
                    cmd.arg(&entries[i].id);
                }
                (shard, cmd)
            })
            .collect();
        let raw: Vec<Vec<Option<String>>> = self.query_all(cmds).await?;
        let mut out = vec![None; entries.len()];
        for (idx, values) in by_shard.values().zip(raw) {
            for (&i, value) in idx.iter().zip(values) {
                out[i] = value.and_then(|json| serde_json::from_str(&json).ok());
            }
        }
        Ok(out)
    }

    async fn record_attempt(&self, entry: &OutboxEntry, attempts: &Attempts) -> Result<(), StoreError> {
        let json = to_json(attempts)?;
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HSET")
            .arg(self.keys.attempts(entry.shard))
            .arg(&entry.id)
            .arg(json)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn settle(&self, settles: &[Settle<'_>]) -> Result<(), StoreError> {
        // Grouped by shard; on a standalone Redis the groups go in as few
        // settle.lua runs as SETTLE_CHUNK allows, on a cluster one run per group
        // (a script's keys must share a slot there). All runs are sent at once.
        let mut by_shard: BTreeMap<u8, Vec<&Settle<'_>>> = BTreeMap::new();
        for s in settles {
            by_shard.entry(s.entry.shard).or_default().push(s);
        }
        let cluster = matches!(self.conn, Conn::Cluster(_));
        let mut runs: Vec<Vec<(u8, &[&Settle<'_>])>> = Vec::new();
        let mut size = 0;
        for (&shard, group) in &by_shard {
            for chunk in group.chunks(SETTLE_CHUNK) {
                match runs.last_mut() {
                    Some(run) if !cluster && size + chunk.len() <= SETTLE_CHUNK => run.push((shard, chunk)),
                    _ => {
                        runs.push(vec![(shard, chunk)]);
                        size = 0;
                    }
                }
                size += chunk.len();
            }
        }
        let retention = u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = retention_cutoff(chrono::Utc::now().timestamp_millis(), self.retention);
        let invocations =
            runs.iter().map(|run| self.settle_run(run, retention, cutoff)).collect::<Result<Vec<_>, _>>()?;
        let calls = invocations.iter().map(|invocation| {
            let mut conn = self.conn.clone();
            async move { invocation.invoke_async::<i64>(&mut conn).await }
        });
        futures::future::try_join_all(calls).await?;
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
        out.sort_by(|a, b| (a.dead_at_ms, &a.entry.id).cmp(&(b.dead_at_ms, &b.entry.id)));
        Ok(out)
    }

    fn settle_concurrently(&self) -> bool {
        true
    }

    async fn dlq_redrive(&self, event_id: &str) -> Result<bool, StoreError> {
        let Some((subject, _)) = crate::store::plan::parse_event_id(event_id) else { return Ok(false) };
        let shard = instance_shard(subject);
        let mut conn = self.conn.clone();
        let raw: Option<String> =
            redis::cmd("HGET").arg(self.keys.dlq(shard)).arg(event_id).query_async(&mut conn).await?;
        let Some(dead) = raw.and_then(|json| serde_json::from_str::<DeadLetter>(&json).ok()) else { return Ok(false) };
        let e = &dead.entry;
        let record = to_json(&e.record)?;
        let change = serde_json::Value::Object(e.change.clone()).to_string();
        let attempts = to_json(&dead.attempts.redriven())?;
        let moved: i64 = self
            .outbox
            .redrive
            .key(self.keys.dlq(shard))
            .key(self.keys.outbox(shard))
            .key(self.keys.attempts(shard))
            .arg(event_id)
            .arg(attempts)
            .arg(&["id", &e.id, "type", &e.kind, "occurred_at", &e.occurred_at][..])
            .arg(&["test", if e.test { "1" } else { "0" }, "record", &record, "change", &change, "redrive", "1"][..])
            .invoke_async(&mut conn)
            .await?;
        Ok(moved == 1)
    }
}
