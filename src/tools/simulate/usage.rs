//! The simulated usage API: `POST /api/mkp-openapi-public/global/v1/isv/usage-data`
//! ([`USAGE_PATH`], protocol §10), as KooGallery documents it.
//!
//! It answers Huawei's documented error table of "Pushing the Pay-per-Use
//! Resource Usage (New)"
//! (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649117.html>),
//! written from the document, not from what the gateway does. A call is
//! checked in this order, and nothing of a refused call is kept:
//!
//! 1. a share of calls fails on purpose: `500 MKT.0999` (internal error);
//! 2. API Gateway: an `Authorization` header (or every call, with
//!    `require_apig`) must carry a valid `SDK-HMAC-SHA256` signature of the
//!    market's AK/SK over the request as received, else `401 APIGW.0301`;
//! 3. `ts` (ms, within ±5 minutes), `nonce` (1 to 64 characters) and
//!    `signature` over the body with keys sorted, under the product's access
//!    key, and the body sent exactly as signed: else `400 MKT.0102` "Invalid
//!    body sign" (a configuration fault of the caller);
//! 4. at most 1000 records, else `500 MKT.9003`;
//! 5. every record as documented (ids, times `yyyyMMdd'T'HHmmss'Z'`, a
//!    positive `usage_value` with at most 4 decimals), else `500 MKT.0100`;
//! 6. every `begin_time` within 21 days of now, else `500 MKT.9004`;
//! 7. no instance KooGallery "does not know" (`refuse_instances`), else
//!    `500 MKT.9001`.
//!
//! Then the records are stored, deduplicated by `metering_sn` (a record whose
//! sn was received before counts as a duplicate receipt, not again), and the
//! call is answered `MKT.0000`. A share of calls can have their answer
//! delayed *after* the records were stored (a gateway with a shorter timeout
//! loses the answer and must retry with the same `metering_sn`s). Any
//! simulator can play the fallback host (`mkt.myhuaweicloud.cn`): give its
//! URL in `KOOGATE_MARKETPLACE_FALLBACK_URLS`.
//!
//! What was received: [`UsageSimStats`], also `GET /sim/usage`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::market::{codes, reply, roll, sane_share};
use crate::http::Body;
use crate::marketplace::usage::MAX_BATCH;
pub use crate::marketplace::usage::USAGE_PATH;
use crate::protocol::sign::verify_usage_signature;
use crate::protocol::unconfirmed::usage_canonical_body;
use crate::secret::Secret;

/// Where the simulator shows what its usage API received.
pub const STATS_PATH: &str = "/sim/usage";
/// Largest difference between `ts` and the simulator's clock.
pub const MAX_TS_SKEW_MS: i64 = 5 * 60 * 1000;
/// Longest `nonce`, `instance_id`, `metering_sn` and `relate_pkg_instance`.
pub const MAX_ID_LEN: usize = 64;
/// Largest body read: 1000 records of a few hundred bytes, with room.
const BODY_LIMIT: usize = 2 * 1024 * 1024;
/// KooGallery refuses a `begin_time` more than 21 days before now (`MKT.9004`).
pub const MAX_AGE_SECS: i64 = 21 * 86_400;
/// KooGallery's time format: UTC `yyyyMMdd'T'HHmmss'Z'`.
const COMPACT: &str = "%Y%m%dT%H%M%SZ";

/// Why a usage call is refused: Huawei's documented codes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `401 APIGW.0301`: API Gateway refused the AK/SK signature.
    #[error("{0}")]
    ApiGateway(String),
    /// `400 MKT.0102` "Invalid body sign": `ts`/`nonce`/`signature`, or a body not sent as signed.
    #[error("{0}")]
    BodySign(String),
    /// `500 MKT.9003`: more than 1000 records.
    #[error("{0}")]
    TooMany(String),
    /// `500 MKT.0100`: input validation (a record not as documented).
    #[error("{0}")]
    Input(String),
    /// `500 MKT.9004`: a `begin_time` more than 21 days before now.
    #[error("{0}")]
    TooOld(String),
    /// `500 MKT.9001`: an instance id KooGallery does not know.
    #[error("{0}")]
    UnknownInstance(String),
}

