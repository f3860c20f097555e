//! A programmable KooGallery usage API for usage push tests: real HTTP on
//! loopback, its own signature check (not koogate's code), deduplication by
//! metering_sn, and a decision per call.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use serde_json::Value;
use tokio::net::TcpListener;

use super::AK;

/// How to answer one call.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    /// Keep the call's records (a 200 that got lost on the way back keeps them too).
    pub store: bool,
    /// Wait this long before answering (after storing).
    pub delay: Duration,
}

pub fn taken() -> Reply {
    Reply {
        status: 200,
        body: r#"{"error_code":"MKT.0000","error_msg":"Success"}"#.into(),
        store: true,
        delay: Duration::ZERO,
    }
}

/// `500 MKT.0999` "System internal error" (documented): retried.
pub fn failing() -> Reply {
    fault(500, "MKT.0999", "System internal error.")
}

/// `500 MKT.0100` input validation (documented: a record fault sent with HTTP 500).
pub fn refused(msg: &str) -> Reply {
    fault(500, "MKT.0100", msg)
}

/// Any documented error answer; nothing of the call is kept.
pub fn fault(status: u16, code: &str, msg: &str) -> Reply {
    let body = serde_json::json!({"error_code": code, "error_msg": msg}).to_string();
    Reply { status, body, store: false, delay: Duration::ZERO }
}

/// Decides a call: (call number from 1, its records).
pub type Decide = dyn Fn(u32, &[Value]) -> Reply + Send + Sync;

/// One call as the API saw it.
#[derive(Clone, Debug)]
pub struct Call {
    pub at: Instant,
    pub signature_ok: bool,
    /// The API Gateway signature: None when not sent, else whether it verified.
    pub apig: Option<bool>,
    pub sorted: bool,
    pub sns: Vec<String>,
    pub status: u16,
    /// The `error_code` answered.
    pub code: String,
}

#[derive(Default)]
pub struct Seen {
    pub calls: Vec<Call>,
    /// Stored records by metering_sn: the record and how many times it arrived in a stored call.
    pub records: BTreeMap<String, (Value, u32)>,
}

