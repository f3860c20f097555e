//! The reference billing-core sink (`koogate sink`): a small webhook receiver
//! for local runs and tests.
//!
//! It verifies Standard Webhooks signatures (401 when bad), deduplicates by
//! `webhook-id` (a duplicate is answered 200 and not stored again), appends
//! accepted events to a JSONL file (fsynced before answering), and can be
//! told to fail a share of requests or to answer slowly, for fault tests.
//! `GET /stats` and `GET /events` show what it received: `/events` the most
//! recent accepted events only (`--keep-events`), so a long load test does not
//! grow it without bound; every id stays counted as seen, for the dedup.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use rand::Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::delivery::webhook;
use crate::http::{self, Body, ListenerLimits};

#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub listen: SocketAddr,
    /// `whsec_…`
    pub secret: String,
    /// Accepted events are appended here (none: memory only).
    pub out: Option<PathBuf>,
    /// Share of requests answered `fail_status` before looking at them (0.0–1.0).
    pub fail_share: f64,
    pub fail_status: u16,
    /// Wait this long before answering (after storing).
    pub delay: Duration,
    /// Allowed age of `webhook-timestamp`.
    pub tolerance_secs: i64,
    /// Most recent accepted events kept in memory for `GET /events`; older
    /// ones are only in `out` (their ids still count as seen).
    pub keep_events: usize,
}

/// Events `GET /events` keeps by default: a few MiB of JSON.
pub const KEEP_EVENTS: usize = 10_000;
/// Default allowed age of `webhook-timestamp`, seconds.
pub const TOLERANCE_SECS: i64 = 300;
/// Default HTTP status of the failures `fail_share` asks for.
pub const FAIL_STATUS: u16 = 500;

impl SinkConfig {
    /// A sink on `listen` that accepts everything at once and keeps events in
    /// memory only (the defaults of `koogate sink`).
    pub fn new(listen: SocketAddr, secret: impl Into<String>) -> Self {
        Self {
            listen,
            secret: secret.into(),
            out: None,
            fail_share: 0.0,
            fail_status: FAIL_STATUS,
            delay: Duration::ZERO,
            tolerance_secs: TOLERANCE_SECS,
            keep_events: KEEP_EVENTS,
        }
    }
}

/// Counters of a sink.
#[derive(Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub failed_on_purpose: AtomicU64,
}

struct State {
    key: Vec<u8>,
    config: SinkConfig,
    stats: Stats,
    accepted: Mutex<Accepted>,
}

/// Every accepted id, and the most recent accepted events in arrival order.
struct Accepted {
    seen: HashSet<String>,
    recent: VecDeque<Value>,
    keep: usize,
}

impl Accepted {
    fn new(keep: usize) -> Self {
        Self { seen: HashSet::new(), recent: VecDeque::new(), keep }
    }

