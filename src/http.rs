//! The HTTP edge: listeners, routing, limits, graceful shutdown.
//!
//! Limits are part of the design, not an afterthought: headers must arrive
//! within `request_timeout` (slow-loris), a V2 body within `body_timeout`
//! (a body of at most `max_body_bytes` from a live peer arrives in
//! milliseconds), and it is read *before* the call takes an in-flight slot,
//! so slow bodies hold no slot; after a body timeout the connection is
//! closed. Bodies are capped at `max_body_bytes` (checked on `Content-Length`
//! first, then while reading), open connections are capped in all (more wait
//! in the kernel backlog) and per peer IP address (more are closed at once),
//! and calls handled at once are capped (more get a signed 503/000005
//! immediately, so KooGallery retries instead of timing out in a queue).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::gateway::{CallLog, Gateway, Reply};
use crate::logfmt;
use crate::metrics as m;
use crate::protocol::Rejection;

pub type Body = Full<Bytes>;

/// What the KooGallery listener needs.
pub struct App {
    pub gateway: Gateway,
    pub routes: Routes,
    /// Calls handled at once; `try_acquire` failing means "overloaded".
    pub inflight: Semaphore,
    /// Set on shutdown: readiness fails so load balancers stop sending.
    pub draining: AtomicBool,
}

/// Where KooGallery calls arrive, and how much of a call is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routes {
    pub v2_path: String,
    pub v1_path: String,
    pub max_body_bytes: usize,
    /// Time to receive a V2 body (before an in-flight slot is taken).
    pub body_timeout: Duration,
}

/// Limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    /// Open connections per peer IP address; 0 = no cap.
    pub max_conns_per_peer: usize,
    pub shutdown_grace: Duration,
}

/// Open connections by peer IP address.
struct Peers {
    open: std::sync::Mutex<HashMap<IpAddr, usize>>,
    cap: usize,
}

/// One open connection of a peer; counted until dropped.
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    /// A slot for one more connection of `ip`, unless it has `cap` open (`cap` 0: no cap).
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        if self.cap == 0 {
            return Some(PeerSlot { peers: Arc::clone(self), ip });
        }
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(PeerSlot { peers: Arc::clone(self), ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if self.peers.cap == 0 {
            return;
        }
        let mut open = self.peers.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Why a V2 body was not read.
struct BodyRefused {
    rejection: Rejection,
    /// It did not arrive in time: the connection is closed after the answer.
    timed_out: bool,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

fn signed_response(reply: &Reply) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(reply.body.clone())));
    *res.status_mut() = StatusCode::from_u16(reply.http_status).unwrap_or(StatusCode::OK);
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json;charset=UTF-8"));
    if let Ok(v) = HeaderValue::from_str(&reply.body_sign) {
        headers.insert("Body-Sign", v);
    }
    res
}

/// One log line per call: what it was, what we answered, how long it took.
/// Caller-supplied strings are cleaned ([`logfmt::clean`]); refusals are
/// logged at most [`logfmt::PER_SECOND`] per result code per second. Nothing
/// is formatted or cleaned for a line the log filter leaves out; the line is
/// handed to the non-blocking log writer (main.rs), never written here.
fn log_call(reply: &Reply, elapsed: Duration) {
    let started = Instant::now();
    write_call_line(reply, elapsed);
    m::stage(m::Stage::Log, started.elapsed());
}

