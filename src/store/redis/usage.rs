//! The usage ledger on Redis (see `crate::usage` for the flow).
//!
//! A record lives in its instance's shard (`{sN}:usage:r:<sn>`), beside the
//! instance record, its period index and the shard's pending, unpushed and
//! dead-letter sets, so accepting and settling are one script each per shard
//! and atomic with the instance's status and pushed totals. The metering_sn
//! registry lives in the sn's own shard; accepting is therefore two steps:
//! register the sn (or find it registered), then decide in the instance's
//! shard, and give the claim back for a record that was refused. The registry
//! counts the claims of an sn: it is unregistered only when every request that
//! claimed it was refused, so a refused request never unregisters an sn that a
//! concurrent identical request used for an accepted record. A crash between
//! the steps leaves the sn registered with that record's content: a retry of
//! the record registers as `same` and goes on.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use redis::{Script, Value};

use super::{bytes, every_shard, RedisStore};
use crate::store::keys::{instance_shard, SHARDS};
use crate::store::{StoreError, UsageLedger};
use crate::usage::{Decision, Refusal, StoredUsage, UsageClaim, UsageRecord, UsageSettle, UsageStats};

pub(super) struct Scripts {
    register: Script,
    accept: Script,
    claim: Script,
    settle: Script,
    redrive: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            register: Script::new(include_str!("usage_register.lua")),
            accept: Script::new(include_str!("usage_accept.lua")),
            claim: Script::new(include_str!("usage_claim.lua")),
            // Both share usage_unpushed.lua, put in front: still one script (one EVALSHA) each.
            settle: Script::new(concat!(include_str!("usage_unpushed.lua"), include_str!("usage_settle.lua"))),
            redrive: Script::new(concat!(include_str!("usage_unpushed.lua"), include_str!("usage_redrive.lua"))),
        }
    }
}

fn protocol(what: &str) -> StoreError {
    StoreError::Protocol(format!("usage script answered something unexpected: {what}"))
}

fn strings(values: Vec<Value>) -> Result<Vec<String>, StoreError> {
    values.iter().map(|v| bytes(v).ok_or_else(|| protocol("a non-string"))).collect()
}

fn fields_of(value: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Value::Array(items) = value {
        for pair in items.chunks(2) {
            if let [k, v] = pair {
                if let (Some(k), Some(v)) = (bytes(k), bytes(v)) {
                    out.insert(k, v);
                }
            }
        }
    }
    out
}

impl RedisStore {
    /// Runs the registry script on the sns of `records` (by index), grouped by the sn's shard.
    async fn register(&self, mode: &str, records: &[(usize, &UsageRecord)]) -> Result<Vec<String>, StoreError> {
        let mut groups: BTreeMap<(String, String), Vec<(usize, &UsageRecord)>> = BTreeMap::new();
        for (i, r) in records {
            let keys = (self.keys.usage_sn_registry(&r.metering_sn).1, self.keys.usage_sn_claims(&r.metering_sn));
            groups.entry(keys).or_default().push((*i, r));
        }
        let runs = groups.into_iter().map(|((registry, claims), group)| {
            let mut conn = self.conn.clone();
            let mut inv = self.usage.register.prepare_invoke();
            inv.key(registry).key(claims).arg(mode);
            for (_, r) in &group {
                inv.arg(&r.metering_sn).arg(r.content());
            }
            async move {
                let reply: Vec<Value> = inv.invoke_async(&mut conn).await?;
                Ok::<_, StoreError>(group.into_iter().map(|(i, _)| i).zip(strings(reply)?).collect::<Vec<_>>())
            }
        });
        let mut out: HashMap<usize, String> = HashMap::new();
        for pairs in futures::future::try_join_all(runs).await? {
            out.extend(pairs);
        }
        records.iter().map(|(i, _)| out.remove(i).ok_or_else(|| protocol("a missing registry answer"))).collect()
    }

    /// The shard of the record holding `metering_sn` (from the registry).
    async fn usage_shard_of(&self, metering_sn: &str) -> Result<Option<(u8, String)>, StoreError> {
        let (_, registry) = self.keys.usage_sn_registry(metering_sn);
        let mut conn = self.conn.clone();
        let content: Option<String> = redis::cmd("HGET").arg(registry).arg(metering_sn).query_async(&mut conn).await?;
        Ok(content.and_then(|c| c.split('\t').next().map(str::to_owned)).map(|inst| (instance_shard(&inst), inst)))
    }
}

