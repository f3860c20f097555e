//! Normalized settlement events: what the billing core receives.
//!
//! An event is a *state transition of an instance*. Envelope:
//! `{"id","type","occurred_at","data"}`; `id` is `evt_<instance id>_<n>` for
//! the instance's n-th transition, minted atomically by the store, so two
//! replicas can never mint two ids for one transition and the billing core
//! can deduplicate by id. The schema is documented in docs/events.md.

use std::collections::BTreeMap;
use std::path::Path;

use crate::domain::field;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EventType {
    #[serde(rename = "subscription.created")]
    Created,
    #[serde(rename = "subscription.renewed")]
    Renewed,
    #[serde(rename = "subscription.converted")]
    Converted,
    #[serde(rename = "subscription.renewal_cancelled")]
    RenewalCancelled,
    #[serde(rename = "subscription.changed")]
    Changed,
    #[serde(rename = "subscription.frozen")]
    Frozen,
    #[serde(rename = "subscription.unfrozen")]
    Unfrozen,
    #[serde(rename = "subscription.expired")]
    Expired,
    #[serde(rename = "subscription.released")]
    Released,
    #[serde(rename = "order.updated")]
    OrderUpdated,
}

impl EventType {
    pub const ALL: [EventType; 10] = [
        Self::Created,
        Self::Renewed,
        Self::Converted,
        Self::RenewalCancelled,
        Self::Changed,
        Self::Frozen,
        Self::Unfrozen,
        Self::Expired,
        Self::Released,
        Self::OrderUpdated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "subscription.created",
            Self::Renewed => "subscription.renewed",
            Self::Converted => "subscription.converted",
            Self::RenewalCancelled => "subscription.renewal_cancelled",
            Self::Changed => "subscription.changed",
            Self::Frozen => "subscription.frozen",
            Self::Unfrozen => "subscription.unfrozen",
            Self::Expired => "subscription.expired",
            Self::Released => "subscription.released",
            Self::OrderUpdated => "order.updated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// How the purchase settles, from the SKU map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Settlement {
    StoredValueCard {
        /// Number of cards; `null` when the call did not say (V2 before enrichment).
        cards: Option<u64>,
        face_value_cny: u64,
        total_cny: Option<u64>,
    },
    AccountSettlement,
}

/// One normalized event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub occurred_at: String,
    pub data: EventData,
}

/// The event's facts. Every key is always present (`null` when unknown), so
/// consumers see one stable shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct EventData {
    pub instance_id: Option<String>,
    /// The order of *this* transition (the renewal's, the upgrade's, …).
    pub order_id: Option<String>,
    pub order_line_id: Option<String>,
    /// The order that created the instance.
    pub purchase_order_id: Option<String>,
    /// The buyer's Huawei Cloud account id, when known.
    pub customer_id: Option<String>,
    pub customer_name: Option<String>,
    pub product_id: Option<String>,
    pub sku_code: Option<String>,
    pub charging_mode: Option<String>,
    pub period_type: Option<String>,
    pub period_number: Option<u64>,
    /// Order amount in yuan, as sent (decimal string).
    pub amount: Option<String>,
    /// RFC 3339 UTC.
    pub expire_time: Option<String>,
    /// refreshInstance scene.
    pub scene: Option<String>,
    /// Instance status after the transition: active, frozen, expired, released.
    pub status: Option<String>,
    /// Status before a freeze/unfreeze.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_status: Option<String>,
    pub test: bool,
    pub trial: bool,
    /// `v1` or `v2`.
    pub protocol: Option<String>,
    pub settlement: Option<Settlement>,
    /// KooGallery's order type (NEW, TRIAL, RENEW, CHANGE, …), once enriched.
    pub order_type: Option<String>,
    /// True once the order query API filled the purchase details.
    pub enriched: bool,
    /// V1 buyer contact (decrypted). Personal data: never logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact: Option<Contact>,
    /// Initial login issued in the newInstance answer (`KOOGATE_ISSUE_CREDENTIALS`).
    /// Secret: never logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    /// changeInstanceCheck target / upgrade target as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_info: Option<Value>,
}

