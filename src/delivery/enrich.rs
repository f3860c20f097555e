//! Enrichment: completing an event from KooGallery's order query API before
//! it is delivered.
//!
//! A V2 purchase, upgrade or order notification carries only order ids. The
//! delivery worker asks the [`Enricher`] to complete such an event (buyer's
//! account id, SKU, cards, amount, charging mode, period, expiry, settlement)
//! before sending it. While the API fails the event is retried with the
//! delivery backoff, and since it stays the head of its instance, later events
//! of the instance wait behind it. The call itself was answered long before.
//! Answers are cached in the store by order id + line, and what was learned
//! is written back to the instance and purchase order records (so the order
//! ledger knows a V2 buyer, and later events carry the facts).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::domain::field;
use crate::events::{EventType, SkuMap};
use crate::marketplace::order::{parse_answer, OrderApi, OrderError};
use crate::metrics as m;
use crate::store::{CallStore, OrderCache, OutboxEntry, Record, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error(transparent)]
    Order(#[from] OrderError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("event names no order to look up")]
    NoOrder,
}

/// Enrichment uses two roles of the store: the order query cache
/// ([`OrderCache`]) and the instance and order records ([`CallStore`]:
/// `instance`, `enrich`). The server hands it the whole store.
pub struct Enricher<S: ?Sized = dyn Store> {
    pub api: OrderApi,
    pub store: Arc<S>,
    pub sku_map: SkuMap,
    pub cache_ttl: Duration,
}

/// Instance facts that come from orders and hold until the next order changes them: the order's
/// facts ([`field::ORDER_FACTS`]) and these.
const MORE_FACTS: &[&str] = &["settlement", "enriched"];

fn text(entry: &OutboxEntry, field: &str) -> Option<String> {
    entry.change.get(field).and_then(Value::as_str).map(str::to_owned)
}

impl Enricher {
    /// Does this event wait for the order query API? V2 purchases, upgrades
    /// (`subscription.changed` without a refresh scene) and order notifications.
    pub fn needs(entry: &OutboxEntry) -> bool {
        let v2 = entry.record.get("protocol").map(String::as_str) == Some("v2")
            || (entry.kind == EventType::OrderUpdated.as_str() && !entry.record.contains_key("protocol"));
        let kind = match EventType::parse(&entry.kind) {
            Some(EventType::Created | EventType::OrderUpdated) => true,
            Some(EventType::Changed) => !entry.change.contains_key("scene"),
            _ => false,
        };
        v2 && kind && entry.change.get("enriched") != Some(&Value::Bool(true))
    }
}

impl<S: CallStore + OrderCache + Sync + ?Sized> Enricher<S> {
    /// Lays the instance's current order facts over an event that does not
    /// need the order API itself (a renewal, a freeze, a release…). Its
    /// snapshot was taken when the call arrived, possibly before the purchase
    /// or an upgrade was enriched; since an instance's events go out in
    /// order, the current record holds the facts as of this transition.
    /// The call's own fields (`change`) still win.
    pub async fn refresh_facts(&self, entry: &mut OutboxEntry) -> Result<(), EnrichError> {
        if entry.record.get("protocol").map(String::as_str) != Some("v2") {
            return Ok(());
        }
        let (subject, _) = entry.subject_seq();
        let current = self.store.instance(subject).await?;
        if current.get("enriched").map(String::as_str) != Some("1") {
            return Ok(());
        }
        for field in field::ORDER_FACTS.iter().chain(MORE_FACTS) {
            if let Some(v) = current.get(*field) {
                entry.record.insert((*field).to_owned(), v.clone());
            }
        }
        Ok(())
    }

    /// Completes `entry` from the order (cached or queried) and records what was learned.
    pub async fn enrich(&self, entry: &mut OutboxEntry) -> Result<(), EnrichError> {
        let order_id = text(entry, "order_id").ok_or(EnrichError::NoOrder)?;
        let line = text(entry, "order_line_id");
        let line_key = line.clone().unwrap_or_default();
        let info = match self.store.cached_order(&order_id, &line_key).await? {
            Some(body) => {
                m::order_query("cached", "cache");
                parse_answer(&order_id, 200, body.as_bytes())?
            }
            None => match self.api.query_on(&order_id, line.as_deref()).await {
                (host, Ok((body, info))) => {
                    m::order_query("ok", &host);
                    self.store.cache_order(&order_id, &line_key, &body, self.cache_ttl).await?;
                    info
                }
                (host, Err(e)) => {
                    m::order_query(e.label(), &host);
                    // Every class is retried with the delivery backoff (an order just placed may
                    // not be queryable yet; a credential fault is fixed by the operator), but a
                    // credential fault is the operator's to fix: say so loudly, and which one.
                    match &e {
                        OrderError::Credentials { fault, code, .. } => {
                            tracing::error!(%order_id, %host, %code, outcome = fault.label(), error = %e, "order query: KooGallery refused our credentials");
                        }
                        _ => {
                            tracing::warn!(%order_id, outcome = e.label(), error = %e, "order query failed; will retry")
                        }
                    }
                    return Err(e.into());
                }
            },
        };
        let f = info.facts(line.as_deref());
        let settlement = self.sku_map.settle(f.sku_code.as_deref(), f.quantity, f.amount.as_deref());

        let mut record = Record::new();
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                record.insert(k.to_owned(), v.clone());
                entry.change.insert(k.to_owned(), Value::String(v.clone()));
            }
        };
        put("customer_id", &f.customer_id);
        put("customer_name", &f.customer_name);
        put("product_id", &f.product_id);
        put("sku_code", &f.sku_code);
        put("charging_mode", &f.charging_mode);
        put("period_type", &f.period_type);
        put("expire_time", &f.expire_time);
        put("amount", &f.amount);
        put("order_type", &f.order_type);
        if let Some(n) = f.period_number {
            record.insert("period_number".into(), n.to_string());
            entry.change.insert("period_number".into(), json!(n));
        }
        if let Some(q) = f.quantity {
            record.insert("quantity".into(), q.to_string());
        }
        if let Some(s) = &settlement {
            record.insert("settlement".into(), json!(s).to_string());
            entry.change.insert("settlement".into(), json!(s));
        }
        let trial = f.order_type.as_deref() == Some("TRIAL");
        if entry.kind == EventType::Created.as_str() {
            record.insert("trial".into(), if trial { "1" } else { "0" }.into());
            entry.change.insert("trial".into(), json!(trial));
        }
        record.insert("enriched".into(), "1".into());
        entry.change.insert("enriched".into(), Value::Bool(true));

        // The purchase order learns its buyer (the ledger needs it for V2 orders).
        let mut order_fields = Record::new();
        let purchase = (entry.kind == EventType::Created.as_str()).then_some(order_id.as_str());
        if let (Some(_), Some(customer)) = (purchase, &f.customer_id) {
            order_fields.insert(field::CUSTOMER_ID.into(), customer.clone());
        }
        let (subject, _) = entry.subject_seq();
        // Order notifications of orders that created no instance only complete the event.
        let fields = if entry.kind == EventType::OrderUpdated.as_str() { Record::new() } else { record };
        self.store.enrich(subject, &fields, purchase, &order_fields).await?;
        Ok(())
    }
}
