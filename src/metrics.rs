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
pub const EVENTS_FORWARDED: &str = "koogate_events_forwarded_total";
pub const OVERLOAD: &str = "koogate_overload_rejections_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
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

pub fn forwarded(sink: &'static str, outcome: &'static str, n: u64) {
    counter!(EVENTS_FORWARDED, "sink" => sink, "outcome" => outcome).increment(n);
}

pub fn overload() {
    counter!(OVERLOAD).increment(1);
}
