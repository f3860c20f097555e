//! Prometheus metrics. Every metric name lives here, so the dashboards, the
//! alert rules and the test that checks them have one list to agree with.
//! Labels never carry ids, keys or any other unbounded or secret value.

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
pub const DLQ_SIZE: &str = "koogate_dlq_size";
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
pub const ACCOUNT_LOOKUPS: &str = "koogate_account_lookups_total";
pub const ACCOUNTS_PENDING: &str = "koogate_accounts_pending";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
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
                    handle
                }
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Text exposition of every metric.
pub fn render() -> String {
    install().render()
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

pub fn dlq_size(n: u64) {
    gauge!(DLQ_SIZE).set(n as f64);
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

/// `outcome`: ok, cached, not_found, auth_refused, refused, malformed, transport.
pub fn order_query(outcome: &'static str) {
    counter!(ORDER_QUERIES, "outcome" => outcome).increment(1);
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

/// Push calls by outcome: taken, refused, retry.
pub fn usage_push_call(outcome: &'static str, elapsed: Duration) {
    counter!(USAGE_PUSH_CALLS, "outcome" => outcome).increment(1);
    histogram!(USAGE_PUSH_DURATION).record(elapsed.as_secs_f64());
}

pub fn usage_gauges(unpushed: u64, dead: u64, oldest_unpushed_age: Duration) {
    gauge!(USAGE_UNPUSHED).set(unpushed as f64);
    gauge!(USAGE_DLQ_SIZE).set(dead as f64);
    gauge!(USAGE_OLDEST_UNPUSHED_AGE).set(oldest_unpushed_age.as_secs_f64());
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
