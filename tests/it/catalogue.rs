//! The event catalogue: `docs/events/<type>.schema.json` is what `EventType::schema` generates from the
//! Rust event types (`KOOGATE_BLESS=1 cargo test --test it catalogue::` rewrites the files after a change),
//! and every event the fixtures produce fits the schema of its type. Every other test that reads events
//! (`TestGateway::events`, `Billing::arrivals`) checks them too: see tests/common/catalogue.rs.

use std::collections::BTreeSet;

use koogate::events::EventType;
use serde_json::Value;

use crate::common::catalogue::{check_event, schema, schema_path};
use crate::common::{fixture_files, Backend, TestGateway};

/// A named way to spoil a valid event.
type Break = (&'static str, fn(&mut Value));

#[test]
fn the_schema_files_are_generated_from_the_event_types() {
    let bless = std::env::var_os("KOOGATE_BLESS").is_some();
    let mut stale = Vec::new();
    for kind in EventType::ALL {
        let generated = kind.schema();
        let path = schema_path(kind);
        if bless {
            let text = serde_json::to_string_pretty(&generated).unwrap() + "\n";
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
        } else if !path.exists() || schema(kind) != generated {
            stale.push(path.display().to_string());
        }
    }
    assert!(stale.is_empty(), "out of date with src/events.rs (rerun with KOOGATE_BLESS=1 and commit): {stale:?}");
    // Nothing else in docs/events/: a schema of a type that is gone would mislead.
    let dir = schema_path(EventType::Created).parent().unwrap().to_owned();
    let files: BTreeSet<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let expected: BTreeSet<String> = EventType::ALL.iter().map(|k| format!("{}.schema.json", k.as_str())).collect();
    assert_eq!(files, expected, "docs/events/ holds one schema per event type and nothing else");
}

#[test]
fn every_schema_names_every_field_an_event_serializes() {
    // An event with every optional part present: its keys are the most an event can carry.
    let mut event: Value = serde_json::to_value(koogate::events::Event {
        id: "evt_i_1".into(),
        kind: EventType::Created,
        occurred_at: "2026-11-26T00:00:00.000Z".into(),
        data: koogate::events::EventData {
            previous_status: Some("active".into()),
            contact: Some(Default::default()),
            credentials: Some(Default::default()),
            product_info: Some(Value::Null),
            settlement: Some(koogate::events::Settlement::AccountSettlement),
            ..Default::default()
        },
    })
    .unwrap();
    for kind in EventType::ALL {
        let schema = schema(kind);
        let top: BTreeSet<&String> = event.as_object().unwrap().keys().collect();
        let documented: BTreeSet<&String> = schema["properties"].as_object().unwrap().keys().collect();
        assert_eq!(top, documented, "{}: envelope keys", kind.as_str());
        let data_ref = schema["properties"]["data"]["$ref"].as_str().unwrap().trim_start_matches("#/$defs/");
        let data: BTreeSet<&String> = event["data"].as_object().unwrap().keys().collect();
        let documented: BTreeSet<&String> =
            schema["$defs"][data_ref]["properties"].as_object().unwrap().keys().collect();
        assert_eq!(data, documented, "{}: data keys", kind.as_str());
        event["type"] = Value::String(kind.as_str().into());
        check_event(&event).unwrap();
    }
}

#[test]
fn the_schemas_refuse_what_an_event_is_not() {
    let good: Value = serde_json::from_str(
        r#"{"id":"evt_i_1","type":"subscription.frozen","occurred_at":"2026-11-26T00:00:00.000Z","data":{
        "instance_id":"i","order_id":null,"order_line_id":null,"purchase_order_id":null,"customer_id":null,
        "customer_name":null,"product_id":null,"sku_code":null,"charging_mode":null,"period_type":null,
        "period_number":null,"amount":null,"expire_time":null,"scene":null,"status":"frozen",
        "previous_status":"active","test":false,"trial":false,"protocol":"v2",
        "settlement":{"kind":"stored_value_card","cards":null,"face_value_cny":100,"total_cny":null},
        "order_type":null,"enriched":false}}"#,
    )
    .unwrap();
    check_event(&good).unwrap();
    let broken: [Break; 6] = [
        ("a key every event has is missing", |e| drop(e["data"].as_object_mut().unwrap().remove("customer_id"))),
        ("a boolean is a string", |e| e["data"]["test"] = "0".into()),
        ("a count is negative", |e| e["data"]["period_number"] = (-1).into()),
        ("an unknown settlement kind", |e| e["data"]["settlement"]["kind"] = "gift".into()),
        ("the type is not the schema's", |e| e["type"] = "subscription.unfrozen".into()),
        ("an unknown type", |e| e["type"] = "subscription.deleted".into()),
    ];
    for (what, break_it) in broken {
        let mut event = good.clone();
        break_it(&mut event);
        // `type` picks the schema: the mismatch case is checked against the frozen schema directly.
        let refused = if what == "the type is not the schema's" {
            !jsonschema::draft202012::new(&schema(EventType::Frozen)).unwrap().is_valid(&event)
        } else {
            check_event(&event).is_err()
        };
        assert!(refused, "{what}: accepted {event}");
    }
}

async fn fixtures_events_fit(backend: Backend) {
    let gw = TestGateway::start(backend, "catalogue").await;
    for rel in fixture_files("v2").into_iter().chain(fixture_files("v1")) {
        let res = if rel.starts_with("v1/") { gw.v1_fixture(&rel).await } else { gw.v2_fixture(&rel).await };
        assert_eq!(res.result_code().as_deref(), Some("000000"), "{rel}: {}", String::from_utf8_lossy(&res.body));
    }
    gw.drain().await;
    // `events()` checks each line against its schema.
    let events = gw.events();
    let types: BTreeSet<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    let all: BTreeSet<&str> = EventType::ALL.iter().map(|k| k.as_str()).collect();
    println!("{backend:?}: {} events of {} types fit their schemas", events.len(), types.len());
    assert_eq!(types, all, "the fixtures produce every event type, so every schema meets a real event");
    gw.stop().await;
}

#[tokio::test]
async fn every_fixture_event_fits_its_schema_redis() {
    fixtures_events_fit(Backend::Redis).await;
}

#[tokio::test]
async fn every_fixture_event_fits_its_schema_embedded() {
    fixtures_events_fit(Backend::Embedded).await;
}
