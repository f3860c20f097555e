//! Usage records: what the billing core sends, checked and put in canonical
//! form. Pure: no I/O, no clock.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

// KooGallery's time format: UTC `yyyyMMdd'T'HHmmss'Z'`.
use crate::protocol::COMPACT_TIME as COMPACT;

/// Longest `metering_sn`, `instance_id` and `relate_pkg_instance` KooGallery takes.
pub const MAX_ID_LEN: usize = 64;
/// `usage_value` is `Double(12,4)`: at most 8 digits before the point, 4 after.
const MAX_INT_DIGITS: usize = 8;
const MAX_DECIMALS: usize = 4;

/// KooGallery refuses a record whose `begin_time` is more than 21 days before
/// now (`500 MKT.9004`, "Pushing the Pay-per-Use Resource Usage (New)":
/// <https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649117.html>).
pub const KOOGALLERY_MAX_AGE_SECS: i64 = 21 * 86_400;
/// Intake refuses from 20 days on: one day of margin for the push itself
/// (retries with backoff, a KooGallery outage, clock differences).
pub const INTAKE_MAX_AGE_SECS: i64 = 20 * 86_400;
/// A record held for a frozen instance is "near expiry" from 18 days on:
/// three days before KooGallery stops taking it (`koogate_usage_held_near_expiry`).
pub const NEAR_EXPIRY_AGE_SECS: i64 = 18 * 86_400;

/// The 21-day rule at intake: a `begin_time` older than [`INTAKE_MAX_AGE_SECS`] is refused.
pub fn check_age(begin: i64, now_secs: i64) -> Result<(), String> {
    let age = now_secs - begin;
    if age > INTAKE_MAX_AGE_SECS {
        return Err(format!(
            "begin_time {} is {} days old: KooGallery refuses usage whose begin_time is more than 21 days before the push (MKT.9004); koogate takes records up to 20 days old (one day of margin for retries)",
            compact(begin),
            age / 86_400
        ));
    }
    Ok(())
}

/// Is a record with this `begin` close to becoming unbillable?
pub fn near_expiry(begin: i64, now_secs: i64) -> bool {
    now_secs - begin > NEAR_EXPIRY_AGE_SECS
}

/// One record as the billing core posts it to `POST /v1/usage`.
#[derive(Clone, Debug, Deserialize)]
pub struct UsageInput {
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub begin_time: Option<String>,
    #[serde(default)]
    pub end_time: Option<String>,
    /// A string (`"12.5"`) or a JSON number.
    #[serde(default)]
    pub usage_value: Option<serde_json::Value>,
    #[serde(default)]
    pub metering_sn: Option<String>,
    #[serde(default)]
    pub relate_pkg_instance: Option<String>,
}

/// A checked record. The metering item is `relate_pkg_instance` (empty when
/// absent): periods of one instance and item must not overlap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub metering_sn: String,
    pub instance_id: String,
    pub item: String,
    /// Period, UNIX seconds, `begin < end`.
    pub begin: i64,
    pub end: i64,
    /// The value in units of 0.0001 (exact).
    pub value_e4: i64,
}

impl UsageRecord {
    /// Checks one input record. The error says which field is wrong and why.
    pub fn parse(input: &UsageInput) -> Result<Self, String> {
        let metering_sn = id_field("metering_sn", input.metering_sn.as_deref())?;
        let instance_id = id_field("instance_id", input.instance_id.as_deref())?;
        let item = match input.relate_pkg_instance.as_deref() {
            None | Some("") => String::new(),
            Some(v) => id_field("relate_pkg_instance", Some(v))?,
        };
        let begin = parse_time("begin_time", input.begin_time.as_deref())?;
        let end = parse_time("end_time", input.end_time.as_deref())?;
        if end <= begin {
            return Err(format!(
                "end_time must be after begin_time ({} is not after {})",
                compact(end),
                compact(begin)
            ));
        }
        let value_e4 = parse_value(input.usage_value.as_ref())?;
        Ok(Self { metering_sn, instance_id, item, begin, end, value_e4 })
    }