impl EventType {
    /// When the gateway emits this type (the catalogue's description).
    pub fn meaning(self) -> &'static str {
        match self {
            Self::Created => "A new instance: newInstance (V1 and V2).",
            Self::Renewed => "The instance was renewed: refreshInstance with scene RENEWAL.",
            Self::Converted => "A trial became a paid subscription: refreshInstance with scene TRIAL_TO_FORMAL.",
            Self::RenewalCancelled => {
                "The customer unsubscribed a renewal period: refreshInstance with scene UNSUBSCRIBE_RENEWAL_PERIOD."
            }
            Self::Changed => {
                "The subscription changed: upgradeInstance (V1 upgrade) or refreshInstance RENEWAL_CHANGE."
            }
            Self::Frozen => "The instance was frozen (V2 FREEZE, V1 instanceStatus FREEZE).",
            Self::Unfrozen => "The instance was unfrozen (V2 UNFREEZE, V1 instanceStatus NORMAL).",
            Self::Expired => "The instance expired: V1 expireInstance.",
            Self::Released => "The instance was released (deleted, refunded): releaseInstance.",
            Self::OrderUpdated => "KooGallery notified an order change: orderNotify.",
        }
    }

    /// This type's JSON Schema (draft 2020-12), generated from [`Event`] as it
    /// is serialized, with `type` fixed to this type: what
    /// `docs/events/<type>.schema.json` holds (tests/it/catalogue.rs checks it).
    pub fn schema(self) -> Value {
        let generator = schemars::generate::SchemaSettings::draft2020_12().for_serialize().into_generator();
        let mut schema = generator.into_root_schema_for::<Event>().to_value();
        schema["title"] = Value::String(self.as_str().to_owned());
        schema["description"] = Value::String(format!(
            "{} Delivered as one Standard Webhooks request; deduplicate by `id` (also the webhook-id header).",
            self.meaning()
        ));
        schema["properties"]["type"] = serde_json::json!({ "const": self.as_str() });
        if let Some(defs) = schema.get_mut("$defs").and_then(Value::as_object_mut) {
            defs.remove("EventType");
        }
        schema
    }
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Credentials {
    pub user_name: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(***)")
    }
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Contact {
    pub mobile_phone: Option<String>,
    pub email: Option<String>,
    /// V1 contact fields (`mobilePhone`, `email`) that arrived but could not be
    /// decrypted with the access key and `KOOGATE_ENCRYPT_TYPE`: left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undecryptable: Vec<String>,
}

impl std::fmt::Debug for Contact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Contact(***)")
    }
}

/// Record fields carried into events, and how to type them.
fn typed(field: &str, value: &str) -> Option<Value> {
    Some(match field {
        "test" | "trial" | "enriched" => Value::Bool(value == "1" || value == "true"),
        "period_number" => Value::from(value.parse::<u64>().ok()?),
        "settlement" => serde_json::from_str(value).ok()?,
        "instance_id" | "order_id" | "order_line_id" | "customer_id" | "customer_name" | "product_id" | "sku_code"
        | "charging_mode" | "period_type" | "amount" | "expire_time" | "status" | "protocol" | "order_type" => {
            Value::String(value.to_owned())
        }
        _ => return None,
    })
}

/// The deterministic event id of a subject's `seq`-th transition.
pub fn event_id(subject: &str, seq: u64) -> String {
    format!("evt_{subject}_{seq}")
}

/// Splits an event id into its subject (instance id) and sequence number.
pub fn parse_event_id(id: &str) -> Option<(&str, u64)> {
    let rest = id.strip_prefix("evt_")?;
    let (subject, seq) = rest.rsplit_once('_')?;
    Some((subject, seq.parse().ok()?))
}

