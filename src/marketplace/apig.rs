//! Huawei Cloud API Gateway AK/SK signing (`SDK-HMAC-SHA256`), used by every
//! call koogate makes to KooGallery, and verified by the simulator exactly
//! as API Gateway would.
//!
//! ```text
//! CanonicalRequest = METHOD \n CanonicalURI \n CanonicalQueryString \n CanonicalHeaders \n SignedHeaders \n hex(sha256(body))
//! StringToSign     = "SDK-HMAC-SHA256" \n X-Sdk-Date \n hex(sha256(CanonicalRequest))
//! Signature        = hex(HMAC-SHA256(SK, StringToSign))
//! Authorization: SDK-HMAC-SHA256 Access=<AK>, SignedHeaders=<SignedHeaders>, Signature=<Signature>
//! ```

use chrono::{DateTime, NaiveDateTime, Utc};
use sha2::{Digest, Sha256};

use crate::protocol::sign::{constant_time_eq, hmac_sha256};

pub const ALGORITHM: &str = "SDK-HMAC-SHA256";
/// `X-Sdk-Date` format: UTC `YYYYMMDDTHHMMSSZ`.
pub const DATE_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// RFC 3986 percent-encoding: unreserved characters kept, `%XX` uppercase.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn canonical_uri(path: &str) -> String {
    let mut out: String = path.split('/').map(|seg| enc(&percent_decode(seg))).collect::<Vec<_>>().join("/");
    if !out.ends_with('/') {
        out.push('/');
    }
    out
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = query.iter().map(|(k, v)| (enc(k), enc(v))).collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// A request as the signer sees it. `headers` are the headers to sign
/// (must include `host` and `x-sdk-date`); `query` is decoded.
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a [(String, String)],
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

impl Request<'_> {
    /// `(canonical request, signed headers)`.
    pub fn canonical(&self) -> (String, String) {
        let mut headers: Vec<(String, String)> =
            self.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned())).collect();
        headers.sort();
        let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let signed: String = headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(";");
        let canonical = format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            self.method.to_ascii_uppercase(),
            canonical_uri(self.path),
            canonical_query(self.query),
            canonical_headers,
            signed,
            hex::encode(Sha256::digest(self.body))
        );
        (canonical, signed)
    }

    fn date(&self) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("x-sdk-date")).map(|(_, v)| v.as_str())
    }

    /// The hex signature with `sk`.
    pub fn signature(&self, sk: &str) -> String {
        let (canonical, _) = self.canonical();
        let string_to_sign = format!(
            "{ALGORITHM}\n{}\n{}",
            self.date().unwrap_or(""),
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        hex::encode(hmac_sha256(sk.as_bytes(), &[string_to_sign.as_bytes()]))
    }

    /// The `Authorization` header value.
    pub fn authorization(&self, ak: &str, sk: &str) -> String {
        let (_, signed) = self.canonical();
        format!("{ALGORITHM} Access={ak}, SignedHeaders={signed}, Signature={}", self.signature(sk))
    }
}

/// The parts of an `Authorization` header.
#[derive(Debug, PartialEq, Eq)]
pub struct Authorization {
    pub access: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

pub fn parse_authorization(value: &str) -> Option<Authorization> {
    let rest = value.strip_prefix(ALGORITHM)?.trim();
    let mut access = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k {
            "Access" => access = Some(v.to_owned()),
            "SignedHeaders" => signed = Some(v.split(';').map(str::to_owned).collect()),
            "Signature" => signature = Some(v.to_owned()),
            _ => {}
        }
    }
    Some(Authorization { access: access?, signed_headers: signed?, signature: signature? })
}

/// Why API Gateway would refuse a request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("Authorization header missing or malformed")]
    Malformed,
    #[error("unknown access key")]
    UnknownAccessKey,
    #[error("X-Sdk-Date missing, malformed, or more than 15 minutes away")]
    StaleDate,
    #[error("signed headers must include host and x-sdk-date")]
    MissingSignedHeader,
    #[error("signature does not match")]
    BadSignature,
}

/// Parses `X-Sdk-Date`.
pub fn parse_date(value: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(value, DATE_FORMAT).ok().map(|t| t.and_utc())
}

