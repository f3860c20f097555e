//! `POST /v1/usage`: the billing core hands over usage records.
//!
//! Every record gets its own verdict (accepted, duplicate, rejected with the
//! reason). Accepted records are stored before the answer. A request the
//! store could not finish is answered 503 as a whole: posting it again is
//! safe, since what was stored answers `duplicate` the second time.

use serde::{Deserialize, Serialize};

use crate::metrics as m;
use crate::store::{StoreError, UsageLedger};
use crate::usage::{UsageInput, UsageRecord, Verdict, VerdictStatus};

/// Most records in one request (KooGallery's own batch limit).
pub const MAX_RECORDS: usize = 1000;

#[derive(Debug, Deserialize)]
struct Request {
    records: Option<Vec<serde_json::Value>>,
}

/// The answer to a request the gateway could read.
#[derive(Debug, Serialize)]
pub struct IntakeAnswer {
    pub accepted: usize,
    pub duplicate: usize,
    pub rejected: usize,
    pub records: Vec<Verdict>,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The request as a whole is unreadable: nothing was stored.
    #[error("{0}")]
    BadRequest(String),
    #[error("the store failed: {0}; post the same records again (already stored ones answer duplicate)")]
    Store(#[from] StoreError),
}

/// Checks and stores the records of one request body.
pub async fn intake<S: UsageLedger + Sync + ?Sized>(
    store: &S,
    body: &[u8],
    now_ms: i64,
) -> Result<IntakeAnswer, IntakeError> {
    let request: Request = serde_json::from_slice(body)
        .map_err(|e| IntakeError::BadRequest(format!("the body is not a JSON object with \"records\": {e}")))?;
    let raw = request.records.ok_or_else(|| IntakeError::BadRequest("\"records\" is missing".into()))?;
    if raw.is_empty() {
        return Err(IntakeError::BadRequest("\"records\" is empty".into()));
    }
    if raw.len() > MAX_RECORDS {
        return Err(IntakeError::BadRequest(format!("{} records in one request; at most {MAX_RECORDS}", raw.len())));
    }
    let mut verdicts: Vec<Option<Verdict>> = Vec::with_capacity(raw.len());
    let mut checked: Vec<(usize, UsageRecord)> = Vec::new();
    for (i, value) in raw.into_iter().enumerate() {
        let sn = value.get("metering_sn").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let parsed = serde_json::from_value::<UsageInput>(value)
            .map_err(|e| format!("record is not an object of the expected fields: {e}"))
            .and_then(|input| UsageRecord::parse(&input))
            .and_then(|record| {
                crate::usage::record::check_age(record.begin, now_ms.div_euclid(1000))?;
                Ok(record)
            });
        match parsed {
            Ok(record) => {
                checked.push((i, record));
                verdicts.push(None);
            }
            Err(reason) => verdicts.push(Some(Verdict {
                metering_sn: sn,
                status: VerdictStatus::Rejected,
                reason: Some(format!("record {i}: {reason}")),
            })),
        }
    }
    let records: Vec<UsageRecord> = checked.iter().map(|(_, r)| r.clone()).collect();
    let decisions = if records.is_empty() { Vec::new() } else { store.usage_accept(&records, now_ms).await? };
    for ((i, record), decision) in checked.iter().zip(decisions) {
        verdicts[*i] = Some(decision.verdict(record));
    }
    let records: Vec<Verdict> = verdicts.into_iter().flatten().collect();
    let count = |s: VerdictStatus| records.iter().filter(|v| v.status == s).count();
    let answer = IntakeAnswer {
        accepted: count(VerdictStatus::Accepted),
        duplicate: count(VerdictStatus::Duplicate),
        rejected: count(VerdictStatus::Rejected),
        records,
    };
    m::usage_records("accepted", answer.accepted as u64);
    m::usage_records("duplicate", answer.duplicate as u64);
    m::usage_records("rejected", answer.rejected as u64);
    // One line per request: a batch of 1000 bad records must not become 1000 log lines.
    if let Some(first) = answer.records.iter().find(|v| v.status == VerdictStatus::Rejected) {
        tracing::warn!(
            rejected = answer.rejected,
            first_metering_sn = %crate::logfmt::clean(&first.metering_sn),
            first_reason = %crate::logfmt::clean(first.reason.as_deref().unwrap_or("")),
            "usage records rejected"
        );
    }
    tracing::info!(
        accepted = answer.accepted,
        duplicate = answer.duplicate,
        rejected = answer.rejected,
        "usage records taken in"
    );
    Ok(answer)
}
