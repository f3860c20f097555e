//! The history of delivered events on Redis ([`History`]), as `settle.lua`
//! writes it: each kept event under its own key (`hist:<event id>`, expiring
//! with the retention), indexed per shard by sorted sets of delivery times:
//! the shard's (`hist:time`) and an order id's (`hist:o:<id>`, in the event's
//! shard) for an event whose transition names an order other than its
//! purchase order (a renewal's, an upgrade's, …). A look-up reads an index
//! newest first (`ZREVRANGEBYSCORE … LIMIT`, one command per shard it spans),
//! merges, then reads the kept events (`GET`, pipelined per shard); an event
//! whose key expired before its index was trimmed is left out.
//!
//! Two look-ups need no index, which saves sorted-set writes per delivered
//! event:
//! - an instance's events are `evt_<instance>_<seq>` for seq 1 to the
//!   record's `seq`, read as they are (`GET`, pipelined) and ordered here;
//! - a purchase order's events are the events of the instances its order
//!   record names (`line:…` fields), read the same way. (Events delivered by
//!   a version that indexed the purchase order too are found by both ways,
//!   once.)

use async_trait::async_trait;

use super::{every_shard, RedisStore};
use crate::domain::field;
use crate::store::keys::{instance_shard, parse_order_line_field};
use crate::store::plan::{entry_order_ids, event_id, parse_event_id};
use crate::store::{retention_cutoff, CallStore, Delivered, History, HistoryIndex, HistoryQuery, StoreError};

/// `(delivered at, event id)` newest first, ties by greater event id: the
/// history's order, of several indexes merged. Pure.
pub(super) fn newest_first(mut hits: Vec<(i64, String)>, limit: usize) -> Vec<(i64, String)> {
    hits.sort_by(|a, b| b.cmp(a));
    hits.dedup_by(|a, b| a.1 == b.1);
    hits.truncate(limit);
    hits
}

/// Two lists of kept events, each newest first, as one: newest first (ties
/// by greater event id), each event once, at most `limit`. Pure.
fn merge_newest_first(a: Vec<Delivered>, b: Vec<Delivered>, limit: usize) -> Vec<Delivered> {
    let mut all: Vec<Delivered> = a.into_iter().chain(b).collect();
    all.sort_by(|x, y| (y.delivered_at_ms, &y.entry.id).cmp(&(x.delivered_at_ms, &x.entry.id)));
    all.dedup_by(|x, y| x.entry.id == y.entry.id);
    all.truncate(limit);
    all
}

/// Event keys read per pipeline when an instance's history is walked.
const INSTANCE_PAGE: u64 = 256;

impl RedisStore {
    /// One instance's kept events delivered in `[min, max]`, newest first:
    /// every event id the instance has had, by its sequence numbers.
    async fn instance_history(
        &self,
        instance_id: &str,
        (min, max): (i64, Option<i64>),
        limit: usize,
    ) -> Result<Vec<Delivered>, StoreError> {
        let shard = instance_shard(instance_id);
        let mut conn = self.conn.clone();
        let last: Option<u64> =
            redis::cmd("HGET").arg(self.keys.instance(instance_id)).arg(field::SEQ).query_async(&mut conn).await?;
        let mut found = Vec::new();
        let mut next = last.unwrap_or_default();
        while next > 0 {
            let first = next.saturating_sub(INSTANCE_PAGE - 1).max(1);
            let gets = (first..=next)
                .map(|seq| (shard, redis::cmd("GET").arg(self.keys.history(&event_id(instance_id, seq))).clone()))
                .collect();
            let kept: Vec<Option<String>> = self.query_all(gets).await?;
            found.extend(
                kept.into_iter()
                    .flatten()
                    .filter_map(|json| serde_json::from_str::<Delivered>(&json).ok())
                    .filter(|d| d.delivered_at_ms >= min && max.is_none_or(|max| d.delivered_at_ms <= max)),
            );
            next = first - 1;
        }
        Ok(merge_newest_first(found, Vec::new(), limit))
    }

    /// The kept events of the instances a purchase order's record names (its
    /// lines'), delivered in `[min, max]`, newest first; none when `order_id`
    /// is not a purchase order.
    async fn purchase_order_history(
        &self,
        order_id: &str,
        window: (i64, Option<i64>),
        limit: usize,
    ) -> Result<Vec<Delivered>, StoreError> {
        let record = CallStore::order(self, order_id).await?;
        let mut instances: Vec<&String> =
            record.iter().filter(|(f, _)| parse_order_line_field(f).is_some()).map(|(_, instance)| instance).collect();
        instances.sort();
        instances.dedup();
        let mut found = Vec::new();
        for instance in instances {
            let events = self.instance_history(instance, window, limit).await?;
            found = merge_newest_first(found, events, limit);
        }
        // Every event of a line's instance names its purchase order; kept as a
        // check that this way finds what the index would have.
        found.retain(|d| entry_order_ids(&d.entry).contains(&order_id));
        Ok(found)
    }

