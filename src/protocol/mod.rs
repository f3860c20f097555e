//! The KooGallery wire protocol: verifying calls, parsing activities, signing answers.
//!
//! Everything here is pure: no I/O, no clock reads (the caller passes `now`),
//! so every rule is unit-tested against the reference's vectors.
//!
//! - [`sign`]: every HMAC of the protocol, shared by server, replay, simulator and tests.
//! - [`verify`]: V2 and V1 request authentication (signature, timestamp window).
//! - [`call`]: parsing a verified request into a typed [`call::Call`].
//! - [`answer`]: result codes and answer bodies.
//! - [`crypto`]: the AES field encryption of §9.
//! - [`unconfirmed`]: every detail the reference marks as unconfirmed, in one place.

pub mod answer;
pub mod call;
pub mod crypto;
pub mod sign;
pub mod unconfirmed;
pub mod verify;

use std::fmt;

use chrono::{TimeZone, Utc};
use rand::distributions::Alphanumeric;
use rand::Rng;

/// A fresh 32-character alphanumeric nonce (calls to a gateway, usage pushes).
pub fn nonce() -> String {
    rand::thread_rng().sample_iter(&Alphanumeric).take(32).map(char::from).collect()
}

/// KooGallery's compact UTC time format, `yyyyMMdd'T'HHmmss'Z'` (usage API).
pub const COMPACT_TIME: &str = "%Y%m%dT%H%M%SZ";

/// UNIX seconds in KooGallery's compact format ([`COMPACT_TIME`]).
pub fn compact_time(secs: i64) -> String {
    Utc.timestamp_opt(secs, 0).single().map(|t| t.format(COMPACT_TIME).to_string()).unwrap_or_default()
}

/// `resultCode` values of protocol §5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResultCode {
    Success,
    AuthFailed,
    InvalidParam,
    InstanceNotFound,
    Processing,
    InternalError,
    NoResource,
}

impl ResultCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "000000",
            Self::AuthFailed => "000001",
            Self::InvalidParam => "000002",
            Self::InstanceNotFound => "000003",
            Self::Processing => "000004",
            Self::InternalError => "000005",
            Self::NoResource => "000100",
        }
    }
    pub fn parse(code: &str) -> Option<Self> {
        Some(match code {
            "000000" => Self::Success,
            "000001" => Self::AuthFailed,
            "000002" => Self::InvalidParam,
            "000003" => Self::InstanceNotFound,
            "000004" => Self::Processing,
            "000005" => Self::InternalError,
            "000100" => Self::NoResource,
            _ => return None,
        })
    }
}

impl fmt::Display for ResultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protocol generation a call arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Generation {
    V1,
    V2,
}

impl Generation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// Why a call was refused before anything was written. The `Display` text is
/// the answer's `resultMsg` and the log line's reason; it never contains a
/// secret or an encrypted field's content.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("authentication failed: missing query parameter {0}")]
    MissingAuthParam(&'static str),
    #[error("authentication failed: query parameter {0} appears more than once")]
    DuplicateAuthParam(&'static str),
    #[error("authentication failed: {0} is not a valid timestamp")]
    BadTimestamp(&'static str),
    #[error(
        "authentication failed: timestamp is {skew_secs} s away from the gateway clock (allowed {allowed_secs} s)"
    )]
    StaleTimestamp { skew_secs: i64, allowed_secs: u64 },
    #[error("authentication failed: signature has the wrong length or alphabet")]
    MalformedSignature,
    #[error("authentication failed: signature does not match")]
    BadSignature,
    #[error("authentication failed: nonce must be 1 to 128 visible ASCII characters")]
    MalformedNonce,
    #[error("authentication failed: nonce was already used")]
    ReplayedNonce,
    #[error("invalid request: body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("invalid request: body is not a JSON object ({0})")]
    MalformedJson(String),
    #[error("invalid request: query string is malformed ({0})")]
    MalformedQuery(String),
    #[error("invalid request: missing field {0}")]
    MissingField(&'static str),
    #[error("invalid request: field {field} {problem}")]
    BadField { field: &'static str, problem: String },
    #[error("invalid request: unknown activity {0:?}")]
    UnknownActivity(String),
    #[error("invalid request: parameter {0} appears more than once")]
    DuplicateParam(String),
}

impl Rejection {
    pub fn code(&self) -> ResultCode {
        match self {
            Self::MissingAuthParam(_)
            | Self::DuplicateAuthParam(_)
            | Self::BadTimestamp(_)
            | Self::StaleTimestamp { .. }
            | Self::MalformedSignature
            | Self::BadSignature
            | Self::MalformedNonce
            | Self::ReplayedNonce => ResultCode::AuthFailed,
            _ => ResultCode::InvalidParam,
        }
    }

    /// A short, stable label for metrics and structured logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingAuthParam(_) => "missing_auth_param",
            Self::DuplicateAuthParam(_) => "duplicate_auth_param",
            Self::BadTimestamp(_) => "bad_timestamp",
            Self::StaleTimestamp { .. } => "stale_timestamp",
            Self::MalformedSignature => "malformed_signature",
            Self::BadSignature => "bad_signature",
            Self::MalformedNonce => "malformed_nonce",
            Self::ReplayedNonce => "replayed_nonce",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::MalformedJson(_) => "malformed_json",
            Self::MalformedQuery(_) => "malformed_query",
            Self::MissingField(_) => "missing_field",
            Self::BadField { .. } => "bad_field",
            Self::UnknownActivity(_) => "unknown_activity",
            Self::DuplicateParam(_) => "duplicate_param",
        }
    }
}