/// One event waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Where it sits in the outbox (stream id, or the embedded sequence).
    #[serde(default)]
    pub cursor: String,
    /// Shard it belongs to.
    pub shard: u8,
    pub id: String,
    pub kind: String,
    pub occurred_at: String,
    pub test: bool,
    /// The subject record right after the transition.
    pub record: BTreeMap<String, String>,
    /// The call's own fields (a JSON object).
    pub change: serde_json::Map<String, serde_json::Value>,
    /// Put back by a redrive: delivered even though later events of its
    /// instance already were.
    #[serde(default)]
    pub redrive: bool,
}

impl OutboxEntry {
    /// The instance this event belongs to and its place in that instance's order.
    pub fn subject_seq(&self) -> (&str, u64) {
        parse_event_id(&self.id).unwrap_or((self.id.as_str(), 0))
    }
}

/// Builds the event of an outbox entry: the instance record right after the
/// transition, overlaid with the call's own fields. Pure: unit-tested.
pub fn assemble(entry: &OutboxEntry) -> Result<Event, AssembleError> {
    let kind =
        EventType::parse(&entry.kind).ok_or_else(|| AssembleError(format!("unknown event type {:?}", entry.kind)))?;
    let mut data = Map::new();
    for (field, value) in &entry.record {
        if let Some(v) = typed(field, value) {
            data.insert(field.clone(), v);
        }
    }
    if let Some(order) = entry.record.get(field::ORDER_ID) {
        data.insert("purchase_order_id".into(), Value::String(order.clone()));
    }
    for (field, value) in &entry.change {
        data.insert(field.clone(), value.clone());
    }
    data.insert("test".into(), Value::Bool(entry.test));
    let data: EventData = serde_json::from_value(Value::Object(data)).map_err(|e| AssembleError(e.to_string()))?;
    Ok(Event { id: entry.id.clone(), kind, occurred_at: entry.occurred_at.clone(), data })
}

#[derive(Debug, thiserror::Error)]
#[error("outbox entry cannot become an event: {0}")]
pub struct AssembleError(String);

/// What the SKU map says of one SKU.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkuRule {
    pub kind: SettlementKind,
    /// Face value of one card in yuan (stored-value cards).
    #[serde(default = "default_face_value")]
    pub face_value_cny: u64,
}

fn default_face_value() -> u64 {
    100
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettlementKind {
    StoredValueCard,
    AccountSettlement,
}

/// `KOOGATE_SKU_MAP`: which SKU settles how.
///
/// ```toml
/// default = "account_settlement"       # SKUs not listed (omit: no settlement object)
/// [skus."0a4d1578-5295-46a7-92d4-7c803dccc51d"]
/// kind = "stored_value_card"
/// face_value_cny = 100
/// ```
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkuMap {
    #[serde(default)]
    pub default: Option<SettlementKind>,
    #[serde(default)]
    pub skus: BTreeMap<String, SkuRule>,
}

#[derive(Debug, thiserror::Error)]
pub enum SkuMapError {
    #[error("cannot read SKU map {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("SKU map {path} is not valid: {message}")]
    Parse { path: String, message: String },
}

impl SkuMap {
    pub fn load(path: &Path) -> Result<Self, SkuMapError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| SkuMapError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text)
            .map_err(|e| SkuMapError::Parse { path: path.display().to_string(), message: e.message().to_owned() })
    }

    /// The settlement of a purchase of `sku` (`None` = not known yet).
    /// `quantity` is the linear quantity (cards); `amount` the order amount in
    /// yuan, used to count cards when no quantity was sent.
    pub fn settle(&self, sku: Option<&str>, quantity: Option<u64>, amount: Option<&str>) -> Option<Settlement> {
        let rule = sku.and_then(|s| self.skus.get(s));
        let kind = rule.map(|r| r.kind).or(self.default)?;
        Some(match kind {
            SettlementKind::AccountSettlement => Settlement::AccountSettlement,
            SettlementKind::StoredValueCard => {
                let face = rule.map_or(default_face_value(), |r| r.face_value_cny);
                let cards = quantity.or_else(|| cards_from_amount(amount?, face));
                Settlement::StoredValueCard {
                    cards,
                    face_value_cny: face,
                    total_cny: cards.and_then(|c| c.checked_mul(face)),
                }
            }
        })
    }

    /// The settlement kind a SKU would get (changeInstanceCheck).
    pub fn kind_of(&self, sku: &str) -> Option<SettlementKind> {
        self.skus.get(sku).map(|r| r.kind).or(self.default)
    }
}

