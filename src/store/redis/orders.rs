//! The order query cache on Redis ([`OrderCache`]): one string key per
//! order line, expiring with its TTL.

use std::time::Duration;

use async_trait::async_trait;

use super::RedisStore;
use crate::store::{OrderCache, StoreError};

#[async_trait]
impl OrderCache for RedisStore {
    async fn cached_order(&self, order_id: &str, line: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("GET").arg(self.keys.order_cache(order_id, line)).query_async(&mut conn).await?)
    }

    async fn cache_order(&self, order_id: &str, line: &str, answer: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let secs = ttl.as_secs().max(1);
        let () = redis::cmd("SET")
            .arg(self.keys.order_cache(order_id, line))
            .arg(answer)
            .arg("EX")
            .arg(secs)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}