impl Refusal {
    /// HTTP status and documented code.
    pub fn code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::ApiGateway(_) => (StatusCode::UNAUTHORIZED, codes::APIGW_AUTH),
            Self::BodySign(_) => (StatusCode::BAD_REQUEST, codes::USAGE_BODY_SIGN),
            Self::TooMany(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::USAGE_TOO_MANY),
            Self::Input(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::USAGE_INVALID),
            Self::TooOld(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::USAGE_TOO_OLD),
            Self::UnknownInstance(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::USAGE_UNKNOWN_INSTANCE),
        }
    }

    /// A signature fault (counted as unauthorized), not a record fault.
    pub fn is_auth(&self) -> bool {
        matches!(self, Self::ApiGateway(_) | Self::BodySign(_))
    }

    fn response(&self) -> Response<Body> {
        let (status, code) = self.code();
        reply(status, &json!({"error_code": code, "error_msg": self.to_string()}))
    }
}

/// One checked record: what the ledger keeps of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub instance_id: String,
    pub metering_sn: String,
    /// In units of 0.0001.
    pub value_e4: i64,
}

/// `usage_value` as KooGallery documents it (`Double(12,4)` sent as a string):
/// digits, an optional point and 1 to 4 decimals, at most 8 integer digits,
/// greater than 0. In units of 0.0001, exactly.
pub fn parse_value_e4(text: &str) -> Result<i64, String> {
    let e4 = parse_decimal_e4(text)?;
    if e4 <= 0 {
        return Err(format!("usage_value {text:?} is not greater than 0"));
    }
    Ok(e4)
}

pub use crate::usage::record::{format_e4, parse_decimal_e4};

/// A `yyyyMMdd'T'HHmmss'Z'` time, as UNIX seconds.
fn compact_time(value: &str) -> Option<i64> {
    if value.len() != 16 {
        return None;
    }
    chrono::NaiveDateTime::parse_from_str(value, COMPACT).ok().map(|t| t.and_utc().timestamp())
}

/// Checks the `ts` and `nonce` headers.
pub fn check_headers(ts: Option<&str>, nonce: Option<&str>, now_ms: i64) -> Result<(), Refusal> {
    let ts = ts.ok_or_else(|| Refusal::BodySign("Invalid body sign: the ts header is missing".into()))?;
    let ms: i64 = ts.parse().map_err(|_| {
        Refusal::BodySign(format!("Invalid body sign: the ts header {ts:?} is not a time in milliseconds"))
    })?;
    if (now_ms - ms).abs() > MAX_TS_SKEW_MS {
        return Err(Refusal::BodySign(format!(
            "Invalid body sign: the ts header {ts} is more than 5 minutes from the server time"
        )));
    }
    match nonce {
        None | Some("") => Err(Refusal::BodySign("Invalid body sign: the nonce header is missing".into())),
        Some(n) if n.chars().count() > MAX_ID_LEN => Err(Refusal::BodySign(format!(
            "Invalid body sign: the nonce header is longer than {MAX_ID_LEN} characters"
        ))),
        Some(_) => Ok(()),
    }
}

/// A required string field of record `i`, 1 to 64 characters.
fn id_field<'a>(record: &'a Value, i: usize, name: &str) -> Result<&'a str, String> {
    match record.get(name) {
        None | Some(Value::Null) => Err(format!("usage_records[{i}].{name} is missing")),
        Some(Value::String(s)) if s.is_empty() => Err(format!("usage_records[{i}].{name} is empty")),
        Some(Value::String(s)) if s.chars().count() > MAX_ID_LEN => {
            Err(format!("usage_records[{i}].{name} is longer than {MAX_ID_LEN} characters"))
        }
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("usage_records[{i}].{name} must be a string")),
    }
}

fn time_field(record: &Value, i: usize, name: &str) -> Result<i64, String> {
    let text = match record.get(name) {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => return Err(format!("usage_records[{i}].{name} is missing")),
        Some(_) => return Err(format!("usage_records[{i}].{name} must be a string")),
    };
    compact_time(text).ok_or_else(|| format!("usage_records[{i}].{name} {text:?} is not yyyyMMddTHHmmssZ"))
}

