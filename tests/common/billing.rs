//! A programmable billing core for delivery tests: real HTTP on loopback,
//! its own Standard Webhooks verification, a decision per request.
#![allow(dead_code)]

use std::collections::HashMap;
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

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request as the billing core saw it.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub id: String,
    pub at: Instant,
    pub attempt: u32,
    pub signature_ok: bool,
    pub event: Value,
    /// The body exactly as received.
    pub body: Bytes,
    pub status: u16,
}

/// What to answer: (status, delay before answering).
pub type Decide = dyn Fn(&str, u32, &Value) -> (u16, Duration) + Send + Sync;

pub struct Billing {
    pub addr: SocketAddr,
    pub arrivals: Arc<Mutex<Vec<Arrival>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Independent Standard Webhooks check (not koogate's code).
fn verify(headers: &hyper::HeaderMap, body: &[u8]) -> bool {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (id, ts, sig) = (get("webhook-id"), get("webhook-timestamp"), get("webhook-signature"));
    let key = base64::engine::general_purpose::STANDARD.decode(SECRET.trim_start_matches("whsec_")).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    let fresh = ts.parse::<i64>().is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() < 300);
    fresh && sig.split(' ').any(|s| s == expected)
}

impl Billing {
    pub async fn start(decide: impl Fn(&str, u32, &Value) -> (u16, Duration) + Send + Sync + 'static) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), decide).await
    }

    pub async fn start_on(
        addr: SocketAddr,
        decide: impl Fn(&str, u32, &Value) -> (u16, Duration) + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
        let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let decide: Arc<Decide> = Arc::new(decide);
        let (a, c, d) = (Arc::clone(&arrivals), counts, decide);
        let task = super::serve_http(listener, move |req: Request<hyper::body::Incoming>| {
            let (a, c, d) = (Arc::clone(&a), Arc::clone(&c), Arc::clone(&d));
            async move {
                let at = Instant::now();
                let headers = req.headers().clone();
                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let attempt = {
                    let mut counts = c.lock().unwrap();
                    let n = counts.entry(id.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                let signature_ok = verify(&headers, &body);
                let (status, delay) = if signature_ok { d(&id, attempt, &event) } else { (401, Duration::ZERO) };
                a.lock().unwrap().push(Arrival { id, at, attempt, signature_ok, event, body, status });
                tokio::time::sleep(delay).await;
                let mut res = Response::new(Full::new(Bytes::from_static(b"{}")));
                *res.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                res
            }
        });
        Self { addr, arrivals, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/billing/events", self.addr)
    }

    /// Every request so far; each signed one's event checked against its schema in docs/events/.
    pub fn arrivals(&self) -> Vec<Arrival> {
        let arrivals = self.arrivals.lock().unwrap().clone();
        arrivals.iter().filter(|a| a.signature_ok).for_each(|a| super::catalogue::assert_event(&a.event));
        arrivals
    }

    /// Ids answered 2xx, in order of arrival.
    pub fn delivered(&self) -> Vec<Arrival> {
        self.arrivals().into_iter().filter(|a| (200..300).contains(&a.status)).collect()
    }

    /// Waits until `n` distinct ids were answered 2xx.
    pub async fn wait_delivered(&self, n: usize, within: Duration) -> Vec<Arrival> {
        let deadline = Instant::now() + within;
        loop {
            let delivered = self.delivered();
            let distinct: std::collections::BTreeSet<&str> = delivered.iter().map(|a| a.id.as_str()).collect();
            if distinct.len() >= n {
                return delivered;
            }
            assert!(Instant::now() < deadline, "only {} of {n} events delivered: {:?}", distinct.len(), distinct);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

pub fn ok() -> (u16, Duration) {
    (200, Duration::ZERO)
}
