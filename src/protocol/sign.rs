//! Signing, the one piece of code behind every KooGallery signature.
//!
//! The server verifies requests and signs answers with it; `replay`, the
//! simulator, the benchmark and the tests sign requests and verify answers
//! with the very same functions, so a mismatch cannot hide in a second copy.
//!
//! Comparison helpers are constant-time (`subtle`): a verifier must never
//! leak how many leading bytes of a guessed signature were right.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 over `parts` concatenated (no copy of the parts is made).
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// V2 request signature (protocol §2), lowercase hex:
/// `hex(HMAC(ak, ak + nonce + timestamp + hex(HMAC(ak, body))))`.
pub fn v2_request_signature(access_key: &str, nonce: &str, timestamp: &str, body: &[u8]) -> String {
    let ak = access_key.as_bytes();
    let payload_digest = hex::encode(hmac_sha256(ak, &[body]));
    hex::encode(hmac_sha256(ak, &[ak, nonce.as_bytes(), timestamp.as_bytes(), payload_digest.as_bytes()]))
}

/// V1 `authToken` (protocol §3): `base64(HMAC(ak + timeStamp, canonical))`
/// where `canonical` is [`v1_canonical_query`] of every parameter but `authToken`.
pub fn v1_auth_token(access_key: &str, time_stamp: &str, canonical: &str) -> String {
    let key = [access_key.as_bytes(), time_stamp.as_bytes()].concat();
    BASE64.encode(hmac_sha256(&key, &[canonical.as_bytes()]))
}

/// The string a V1 `authToken` signs: every parameter except `authToken`,
/// sorted by name in byte order (Java `TreeMap`), joined as `name=value` with `&`.
/// Values are the URL-decoded ones.
pub fn v1_canonical_query<'a, I>(params: I) -> String
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let mut pairs: Vec<(&str, &str)> = params.into_iter().filter(|(name, _)| *name != "authToken").collect();
    pairs.sort_unstable();
    let mut out = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// The `Body-Sign` header value for an answer body (protocol §4).
pub fn body_sign(access_key: &str, body: &[u8]) -> String {
    format!("sign_type=\"HMAC-SHA256\", signature=\"{}\"", BASE64.encode(hmac_sha256(access_key.as_bytes(), &[body])))
}

/// Checks a `Body-Sign` header against a body, in constant time.
/// Used by `replay`, the simulator and the tests: KooGallery's side of §4.
pub fn verify_body_sign(access_key: &str, body: &[u8], header: &str) -> bool {
    constant_time_eq(body_sign(access_key, body).as_bytes(), header.as_bytes())
}

/// Usage push `signature` header (protocol §10):
/// `base64(HMAC-SHA256(accessKey, "ts=<ts>&nonce=<nonce>&body=<canonical body>"))`.
/// The string's exact layout lives in [`super::unconfirmed::usage_string_to_sign`].
pub fn usage_signature(access_key: &str, ts: &str, nonce: &str, canonical_body: &str) -> String {
    let signed = super::unconfirmed::usage_string_to_sign(ts, nonce, canonical_body);
    BASE64.encode(hmac_sha256(access_key.as_bytes(), &[signed.as_bytes()]))
}

/// Checks a usage push `signature` header in constant time (the simulator's side).
pub fn verify_usage_signature(access_key: &str, ts: &str, nonce: &str, canonical_body: &str, header: &str) -> bool {
    constant_time_eq(usage_signature(access_key, ts, nonce, canonical_body).as_bytes(), header.as_bytes())
}

/// Constant-time equality of two byte strings (length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Constant-time comparison of two hex strings, ignoring ASCII case
/// (KooGallery's examples show both cases).
pub fn hex_eq_ignore_case(expected_lower: &str, received: &str) -> bool {
    if expected_lower.len() != received.len() {
        return false;
    }
    let folded: Vec<u8> = received.bytes().map(|b| b.to_ascii_lowercase()).collect();
    bool::from(expected_lower.as_bytes().ct_eq(&folded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_sign_matches_reference_vector() {
        // protocol §9: Body-Sign with key test-access-key-123 over {"resultCode":"000000"}
        assert_eq!(
            body_sign("test-access-key-123", br#"{"resultCode":"000000"}"#),
            r#"sign_type="HMAC-SHA256", signature="JstUS3B3M7yBgHz90CEyfO+kU5r9+04S7Vz2mTGojQY=""#
        );
        assert!(verify_body_sign(
            "test-access-key-123",
            br#"{"resultCode":"000000"}"#,
            r#"sign_type="HMAC-SHA256", signature="JstUS3B3M7yBgHz90CEyfO+kU5r9+04S7Vz2mTGojQY=""#
        ));
        assert!(!verify_body_sign("other", br#"{"resultCode":"000000"}"#, &body_sign("k", b"x")));
    }

    #[test]
    fn v2_signature_is_composed_as_the_reference_says() {
        let (ak, nonce, ts, body) = ("ak", "n0nce", "1700000000000", br#"{"activity":"newInstance"}"#);
        let digest = hex::encode(hmac_sha256(b"ak", &[body]));
        let canonical = format!("{ak}{nonce}{ts}{digest}");
        let expected = hex::encode(hmac_sha256(b"ak", &[canonical.as_bytes()]));
        assert_eq!(v2_request_signature(ak, nonce, ts, body), expected);
        assert_eq!(expected.len(), 64);
        assert!(expected.bytes().all(|b| !b.is_ascii_uppercase()));
    }

    #[test]
    fn v1_canonical_query_sorts_like_a_treemap_and_drops_the_token() {
        let params =
            [("timeStamp", "20200727073711903"), ("activity", "newInstance"), ("authToken", "x"), ("Zeta", "1")];
        // byte order: uppercase before lowercase, as Java's String.compareTo
        assert_eq!(
            v1_canonical_query(params.iter().map(|(k, v)| (*k, *v))),
            "Zeta=1&activity=newInstance&timeStamp=20200727073711903"
        );
    }

    #[test]
    fn v1_token_uses_access_key_plus_timestamp_as_key() {
        let canonical = "activity=newInstance&timeStamp=20200727073711903";
        let expected = BASE64.encode(hmac_sha256(b"ak20200727073711903", &[canonical.as_bytes()]));
        assert_eq!(v1_auth_token("ak", "20200727073711903", canonical), expected);
        assert!(expected.ends_with('='), "standard Base64 with padding");
    }

    #[test]
    fn hex_comparison_ignores_case_only() {
        assert!(hex_eq_ignore_case("abcdef01", "ABCDEF01"));
        assert!(hex_eq_ignore_case("abcdef01", "abcdef01"));
        assert!(!hex_eq_ignore_case("abcdef01", "abcdef02"));
        assert!(!hex_eq_ignore_case("abcdef01", "abcdef0"));
    }
}
