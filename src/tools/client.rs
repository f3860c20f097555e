//! Calling a gateway as KooGallery does: signed V2 and V1 requests.
//!
//! Used by `replay`, the simulator, the benchmark and the tests, with the
//! same signer as the server ([`crate::protocol::sign`]).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::CONTENT_TYPE;
use hyper::Method;

use crate::protocol::sign::{v1_auth_token, v1_canonical_query, v2_request_signature};
use crate::protocol::verify::format_v1_timestamp;

pub use crate::protocol::nonce;

/// The query string of a V2 call: `signature`, `timestamp` (ms), `nonce`.
pub fn v2_query(access_key: &str, body: &[u8], timestamp_ms: i64, nonce: &str) -> String {
    let ts = timestamp_ms.to_string();
    let signature = v2_request_signature(access_key, nonce, &ts, body);
    form_urlencoded::Serializer::new(String::new())
        .append_pair("signature", &signature)
        .append_pair("timestamp", &ts)
        .append_pair("nonce", nonce)
        .finish()
}

/// The query string of a V1 call: `params` plus `timeStamp` and `authToken`,
/// percent-encoded (so a `+` in the token travels as `%2B`).
pub fn v1_query(access_key: &str, params: &BTreeMap<String, String>, timestamp_ms: i64) -> String {
    let mut params = params.clone();
    let ts = format_v1_timestamp(timestamp_ms);
    params.insert("timeStamp".into(), ts.clone());
    params.remove("authToken");
    let canonical = v1_canonical_query(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let token = v1_auth_token(access_key, &ts, &canonical);
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &params {
        ser.append_pair(k, v);
    }
    ser.append_pair("authToken", &token);
    ser.finish()
}

/// What a gateway answered.
#[derive(Clone, Debug)]
pub struct CallResponse {
    pub status: u16,
    pub body: Bytes,
    pub body_sign: Option<String>,
    pub content_type: Option<String>,
}

impl CallResponse {
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
    pub fn result_code(&self) -> Option<String> {
        self.json()?.get("resultCode")?.as_str().map(str::to_owned)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL {0}")]
    Url(String),
    #[error("request failed: {0}")]
    Http(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("bad CA certificate: {0}")]
    Certificate(String),
}

/// A pooled HTTP/1.1 client (HTTPS with certificate verification) for one
/// gateway base URL.
#[derive(Clone)]
pub struct KooClient {
    http: reqwest::Client,
    base: String,
    timeout: Duration,
}

impl KooClient {
    /// `base` like `http://127.0.0.1:8080` or `https://gw.example.com` (no trailing slash needed).
    pub fn new(base: &str) -> Self {
        Self::build(base, None).unwrap_or_else(|_| Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            timeout: Duration::from_secs(10),
        })
    }

    /// Like [`KooClient::new`], also trusting the PEM CA certificate(s) given.
    pub fn with_ca(base: &str, ca_pem: &[u8]) -> Result<Self, ClientError> {
        Self::build(base, Some(ca_pem))
    }

    fn build(base: &str, ca_pem: Option<&[u8]>) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .http1_only()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = ca_pem {
            for cert in
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| ClientError::Certificate(e.to_string()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| ClientError::Http(crate::error_chain(&e)))?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned(), timeout: Duration::from_secs(10) })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends any request (tests of bad input use this directly).
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<CallResponse, ClientError> {
        let uri = format!("{}{path_and_query}", self.base);
        let url = reqwest::Url::parse(&uri).map_err(|_| ClientError::Url(uri.clone()))?;
        let mut req = self.http.request(method, url).timeout(self.timeout).body(body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let res = req.send().await.map_err(|e| {
            if e.is_timeout() {
                ClientError::Timeout(self.timeout)
            } else {
                ClientError::Http(crate::error_chain(&e))
            }
        })?;
        let status = res.status().as_u16();
        let header = |name: &str| res.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body_sign = header("Body-Sign");
        let content_type = header(CONTENT_TYPE.as_str());
        let body = res.bytes().await.map_err(|e| {
            if e.is_timeout() {
                ClientError::Timeout(self.timeout)
            } else {
                ClientError::Http(crate::error_chain(&e))
            }
        })?;
        Ok(CallResponse { status, body, body_sign, content_type })
    }

    /// A signed V2 call with a fresh nonce at `timestamp_ms`.
    pub async fn v2(
        &self,
        path: &str,
        access_key: &str,
        body: &[u8],
        timestamp_ms: i64,
    ) -> Result<CallResponse, ClientError> {
        let query = v2_query(access_key, body, timestamp_ms, &nonce());
        self.v2_raw(path, &query, body).await
    }

    /// A V2 call with a query string of the caller's making.
    pub async fn v2_raw(&self, path: &str, query: &str, body: &[u8]) -> Result<CallResponse, ClientError> {
        let headers = [("content-type", "application/json;charset=UTF-8")];
        self.send(Method::POST, &format!("{path}?{query}"), &headers, Bytes::copy_from_slice(body)).await
    }

    /// A signed V1 call at `timestamp_ms`.
    pub async fn v1(
        &self,
        path: &str,
        access_key: &str,
        params: &BTreeMap<String, String>,
        timestamp_ms: i64,
    ) -> Result<CallResponse, ClientError> {
        let query = v1_query(access_key, params, timestamp_ms);
        self.send(Method::GET, &format!("{path}?{query}"), &[], Bytes::new()).await
    }
}
