//! The call path on Redis ([`CallStore`]): one `EVALSHA` of `apply.lua` per
//! call, `redeem.lua` for a purchase order's one redemption, plain reads and
//! writes of instance and order records.

use std::collections::HashMap;

use async_trait::async_trait;
use redis::{Script, Value};

use super::{bytes, record_of, Conn, RedisStore};
use crate::domain::field;
use crate::store::keys::instance_shard;
use crate::store::{CallStore, Outcome, Plan, Record, Redeem, StoreError};

pub(super) struct Scripts {
    apply: Script,
    redeem: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self { apply: Script::new(include_str!("apply.lua")), redeem: Script::new(include_str!("redeem.lua")) }
    }
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
impl CallStore for RedisStore {
    async fn apply(&self, plan: &Plan) -> Result<Outcome, StoreError> {
        let json = serde_json::to_string(plan).map_err(|e| StoreError::Protocol(e.to_string()))?;
        let shard = plan.shard;
        let mut invocation = self.calls.apply.prepare_invoke();
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
                let others = self.read_instances(elsewhere.iter().map(|id| id.as_str())).await?;
                let (mut here_records, mut other_records) = (records.into_iter(), others.into_iter());
                let merged = plan
                    .read
                    .iter()
                    .map(|id| {
                        if in_script(id) { here_records.next() } else { other_records.next() }.unwrap_or_default()
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

    async fn instance(&self, instance_id: &str) -> Result<Record, StoreError> {
        let mut conn = self.conn.clone();
        let map: HashMap<String, String> =
            redis::cmd("HGETALL").arg(self.keys.instance(instance_id)).query_async(&mut conn).await?;
        Ok(map.into_iter().collect())
    }

    async fn order(&self, order_id: &str) -> Result<Record, StoreError> {
        let mut conn = self.conn.clone();
        let map: HashMap<String, String> =
            redis::cmd("HGETALL").arg(self.keys.order(order_id)).query_async(&mut conn).await?;
        Ok(map.into_iter().collect())
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

    async fn redeem(
        &self,
        order_id: &str,
        customer_id: &str,
        redeemed_by: &str,
        at: &str,
    ) -> Result<Redeem, StoreError> {
        let order = self.order(order_id).await?;
        let mut invocation = self.calls.redeem.prepare_invoke();
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
}
