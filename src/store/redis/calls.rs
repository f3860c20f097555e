//! The call path on Redis ([`CallStore`]): one `EVALSHA` of `apply.lua` per
//! call, `redeem.lua` for a purchase order's one redemption, plain reads and
//! writes of instance and order records.

use std::collections::HashMap;

use async_trait::async_trait;
use redis::{Cmd, Script, Value};

use super::{bytes, record_of, Conn, RedisStore};
use crate::domain::field;
use crate::store::keys::instance_shard;
use crate::store::plan::event_id;
use crate::store::{Branch, CallStore, Outcome, Plan, Record, Redeem, StoreError};

/// The call path's script; sent as `EVALSHA` by [`CallStore::apply`].
const APPLY: &str = include_str!("apply.lua");

pub(super) struct Scripts {
    apply: Script,
    redeem: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self { apply: Script::new(APPLY), redeem: Script::new(include_str!("redeem.lua")) }
    }
}

/// Writes the plan as `apply.lua`'s flat arguments (the layout is described
/// at the top of the script) straight into the command: no JSON for the
/// script to decode, each branch's field lists in the order `HSET` takes
/// them, and no intermediate copy of the plan's strings.
fn write_plan_args(cmd: &mut Cmd, plan: &Plan) {
    cmd.arg(plan.nonce.as_deref().unwrap_or_default()).arg(plan.nonce_ttl_secs);
    let dedup = match (&plan.dedup, &plan.dedup_legacy) {
        (None, _) => "0",
        (Some(_), None) => "1",
        (Some(_), Some(_)) => "2",
    };
    cmd.arg(dedup).arg(if plan.read.is_empty() { "0" } else { "1" });
    cmd.arg(&plan.subject).arg(plan.branches.len());
    for (status, branch) in &plan.branches {
        cmd.arg(status);
        // The kept answer: its code then its body, as one argument.
        let code_len = if branch.keep { branch.code.len() } else { 0 };
        let mut kept = Vec::with_capacity(if branch.keep { code_len + branch.answer.len() } else { 0 });
        if branch.keep {
            kept.extend_from_slice(branch.code.as_bytes());
            kept.extend_from_slice(branch.answer.as_bytes());
        }
        cmd.arg(kept);
        let extra = usize::from(branch.event.is_some());
        cmd.arg(branch.set.len() + extra);
        for (k, v) in &branch.set {
            cmd.arg(k).arg(v);
        }
        if extra == 1 {
            // Filled in by the script with the new sequence number.
            cmd.arg(field::SEQ).arg("");
        }
        cmd.arg(branch.order_set.len());
        for (k, v) in &branch.order_set {
            cmd.arg(k).arg(v);
        }
        match &branch.event {
            None => {
                cmd.arg("0");
            }
            Some(event) => {
                cmd.arg("1").arg(&event.kind).arg(&event.occurred_at).arg(if event.test { "1" } else { "0" });
                cmd.arg(&event.change).arg(new_record_snapshot(status, branch));
            }
        }
    }
}

/// The event's record snapshot when this branch creates the record (the
/// branch of no status, applied where no record exists): its fields as
/// `HGETALL` would list them after the script's `HSET`, sequence 1 included,
/// as the JSON array the outbox keeps; the script stores it as it is, where
/// it would otherwise read the record back and encode it. Empty for other
/// branches (the script then reads the record, as it does when one exists).
fn new_record_snapshot(status: &str, branch: &Branch) -> Vec<u8> {
    if !status.is_empty() {
        return Vec::new();
    }
    let mut flat: Vec<&str> = Vec::with_capacity(branch.set.len() * 2 + 2);
    for (k, v) in &branch.set {
        flat.push(k);
        flat.push(v);
    }
    flat.extend([field::SEQ, "1"]);
    serde_json::to_vec(&flat).unwrap_or_default()
}

