//! The history of delivered events in the embedded store ([`History`]), the
//! same contents as the Redis backend's `history.rs`: each kept event by id
//! (`history`), and one index table (`history_index`) whose keys sort by
//! delivery time within each index: `t,<ms>,<id>` (every event),
//! `i#<len>:<instance>,<ms>,<id>` and `o#<len>:<order>,<ms>,<id>` (the
//! [`keys::composite`] encoding keeps ids apart whatever they contain; the
//! time is zero-padded so that text order is time order). Written in the
//! settle transaction ([`keep`]); what is past the retention is pruned there,
//! a bounded number per transaction ([`prune`]), and all of it at open.

use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{err, get_json, put_json, EmbeddedStore};
use crate::store::keys::composite;
use crate::store::plan::entry_order_ids;
use crate::store::{retention_cutoff, Delivered, History, HistoryIndex, HistoryQuery, StoreError};

pub(super) const HISTORY: TableDefinition<&str, &str> = TableDefinition::new("history");
pub(super) const HISTORY_INDEX: TableDefinition<&str, &str> = TableDefinition::new("history_index");

/// Events pruned per settle transaction at most: more than a settle batch
/// adds, so pruning keeps up, and a bounded cost for any one transaction.
pub(super) const PRUNE_PER_SETTLE: usize = 1024;

/// The prefix of an index: every event, an instance's, an order id's.
fn prefix(index: &HistoryIndex) -> String {
    match index {
        HistoryIndex::All => "t".to_owned(),
        HistoryIndex::Instance(id) => composite("i", &[id]),
        HistoryIndex::Order(id) => composite("o", &[id]),
    }
}

/// An index key: its prefix, the time zero-padded, the event id. Pure.
fn index_key(prefix: &str, at_ms: i64, event_id: &str) -> String {
    format!("{prefix},{:020},{event_id}", at_ms.max(0))
}

/// Every index key of a kept event.
fn index_keys(d: &Delivered) -> Vec<String> {
    let (instance, _) = d.entry.subject_seq();
    let mut indexes = vec![HistoryIndex::All, HistoryIndex::Instance(instance.to_owned())];
    indexes.extend(entry_order_ids(&d.entry).into_iter().map(|o| HistoryIndex::Order(o.to_owned())));
    indexes.iter().map(|i| index_key(&prefix(i), d.delivered_at_ms, &d.entry.id)).collect()
}

/// Removes a kept event and its index keys.
fn forget(txn: &WriteTransaction, d: &Delivered) -> Result<(), StoreError> {
    let mut index = txn.open_table(HISTORY_INDEX).map_err(err)?;
    for key in index_keys(d) {
        index.remove(key.as_str()).map_err(err)?;
    }
    txn.open_table(HISTORY).map_err(err)?.remove(d.entry.id.as_str()).map_err(err)?;
    Ok(())
}

/// Keeps a delivered event (replacing an earlier copy of it) and prunes up to
/// [`PRUNE_PER_SETTLE`] events past the retention: inside the settle's
/// transaction, as `settle.lua` does on Redis. A zero retention keeps nothing.
pub(super) fn keep(txn: &WriteTransaction, d: &Delivered, retention: Duration) -> Result<(), StoreError> {
    if retention.is_zero() {
        return Ok(());
    }
    if let Some(earlier) = get_json::<Delivered>(txn, HISTORY, &d.entry.id)? {
        forget(txn, &earlier)?;
    }
    put_json(txn, HISTORY, &d.entry.id, d)?;
    let mut index = txn.open_table(HISTORY_INDEX).map_err(err)?;
    for key in index_keys(d) {
        index.insert(key.as_str(), "").map_err(err)?;
    }
    Ok(())
}