/// `amount` yuan of `face`-yuan cards, when it is a whole number of cards.
fn cards_from_amount(amount: &str, face: u64) -> Option<u64> {
    let (int, frac) = amount.split_once('.').unwrap_or((amount, ""));
    if !frac.bytes().all(|b| b == b'0') || face == 0 {
        return None;
    }
    let yuan: u64 = int.parse().ok()?;
    yuan.is_multiple_of(face).then_some(yuan / face)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> SkuMap {
        toml::from_str(
            r#"
            default = "account_settlement"
            [skus.card]
            kind = "stored_value_card"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn sku_map_settles_cards_and_accounts() {
        let m = map();
        assert_eq!(
            m.settle(Some("card"), Some(50), None),
            Some(Settlement::StoredValueCard { cards: Some(50), face_value_cny: 100, total_cny: Some(5000) })
        );
        assert_eq!(
            m.settle(Some("card"), None, Some("5000.00")),
            Some(Settlement::StoredValueCard { cards: Some(50), face_value_cny: 100, total_cny: Some(5000) })
        );
        assert_eq!(
            m.settle(Some("card"), None, Some("4999.50")),
            Some(Settlement::StoredValueCard { cards: None, face_value_cny: 100, total_cny: None })
        );
        assert_eq!(m.settle(Some("other"), None, None), Some(Settlement::AccountSettlement));
        assert_eq!(m.settle(None, None, None), Some(Settlement::AccountSettlement));
        assert_eq!(SkuMap::default().settle(None, None, None), None);
        assert!(toml::from_str::<SkuMap>("[skus.x]\nkind = \"gift\"").is_err());
        let json = serde_json::to_string(&m.settle(Some("card"), Some(50), None)).unwrap();
        assert_eq!(json, r#"{"kind":"stored_value_card","cards":50,"face_value_cny":100,"total_cny":5000}"#);
    }

    #[test]
    fn assemble_overlays_the_call_on_the_record() {
        let record: BTreeMap<String, String> = [
            ("instance_id", "i-1"),
            ("order_id", "CS1"),
            ("status", "active"),
            ("test", "0"),
            ("trial", "1"),
            ("protocol", "v2"),
            ("period_number", "1"),
            ("settlement", r#"{"kind":"account_settlement"}"#),
            ("seq", "2"),
            ("app_info", "{}"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let change: Map<String, Value> =
            serde_json::from_str(r#"{"order_id":"CS2","scene":"RENEWAL","expire_time":"2026-01-01T00:00:00Z"}"#)
                .unwrap();
        let entry = OutboxEntry {
            cursor: "1".into(),
            shard: 0,
            id: "evt_i-1_2".into(),
            kind: "subscription.renewed".into(),
            occurred_at: "2026-11-26T00:00:00.000Z".into(),
            test: true,
            record,
            change,
            redrive: false,
        };
        let e = assemble(&entry).unwrap();
        assert_eq!(e.kind, EventType::Renewed);
        assert_eq!(e.data.order_id.as_deref(), Some("CS2"));
        assert_eq!(e.data.purchase_order_id.as_deref(), Some("CS1"));
        assert_eq!(e.data.scene.as_deref(), Some("RENEWAL"));
        assert!(e.data.trial && e.data.test);
        assert_eq!(e.data.period_number, Some(1));
        assert_eq!(e.data.settlement, Some(Settlement::AccountSettlement));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["type"], "subscription.renewed");
        assert!(json["data"].get("app_info").is_none() && json["data"].get("seq").is_none());
        assert!(json["data"]["customer_id"].is_null());
    }
}
