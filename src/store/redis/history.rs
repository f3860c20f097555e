//! The history of delivered events on Redis ([`History`]), as `settle.lua`
//! writes it: each kept event under its own key (`hist:<event id>`, expiring
//! with the retention), indexed per shard by sorted sets of delivery times:
//! the shard's (`hist:time`) and each order id's (`hist:o:<id>`, in the
//! event's shard). A look-up reads an index newest first (`ZREVRANGEBYSCORE …
//! LIMIT`, one command per shard it spans), merges, then reads the kept events
//! (`GET`, pipelined per shard); an event whose key expired before its index
//! was trimmed is left out.
//!
//! An instance's history needs no index (one fewer sorted set to write per
//! delivered event): its event ids are `evt_<instance>_<seq>` for seq 1 to
//! the record's `seq`, read as they are (`GET`, pipelined) and ordered here.

use async_trait::async_trait;

use super::{every_shard, RedisStore};
use crate::domain::field;
use crate::store::keys::instance_shard;
use crate::store::plan::{event_id, parse_event_id};
use crate::store::{retention_cutoff, Delivered, History, HistoryIndex, HistoryQuery, StoreError};

/// `(delivered at, event id)` newest first, ties by greater event id: the
/// history's order, of several indexes merged. Pure.
pub(super) fn newest_first(mut hits: Vec<(i64, String)>, limit: usize) -> Vec<(i64, String)> {
    hits.sort_by(|a, b| b.cmp(a));
    hits.dedup_by(|a, b| a.1 == b.1);
    hits.truncate(limit);
    hits
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
        found.sort_by(|a, b| (b.delivered_at_ms, &b.entry.id).cmp(&(a.delivered_at_ms, &a.entry.id)));
        found.truncate(limit);
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
        Ok(kept.into_iter().flatten().filter_map(|json| serde_json::from_str(&json).ok()).collect())
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
}
