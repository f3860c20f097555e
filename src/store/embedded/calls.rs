//! The call path in the embedded store ([`CallStore`]): the rules of the
//! Redis scripts `apply.lua` and `redeem.lua`, step for step, each in one
//! write transaction.

use async_trait::async_trait;
use redb::{ReadableTable, WriteTransaction};

use super::outbox::push_outbox;
use super::{err, get_record, put_record, unexpected, EmbeddedStore, Reply, ANSWERS, INSTANCES, META, NONCES, ORDERS};
use crate::domain::{field, status};
use crate::store::plan::{event_id, ABSENT, ANY};
use crate::store::{CallStore, OutboxEntry, Outcome, Plan, Record, Redeem, StoreError};

/// The same rules as `apply.lua`, step for step.
fn apply_in(txn: &WriteTransaction, plan: &Plan) -> Result<Outcome, StoreError> {
    let nonce_key = plan.nonce.as_ref().map(|n| format!("{}:{n}", plan.shard));
    if let Some(key) = &nonce_key {
        let nonces = txn.open_table(NONCES).map_err(err)?;
        let seen = nonces.get(key.as_str()).map_err(err)?.map(|v| v.value());
        if seen.is_some_and(|expires| expires > plan.now_ms) {
            return Ok(Outcome::Replay);
        }
    }
    let remember_nonce = || -> Result<(), StoreError> {
        if let Some(key) = &nonce_key {
            let ttl_ms = i64::try_from(plan.nonce_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
            let expires = plan.now_ms.saturating_add(ttl_ms);
            txn.open_table(NONCES).map_err(err)?.insert(key.as_str(), expires).map_err(err)?;
        }
        Ok(())
    };
    let dedup_key = plan.dedup.as_ref().map(|d| format!("{}:{d}", plan.shard));
    if let Some(key) = &dedup_key {
        let answers = txn.open_table(ANSWERS).map_err(err)?;
        let mut kept = answers.get(key.as_str()).map_err(err)?.map(|v| v.value().to_owned());
        if let (None, Some(legacy)) = (&kept, &plan.dedup_legacy) {
            // Kept by a version before composite keys were length-prefixed.
            let legacy = format!("{}:{legacy}", plan.shard);
            kept = answers.get(legacy.as_str()).map_err(err)?.map(|v| v.value().to_owned());
        }
        drop(answers);
        if let Some(kept) = kept {
            remember_nonce()?;
            let (code, answer) = kept.split_at(kept.len().min(6));
            return Ok(Outcome::Kept { code: code.to_owned(), answer: answer.to_owned() });
        }
    }
    if !plan.read.is_empty() {
        let records = plan.read.iter().map(|id| get_record(txn, INSTANCES, id)).collect::<Result<Vec<_>, _>>()?;
        remember_nonce()?;
        return Ok(Outcome::Read { records });
    }

    let mut record = get_record(txn, INSTANCES, &plan.subject)?;
    let status = record.get(field::STATUS).cloned().unwrap_or_else(|| ABSENT.to_owned());
    let branch = plan
        .branches
        .get(&status)
        .or_else(|| plan.branches.get(ANY))
        .ok_or_else(|| StoreError::Protocol(format!("plan has no branch for status {status:?}")))?;

    remember_nonce()?;
    let mut record_changed = !branch.set.is_empty();
    record.extend(branch.set.clone());
    if let (Some(order), false) = (&plan.order, branch.order_set.is_empty()) {
        let mut order_record = get_record(txn, ORDERS, order)?;
        order_record.extend(branch.order_set.clone());
        put_record(txn, ORDERS, order, &order_record)?;
    }
    let mut minted = None;
    if let Some(event) = &branch.event {
        let seq = record.get(field::SEQ).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) + 1;
        record.insert(field::SEQ.into(), seq.to_string());
        record_changed = true;
        let id = event_id(&plan.subject, seq);
        let change = match serde_json::from_str(&event.change).map_err(err)? {
            serde_json::Value::Object(map) => map,
            _ => return Err(StoreError::Protocol("event change is not a JSON object".into())),
        };
        let entry = OutboxEntry {
            cursor: String::new(),
            shard: plan.shard,
            id: id.clone(),
            kind: event.kind.clone(),
            occurred_at: event.occurred_at.clone(),
            test: event.test,
            record: record.clone(),
            change,
            redrive: false,
        };
        push_outbox(txn, &entry)?;
        minted = Some(id);
    }
    if record_changed {
        put_record(txn, INSTANCES, &plan.subject, &record)?;
    }
    if let (true, Some(key)) = (branch.keep, &dedup_key) {
        let kept = format!("{}{}", branch.code, branch.answer);
        txn.open_table(ANSWERS).map_err(err)?.insert(key.as_str(), kept.as_str()).map_err(err)?;
    }
    Ok(Outcome::Applied {
        code: branch.code.clone(),
        answer: branch.answer.clone(),
        event_id: minted,
        prior_status: status,
    })
}

