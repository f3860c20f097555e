//! The outbox in the embedded store ([`Outbox`]): a table keyed by sequence
//! number, attempts and dead letters by event id; which entries are handed
//! out lives in memory (one gateway process per file). Settling and
//! redriving take the same steps as the Redis scripts `settle.lua` and
//! `redrive.lua` (settling keeps a delivered event in the history,
//! `history.rs`, in the same transaction).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::{
    err, get_json, get_record, history, put_json, put_record, unexpected, EmbeddedStore, Reply, INSTANCES, META,
};
use crate::store::{
    retention_cutoff, Attempts, DeadLetter, Delivered, Outbox, OutboxEntry, Record, Settle, StoreError,
};

pub(super) const OUTBOX: TableDefinition<u64, &str> = TableDefinition::new("outbox");
pub(super) const ATTEMPTS: TableDefinition<&str, &str> = TableDefinition::new("attempts");
pub(super) const DLQ: TableDefinition<&str, &str> = TableDefinition::new("dlq");

/// Which outbox entries are handed out and not yet acknowledged.
#[derive(Default)]
pub(super) struct Claims {
    /// First sequence number never handed out.
    next: u64,
    /// Handed out, with when.
    inflight: BTreeMap<u64, Instant>,
}

/// Appends an entry to the outbox.
pub(super) fn push_outbox(txn: &WriteTransaction, entry: &OutboxEntry) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META).map_err(err)?;
    let next = meta.get("outbox_next").map_err(err)?.map(|v| v.value()).unwrap_or(1);
    meta.insert("outbox_next", next + 1).map_err(err)?;
    let json = serde_json::to_string(entry).map_err(err)?;
    txn.open_table(OUTBOX).map_err(err)?.insert(next, json.as_str()).map_err(err)?;
    Ok(())
}

/// Removes outbox entries by sequence.
fn remove_outbox(txn: &WriteTransaction, seqs: &[u64]) -> Result<(), StoreError> {
    let mut table = txn.open_table(OUTBOX).map_err(err)?;
    for seq in seqs {
        table.remove(*seq).map_err(err)?;
    }
    Ok(())
}

/// settle: the same steps as `settle.lua`.
fn settle_in(
    txn: &WriteTransaction,
    entry: &OutboxEntry,
    dead: Option<&DeadLetter>,
    delivered: Option<&Delivered>,
    retention: Duration,
) -> Result<(), StoreError> {
    let (subject, seq) = entry.subject_seq();
    let mut record = get_record(txn, INSTANCES, subject)?;
    let done = record.get("delivered_seq").and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    if seq > done {
        record.insert("delivered_seq".into(), seq.to_string());
        put_record(txn, INSTANCES, subject, &record)?;
    }
    if let Some(dead) = dead {
        put_json(txn, DLQ, &entry.id, dead)?;
    }
    if let Some(delivered) = delivered {
        history::keep(txn, delivered, retention)?;
    }
    txn.open_table(ATTEMPTS).map_err(err)?.remove(entry.id.as_str()).map_err(err)?;
    if let Ok(cursor) = entry.cursor.parse::<u64>() {
        remove_outbox(txn, &[cursor])?;
    }
    Ok(())
}

