//! The simulated order query API: `GET /api/mkp-openapi-public/global/v1/order/query`
//! on loopback, authenticated exactly as Huawei Cloud API Gateway does
//! ([`apig::verify`]), answering from an [`OrderBook`].
//!
//! It can be told to fail a share of calls (or all of them) with HTTP 500,
//! and counts what it was asked (`stats`, also `GET /stats`).
//!
//! The same server serves KooGallery's usage API ([`super::usage`]):
//! `POST /api/mkp-openapi-public/global/v1/isv/usage-data`, with what it
//! received at `GET /sim/usage`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::orders::{found_answer, OrderBook};
use super::usage::{self, UsageSimStats, UsageState, USAGE_PATH};
use super::SimulateError;
use crate::http::{self, Body, ListenerLimits};
use crate::marketplace::apig;
use crate::secret::Secret;

/// Path of the order query API.
pub const ORDER_QUERY_PATH: &str = "/api/mkp-openapi-public/global/v1/order/query";
/// Where `koogate simulate` listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9300";
pub const DEFAULT_AK: &str = "sim-ak";
pub const DEFAULT_SK: &str = "sim-sk";

/// Every code and message this server answers. The order query's codes are
/// Huawei's documented table ("Querying an Order"); API Gateway's `APIGW.*`
/// are its own; the usage API's are its documented table ("Pushing the
/// Pay-per-Use Resource Usage (New)"). Messages marked (guess) are ours.
pub mod codes {
    use crate::marketplace::apig::VerifyError;

    /// Order query success.
    pub const SUCCESS: &str = "MKT.0000";
    pub const SUCCESS_MSG: &str = "Success";
    /// Unknown order or order line: Huawei documents no "not found" code; an
    /// unknown order is answered as input validation, HTTP 500
    /// (`unconfirmed::ORDER_UNKNOWN_EXPECTED_CODE`; the table of
    /// <https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649116.html>).
    pub const ORDER_NOT_FOUND: &str = crate::protocol::unconfirmed::ORDER_UNKNOWN_EXPECTED_CODE;
    pub const ORDER_NOT_FOUND_MSG: &str = "Failure of input parameter";
    /// `orderId` missing: documented `400 MKT.0101` "Invalid parameter".
    pub const INVALID_PARAM: &str = "MKT.0101";
    pub const INVALID_PARAM_MSG: &str = "Invalid parameter";
    /// A simulated backend failure: documented `500 MKT.0999`.
    pub const INTERNAL: &str = "MKT.0999";
    pub const INTERNAL_MSG: &str = "System internal error.";
    /// API Gateway: IAM (AK/SK) authentication failed, HTTP 401.
    pub const APIGW_AUTH: &str = "APIGW.0301";
    /// API Gateway: no such API (wrong path or method), HTTP 404.
    pub const APIGW_NO_API: &str = "APIGW.0101";
    pub const APIGW_NO_API_MSG: &str = "The API does not exist or has not been published in the environment.";
    /// Usage API: `400 MKT.0102` "Invalid body sign" (wrong `ts`, `nonce`,
    /// `signature`, or a body not sent as signed).
    pub const USAGE_BODY_SIGN: &str = "MKT.0102";
    /// Usage API: `500 MKT.0100` input validation (a record not as documented).
    pub const USAGE_INVALID: &str = "MKT.0100";
    /// Usage API: `500 MKT.9001` instance id not found.
    pub const USAGE_UNKNOWN_INSTANCE: &str = "MKT.9001";
    /// Usage API: `500 MKT.9003` more than 1000 records.
    pub const USAGE_TOO_MANY: &str = "MKT.9003";
    /// Usage API: `500 MKT.9004` a `begin_time` more than 21 days before now.
    pub const USAGE_TOO_OLD: &str = "MKT.9004";

