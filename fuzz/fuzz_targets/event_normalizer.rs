//! From a parsed call to the events the billing core receives.
//!
//! Input: one mode byte, then a V2 JSON body (mode bit 0 clear) or a V1 query string
//! (bit 0 set; decoded with `form_urlencoded`, a repeated name keeps its last value).
//! Bits 1-4 pick the gateway settings: issued credentials, AES-128 instead of AES-256,
//! an admin URL, no default in the SKU map. A call that parses is planned with
//! `gateway::Planner::plan(&call, Some("nonce"))`, and then:
//! - the plan serializes with serde_json (what the Redis store sends its Lua script) and
//!   reads back to the same JSON;
//! - every branch's answer is a JSON object whose `resultCode` is the branch's code;
//! - every branch with an event becomes an `OutboxEntry` the way the stores make one
//!   (record = the instance record after the transition, change = the event's change
//!   object), twice: with the branch's `set` alone, and laid over an existing instance in
//!   the branch's status; `events::assemble` must succeed for each, and the event must keep
//!   the plan's type, time and test flag and survive a JSON round trip;
//! - a queryInstance plan's answer is made from no records and from found ones.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use koogate::events::{assemble, Event, SettlementKind, SkuMap, SkuRule};
use koogate::gateway::{Planner, Settings};
use koogate::protocol::answer::code_of;
use koogate::protocol::call::{parse_v1, parse_v2, Activity, Call};
use koogate::protocol::crypto::EncryptType;
use koogate::protocol::{Generation, ResultCode};
use koogate::secret::Secret;
use koogate::store::plan::{event_id, ABSENT, ANY};
use koogate::store::{OutboxEntry, Plan, Record};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fn settings(mode: u8) -> Settings {
    // fixtures/sku-map.toml, optionally without its default.
    let card = SkuRule { kind: SettlementKind::StoredValueCard, face_value_cny: 100 };
    let sku_map = SkuMap {
        default: (mode & 16 == 0).then_some(SettlementKind::AccountSettlement),
        skus: BTreeMap::from([
            ("svc-card-100".to_owned(), card.clone()),
            ("0a4d1578-5295-46a7-92d4-7c803dccc51d".to_owned(), card),
        ]),
    };
    Settings {
        window_secs: common::WINDOW_SECS,
        v1_window_secs: common::WINDOW_SECS,
        frontend_url: "https://app.example.com/koogallery".into(),
        admin_url: (mode & 8 != 0).then(|| "https://admin.example.com".into()),
        encrypt_type: if mode & 4 != 0 { EncryptType::Aes128 } else { EncryptType::Aes256 },
        issue_credentials: mode & 2 != 0,
        sku_map,
        store_timeout: Duration::from_secs(2),
    }
}

fn parse(mode: u8, input: &[u8]) -> Option<Call> {
    if mode & 1 == 0 {
        parse_v2(input).ok()
    } else {
        let params: BTreeMap<String, String> =
            form_urlencoded::parse(input).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        parse_v1(&params, common::KEY, koogate::protocol::crypto::EncryptType::Aes256).ok()
    }
}

/// An answer body: a JSON object with a known `resultCode`.
fn check_answer(answer: &str, code: Option<&str>) {
    let value: Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("answer is not JSON ({e}): {answer}"));
    let got = value.get("resultCode").and_then(Value::as_str).unwrap_or_else(|| panic!("no resultCode: {answer}"));
    let parsed = ResultCode::parse(got).unwrap_or_else(|| panic!("unknown resultCode: {answer}"));
    assert_eq!(code_of(answer), Some(parsed));
    assert!(value.get("resultMsg").is_some_and(Value::is_string), "no resultMsg: {answer}");
    if let Some(code) = code {
        assert_eq!(got, code, "{answer}");
    }
}

