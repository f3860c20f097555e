//! Metrics move as calls are made (its own test binary: the recorder is process-wide).

mod common;

use common::*;

fn value(exposition: &str, series: &str) -> f64 {
    sample(exposition, series).unwrap_or(0.0)
}

#[tokio::test]
async fn counters_and_histograms_follow_the_calls() {
    let gw = TestGateway::start(Backend::Redis, "metrics").await;
    let new_ok = r#"koogate_calls_total{generation="v2",activity="newInstance",code="000000"}"#;
    let bad_sig = r#"koogate_verification_failures_total{generation="v2",reason="bad_signature"}"#;
    let dedup = r#"koogate_dedup_hits_total{generation="v2",activity="newInstance"}"#;
    let latency = r#"koogate_request_duration_seconds_count{generation="v2"}"#;
    let before = gw.metrics().await;

    gw.v2_fixture("v2/01-newInstance.json").await;
    gw.v2_fixture("v2/01-newInstance.json").await; // a retry
    gw.client.v2("/koogallery/v2", "wrong", &fixture("v2/01-newInstance.json"), now_ms()).await.unwrap();

    let after = gw.metrics().await;
    for (series, delta) in [(new_ok, 2.0), (bad_sig, 1.0), (dedup, 1.0), (latency, 3.0)] {
        assert_eq!(value(&after, series) - value(&before, series), delta, "{series}\n{after}");
    }
    assert!(value(&after, "koogate_events_created_total") >= 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn every_metric_has_help_errors_start_at_zero_and_process_metrics_are_there() {
    let gw = TestGateway::start(Backend::Embedded, "metrics-help").await;
    let text = gw.metrics().await;
    // Every family koogate exports has a # HELP line (a histogram by its base name).
    let families: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("koogate_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| n.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count"))
        .collect();
    assert!(families.len() >= 10, "{text}");
    for family in &families {
        assert!(text.contains(&format!("# HELP {family} ")), "no # HELP for {family}:\n{text}");
    }
    // Failure counters exist before the first failure.
    for series in [
        r#"koogate_verification_failures_total{generation="v2",reason="bad_signature"}"#,
        r#"koogate_store_errors_total{backend="embedded",kind="timeout"}"#,
        r#"koogate_delivery_attempts_total{outcome="failed_retryable"}"#,
        "koogate_overload_rejections_total",
    ] {
        assert!(text.lines().any(|l| l.starts_with(series) && l[series.len()..].starts_with(' ')), "{series}:\n{text}");
    }
    // Build and process metrics.
    assert!(text.contains(&format!(r#"koogate_build_info{{version="{}"}} 1"#, env!("CARGO_PKG_VERSION"))), "{text}");
    for name in ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"] {
        assert!(text.lines().any(|l| l.starts_with(name)), "{name} missing:\n{text}");
    }
    gw.stop().await;
}