pub struct UsageApi {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

/// JSON with object keys sorted at every level, written by hand (independent of koogate).
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> =
                keys.iter().map(|k| format!("{}:{}", Value::String((*k).clone()), canonical(&m[*k]))).collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(canonical).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// Independent check of the `signature` header.
pub fn signature_ok(headers: &hyper::HeaderMap, canonical_body: &str) -> bool {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (ts, nonce, sig) = (get("ts"), get("nonce"), get("signature"));
    let fresh = ts.parse::<i64>().is_ok_and(|t| (chrono::Utc::now().timestamp_millis() - t).abs() < 300_000);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(AK.as_bytes()).unwrap();
    mac.update(format!("ts={ts}&nonce={nonce}&body={canonical_body}").as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    fresh && !nonce.is_empty() && sig == expected
}

/// The seller's Huawei Cloud AK/SK the stand-in's API Gateway knows.
pub const APIG_AK: &str = "usage-test-ak";
pub const APIG_SK: &str = "usage-test-sk";

/// Independent check of an API Gateway `SDK-HMAC-SHA256` signature over a
/// POST to `path` with `body` (the bytes as received): None when no
/// `Authorization` header was sent.
pub fn apig_ok(headers: &hyper::HeaderMap, path: &str, body: &[u8]) -> Option<bool> {
    use sha2::Digest;
    let auth = headers.get("authorization")?.to_str().ok()?.to_owned();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let part = |name: &str| {
        auth.split([' ', ','])
            .find_map(|p| p.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .unwrap_or("")
            .to_owned()
    };
    let (access, signed, signature) = (part("Access"), part("SignedHeaders"), part("Signature"));
    let value = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").trim().to_owned();
    let names: Vec<&str> = signed.split(';').collect();
    let canonical_headers: String = names
        .iter()
        .map(|n| {
            format!(
                "{n}:{}
",
                value(n)
            )
        })
        .collect();
    let canonical = format!(
        "POST
{path}/

{canonical_headers}
{signed}
{}",
        hex(&sha2::Sha256::digest(body))
    );
    let date = value("x-sdk-date");
    let to_sign = format!(
        "SDK-HMAC-SHA256
{date}
{}",
        hex(&sha2::Sha256::digest(canonical.as_bytes()))
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(APIG_SK.as_bytes()).unwrap();
    mac.update(to_sign.as_bytes());
    let expected = hex(&mac.finalize().into_bytes());
    Some(
        auth.starts_with("SDK-HMAC-SHA256 ")
            && access == APIG_AK
            && names.contains(&"host")
            && names.contains(&"x-sdk-date")
            && signature == expected,
    )
}

/// A number in units of 0.0001 (test-side parse).
pub fn e4(value: &str) -> i64 {
    let (int, frac) = value.split_once('.').unwrap_or((value, ""));
    let frac = format!("{frac:0<4}");
    int.parse::<i64>().unwrap() * 10_000 + frac.parse::<i64>().unwrap()
}

impl UsageApi {
    pub async fn start(decide: impl Fn(u32, &[Value]) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let decide: Arc<Decide> = Arc::new(decide);
        let (s, d) = (Arc::clone(&seen), decide);
        let task = super::serve_http(listener, move |req: Request<hyper::body::Incoming>| {
            let (s, d) = (Arc::clone(&s), Arc::clone(&d));
            async move {
                let at = Instant::now();
                let path_ok = req.uri().path() == "/api/mkp-openapi-public/global/v1/isv/usage-data";
                if !path_ok {
                    let mut res = Response::new(Full::new(Bytes::from(r#"{"error_code":"APIGW.0101"}"#)));
                    *res.status_mut() = hyper::StatusCode::NOT_FOUND;
                    return res;
                }
                let path = req.uri().path().to_owned();
                let headers = req.headers().clone();
                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let apig = apig_ok(&headers, &path, &body);
                let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let canon = canonical(&parsed);
                let sorted = canon.as_bytes() == &body[..];
                let sig = path_ok && signature_ok(&headers, &canon);
                let records: Vec<Value> = parsed["usage_records"].as_array().cloned().unwrap_or_default();
                let sns: Vec<String> =
                    records.iter().map(|r| r["metering_sn"].as_str().unwrap_or("").to_owned()).collect();
                let reply = {
                    let mut seen = s.lock().unwrap();
                    let n = seen.calls.len() as u32 + 1;
                    // API Gateway checks its signature (when sent) before KooGallery sees the call.
                    let reply = if apig == Some(false) {
                        fault(401, "APIGW.0301", "Incorrect IAM authentication information: verify aksk signature fail")
                    } else if sig && sorted {
                        d(n, &records)
                    } else {
                        fault(400, "MKT.0102", "Invalid body sign")
                    };
                    if reply.store {
                        for (sn, r) in sns.iter().zip(&records) {
                            seen.records.entry(sn.clone()).or_insert_with(|| (r.clone(), 0)).1 += 1;
                        }
                    }
                    let code = serde_json::from_str::<Value>(&reply.body)
                        .ok()
                        .and_then(|v| v["error_code"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    seen.calls.push(Call { at, signature_ok: sig, apig, sorted, sns, status: reply.status, code });
                    reply
                };
                tokio::time::sleep(reply.delay).await;
                let mut res = Response::new(Full::new(Bytes::from(reply.body)));
                *res.status_mut() = hyper::StatusCode::from_u16(reply.status).unwrap();
                res
            }
        });
        Self { addr, seen, task }
    }

    /// The base URL to give as KOOGATE_MARKETPLACE_URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.seen.lock().unwrap().calls.clone()
    }

    /// Stored records: metering_sn → (record, times it arrived in a stored call).
    pub fn records(&self) -> BTreeMap<String, (Value, u32)> {
        self.seen.lock().unwrap().records.clone()
    }

    /// Sum of stored usage per instance, in units of 0.0001 (each metering_sn once).
    pub fn totals(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for (r, _) in self.records().values() {
            *out.entry(r["instance_id"].as_str().unwrap().to_owned()).or_insert(0) +=
                e4(r["usage_value"].as_str().unwrap());
        }
        out
    }

    /// Waits until `n` distinct records are stored.
    pub async fn wait_records(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let have = self.records().len();
            if have >= n {
                return;
            }
            assert!(Instant::now() < deadline, "only {have} of {n} usage records reached KooGallery");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn stop(self) {
        self.task.abort();
    }
}