    /// Everything that makes two records with one `metering_sn` the same record.
    pub fn content(&self) -> String {
        format!("{}\t{}\t{}\t{}\t{}", self.instance_id, self.item, self.begin, self.end, self.value_e4)
    }

    /// `usage_value` as KooGallery takes it: a decimal string, no trailing zeros.
    pub fn value(&self) -> String {
        format_e4(self.value_e4)
    }
}

fn id_field(name: &str, value: Option<&str>) -> Result<String, String> {
    let value = value.ok_or_else(|| format!("{name} is missing"))?;
    if value.is_empty() {
        return Err(format!("{name} is empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(format!("{name} is longer than {MAX_ID_LEN} bytes"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(format!("{name} contains a control character"));
    }
    Ok(value.to_owned())
}

/// RFC 3339 (any offset) or KooGallery's `yyyyMMdd'T'HHmmss'Z'`, to UNIX seconds.
/// Sub-second parts are refused: KooGallery's format has none, and a period
/// edge moved by truncation would make records overlap or leave gaps.
pub fn parse_time(name: &str, value: Option<&str>) -> Result<i64, String> {
    let value = value.ok_or_else(|| format!("{name} is missing"))?;
    let secs = if let Ok(t) = NaiveDateTime::parse_from_str(value, COMPACT) {
        Utc.from_utc_datetime(&t).timestamp()
    } else if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        if t.timestamp_subsec_nanos() != 0 {
            return Err(format!("{name} {value:?} has a fraction of a second; periods are whole seconds"));
        }
        t.timestamp()
    } else {
        return Err(format!("{name} {value:?} is neither RFC 3339 nor yyyyMMddTHHmmssZ"));
    };
    if !(0..=253_402_300_799).contains(&secs) {
        return Err(format!("{name} {value:?} is out of range"));
    }
    Ok(secs)
}

/// UNIX seconds in KooGallery's format.
pub fn compact(secs: i64) -> String {
    crate::protocol::compact_time(secs)
}

/// A positive decimal with at most 4 decimals and 8 integer digits, exactly.
fn parse_value(value: Option<&serde_json::Value>) -> Result<i64, String> {
    let text = match value {
        None | Some(serde_json::Value::Null) => return Err("usage_value is missing".into()),
        Some(serde_json::Value::String(s)) => s.clone(),
        // A JSON number keeps its literal text (serde_json's arbitrary precision is off,
        // so re-printing could change it): only integers and short decimals pass through.
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(other) => return Err(format!("usage_value must be a decimal string or number, not {other}")),
    };
    let e4 = parse_decimal_e4(&text)?;
    if e4 == 0 {
        return Err(format!("usage_value {text:?} must be greater than 0"));
    }
    Ok(e4)
}

/// A plain decimal string (digits, an optional point and 1 to 4 decimals, at
/// most 8 digits before the point: `Double(12,4)`), zero allowed, in units of
/// 0.0001, exactly. The simulated usage API checks records with it too.
pub fn parse_decimal_e4(text: &str) -> Result<i64, String> {
    let bad = |why: &str| format!("usage_value {text:?} {why}");
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("is not a plain positive decimal (digits, an optional point and decimals)"));
    }
    if text.contains('.') && frac.is_empty() {
        return Err(bad("ends with a point"));
    }
    if frac.len() > MAX_DECIMALS {
        return Err(bad("has more than 4 decimals"));
    }
    let int = int.trim_start_matches('0');
    if int.len() > MAX_INT_DIGITS {
        return Err(bad("is too large (at most 8 digits before the point)"));
    }
    let int: i64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad("is not a number"))? };
    let mut frac_e4: i64 = 0;
    for (i, b) in frac.bytes().enumerate() {
        frac_e4 += i64::from(b - b'0') * 10i64.pow((MAX_DECIMALS - 1 - i) as u32);
    }
    Ok(int * 10_000 + frac_e4)
}

/// `record_time` of a record accepted at `now_ms`: fixed then, so a retried
/// push sends the same body.
pub fn record_time(now_ms: i64) -> String {
    compact(now_ms.div_euclid(1000))
}

