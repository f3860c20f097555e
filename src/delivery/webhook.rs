//! The billing-core target: [`WebhookSink`] POSTs each event as JSON, signed
//! with [Standard Webhooks](https://www.standardwebhooks.com/) signatures
//! (the reference sink, `tools::sink`, verifies them with [`verify`]).
//!
//! `webhook-signature: v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>`
//! where `key` is the Base64 after `whsec_` in the secret.
//!
//! An answer is classified by [`classify`]: 2xx delivered; 4xx other than
//! 408/429 permanent (dead-lettered at once); anything else, timeouts and
//! refused connections transient (retried, honouring `Retry-After` seconds).
//! Each answer's status and the first KiB of its body go into the attempt log
//! (read no further than that, within the attempt's timeout).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use super::sink::{excerpt, Answer, Message, Report, Sink, SinkError, RESPONSE_EXCERPT_MAX};
use crate::protocol::sign::{constant_time_eq, hmac_sha256};

/// The billing core over HTTP (`KOOGATE_BILLING_URL`), signing with the key of
/// `KOOGATE_BILLING_SECRET`.
pub struct WebhookSink {
    /// Parsed once, by the configuration: a `&str` would be parsed again by
    /// every request (3.5 % of the delivery thread's samples while draining a
    /// backlog).
    url: reqwest::Url,
    key: Vec<u8>,
    http: reqwest::Client,
}

impl WebhookSink {
    /// `timeout` bounds each attempt (`KOOGATE_DELIVERY_TIMEOUT_SECS`); connecting
    /// gets at most 5 s of it.
    pub fn new(url: reqwest::Url, key: Vec<u8>, timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("koogate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { url, key, http })
    }
}

#[async_trait::async_trait]
impl Sink for WebhookSink {
    fn name(&self) -> String {
        self.url.to_string()
    }

