//! The usage ledger in the embedded store: the same steps as the Redis
//! scripts (`usage_*.lua`), on the same flat record fields, in one write
//! transaction each. The `USAGE` table keyed by metering_sn is also the
//! registry that keeps an sn unique across instances.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::{err, get_record, put_record, EmbeddedStore, Reply, INSTANCES};
use crate::domain::field::{self, USAGE_E4, USAGE_END, USAGE_UNPUSHED_E4};
use crate::domain::item_usage_fields;
use crate::store::{StoreError, UsageLedger};
use crate::usage::{decide, period_index, Decision, StoredUsage, UsageClaim, UsageRecord, UsageSettle, UsageStats};

type Fields = BTreeMap<String, String>;

/// metering_sn → the record's fields (JSON), plus `due_ms` while pending.
pub(super) const USAGE: TableDefinition<&str, &str> = TableDefinition::new("usage");
/// `<period index>\t<begin:020>` → `<end>:<sn>`.
pub(super) const USAGE_PERIODS: TableDefinition<&str, &str> = TableDefinition::new("usage_periods");
/// `<due ms:020>\t<sn>` of pending records.
pub(super) const USAGE_PENDING: TableDefinition<&str, &str> = TableDefinition::new("usage_pending");
/// `<accepted ms:020>\t<sn>` of records not yet pushed (nor dead).
pub(super) const USAGE_UNPUSHED: TableDefinition<&str, &str> = TableDefinition::new("usage_unpushed");
/// `<dead ms:020>\t<sn>` of dead records.
pub(super) const USAGE_DLQ: TableDefinition<&str, &str> = TableDefinition::new("usage_dlq");

/// `<len>:<instance id>\t<accepted at, 20 digits>\t<metering_sn>` → "": the usage records of an instance.
pub(super) const USAGE_BY_INSTANCE: TableDefinition<&str, &str> = TableDefinition::new("usage_by_instance");

/// The key range of one instance's usage records: `[start, end)`.
fn instance_range(instance_id: &str) -> (String, String) {
    let base = format!("{}:{instance_id}", instance_id.len());
    (format!("{base}\t"), format!("{base}\n"))
}

/// `<len>:<package id>\t<instance id>` → "": the instances whose usage named a package.
pub(super) const PACKAGE_LINKS: TableDefinition<&str, &str> = TableDefinition::new("package_links");

/// The key range of one package's links: `[start, end)`.
fn package_range(package_id: &str) -> (String, String) {
    let base = format!("{}:{package_id}", package_id.len());
    (format!("{base}\t"), format!("{base}\n"))
}

/// Links a record that names a package (`relate_pkg_instance`) to it (idempotent).
fn link_package(txn: &WriteTransaction, record: &UsageRecord) -> Result<(), StoreError> {
    if record.item.is_empty() {
        return Ok(());
    }
    let key = format!("{}{}", package_range(&record.item).0, record.instance_id);
    insert(txn, PACKAGE_LINKS, &key)
}

fn at(ms: i64, sn: &str) -> String {
    format!("{:020}\t{sn}", ms.max(0))
}

fn get_fields(txn: &WriteTransaction, sn: &str) -> Result<Option<Fields>, StoreError> {
    let t = txn.open_table(USAGE).map_err(err)?;
    let raw = t.get(sn).map_err(err)?;
    raw.map(|v| serde_json::from_str(v.value()).map_err(err)).transpose()
}

fn put_fields(txn: &WriteTransaction, sn: &str, fields: &Fields) -> Result<(), StoreError> {
    let json = serde_json::to_string(fields).map_err(err)?;
    txn.open_table(USAGE).map_err(err)?.insert(sn, json.as_str()).map_err(err)?;
    Ok(())
}

