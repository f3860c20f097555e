//! Prometheus metrics. Every metric name lives here, so the dashboards, the
//! alert rules and the test that checks them have one list to agree with.
//! Labels never carry ids, keys or any other unbounded or secret value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CALLS: &str = "koogate_calls_total";
pub const REJECTIONS: &str = "koogate_verification_failures_total";
pub const DEDUP_HITS: &str = "koogate_dedup_hits_total";
pub const REQUEST_DURATION: &str = "koogate_request_duration_seconds";
pub const STORE_DURATION: &str = "koogate_store_duration_seconds";
pub const STORE_ERRORS: &str = "koogate_store_errors_total";
pub const EVENTS_CREATED: &str = "koogate_events_created_total";
pub const OUTBOX_DEPTH: &str = "koogate_outbox_depth";
pub const DELIVERY_ATTEMPTS: &str = "koogate_delivery_attempts_total";
pub const DELIVERY_DURATION: &str = "koogate_delivery_duration_seconds";
pub const DELIVERY_LAG: &str = "koogate_delivery_lag_seconds";
pub const DLQ_EVENTS: &str = "koogate_dlq_events";
pub const OLDEST_PENDING_AGE: &str = "koogate_oldest_pending_age_seconds";
pub const READY: &str = "koogate_ready";
pub const ORDER_QUERIES: &str = "koogate_order_queries_total";
pub const OVERLOAD: &str = "koogate_overload_rejections_total";
/// V1 contact fields that could not be decrypted (the purchase went on without them), by field.
pub const UNDECRYPTABLE_FIELDS: &str = "koogate_v1_undecryptable_fields_total";
pub const USAGE_RECORDS: &str = "koogate_usage_records_total";
pub const USAGE_PUSHED: &str = "koogate_usage_pushed_total";
pub const USAGE_REFUSED: &str = "koogate_usage_refused_total";
pub const USAGE_PUSH_CALLS: &str = "koogate_usage_push_calls_total";
pub const USAGE_PUSH_DURATION: &str = "koogate_usage_push_duration_seconds";
pub const USAGE_UNPUSHED: &str = "koogate_usage_unpushed";
pub const USAGE_HELD: &str = "koogate_usage_held";
pub const USAGE_DLQ_SIZE: &str = "koogate_usage_dlq_size";
pub const USAGE_OLDEST_UNPUSHED_AGE: &str = "koogate_usage_oldest_unpushed_age_seconds";
pub const USAGE_HELD_NEAR_EXPIRY: &str = "koogate_usage_held_near_expiry";
pub const USAGE_CONFIG_FAULTS: &str = "koogate_usage_push_config_faults_total";
pub const ACCOUNT_LOOKUPS: &str = "koogate_account_lookups_total";
pub const ACCOUNTS_PENDING: &str = "koogate_accounts_pending";
pub const BUILD_INFO: &str = "koogate_build_info";
/// Time spent in each stage of handling calls (verify, parse, plan, store, sign, log), seconds.
pub const CALL_STAGE_SECONDS: &str = "koogate_call_stage_seconds_total";
/// Log lines dropped because the log writer's buffer was full (logging never blocks a call).
pub const LOG_LINES_DROPPED: &str = "koogate_log_lines_dropped_total";