/// Checks a body's records as KooGallery documents them.
pub fn check_records(body: &Value) -> Result<Vec<Received>, String> {
    let records = match body.get("usage_records") {
        Some(Value::Array(records)) => records,
        Some(_) => return Err("usage_records must be a list".into()),
        None => return Err("usage_records is missing".into()),
    };
    if records.is_empty() {
        return Err("usage_records is empty".into());
    }
    if records.len() > MAX_BATCH {
        return Err(format!("{} usage records in one call; at most {MAX_BATCH}", records.len()));
    }
    let mut out = Vec::with_capacity(records.len());
    for (i, record) in records.iter().enumerate() {
        if !record.is_object() {
            return Err(format!("usage_records[{i}] must be an object"));
        }
        let instance_id = id_field(record, i, "instance_id")?;
        let metering_sn = id_field(record, i, "metering_sn")?;
        time_field(record, i, "record_time")?;
        let begin = time_field(record, i, "begin_time")?;
        let end = time_field(record, i, "end_time")?;
        if end <= begin {
            return Err(format!("usage_records[{i}].end_time must be after begin_time"));
        }
        let value_e4 = match record.get("usage_value") {
            Some(Value::String(v)) => parse_value_e4(v).map_err(|e| format!("usage_records[{i}].{e}"))?,
            None | Some(Value::Null) => return Err(format!("usage_records[{i}].usage_value is missing")),
            Some(_) => return Err(format!("usage_records[{i}].usage_value must be a string")),
        };
        match record.get("relate_pkg_instance") {
            None | Some(Value::Null) => {}
            Some(_) => {
                id_field(record, i, "relate_pkg_instance")?;
            }
        }
        out.push(Received { instance_id: instance_id.to_owned(), metering_sn: metering_sn.to_owned(), value_e4 });
    }
    Ok(out)
}

/// One `metering_sn` as received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The instance of its first receipt.
    pub instance_id: String,
    /// The value of its first receipt, as a decimal string.
    pub usage_value: String,
    pub value_e4: i64,
    /// Times received (1: once; more: retries, counted once).
    pub receipts: u64,
}

/// Usage counted for one instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceUsage {
    /// Sum of its distinct records, in units of 0.0001.
    pub total_e4: i64,
    /// The same as a decimal string.
    pub total: String,
    /// Distinct records.
    pub records: u64,
}

/// What the usage API was sent and how it answered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageSimStats {
    /// Calls to the usage path.
    pub calls: u64,
    /// Answered `MKT.0000`.
    pub taken_calls: u64,
    /// Distinct records received (by `metering_sn`).
    pub records: u64,
    /// Receipts of a `metering_sn` received before (not counted again).
    pub duplicates: u64,
    /// Of those, receipts whose instance or value differ from the first.
    pub conflicts: u64,
    /// Refused for their signatures: `401 APIGW.0301` (AK/SK) or `400 MKT.0102` (ts, nonce, signature, a body not sent as signed).
    pub unauthorized_calls: u64,
    /// Refused for their records: `500 MKT.0100/9001/9003/9004`.
    pub refused_calls: u64,
    /// Answered HTTP 500 on purpose.
    pub failed_calls: u64,
    /// Stored, then answered late on purpose.
    pub delayed_answers: u64,
    /// Per instance id.
    pub instances: BTreeMap<String, InstanceUsage>,
    /// Per `metering_sn`.
    pub metering_sns: BTreeMap<String, Receipt>,
}

impl UsageSimStats {
    /// Stores a checked call's records, deduplicated by `metering_sn`.
    fn store(&mut self, records: &[Received]) {
        for r in records {
            if let Some(seen) = self.metering_sns.get_mut(&r.metering_sn) {
                seen.receipts += 1;
                self.duplicates += 1;
                if seen.instance_id != r.instance_id || seen.value_e4 != r.value_e4 {
                    self.conflicts += 1;
                }
                continue;
            }
            self.metering_sns.insert(
                r.metering_sn.clone(),
                Receipt {
                    instance_id: r.instance_id.clone(),
                    usage_value: format_e4(r.value_e4),
                    value_e4: r.value_e4,
                    receipts: 1,
                },
            );
            self.records += 1;
            let instance = self.instances.entry(r.instance_id.clone()).or_default();
            instance.total_e4 += r.value_e4;
            instance.total = format_e4(instance.total_e4);
            instance.records += 1;
        }
    }
}

/// How the usage API behaves; the knobs can be turned while serving.
pub struct UsageState {
    key: Option<Secret>,
    /// The seller's AK/SK API Gateway verifies, and whether every call must carry it.
    apig: Option<(String, Secret)>,
    require_apig: bool,
    /// `f64` bits of the share of calls failed with HTTP 500.
    fail_share: AtomicU64,
    /// Answer delay after storing, ms, and the `f64` bits of the share of calls delayed.
    delay_ms: AtomicU64,
    delay_share: AtomicU64,
    refuse: RwLock<BTreeSet<String>>,
    stats: Mutex<UsageSimStats>,
}

