//! The usage API (`POST {base}/api/mkp-openapi-public/global/v1/isv/usage-data`,
//! protocol §10): the wire body, its signature headers and the answer.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::protocol::sign::usage_signature;
use crate::protocol::unconfirmed::{usage_answer_class, usage_canonical_body, UsageAnswerClass};
use crate::secret::Secret;
use crate::usage::record::{compact, StoredUsage};

pub const USAGE_PATH: &str = "/api/mkp-openapi-public/global/v1/isv/usage-data";
/// Most records KooGallery takes in one call.
pub const MAX_BATCH: usize = 1000;

/// One record on the wire (`UsagePushData`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRecord {
    pub instance_id: String,
    pub record_time: String,
    pub begin_time: String,
    pub end_time: String,
    pub usage_value: String,
    pub metering_sn: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relate_pkg_instance: Option<String>,
}

impl PushRecord {
    pub fn from_stored(s: &StoredUsage) -> Self {
        let r = &s.record;
        Self {
            instance_id: r.instance_id.clone(),
            record_time: s.record_time.clone(),
            begin_time: compact(r.begin),
            end_time: compact(r.end),
            usage_value: r.value(),
            metering_sn: r.metering_sn.clone(),
            relate_pkg_instance: (!r.item.is_empty()).then(|| r.item.clone()),
        }
    }
}

/// The request body: `{"usage_records":[…]}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PushBody {
    pub usage_records: Vec<PushRecord>,
}

/// The canonical (signed and sent) body of a batch.
pub fn canonical_body(records: &[PushRecord]) -> String {
    let value = serde_json::to_value(PushBody { usage_records: records.to_vec() }).unwrap_or(Value::Null);
    usage_canonical_body(&value)
}

/// The three signature headers of a push: `ts`, `nonce`, `signature`.
pub fn signature_headers(
    access_key: &str,
    canonical_body: &str,
    ts_ms: i64,
    nonce: &str,
) -> [(&'static str, String); 3] {
    let ts = ts_ms.to_string();
    let signature = usage_signature(access_key, &ts, nonce, canonical_body);
    [("ts", ts), ("nonce", nonce.to_owned()), ("signature", signature)]
}

/// The answer's code and message (shape unconfirmed, see `unconfirmed::usage_answer_class`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UsageAnswer {
    #[serde(default, alias = "resultCode", skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, alias = "resultMsg")]
    pub error_msg: String,
}

/// What came of one push call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// KooGallery has every record of the batch.
    Taken,
    /// A record of the batch is refused (split to find it; final for it alone).
    RecordFault { code: String, msg: String },
    /// Too many records in one call: split and push the halves.
    Split { code: String, msg: String },
    /// Our key or signing is wrong: hold the records, alert, never dead-letter.
    ConfigFault { code: String, msg: String },
    /// No usable answer: push the same records again later.
    Retry(String),
}

/// Reads an answer into a [`PushOutcome`] (see `unconfirmed::usage_answer_class`).
pub fn read_answer(http_status: u16, body: &[u8]) -> PushOutcome {
    let answer: Option<UsageAnswer> = serde_json::from_slice(body).ok();
    let code = answer.as_ref().and_then(|a| a.error_code.clone());
    let msg = answer.as_ref().map(|a| a.error_msg.clone()).unwrap_or_default();
    let coded = || (code.clone().unwrap_or_else(|| format!("HTTP {http_status}")), msg.clone());
    match usage_answer_class(http_status, code.as_deref(), &msg) {
        UsageAnswerClass::Taken | UsageAnswerClass::AlreadyTaken => PushOutcome::Taken,
        UsageAnswerClass::RecordFault => {
            let (code, msg) = coded();
            PushOutcome::RecordFault { code, msg }
        }
        UsageAnswerClass::Split => {
            let (code, msg) = coded();
            PushOutcome::Split { code, msg }
        }
        UsageAnswerClass::ConfigFault => {
            let (code, msg) = coded();
            PushOutcome::ConfigFault { code, msg }
        }
        UsageAnswerClass::Retry => {
            let text: String = String::from_utf8_lossy(body).chars().take(200).collect();
            PushOutcome::Retry(match code {
                Some(code) => format!("HTTP {http_status}, {code}: {msg}"),
                None => format!("HTTP {http_status}: {text}"),
            })
        }
    }
}

