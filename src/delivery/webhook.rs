//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>), used to
//! sign deliveries to the billing core and, in the reference sink, to verify them.
//!
//! `webhook-signature: v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>`
//! where `key` is the Base64 after `whsec_` in the secret.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use crate::protocol::sign::{constant_time_eq, hmac_sha256};

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