/// Verifies a request as API Gateway does: the date within 15 minutes, the
/// signature over the headers the client says it signed. `received` carries
/// every header that arrived.
pub fn verify(
    authorization: Option<&str>,
    lookup_sk: impl Fn(&str) -> Option<String>,
    received: &Request<'_>,
    now: DateTime<Utc>,
) -> Result<(), VerifyError> {
    let Request { method, path, query, headers: all_headers, body } = *received;
    let auth = authorization.and_then(parse_authorization).ok_or(VerifyError::Malformed)?;
    let sk = lookup_sk(&auth.access).ok_or(VerifyError::UnknownAccessKey)?;
    if !auth.signed_headers.iter().any(|h| h == "host") || !auth.signed_headers.iter().any(|h| h == "x-sdk-date") {
        return Err(VerifyError::MissingSignedHeader);
    }
    let headers: Vec<(String, String)> = auth
        .signed_headers
        .iter()
        .map(|name| {
            let value = all_headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
            value.map(|v| (name.clone(), v)).ok_or(VerifyError::MissingSignedHeader)
        })
        .collect::<Result<_, _>>()?;
    let date = headers
        .iter()
        .find(|(k, _)| k == "x-sdk-date")
        .and_then(|(_, v)| parse_date(v))
        .ok_or(VerifyError::StaleDate)?;
    if (now - date).num_seconds().abs() > 15 * 60 {
        return Err(VerifyError::StaleDate);
    }
    let expected = Request { method, path, query, headers: &headers, body }.signature(&sk);
    if constant_time_eq(expected.as_bytes(), auth.signature.as_bytes()) {
        Ok(())
    } else {
        Err(VerifyError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Huawei's signing guide vector.
    #[test]
    fn matches_the_signing_guide_vector() {
        let query = h(&[("limit", "2"), ("marker", "13551d6b-755d-4757-b956-536f674975c0")]);
        let headers = h(&[
            ("Content-Type", "application/json"),
            ("Host", "service.region.example.com"),
            ("X-Sdk-Date", "20191115T033655Z"),
        ]);
        let req = Request {
            method: "GET",
            path: "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs",
            query: &query,
            headers: &headers,
            body: b"",
        };
        let (canonical, signed) = req.canonical();
        assert_eq!(
            hex::encode(Sha256::digest(canonical.as_bytes())),
            "b25362e603ee30f4f25e7858e8a7160fd36e803bb2dfe206278659d71a9bcd7a"
        );
        assert_eq!(signed, "content-type;host;x-sdk-date");
        assert_eq!(
            req.signature("MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc"),
            "7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"
        );
        assert_eq!(
            req.authorization("QTWAOYTTINDUT2QVKYUC", "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc"),
            "SDK-HMAC-SHA256 Access=QTWAOYTTINDUT2QVKYUC, SignedHeaders=content-type;host;x-sdk-date, Signature=7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"
        );
    }

    /// The second published vector (a KooGallery API, with x-stage).
    #[test]
    fn matches_the_koogallery_vector() {
        let headers = h(&[
            ("x-stage", "RELEASE"),
            ("X-Sdk-Date", "20240317T144237Z"),
            ("Content-Type", "application/json"),
            ("Host", "mkt.myhuaweicloud.com"),
        ]);
        let req = Request {
            method: "POST",
            path: "/api/mkp-openapi-public/global/v1/license/activate",
            query: &[],
            headers: &headers,
            body: b"",
        };
        assert_eq!(req.canonical().1, "content-type;host;x-sdk-date;x-stage");
        assert_eq!(req.signature("123"), "77595ad624b6e4e49990b8c4e84bf1c287457fca61069c4e60b9b6765b52053d");
    }

    #[test]
    fn canonical_parts_follow_the_rules() {
        assert_eq!(canonical_uri("/a b/c%2Fd"), "/a%20b/c%2Fd/");
        assert_eq!(canonical_uri("/x/"), "/x/");
        assert_eq!(canonical_query(&h(&[("b", "2 3"), ("a", "z"), ("a", "y")])), "a=y&a=z&b=2%203");
    }

    #[test]
    fn verification_refuses_what_api_gateway_refuses() {
        let now = parse_date("20241121T090846Z").unwrap();
        let headers =
            h(&[("Host", "127.0.0.1:1"), ("X-Sdk-Date", "20241121T090846Z"), ("content-type", "application/json")]);
        let query = h(&[("orderId", "MOCKPERIODYEARNEW")]);
        let req = Request { method: "GET", path: "/api/x", query: &query, headers: &headers, body: b"" };
        let auth = req.authorization("AK1", "SK1");
        let sk = |ak: &str| (ak == "AK1").then(|| "SK1".to_owned());
        let check = |auth: &str, now| verify(Some(auth), sk, &req, now);
        assert_eq!(check(&auth, now), Ok(()));
        assert_eq!(check(&auth.replace("AK1", "AK2"), now), Err(VerifyError::UnknownAccessKey));
        assert_eq!(check(&auth, now + chrono::Duration::minutes(16)), Err(VerifyError::StaleDate));
        let other = Request { method: "GET", path: "/api/x", query: &query, headers: &headers, body: b"" }
            .authorization("AK1", "SK2");
        assert_eq!(check(&other, now), Err(VerifyError::BadSignature));
        assert_eq!(check("Bearer x", now), Err(VerifyError::Malformed));
    }
}
