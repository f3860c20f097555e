//! The store's command language.
//!
//! A [`Plan`] is everything one call may do to the store, decided in pure
//! Rust *before* the store is touched, for every state the instance may turn
//! out to be in. The store reads the instance's current status, picks the
//! matching [`Branch`] and applies it atomically: record the nonce, return a
//! kept answer for a retry, or update the instance, append the event to the
//! outbox and keep the answer. The Redis store runs a plan in one Lua script
//! (one round trip); the embedded store runs it in one write transaction.
//! Both interpret the same plan with the same rules, and a differential test
//! (tests/it/differential.rs: seeded random calls, delivery, ledger and usage
//! steps through both stores, every answer and record field compared) holds
//! them to it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An instance or order record: flat string fields.
pub type Record = BTreeMap<String, String>;

pub use crate::events::{event_id, parse_event_id, OutboxEntry};

/// Status of an instance with no record (or a record without status).
pub const ABSENT: &str = "";
/// Branch key that matches any status without a branch of its own.
pub const ANY: &str = "*";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// The shard every key of this plan lives in (Redis Cluster hash tag).
    pub shard: u8,
    /// Nonce to record; when it was seen before, nothing else happens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// How long a nonce is remembered.
    pub nonce_ttl_secs: u64,
    /// Key of this call's kept answer: a retry gets the first answer back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup: Option<String>,
    /// Where an older version kept the same call's answer (read only, when `dedup` holds none).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dedup_legacy: Option<String>,
    /// The instance id whose record is read and written.
    pub subject: String,
    /// The order id whose record `order_set` writes to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    /// What to do, by the subject's current status ([`ABSENT`], `active`, …, [`ANY`]).
    pub branches: BTreeMap<String, Branch>,
    /// Instance ids whose records to return (queryInstance); a read plan has no branches.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub read: Vec<String>,
    /// The call's receive time (UNIX ms), for nonce expiry in the embedded store.
    pub now_ms: i64,
}

impl Plan {
    /// Keeps this call's answer under `dedup` (see [`super::keys::Dedup`]).
    pub fn set_dedup(&mut self, dedup: super::keys::Dedup) {
        self.dedup = Some(dedup.key);
        self.dedup_legacy = dedup.legacy;
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Branch {
    /// The answer's result code.
    pub code: String,
    /// The exact answer body.
    pub answer: String,
    /// Keep the answer under the plan's dedup key.
    #[serde(default)]
    pub keep: bool,
    /// Fields to set on the subject record.
    #[serde(default)]
    pub set: Record,
    /// Fields to set on the order record.
    #[serde(default)]
    pub order_set: Record,
    /// The event this transition emits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<EventSpec>,
}

/// An event to append to the outbox. Its id is minted by the store from the
/// subject and its transition sequence number: `evt_<subject>_<seq>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub occurred_at: String,
    pub test: bool,
    /// JSON object of the call's own fields, laid over the record snapshot.
    pub change: String,
}

/// What applying a plan did.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The nonce was seen before: nothing was done.
    Replay,
    /// A retry: the first call's answer, byte for byte.
    Kept { code: String, answer: String },
    /// A branch was applied (or a read-only branch answered).
    Applied { code: String, answer: String, event_id: Option<String>, prior_status: String },
    /// Records of a read plan, in the order asked (empty record = unknown id).
    Read { records: Vec<Record> },
}

/// Delivery bookkeeping of one event, kept in the store so that a replica
/// taking over a dead one's work continues the same backoff.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Attempts {
    pub attempts: u32,
    pub first_attempt_ms: i64,
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    /// The most recent attempts, oldest first: at most [`ATTEMPT_LOG_MAX`]
    /// (`attempts` counts them all since the last redrive; the log goes on
    /// across redrives). Absent in bookkeeping written before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<AttemptRecord>,
}

/// Attempts an event's log keeps (the most recent; older ones are dropped,
/// [`Attempts::attempts`] still counts them): with a 1 KiB response each, a
/// log stays under about 25 KiB whatever the retry schedule.
pub const ATTEMPT_LOG_MAX: usize = 20;

/// Bytes of a receiver's response body an attempt keeps at most.
pub const RESPONSE_EXCERPT_MAX: usize = 1024;

impl Attempts {
    /// The bookkeeping a redriven dead letter starts from: a fresh count and
    /// backoff (the retry schedule starts over), the attempt log kept (an
    /// operator sees why it died, then what the redrive did).
    pub fn redriven(&self) -> Self {
        Self { log: self.log.clone(), ..Self::default() }
    }

    /// Appends an attempt to the log, dropping the oldest past [`ATTEMPT_LOG_MAX`].
    pub fn log_attempt(&mut self, record: AttemptRecord) {
        self.log.push(record);
        if self.log.len() > ATTEMPT_LOG_MAX {
            let extra = self.log.len() - ATTEMPT_LOG_MAX;
            self.log.drain(..extra);
        }
    }
}