/// Turns the script's reply into an [`Outcome`]; an applied branch's answer
/// comes from the plan (the script names the branch by its number).
fn outcome_of(plan: &Plan, reply: Vec<Value>) -> Result<Outcome, StoreError> {
    let bad = || StoreError::Protocol(format!("unexpected script reply {reply:?}"));
    let tag = reply.first().and_then(bytes).ok_or_else(bad)?;
    let text = |i: usize| reply.get(i).and_then(bytes).ok_or_else(bad);
    let int = |i: usize| reply.get(i).and_then(|v| redis::from_redis_value::<u64>(v).ok()).ok_or_else(bad);
    Ok(match tag.as_str() {
        "replay" => Outcome::Replay,
        "kept" => {
            let kept = text(1)?;
            let cut = if kept.is_char_boundary(6) { 6 } else { kept.len() };
            let (code, answer) = kept.split_at(cut.min(kept.len()));
            Outcome::Kept { code: code.to_owned(), answer: answer.to_owned() }
        }
        "read" => Outcome::Read { records: reply[1..].iter().map(record_of).collect() },
        "applied" => {
            let number = usize::try_from(int(1)?).map_err(|_| bad())?;
            let branch = number.checked_sub(1).and_then(|i| plan.branches.values().nth(i)).ok_or_else(bad)?;
            let seq = int(2)?;
            Outcome::Applied {
                code: branch.code.clone(),
                answer: branch.answer.clone(),
                event_id: (seq > 0).then(|| event_id(&plan.subject, seq)),
                prior_status: text(3)?,
            }
        }
        _ => return Err(bad()),
    })
}

#[async_trait]
impl CallStore for RedisStore {
    async fn apply(&self, plan: &Plan) -> Result<Outcome, StoreError> {
        let shard = plan.shard;
        // On a cluster the script cannot read records of other shards: those
        // are read beside it (a query naming instances of several shards).
        let cluster = matches!(self.conn, Conn::Cluster(_));
        let in_script = |id: &str| !cluster || instance_shard(id) == shard;
        let (here, elsewhere): (Vec<&String>, Vec<&String>) = plan.read.iter().partition(|id| in_script(id));
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.calls.apply.get_hash()).arg(6 + here.len());
        cmd.arg(self.keys.nonce(shard, plan.nonce.as_deref().unwrap_or("-")))
            .arg(self.keys.answer(shard, plan.dedup.as_deref().unwrap_or("-")))
            .arg(self.keys.instance(&plan.subject))
            // Unused key slots repeat the nonce key: same shard, never written.
            .arg(match &plan.order {
                Some(order) => self.keys.order(order),
                None => self.keys.nonce(shard, "-"),
            })
            .arg(self.keys.outbox(shard))
            .arg(match &plan.dedup_legacy {
                Some(legacy) => self.keys.answer(shard, legacy),
                None => self.keys.nonce(shard, "-"),
            });
        for id in &here {
            cmd.arg(self.keys.instance(id));
        }
        write_plan_args(&mut cmd, plan);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = match cmd.query_async(&mut conn).await {
            // A Redis that lost its scripts (restarted, SCRIPT FLUSH) learns it again, once.
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                let _: String = redis::cmd("SCRIPT").arg("LOAD").arg(APPLY).query_async(&mut conn).await?;
                cmd.query_async(&mut conn).await?
            }
            other => other?,
        };
        match outcome_of(plan, reply)? {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_branch_that_creates_the_record_carries_its_snapshot() {
        let mut branch = Branch {
            code: "000000".into(),
            answer: "{}".into(),
            keep: true,
            set: Record::new(),
            order_set: Record::new(),
            event: None,
        };
        branch.set.insert(field::STATUS.into(), "active".into());
        branch.set.insert(field::ORDER_ID.into(), "CS1".into());
        let snapshot: Vec<String> = serde_json::from_slice(&new_record_snapshot("", &branch)).unwrap();
        // The record as HGETALL lists it after the script's HSET: every field once, seq 1.
        let mut pairs: Vec<(String, String)> = snapshot.chunks(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect();
        pairs.sort();
        assert_eq!(
            pairs,
            [("order_id".into(), "CS1".into()), ("seq".into(), "1".into()), ("status".into(), "active".into())]
        );
        assert!(new_record_snapshot("active", &branch).is_empty());
        assert!(new_record_snapshot("*", &branch).is_empty());
    }
}