/// (name, help) of every koogate metric: each gets a `# HELP` line.
pub const HELP: &[(&str, &str)] = &[
    (CALLS, "KooGallery calls answered, by generation, activity and result code"),
    (REJECTIONS, "calls refused before anything was written, by generation and reason"),
    (DEDUP_HITS, "retries answered from the kept answer, by generation and activity"),
    (REQUEST_DURATION, "time from a call's arrival to its answer, seconds"),
    (STORE_DURATION, "time of one store round trip of a call, seconds"),
    (STORE_ERRORS, "store failures (answered 000005), by backend and kind"),
    (EVENTS_CREATED, "settlement events written to the outbox"),
    (OUTBOX_DEPTH, "events waiting for delivery (shared by all replicas)"),
    (DELIVERY_ATTEMPTS, "deliveries to the billing core, by outcome"),
    (DELIVERY_DURATION, "time of one delivery attempt to the billing core, seconds"),
    (DELIVERY_LAG, "time from a call's acceptance to its event's delivery, seconds"),
    (DLQ_EVENTS, "events in the dead-letter queue (shared by all replicas)"),
    (OLDEST_PENDING_AGE, "age of the oldest undelivered event, seconds"),
    (READY, "1 when the store answers, else 0"),
    (ORDER_QUERIES, "KooGallery order query API calls, by outcome"),
    (OVERLOAD, "calls answered 503/000005 because KOOGATE_MAX_INFLIGHT calls were in flight"),
    (USAGE_RECORDS, "usage records posted by the billing core, by verdict"),
    (USAGE_PUSHED, "usage records KooGallery took"),
    (USAGE_REFUSED, "usage records dead-lettered, by reason"),
    (USAGE_PUSH_CALLS, "usage push calls to KooGallery, by outcome"),
    (USAGE_PUSH_DURATION, "time of one usage push call, seconds"),
    (USAGE_UNPUSHED, "usage records not yet taken by KooGallery"),
    (USAGE_HELD, "usage records held back because their instance is frozen"),
    (USAGE_DLQ_SIZE, "usage records in the usage dead-letter list"),
    (USAGE_OLDEST_UNPUSHED_AGE, "age of the oldest unpushed usage record, seconds"),
    (UNDECRYPTABLE_FIELDS, "V1 contact fields that could not be decrypted (purchase accepted), by field"),
    (USAGE_HELD_NEAR_EXPIRY, "held usage records of frozen instances close to KooGallery's 21-day limit"),
    (USAGE_CONFIG_FAULTS, "usage pushes refused for a configuration fault (records held), by code"),
    (ACCOUNT_LOOKUPS, "account settlement look-ups by the billing center, by kind and outcome"),
    (ACCOUNTS_PENDING, "purchases whose Huawei Cloud account is not known yet (order query pending)"),
    (BUILD_INFO, "always 1; the version label says which koogate runs"),
    (
        CALL_STAGE_SECONDS,
        "time spent handling calls, by stage (verify, parse, plan, store, sign, log), seconds; divide its rate by the call rate for time per call",
    ),
    (LOG_LINES_DROPPED, "log lines dropped because the log writer fell behind (its buffer was full)"),
];

/// Reasons of `koogate_verification_failures_total` (`Rejection::reason`), shown at zero from start-up.
const REJECTION_REASONS: &[&str] = &[
    "missing_auth_param",
    "duplicate_auth_param",
    "bad_timestamp",
    "stale_timestamp",
    "malformed_signature",
    "bad_signature",
    "malformed_nonce",
    "replayed_nonce",
    "body_too_large",
    "malformed_json",
    "malformed_query",
    "missing_field",
    "bad_field",
    "unknown_activity",
    "duplicate_param",
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Up to a minute: past the order query (5 s), usage push (10 s) and request (10 s) timeouts by default.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0];
/// Deliveries take up to the attempt timeout, and an event may wait hours for a billing core that is down.
const DELIVERY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
];

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(DELIVERY_LAG.into()), DELIVERY_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(DELIVERY_DURATION.into()), DELIVERY_BUCKETS))
                .map(|b| b.build_recorder());
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    // Fails only when another recorder is installed (tests): metrics then go there.
                    let _ = metrics::set_global_recorder(recorder);
                    describe();
                    handle
                }
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    for (name, help) in HELP {
        if *name == CALL_STAGE_SECONDS {
            // Rendered by `render` itself (float seconds from plain atomics), HELP included.
            continue;
        }
        if name.ends_with("_total") {
            describe_counter!(*name, *help);
        } else if name.ends_with("_seconds") && !name.contains("_age_") {
            describe_histogram!(*name, *help);
        } else {
            describe_gauge!(*name, *help);
        }
    }
    process().describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Counters of failures exist at zero from the start, so `rate()` and alerts see them before the first one.
    counter!(OVERLOAD).increment(0);
    counter!(LOG_LINES_DROPPED).increment(0);
    for generation in ["v1", "v2"] {
        for reason in REJECTION_REASONS {
            counter!(REJECTIONS, "generation" => generation, "reason" => *reason).increment(0);
        }
    }
    for outcome in ["failed_retryable", "failed_permanent", "dead_lettered"] {
        counter!(DELIVERY_ATTEMPTS, "outcome" => outcome).increment(0);
    }
    for reason in ["refused", "gave_up"] {
        counter!(USAGE_REFUSED, "reason" => reason).increment(0);
    }
}

/// The KooGallery API failure counters at zero for each configured host (their
/// `host` label), so `rate()` and alerts see them before the first failure.
pub fn marketplace_hosts(hosts: &[String]) {
    const ORDER_FAILURES: &[&str] = &[
        "invalid",
        "rate_limited",
        "unavailable",
        "refused",
        "malformed",
        "transport",
        "credentials_signature",
        "credentials_illegal_operation",
        "credentials_no_authority",
        "credentials_illegal_token",
    ];
    for host in hosts {
        for outcome in ORDER_FAILURES {
            counter!(ORDER_QUERIES, "outcome" => *outcome, "host" => host.clone()).increment(0);
        }
        for outcome in ["refused", "retry"] {
            counter!(USAGE_PUSH_CALLS, "outcome" => outcome, "host" => host.clone()).increment(0);
        }
    }
}

