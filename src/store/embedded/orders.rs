//! The order query cache in the embedded store ([`OrderCache`]): answers
//! with their expiry time, keyed like the Redis backend's keys.

use std::time::Duration;

use async_trait::async_trait;
use redb::TableDefinition;

use super::{put_json, EmbeddedStore, Reply};
use crate::store::{keys, OrderCache, StoreError};

pub(super) const ORDER_CACHE: TableDefinition<&str, &str> = TableDefinition::new("order_cache");

#[async_trait]
impl OrderCache for EmbeddedStore {
    async fn cached_order(&self, order_id: &str, line: &str) -> Result<Option<String>, StoreError> {
        let cached: Option<(i64, String)> = self.read_json(ORDER_CACHE, &keys::composite("q", &[order_id, line]))?;
        let now = chrono::Utc::now().timestamp_millis();
        Ok(cached.filter(|(expires, _)| *expires > now).map(|(_, body)| body))
    }

    async fn cache_order(&self, order_id: &str, line: &str, answer: &str, ttl: Duration) -> Result<(), StoreError> {
        let key = keys::composite("q", &[order_id, line]);
        let expires = chrono::Utc::now().timestamp_millis() + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let value = (expires, answer.to_owned());
        self.write(move |txn| put_json(txn, ORDER_CACHE, &key, &value).map(|()| (Reply::Done, true))).await?;
        Ok(())
    }
}
