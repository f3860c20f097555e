//! Metrics move as calls are made (its own test binary: the recorder is process-wide).

mod common;

use common::*;

fn value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
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