/// redeem: the same steps as `redeem.lua`.
fn redeem_in(
    txn: &WriteTransaction,
    order_id: &str,
    customer: &str,
    by: &str,
    at: &str,
) -> Result<(Redeem, bool), StoreError> {
    let mut order = get_record(txn, ORDERS, order_id)?;
    if order.is_empty() || order.get(field::CUSTOMER_ID).map(String::as_str) != Some(customer) {
        return Ok((Redeem::NotFound, false));
    }
    if order.contains_key("redeemed_at") {
        return Ok((Redeem::Already(order), false));
    }
    for (field, instance) in &order {
        if field.starts_with("line:")
            && get_record(txn, INSTANCES, instance)?.get(field::STATUS).map(String::as_str) == Some(status::RELEASED)
        {
            return Ok((Redeem::Released, false));
        }
    }
    order.insert("redeemed_at".into(), at.to_owned());
    order.insert("redeemed_by".into(), by.to_owned());
    put_record(txn, ORDERS, order_id, &order)?;
    Ok((Redeem::Redeemed(order), true))
}

#[async_trait]
impl CallStore for EmbeddedStore {
    async fn apply(&self, plan: &Plan) -> Result<Outcome, StoreError> {
        let plan = plan.clone();
        match self
            .write(move |txn| {
                let outcome = apply_in(txn, &plan)?;
                let wrote = outcome != Outcome::Replay;
                Ok((Reply::Outcome(outcome), wrote))
            })
            .await?
        {
            Reply::Outcome(o) => Ok(o),
            _ => Err(unexpected()),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        txn.open_table(META).map_err(err)?;
        Ok(())
    }

    async fn instance(&self, instance_id: &str) -> Result<Record, StoreError> {
        Ok(self.read_json(INSTANCES, instance_id)?.unwrap_or_default())
    }

    async fn order(&self, order_id: &str) -> Result<Record, StoreError> {
        Ok(self.read_json(ORDERS, order_id)?.unwrap_or_default())
    }

    async fn enrich(
        &self,
        instance_id: &str,
        fields: &Record,
        order_id: Option<&str>,
        order_fields: &Record,
    ) -> Result<(), StoreError> {
        let (instance_id, fields) = (instance_id.to_owned(), fields.clone());
        let (order_id, order_fields) = (order_id.map(str::to_owned), order_fields.clone());
        self.write(move |txn| {
            let mut wrote = false;
            let mut record = get_record(txn, INSTANCES, &instance_id)?;
            if !fields.is_empty() && record.contains_key(field::STATUS) {
                record.extend(fields);
                put_record(txn, INSTANCES, &instance_id, &record)?;
                wrote = true;
            }
            if let Some(order) = order_id.filter(|_| !order_fields.is_empty()) {
                let mut o = get_record(txn, ORDERS, &order)?;
                if !o.is_empty() {
                    o.extend(order_fields);
                    put_record(txn, ORDERS, &order, &o)?;
                    wrote = true;
                }
            }
            Ok((Reply::Done, wrote))
        })
        .await?;
        Ok(())
    }

    async fn redeem(
        &self,
        order_id: &str,
        customer_id: &str,
        redeemed_by: &str,
        at: &str,
    ) -> Result<Redeem, StoreError> {
        let (o, c, b, a) = (order_id.to_owned(), customer_id.to_owned(), redeemed_by.to_owned(), at.to_owned());
        match self.write(move |txn| redeem_in(txn, &o, &c, &b, &a).map(|(r, w)| (Reply::Redeem(r), w))).await? {
            Reply::Redeem(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }
}