impl RedisStore {
    /// Links records that name a package (`relate_pkg_instance`) to it, in the package's shard (idempotent).
    async fn link_packages<'a>(&self, records: impl Iterator<Item = &'a UsageRecord>) -> Result<(), StoreError> {
        let cmds: Vec<(u8, redis::Cmd)> = records
            .filter(|r| !r.item.is_empty())
            .map(|r| {
                (
                    instance_shard(&r.item),
                    redis::cmd("SADD").arg(self.keys.package_links(&r.item)).arg(&r.instance_id).clone(),
                )
            })
            .collect();
        let _: Vec<i64> = self.query_all(cmds).await?;
        Ok(())
    }
}

#[async_trait]
impl UsageLedger for RedisStore {
    async fn usage_accept(&self, records: &[UsageRecord], now_ms: i64) -> Result<Vec<Decision>, StoreError> {
        let all: Vec<(usize, &UsageRecord)> = records.iter().enumerate().collect();
        let claims = self.register("claim", &all).await?;
        let mut decisions: Vec<Option<Decision>> = vec![None; records.len()];
        let mut by_shard: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
        for (i, claim) in claims.iter().enumerate() {
            if claim == "conflict" {
                decisions[i] = Some(Decision::Refused(Refusal::SnReused));
            } else {
                by_shard.entry(instance_shard(&records[i].instance_id)).or_default().push(i);
            }
        }
        let record_time = crate::usage::record::record_time(now_ms);
        let runs = by_shard.into_iter().map(|(shard, idx)| {
            let mut conn = self.conn.clone();
            let mut inv = self.usage.accept.prepare_invoke();
            inv.key(self.keys.usage_pending(shard))
                .key(self.keys.usage_unpushed(shard))
                .arg(self.keys.shard_prefix(shard))
                .arg(now_ms);
            for &i in &idx {
                let r = &records[i];
                inv.arg(&r.metering_sn)
                    .arg(&r.instance_id)
                    .arg(&r.item)
                    .arg(r.begin)
                    .arg(r.end)
                    .arg(r.value_e4)
                    .arg(r.content())
                    .arg(&record_time);
            }
            async move {
                let reply: Vec<Value> = inv.invoke_async(&mut conn).await?;
                Ok::<_, StoreError>(idx.into_iter().zip(strings(reply)?).collect::<Vec<_>>())
            }
        });
        for pairs in futures::future::try_join_all(runs).await? {
            for (i, code) in pairs {
                decisions[i] = Some(Decision::from_code(&code).ok_or_else(|| protocol(&code))?);
            }
        }
        let mut decisions: Vec<Decision> = decisions
            .into_iter()
            .map(|d| d.ok_or_else(|| protocol("a record without a decision")))
            .collect::<Result<_, _>>()?;
        let kept =
            records.iter().zip(&decisions).filter(|(_, d)| matches!(d, Decision::Accepted | Decision::Duplicate));
        self.link_packages(kept.map(|(r, _)| r)).await?;
        // A refused record gives its claim back (unless it was the conflict itself, which holds none).
        let release: Vec<(usize, &UsageRecord)> = decisions
            .iter()
            .enumerate()
            .filter(|(i, d)| matches!(d, Decision::Refused(r) if *r != Refusal::SnReused) && claims[*i] != "conflict")
            .map(|(i, _)| (i, &records[i]))
            .collect();
        if !release.is_empty() {
            self.register("release", &release).await?;
        }
        // Records are decided in order: a record whose sn only an earlier,
        // refused record of this same request had registered did not meet a
        // used sn (that record stored nothing). Its claim was given back just
        // now; decide it again (the embedded store's answer, found by the
        // stores' differential test).
        let again: Vec<usize> = (0..records.len())
            .filter(|&i| {
                claims[i] == "conflict"
                    && (0..i).any(|j| {
                        records[j].metering_sn == records[i].metering_sn
                            && claims[j] == "new"
                            && matches!(decisions[j], Decision::Refused(ref r) if *r != Refusal::SnReused)
                    })
            })
            .collect();
        if !again.is_empty() {
            let retried: Vec<UsageRecord> = again.iter().map(|&i| records[i].clone()).collect();
            let redecided = self.usage_accept(&retried, now_ms).await?;
            for (i, d) in again.into_iter().zip(redecided) {
                decisions[i] = d;
            }
        }
        Ok(decisions)
    }

