//! Authenticating a KooGallery call (protocol §2 for V2, §3 for V1).
//!
//! Order of checks: the auth parameters are well-formed, the signature
//! matches (constant time), the timestamp is inside the window. The nonce's
//! "seen before" check needs the store and is done atomically there.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::NaiveDateTime;

use super::sign::{constant_time_eq, hex_eq_ignore_case, v1_auth_token, v1_canonical_query, v2_request_signature};
use super::unconfirmed::V2_TIMESTAMP_SECONDS_DIGITS;
use super::Rejection;
use crate::secret::Secret;

/// The access keys a call may be signed with: the current one, and during a
/// rotation the previous one until its grace period ends.
#[derive(Clone, Debug)]
pub struct AccessKeys {
    current: Secret,
    previous: Option<(Secret, Option<i64>)>,
}

impl AccessKeys {
    pub fn new(current: Secret) -> Self {
        Self { current, previous: None }
    }

    /// Also accept `previous` until `until_ms` (UNIX ms; `None` = no end).
    pub fn with_previous(mut self, previous: Secret, until_ms: Option<i64>) -> Self {
        self.previous = Some((previous, until_ms));
        self
    }

    pub fn current(&self) -> &Secret {
        &self.current
    }

    /// The keys to try at `now_ms`, current first.
    fn candidates(&self, now_ms: i64) -> impl Iterator<Item = &Secret> {
        let previous =
            self.previous.as_ref().filter(|(_, until)| until.is_none_or(|until| now_ms <= until)).map(|(key, _)| key);
        std::iter::once(&self.current).chain(previous)
    }

    /// Every key this ring holds, for secret-scrubbing checks.
    pub fn all(&self) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.current).chain(self.previous.as_ref().map(|(k, _)| k))
    }
}

/// A verified V2 call: which key signed it (answers are signed with the same one).
#[derive(Debug)]
pub struct V2Verified<'k> {
    pub key: &'k Secret,
    pub nonce: String,
    pub timestamp_ms: i64,
}

/// Decodes a query string into pairs (`+` is a space, `%XX` decoded).
pub fn parse_query(raw: &str) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    form_urlencoded::parse(raw.as_bytes()).collect()
}

/// Looks up a query parameter that must appear exactly once.
fn single<'q>(pairs: &'q [(Cow<'q, str>, Cow<'q, str>)], name: &'static str) -> Result<&'q str, Rejection> {
    let mut found = pairs.iter().filter(|(k, _)| k == name);
    let first = found.next().ok_or(Rejection::MissingAuthParam(name))?;
    if found.next().is_some() {
        return Err(Rejection::DuplicateAuthParam(name));
    }
    Ok(first.1.as_ref())
}

/// Verifies a V2 call: `signature`, `timestamp`, `nonce` query parameters
/// over the raw body bytes.
pub fn verify_v2<'k>(
    keys: &'k AccessKeys,
    raw_query: &str,
    body: &[u8],
    now_ms: i64,
    window_secs: u64,
) -> Result<V2Verified<'k>, Rejection> {
    let pairs = parse_query(raw_query);
    let signature = single(&pairs, "signature")?;
    let timestamp = single(&pairs, "timestamp")?;
    let nonce = single(&pairs, "nonce")?;

    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Rejection::MalformedSignature);
    }
    if nonce.is_empty() || nonce.len() > 128 || !nonce.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Rejection::MalformedNonce);
    }
    let timestamp_ms = parse_v2_timestamp(timestamp)?;

    let key = keys
        .candidates(now_ms)
        .find(|key| hex_eq_ignore_case(&v2_request_signature(key.expose(), nonce, timestamp, body), signature))
        .ok_or(Rejection::BadSignature)?;
    check_window(timestamp_ms, now_ms, window_secs)?;
    Ok(V2Verified { key, nonce: nonce.to_owned(), timestamp_ms })
}

/// `timestamp`: 13 digits of milliseconds, or 10 digits of seconds.
pub fn parse_v2_timestamp(value: &str) -> Result<i64, Rejection> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::BadTimestamp("timestamp"));
    }
    let n: i64 = value.parse().map_err(|_| Rejection::BadTimestamp("timestamp"))?;
    match value.len() {
        13 => Ok(n),
        V2_TIMESTAMP_SECONDS_DIGITS => Ok(n * 1000),
        _ => Err(Rejection::BadTimestamp("timestamp")),
    }
}

fn check_window(timestamp_ms: i64, now_ms: i64, window_secs: u64) -> Result<(), Rejection> {
    let skew_ms = (now_ms - timestamp_ms).abs();
    let allowed_ms = i64::try_from(window_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    if skew_ms > allowed_ms {
        return Err(Rejection::StaleTimestamp { skew_secs: skew_ms / 1000, allowed_secs: window_secs });
    }
    Ok(())
}

/// A verified V1 call: its parameters (decoded, `authToken` removed) and the key.
#[derive(Debug)]
pub struct V1Verified<'k> {
    pub key: &'k Secret,
    pub params: BTreeMap<String, String>,
    /// The verified `authToken` (a space read back as `+`): the V1 nonce.
    pub auth_token: String,
}