    fn window(&self, query: &HistoryQuery) -> (i64, Option<i64>) {
        let cutoff = retention_cutoff(chrono::Utc::now().timestamp_millis(), self.retention);
        (query.since_ms.map_or(cutoff, |s| s.max(cutoff)), query.until_ms)
    }
}

#[async_trait]
impl History for RedisStore {
    async fn history_get(&self, event_id: &str) -> Result<Option<Delivered>, StoreError> {
        if self.retention.is_zero() || parse_event_id(event_id).is_none() {
            return Ok(None);
        }
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET").arg(self.keys.history(event_id)).query_async(&mut conn).await?;
        let cutoff = retention_cutoff(chrono::Utc::now().timestamp_millis(), self.retention);
        Ok(raw.and_then(|json| serde_json::from_str::<Delivered>(&json).ok()).filter(|d| d.delivered_at_ms >= cutoff))
    }

    async fn history_list(&self, query: &HistoryQuery) -> Result<Vec<Delivered>, StoreError> {
        if self.retention.is_zero() || query.limit == 0 {
            return Ok(Vec::new());
        }
        let (min, max) = self.window(query);
        if max.is_some_and(|max| max < min) {
            return Ok(Vec::new());
        }
        let top = max.map_or_else(|| "+inf".to_owned(), |m| m.to_string());
        let range = |key: String| {
            let mut cmd = redis::cmd("ZREVRANGEBYSCORE");
            cmd.arg(key).arg(&top).arg(min).arg("WITHSCORES").arg("LIMIT").arg(0).arg(query.limit);
            cmd
        };
        let cmds = match &query.index {
            HistoryIndex::All => every_shard(|shard| range(self.keys.history_by_time(shard))),
            HistoryIndex::Instance(id) => return self.instance_history(id, (min, max), query.limit).await,
            HistoryIndex::Order(order) => every_shard(|shard| range(self.keys.history_by_order(shard, order))),
        };
        let replies: Vec<Vec<(String, f64)>> = self.query_all(cmds).await?;
        #[allow(clippy::cast_possible_truncation)] // scores are UNIX ms, written as integers
        let hits = replies.into_iter().flatten().map(|(id, at)| (at as i64, id)).collect();
        let hits = newest_first(hits, query.limit);
        let gets = hits
            .iter()
            .map(|(_, id)| {
                let shard = parse_event_id(id).map_or(0, |(subject, _)| instance_shard(subject));
                (shard, redis::cmd("GET").arg(self.keys.history(id)).clone())
            })
            .collect();
        let kept: Vec<Option<String>> = self.query_all(gets).await?;
        let indexed = kept.into_iter().flatten().filter_map(|json| serde_json::from_str(&json).ok()).collect();
        match &query.index {
            HistoryIndex::Order(order) => {
                let purchased = self.purchase_order_history(order, (min, max), query.limit).await?;
                Ok(merge_newest_first(indexed, purchased, query.limit))
            }
            _ => Ok(indexed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_indexes_are_newest_first_without_repeats() {
        let hits = vec![
            (5, "evt_a_1".to_owned()),
            (9, "evt_b_1".to_owned()),
            (5, "evt_c_1".to_owned()),
            (9, "evt_b_1".to_owned()),
            (1, "evt_a_0".to_owned()),
        ];
        let ids: Vec<String> = newest_first(hits.clone(), 10).into_iter().map(|(_, id)| id).collect();
        assert_eq!(ids, ["evt_b_1", "evt_c_1", "evt_a_1", "evt_a_0"]);
        assert_eq!(newest_first(hits, 2).len(), 2);
    }

    #[test]
    fn two_lists_of_kept_events_merge_newest_first_each_once() {
        let kept = |id: &str, at: i64| Delivered {
            entry: crate::events::OutboxEntry {
                cursor: "1".into(),
                shard: 0,
                id: id.into(),
                kind: "subscription.created".into(),
                occurred_at: "2026-11-26T00:00:00.000Z".into(),
                test: false,
                record: Default::default(),
                change: Default::default(),
                redrive: false,
            },
            attempts: Default::default(),
            delivered_at_ms: at,
        };
        let a = vec![kept("evt_a_2", 9), kept("evt_a_1", 5)];
        let b = vec![kept("evt_b_1", 7), kept("evt_a_1", 5), kept("evt_c_1", 5)];
        let ids = |v: Vec<Delivered>| v.into_iter().map(|d| d.entry.id).collect::<Vec<_>>();
        assert_eq!(ids(merge_newest_first(a.clone(), b.clone(), 10)), ["evt_a_2", "evt_b_1", "evt_c_1", "evt_a_1"]);
        assert_eq!(ids(merge_newest_first(a, b, 2)), ["evt_a_2", "evt_b_1"]);
    }
}