    async fn usage_claim(&self, max: usize, now_ms: i64, lease: Duration) -> Result<Vec<UsageClaim>, StoreError> {
        // One pipelined look at every shard first: idle shards cost no script run.
        let peeks = every_shard(|s| {
            redis::cmd("ZRANGEBYSCORE")
                .arg(self.keys.usage_pending(s))
                .arg("-inf")
                .arg(now_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(1)
                .clone()
        });
        let due: Vec<Vec<String>> = self.query_all(peeks).await?;
        let shards: Vec<u8> = (0..SHARDS).filter(|s| !due[usize::from(*s)].is_empty()).collect();
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let per_shard = max.div_ceil(shards.len()).max(1);
        let until = crate::usage::lease_end(now_ms, lease);
        let runs = shards.into_iter().map(|shard| {
            let mut conn = self.conn.clone();
            let mut inv = self.usage.claim.prepare_invoke();
            inv.key(self.keys.usage_pending(shard))
                .arg(self.keys.shard_prefix(shard))
                .arg(now_ms)
                .arg(until)
                .arg(per_shard);
            async move {
                let reply: Vec<Value> = inv.invoke_async(&mut conn).await?;
                Ok::<_, StoreError>(reply)
            }
        });
        let mut out = Vec::new();
        for reply in futures::future::try_join_all(runs).await?.into_iter().flatten() {
            let Value::Array(pair) = reply else { return Err(protocol("a claim that is not a pair")) };
            let (Some(fields), Some(status)) = (pair.first(), pair.get(1)) else {
                return Err(protocol("a short claim"));
            };
            let stored = StoredUsage::from_fields(&fields_of(fields)).ok_or_else(|| protocol("a malformed record"))?;
            out.push(UsageClaim { stored, instance_status: bytes(status).unwrap_or_default() });
        }
        Ok(out)
    }

    async fn usage_settle(&self, settles: &[(UsageRecord, UsageSettle)], now_ms: i64) -> Result<(), StoreError> {
        let mut by_shard: BTreeMap<u8, Vec<&(UsageRecord, UsageSettle)>> = BTreeMap::new();
        for s in settles {
            by_shard.entry(instance_shard(&s.0.instance_id)).or_default().push(s);
        }
        let runs = by_shard.into_iter().map(|(shard, group)| {
            let mut conn = self.conn.clone();
            let mut inv = self.usage.settle.prepare_invoke();
            inv.key(self.keys.usage_pending(shard))
                .key(self.keys.usage_unpushed(shard))
                .key(self.keys.usage_dlq(shard))
                .arg(self.keys.shard_prefix(shard))
                .arg(now_ms);
            for (record, settle) in group {
                inv.arg(&record.metering_sn);
                match settle {
                    UsageSettle::Pushed => inv.arg("pushed").arg("").arg("").arg(""),
                    UsageSettle::Retry { attempts, at_ms, error } => {
                        inv.arg("retry").arg(attempts).arg(at_ms).arg(error)
                    }
                    UsageSettle::Hold { at_ms } => inv.arg("hold").arg(at_ms).arg("").arg(""),
                    UsageSettle::Dead { code, msg } => inv.arg("dead").arg(code).arg(msg).arg(""),
                };
            }
            async move {
                let _: i64 = inv.invoke_async(&mut conn).await?;
                Ok::<_, StoreError>(())
            }
        });
        futures::future::try_join_all(runs).await?;
        let pushed = settles.iter().filter(|(_, s)| *s == UsageSettle::Pushed).map(|(r, _)| r);
        self.link_packages(pushed).await
    }

    async fn usage_get(&self, metering_sn: &str) -> Result<Option<StoredUsage>, StoreError> {
        let Some((_, instance)) = self.usage_shard_of(metering_sn).await? else { return Ok(None) };
        let mut conn = self.conn.clone();
        let map: BTreeMap<String, String> =
            redis::cmd("HGETALL").arg(self.keys.usage_record(&instance, metering_sn)).query_async(&mut conn).await?;
        Ok(StoredUsage::from_fields(&map))
    }

    async fn usage_dead(&self) -> Result<Vec<StoredUsage>, StoreError> {
        let lists = every_shard(|s| redis::cmd("ZRANGE").arg(self.keys.usage_dlq(s)).arg(0).arg(-1).clone());
        let sns: Vec<Vec<String>> = self.query_all(lists).await?;
        let reads = sns
            .iter()
            .enumerate()
            .flat_map(|(shard, sns)| {
                let prefix = self.keys.shard_prefix(shard as u8);
                sns.iter().map(move |sn| {
                    let mut cmd = redis::cmd("HGETALL");
                    cmd.arg(format!("{prefix}usage:r:{sn}"));
                    (shard as u8, cmd)
                })
            })
            .collect();
        let maps: Vec<BTreeMap<String, String>> = self.query_all(reads).await?;
        let mut out: Vec<StoredUsage> = maps.iter().filter_map(StoredUsage::from_fields).collect();
        out.sort_by_key(|s| (s.dead_ms, s.record.metering_sn.clone()));
        Ok(out)
    }

    async fn usage_of_instance(&self, instance_id: &str, max: usize) -> Result<(Vec<StoredUsage>, u64), StoreError> {
        let index = self.keys.usage_by_instance(instance_id);
        let mut conn = self.conn.clone();
        let (sns, total): (Vec<String>, u64) = redis::pipe()
            .cmd("ZREVRANGE")
            .arg(&index)
            .arg(0)
            .arg(max.saturating_sub(1))
            .cmd("ZCARD")
            .arg(&index)
            .query_async(&mut conn)
            .await?;
        if max == 0 || sns.is_empty() {
            return Ok((Vec::new(), total));
        }
        let mut reads = redis::pipe();
        for sn in &sns {
            reads.cmd("HGETALL").arg(self.keys.usage_record(instance_id, sn));
        }
        let maps: Vec<BTreeMap<String, String>> = reads.query_async(&mut conn).await?;
        Ok((maps.iter().filter_map(StoredUsage::from_fields).collect(), total))
    }

    async fn usage_redrive(&self, metering_sn: &str, now_ms: i64) -> Result<bool, StoreError> {
        let Some((shard, _)) = self.usage_shard_of(metering_sn).await? else { return Ok(false) };
        let mut conn = self.conn.clone();
        let moved: i64 = self
            .usage
            .redrive
            .key(self.keys.usage_pending(shard))
            .key(self.keys.usage_unpushed(shard))
            .key(self.keys.usage_dlq(shard))
            .arg(self.keys.shard_prefix(shard))
            .arg(now_ms)
            .arg(metering_sn)
            .invoke_async(&mut conn)
            .await?;
        Ok(moved == 1)
    }

    async fn usage_package_links(&self, package_id: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let mut ids: Vec<String> =
            redis::cmd("SMEMBERS").arg(self.keys.package_links(package_id)).query_async(&mut conn).await?;
        ids.sort();
        Ok(ids)
    }

    async fn usage_stats(&self) -> Result<UsageStats, StoreError> {
        let mut cmds = Vec::new();
        for s in 0..SHARDS {
            let mut card = redis::cmd("ZCARD");
            card.arg(self.keys.usage_unpushed(s));
            let mut oldest = redis::cmd("ZRANGE");
            oldest.arg(self.keys.usage_unpushed(s)).arg(0).arg(0).arg("WITHSCORES");
            let mut dead = redis::cmd("ZCARD");
            dead.arg(self.keys.usage_dlq(s));
            cmds.extend([(s, card), (s, oldest), (s, dead)]);
        }
        let replies: Vec<Value> = self.query_all(cmds).await?;
        let mut stats = UsageStats::default();
        for chunk in replies.chunks(3) {
            let [card, oldest, dead] = chunk else { return Err(protocol("a short stats reply")) };
            stats.unpushed += redis::from_redis_value::<u64>(card)?;
            stats.dead += redis::from_redis_value::<u64>(dead)?;
            let oldest: Vec<(String, f64)> = redis::from_redis_value(oldest)?;
            if let Some((_, ms)) = oldest.first() {
                let ms = *ms as i64;
                stats.oldest_unpushed_ms = Some(stats.oldest_unpushed_ms.map_or(ms, |o| o.min(ms)));
            }
        }
        Ok(stats)
    }
}