    async fn send(&self, message: &Message<'_>) -> Report {
        let ts = chrono::Utc::now().timestamp();
        let signature = sign(&self.key, message.id, ts, message.body);
        let sent = self
            .http
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", message.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(message.body.to_vec())
            .send()
            .await;
        let mut res = match sent {
            Ok(res) => res,
            Err(e) if e.is_timeout() => return Err(SinkError::transient("timed out")).into(),
            Err(e) => return Err(SinkError::transient(format!("request failed: {}", crate::error_chain(&e)))).into(),
        };
        let status = res.status().as_u16();
        let retry_after = res.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let result = classify(status, retry_after.as_deref());
        // The answer's start, for the attempt log: a body that cannot be read
        // (cut off, timed out) keeps what arrived and changes no verdict.
        let mut body = Vec::new();
        while body.len() < RESPONSE_EXCERPT_MAX {
            match res.chunk().await {
                Ok(Some(chunk)) => {
                    // Keep one byte past the limit: enough to know the body was cut.
                    let room = (RESPONSE_EXCERPT_MAX + 1).saturating_sub(body.len());
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
        Report::answered(result, Answer { status, body: excerpt(&body) })
    }
}

/// What the billing core's answer means: 2xx delivered; 4xx other than 408
/// and 429 a permanent refusal; anything else (5xx, 408, 429, 1xx, 3xx)
/// worth retrying, after `Retry-After` when it gives whole seconds.
pub fn classify(status: u16, retry_after: Option<&str>) -> Result<(), SinkError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let message = format!("billing core answered HTTP {status}");
    if (400..500).contains(&status) && status != 408 && status != 429 {
        Err(SinkError::Permanent(message))
    } else {
        let retry_after = retry_after.and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
        Err(SinkError::Transient { message, retry_after })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("secret must be whsec_ followed by Base64")]
    BadSecret,
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not a number")]
    BadTimestamp,
    #[error("webhook-timestamp is {0} s away from now")]
    StaleTimestamp(i64),
    #[error("no signature matches")]
    NoMatch,
}

/// The signing key of a `whsec_…` secret.
pub fn key_of(secret: &str) -> Result<Vec<u8>, SignatureError> {
    let b64 = secret.strip_prefix("whsec_").ok_or(SignatureError::BadSecret)?;
    BASE64.decode(b64).ok().filter(|k| !k.is_empty()).ok_or(SignatureError::BadSecret)
}

/// The `webhook-signature` value for one message.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let mac = hmac_sha256(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    format!("v1,{}", BASE64.encode(mac))
}

/// Verifies a message: the timestamp within `tolerance_secs` of `now_secs`
/// and one of the space-separated `v1,` signatures matching (constant time).
pub fn verify(
    key: &[u8],
    id: Option<&str>,
    timestamp: Option<&str>,
    signatures: Option<&str>,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let id = id.ok_or(SignatureError::MissingHeader("webhook-id"))?;
    let ts = timestamp.ok_or(SignatureError::MissingHeader("webhook-timestamp"))?;
    let signatures = signatures.ok_or(SignatureError::MissingHeader("webhook-signature"))?;
    let ts: i64 = ts.trim().parse().map_err(|_| SignatureError::BadTimestamp)?;
    if (now_secs - ts).abs() > tolerance_secs {
        return Err(SignatureError::StaleTimestamp(now_secs - ts));
    }
    let expected = sign(key, id, ts, body);
    let ok = signatures
        .split(' ')
        .filter(|s| s.starts_with("v1,"))
        .any(|s| constant_time_eq(s.as_bytes(), expected.as_bytes()));
    if ok {
        Ok(())
    } else {
        Err(SignatureError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_as_before() {
        for ok in [200, 201, 202, 204, 299] {
            assert_eq!(classify(ok, None), Ok(()), "{ok}");
            assert_eq!(classify(ok, Some("30")), Ok(()), "{ok}");
        }
        for refused in [400, 401, 403, 404, 409, 410, 413, 422, 499] {
            let got = classify(refused, Some("30"));
            assert_eq!(got, Err(SinkError::Permanent(format!("billing core answered HTTP {refused}"))), "{refused}");
            assert!(got.is_err_and(|e| e.is_permanent()));
        }
        for retried in [408, 429, 500, 502, 503, 504, 599, 100, 301, 304] {
            let got = classify(retried, None);
            let message = format!("billing core answered HTTP {retried}");
            assert_eq!(got, Err(SinkError::Transient { message: message.clone(), retry_after: None }), "{retried}");
            // The text the dead letter keeps and the log shows.
            assert_eq!(got.unwrap_err().to_string(), message);
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_or_nothing() {
        let after = |v: &str| match classify(503, Some(v)) {
            Err(SinkError::Transient { retry_after, .. }) => retry_after,
            other => panic!("{other:?}"),
        };
        assert_eq!(after("30"), Some(Duration::from_secs(30)));
        assert_eq!(after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(after("0"), Some(Duration::ZERO));
        assert_eq!(after("Wed, 21 Oct 2015 07:28:00 GMT"), None, "HTTP dates are not honoured");
        assert_eq!(after("-1"), None);
        assert_eq!(after("1.5"), None);
        assert_eq!(after(""), None);
        assert!(
            matches!(classify(429, Some("2")), Err(SinkError::Transient { retry_after: Some(d), .. }) if d == Duration::from_secs(2))
        );
    }

    /// The example of the Standard Webhooks specification.
    #[test]
    fn matches_the_specification_example() {
        let key = key_of("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let ok = verify(
            &key,
            Some("msg_p5jXN8AQM9LWM0D4loKWxJek"),
            Some("1614265330"),
            Some(&format!("v1,bogus {sig}")),
            body,
            1614265330,
            300,
        );
        assert_eq!(ok, Ok(()));
    }

    #[test]
    fn refusals() {
        let key = key_of("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(&key, "id", 100, b"{}");
        assert_eq!(
            verify(&key, None, Some("100"), Some(&sig), b"{}", 100, 300),
            Err(SignatureError::MissingHeader("webhook-id"))
        );
        assert_eq!(verify(&key, Some("id"), Some("100"), Some(&sig), b"{ }", 100, 300), Err(SignatureError::NoMatch));
        assert_eq!(verify(&key, Some("id2"), Some("100"), Some(&sig), b"{}", 100, 300), Err(SignatureError::NoMatch));
        assert_eq!(
            verify(&key, Some("id"), Some("100"), Some(&sig), b"{}", 500, 300),
            Err(SignatureError::StaleTimestamp(400))
        );
        assert_eq!(verify(&key, Some("id"), Some("x"), Some(&sig), b"{}", 100, 300), Err(SignatureError::BadTimestamp));
        assert_eq!(key_of("nope"), Err(SignatureError::BadSecret));
    }
}
