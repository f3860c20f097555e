//! Both stores interpret plans alike: the same calls, applied directly
//! through the `Store` trait, give the same outcomes, records and events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use koogate::events::{assemble, SkuMap};
use koogate::gateway::{Planner, Settings};
use koogate::protocol::call::parse_v2;
use koogate::protocol::crypto::EncryptType;
use koogate::secret::Secret;
use koogate::store::{self, Outcome, Store, StoreSpec};

fn settings() -> Settings {
    Settings {
        window_secs: 60,
        v1_window_secs: 14_400,
        frontend_url: "https://console.example.com".into(),
        admin_url: None,
        encrypt_type: EncryptType::Aes256,
        issue_credentials: false,
        sku_map: SkuMap::default(),
        store_timeout: Duration::from_secs(3),
    }
}

/// Applies every V2 lifecycle fixture (and some repeats) and returns what happened.
async fn run(store: Arc<dyn Store>) -> (Vec<String>, Vec<serde_json::Value>) {
    let settings = settings();
    let key = Secret::new(AK);
    let mut outcomes = Vec::new();
    let mut files = fixture_files("v2");
    files.extend(fixture_files("v2").into_iter().take(12)); // everything again: retries and no-ops
    files.push("v2/bad/unknown-instance.json".into());
    for (i, rel) in files.iter().enumerate() {
        let call = parse_v2(&fixture(rel)).unwrap();
        let planner = Planner { settings: &settings, key: &key, now_ms: 1_764_000_000_000 + i as i64 };
        let plan = planner.plan(&call, Some(&format!("nonce-{i}")));
        let outcome = store.apply(&plan).await.unwrap();
        // Answers with encrypted fields differ per run by their random IV; compare the rest.
        let summary = match &outcome {
            Outcome::Replay => "replay".to_owned(),
            Outcome::Kept { code, .. } => format!("kept {code}"),
            Outcome::Applied { code, event_id, prior_status, answer } => {
                format!("applied {code} event={event_id:?} prior={prior_status:?} answer_len={}", answer.len())
            }
            Outcome::Read { records } => format!("read {}", records.iter().filter(|r| !r.is_empty()).count()),
        };
        outcomes.push(format!("{rel}: {summary}"));
        // The same nonce again is a replay, on every store.
        assert_eq!(store.apply(&plan).await.unwrap(), Outcome::Replay, "{rel}");
    }
    let mut events = Vec::new();
    loop {
        let batch = store.outbox_claim("conformance", 100, Some(Duration::from_secs(30))).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for entry in &batch {
            let mut e = serde_json::to_value(assemble(entry).unwrap()).unwrap();
            e["data"]["app_info_len"] = serde_json::json!(entry.record.get("app_info").map(String::len));
            events.push(e);
        }
        store.outbox_ack(&batch).await.unwrap();
    }
    assert_eq!(store.outbox_len().await.unwrap(), 0);
    events.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    (outcomes, events)
}

#[tokio::test]
async fn redis_and_embedded_stores_behave_alike() {
    let prefix = unique_prefix("conformance");
    let redis = store::open(&StoreSpec::Redis(REDIS_URL.into()), &prefix).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let embedded = store::open(&StoreSpec::Embedded(dir.path().to_owned()), "").await.unwrap();
    let (redis_outcomes, redis_events) = run(redis).await;
    let (embedded_outcomes, embedded_events) = run(embedded).await;
    assert_eq!(redis_outcomes, embedded_outcomes);
    assert_eq!(redis_events, embedded_events);
    assert_eq!(redis_events.len(), 13, "12 transitions and the debug probe's (test) event");
    let kept = redis_outcomes.iter().filter(|o| o.contains(": kept ")).count();
    assert!(kept >= 5, "retries are answered from kept answers: {redis_outcomes:#?}");
    delete_prefix(REDIS_URL, &prefix).await;
}

#[tokio::test]
async fn outbox_entries_not_acknowledged_are_handed_out_again() {
    for backend in BACKENDS {
        let prefix = unique_prefix("stale");
        let dir = tempfile::tempdir().unwrap();
        let spec = match backend {
            Backend::Redis => StoreSpec::Redis(REDIS_URL.into()),
            Backend::Embedded => StoreSpec::Embedded(dir.path().to_owned()),
        };
        let store = store::open(&spec, &prefix).await.unwrap();
        let settings = settings();
        let key = Secret::new(AK);
        let planner = Planner { settings: &settings, key: &key, now_ms: 1_764_000_000_000 };
        let call = parse_v2(&fixture("v2/01-newInstance.json")).unwrap();
        store.apply(&planner.plan(&call, None)).await.unwrap();
        let first = store.outbox_claim("a", 10, Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!(first.len(), 1);
        // Claimed by "a", not stale yet: nobody else gets it.
        assert!(store.outbox_claim("b", 10, Some(Duration::from_secs(60))).await.unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(60)).await;
        // "a" died: after the visibility timeout "b" takes it over.
        // Without asking for the takeover scan, nothing is taken over.
        assert!(store.outbox_claim("b", 10, None).await.unwrap().is_empty());
        let again = store.outbox_claim("b", 10, Some(Duration::from_millis(50))).await.unwrap();
        assert_eq!(again.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), vec![first[0].id.clone()], "{backend:?}");
        store.outbox_ack(&again).await.unwrap();
        assert_eq!(store.outbox_len().await.unwrap(), 0);
        let record = store.instance("028e3b0c-7d93-5e10-9156-f940561c8e6a").await.unwrap();
        assert_eq!(record.get("status").map(String::as_str), Some("active"));
        let _: BTreeMap<String, String> = record;
        delete_prefix(REDIS_URL, &prefix).await;
    }
}