    /// API Gateway's `error_msg` for an authentication failure. The first
    /// two are Huawei's documented wording; the others are guesses.
    pub fn auth_message(e: &VerifyError) -> &'static str {
        match e {
            VerifyError::BadSignature => "Incorrect IAM authentication information: verify aksk signature fail",
            VerifyError::UnknownAccessKey => {
                "Incorrect IAM authentication information: Get secretKey failed,ak:******,err:ak not exist"
            }
            VerifyError::StaleDate => {
                "Incorrect IAM authentication information: verify aksk signature fail, x-sdk-date is more than 15 minutes from the server time"
            }
            VerifyError::MissingSignedHeader => {
                "Incorrect IAM authentication information: verify aksk signature fail, signed headers must include host and x-sdk-date"
            }
            VerifyError::Malformed => {
                "Incorrect IAM authentication information: the Authorization header is missing or not SDK-HMAC-SHA256"
            }
        }
    }
}

/// How to run the order query API.
#[derive(Clone, Debug)]
pub struct MarketConfig {
    pub listen: SocketAddr,
    /// The seller's access key id callers must sign with.
    pub ak: String,
    pub sk: Secret,
    pub book: OrderBook,
    /// Share of calls answered HTTP 500 before looking at them (0.0–1.0).
    pub fail_share: f64,
    /// The product's access key usage pushes must be signed with (`None`:
    /// every usage call is answered 401).
    pub usage_key: Option<Secret>,
    /// Share of usage calls answered HTTP 500 before storing anything (0.0–1.0).
    pub usage_fail_share: f64,
    /// Usage calls must carry API Gateway's AK/SK signature (`ak`/`sk`); a call
    /// that carries one is verified either way.
    pub usage_require_apig: bool,
    /// Instance ids KooGallery "does not know": a usage call naming one is refused as a whole (500 MKT.9001).
    pub refuse_instances: BTreeSet<String>,
    /// Usage calls answered this long after their records were stored (the
    /// answer is "lost" to a caller with a shorter timeout) …
    pub usage_delay_after_store: Duration,
    /// … this share of them (0.0–1.0).
    pub usage_delay_share: f64,
}

impl MarketConfig {
    /// Defaults: `sim-ak`/`sim-sk`, the generated book, no failures.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            ak: DEFAULT_AK.into(),
            sk: Secret::new(DEFAULT_SK),
            book: OrderBook::generated().with_usage_orders(),
            fail_share: 0.0,
            usage_key: None,
            usage_fail_share: 0.0,
            usage_require_apig: false,
            refuse_instances: BTreeSet::new(),
            usage_delay_after_store: Duration::ZERO,
            usage_delay_share: 0.0,
        }
    }
}

/// What the server was asked, and how it answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MarketStats {
    /// Calls to the order query path.
    pub requests: u64,
    /// Answered with an order.
    pub found: u64,
    /// Answered `MKT.0100`.
    pub not_found: u64,
    /// Refused with HTTP 401.
    pub unauthorized: u64,
    /// Answered HTTP 500 on purpose.
    pub failed_on_purpose: u64,
    /// Without `orderId`, or not a GET.
    pub bad_requests: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    found: AtomicU64,
    not_found: AtomicU64,
    unauthorized: AtomicU64,
    failed_on_purpose: AtomicU64,
    bad_requests: AtomicU64,
}

/// Distinct order ids remembered per server (the count still grows past it).
const MAX_REMEMBERED_ORDERS: usize = 10_000;

struct State {
    ak: String,
    sk: Secret,
    book: RwLock<OrderBook>,
    /// Every call fails (the API is "down").
    failing: AtomicBool,
    /// `f64` bits of the share of calls failed at random.
    fail_share: AtomicU64,
    counters: Counters,
    /// Order id → authenticated queries of it.
    queried: Mutex<BTreeMap<String, u64>>,
    usage: UsageState,
}

/// A running order query API.
pub struct MarketServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub(super) fn sane_share(share: f64) -> f64 {
    if share.is_nan() {
        0.0
    } else {
        share.clamp(0.0, 1.0)
    }
}

/// True with probability `share` (sanitized).
pub(super) fn roll(share: f64) -> bool {
    let share = sane_share(share);
    share > 0.0 && rand::thread_rng().gen_bool(share)
}