/// The store's error counter at zero, once its backend is known.
pub fn store_opened(backend: &'static str) {
    for kind in ["redis", "embedded", "timeout", "protocol"] {
        counter!(STORE_ERRORS, "backend" => backend, "kind" => kind).increment(0);
    }
}

/// Process metrics (memory, CPU, open files: `process_*`), read at each scrape.
fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Text exposition of every metric.
pub fn render() -> String {
    let handle = install();
    process().collect();
    if let Some(dropped) = LOG_DROPPED.get() {
        counter!(LOG_LINES_DROPPED).absolute(dropped());
    }
    let mut text = handle.render();
    render_stages(&mut text);
    text
}

/// A stage of handling a call, timed into `koogate_call_stage_seconds_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Signature, timestamp and nonce format checks.
    Verify,
    /// The body (V2) or query (V1) into a call.
    Parse,
    /// The call into a store plan.
    Plan,
    /// The store round trip (the Redis script, or the embedded store's group commit).
    Store,
    /// Signing the answer (`Body-Sign`).
    Sign,
    /// The call's log line (formatting and handing it to the log writer).
    Log,
}

impl Stage {
    pub const ALL: [Stage; 6] = [Stage::Verify, Stage::Parse, Stage::Plan, Stage::Store, Stage::Sign, Stage::Log];

    /// The `stage` label.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Verify => "verify",
            Stage::Parse => "parse",
            Stage::Plan => "plan",
            Stage::Store => "store",
            Stage::Sign => "sign",
            Stage::Log => "log",
        }
    }
}

/// Nanoseconds spent per stage: plain atomics, so timing a stage costs one
/// `Instant::now` pair and one relaxed add (no label lookup per call).
static STAGE_NANOS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Adds `elapsed` to `stage`'s total.
pub fn stage(stage: Stage, elapsed: Duration) {
    let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    STAGE_NANOS[stage as usize].fetch_add(nanos, Ordering::Relaxed);
}

/// Adds the time since `started` to `stage`'s total; returns now (the next stage's start).
pub fn stage_since(stage: Stage, started: std::time::Instant) -> std::time::Instant {
    let now = std::time::Instant::now();
    self::stage(stage, now.duration_since(started));
    now
}