impl EmbeddedStore {
    fn read_entries(&self, seqs: &[u64]) -> Result<Vec<OutboxEntry>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(OUTBOX).map_err(err)?;
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(raw) = table.get(*seq).map_err(err)? {
                let mut e: OutboxEntry = serde_json::from_str(raw.value()).map_err(err)?;
                e.cursor = seq.to_string();
                out.push(e);
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Outbox for EmbeddedStore {
    async fn outbox_claim(
        &self,
        _consumer: &str,
        max: usize,
        stale: Option<Duration>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let seqs = {
            let mut claims = self.claims.lock().map_err(|_| err("claims lock poisoned"))?;
            let now = Instant::now();
            let mut seqs: Vec<u64> = claims
                .inflight
                .iter()
                .filter(|(_, at)| stale.is_some_and(|stale| now.duration_since(**at) >= stale))
                .map(|(seq, _)| *seq)
                .take(max)
                .collect();
            let txn = self.db.begin_read().map_err(err)?;
            let table = txn.open_table(OUTBOX).map_err(err)?;
            let start = claims.next;
            for item in table.range(start..).map_err(err)?.take(max.saturating_sub(seqs.len())) {
                let (seq, _) = item.map_err(err)?;
                seqs.push(seq.value());
            }
            for seq in &seqs {
                claims.inflight.insert(*seq, now);
                claims.next = claims.next.max(seq + 1);
            }
            seqs
        };
        self.read_entries(&seqs)
    }

    async fn outbox_ack(&self, entries: &[OutboxEntry]) -> Result<(), StoreError> {
        let seqs: Vec<u64> = entries.iter().filter_map(|e| e.cursor.parse().ok()).collect();
        let to_remove = seqs.clone();
        self.write(move |txn| remove_outbox(txn, &to_remove).map(|()| (Reply::Done, true))).await?;
        let mut claims = self.claims.lock().map_err(|_| err("claims lock poisoned"))?;
        for seq in seqs {
            claims.inflight.remove(&seq);
        }
        Ok(())
    }

    async fn outbox_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        txn.open_table(OUTBOX).map_err(err)?.len().map_err(err)
    }

    async fn outbox_touch(&self, _consumer: &str, entries: &[OutboxEntry]) -> Result<(), StoreError> {
        let mut claims = self.claims.lock().map_err(|_| err("claims lock poisoned"))?;
        let now = Instant::now();
        for e in entries {
            if let Some(at) = e.cursor.parse().ok().and_then(|seq: u64| claims.inflight.get_mut(&seq)) {
                *at = now;
            }
        }
        Ok(())
    }

    async fn attempts(&self, entries: &[OutboxEntry]) -> Result<Vec<Option<Attempts>>, StoreError> {
        entries.iter().map(|e| self.read_json(ATTEMPTS, &e.id)).collect()
    }

    async fn record_attempt(&self, entry: &OutboxEntry, attempts: &Attempts) -> Result<(), StoreError> {
        let (id, attempts) = (entry.id.clone(), attempts.clone());
        self.write(move |txn| put_json(txn, ATTEMPTS, &id, &attempts).map(|()| (Reply::Done, true))).await?;
        Ok(())
    }

    async fn settle(&self, settles: &[Settle<'_>]) -> Result<(), StoreError> {
        if settles.is_empty() {
            return Ok(());
        }
        let batch: Vec<(OutboxEntry, Option<DeadLetter>, Option<Delivered>)> =
            settles.iter().map(|s| (s.entry.clone(), s.dead.cloned(), s.delivered.cloned())).collect();
        let retention = self.retention;
        self.write(move |txn| {
            for (entry, dead, delivered) in &batch {
                settle_in(txn, entry, dead.as_ref(), delivered.as_ref(), retention)?;
            }
            let cutoff = retention_cutoff(chrono::Utc::now().timestamp_millis(), retention);
            history::prune(txn, cutoff, history::PRUNE_PER_SETTLE)?;
            Ok((Reply::Done, true))
        })
        .await?;
        let mut claims = self.claims.lock().map_err(|_| err("claims lock poisoned"))?;
        for s in settles {
            if let Ok(seq) = s.entry.cursor.parse::<u64>() {
                claims.inflight.remove(&seq);
            }
        }
        Ok(())
    }

    async fn delivered_seq(&self, subjects: &[&str]) -> Result<Vec<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(INSTANCES).map_err(err)?;
        subjects
            .iter()
            .map(|s| {
                let raw = table.get(*s).map_err(err)?;
                let record: Record = match raw {
                    Some(v) => serde_json::from_str(v.value()).map_err(err)?,
                    None => Record::new(),
                };
                Ok(record.get("delivered_seq").and_then(|v| v.parse().ok()).unwrap_or(0))
            })
            .collect()
    }

    async fn outbox_entries(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let seqs: Vec<u64> = {
            let txn = self.db.begin_read().map_err(err)?;
            let table = txn.open_table(OUTBOX).map_err(err)?;
            let mut seqs = Vec::new();
            for item in table.iter().map_err(err)? {
                seqs.push(item.map_err(err)?.0.value());
            }
            seqs
        };
        self.read_entries(&seqs)
    }

    async fn oldest_pending_ms(&self) -> Result<Option<i64>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(OUTBOX).map_err(err)?;
        let first = table.first().map_err(err)?;
        Ok(first.and_then(|(_, v)| {
            let e: OutboxEntry = serde_json::from_str(v.value()).ok()?;
            chrono::DateTime::parse_from_rfc3339(&e.occurred_at).ok().map(|t| t.timestamp_millis())
        }))
    }

    async fn dlq_list(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(DLQ).map_err(err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(err)? {
            let (_, v) = item.map_err(err)?;
            out.push(serde_json::from_str::<DeadLetter>(v.value()).map_err(err)?);
        }
        out.sort_by(|a, b| (a.dead_at_ms, &a.entry.id).cmp(&(b.dead_at_ms, &b.entry.id)));
        Ok(out)
    }

    async fn dlq_redrive(&self, event_id: &str) -> Result<bool, StoreError> {
        let id = event_id.to_owned();
        let moved = self
            .write(move |txn| {
                let Some(dead) = get_json::<DeadLetter>(txn, DLQ, &id)? else {
                    return Ok((Reply::Moved(false), false));
                };
                let mut entry = dead.entry;
                entry.redrive = true;
                entry.cursor = String::new();
                push_outbox(txn, &entry)?;
                put_json(txn, ATTEMPTS, &id, &dead.attempts.redriven())?;
                txn.open_table(DLQ).map_err(err)?.remove(id.as_str()).map_err(err)?;
                Ok((Reply::Moved(true), true))
            })
            .await?;
        match moved {
            Reply::Moved(m) => Ok(m),
            _ => Err(unexpected()),
        }
    }
}
