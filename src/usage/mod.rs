//! Usage of pay-per-use instances, from the billing core to KooGallery
//! (account settlement, protocol §10).
//!
//! This module is the model, pure: [`record`] (what the billing core sends,
//! checked and in canonical form), the intake decision and the ledger's
//! types. The workers that move records, `POST /v1/usage` and the push to
//! KooGallery, are in [`crate::metering`] (they use the store, which uses
//! this model).
//!
//! The flow: the billing core posts records; each is checked and, when
//! accepted, stored (with its period in the instance's period index and its
//! `metering_sn` in a global registry) before the answer. The push worker
//! claims due records for a lease, holds those of frozen instances, sends the
//! rest in signed batches of at most 1000, and settles each record: pushed
//! (added to the instance's usage for queryInstance), retried later, or
//! refused by KooGallery into the usage dead-letter list. A record is pushed
//! again only after a lease ran out or an attempt failed, always with the same
//! `metering_sn`, which is what KooGallery deduplicates by.

pub mod record;

use serde::Serialize;

use crate::domain::field::{USAGE_E4, USAGE_END, USAGE_UNPUSHED_E4};
use crate::domain::item_usage_fields;
use crate::domain::status::RELEASED;

pub use record::{StoredUsage, UsageInput, UsageRecord, UsageState};

/// What happened to one posted record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The record's `metering_sn` (empty when it had none).
    pub metering_sn: String,
    pub status: VerdictStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictStatus {
    /// Stored now; it will be pushed.
    Accepted,
    /// The same record (same `metering_sn` and content) was accepted before.
    Duplicate,
    /// Refused; nothing was stored.
    Rejected,
}

/// Why a well-formed record is refused, as both stores report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The `metering_sn` belongs to a different record.
    SnReused,
    UnknownInstance,
    Released,
    /// The instance came from a KooGallery debug call (`testFlag=1`): nothing to bill.
    TestInstance,
    /// The period overlaps an accepted period (of the record with this sn).
    Overlap(String),
}

impl Refusal {
    /// The short code the Redis scripts return.
    pub fn from_code(code: &str) -> Option<Self> {
        Some(match code {
            "sn_reused" => Self::SnReused,
            "unknown_instance" => Self::UnknownInstance,
            "released" => Self::Released,
            "test_instance" => Self::TestInstance,
            other => Self::Overlap(other.strip_prefix("overlap:")?.to_owned()),
        })
    }

    pub fn reason(&self, record: &UsageRecord) -> String {
        match self {
            Self::SnReused => format!(
                "metering_sn {} was already used for a different record (another instance, period or value)",
                record.metering_sn
            ),
            Self::UnknownInstance => format!("instance {} is not known to this gateway", record.instance_id),
            Self::Released => format!("instance {} is released: usage after release is refused", record.instance_id),
            Self::TestInstance => format!(
                "instance {} was created by a KooGallery debug call (testFlag=1): its usage is not billed",
                record.instance_id
            ),
            Self::Overlap(sn) => {
                let item = if record.item.is_empty() { String::new() } else { format!(" (item {})", record.item) };
                format!(
                    "period {}..{} overlaps the accepted period of metering_sn {sn} on instance {}{item}",
                    record::compact(record.begin),
                    record::compact(record.end),
                    record.instance_id
                )
            }
        }
    }
}

/// What a store decided for one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Accepted,
    Duplicate,
    Refused(Refusal),
}

impl Decision {
    /// Reads a Redis script's per-record answer.
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "accepted" => Some(Self::Accepted),
            "duplicate" => Some(Self::Duplicate),
            other => Refusal::from_code(other).map(Self::Refused),
        }
    }

    pub fn verdict(&self, record: &UsageRecord) -> Verdict {
        let (status, reason) = match self {
            Self::Accepted => (VerdictStatus::Accepted, None),
            Self::Duplicate => (VerdictStatus::Duplicate, None),
            Self::Refused(r) => (VerdictStatus::Rejected, Some(r.reason(record))),
        };
        Verdict { metering_sn: record.metering_sn.clone(), status, reason }
    }
}

/// The rule both stores apply (the Redis scripts in the same order):
/// a known `metering_sn` is a duplicate (same content) or reused (different);
/// else the instance must exist, not be released and not come from a debug
/// call; else the period must not overlap the latest accepted period of the
/// instance and item that begins before this one ends (`prev_end`/`prev_sn`).
pub fn decide(
    record: &UsageRecord,
    known_content: Option<&str>,
    instance_status: &str,
    test_instance: bool,
    prev: Option<(i64, &str)>,
) -> Decision {
    if let Some(content) = known_content {
        return if content == record.content() { Decision::Duplicate } else { Decision::Refused(Refusal::SnReused) };
    }
    match instance_status {
        "" => return Decision::Refused(Refusal::UnknownInstance),
        RELEASED => return Decision::Refused(Refusal::Released),
        _ if test_instance => return Decision::Refused(Refusal::TestInstance),
        _ => {}
    }
    match prev {
        Some((prev_end, prev_sn)) if prev_end > record.begin => Decision::Refused(Refusal::Overlap(prev_sn.to_owned())),
        _ => Decision::Accepted,
    }
}