/// Units of 0.0001 as a decimal string without trailing zeros.
pub fn format_e4(e4: i64) -> String {
    let (int, frac) = (e4 / 10_000, e4 % 10_000);
    if frac == 0 {
        return int.to_string();
    }
    let frac = format!("{frac:04}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

/// Where a stored record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageState {
    /// Accepted, not yet taken by KooGallery.
    Pending,
    /// KooGallery took it.
    Pushed,
    /// KooGallery refused it, or pushing gave up: in the usage dead-letter list.
    Dead,
}

impl UsageState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Pushed => "pushed",
            Self::Dead => "dead",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "pushed" => Self::Pushed,
            "dead" => Self::Dead,
            _ => return None,
        })
    }
}

/// A record as the store keeps it: the record, when it was accepted, and
/// where its push stands. Both stores keep it as flat string fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoredUsage {
    #[serde(flatten)]
    pub record: UsageRecord,
    /// `record_time` of the push: when the gateway accepted it (fixed, so a
    /// retried push sends the same body).
    pub record_time: String,
    pub accepted_ms: i64,
    pub state: UsageState,
    /// Failed push attempts so far.
    pub attempts: u32,
    /// Last failure (transport error or KooGallery's answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// KooGallery's code and message when it refused the record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pushed_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_ms: Option<i64>,
    /// Waiting because its instance is frozen.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
}

impl StoredUsage {
    /// A freshly accepted record.
    pub fn accepted(record: UsageRecord, now_ms: i64) -> Self {
        Self {
            record,
            record_time: record_time(now_ms),
            accepted_ms: now_ms,
            state: UsageState::Pending,
            attempts: 0,
            error: None,
            code: None,
            msg: None,
            pushed_ms: None,
            dead_ms: None,
            held: false,
        }
    }

