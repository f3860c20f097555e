//! Account settlement binding: what a Huawei Cloud account holds.
//!
//! In the vendor's billing center a customer chooses "Huawei Cloud account
//! settlement" and types the **Huawei Cloud account ID** (KooGallery's
//! `customerId`); the billing center binds that account to workspaces and
//! must be able to ask: does this account hold an active subscription of
//! ours, which instances (the instance id is the "Resource ID" the customer
//! sees under "My Marketplace > Purchased Apps"), in which state, with how
//! much usage?
//!
//! The store keeps an account index ([`crate::store::AccountIndex`]). It is
//! written where the account becomes known, in the delivery step
//! ([`link_on_delivery`]): a V1 purchase names its buyer in the call; a V2
//! purchase learns it from the order query (enrichment), and until that
//! succeeds the instance is marked pending. The call path is untouched (its
//! one round trip stays one).
//!
//! This module is pure apart from [`link_on_delivery`]: the views and the
//! binding verdict are functions of records, tested without I/O.

use serde_json::{json, Map, Value};

use crate::domain::field;
use crate::domain::field::{USAGE_E4, USAGE_END, USAGE_UNPUSHED_E4};
use crate::domain::status::ACTIVE;
use crate::domain::Status;
use crate::events::EventType;
use crate::store::{AccountIndex, OutboxEntry, Record, StoreError};
use crate::usage::item_usage;
use crate::usage::record::{compact, format_e4};

/// Default and largest page of the account view.
pub const DEFAULT_PAGE: u64 = 50;
pub const MAX_PAGE: u64 = 500;
/// Most instances the binding check looks at (an account holding more is
/// judged on its newest ones).
pub const VERIFY_SCAN: u64 = 1000;

/// Record fields shown as they are, in this order: the status, the order's facts
/// ([`field::ORDER_FACTS`]), then these.
const MORE_FIELDS: &[&str] =
    &["order_id", "order_line_id", "protocol", "created_at", "updated_at", "expire_time", "released_at"];

fn flag(record: &Record, field: &str) -> bool {
    record.get(field).map(String::as_str) == Some("1")
}

/// One instance as the account and resource views show it. The instance id
/// is the "Resource ID" a customer sees on KooGallery.
pub fn instance_view(instance_id: &str, record: &Record) -> Value {
    let mut v = Map::new();
    v.insert("instance_id".into(), json!(instance_id));
    v.insert("resource_id".into(), json!(instance_id));
    for field in std::iter::once(&field::STATUS).chain(field::ORDER_FACTS).chain(MORE_FIELDS) {
        v.insert((*field).into(), record.get(*field).map_or(Value::Null, |s| json!(s)));
    }
    v.insert("trial".into(), json!(flag(record, "trial")));
    v.insert("test".into(), json!(flag(record, "test")));
    let protocol_v2 = record.get("protocol").map(String::as_str) == Some("v2");
    v.insert("enriched".into(), json!(!protocol_v2 || flag(record, "enriched")));
    v.insert("usage".into(), usage_view(record));
    Value::Object(v)
}

/// The instance's usage: what KooGallery has taken and what is accepted but
/// not pushed yet, in all and per billing item (its own, then each package
/// it is linked to).
fn usage_view(record: &Record) -> Value {
    let num = |f: &str| record.get(f).and_then(|v| v.parse::<i64>().ok());
    let items: Vec<Value> = item_usage(record)
        .into_iter()
        .map(|i| {
            json!({
                "related_instance_id": i.related_instance,
                "pushed": format_e4(i.pushed_e4),
                "pushed_until": i.pushed_until.map(compact),
                "unpushed": format_e4(i.unpushed_e4),
            })
        })
        .collect();
    json!({
        "pushed": format_e4(num(USAGE_E4).unwrap_or(0)),
        "pushed_until": num(USAGE_END).map(compact),
        "unpushed": format_e4(num(USAGE_UNPUSHED_E4).unwrap_or(0)),
        "items": items,
    })
}