/// A claimed record and its instance's status at claim time.
#[derive(Clone, Debug)]
pub struct UsageClaim {
    pub stored: StoredUsage,
    pub instance_status: String,
}

/// How a claimed record leaves the push worker's hands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageSettle {
    /// KooGallery has it: count it into the instance's pushed usage.
    Pushed,
    /// The attempt failed: try again at `at_ms`.
    Retry { attempts: u32, at_ms: i64, error: String },
    /// Its instance is frozen: look again at `at_ms`.
    Hold { at_ms: i64 },
    /// Refused by KooGallery (or given up): into the usage dead-letter list.
    Dead { code: String, msg: String },
}

/// Gauges of the usage ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UsageStats {
    /// Accepted and not yet pushed (nor dead).
    pub unpushed: u64,
    /// When the oldest of them was accepted (UNIX ms).
    pub oldest_unpushed_ms: Option<i64>,
    pub dead: u64,
}

/// The usage of one billing item of an instance, from its record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemUsage {
    /// `None`: the instance's own item; else the package instance the
    /// records named (`relate_pkg_instance`).
    pub related_instance: Option<String>,
    /// What KooGallery has taken, in units of 0.0001.
    pub pushed_e4: i64,
    /// End of the latest pushed period (UNIX s).
    pub pushed_until: Option<i64>,
    /// Accepted and not pushed yet (nor dead), in units of 0.0001.
    pub unpushed_e4: i64,
}

/// The usage of an instance per billing item: the instance's own item first
/// (shown when anything of it was accepted, or when nothing of a package
/// was), then one per package it is linked to.
pub fn item_usage(record: &std::collections::BTreeMap<String, String>) -> Vec<ItemUsage> {
    let num = |field: &str| record.get(field).and_then(|v| v.parse::<i64>().ok());
    let per_item = |total: &str| -> std::collections::BTreeMap<&str, i64> {
        let prefix = format!("{total}:");
        record.iter().filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?, v.parse::<i64>().ok()?))).collect()
    };
    let (pushed, unpushed) = (per_item(USAGE_E4), per_item(USAGE_UNPUSHED_E4));
    let own_pushed = num(USAGE_E4).unwrap_or(0) - pushed.values().sum::<i64>();
    let own_unpushed = num(USAGE_UNPUSHED_E4).unwrap_or(0) - unpushed.values().sum::<i64>();
    let mut items: std::collections::BTreeSet<&str> = pushed.keys().copied().collect();
    items.extend(unpushed.keys().copied());
    let mut out = Vec::new();
    if own_pushed != 0 || own_unpushed != 0 || pushed.is_empty() {
        out.push(ItemUsage {
            related_instance: None,
            pushed_e4: own_pushed,
            pushed_until: num(USAGE_END),
            unpushed_e4: own_unpushed,
        });
    }
    for item in items {
        let (_, end_field) = item_usage_fields(item);
        out.push(ItemUsage {
            related_instance: Some(item.to_owned()),
            pushed_e4: pushed.get(item).copied().unwrap_or(0),
            pushed_until: num(&end_field),
            unpushed_e4: unpushed.get(item).copied().unwrap_or(0),
        });
    }
    out
}

/// When a lease taken at `now_ms` runs out.
pub fn lease_end(now_ms: i64, lease: std::time::Duration) -> i64 {
    now_ms.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2))
}

/// The period index key of an instance and metering item, below a shard prefix.
pub fn period_index(instance_id: &str, item: &str) -> String {
    format!("usage:p:{}:{instance_id}:{item}", instance_id.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(begin: i64, end: i64) -> UsageRecord {
        UsageRecord { metering_sn: "sn".into(), instance_id: "i".into(), item: String::new(), begin, end, value_e4: 1 }
    }

    #[test]
    fn decisions() {
        let r = rec(100, 200);
        assert_eq!(decide(&r, Some(&r.content()), "released", false, None), Decision::Duplicate);
        assert_eq!(decide(&r, Some("other"), "active", false, None), Decision::Refused(Refusal::SnReused));
        assert_eq!(decide(&r, None, "", false, None), Decision::Refused(Refusal::UnknownInstance));
        assert_eq!(decide(&r, None, "released", false, None), Decision::Refused(Refusal::Released));
        assert_eq!(decide(&r, None, "active", true, None), Decision::Refused(Refusal::TestInstance));
        assert_eq!(decide(&r, None, "frozen", false, Some((100, "a"))), Decision::Accepted);
        assert_eq!(
            decide(&r, None, "active", false, Some((101, "a"))),
            Decision::Refused(Refusal::Overlap("a".into()))
        );
        for code in ["accepted", "duplicate", "sn_reused", "unknown_instance", "released", "test_instance", "overlap:x"]
        {
            assert!(Decision::from_code(code).is_some(), "{code}");
        }
        assert_eq!(Decision::from_code("weird"), None);
        let v = Decision::Refused(Refusal::Overlap("a".into())).verdict(&r);
        assert_eq!(v.status, VerdictStatus::Rejected);
        assert!(v.reason.unwrap().contains("overlaps the accepted period of metering_sn a"));
    }
}