    /// The flat fields both stores keep.
    pub fn to_fields(&self) -> BTreeMap<String, String> {
        let r = &self.record;
        let mut f = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            f.insert(k.to_owned(), v);
        };
        put("sn", r.metering_sn.clone());
        put("instance", r.instance_id.clone());
        put("item", r.item.clone());
        put("begin", r.begin.to_string());
        put("end", r.end.to_string());
        put("value_e4", r.value_e4.to_string());
        put("content", r.content());
        put("record_time", self.record_time.clone());
        put("accepted_ms", self.accepted_ms.to_string());
        put("state", self.state.as_str().to_owned());
        put("attempts", self.attempts.to_string());
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        put("error", opt(&self.error));
        put("code", opt(&self.code));
        put("msg", opt(&self.msg));
        put("pushed_ms", self.pushed_ms.map(|v| v.to_string()).unwrap_or_default());
        put("dead_ms", self.dead_ms.map(|v| v.to_string()).unwrap_or_default());
        put("held", if self.held { "1" } else { "" }.to_owned());
        f
    }

    /// Reads the flat fields back; `None` when a field is missing or malformed.
    pub fn from_fields(f: &BTreeMap<String, String>) -> Option<Self> {
        let get = |k: &str| f.get(k).map(String::as_str);
        let num = |k: &str| get(k).and_then(|v| v.parse::<i64>().ok());
        let opt_str = |k: &str| get(k).filter(|v| !v.is_empty()).map(str::to_owned);
        let opt_num = |k: &str| get(k).filter(|v| !v.is_empty()).and_then(|v| v.parse::<i64>().ok());
        Some(Self {
            record: UsageRecord {
                metering_sn: get("sn")?.to_owned(),
                instance_id: get("instance")?.to_owned(),
                item: get("item").unwrap_or_default().to_owned(),
                begin: num("begin")?,
                end: num("end")?,
                value_e4: num("value_e4")?,
            },
            record_time: get("record_time")?.to_owned(),
            accepted_ms: num("accepted_ms")?,
            state: UsageState::parse(get("state")?)?,
            attempts: get("attempts").and_then(|v| v.parse().ok()).unwrap_or(0),
            error: opt_str("error"),
            code: opt_str("code"),
            msg: opt_str("msg"),
            pushed_ms: opt_num("pushed_ms"),
            dead_ms: opt_num("dead_ms"),
            held: get("held").is_some_and(|v| !v.is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_21_day_rule_with_a_margin() {
        let now = 1_800_000_000;
        assert!(check_age(now - INTAKE_MAX_AGE_SECS, now).is_ok());
        assert!(check_age(now + 3600, now).is_ok());
        let e = check_age(now - INTAKE_MAX_AGE_SECS - 1, now).unwrap_err();
        assert!(e.contains("20 days old") && e.contains("MKT.9004"), "{e}");
        assert!(!near_expiry(now - NEAR_EXPIRY_AGE_SECS, now));
        assert!(near_expiry(now - NEAR_EXPIRY_AGE_SECS - 1, now));
    }
    use serde_json::json;

    fn input(v: serde_json::Value) -> UsageInput {
        serde_json::from_value(v).unwrap()
    }

    fn good() -> serde_json::Value {
        json!({"instance_id":"i-1","begin_time":"20260101T000000Z","end_time":"2026-01-01T01:00:00Z",
               "usage_value":"12.50","metering_sn":"sn-1"})
    }

    #[test]
    fn parses_both_time_formats_and_exact_values() {
        let r = UsageRecord::parse(&input(good())).unwrap();
        assert_eq!(r.end - r.begin, 3600);
        assert_eq!(r.value_e4, 125_000);
        assert_eq!(r.value(), "12.5");
        assert_eq!(compact(r.begin), "20260101T000000Z");
        let offset = UsageRecord::parse(&input(json!({"instance_id":"i","metering_sn":"s","usage_value":3,
            "begin_time":"2026-01-01T08:00:00+08:00","end_time":"20260101T000001Z"})))
        .unwrap();
        assert_eq!(offset.begin, r.begin);
        assert_eq!(offset.value(), "3");
    }

    #[test]
    fn values_keep_four_decimals_exactly() {
        for (v, e4, text) in [
            (json!("0.0001"), 1, "0.0001"),
            (json!("99999999.9999"), 999_999_999_999, "99999999.9999"),
            (json!("007.10"), 71_000, "7.1"),
            (json!(0.25), 2_500, "0.25"),
        ] {
            let mut j = good();
            j["usage_value"] = v;
            let r = UsageRecord::parse(&input(j)).unwrap();
            assert_eq!((r.value_e4, r.value().as_str()), (e4, text));
        }
    }

    #[test]
    fn refuses_bad_records_with_the_reason() {
        let cases = [
            ("usage_value", json!("0"), "greater than 0"),
            ("usage_value", json!("0.00001"), "more than 4 decimals"),
            ("usage_value", json!("-1"), "plain positive decimal"),
            ("usage_value", json!("1e3"), "plain positive decimal"),
            ("usage_value", json!("123456789"), "too large"),
            ("usage_value", json!("1."), "ends with a point"),
            ("usage_value", json!(true), "decimal string or number"),
            ("end_time", json!("20260101T000000Z"), "after begin_time"),
            ("begin_time", json!("yesterday"), "neither RFC 3339"),
            ("begin_time", json!("2026-01-01T00:00:00.5Z"), "fraction of a second"),
            ("metering_sn", json!(""), "metering_sn is empty"),
            ("instance_id", json!("x".repeat(65)), "longer than 64"),
            ("metering_sn", json!("a\nb"), "control character"),
        ];
        for (field, value, why) in cases {
            let mut j = good();
            j[field] = value.clone();
            let e = UsageRecord::parse(&input(j)).unwrap_err();
            assert!(e.contains(why), "{field}={value}: {e}");
        }
        let mut j = good();
        j.as_object_mut().unwrap().remove("metering_sn");
        assert_eq!(UsageRecord::parse(&input(j)).unwrap_err(), "metering_sn is missing");
    }

    #[test]
    fn stored_records_round_trip_through_flat_fields() {
        let mut s = StoredUsage::accepted(UsageRecord::parse(&input(good())).unwrap(), 1_767_225_600_123);
        assert_eq!(s.record_time, "20260101T000000Z");
        assert_eq!(StoredUsage::from_fields(&s.to_fields()), Some(s.clone()));
        s.state = UsageState::Dead;
        s.code = Some("MKT.0100".into());
        s.held = true;
        s.attempts = 3;
        assert_eq!(StoredUsage::from_fields(&s.to_fields()), Some(s));
    }
}