/// The record of an existing instance in `status` (before the branch's `set` is laid on it):
/// what a newInstance made, as the stores keep it.
fn existing(planner: &Planner, generation: Generation, status: &str) -> Record {
    let params: BTreeMap<String, String> = [
        ("activity", "newInstance"),
        ("businessId", "61e834ba-7b97-4418-b8f7-e5345137278c"),
        ("customerId", "68cbc86abc2018ab880d92f36422fa0e"),
        ("expireTime", "20271126153156"),
        ("orderId", "CS1906666666ABCDE"),
        ("productId", "00301-666666-0--0"),
        ("skuCode", "svc-card-100"),
        ("chargingMode", "3"),
        ("orderAmount", "5000.00"),
        ("periodNumber", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let call = match generation {
        Generation::V1 => parse_v1(&params, common::KEY, koogate::protocol::crypto::EncryptType::Aes256),
        Generation::V2 => parse_v2(
            br#"{"activity":"newInstance","businessId":"b","orderId":"CS2211181819B4LVS","orderLineId":"CS2211181819B4LVS-000001"}"#,
        ),
    }
    .expect("the base newInstance parses");
    let plan = planner.plan(&call, None);
    let mut record = plan.branches[ABSENT].set.clone();
    record.insert("seq".into(), "3".into());
    record.insert("status".into(), status.to_owned());
    record
}

fn check_event(plan: &Plan, spec: &koogate::store::EventSpec, record: Record, change: &Map<String, Value>) {
    let seq = record.get("seq").and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) + 1;
    let entry = OutboxEntry {
        cursor: String::new(),
        shard: plan.shard,
        id: event_id(&plan.subject, seq),
        kind: spec.kind.clone(),
        occurred_at: spec.occurred_at.clone(),
        test: spec.test,
        record,
        change: change.clone(),
        redrive: false,
    };
    let event = assemble(&entry).unwrap_or_else(|e| panic!("{e}\nplan: {plan:?}\nentry: {entry:?}"));
    assert_eq!(event.kind.as_str(), spec.kind);
    assert_eq!(event.occurred_at, spec.occurred_at);
    assert_eq!(event.data.test, spec.test);
    assert_eq!(entry.subject_seq(), (plan.subject.as_str(), seq));
    let json = serde_json::to_string(&event).expect("an event serializes");
    let back: Event = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(back, event, "{json}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else { return };
    let Some(call) = parse(mode, input) else { return };
    let settings = settings(mode);
    let key = Secret::new(common::KEY);
    let planner = Planner { settings: &settings, key: &key, now_ms: common::NOW_MS };
    let plan = planner.plan(&call, Some("nonce"));

    // What the Redis store sends.
    let json = serde_json::to_string(&plan).expect("a plan serializes");
    let back: Plan = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(serde_json::to_string(&back).expect("a plan serializes"), json);
    assert_eq!(plan.nonce.as_deref(), Some("nonce"));
    assert!(plan.shard < koogate::store::keys::SHARDS);

    if let Activity::QueryInstance { instance_ids } = &call.activity {
        assert!(plan.branches.is_empty());
        assert_eq!(&plan.read, instance_ids);
        let none = vec![Record::new(); plan.read.len()];
        let answer = planner.query_answer(&plan.read, &none, &Default::default());
        check_answer(&answer, Some(ResultCode::InstanceNotFound.as_str()));
        let found: Vec<Record> = plan.read.iter().map(|_| existing(&planner, call.generation, "active")).collect();
        check_answer(
            &planner.query_answer(&plan.read, &found, &Default::default()),
            Some(ResultCode::Success.as_str()),
        );
        return;
    }
    assert!(plan.read.is_empty());
    assert!(plan.branches.contains_key(ANY) || plan.branches.contains_key(ABSENT), "{plan:?}");

    for (status, branch) in &plan.branches {
        check_answer(&branch.answer, Some(&branch.code));
        let Some(spec) = &branch.event else { continue };
        let change = match serde_json::from_str::<Value>(&spec.change) {
            Ok(Value::Object(map)) => map,
            other => panic!("event change is not a JSON object: {other:?}: {}", spec.change),
        };
        // The branch's set alone (a record the store did not have yet).
        check_event(&plan, spec, branch.set.clone(), &change);
        // Laid over an instance in that status, as the stores do.
        if status != ABSENT && status != ANY {
            let mut record = existing(&planner, call.generation, status);
            record.extend(branch.set.clone());
            check_event(&plan, spec, record, &change);
        }
    }
});