/// Verifies a V1 call: `authToken` over every other parameter, keyed by
/// access key + `timeStamp`.
pub fn verify_v1<'k>(
    keys: &'k AccessKeys,
    raw_query: &str,
    now_ms: i64,
    window_secs: u64,
) -> Result<V1Verified<'k>, Rejection> {
    let pairs = parse_query(raw_query);
    let token = single(&pairs, "authToken")?;
    let time_stamp = single(&pairs, "timeStamp")?;
    // Known quirk: an unescaped '+' in the token arrives as a space.
    let token = token.replace(' ', "+");
    if token.len() != 44 || !token.ends_with('=') {
        return Err(Rejection::MalformedSignature);
    }
    let timestamp_ms = parse_v1_timestamp(time_stamp)?;

    let mut params = BTreeMap::new();
    for (name, value) in &pairs {
        if name == "authToken" {
            continue;
        }
        if params.insert(name.to_string(), value.to_string()).is_some() {
            return Err(Rejection::DuplicateParam(name.to_string()));
        }
    }
    let canonical = v1_canonical_query(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let key = keys
        .candidates(now_ms)
        .find(|key| constant_time_eq(v1_auth_token(key.expose(), time_stamp, &canonical).as_bytes(), token.as_bytes()))
        .ok_or(Rejection::BadSignature)?;
    check_window(timestamp_ms, now_ms, window_secs)?;
    Ok(V1Verified { key, params, auth_token: token })
}

/// `timeStamp`: UTC `yyyyMMddHHmmssSSS`.
pub fn parse_v1_timestamp(value: &str) -> Result<i64, Rejection> {
    let bad = Rejection::BadTimestamp("timeStamp");
    if value.len() != 17 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    let seconds = NaiveDateTime::parse_from_str(&value[..14], "%Y%m%d%H%M%S").map_err(|_| bad.clone())?;
    let millis: i64 = value[14..].parse().map_err(|_| bad)?;
    Ok(seconds.and_utc().timestamp_millis() + millis)
}