/// Removes up to `max` kept events delivered before `cutoff` (UNIX ms),
/// oldest first; says how many.
pub(super) fn prune(txn: &WriteTransaction, cutoff: i64, max: usize) -> Result<usize, StoreError> {
    let old: Vec<String> = {
        let index = txn.open_table(HISTORY_INDEX).map_err(err)?;
        let (from, to) = ("t,".to_owned(), index_key("t", cutoff, ""));
        let mut ids = Vec::new();
        for item in index.range(from.as_str()..to.as_str()).map_err(err)?.take(max) {
            let (key, _) = item.map_err(err)?;
            ids.push(key.value().to_owned());
        }
        ids
    };
    for key in &old {
        let id = key.splitn(3, ',').nth(2).unwrap_or_default();
        match get_json::<Delivered>(txn, HISTORY, id)? {
            Some(d) => forget(txn, &d)?,
            None => {
                txn.open_table(HISTORY_INDEX).map_err(err)?.remove(key.as_str()).map_err(err)?;
            }
        }
    }
    Ok(old.len())
}

/// Prunes everything past the retention (at open).
pub(super) fn prune_all(txn: &WriteTransaction, retention: Duration) -> Result<usize, StoreError> {
    let cutoff = retention_cutoff(chrono::Utc::now().timestamp_millis(), retention);
    let mut total = 0;
    loop {
        let n = prune(txn, cutoff, PRUNE_PER_SETTLE)?;
        total += n;
        if n < PRUNE_PER_SETTLE {
            return Ok(total);
        }
    }
}

#[async_trait]
impl History for EmbeddedStore {
    async fn history_get(&self, event_id: &str) -> Result<Option<Delivered>, StoreError> {
        if self.retention.is_zero() {
            return Ok(None);
        }
        let cutoff = retention_cutoff(chrono::Utc::now().timestamp_millis(), self.retention);
        Ok(self.read_json::<Delivered>(HISTORY, event_id)?.filter(|d| d.delivered_at_ms >= cutoff))
    }

    async fn history_list(&self, query: &HistoryQuery) -> Result<Vec<Delivered>, StoreError> {
        if self.retention.is_zero() || query.limit == 0 {
            return Ok(Vec::new());
        }
        let cutoff = retention_cutoff(chrono::Utc::now().timestamp_millis(), self.retention);
        let min = query.since_ms.map_or(cutoff, |s| s.max(cutoff));
        if query.until_ms.is_some_and(|max| max < min) {
            return Ok(Vec::new());
        }
        let prefix = prefix(&query.index);
        let from = index_key(&prefix, min, "");
        // `-` sorts right after `,`: past every event id of the last millisecond.
        let to = match query.until_ms {
            Some(max) => format!("{prefix},{:020}-", max.max(0)),
            None => format!("{prefix}-"),
        };
        let txn = self.db.begin_read().map_err(err)?;
        let index = txn.open_table(HISTORY_INDEX).map_err(err)?;
        let kept = txn.open_table(HISTORY).map_err(err)?;
        let mut out = Vec::new();
        for item in index.range(from.as_str()..to.as_str()).map_err(err)?.rev() {
            if out.len() >= query.limit {
                break;
            }
            let (key, _) = item.map_err(err)?;
            let key = key.value();
            let id = key[prefix.len() + 1..].split_once(',').map_or("", |(_, id)| id);
            if let Some(raw) = kept.get(id).map_err(err)? {
                out.push(serde_json::from_str::<Delivered>(raw.value()).map_err(err)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_sort_by_time_within_their_index() {
        let a = index_key(&prefix(&HistoryIndex::Instance("x".into())), 9, "evt_x_1");
        let b = index_key(&prefix(&HistoryIndex::Instance("x".into())), 10, "evt_x_2");
        assert!(a < b, "{a} < {b}");
        assert_eq!(a, "i#1:x,00000000000000000009,evt_x_1");
        // An instance id that looks like another's prefix stays in its own index.
        let c = index_key(&prefix(&HistoryIndex::Instance("x,1".into())), 1, "evt_x,1_1");
        assert!(!c.starts_with("i#1:x,"), "{c}");
        assert!(index_key("t", 5, "evt_a_1").as_str() < "t-");
    }
}