/// One delivery attempt, as the attempt log keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// When it started (UNIX ms).
    pub at_ms: i64,
    /// The receiver's HTTP status, when it answered one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// How long it took (ms).
    pub duration_ms: u64,
    /// The start of the receiver's response body (at most [`RESPONSE_EXCERPT_MAX`] bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// Why it failed (none when it was delivered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A delivered event as the history keeps it (for the retention window):
/// the entry (its event is [`crate::events::assemble`]d from it again), its
/// attempts and when it was delivered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivered {
    pub entry: OutboxEntry,
    pub attempts: Attempts,
    pub delivered_at_ms: i64,
}

/// The order ids of an outbox entry, as the history indexes it and the admin
/// API's filter matches it: the transition's `order_id` (from the call) and
/// the purchase order id of its record, without repeats.
pub fn entry_order_ids(entry: &OutboxEntry) -> Vec<&str> {
    let mut out = Vec::with_capacity(2);
    if let Some(o) = entry.change.get("order_id").and_then(serde_json::Value::as_str) {
        out.push(o);
    }
    if let Some(o) = entry.record.get(crate::domain::field::ORDER_ID) {
        if !out.contains(&o.as_str()) {
            out.push(o.as_str());
        }
    }
    out
}

/// The order id a delivered event is indexed under on Redis, when it has one
/// to index: the transition's `order_id` unless it is the purchase order of
/// the record. A purchase order's events need no index: its order record
/// names each line's instance (`line:…` fields, written when the instance is
/// created, and the record's `order_id` is never changed afterwards), and
/// every event of those instances names that purchase order.
pub fn entry_indexed_order_id(entry: &OutboxEntry) -> Option<&str> {
    let transition = entry.change.get("order_id").and_then(serde_json::Value::as_str)?;
    let purchase = entry.record.get(crate::domain::field::ORDER_ID).map(String::as_str);
    (purchase != Some(transition)).then_some(transition)
}

/// An event that was given up on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub entry: OutboxEntry,
    pub attempts: Attempts,
    pub dead_at_ms: i64,
}

/// What redeeming an order did.
#[derive(Clone, Debug, PartialEq)]
pub enum Redeem {
    /// No such order, or another customer's.
    NotFound,
    /// The order's instance was released (refunded).
    Released,
    /// Redeemed before: the order record with the first redemption.
    Already(Record),
    /// Redeemed now.
    Redeemed(Record),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_with(purchase: Option<&str>, change: serde_json::Value) -> OutboxEntry {
        OutboxEntry {
            cursor: "1".into(),
            shard: 0,
            id: "evt_i-1_2".into(),
            kind: "subscription.renewed".into(),
            occurred_at: "2026-11-26T00:00:00.000Z".into(),
            test: false,
            record: purchase.map(|o| (crate::domain::field::ORDER_ID.to_owned(), o.to_owned())).into_iter().collect(),
            change: change.as_object().cloned().unwrap_or_default(),
            redrive: false,
        }
    }

    #[test]
    fn only_an_order_other_than_the_purchase_is_indexed() {
        let renewal = entry_with(Some("CS1"), serde_json::json!({"order_id": "CS2"}));
        assert_eq!(entry_indexed_order_id(&renewal), Some("CS2"));
        assert_eq!(entry_order_ids(&renewal), ["CS2", "CS1"]);
        // A purchase, or an expiry naming the purchase order: found through the order record.
        let purchase = entry_with(Some("CS1"), serde_json::json!({"order_id": "CS1"}));
        assert_eq!(entry_indexed_order_id(&purchase), None);
        // A freeze names no order.
        assert_eq!(entry_indexed_order_id(&entry_with(Some("CS1"), serde_json::json!({}))), None);
        // A record without a purchase order (none is written so, but) keeps the transition's index.
        assert_eq!(entry_indexed_order_id(&entry_with(None, serde_json::json!({"order_id": "CS3"}))), Some("CS3"));
    }

    #[test]
    fn the_attempt_log_keeps_the_most_recent_twenty() {
        let mut a = Attempts::default();
        for i in 0..25 {
            a.attempts += 1;
            a.log_attempt(AttemptRecord { at_ms: i, ..AttemptRecord::default() });
        }
        assert_eq!((a.attempts, a.log.len()), (25, ATTEMPT_LOG_MAX));
        assert_eq!(a.log.first().map(|r| r.at_ms), Some(5), "the oldest ones went");
        assert_eq!(a.log.last().map(|r| r.at_ms), Some(24));
        // Bookkeeping written before the log reads as an empty log, and an empty log is not written.
        let old: Attempts =
            serde_json::from_str(r#"{"attempts":3,"first_attempt_ms":1,"next_attempt_ms":2,"last_error":null}"#)
                .unwrap();
        assert!(old.log.is_empty());
        assert!(!serde_json::to_string(&old).unwrap().contains("log"));
    }
}