fn write_call_line(reply: &Reply, elapsed: Duration) {
    let enabled = match reply.log.reason {
        None => tracing::enabled!(tracing::Level::INFO),
        Some(_) => tracing::enabled!(tracing::Level::WARN),
    };
    if !enabled {
        return;
    }
    let CallLog { generation, activity, order_id, instance_id, test, reason, dedup, event_id } = &reply.log;
    // Microsecond precision: latency_ms=0.021, not 0.020661000000000002.
    let latency_ms = (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0;
    let code = reply.code.as_str();
    let order_id = logfmt::clean_opt(order_id.as_deref());
    let instance_id = logfmt::clean_opt(instance_id.as_deref());
    match reason {
        None => tracing::info!(
            generation,
            activity,
            order_id,
            instance_id,
            code,
            test,
            dedup,
            event_id,
            latency_ms,
            "call answered"
        ),
        Some(reason) => match logfmt::refusal(code) {
            logfmt::Verdict::Suppress => {}
            logfmt::Verdict::Log { suppressed } => {
                let reason = logfmt::clean(reason);
                if suppressed > 0 {
                    tracing::warn!(code, suppressed, "refusal lines of this code suppressed in the last second");
                }
                tracing::warn!(
                    generation,
                    activity,
                    order_id,
                    instance_id,
                    code,
                    test,
                    reason,
                    latency_ms,
                    "call refused"
                )
            }
        },
    }
}

impl App {
    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let path = req.uri().path();
        let generation = if path == self.routes.v2_path {
            "v2"
        } else if path == self.routes.v1_path {
            "v1"
        } else {
            return match (req.method(), path) {
                (&Method::GET, "/healthz") => plain(StatusCode::OK, "ok\n"),
                (&Method::GET, "/readyz") => self.readiness().await,
                _ => plain(StatusCode::NOT_FOUND, "not found\n"),
            };
        };
        let expected = if generation == "v2" { Method::POST } else { Method::GET };
        if req.method() != expected {
            let mut res = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            res.headers_mut().insert(ALLOW, HeaderValue::from_static(if generation == "v2" { "POST" } else { "GET" }));
            return res;
        }
        let raw_query = req.uri().query().unwrap_or("").to_owned();
        // The body first, under its own deadline: a slow body must not hold an in-flight slot.
        let body = if generation == "v2" {
            match self.read_body(req).await {
                Ok(body) => Some(body),
                Err(BodyRefused { rejection, timed_out }) => {
                    let log = CallLog { generation: "v2", activity: "unknown", ..CallLog::default() };
                    let reply = self.gateway.reject(self.gateway_key(), log, &rejection);
                    let elapsed = started.elapsed();
                    m::request_latency(generation, elapsed);
                    log_call(&reply, elapsed);
                    let mut res = signed_response(&reply);
                    if timed_out {
                        res.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                    }
                    return res;
                }
            }
        } else {
            None
        };
        let Ok(_permit) = self.inflight.try_acquire() else {
            m::overload();
            let reply = self.gateway.unavailable(generation, "internal error: the gateway is overloaded; please retry");
            log_call(&reply, started.elapsed());
            return signed_response(&reply);
        };
        let reply = match body {
            Some(body) => self.gateway.handle_v2(&raw_query, &body, now_ms()).await,
            None => self.gateway.handle_v1(&raw_query, now_ms()).await,
        };
        let elapsed = started.elapsed();
        m::request_latency(generation, elapsed);
        log_call(&reply, elapsed);
        signed_response(&reply)
    }

    fn gateway_key(&self) -> &crate::secret::Secret {
        self.gateway.current_key()
    }

    /// Reads a V2 body within the size and time limits.
    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, BodyRefused> {
        let refused = |rejection| BodyRefused { rejection, timed_out: false };
        let limit = self.routes.max_body_bytes;
        if let Some(ct) = req.headers().get(CONTENT_TYPE) {
            let ok = ct.to_str().is_ok_and(|v| v.trim().to_ascii_lowercase().starts_with("application/json"));
            if !ok {
                return Err(refused(Rejection::BadField {
                    field: "Content-Type",
                    problem: "must be application/json".into(),
                }));
            }
        }
        let declared =
            req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(refused(Rejection::BodyTooLarge { limit }));
        }
        let collected =
            tokio::time::timeout(self.routes.body_timeout, Limited::new(req.into_body(), limit).collect()).await;
        match collected {
            Err(_) => Err(BodyRefused {
                rejection: Rejection::MalformedJson(format!("body not received within {:?}", self.routes.body_timeout)),
                timed_out: true,
            }),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                Err(refused(Rejection::BodyTooLarge { limit }))
            }
            Ok(Err(e)) => Err(refused(Rejection::MalformedJson(format!("body could not be read: {e}")))),
            Ok(Ok(body)) => Ok(body.to_bytes()),
        }
    }

    async fn readiness(&self) -> Response<Body> {
        if self.draining.load(Ordering::Relaxed) {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
        }
        match tokio::time::timeout(Duration::from_secs(2), self.gateway.store().ping()).await {
            Ok(Ok(())) => plain(StatusCode::OK, "ready\n"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: store unreachable");
                plain(StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n")
            }
            Err(_) => plain(StatusCode::SERVICE_UNAVAILABLE, "store timed out\n"),
        }
    }
}

/// Serves `handler` on `listener` until `shutdown`, then lets in-flight
/// requests finish for up to `limits.shutdown_grace`.
pub async fn serve<F, Fut>(listener: TcpListener, limits: ListenerLimits, shutdown: CancellationToken, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    serve_tls(listener, None, limits, shutdown, handler).await;
}

/// [`serve`], with TLS on every connection when `tls` is given (the
/// handshake must finish within the header timeout).
pub async fn serve_tls<F, Fut>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ListenerLimits,
    shutdown: CancellationToken,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let peers = Arc::new(Peers { open: std::sync::Mutex::new(HashMap::new()), cap: limits.max_conns_per_peer });
    let graceful = GracefulShutdown::new();
    // Connection tasks, so none outlives the listener (they hold the app and its store).
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(peer_slot) = peers.admit(peer.ip()) else {
            // Over the per-peer cap: closed at once, holding nothing.
            tracing::debug!(%peer, "connection refused: too many open from this address (KOOGATE_MAX_CONNS_PER_PEER)");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let builder = {
            let mut b = http1::Builder::new();
            // Huawei: "format the header strictly as in the example": `Body-Sign`,
            // not hyper's default lower case (protocol §4). Title case writes
            // every name as `Body-Sign`, `Content-Type`, ... on the wire.
            b.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true)
                .title_case_headers(true);
            b
        };
        match &tls {
            None => {
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                conns.spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    drop((permit, peer_slot));
                });
            }
            Some(acceptor) => {
                let (acceptor, watcher, timeout) = (acceptor.clone(), graceful.watcher(), limits.header_timeout);
                conns.spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let conn = watcher.watch(builder.serve_connection(TokioIo::new(tls_stream), service));
                            if let Err(e) = conn.await {
                                tracing::debug!(%peer, error = %e, "connection ended with an error");
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop((permit, peer_slot));
                });
            }
        }
        // Reap finished connection tasks as we go.
        while conns.try_join_next().is_some() {}
    }
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!("all connections closed"),
        _ = tokio::time::sleep(limits.shutdown_grace) => tracing::warn!(grace = ?limits.shutdown_grace, "connections still open after the grace period; closing"),
    }
    conns.shutdown().await;
}

/// The KooGallery listener's handler.
pub fn koogallery_handler(
    app: Arc<App>,
) -> impl Fn(Request<Incoming>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>
       + Clone
       + Send
       + Sync
       + 'static {
    move |req| {
        let app = Arc::clone(&app);
        Box::pin(async move { app.route(req).await })
    }
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}")))
}