fn render_stages(out: &mut String) {
    use std::fmt::Write;
    let help = HELP.iter().find(|(n, _)| *n == CALL_STAGE_SECONDS).map_or("", |(_, h)| *h);
    let _ = writeln!(out, "# HELP {CALL_STAGE_SECONDS} {help}\n# TYPE {CALL_STAGE_SECONDS} counter");
    for s in Stage::ALL {
        let secs = STAGE_NANOS[s as usize].load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{CALL_STAGE_SECONDS}{{stage=\"{}\"}} {secs:.9}", s.name());
    }
}

/// Where `koogate_log_lines_dropped_total` is read from (the log writer's drop counter).
static LOG_DROPPED: OnceLock<Box<dyn Fn() -> u64 + Send + Sync>> = OnceLock::new();

/// Names the log writer's count of dropped lines (set once, by the binary that set up logging).
pub fn log_dropped_lines_from(count: impl Fn() -> u64 + Send + Sync + 'static) {
    let _ = LOG_DROPPED.set(Box::new(count));
}

pub fn call(generation: &'static str, activity: &'static str, code: &'static str) {
    counter!(CALLS, "generation" => generation, "activity" => activity, "code" => code).increment(1);
}

pub fn rejected(generation: &'static str, reason: &'static str) {
    counter!(REJECTIONS, "generation" => generation, "reason" => reason).increment(1);
}

pub fn dedup_hit(generation: &'static str, activity: &'static str) {
    counter!(DEDUP_HITS, "generation" => generation, "activity" => activity).increment(1);
}

pub fn event_created() {
    counter!(EVENTS_CREATED).increment(1);
}

pub fn request_latency(generation: &'static str, elapsed: Duration) {
    histogram!(REQUEST_DURATION, "generation" => generation).record(elapsed.as_secs_f64());
}

pub fn store_latency(backend: &'static str, elapsed: Duration) {
    histogram!(STORE_DURATION, "backend" => backend).record(elapsed.as_secs_f64());
}

pub fn store_error(backend: &'static str, kind: &'static str) {
    counter!(STORE_ERRORS, "backend" => backend, "kind" => kind).increment(1);
}

pub fn outbox_depth(depth: u64) {
    gauge!(OUTBOX_DEPTH).set(depth as f64);
}

/// `outcome`: delivered, failed_retryable, failed_permanent, dead_lettered, skipped_test.
pub fn delivery_attempt(outcome: &'static str) {
    counter!(DELIVERY_ATTEMPTS, "outcome" => outcome).increment(1);
}

pub fn delivery_duration(elapsed: Duration) {
    histogram!(DELIVERY_DURATION).record(elapsed.as_secs_f64());
}

/// From accepted (the call) to delivered.
pub fn delivery_lag(elapsed: Duration) {
    histogram!(DELIVERY_LAG).record(elapsed.as_secs_f64());
}

/// Events in the dead-letter queue (a count: `koogate_dlq_events`).
pub fn dlq_events(n: u64) {
    gauge!(DLQ_EVENTS).set(n as f64);
}

pub fn oldest_pending_age(age: Duration) {
    gauge!(OLDEST_PENDING_AGE).set(age.as_secs_f64());
}

pub fn ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

pub fn overload() {
    counter!(OVERLOAD).increment(1);
}

pub fn undecryptable_field(field: &'static str) {
    counter!(UNDECRYPTABLE_FIELDS, "field" => field).increment(1);
}

/// `outcome`: ok, cached, invalid, rate_limited, unavailable, refused, malformed, transport,
/// credentials_signature, credentials_illegal_operation, credentials_no_authority, credentials_illegal_token.
/// `host`: the configured host that answered (or was tried last); `cache` for a cached answer.
pub fn order_query(outcome: &'static str, host: &str) {
    counter!(ORDER_QUERIES, "outcome" => outcome, "host" => host.to_owned()).increment(1);
}

/// Records posted by the billing core, by verdict: accepted, duplicate, rejected.
pub fn usage_records(verdict: &'static str, n: u64) {
    counter!(USAGE_RECORDS, "verdict" => verdict).increment(n);
}

/// Records KooGallery took.
pub fn usage_pushed(n: u64) {
    counter!(USAGE_PUSHED).increment(n);
}

/// Records that went to the usage dead-letter list (`reason`: refused, gave_up).
pub fn usage_refused(reason: &'static str, n: u64) {
    counter!(USAGE_REFUSED, "reason" => reason).increment(n);
}

/// Push calls KooGallery answered with a configuration fault (`400 MKT.0102`
/// invalid body sign, `401 MKT.0151/0154`, API Gateway's 401/403): the records
/// are held, not pushed. `code`: MKT.0102, MKT.0151, MKT.0154, other.
pub fn usage_config_fault(code: &str) {
    let code = match code {
        "MKT.0102" => "MKT.0102",
        "MKT.0151" => "MKT.0151",
        "MKT.0154" => "MKT.0154",
        _ => "other",
    };
    counter!(USAGE_CONFIG_FAULTS, "code" => code).increment(1);
}

/// Makes the usage push's counters visible (at 0) before their first event.
pub fn usage_push_series() {
    counter!(USAGE_CONFIG_FAULTS, "code" => "MKT.0102").increment(0);
}

/// Push calls by outcome (taken, refused, retry, config_fault) and the `host`
/// that answered (a configured base URL's host: the primary or a fallback).
pub fn usage_push_call(outcome: &'static str, host: &str, elapsed: Duration) {
    counter!(USAGE_PUSH_CALLS, "outcome" => outcome, "host" => host.to_owned()).increment(1);
    histogram!(USAGE_PUSH_DURATION).record(elapsed.as_secs_f64());
}

pub fn usage_gauges(unpushed: u64, dead: u64, oldest_unpushed_age: Duration) {
    gauge!(USAGE_UNPUSHED).set(unpushed as f64);
    gauge!(USAGE_DLQ_SIZE).set(dead as f64);
    gauge!(USAGE_OLDEST_UNPUSHED_AGE).set(oldest_unpushed_age.as_secs_f64());
}

/// Records held for a frozen instance whose begin_time is more than 18 days
/// old: KooGallery refuses them from 21 days on (MKT.9004).
pub fn usage_held_near_expiry(n: usize) {
    gauge!(USAGE_HELD_NEAR_EXPIRY).set(n as f64);
}

/// Records held back because their instance is frozen (last claim round).
pub fn usage_held(n: usize) {
    gauge!(USAGE_HELD).set(n as f64);
}

/// Account settlement look-ups by the billing center: `kind` account, instance
/// or verify; `outcome` found, not_found, active, no_subscription, frozen,
/// expired, released, error.
pub fn account_lookup(kind: &'static str, outcome: &'static str) {
    counter!(ACCOUNT_LOOKUPS, "kind" => kind, "outcome" => outcome).increment(1);
}

/// Instances whose Huawei Cloud account is not known yet (order query pending), as last seen.
pub fn accounts_pending(n: u64) {
    gauge!(ACCOUNTS_PENDING).set(n as f64);
}