impl MarketServer {
    /// Binds `config.listen` (port 0 picks one) and starts serving.
    pub async fn start(config: MarketConfig) -> Result<Self, SimulateError> {
        if !(0.0..=1.0).contains(&config.fail_share) {
            return Err(SimulateError::FailShare(config.fail_share));
        }
        for (flag, value) in
            [("--usage-fail-share", config.usage_fail_share), ("--usage-delay-share", config.usage_delay_share)]
        {
            if !(0.0..=1.0).contains(&value) {
                return Err(SimulateError::Share { flag, value });
            }
        }
        let usage = UsageState::new(config.usage_key, config.usage_fail_share, config.refuse_instances).with_apig(
            &config.ak,
            config.sk.clone(),
            config.usage_require_apig,
        );
        usage.set_delay_after_store(config.usage_delay_after_store, config.usage_delay_share);
        let listener = http::bind(config.listen, "simulate --listen").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            ak: config.ak,
            sk: config.sk,
            book: RwLock::new(config.book),
            failing: AtomicBool::new(false),
            fail_share: AtomicU64::new(config.fail_share.to_bits()),
            counters: Counters::default(),
            queried: Mutex::new(BTreeMap::new()),
            usage,
        });
        let limits = ListenerLimits {
            max_connections: 1024,
            max_conns_per_peer: 0,
            header_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
        };
        let shutdown = CancellationToken::new();
        let handler_state = Arc::clone(&state);
        let handler = move |req: Request<Incoming>| {
            let state = Arc::clone(&handler_state);
            async move { handle(&state, req).await }
        };
        let task = tokio::spawn(http::serve(listener, limits, shutdown.clone(), handler));
        Ok(Self { addr, state, shutdown, task })
    }

    /// `http://<addr>`: the value of `KOOGATE_MARKETPLACE_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// While `true`, every call is answered HTTP 500 (the API is down).
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::Relaxed);
    }

    /// Fails this share of calls (0.0–1.0) with HTTP 500 from now on.
    pub fn set_fail_share(&self, share: f64) {
        self.state.fail_share.store(sane_share(share).to_bits(), Ordering::Relaxed);
    }

    pub fn stats(&self) -> MarketStats {
        self.state.stats()
    }

    /// What the usage API received (also `GET /sim/usage`).
    pub fn usage_stats(&self) -> UsageSimStats {
        self.state.usage.stats()
    }

    /// The usage API has an access key to verify signatures with.
    pub fn usage_key_set(&self) -> bool {
        self.state.usage.has_key()
    }

    /// Fails this share of usage calls (0.0–1.0) with HTTP 500 from now on, storing nothing.
    pub fn set_usage_fail_share(&self, share: f64) {
        self.state.usage.set_fail_share(share);
    }

    /// From now on, `share` of the usage calls (0.0–1.0) are answered `delay`
    /// after their records were stored: a caller with a shorter timeout loses
    /// the answer and must push the same records again.
    pub fn set_usage_delay_after_store(&self, delay: Duration, share: f64) {
        self.state.usage.set_delay_after_store(delay, share);
    }

    /// Makes KooGallery not know (`true`) or know again (`false`) an instance:
    /// a usage call naming it is refused as a whole with HTTP 400.
    pub fn set_refused_instance(&self, instance_id: &str, refused: bool) {
        self.state.usage.set_refused(instance_id, refused);
    }

    /// Authenticated queries per order id.
    pub fn queried(&self) -> BTreeMap<String, u64> {
        self.state.queried.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Adds (or replaces) an order while serving.
    pub fn insert_order(&self, order_info: Value) -> Result<(), SimulateError> {
        self.state.book.write().unwrap_or_else(PoisonError::into_inner).insert(order_info)
    }

    /// Orders in the book.
    pub fn orders(&self) -> usize {
        self.state.book.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

impl State {
    fn stats(&self) -> MarketStats {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        MarketStats {
            requests: n(&c.requests),
            found: n(&c.found),
            not_found: n(&c.not_found),
            unauthorized: n(&c.unauthorized),
            failed_on_purpose: n(&c.failed_on_purpose),
            bad_requests: n(&c.bad_requests),
        }
    }

    fn should_fail(&self) -> bool {
        if self.failing.load(Ordering::Relaxed) {
            return true;
        }
        roll(f64::from_bits(self.fail_share.load(Ordering::Relaxed)))
    }

    fn remember(&self, order_id: &str) {
        let mut queried = self.queried.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = queried.get_mut(order_id) {
            *n += 1;
        } else if queried.len() < MAX_REMEMBERED_ORDERS {
            queried.insert(order_id.to_owned(), 1);
        }
    }
}

pub(super) fn reply(status: StatusCode, body: &Value) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json;charset=UTF-8"));
    res
}

/// API Gateway's error body.
fn gateway_error(status: StatusCode, code: &str, msg: &str) -> Response<Body> {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    reply(status, &json!({"error_code": code, "error_msg": msg, "request_id": request_id}))
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    let c = &state.counters;
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => return reply(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/stats") => return reply(StatusCode::OK, &json!(state.stats())),
        (&Method::GET, usage::STATS_PATH) => return reply(StatusCode::OK, &json!(state.usage.stats())),
        (&Method::POST, USAGE_PATH) => return usage::handle(&state.usage, req).await,
        (_, ORDER_QUERY_PATH) => {}
        _ => return gateway_error(StatusCode::NOT_FOUND, codes::APIGW_NO_API, codes::APIGW_NO_API_MSG),
    }
    bump(&c.requests);
    if req.method() != Method::GET {
        bump(&c.bad_requests);
        return gateway_error(StatusCode::NOT_FOUND, codes::APIGW_NO_API, codes::APIGW_NO_API_MSG);
    }
    if state.should_fail() {
        bump(&c.failed_on_purpose);
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"resultCode": codes::INTERNAL, "resultMsg": codes::INTERNAL_MSG}),
        );
    }
    let method = req.method().as_str().to_owned();
    let query: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
    let headers: Vec<(String, String)> =
        req.headers().iter().filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))).collect();
    let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            bump(&c.bad_requests);
            return gateway_error(StatusCode::BAD_REQUEST, codes::APIGW_NO_API, "request body unreadable or too large");
        }
    };
    let lookup_sk = |ak: &str| (ak == state.ak).then(|| state.sk.expose().to_owned());
    let verified = apig::verify(
        authorization.as_deref(),
        lookup_sk,
        &apig::Request { method: &method, path: &path, query: &query, headers: &headers, body: &body },
        chrono::Utc::now(),
    );
    if let Err(e) = verified {
        bump(&c.unauthorized);
        tracing::warn!(reason = %e, "order query refused as API Gateway would (401)");
        return gateway_error(StatusCode::UNAUTHORIZED, codes::APIGW_AUTH, codes::auth_message(&e));
    }
    let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty());
    let Some(order_id) = param("orderId") else {
        bump(&c.bad_requests);
        return reply(
            StatusCode::BAD_REQUEST,
            &json!({"resultCode": codes::INVALID_PARAM, "resultMsg": codes::INVALID_PARAM_MSG}),
        );
    };
    state.remember(order_id);
    let found = state.book.read().unwrap_or_else(PoisonError::into_inner).lookup(order_id, param("orderLineId"));
    match found {
        Some(info) => {
            bump(&c.found);
            tracing::debug!(order_id, "order query answered");
            reply(StatusCode::OK, &found_answer(info, codes::SUCCESS, codes::SUCCESS_MSG))
        }
        None => {
            bump(&c.not_found);
            tracing::debug!(order_id, "order query: unknown order");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"resultCode": codes::ORDER_NOT_FOUND, "resultMsg": codes::ORDER_NOT_FOUND_MSG}),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::marketplace::apig::VerifyError;

    #[test]
    fn every_refusal_has_an_apigw_message() {
        for e in [
            VerifyError::BadSignature,
            VerifyError::UnknownAccessKey,
            VerifyError::StaleDate,
            VerifyError::MissingSignedHeader,
            VerifyError::Malformed,
        ] {
            assert!(codes::auth_message(&e).starts_with("Incorrect IAM authentication information: "));
        }
    }

    #[test]
    fn shares_are_sanitized() {
        assert_eq!(sane_share(f64::NAN), 0.0);
        assert_eq!(sane_share(2.0), 1.0);
        assert_eq!(sane_share(-1.0), 0.0);
        assert_eq!(sane_share(0.25), 0.25);
    }
}