    /// Counts `event` as seen and keeps it, dropping the oldest kept one past the bound.
    fn add(&mut self, id: Option<String>, event: Value) {
        if let Some(id) = id {
            self.seen.insert(id);
        }
        if self.keep == 0 {
            return;
        }
        if self.recent.len() == self.keep {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
    }

    fn events(&self) -> Vec<Value> {
        self.recent.iter().cloned().collect()
    }
}

/// A running sink.
pub struct RunningSink {
    pub addr: SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningSink {
    pub fn stats(&self) -> &Stats {
        &self.state.stats
    }
    /// The most recent accepted events (at most `keep_events`), in arrival order.
    pub async fn events(&self) -> Vec<Value> {
        self.state.accepted.lock().await.events()
    }
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("--secret: {0}")]
    Secret(#[from] webhook::SignatureError),
    #[error("--out {}: cannot read the events already accepted: {source}", path.display())]
    Out { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Starts a sink; events already in `out` count as seen (dedup survives restarts).
pub async fn start(config: SinkConfig) -> Result<RunningSink, SinkError> {
    let key = webhook::key_of(&config.secret)?;
    let mut accepted = Accepted::new(config.keep_events);
    if let Some(path) = &config.out {
        let out_error = |source| SinkError::Out { path: path.clone(), source };
        match tokio::fs::File::open(path).await {
            Ok(file) => {
                let mut lines = tokio::io::BufReader::new(file).lines();
                while let Some(line) = lines.next_line().await.map_err(out_error)? {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        let id = v["id"].as_str().map(str::to_owned);
                        accepted.add(id, v);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(out_error(e)),
        }
    }
    let listener = http::bind(config.listen, "sink --listen").await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State { key, config, stats: Stats::default(), accepted: Mutex::new(accepted) });
    let shutdown = CancellationToken::new();
    let limits = ListenerLimits {
        max_connections: 1024,
        max_conns_per_peer: 0,
        header_timeout: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(2),
    };
    let handler_state = Arc::clone(&state);
    let handler = move |req: Request<Incoming>| {
        let state = Arc::clone(&handler_state);
        async move { handle(state, req).await }
    };
    let task = tokio::spawn(http::serve(listener, limits, shutdown.clone(), handler));
    Ok(RunningSink { addr, state, shutdown, task })
}

fn reply(status: StatusCode, body: Value) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let stats = &state.stats;
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/stats") => {
            let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
            return reply(
                StatusCode::OK,
                json!({"received": n(&stats.received), "accepted": n(&stats.accepted), "duplicates": n(&stats.duplicates),
                       "rejected": n(&stats.rejected), "failed_on_purpose": n(&stats.failed_on_purpose),
                       "kept": state.accepted.lock().await.recent.len()}),
            );
        }
        (&Method::GET, "/events") => return reply(StatusCode::OK, Value::Array(state.accepted.lock().await.events())),
        (&Method::POST, _) => {}
        _ => return reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
    stats.received.fetch_add(1, Ordering::Relaxed);
    if state.config.fail_share > 0.0 && rand::thread_rng().gen_bool(state.config.fail_share.clamp(0.0, 1.0)) {
        stats.failed_on_purpose.fetch_add(1, Ordering::Relaxed);
        let status = StatusCode::from_u16(state.config.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return reply(status, json!({"error": "failing on purpose (--fail-share)"}));
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (id, ts, sig) = (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let body = match Limited::new(req.into_body(), 1024 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, json!({"error": "body unreadable"})),
    };
    let now = chrono::Utc::now().timestamp();
    if let Err(e) = webhook::verify(
        &state.key,
        id.as_deref(),
        ts.as_deref(),
        sig.as_deref(),
        &body,
        now,
        state.config.tolerance_secs,
    ) {
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "sink: signature refused");
        return reply(StatusCode::UNAUTHORIZED, json!({"error": e.to_string()}));
    }
    let id = id.unwrap_or_default();
    let event: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": format!("not JSON: {e}")})),
    };
    // Stored by a task of its own: a caller that hangs up (its attempt timed out) must not cancel the
    // store half-way, with the event written but its id not yet counted as seen: the retry would store it again.
    match tokio::spawn(store(Arc::clone(&state), id, event, body)).await {
        Ok(Stored::New) => {}
        Ok(Stored::Duplicate) => {
            tokio::time::sleep(state.config.delay).await;
            return reply(StatusCode::OK, json!({"status": "duplicate"}));
        }
        Ok(Stored::Failed) | Err(_) => {
            return reply(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "cannot store"}))
        }
    }
    tokio::time::sleep(state.config.delay).await;
    reply(StatusCode::OK, json!({"status": "accepted"}))
}

enum Stored {
    New,
    Duplicate,
    Failed,
}

/// Appends an event not seen before and counts its id as seen, both or neither.
async fn store(state: Arc<State>, id: String, event: Value, body: Bytes) -> Stored {
    let mut accepted = state.accepted.lock().await;
    if accepted.seen.contains(&id) {
        state.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        return Stored::Duplicate;
    }
    if let Some(path) = &state.config.out {
        if let Err(e) = append(path, &body).await {
            tracing::error!(error = %e, "sink: cannot write");
            return Stored::Failed;
        }
    }
    accepted.add(Some(id), event);
    state.stats.accepted.fetch_add(1, Ordering::Relaxed);
    Stored::New
}

async fn append(path: &PathBuf, body: &[u8]) -> std::io::Result<()> {
    let mut file = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
    let mut line = body.to_vec();
    line.push(b'\n');
    file.write_all(&line).await?;
    file.sync_data().await
}