/// A pooled client of the usage API, signing with the seller's access key
/// (`ts`/`nonce`/`signature`) and, when the seller's AK/SK are given, with API
/// Gateway's `SDK-HMAC-SHA256` (`X-Sdk-Date`/`Authorization`) as well: the
/// usage page points to the API Gateway SDK and AK/SK ("Calling APIs Through
/// App Authentication", <https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649083.html>)
/// and its `MKT.0150` speaks of "the AK/SK's ISV" (protocol §10). Both
/// signatures cover the exact bytes sent. When a host cannot be reached the
/// next base URL is tried (the documented fallback host).
#[derive(Clone)]
pub struct UsageApi {
    http: reqwest::Client,
    urls: Vec<reqwest::Url>,
    key: Secret,
    apig: Option<(Secret, Secret)>,
}

/// The outcome of a push and the `host` label of the host that answered (or was tried last).
#[derive(Clone, Debug)]
pub struct Pushed {
    pub outcome: PushOutcome,
    pub host: String,
}

impl UsageApi {
    pub fn new(base: &str, key: Secret, timeout: Duration) -> Result<Self, String> {
        Self::with_fallbacks(base, &[], key, timeout)
    }

    /// `base` first, then each of `fallbacks` when the previous one cannot be reached.
    pub fn with_fallbacks(base: &str, fallbacks: &[String], key: Secret, timeout: Duration) -> Result<Self, String> {
        let urls = super::bases(base, fallbacks)?
            .into_iter()
            .map(|b| b.join(USAGE_PATH).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let http = super::http_client(timeout).map_err(|e| e.to_string())?;
        Ok(Self { http, urls, key, apig: None })
    }

    /// Also sign every push with API Gateway AK/SK signing.
    pub fn with_apig(mut self, ak: Secret, sk: Secret) -> Self {
        self.apig = Some((ak, sk));
        self
    }

    pub fn url(&self) -> &str {
        self.urls.first().map_or("", reqwest::Url::as_str)
    }

    pub fn signs_apig(&self) -> bool {
        self.apig.is_some()
    }

    /// Pushes one batch (at most [`MAX_BATCH`] records).
    pub async fn push(&self, records: &[PushRecord]) -> PushOutcome {
        self.push_on(records).await.outcome
    }

    /// [`Self::push`], with the host that answered.
    pub async fn push_on(&self, records: &[PushRecord]) -> Pushed {
        let body = canonical_body(records);
        let nonce = crate::protocol::nonce();
        let ts_ms = chrono::Utc::now().timestamp_millis();
        let mut unreachable = Vec::new();
        let mut host = String::new();
        for url in &self.urls {
            host = super::host_label(url);
            let mut req = self.http.post(url.clone()).header("content-type", "application/json");
            for (name, value) in signature_headers(self.key.expose(), &body, ts_ms, &nonce) {
                req = req.header(name, value);
            }
            if let Some((ak, sk)) = &self.apig {
                for (name, value) in super::apig_headers("POST", url, body.as_bytes(), ak.expose(), sk.expose()) {
                    req = req.header(name, value);
                }
            }
            let res = match req.body(body.clone()).send().await {
                Ok(res) => res,
                Err(e) => {
                    // Cannot be reached (or no answer in time): the next host, same records, same metering_sn.
                    let error = if e.is_timeout() { "timed out".to_owned() } else { crate::error_chain(&e) };
                    tracing::warn!(%host, %error, "usage push: host cannot be reached; trying the next one");
                    unreachable.push(format!("{host}: {error}"));
                    continue;
                }
            };
            let status = res.status().as_u16();
            let outcome = match res.bytes().await {
                Ok(body) => read_answer(status, &body),
                Err(e) => PushOutcome::Retry(format!("HTTP {status}, body unreadable: {e}")),
            };
            return Pushed { outcome, host };
        }
        let error = if unreachable.len() == 1 && self.urls.len() == 1 {
            unreachable.remove(0).split_once(": ").map(|(_, e)| e.to_owned()).unwrap_or_default()
        } else {
            unreachable.join("; ")
        };
        Pushed { outcome: PushOutcome::Retry(error), host }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sn: &str) -> PushRecord {
        PushRecord {
            instance_id: "7f141bf1-aec8-4859-8323-fb3a8ad50721".into(),
            record_time: "20220809T091000Z".into(),
            begin_time: "20220809T080000Z".into(),
            end_time: "20220809T090000Z".into(),
            usage_value: "99".into(),
            metering_sn: sn.into(),
            relate_pkg_instance: None,
        }
    }

    #[test]
    fn the_body_is_sorted_at_every_level() {
        let body = canonical_body(&[rec("sn-1")]);
        assert_eq!(
            body,
            r#"{"usage_records":[{"begin_time":"20220809T080000Z","end_time":"20220809T090000Z","instance_id":"7f141bf1-aec8-4859-8323-fb3a8ad50721","metering_sn":"sn-1","record_time":"20220809T091000Z","usage_value":"99"}]}"#
        );
    }

    /// Computed with Python's `hmac` and `json.dumps(sort_keys=True)`, not with this crate.
    #[test]
    fn signature_vector_of_an_independent_implementation() {
        let body = canonical_body(&[PushRecord { metering_sn: "sn-0001".into(), ..rec("") }]);
        let headers =
            signature_headers("test-access-key-123", &body, 1_700_000_000_000, "6a3cd1f0e4b24c5e9a8b7c6d5e4f3a2b");
        assert_eq!(headers[0], ("ts", "1700000000000".to_owned()));
        assert_eq!(headers[2], ("signature", "RKm1YDTLgIT4GtjYK+2xm3D3j9RPyKdCpY2AndyzXBw=".to_owned()));
        assert!(crate::protocol::sign::verify_usage_signature(
            "test-access-key-123",
            "1700000000000",
            "6a3cd1f0e4b24c5e9a8b7c6d5e4f3a2b",
            &body,
            "RKm1YDTLgIT4GtjYK+2xm3D3j9RPyKdCpY2AndyzXBw="
        ));
        assert!(!crate::protocol::sign::verify_usage_signature("other", "1700000000000", "n", &body, &headers[2].1));
    }

    #[test]
    fn answers_are_classified_by_the_documented_table() {
        let a = |status, code: &str| {
            read_answer(status, format!(r#"{{"error_code":"{code}","error_msg":"m"}}"#).as_bytes())
        };
        assert_eq!(a(200, "MKT.0000"), PushOutcome::Taken);
        assert_eq!(read_answer(200, br#"{"resultCode":"MKT.0000","resultMsg":"ok"}"#), PushOutcome::Taken);
        assert!(matches!(a(400, "MKT.0102"), PushOutcome::ConfigFault { .. }));
        assert!(matches!(a(401, "MKT.0151"), PushOutcome::ConfigFault { .. }));
        assert!(matches!(a(401, "MKT.0154"), PushOutcome::ConfigFault { .. }));
        assert!(matches!(a(401, "APIGW.0301"), PushOutcome::ConfigFault { .. }));
        for code in ["MKT.0150", "MKT.0100", "MKT.9001", "MKT.9002", "MKT.9004"] {
            let status = if code == "MKT.0150" { 401 } else { 500 };
            assert_eq!(a(status, code), PushOutcome::RecordFault { code: code.into(), msg: "m".into() }, "{code}");
        }
        assert!(matches!(a(500, "MKT.9003"), PushOutcome::Split { .. }));
        assert!(matches!(a(400, "MKT.0101"), PushOutcome::RecordFault { .. }));
        assert_eq!(
            read_answer(400, br#"{"error_code":"MKT.0105","error_msg":"metering_sn already exists"}"#),
            PushOutcome::Taken
        );
        for (status, body) in [
            (500, &br#"{"error_code":"MKT.0999","error_msg":"System internal error"}"#[..]),
            (500, br#"{"error_code":"MKT.9999","error_msg":"System error"}"#),
            (406, br#"{"error_code":"MKT.0250","error_msg":"overlimit"}"#),
            (429, b"slow down"),
            (200, b"<html>"),
            (502, b""),
        ] {
            assert!(matches!(read_answer(status, body), PushOutcome::Retry(_)), "{status}");
        }
    }
}