impl UsageState {
    /// `key`: the product's access key (`None` or empty: every call is refused 401).
    pub fn new(key: Option<Secret>, fail_share: f64, refuse: BTreeSet<String>) -> Self {
        Self {
            key: key.filter(|k| !k.expose().is_empty()),
            apig: None,
            require_apig: false,
            fail_share: AtomicU64::new(sane_share(fail_share).to_bits()),
            delay_ms: AtomicU64::new(0),
            delay_share: AtomicU64::new(0.0f64.to_bits()),
            refuse: RwLock::new(refuse),
            stats: Mutex::new(UsageSimStats::default()),
        }
    }

    /// API Gateway in front: a call with an `Authorization` header (every call
    /// when `require`) must be signed with this AK/SK.
    pub fn with_apig(mut self, ak: &str, sk: Secret, require: bool) -> Self {
        self.apig = Some((ak.to_owned(), sk));
        self.require_apig = require;
        self
    }

    /// API Gateway's check of a call, on the request as received.
    fn check_apig(&self, parts: &hyper::http::request::Parts, body: &[u8]) -> Result<(), Refusal> {
        let authorization = parts.headers.get("authorization").and_then(|v| v.to_str().ok());
        let Some((ak, sk)) = &self.apig else { return Ok(()) };
        if authorization.is_none() && !self.require_apig {
            return Ok(());
        }
        let query: Vec<(String, String)> =
            form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()).into_owned().collect();
        let headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let request = crate::marketplace::apig::Request {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: &query,
            headers: &headers,
            body,
        };
        let lookup = |a: &str| (a == ak).then(|| sk.expose().to_owned());
        crate::marketplace::apig::verify(authorization, lookup, &request, chrono::Utc::now())
            .map_err(|e| Refusal::ApiGateway(codes::auth_message(&e).to_owned()))
    }

    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    pub fn set_fail_share(&self, share: f64) {
        self.fail_share.store(sane_share(share).to_bits(), Ordering::Relaxed);
    }

    /// From now on, `share` of the calls are answered `delay` after their records were stored.
    pub fn set_delay_after_store(&self, delay: Duration, share: f64) {
        self.delay_ms.store(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.delay_share.store(sane_share(share).to_bits(), Ordering::Relaxed);
    }

    /// Makes KooGallery "not know" (`true`) or know again (`false`) an instance.
    pub fn set_refused(&self, instance_id: &str, refused: bool) {
        let mut set = self.refuse.write().unwrap_or_else(PoisonError::into_inner);
        if refused {
            set.insert(instance_id.to_owned());
        } else {
            set.remove(instance_id);
        }
    }

    pub fn stats(&self) -> UsageSimStats {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UsageSimStats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The delay to answer with, when this call is one of the delayed share.
    fn delay(&self) -> Option<Duration> {
        let ms = self.delay_ms.load(Ordering::Relaxed);
        (ms > 0 && roll(f64::from_bits(self.delay_share.load(Ordering::Relaxed)))).then(|| Duration::from_millis(ms))
    }

    /// Checks a call (after API Gateway); the records to store.
    fn check(&self, headers: &hyper::HeaderMap, body: &[u8], now_ms: i64) -> Result<Vec<Received>, Refusal> {
        let Some(key) = &self.key else {
            return Err(Refusal::BodySign(
                "Invalid body sign: the simulator has no access key to verify usage signatures with: start it with --key (KOOGATE_ACCESS_KEY)"
                    .into(),
            ));
        };
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        check_headers(header("ts"), header("nonce"), now_ms)?;
        let value: Value =
            serde_json::from_slice(body).map_err(|e| Refusal::Input(format!("the body is not JSON: {e}")))?;
        let canonical = usage_canonical_body(&value);
        let signature = header("signature")
            .ok_or_else(|| Refusal::BodySign("Invalid body sign: the signature header is missing".into()))?;
        let (ts, nonce) = (header("ts").unwrap_or_default(), header("nonce").unwrap_or_default());
        if !verify_usage_signature(key.expose(), ts, nonce, &canonical, signature) {
            return Err(Refusal::BodySign(
                "Invalid body sign: the signature does not match the body with keys sorted, ts and nonce under the access key".into(),
            ));
        }
        if canonical.as_bytes() != body {
            return Err(Refusal::BodySign(
                "Invalid body sign: the body must be sent as signed: JSON with keys sorted at every level and no whitespace".into(),
            ));
        }
        let listed = value.get("usage_records").and_then(Value::as_array).map_or(0, Vec::len);
        if listed > MAX_BATCH {
            return Err(Refusal::TooMany(format!(
                "Usage records extends size limit: {listed} usage records in one call; at most {MAX_BATCH}"
            )));
        }
        let records = check_records(&value).map_err(|e| Refusal::Input(format!("Failure of input parameter: {e}")))?;
        let now_secs = now_ms.div_euclid(1000);
        let begins = value.get("usage_records").and_then(Value::as_array).into_iter().flatten();
        for (i, r) in begins.enumerate() {
            let begin = r.get("begin_time").and_then(Value::as_str).and_then(compact_time).unwrap_or(now_secs);
            if now_secs - begin > MAX_AGE_SECS {
                return Err(Refusal::TooOld(format!(
                    "Record beginTime extends Limit: usage_records[{i}].begin_time is more than 21 days before now"
                )));
            }
        }
        let refuse = self.refuse.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = records.iter().find(|r| refuse.contains(&r.instance_id)) {
            return Err(Refusal::UnknownInstance(format!(
                "Instance ID not found: instance {} does not exist",
                r.instance_id
            )));
        }
        Ok(records)
    }
}

/// `POST` [`USAGE_PATH`].
pub(super) async fn handle(state: &UsageState, req: Request<Incoming>) -> Response<Body> {
    state.lock().calls += 1;
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, BODY_LIMIT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            state.lock().refused_calls += 1;
            return Refusal::Input("Failure of input parameter: the body is unreadable or over 2 MiB".into())
                .response();
        }
    };
    if roll(f64::from_bits(state.fail_share.load(Ordering::Relaxed))) {
        state.lock().failed_calls += 1;
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error_code": codes::INTERNAL, "error_msg": codes::INTERNAL_MSG}),
        );
    }
    let checked = state
        .check_apig(&parts, &body)
        .and_then(|()| state.check(&parts.headers, &body, chrono::Utc::now().timestamp_millis()));
    let records = match checked {
        Ok(records) => records,
        Err(refusal) => {
            let mut stats = state.lock();
            if refusal.is_auth() {
                stats.unauthorized_calls += 1;
            } else {
                stats.refused_calls += 1;
            }
            drop(stats);
            tracing::warn!(reason = %refusal, "usage push refused");
            return refusal.response();
        }
    };
    let delay = state.delay();
    {
        let mut stats = state.lock();
        stats.store(&records);
        stats.taken_calls += 1;
        if delay.is_some() {
            stats.delayed_answers += 1;
        }
    }
    tracing::debug!(records = records.len(), "usage push received");
    if let Some(delay) = delay {
        tracing::info!(?delay, "usage records stored; answering late on purpose");
        tokio::time::sleep(delay).await;
    }
    reply(StatusCode::OK, &json!({"error_code": codes::SUCCESS, "error_msg": codes::SUCCESS_MSG}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sn: &str, value: &str) -> Value {
        json!({
            "begin_time": "20250101T000000Z",
            "end_time": "20250101T010000Z",
            "instance_id": "inst-1",
            "metering_sn": sn,
            "record_time": "20250101T011000Z",
            "usage_value": value,
        })
    }

    #[test]
    fn values_are_exact_with_at_most_four_decimals() {
        assert_eq!(parse_value_e4("1.2345"), Ok(12_345));
        assert_eq!(parse_value_e4("0.0001"), Ok(1));
        assert_eq!(parse_value_e4("12.5"), Ok(125_000));
        assert_eq!(parse_value_e4("99999999.9999"), Ok(999_999_999_999));
        for bad in ["0", "0.0000", "1.23456", "-1", "1.", ".5", "1e3", "", "123456789", " 1"] {
            assert!(parse_value_e4(bad).is_err(), "{bad:?} passed");
        }
        assert_eq!(parse_decimal_e4("0"), Ok(0));
        assert!(parse_value_e4("0").unwrap_err().contains("greater than 0"));
        assert_eq!(format_e4(125_000), "12.5");
        assert_eq!(format_e4(30_000), "3");
        assert_eq!(format_e4(12_345), "1.2345");
        for e4 in [1, 10, 12_340, 999_999_999_999] {
            assert_eq!(parse_value_e4(&format_e4(e4)), Ok(e4));
        }
    }

    #[test]
    fn headers_need_a_recent_ts_and_a_short_nonce() {
        let now = 1_700_000_000_000;
        assert_eq!(check_headers(Some(&now.to_string()), Some("n"), now), Ok(()));
        assert!(check_headers(Some(&(now - MAX_TS_SKEW_MS).to_string()), Some("n"), now).is_ok());
        assert!(check_headers(Some(&(now - MAX_TS_SKEW_MS - 1).to_string()), Some("n"), now).is_err());
        assert!(check_headers(Some(&(now + MAX_TS_SKEW_MS + 1).to_string()), Some("n"), now).is_err());
        assert!(check_headers(Some("soon"), Some("n"), now).is_err());
        assert!(check_headers(None, Some("n"), now).is_err());
        assert!(check_headers(Some(&now.to_string()), None, now).is_err());
        assert!(check_headers(Some(&now.to_string()), Some(""), now).is_err());
        assert!(check_headers(Some(&now.to_string()), Some(&"n".repeat(65)), now).is_err());
        assert!(check_headers(Some(&now.to_string()), Some(&"n".repeat(64)), now).is_ok());
    }

    #[test]
    fn records_are_checked_as_documented() {
        let ok = check_records(&json!({"usage_records": [record("sn-1", "1.5"), record("sn-2", "2")]})).unwrap();
        assert_eq!(ok.iter().map(|r| r.value_e4).collect::<Vec<_>>(), [15_000, 20_000]);
        assert_eq!(ok[0].metering_sn, "sn-1");
        let with = |field: &str, value: Value| {
            let mut r = record("sn-1", "1");
            r[field] = value;
            check_records(&json!({"usage_records": [r]}))
        };
        let err = |field: &str, value: Value| with(field, value).unwrap_err();
        assert!(err("usage_value", json!("1.00001")).contains("usage_records[0].usage_value"));
        assert!(err("usage_value", json!(1.5)).contains("must be a string"));
        assert!(err("begin_time", json!("2025-01-01T00:00:00Z")).contains("begin_time"));
        assert!(err("end_time", json!("20250101T000000Z")).contains("after begin_time"));
        assert!(err("record_time", Value::Null).contains("record_time is missing"));
        assert!(err("metering_sn", json!("x".repeat(65))).contains("longer than 64"));
        assert!(err("instance_id", json!("")).contains("empty"));
        assert!(err("relate_pkg_instance", json!(5)).contains("must be a string"));
        assert!(with("relate_pkg_instance", json!("pkg-1")).is_ok());
        assert!(check_records(&json!({"usage_records": []})).unwrap_err().contains("empty"));
        assert!(check_records(&json!({"records": []})).unwrap_err().contains("missing"));
        let many: Vec<Value> = (0..=MAX_BATCH).map(|i| record(&format!("sn-{i}"), "1")).collect();
        assert!(check_records(&json!({"usage_records": many})).unwrap_err().contains("at most 1000"));
    }

    #[test]
    fn the_ledger_counts_each_metering_sn_once() {
        let mut stats = UsageSimStats::default();
        let r =
            |sn: &str, inst: &str, e4: i64| Received { instance_id: inst.into(), metering_sn: sn.into(), value_e4: e4 };
        stats.store(&[r("a", "i1", 12_345), r("b", "i1", 5), r("c", "i2", 10_000)]);
        stats.store(&[r("a", "i1", 12_345), r("b", "i2", 5)]);
        assert_eq!((stats.records, stats.duplicates, stats.conflicts), (3, 2, 1));
        assert_eq!(stats.instances["i1"], InstanceUsage { total_e4: 12_350, total: "1.235".into(), records: 2 });
        assert_eq!(stats.instances["i2"].total, "1");
        assert_eq!(stats.metering_sns["a"].receipts, 2);
        assert_eq!(stats.metering_sns["c"].receipts, 1);
    }

    #[test]
    fn without_a_key_every_call_is_unauthorized() {
        let state = UsageState::new(Some(Secret::new("")), 0.0, BTreeSet::new());
        assert!(!state.has_key());
        let refused = state.check(&hyper::HeaderMap::new(), b"{}", 0).unwrap_err();
        assert!(matches!(&refused, Refusal::BodySign(m) if m.contains("--key")), "{refused:?}");
        assert_eq!(refused.code(), (StatusCode::BAD_REQUEST, "MKT.0102"));
    }
}
