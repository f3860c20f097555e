//! The admin listener: `/metrics`, `/healthz`, and with `KOOGATE_ADMIN_TOKEN`
//! the admin API (bearer token, compared in constant time):
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/events?instance_id=&order_id=&customer_id=&status=&since=&until=&limit=` | pending events, dead letters and delivered events kept in the history (newest first) |
//! | `GET /v1/events/{id}` | one event: pending, dead, delivered or unknown; with its attempt log and body |
//! | `POST /v1/events/recover?since=` | redrives every dead letter that died since a time (RFC 3339) |
//! | `GET /v1/dlq` | dead letters |
//! | `GET /v1/dlq/{id}` | one dead letter |
//! | `POST /v1/dlq/redrive` | `{"ids":[…]}` or `{"all":true}`: back into the outbox |
//! | `GET /v1/orders/{order_id}?customer_id=` | a purchase order's facts, for that customer only |
//! | `POST /v1/orders/{order_id}/redeem` | `{"customer_id","redeemed_by"}`: once; 409 after |
//! | `POST /v1/usage` | `{"records":[…]}`: usage to push to KooGallery, a verdict per record |
//! | `GET /v1/usage` | the usage ledger's gauges (unpushed, oldest, dead) |
//! | `GET /v1/usage/records/{metering_sn}` | one usage record and where its push stands |
//! | `GET /v1/usage/instances/{instance_id}?limit=` | an instance's usage: counts by state, totals, newest records |
//! | `GET /v1/usage/dlq` | usage records KooGallery refused (or that were given up on) |
//! | `POST /v1/usage/dlq/redrive` | `{"ids":[metering_sn…]}` or `{"all":true}`: push them again |
//! | `GET /v1/accounts/{customer_id}?offset=&limit=` | the instances a Huawei Cloud account holds, newest first |
//! | `POST /v1/accounts/{customer_id}/verify` | `{"instance_id"?}`: does it hold an active subscription (404/409 why not) |
//! | `GET /v1/instances/{instance_id}` | one instance (resource id): account, order lines, event ids |
//!
//! `/console` is the operator console over this API (static files, no token: [`crate::console`]).
//!
//! The router serves exactly [`ROUTES`]; `docs/openapi.yaml` documents them (OpenAPI 3.1), and
//! tests/it/openapi.rs checks the two against each other and against a running gateway.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::accounts;
use crate::domain::field;
use crate::gateway::rfc3339;
use crate::http::Body;
use crate::marketplace::usage::PushRecord;
use crate::metering::intake::IntakeError;
use crate::metrics as m;
use crate::protocol::sign::constant_time_eq;
use crate::secret::Secret;
use crate::store::plan::parse_event_id;
use crate::store::{
    Attempts, DeadLetter, Delivered, HistoryIndex, HistoryQuery, OutboxEntry, Record, Redeem, Store, StoreError,
};
use crate::usage::record::format_e4;
use crate::usage::{StoredUsage, UsageState};

pub struct Admin {
    pub store: Arc<dyn Store>,
    pub token: Option<Secret>,
    /// The order query is configured (AK/SK): V2 purchases learn their account.
    pub enrichment: bool,
}

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    respond(status, json!({"error": code, "message": message.into()}))
}

fn store_error(e: &StoreError) -> Response<Body> {
    tracing::error!(error = %e, "admin API: store failed");
    error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the store did not answer; try again")
}

fn ms_time(ms: i64) -> Value {
    chrono::DateTime::from_timestamp_millis(ms).map_or(Value::Null, |t| Value::String(rfc3339(t)))
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// One event as the admin API shows it.
fn event_view(entry: &OutboxEntry, status: &str, attempts: Option<&crate::store::Attempts>) -> Value {
    let (instance, seq) = entry.subject_seq();
    json!({
        "id": entry.id,
        "type": entry.kind,
        "status": status,
        "instance_id": instance,
        "seq": seq,
        "order_id": entry.change.get("order_id").cloned().unwrap_or_else(|| entry.record.get(field::ORDER_ID).cloned().into()),
        "purchase_order_id": entry.record.get(field::ORDER_ID),
        "occurred_at": entry.occurred_at,
        "test": entry.test,
        "redrive": entry.redrive,
        "attempts": attempts.map_or(0, |a| a.attempts),
        "last_error": attempts.and_then(|a| a.last_error.clone()),
        "next_attempt_at": attempts.filter(|a| a.next_attempt_ms > 0).map(|a| ms_time(a.next_attempt_ms)),
    })
}

/// The event an entry becomes, as delivered (`null` when it cannot be built).
fn assembled(entry: &OutboxEntry) -> Value {
    crate::events::assemble(entry).ok().and_then(|e| serde_json::to_value(e).ok()).unwrap_or(Value::Null)
}

fn dead_view(d: &DeadLetter) -> Value {
    let mut v = event_view(&d.entry, "dead", Some(&d.attempts));
    v["dead_at"] = ms_time(d.dead_at_ms);
    v["event"] = assembled(&d.entry);
    v
}

/// A delivered event kept in the history; with `detail`, its body and attempt log.
fn delivered_view(d: &Delivered, detail: bool) -> Value {
    let mut v = event_view(&d.entry, "delivered", Some(&d.attempts));
    v["next_attempt_at"] = Value::Null;
    v["delivered_at"] = ms_time(d.delivered_at_ms);
    if detail {
        v["event"] = assembled(&d.entry);
        v["attempt_log"] = attempt_log(Some(&d.attempts));
    }
    v
}

/// The attempt log as the admin API shows it, oldest first.
fn attempt_log(attempts: Option<&Attempts>) -> Value {
    let log = attempts.map(|a| a.log.as_slice()).unwrap_or_default();
    Value::Array(
        log.iter()
            .map(|r| {
                json!({
                    "at": ms_time(r.at_ms),
                    "status": r.status,
                    "duration_ms": r.duration_ms,
                    "response": r.response,
                    "error": r.error,
                })
            })
            .collect(),
    )
}

fn matches(entry: &OutboxEntry, instance: Option<&str>, order: Option<&str>) -> bool {
    instance.is_none_or(|i| entry.subject_seq().0 == i)
        && order.is_none_or(|o| crate::store::plan::entry_order_ids(entry).contains(&o))
}

/// `status=` of `GET /v1/events`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventStatus {
    Pending,
    Dead,
    Delivered,
}

/// Events `GET /v1/events` answers by default, and at most.
const EVENTS_DEFAULT_LIMIT: usize = 100;
const EVENTS_MAX_LIMIT: usize = 1000;

/// The filters of `GET /v1/events`, read from its query string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct EventFilter {
    instance: Option<String>,
    order: Option<String>,
    customer: Option<String>,
    /// `None`: every status.
    status: Option<EventStatus>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    limit: usize,
}

/// An RFC 3339 time as UNIX ms. A `+` of the offset that arrived as a space
/// (an unencoded `+` in a query string) is read as `+`.
fn parse_time(name: &str, value: &str) -> Result<i64, (&'static str, String)> {
    chrono::DateTime::parse_from_rfc3339(value)
        .or_else(|e| {
            if value.contains(' ') {
                chrono::DateTime::parse_from_rfc3339(&value.replace(' ', "+"))
            } else {
                Err(e)
            }
        })
        .map(|t| t.timestamp_millis())
        .map_err(|_| ("bad_time", format!("{name} must be an RFC 3339 time (2026-12-01T00:00:00Z), not {value:?}")))
}

impl EventFilter {
    /// The filters of a query string, or the error code and message of a 400. Pure.
    fn parse(query: &str) -> Result<Self, (&'static str, String)> {
        let mut f = Self { limit: EVENTS_DEFAULT_LIMIT, ..Self::default() };
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let value = value.into_owned();
            match name.as_ref() {
                "instance_id" => f.instance = Some(value),
                "order_id" => f.order = Some(value),
                "customer_id" => f.customer = Some(value),
                "status" => {
                    f.status = Some(match value.as_str() {
                        "pending" => EventStatus::Pending,
                        "dead" => EventStatus::Dead,
                        "delivered" => EventStatus::Delivered,
                        _ => {
                            return Err((
                                "bad_status",
                                format!("status must be pending, dead or delivered, not {value:?}"),
                            ))
                        }
                    });
                }
                "since" => f.since_ms = Some(parse_time("since", &value)?),
                "until" => f.until_ms = Some(parse_time("until", &value)?),
                "limit" => {
                    f.limit = value.parse::<usize>().ok().filter(|n| (1..=EVENTS_MAX_LIMIT).contains(n)).ok_or_else(
                        || {
                            (
                                "bad_limit",
                                format!("limit must be a whole number from 1 to {EVENTS_MAX_LIMIT}, not {value:?}"),
                            )
                        },
                    )?;
                }
                _ => {}
            }
        }
        if let (Some(since), Some(until)) = (f.since_ms, f.until_ms) {
            if since > until {
                return Err(("bad_window", "since must not be after until".to_owned()));
            }
        }
        Ok(f)
    }

    fn wants(&self, status: EventStatus) -> bool {
        self.status.is_none_or(|s| s == status)
    }

    fn in_window(&self, ms: i64) -> bool {
        self.since_ms.is_none_or(|s| ms >= s) && self.until_ms.is_none_or(|u| ms <= u)
    }
}

/// One usage record as the admin API shows it.
fn usage_view(u: &StoredUsage) -> Value {
    let push = PushRecord::from_stored(u);
    json!({
        "metering_sn": push.metering_sn,
        "instance_id": push.instance_id,
        "relate_pkg_instance": push.relate_pkg_instance,
        "begin_time": push.begin_time,
        "end_time": push.end_time,
        "usage_value": push.usage_value,
        "record_time": push.record_time,
        "status": if u.held { "held" } else { u.state.as_str() },
        "accepted_at": ms_time(u.accepted_ms),
        "attempts": u.attempts,
        "last_error": u.error,
        "code": u.code,
        "message": u.msg,
        "pushed_at": u.pushed_ms.map_or(Value::Null, ms_time),
        "dead_at": u.dead_ms.map_or(Value::Null, ms_time),
    })
}

/// How many of an instance's newest usage records the per-instance view
/// counts and totals (`counted` < `total` says the oldest were left out).
const USAGE_COUNTED: usize = 10_000;

/// Counts by state and value sums (units of 0.0001) of usage records.
#[derive(Debug, Default, PartialEq)]
struct UsageTally {
    pending: u64,
    pushed: u64,
    held: u64,
    dead: u64,
    accepted_e4: i64,
    pushed_e4: i64,
}

impl UsageTally {
    /// A held record counts as held, not pending; every record counts in `accepted_e4`.
    fn of(records: &[StoredUsage]) -> Self {
        let mut t = Self::default();
        for u in records {
            let value = u.record.value_e4;
            t.accepted_e4 = t.accepted_e4.saturating_add(value);
            match u.state {
                UsageState::Pending if u.held => t.held += 1,
                UsageState::Pending => t.pending += 1,
                UsageState::Pushed => {
                    t.pushed += 1;
                    t.pushed_e4 = t.pushed_e4.saturating_add(value);
                }
                UsageState::Dead => t.dead += 1,
            }
        }
        t
    }
}

/// Says how many purchases' accounts are not known yet: they may belong to the account asked for.
fn pending_note(res: &mut Value, pending: u64) {
    res["enrichment_pending"] = json!(pending);
    if pending > 0 {
        res["enrichment_note"] = json!(format!(
            "{pending} purchase(s) still wait for KooGallery's order query to name their buyer; \
             they appear under their account once it answers"
        ));
    }
}

/// `{"redriven":[…],"missing":[…]}`: each id by whether its redrive moved something.
fn redrive_answer(ids: Vec<String>, moved: &[bool]) -> Value {
    let (mut redriven, mut missing) = (Vec::new(), Vec::new());
    for (id, moved) in ids.into_iter().zip(moved) {
        if *moved {
            redriven.push(id);
        } else {
            missing.push(id);
        }
    }
    json!({"redriven": redriven, "missing": missing})
}

/// Largest `POST /v1/usage` body: 1000 records of about 300 bytes, with room.
const USAGE_BODY_LIMIT: usize = 1024 * 1024;

#[derive(Deserialize)]
struct RedriveBody {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    /// Check this instance (resource id) only.
    #[serde(default)]
    instance_id: Option<String>,
}

/// `?offset=&limit=` of a paginated view.
struct Page {
    offset: u64,
    limit: u64,
}

impl Page {
    /// The page a request asks for, or why it cannot be read.
    fn of(req: &Request<Incoming>) -> Result<Self, String> {
        let number = |name: &str, default: u64| match query_param(req, name) {
            None => Ok(default),
            Some(v) => v.parse::<u64>().map_err(|_| format!("{name} must be a whole number, not {v:?}")),
        };
        let (offset, limit) = (number("offset", 0)?, number("limit", accounts::DEFAULT_PAGE)?);
        if limit == 0 || limit > accounts::MAX_PAGE {
            return Err(format!("limit must be between 1 and {}", accounts::MAX_PAGE));
        }
        Ok(Self { offset, limit })
    }
}

#[derive(Deserialize)]
struct RedeemBody {
    customer_id: String,
    redeemed_by: String,
}

/// Every admin API route the router serves, as `(method, path template)`: the
/// router matches a request against this list first (a route missing here is
/// not served), and `docs/openapi.yaml` documents exactly these
/// (tests/it/openapi.rs checks both ways).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/events"),
    ("GET", "/v1/events/{id}"),
    ("POST", "/v1/events/recover"),
    ("GET", "/v1/dlq"),
    ("GET", "/v1/dlq/{id}"),
    ("POST", "/v1/dlq/redrive"),
    ("GET", "/v1/orders/{order_id}"),
    ("POST", "/v1/orders/{order_id}/redeem"),
    ("POST", "/v1/usage"),
    ("GET", "/v1/usage"),
    ("GET", "/v1/usage/records/{metering_sn}"),
    ("GET", "/v1/usage/instances/{instance_id}"),
    ("GET", "/v1/usage/dlq"),
    ("POST", "/v1/usage/dlq/redrive"),
    ("GET", "/v1/accounts/{customer_id}"),
    ("POST", "/v1/accounts/{customer_id}/verify"),
    ("GET", "/v1/instances/{instance_id}"),
];

/// The route of [`ROUTES`] a request takes (by its method and its decoded
/// path segments after `/v1/`), with the values of the route's `{…}`
/// segments in order. Pure.
fn find_route<'a>(method: &Method, segments: &[&'a str]) -> Option<(&'static str, &'static str, Vec<&'a str>)> {
    ROUTES.iter().find_map(|&(m, template)| {
        let parts: Vec<&str> = template.trim_start_matches("/v1/").split('/').collect();
        if m != method.as_str() || parts.len() != segments.len() {
            return None;
        }
        let mut params = Vec::new();
        for (part, segment) in parts.iter().zip(segments) {
            if part.starts_with('{') {
                params.push(*segment);
            } else if part != segment {
                return None;
            }
        }
        Some((m, template, params))
    })
}

impl Admin {
    pub async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/metrics") => {
                let mut res = Response::new(Full::new(Bytes::from(m::render())));
                res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
                return res;
            }
            (&Method::GET, "/healthz") => return respond(StatusCode::OK, json!({"status": "ok"})),
            _ => {}
        }
        if crate::console::is_console(&path) {
            return crate::console::serve(req.method(), &path);
        }
        if !path.starts_with("/v1/") {
            return error(StatusCode::NOT_FOUND, "not_found", "no such path");
        }
        let Some(token) = &self.token else {
            return error(StatusCode::NOT_FOUND, "admin_api_off", "the admin API is off: set KOOGATE_ADMIN_TOKEN");
        };
        let presented =
            req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let authorized = presented.is_some_and(|p| constant_time_eq(p.trim().as_bytes(), token.expose().as_bytes()));
        if !authorized {
            if let crate::logfmt::Verdict::Log { suppressed } = crate::logfmt::refusal("admin_unauthorized") {
                let path = crate::logfmt::clean(&path);
                tracing::warn!(%path, suppressed, "admin API: missing or wrong bearer token");
            }
            let mut res = error(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required");
            res.headers_mut().insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return res;
        }
        // Each segment percent-decoded on its own (an encoded `/` stays inside its segment).
        let decoded: Result<Vec<String>, _> = path
            .trim_start_matches("/v1/")
            .split('/')
            .map(|s| percent_encoding::percent_decode_str(s).decode_utf8().map(|d| d.into_owned()))
            .collect();
        let Ok(decoded) = decoded else {
            return error(StatusCode::BAD_REQUEST, "bad_path", "a path segment is not percent-encoded UTF-8");
        };
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let Some((verb, route, params)) = find_route(req.method(), &segments) else {
            return error(StatusCode::NOT_FOUND, "not_found", "no such path or method");
        };
        let result = match (verb, route, params.as_slice()) {
            ("GET", "/v1/events", []) => match EventFilter::parse(req.uri().query().unwrap_or("")) {
                Ok(filter) => self.list_events(&filter).await,
                Err((code, message)) => return error(StatusCode::BAD_REQUEST, code, message),
            },
            ("GET", "/v1/events/{id}", [id]) => self.show_event(id).await,
            ("POST", "/v1/events/recover", []) => match query_param(&req, "since") {
                None => return error(StatusCode::BAD_REQUEST, "missing_since", "since (an RFC 3339 time) is required"),
                Some(since) => match parse_time("since", &since) {
                    Ok(since_ms) => self.recover(since_ms).await,
                    Err((code, message)) => return error(StatusCode::BAD_REQUEST, code, message),
                },
            },
            ("GET", "/v1/dlq", []) => {
                self.store.dlq_list().await.map(|d| {
                    respond(StatusCode::OK, json!({"dead_letters": d.iter().map(dead_view).collect::<Vec<_>>()}))
                })
            }
            ("GET", "/v1/dlq/{id}", [id]) => {
                self.store.dlq_list().await.map(|d| match d.iter().find(|d| d.entry.id == *id) {
                    Some(d) => respond(StatusCode::OK, dead_view(d)),
                    None => error(StatusCode::NOT_FOUND, "not_found", format!("no dead letter {id}")),
                })
            }
            ("POST", "/v1/dlq/redrive", []) => match read_json::<RedriveBody>(req).await {
                Ok(body) => self.redrive(body).await,
                Err(res) => return res,
            },
            ("GET", "/v1/orders/{order_id}", [order_id]) => match query_param(&req, "customer_id") {
                Some(customer) => self.order(order_id, &customer).await,
                None => return error(StatusCode::BAD_REQUEST, "missing_customer_id", "customer_id is required"),
            },
            ("POST", "/v1/orders/{order_id}/redeem", [order_id]) => {
                let order_id = (*order_id).to_owned();
                match read_json::<RedeemBody>(req).await {
                    Ok(body) => self.redeem(&order_id, body).await,
                    Err(res) => return res,
                }
            }
            ("POST", "/v1/usage", []) => return self.usage_intake(req).await,
            ("GET", "/v1/usage", []) => self.store.usage_stats().await.map(|s| {
                let oldest = s.oldest_unpushed_ms.map_or(Value::Null, ms_time);
                respond(StatusCode::OK, json!({"unpushed": s.unpushed, "oldest_unpushed_at": oldest, "dead": s.dead}))
            }),
            ("GET", "/v1/usage/records/{metering_sn}", [sn]) => self.store.usage_get(sn).await.map(|u| match u {
                Some(u) => respond(StatusCode::OK, usage_view(&u)),
                None => error(StatusCode::NOT_FOUND, "not_found", format!("no usage record with metering_sn {sn}")),
            }),
            ("GET", "/v1/usage/instances/{instance_id}", [id]) => match Page::of(&req) {
                Ok(page) => self.instance_usage(id, page.limit).await,
                Err(msg) => return error(StatusCode::BAD_REQUEST, "bad_query", msg),
            },
            ("GET", "/v1/usage/dlq", []) => self.store.usage_dead().await.map(|d| {
                respond(StatusCode::OK, json!({"dead_letters": d.iter().map(usage_view).collect::<Vec<_>>()}))
            }),
            ("POST", "/v1/usage/dlq/redrive", []) => match read_json::<RedriveBody>(req).await {
                Ok(body) => self.usage_redrive(body).await,
                Err(res) => return res,
            },
            ("GET", "/v1/accounts/{customer_id}", [customer]) => {
                let page = match Page::of(&req) {
                    Ok(page) => page,
                    Err(msg) => return error(StatusCode::BAD_REQUEST, "bad_query", msg),
                };
                self.account(customer, page).await
            }
            ("POST", "/v1/accounts/{customer_id}/verify", [customer]) => {
                let customer = (*customer).to_owned();
                match read_optional_json::<VerifyBody>(req).await {
                    Ok(body) => self.verify(&customer, body.instance_id.as_deref()).await,
                    Err(res) => return res,
                }
            }
            ("GET", "/v1/instances/{instance_id}", [id]) => self.resource(id).await,
            _ => return error(StatusCode::NOT_FOUND, "not_found", "no such path or method"),
        };
        result.unwrap_or_else(|e| store_error(&e))
    }

    /// `GET /v1/events`: pending events (oldest first), dead letters (by
    /// dead_at), then delivered events kept in the history (newest first), at
    /// most `limit` in all. The window applies to when each happened:
    /// occurred_at, dead_at, delivered_at.
    async fn list_events(&self, f: &EventFilter) -> Result<Response<Body>, StoreError> {
        // An account is the instances it holds (the account index), then each of them.
        let account: Option<Vec<String>> = match &f.customer {
            Some(customer) => {
                let page = self.store.account_instances(customer, 0, accounts::VERIFY_SCAN).await?;
                Some(page.instance_ids.into_iter().filter(|i| f.instance.as_ref().is_none_or(|x| x == i)).collect())
            }
            None => None,
        };
        let (instance, order) = (f.instance.as_deref(), f.order.as_deref());
        let selected = |e: &OutboxEntry| {
            matches(e, instance, order) && account.as_ref().is_none_or(|ids| ids.iter().any(|i| i == e.subject_seq().0))
        };
        let mut events: Vec<Value> = Vec::new();
        if f.wants(EventStatus::Pending) {
            let pending: Vec<OutboxEntry> = self
                .store
                .outbox_entries()
                .await?
                .into_iter()
                .filter(|e| selected(e))
                .filter(|e| {
                    chrono::DateTime::parse_from_rfc3339(&e.occurred_at)
                        .is_ok_and(|t| f.in_window(t.timestamp_millis()))
                })
                .take(f.limit)
                .collect();
            let attempts = self.store.attempts(&pending).await?;
            events.extend(pending.iter().zip(&attempts).map(|(e, a)| event_view(e, "pending", a.as_ref())));
        }
        if f.wants(EventStatus::Dead) && events.len() < f.limit {
            let dead = self.store.dlq_list().await?;
            let shown = dead.iter().filter(|d| selected(&d.entry) && f.in_window(d.dead_at_ms)).map(dead_view);
            events.extend(shown.take(f.limit - events.len()));
        }
        if f.wants(EventStatus::Delivered) && events.len() < f.limit {
            let room = f.limit - events.len();
            // The narrowest index given (an order's events, an instance's, an account's, all), read
            // newest first; when other filters still apply, read up to the largest page to filter.
            let narrowed =
                usize::from(order.is_some()) + usize::from(instance.is_some()) + usize::from(account.is_some());
            let read = if narrowed > 1 { EVENTS_MAX_LIMIT } else { room };
            let query = |index| HistoryQuery { index, since_ms: f.since_ms, until_ms: f.until_ms, limit: read };
            let mut kept: Vec<Delivered> = match (order, instance, &account) {
                (Some(o), _, _) => self.store.history_list(&query(HistoryIndex::Order(o.to_owned()))).await?,
                (None, Some(i), _) => self.store.history_list(&query(HistoryIndex::Instance(i.to_owned()))).await?,
                (None, None, Some(ids)) => {
                    let queries: Vec<HistoryQuery> =
                        ids.iter().map(|i| query(HistoryIndex::Instance(i.clone()))).collect();
                    let lists =
                        futures::future::try_join_all(queries.iter().map(|q| self.store.history_list(q))).await?;
                    let mut all: Vec<Delivered> = lists.into_iter().flatten().collect();
                    all.sort_by(|a, b| (b.delivered_at_ms, &b.entry.id).cmp(&(a.delivered_at_ms, &a.entry.id)));
                    all
                }
                (None, None, None) => self.store.history_list(&query(HistoryIndex::All)).await?,
            };
            kept.retain(|d| selected(&d.entry));
            events.extend(kept.iter().take(room).map(|d| delivered_view(d, false)));
        }
        Ok(respond(StatusCode::OK, json!({ "events": events })))
    }

    /// `POST /v1/events/recover?since=`: every dead letter that died at or
    /// after `since_ms` goes back into the outbox.
    async fn recover(&self, since_ms: i64) -> Result<Response<Body>, StoreError> {
        let ids: Vec<String> =
            self.store.dlq_list().await?.into_iter().filter(|d| d.dead_at_ms >= since_ms).map(|d| d.entry.id).collect();
        let moved = self.redrive_dead(&ids).await?;
        let count = moved.iter().filter(|m| **m).count();
        tracing::info!(count, since = %ms_time(since_ms), "dead letters recovered");
        let mut answer = redrive_answer(ids, &moved);
        answer["count"] = json!(count);
        Ok(respond(StatusCode::OK, answer))
    }

    async fn show_event(&self, id: &str) -> Result<Response<Body>, StoreError> {
        let Some((subject, seq)) = parse_event_id(id) else {
            return Ok(error(StatusCode::NOT_FOUND, "not_found", format!("{id} is not an event id")));
        };
        if let Some(d) = self.store.dlq_list().await?.iter().find(|d| d.entry.id == id) {
            let mut v = dead_view(d);
            v["attempt_log"] = attempt_log(Some(&d.attempts));
            return Ok(respond(StatusCode::OK, v));
        }
        if let Some(e) = self.store.outbox_entries().await?.into_iter().find(|e| e.id == id) {
            let attempts = self.store.attempts(std::slice::from_ref(&e)).await?;
            let attempts = attempts.first().and_then(Option::as_ref);
            let mut v = event_view(&e, "pending", attempts);
            v["event"] = assembled(&e);
            v["attempt_log"] = attempt_log(attempts);
            return Ok(respond(StatusCode::OK, v));
        }
        // Kept in the history; past the retention, only what the delivered sequence says.
        if let Some(d) = self.store.history_get(id).await? {
            return Ok(respond(StatusCode::OK, delivered_view(&d, true)));
        }
        let delivered = self.store.delivered_seq(&[subject]).await?.first().copied().unwrap_or(0);
        if seq >= 1 && seq <= delivered {
            return Ok(respond(
                StatusCode::OK,
                json!({"id": id, "status": "delivered", "instance_id": subject, "seq": seq}),
            ));
        }
        Ok(error(StatusCode::NOT_FOUND, "not_found", format!("no event {id}")))
    }

    async fn redrive(&self, body: RedriveBody) -> Result<Response<Body>, StoreError> {
        let ids: Vec<String> =
            if body.all { self.store.dlq_list().await?.into_iter().map(|d| d.entry.id).collect() } else { body.ids };
        if ids.is_empty() && !body.all {
            return Ok(error(StatusCode::BAD_REQUEST, "nothing_to_redrive", "give ids or all:true"));
        }
        let moved = self.redrive_dead(&ids).await?;
        tracing::info!(count = moved.iter().filter(|m| **m).count(), "dead letters redriven");
        Ok(respond(StatusCode::OK, redrive_answer(ids, &moved)))
    }

    /// Puts dead letters back into the outbox, one by one: for each id, whether it was one.
    async fn redrive_dead(&self, ids: &[String]) -> Result<Vec<bool>, StoreError> {
        let mut moved = Vec::with_capacity(ids.len());
        for id in ids {
            moved.push(self.store.dlq_redrive(id).await?);
        }
        Ok(moved)
    }

    async fn usage_intake(&self, req: Request<Incoming>) -> Response<Body> {
        let body = match read_limited(req, USAGE_BODY_LIMIT, "1 MiB (1000 records)").await {
            Ok(b) => b,
            Err(res) => return res,
        };
        let now = chrono::Utc::now().timestamp_millis();
        match crate::metering::intake::intake(self.store.as_ref(), &body, now).await {
            Ok(answer) => respond(StatusCode::OK, serde_json::to_value(answer).unwrap_or(Value::Null)),
            Err(e @ IntakeError::BadRequest(_)) => {
                tracing::warn!(error = %crate::logfmt::clean(&e.to_string()), "usage intake: request refused");
                error(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            }
            Err(e @ IntakeError::Store(_)) => {
                tracing::error!(error = %e, "usage intake: store failed");
                error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.to_string())
            }
        }
    }

    async fn usage_redrive(&self, body: RedriveBody) -> Result<Response<Body>, StoreError> {
        let ids: Vec<String> = if body.all {
            self.store.usage_dead().await?.into_iter().map(|u| u.record.metering_sn).collect()
        } else {
            body.ids
        };
        if ids.is_empty() && !body.all {
            return Ok(error(StatusCode::BAD_REQUEST, "nothing_to_redrive", "give ids (metering_sn) or all:true"));
        }
        let now = chrono::Utc::now().timestamp_millis();
        let mut moved = Vec::with_capacity(ids.len());
        for id in &ids {
            moved.push(self.store.usage_redrive(id, now).await?);
        }
        tracing::info!(count = moved.iter().filter(|m| **m).count(), "dead usage records redriven");
        Ok(respond(StatusCode::OK, redrive_answer(ids, &moved)))
    }

    /// The facts of a purchase order, joined with its instances.
    async fn order_facts(&self, order_id: &str, order: &Record) -> Result<Value, StoreError> {
        let mut instances = Vec::new();
        for (field, instance_id) in order {
            let Some((line, _billing_item)) = crate::store::keys::parse_order_line_field(field) else { continue };
            let r = self.store.instance(instance_id).await?;
            let settlement: Value =
                r.get("settlement").and_then(|s| serde_json::from_str(s).ok()).unwrap_or(Value::Null);
            instances.push(json!({
                "instance_id": instance_id,
                "order_line_id": if line.is_empty() { Value::Null } else { line.into() },
                "status": r.get(field::STATUS),
                "sku_code": r.get("sku_code"),
                "product_id": r.get("product_id"),
                "settlement": settlement,
                "test": r.get("test").map(|t| t == "1"),
            }));
        }
        let first = instances.first().cloned().unwrap_or(Value::Null);
        let released = instances.iter().any(|i| i["status"] == "released");
        let redeemed =
            order.get("redeemed_at").map(|at| json!({"redeemed_at": at, "redeemed_by": order.get("redeemed_by")}));
        Ok(json!({
            "order_id": order_id,
            "customer_id": order.get(field::CUSTOMER_ID),
            "status": if released { "released" } else { "paid" },
            "instance_id": first["instance_id"],
            "sku_code": first["sku_code"],
            "cards": first["settlement"]["cards"],
            "total_cny": first["settlement"]["total_cny"],
            "settlement": first["settlement"],
            "instances": instances,
            "redeemed": redeemed,
        }))
    }

    async fn order(&self, order_id: &str, customer: &str) -> Result<Response<Body>, StoreError> {
        let order = self.store.order(order_id).await?;
        // Unknown and someone else's answer alike: nothing to learn by guessing ids.
        if order.is_empty() || order.get(field::CUSTOMER_ID).map(String::as_str) != Some(customer) {
            return Ok(error(StatusCode::NOT_FOUND, "not_found", "no such order for this customer"));
        }
        Ok(respond(StatusCode::OK, self.order_facts(order_id, &order).await?))
    }

    /// `GET /v1/accounts/{customer_id}`: the account's instances, newest first.
    async fn account(&self, customer: &str, page: Page) -> Result<Response<Body>, StoreError> {
        let (found, pending) = tokio::try_join!(
            self.store.account_instances(customer, page.offset, page.limit),
            self.store.accounts_pending()
        )?;
        m::accounts_pending(pending);
        if found.total == 0 {
            m::account_lookup("account", "not_found");
            let mut res = json!({
                "error": "not_found",
                "message": format!("account {customer} holds no instance known to this gateway"),
            });
            pending_note(&mut res, pending);
            return Ok(respond(StatusCode::NOT_FOUND, res));
        }
        let records = self.store.instance_records(&found.instance_ids).await?;
        let instances: Vec<Value> =
            found.instance_ids.iter().zip(&records).map(|(id, r)| accounts::instance_view(id, r)).collect();
        let next = page.offset + instances.len() as u64;
        m::account_lookup("account", "found");
        let mut res = json!({
            "customer_id": customer,
            "total": found.total,
            "offset": page.offset,
            "limit": page.limit,
            "next_offset": if next < found.total { json!(next) } else { Value::Null },
            "instances": instances,
        });
        pending_note(&mut res, pending);
        Ok(respond(StatusCode::OK, res))
    }

    /// `POST /v1/accounts/{customer_id}/verify`: does the account hold an
    /// active subscription (that one, with `instance_id`)? Reads only.
    async fn verify(&self, customer: &str, named: Option<&str>) -> Result<Response<Body>, StoreError> {
        let found = self.store.account_instances(customer, 0, accounts::VERIFY_SCAN).await?;
        let records = self.store.instance_records(&found.instance_ids).await?;
        let instances: Vec<(String, Record)> = found.instance_ids.into_iter().zip(records).collect();
        let view = |id: &str| {
            instances.iter().find(|(i, _)| i == id).map_or(Value::Null, |(i, r)| accounts::instance_view(i, r))
        };
        Ok(match accounts::verdict(&instances, named) {
            accounts::Verdict::Active(ids) => {
                m::account_lookup("verify", "active");
                let views: Vec<Value> = ids.iter().map(|id| view(id)).collect();
                respond(StatusCode::OK, json!({"customer_id": customer, "active": true, "instances": views}))
            }
            accounts::Verdict::Refused(refusal) => {
                m::account_lookup("verify", refusal.code());
                let message = match (refusal, named) {
                    (accounts::Refusal::NoSubscription, Some(id)) => {
                        format!("account {customer} holds no instance {id}")
                    }
                    (accounts::Refusal::NoSubscription, None) => {
                        format!("account {customer} holds no subscription known to this gateway")
                    }
                    (r, Some(id)) => format!("instance {id} of account {customer} is {}", r.code()),
                    (r, None) => format!("account {customer} holds no active subscription: the newest is {}", r.code()),
                };
                let status = StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::CONFLICT);
                let shown: Vec<Value> = match named {
                    Some(id) => [view(id)].into_iter().filter(|v| !v.is_null()).collect(),
                    None => instances.iter().map(|(i, r)| accounts::instance_view(i, r)).collect(),
                };
                let mut res = json!({
                    "customer_id": customer,
                    "active": false,
                    "error": refusal.code(),
                    "message": message,
                    "instances": shown,
                });
                if refusal == accounts::Refusal::NoSubscription {
                    pending_note(&mut res, self.store.accounts_pending().await?);
                }
                respond(status, res)
            }
        })
    }

    /// `GET /v1/usage/instances/{instance_id}`: one instance's usage: records
    /// by state and value totals over its newest [`USAGE_COUNTED`] records,
    /// and the newest `limit` of them.
    async fn instance_usage(&self, id: &str, limit: u64) -> Result<Response<Body>, StoreError> {
        let (records, total) = self.store.usage_of_instance(id, USAGE_COUNTED).await?;
        if total == 0 && self.store.instance(id).await?.get(field::STATUS).is_none_or(String::is_empty) {
            return Ok(error(StatusCode::NOT_FOUND, "not_found", format!("no instance {id}")));
        }
        let tally = UsageTally::of(&records);
        let shown: Vec<Value> =
            records.iter().take(usize::try_from(limit).unwrap_or(usize::MAX)).map(usage_view).collect();
        Ok(respond(
            StatusCode::OK,
            json!({
                "instance_id": id,
                "total": total,
                "counted": records.len(),
                "counts": {"pending": tally.pending, "pushed": tally.pushed, "held": tally.held, "dead": tally.dead},
                "totals": {"accepted": format_e4(tally.accepted_e4), "pushed": format_e4(tally.pushed_e4)},
                "records": shown,
            }),
        ))
    }

    /// `GET /v1/instances/{instance_id}`: one instance (resource id) with its
    /// account, its purchase order's lines and the ids of its events.
    async fn resource(&self, id: &str) -> Result<Response<Body>, StoreError> {
        let record = self.store.instance(id).await?;
        if record.get(field::STATUS).is_none_or(String::is_empty) {
            m::account_lookup("instance", "not_found");
            return Ok(error(StatusCode::NOT_FOUND, "not_found", format!("no instance {id}")));
        }
        let mut view = accounts::instance_view(id, &record);
        view["account"] = match record.get(field::CUSTOMER_ID) {
            Some(c) => json!({"customer_id": c, "customer_name": record.get("customer_name")}),
            None => Value::Null,
        };
        let unknown = !record.contains_key(field::CUSTOMER_ID) && view["enriched"] == false;
        view["account_pending"] = json!(unknown && self.enrichment);
        if unknown && !self.enrichment {
            view["account_note"] = json!(
                "a V2 purchase learns its Huawei Cloud account from KooGallery's order query: \
                 set KOOGATE_MARKETPLACE_AK/SK"
            );
        }
        let mut lines = Vec::new();
        if let Some(order_id) = record.get(field::ORDER_ID) {
            let order = self.store.order(order_id).await?;
            for (field, instance) in &order {
                if let Some((line, product)) = crate::store::keys::parse_order_line_field(field) {
                    let line = if line.is_empty() { Value::Null } else { json!(line) };
                    lines.push(json!({"order_id": order_id, "order_line_id": line, "product_id": product,
                        "instance_id": instance}));
                }
            }
        }
        view["order_lines"] = json!(lines);
        let seq: u64 = record.get(field::SEQ).and_then(|s| s.parse().ok()).unwrap_or(0);
        view["event_ids"] = json!((1..=seq).map(|n| crate::store::plan::event_id(id, n)).collect::<Vec<_>>());
        m::account_lookup("instance", "found");
        Ok(respond(StatusCode::OK, view))
    }

    async fn redeem(&self, order_id: &str, body: RedeemBody) -> Result<Response<Body>, StoreError> {
        let at = rfc3339(chrono::Utc::now());
        Ok(match self.store.redeem(order_id, &body.customer_id, &body.redeemed_by, &at).await? {
            Redeem::NotFound => error(StatusCode::NOT_FOUND, "not_found", "no such order for this customer"),
            Redeem::Released => error(
                StatusCode::CONFLICT,
                "order_released",
                "the order was released (refunded) and cannot be redeemed",
            ),
            Redeem::Already(order) => {
                let mut v = self.order_facts(order_id, &order).await?;
                v["error"] = json!("already_redeemed");
                respond(StatusCode::CONFLICT, v)
            }
            Redeem::Redeemed(order) => {
                tracing::info!(order_id = %crate::logfmt::clean(order_id), "order redeemed");
                respond(StatusCode::OK, self.order_facts(order_id, &order).await?)
            }
        })
    }
}

/// Reads a small JSON body that may be absent (then `T::default()`), or
/// answers 413 (over 64 KiB) or 400.
async fn read_optional_json<T: serde::de::DeserializeOwned + Default>(
    req: Request<Incoming>,
) -> Result<T, Response<Body>> {
    let body = read_limited(req, 64 * 1024, "64 KiB").await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))
}

/// Reads a small JSON body, or answers 413 (over 64 KiB) or 400.
async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Body>> {
    let body = read_limited(req, 64 * 1024, "64 KiB").await?;
    serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))
}

/// A body past the limit is still read to its end (and thrown away), up to
/// this much and for this long, so the caller gets its 413 instead of a
/// connection reset in the middle of sending; then the connection is closed.
const DRAIN_MAX: u64 = 64 * 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a body of at most `limit` bytes; a larger one is answered 413.
async fn read_limited(req: Request<Incoming>, limit: usize, what: &str) -> Result<Bytes, Response<Body>> {
    let too_large = || {
        let mut res = error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the body is over {what}"));
        res.headers_mut().insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        res
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    let mut buf = Vec::new();
    let mut over = declared.is_some_and(|n| n > limit as u64);
    let mut drained: u64 = 0;
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    loop {
        let frame = if over {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => break,
            }
        } else {
            body.frame().await
        };
        let Some(frame) = frame else { break };
        let Ok(frame) = frame else {
            return Err(error(StatusCode::BAD_REQUEST, "bad_body", "the body could not be read"));
        };
        let Ok(data) = frame.into_data() else { continue };
        if over {
            drained += data.len() as u64;
            if drained > DRAIN_MAX {
                break;
            }
        } else if buf.len() + data.len() > limit {
            over = true;
            drained = (buf.len() + data.len()) as u64;
            buf = Vec::new();
        } else {
            buf.extend_from_slice(&data);
        }
    }
    if over {
        return Err(too_large());
    }
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_find_their_route_and_its_parameters() {
        let route = |m: Method, path: &'static str| {
            let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
            find_route(&m, &segments).map(|(verb, template, params)| (verb, template, params.join(",")))
        };
        assert_eq!(route(Method::GET, "/v1/events"), Some(("GET", "/v1/events", String::new())));
        assert_eq!(route(Method::GET, "/v1/dlq/evt_a_1"), Some(("GET", "/v1/dlq/{id}", "evt_a_1".into())));
        assert_eq!(route(Method::POST, "/v1/dlq/redrive"), Some(("POST", "/v1/dlq/redrive", String::new())));
        assert_eq!(route(Method::POST, "/v1/usage"), Some(("POST", "/v1/usage", String::new())));
        assert_eq!(route(Method::GET, "/v1/usage"), Some(("GET", "/v1/usage", String::new())));
        assert_eq!(
            route(Method::POST, "/v1/orders/CS1/redeem"),
            Some(("POST", "/v1/orders/{order_id}/redeem", "CS1".into()))
        );
        assert_eq!(route(Method::POST, "/v1/dlq/evt_a_1"), None);
        assert_eq!(route(Method::DELETE, "/v1/events"), None);
        assert_eq!(route(Method::GET, "/v1/orders/CS1/redeem/x"), None);
        assert_eq!(route(Method::GET, "/v1/nothing"), None);
        assert_eq!(route(Method::POST, "/v1/events/recover"), Some(("POST", "/v1/events/recover", String::new())));
        assert_eq!(route(Method::GET, "/v1/events/recover"), Some(("GET", "/v1/events/{id}", "recover".into())));
    }

    #[test]
    fn event_filters_are_read_or_refused_with_a_code() {
        let f = EventFilter::parse("").unwrap();
        assert_eq!(f, EventFilter { limit: 100, ..EventFilter::default() });
        let f = EventFilter::parse(
            "instance_id=i1&order_id=CS1&customer_id=c1&status=delivered&since=2026-12-01T00:00:00Z\
             &until=2026-12-01T01:00:00%2B01:00&limit=1000",
        )
        .unwrap();
        assert_eq!(
            (f.instance.as_deref(), f.order.as_deref(), f.customer.as_deref()),
            (Some("i1"), Some("CS1"), Some("c1"))
        );
        assert_eq!(f.status, Some(EventStatus::Delivered));
        assert_eq!((f.since_ms, f.until_ms, f.limit), (Some(1_796_083_200_000), Some(1_796_083_200_000), 1000));
        // An unencoded `+` arrives as a space.
        assert_eq!(EventFilter::parse("since=2026-12-01T01:00:00+01:00").unwrap().since_ms, Some(1_796_083_200_000));
        for (query, code) in [
            ("status=gone", "bad_status"),
            ("since=yesterday", "bad_time"),
            ("until=2026-13-01T00:00:00Z", "bad_time"),
            ("limit=0", "bad_limit"),
            ("limit=1001", "bad_limit"),
            ("limit=ten", "bad_limit"),
            ("since=2026-12-02T00:00:00Z&until=2026-12-01T00:00:00Z", "bad_window"),
        ] {
            assert_eq!(EventFilter::parse(query).map_err(|(c, _)| c), Err(code), "{query}");
        }
        let f = EventFilter { since_ms: Some(10), until_ms: Some(20), ..EventFilter::default() };
        assert!(f.in_window(10) && f.in_window(20) && !f.in_window(9) && !f.in_window(21));
    }
}
