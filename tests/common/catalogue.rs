//! The event catalogue, `docs/events/<type>.schema.json`: every event a test reads (from `events.jsonl`
//! through `TestGateway::events`, or signed deliveries through `Billing::arrivals`) is checked against the
//! schema of its type, so the whole suite's events are validated, not a sample.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use koogate::events::EventType;
use serde_json::Value;

/// Where the schema of one event type is kept.
pub fn schema_path(kind: EventType) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join("events").join(format!("{}.schema.json", kind.as_str()))
}

/// The schema file of one event type, as JSON.
pub fn schema(kind: EventType) -> Value {
    let path = schema_path(kind);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

fn validators() -> &'static BTreeMap<&'static str, jsonschema::Validator> {
    static VALIDATORS: OnceLock<BTreeMap<&'static str, jsonschema::Validator>> = OnceLock::new();
    VALIDATORS.get_or_init(|| {
        EventType::ALL
            .into_iter()
            .map(|kind| {
                let validator = jsonschema::draft202012::new(&schema(kind))
                    .unwrap_or_else(|e| panic!("{}: not a valid JSON Schema: {e}", schema_path(kind).display()));
                (kind.as_str(), validator)
            })
            .collect()
    })
}

/// Why `event` does not fit the schema of its `type`, if it does not.
pub fn check_event(event: &Value) -> Result<(), String> {
    let kind = event["type"].as_str().ok_or_else(|| format!("event without a type: {event}"))?;
    let validator = validators().get(kind).ok_or_else(|| format!("no schema for event type {kind:?}"))?;
    let errors: Vec<String> = validator.iter_errors(event).map(|e| format!("{e} (at {})", e.instance_path())).collect();
    if errors.is_empty() {
        return Ok(());
    }
    Err(format!("event {} does not fit docs/events/{kind}.schema.json: {}", event["id"], errors.join("; ")))
}

/// Panics, naming the schema and what is wrong, when `event` does not fit it.
pub fn assert_event(event: &Value) {
    if let Err(why) = check_event(event) {
        panic!("{why}");
    }
}