/// Is the instance held right now: bought, not frozen, expired nor released.
pub fn is_active(record: &Record) -> bool {
    record.get(field::STATUS).map(String::as_str) == Some(ACTIVE)
}

/// Why an account's subscription does not count (the binding check's refusals).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The account holds no instance (or not the one named).
    NoSubscription,
    Frozen,
    Expired,
    Released,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Self::NoSubscription => "no_subscription",
            Self::Frozen => "frozen",
            Self::Expired => "expired",
            Self::Released => "released",
        }
    }
    pub fn http_status(self) -> u16 {
        match self {
            Self::NoSubscription => 404,
            _ => 409,
        }
    }
}

/// The binding check's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The active instances (ids), newest first.
    Active(Vec<String>),
    Refused(Refusal),
}

fn refusal_of(record: &Record) -> Option<Refusal> {
    match record.get(field::STATUS).and_then(|s| Status::parse(s)) {
        Some(Status::Active) => None,
        Some(Status::Frozen) => Some(Refusal::Frozen),
        Some(Status::Expired) => Some(Refusal::Expired),
        Some(Status::Released) => Some(Refusal::Released),
        _ => Some(Refusal::NoSubscription),
    }
}

/// Does an account (its instances, newest first) hold an active subscription?
/// With `named`, only that instance counts (and it must be the account's).
/// Without, any active instance will do; otherwise the refusal says why
/// the newest frozen or expired one does not count, else `released`.
/// Instances of KooGallery debug calls never count.
pub fn verdict(instances: &[(String, Record)], named: Option<&str>) -> Verdict {
    let real = instances.iter().filter(|(_, r)| !flag(r, "test"));
    if let Some(named) = named {
        return match real.clone().find(|(id, _)| id == named) {
            None => Verdict::Refused(Refusal::NoSubscription),
            Some((id, r)) => refusal_of(r).map_or_else(|| Verdict::Active(vec![id.clone()]), Verdict::Refused),
        };
    }
    let active: Vec<String> = real.clone().filter(|(_, r)| is_active(r)).map(|(id, _)| id.clone()).collect();
    if !active.is_empty() {
        return Verdict::Active(active);
    }
    let refusals: Vec<Refusal> = real.filter_map(|(_, r)| refusal_of(r)).collect();
    let first = |want: &[Refusal]| refusals.iter().copied().find(|r| want.contains(r));
    Verdict::Refused(
        first(&[Refusal::Frozen, Refusal::Expired])
            .or_else(|| first(&[Refusal::Released]))
            .unwrap_or(Refusal::NoSubscription),
    )
}

/// When the instance was bought (UNIX ms), from its `created_at`.
pub fn created_ms(record: &Record, fallback: &str) -> i64 {
    let at = record.get(field::CREATED_AT).map_or(fallback, String::as_str);
    chrono::DateTime::parse_from_rfc3339(at).map_or(0, |t| t.timestamp_millis())
}