fn num(fields: &Fields, name: &str) -> i64 {
    fields.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn insert(txn: &WriteTransaction, table: TableDefinition<&str, &str>, key: &str) -> Result<(), StoreError> {
    txn.open_table(table).map_err(err)?.insert(key, "").map_err(err)?;
    Ok(())
}

fn remove(txn: &WriteTransaction, table: TableDefinition<&str, &str>, key: &str) -> Result<(), StoreError> {
    txn.open_table(table).map_err(err)?.remove(key).map_err(err)?;
    Ok(())
}

/// Moves a pending record's due time.
fn set_due(txn: &WriteTransaction, sn: &str, fields: &mut Fields, due_ms: i64) -> Result<(), StoreError> {
    remove(txn, USAGE_PENDING, &at(num(fields, "due_ms"), sn))?;
    insert(txn, USAGE_PENDING, &at(due_ms, sn))?;
    fields.insert("due_ms".into(), due_ms.to_string());
    Ok(())
}

/// usage_accept.lua
fn accept_in(
    txn: &WriteTransaction,
    records: &[UsageRecord],
    now_ms: i64,
) -> Result<(Vec<Decision>, bool), StoreError> {
    let mut out = Vec::with_capacity(records.len());
    let mut wrote = false;
    for r in records {
        let known = get_fields(txn, &r.metering_sn)?.and_then(|f| f.get("content").cloned());
        let instance = get_record(txn, INSTANCES, &r.instance_id)?;
        let status = instance.get(field::STATUS).cloned().unwrap_or_default();
        let test = instance.get("test").is_some_and(|t| t == "1");
        let index = period_index(&r.instance_id, &r.item);
        let prev = {
            let periods = txn.open_table(USAGE_PERIODS).map_err(err)?;
            let upper = format!("{index}\t{:020}", r.end);
            let last = periods.range(index.as_str()..upper.as_str()).map_err(err)?.next_back();
            match last {
                Some(item) => {
                    let (_, v) = item.map_err(err)?;
                    v.value().split_once(':').and_then(|(end, sn)| Some((end.parse::<i64>().ok()?, sn.to_owned())))
                }
                None => None,
            }
        };
        let decision = decide(r, known.as_deref(), &status, test, prev.as_ref().map(|(e, sn)| (*e, sn.as_str())));
        if matches!(decision, Decision::Accepted | Decision::Duplicate) {
            link_package(txn, r)?;
        }
        if decision == Decision::Accepted {
            let mut fields = StoredUsage::accepted(r.clone(), now_ms).to_fields();
            fields.insert("due_ms".into(), now_ms.to_string());
            put_fields(txn, &r.metering_sn, &fields)?;
            let key = format!("{index}\t{:020}", r.begin);
            let value = format!("{}:{}", r.end, r.metering_sn);
            txn.open_table(USAGE_PERIODS).map_err(err)?.insert(key.as_str(), value.as_str()).map_err(err)?;
            insert(txn, USAGE_PENDING, &at(now_ms, &r.metering_sn))?;
            insert(txn, USAGE_UNPUSHED, &at(now_ms, &r.metering_sn))?;
            let by_instance = format!("{}{}", instance_range(&r.instance_id).0, at(now_ms, &r.metering_sn));
            insert(txn, USAGE_BY_INSTANCE, &by_instance)?;
            count_unpushed(txn, &fields, 1)?;
            wrote = true;
        }
        out.push(decision);
    }
    Ok((out, wrote))
}

/// usage_claim.lua
fn claim_in(
    txn: &WriteTransaction,
    max: usize,
    now_ms: i64,
    until: i64,
) -> Result<(Vec<UsageClaim>, bool), StoreError> {
    let due: Vec<String> = {
        let pending = txn.open_table(USAGE_PENDING).map_err(err)?;
        let upper = at(now_ms, "\u{10ffff}");
        let mut keys = Vec::new();
        for item in pending.range(..upper.as_str()).map_err(err)?.take(max) {
            keys.push(item.map_err(err)?.0.value().to_owned());
        }
        keys
    };
    let mut out = Vec::with_capacity(due.len());
    for key in &due {
        let Some((_, sn)) = key.split_once('\t') else { continue };
        let Some(mut fields) = get_fields(txn, sn)? else {
            remove(txn, USAGE_PENDING, key)?;
            continue;
        };
        set_due(txn, sn, &mut fields, until)?;
        put_fields(txn, sn, &fields)?;
        let instance = fields.get("instance").cloned().unwrap_or_default();
        let instance_status = get_record(txn, INSTANCES, &instance)?.get(field::STATUS).cloned().unwrap_or_default();
        let stored = StoredUsage::from_fields(&fields).ok_or_else(|| err(format!("usage record {sn} is malformed")))?;
        out.push(UsageClaim { stored, instance_status });
    }
    let wrote = !due.is_empty();
    Ok((out, wrote))
}

/// usage_settle.lua
fn settle_in(txn: &WriteTransaction, settles: &[(UsageRecord, UsageSettle)], now_ms: i64) -> Result<(), StoreError> {
    for (record, settle) in settles {
        let sn = record.metering_sn.as_str();
        let Some(mut f) = get_fields(txn, sn)? else { continue };
        if f.get("state").map(String::as_str) != Some("pending") {
            continue;
        }
        let mut set = |k: &str, v: String| {
            f.insert(k.to_owned(), v);
        };
        match settle {
            UsageSettle::Pushed => {
                link_package(txn, record)?;
                set("state", "pushed".into());
                set("pushed_ms", now_ms.to_string());
                set("held", String::new());
                leave_pending(txn, sn, &f)?;
                let instance = f.get("instance").cloned().unwrap_or_default();
                let mut inst = get_record(txn, INSTANCES, &instance)?;
                if !inst.is_empty() {
                    let total = num(&inst, USAGE_E4) + num(&f, "value_e4");
                    inst.insert(USAGE_E4.into(), total.to_string());
                    let end = num(&f, "end");
                    if inst.get(USAGE_END).and_then(|v| v.parse::<i64>().ok()).is_none_or(|cur| end > cur) {
                        inst.insert(USAGE_END.into(), end.to_string());
                    }
                    // Per metering item (relate_pkg_instance), as usage_settle.lua.
                    if let Some(item) = f.get("item").filter(|i| !i.is_empty()) {
                        let (e4_field, end_field) = item_usage_fields(item);
                        let item_total = num(&inst, &e4_field) + num(&f, "value_e4");
                        inst.insert(e4_field, item_total.to_string());
                        if inst.get(&end_field).and_then(|v| v.parse::<i64>().ok()).is_none_or(|cur| end > cur) {
                            inst.insert(end_field, end.to_string());
                        }
                    }
                    put_record(txn, INSTANCES, &instance, &inst)?;
                }
            }
            UsageSettle::Retry { attempts, at_ms, error } => {
                set("attempts", attempts.to_string());
                set("error", error.clone());
                set("held", String::new());
                set_due(txn, sn, &mut f, *at_ms)?;
            }
            UsageSettle::Hold { at_ms } => {
                set("held", "1".into());
                set_due(txn, sn, &mut f, *at_ms)?;
            }
            UsageSettle::Dead { code, msg } => {
                set("state", "dead".into());
                set("code", code.clone());
                set("msg", msg.clone());
                set("dead_ms", now_ms.to_string());
                set("held", String::new());
                leave_pending(txn, sn, &f)?;
                insert(txn, USAGE_DLQ, &at(now_ms, sn))?;
            }
        }
        put_fields(txn, sn, &f)?;
    }
    Ok(())
}

/// Takes a record out of the pending and unpushed sets, and its value out of
/// its instance's unpushed usage.
fn leave_pending(txn: &WriteTransaction, sn: &str, f: &Fields) -> Result<(), StoreError> {
    remove(txn, USAGE_PENDING, &at(num(f, "due_ms"), sn))?;
    remove(txn, USAGE_UNPUSHED, &at(num(f, "accepted_ms"), sn))?;
    count_unpushed(txn, f, -1)
}

/// Adds a record's value (`sign` 1) to its instance's unpushed usage, in all
/// and per metering item, or takes it off (`sign` -1), as the usage scripts do.
fn count_unpushed(txn: &WriteTransaction, f: &Fields, sign: i64) -> Result<(), StoreError> {
    let instance = f.get("instance").cloned().unwrap_or_default();
    let mut inst = get_record(txn, INSTANCES, &instance)?;
    if inst.is_empty() {
        return Ok(());
    }
    let delta = sign * num(f, "value_e4");
    let mut fields = vec![USAGE_UNPUSHED_E4.to_owned()];
    if let Some(item) = f.get("item").filter(|i| !i.is_empty()) {
        fields.push(format!("{USAGE_UNPUSHED_E4}:{item}"));
    }
    for field in fields {
        let total = num(&inst, &field) + delta;
        inst.insert(field, total.to_string());
    }
    put_record(txn, INSTANCES, &instance, &inst)
}

/// usage_redrive.lua
fn redrive_in(txn: &WriteTransaction, sn: &str, now_ms: i64) -> Result<bool, StoreError> {
    let Some(mut f) = get_fields(txn, sn)? else { return Ok(false) };
    if f.get("state").map(String::as_str) != Some("dead") {
        return Ok(false);
    }
    remove(txn, USAGE_DLQ, &at(num(&f, "dead_ms"), sn))?;
    for (k, v) in [("state", "pending"), ("attempts", "0"), ("code", ""), ("msg", ""), ("error", ""), ("dead_ms", "")] {
        f.insert(k.into(), v.into());
    }
    f.insert("due_ms".into(), now_ms.to_string());
    insert(txn, USAGE_PENDING, &at(now_ms, sn))?;
    insert(txn, USAGE_UNPUSHED, &at(num(&f, "accepted_ms"), sn))?;
    count_unpushed(txn, &f, 1)?;
    put_fields(txn, sn, &f)?;
    Ok(true)
}

#[async_trait]
impl UsageLedger for EmbeddedStore {
    async fn usage_accept(&self, records: &[UsageRecord], now_ms: i64) -> Result<Vec<Decision>, StoreError> {
        let records = records.to_vec();
        match self.write(move |txn| accept_in(txn, &records, now_ms).map(|(d, w)| (Reply::Decisions(d), w))).await? {
            Reply::Decisions(d) => Ok(d),
            _ => Err(err("unexpected reply")),
        }
    }

    async fn usage_claim(&self, max: usize, now_ms: i64, lease: Duration) -> Result<Vec<UsageClaim>, StoreError> {
        let until = crate::usage::lease_end(now_ms, lease);
        match self.write(move |txn| claim_in(txn, max, now_ms, until).map(|(c, w)| (Reply::Claims(c), w))).await? {
            Reply::Claims(c) => Ok(c),
            _ => Err(err("unexpected reply")),
        }
    }

    async fn usage_settle(&self, settles: &[(UsageRecord, UsageSettle)], now_ms: i64) -> Result<(), StoreError> {
        let settles = settles.to_vec();
        self.write(move |txn| settle_in(txn, &settles, now_ms).map(|()| (Reply::Done, true))).await?;
        Ok(())
    }

    async fn usage_get(&self, sn: &str) -> Result<Option<StoredUsage>, StoreError> {
        let fields: Option<Fields> = self.read_json(USAGE, sn)?;
        Ok(fields.as_ref().and_then(StoredUsage::from_fields))
    }

    async fn usage_dead(&self) -> Result<Vec<StoredUsage>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let dlq = txn.open_table(USAGE_DLQ).map_err(err)?;
        let usage = txn.open_table(USAGE).map_err(err)?;
        let mut out = Vec::new();
        for item in dlq.iter().map_err(err)? {
            let (key, _) = item.map_err(err)?;
            let Some((_, sn)) = key.value().split_once('\t') else { continue };
            if let Some(raw) = usage.get(sn).map_err(err)? {
                let fields: Fields = serde_json::from_str(raw.value()).map_err(err)?;
                out.extend(StoredUsage::from_fields(&fields));
            }
        }
        Ok(out)
    }

    async fn usage_of_instance(&self, instance_id: &str, max: usize) -> Result<(Vec<StoredUsage>, u64), StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let index = txn.open_table(USAGE_BY_INSTANCE).map_err(err)?;
        let usage = txn.open_table(USAGE).map_err(err)?;
        let (start, end) = instance_range(instance_id);
        let mut out = Vec::new();
        let mut total = 0;
        for row in index.range(start.as_str()..end.as_str()).map_err(err)?.rev() {
            let (key, _) = row.map_err(err)?;
            total += 1;
            if out.len() >= max {
                continue;
            }
            let Some((_, sn)) = key.value().rsplit_once('\t') else { continue };
            if let Some(raw) = usage.get(sn).map_err(err)? {
                let fields: Fields = serde_json::from_str(raw.value()).map_err(err)?;
                out.extend(StoredUsage::from_fields(&fields));
            }
        }
        Ok((out, total))
    }

    async fn usage_redrive(&self, sn: &str, now_ms: i64) -> Result<bool, StoreError> {
        let sn = sn.to_owned();
        match self.write(move |txn| redrive_in(txn, &sn, now_ms).map(|m| (Reply::Moved(m), m))).await? {
            Reply::Moved(m) => Ok(m),
            _ => Err(err("unexpected reply")),
        }
    }

    async fn usage_package_links(&self, package_id: &str) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(PACKAGE_LINKS).map_err(err)?;
        let (start, end) = package_range(package_id);
        let mut ids = Vec::new();
        for row in table.range(start.as_str()..end.as_str()).map_err(err)? {
            let (key, _) = row.map_err(err)?;
            ids.push(key.value().split_once('\t').map(|(_, id)| id.to_owned()).unwrap_or_default());
        }
        Ok(ids)
    }

    async fn usage_stats(&self) -> Result<UsageStats, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let unpushed = txn.open_table(USAGE_UNPUSHED).map_err(err)?;
        let oldest = match unpushed.first().map_err(err)? {
            Some((key, _)) => key.value().split_once('\t').and_then(|(ms, _)| ms.parse().ok()),
            None => None,
        };
        let dead = txn.open_table(USAGE_DLQ).map_err(err)?.len().map_err(err)?;
        Ok(UsageStats { unpushed: unpushed.len().map_err(err)?, oldest_unpushed_ms: oldest, dead })
    }
}