/// Formats a UNIX ms time as a V1 `timeStamp`.
pub fn format_v1_timestamp(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().format("%Y%m%d%H%M%S%3f").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::sign::v2_request_signature;

    const NOW: i64 = 1_700_000_000_000;

    fn keys() -> AccessKeys {
        AccessKeys::new(Secret::new("test-access-key-123"))
    }
    static KEYS: std::sync::LazyLock<AccessKeys> = std::sync::LazyLock::new(keys);

    fn v2_query(sig: &str, ts: &str, nonce: &str) -> String {
        format!("signature={sig}&timestamp={ts}&nonce={nonce}")
    }

    #[test]
    fn v2_accepts_a_good_call_in_either_hex_case() {
        let body = br#"{"activity":"newInstance"}"#;
        let sig = v2_request_signature("test-access-key-123", "abcd1234abcd1234", "1700000000000", body);
        let ok = verify_v2(&KEYS, &v2_query(&sig, "1700000000000", "abcd1234abcd1234"), body, NOW, 60).unwrap();
        assert_eq!(ok.nonce, "abcd1234abcd1234");
        assert_eq!(ok.timestamp_ms, NOW);
        let upper = sig.to_ascii_uppercase();
        assert!(verify_v2(&keys(), &v2_query(&upper, "1700000000000", "abcd1234abcd1234"), body, NOW, 60).is_ok());
    }

    #[test]
    fn v2_rejections_name_their_reason() {
        let body = b"{}";
        let ts = "1700000000000";
        let sig = v2_request_signature("test-access-key-123", "n1", ts, body);
        let q = |s: &str| verify_v2(&keys(), s, body, NOW, 60).unwrap_err();
        assert_eq!(q(&format!("timestamp={ts}&nonce=n1")), Rejection::MissingAuthParam("signature"));
        assert_eq!(q(&format!("signature={sig}&nonce=n1")), Rejection::MissingAuthParam("timestamp"));
        assert_eq!(q(&format!("{}&nonce=n2", v2_query(&sig, ts, "n1"))), Rejection::DuplicateAuthParam("nonce"));
        assert_eq!(q(&v2_query(&sig[..63], ts, "n1")), Rejection::MalformedSignature);
        assert_eq!(q(&v2_query(&"zz".repeat(32), ts, "n1")), Rejection::MalformedSignature);
        assert_eq!(q(&v2_query(&sig, "17000000000x0", "n1")), Rejection::BadTimestamp("timestamp"));
        assert_eq!(q(&v2_query(&sig, ts, "n2")), Rejection::BadSignature);
        assert_eq!(q(&v2_query(&sig, ts, "")), Rejection::MalformedNonce);
        // body changed by one byte
        assert_eq!(
            verify_v2(&keys(), &v2_query(&sig, ts, "n1"), b"{ }", NOW, 60).unwrap_err(),
            Rejection::BadSignature
        );
    }

    #[test]
    fn v2_timestamp_window_edges() {
        let body = b"{}";
        for (offset_ms, ok) in [(60_000, true), (-60_000, true), (60_001, false), (-61_000, false)] {
            let ts = (NOW + offset_ms).to_string();
            let sig = v2_request_signature("test-access-key-123", "n", &ts, body);
            let got = verify_v2(&KEYS, &v2_query(&sig, &ts, "n"), body, NOW, 60);
            assert_eq!(got.is_ok(), ok, "offset {offset_ms}: {got:?}");
            if !ok {
                assert!(matches!(got.unwrap_err(), Rejection::StaleTimestamp { allowed_secs: 60, .. }));
            }
        }
        // 10 digits are seconds
        let sig = v2_request_signature("test-access-key-123", "n", "1700000000", body);
        assert_eq!(verify_v2(&keys(), &v2_query(&sig, "1700000000", "n"), body, NOW, 60).unwrap().timestamp_ms, NOW);
    }

    #[test]
    fn v2_previous_key_is_accepted_only_during_its_grace() {
        let body = b"{}";
        let ts = "1700000000000";
        let sig = v2_request_signature("old-key", "n", ts, body);
        let ring = AccessKeys::new(Secret::new("new-key")).with_previous(Secret::new("old-key"), Some(NOW));
        assert_eq!(verify_v2(&ring, &v2_query(&sig, ts, "n"), body, NOW, 60).unwrap().key.expose(), "old-key");
        let expired = AccessKeys::new(Secret::new("new-key")).with_previous(Secret::new("old-key"), Some(NOW - 1));
        assert_eq!(verify_v2(&expired, &v2_query(&sig, ts, "n"), body, NOW, 60).unwrap_err(), Rejection::BadSignature);
    }

    fn v1_query(params: &[(&str, &str)], key: &str) -> String {
        let ts = params.iter().find(|(k, _)| *k == "timeStamp").map(|(_, v)| *v).unwrap();
        let canonical = v1_canonical_query(params.iter().copied());
        let token = v1_auth_token(key, ts, &canonical);
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in params {
            ser.append_pair(k, v);
        }
        ser.append_pair("authToken", &token);
        ser.finish()
    }

    #[test]
    fn v1_accepts_a_good_call_and_the_plus_became_space_quirk() {
        let ts = format_v1_timestamp(NOW);
        assert_eq!(ts, "20231114221320000");
        let params = [
            ("activity", "newInstance"),
            ("orderId", "CS1906666666ABCDE"),
            ("timeStamp", ts.as_str()),
            ("testFlag", "1"),
        ];
        let query = v1_query(&params, "test-access-key-123");
        let ok = verify_v1(&KEYS, &query, NOW, 60).unwrap();
        assert_eq!(ok.params.get("orderId").map(String::as_str), Some("CS1906666666ABCDE"));
        assert!(!ok.params.contains_key("authToken"));

        // Find a timestamp whose token contains '+', send it unescaped.
        let mut found = false;
        for ms in 0..500 {
            let ts = format_v1_timestamp(NOW + ms);
            let params = [("activity", "newInstance"), ("orderId", "X"), ("timeStamp", ts.as_str())];
            let token = v1_auth_token("test-access-key-123", &ts, &v1_canonical_query(params.iter().copied()));
            if token.contains('+') {
                let raw = format!("activity=newInstance&orderId=X&timeStamp={ts}&authToken={token}");
                assert!(verify_v1(&keys(), &raw, NOW, 60).is_ok(), "{raw}");
                found = true;
                break;
            }
        }
        assert!(found, "no token with '+' in 500 tries");
    }

    #[test]
    fn v1_rejections() {
        let ts = format_v1_timestamp(NOW);
        let params = [("activity", "newInstance"), ("orderId", "A"), ("timeStamp", ts.as_str())];
        let good = v1_query(&params, "test-access-key-123");
        let err = |q: &str| verify_v1(&keys(), q, NOW, 60).unwrap_err();
        assert_eq!(err(&good.replace("orderId=A", "orderId=B")), Rejection::BadSignature);
        assert_eq!(err(&format!("{good}&orderId=A")), Rejection::DuplicateParam("orderId".into()));
        assert_eq!(err("activity=x&timeStamp=20231114221320000"), Rejection::MissingAuthParam("authToken"));
        assert_eq!(err(&format!("timeStamp={ts}&authToken=abc")), Rejection::MalformedSignature);
        let stale = format_v1_timestamp(NOW - 61_000);
        let q = v1_query(&[("activity", "newInstance"), ("timeStamp", stale.as_str())], "test-access-key-123");
        assert!(matches!(err(&q), Rejection::StaleTimestamp { .. }));
        assert_eq!(parse_v1_timestamp("20231399221320000"), Err(Rejection::BadTimestamp("timeStamp")));
    }
}