/// The delivery step's part: before a purchase event goes out, link its
/// instance to its account when the account is known, else (a V2 purchase
/// whose order query has not answered yet) mark it pending, when the order
/// query can still teach it (`may_learn`: enrichment is configured). Debug
/// calls' instances are not indexed. Returns whether the account is known.
pub async fn link_on_delivery<S: AccountIndex + Sync + ?Sized>(
    store: &S,
    entry: &OutboxEntry,
    now_ms: i64,
    may_learn: bool,
) -> Result<bool, StoreError> {
    if entry.kind != EventType::Created.as_str() || entry.test {
        return Ok(true);
    }
    let (instance, _) = entry.subject_seq();
    let customer = entry
        .change
        .get(field::CUSTOMER_ID)
        .and_then(Value::as_str)
        .or_else(|| entry.record.get(field::CUSTOMER_ID).map(String::as_str))
        .filter(|c| !c.is_empty());
    match customer {
        Some(customer) => {
            store.account_link(customer, instance, created_ms(&entry.record, &entry.occurred_at)).await?;
            Ok(true)
        }
        None => {
            if may_learn {
                store.account_pending(instance, now_ms).await?;
            }
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::status::{EXPIRED, FROZEN, RELEASED};

    fn rec(status: &str, test: bool) -> Record {
        Record::from([("status".to_owned(), status.to_owned()), ("test".to_owned(), flag_str(test))])
    }
    fn flag_str(b: bool) -> String {
        if b { "1" } else { "0" }.to_owned()
    }
    fn list(items: &[(&str, &str)]) -> Vec<(String, Record)> {
        items.iter().map(|(id, s)| ((*id).to_owned(), rec(s, false))).collect()
    }

    #[test]
    fn any_active_instance_binds() {
        let l = list(&[("c", RELEASED), ("b", ACTIVE), ("a", ACTIVE)]);
        assert_eq!(verdict(&l, None), Verdict::Active(vec!["b".into(), "a".into()]));
    }

    #[test]
    fn frozen_wins_over_released_and_nothing_is_no_subscription() {
        assert_eq!(verdict(&list(&[("b", RELEASED), ("a", FROZEN)]), None), Verdict::Refused(Refusal::Frozen));
        assert_eq!(verdict(&list(&[("b", EXPIRED), ("a", RELEASED)]), None), Verdict::Refused(Refusal::Expired));
        assert_eq!(verdict(&list(&[("b", RELEASED), ("a", RELEASED)]), None), Verdict::Refused(Refusal::Released));
        assert_eq!(verdict(&[], None), Verdict::Refused(Refusal::NoSubscription));
    }

    #[test]
    fn a_named_instance_must_be_the_accounts_and_active() {
        let l = list(&[("b", FROZEN), ("a", ACTIVE)]);
        assert_eq!(verdict(&l, Some("a")), Verdict::Active(vec!["a".into()]));
        assert_eq!(verdict(&l, Some("b")), Verdict::Refused(Refusal::Frozen));
        assert_eq!(verdict(&l, Some("zz")), Verdict::Refused(Refusal::NoSubscription));
    }

    #[test]
    fn debug_instances_never_bind() {
        let l = vec![("a".to_owned(), rec(ACTIVE, true))];
        assert_eq!(verdict(&l, None), Verdict::Refused(Refusal::NoSubscription));
        assert_eq!(verdict(&l, Some("a")), Verdict::Refused(Refusal::NoSubscription));
    }

    #[test]
    fn refusal_codes_and_statuses() {
        assert_eq!(Refusal::NoSubscription.http_status(), 404);
        for r in [Refusal::Frozen, Refusal::Expired, Refusal::Released] {
            assert_eq!(r.http_status(), 409, "{}", r.code());
        }
    }

    #[test]
    fn views_name_the_resource_id_and_usage() {
        let mut r = rec(ACTIVE, false);
        r.insert("protocol".into(), "v2".into());
        r.insert(USAGE_E4.into(), "125000".into());
        r.insert(format!("{USAGE_E4}:pkg-1"), "25000".into());
        r.insert(USAGE_UNPUSHED_E4.into(), "5".into());
        r.insert("created_at".into(), "2026-12-01T10:00:00.000Z".into());
        let v = instance_view("id-1", &r);
        assert_eq!(v["resource_id"], "id-1");
        assert_eq!(v["enriched"], false);
        assert_eq!(v["usage"]["pushed"], "12.5");
        assert_eq!(v["usage"]["unpushed"], "0.0005");
        let items = v["usage"]["items"].as_array().unwrap();
        assert_eq!((items[0]["related_instance_id"].clone(), items[0]["pushed"].clone()), (Value::Null, json!("10")));
        assert_eq!(
            (items[1]["related_instance_id"].clone(), items[1]["pushed"].clone()),
            (json!("pkg-1"), json!("2.5"))
        );
        assert_eq!(items[0]["unpushed"], "0.0005");
        assert_eq!(created_ms(&r, ""), 1_796_119_200_000);
    }
}
