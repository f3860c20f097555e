//! The account index on Redis (see `crate::accounts`).
//!
//! One sorted set per account, `{sN}:acct:<customer_id>` with N the shard of
//! the customer id (instance id → purchase time), so one account's index sits
//! on one node and a page of it is one `ZREVRANGE`. Instances whose account is
//! not known yet sit in their own shard's `{sN}:acct:pending`, beside their
//! records, and so does the account each instance is linked to
//! (`{sN}:acct:of`, first link wins). Links are written by the delivery step,
//! never by the call's script; `account_pending.lua` marks an instance
//! pending unless it is linked.

use async_trait::async_trait;
use redis::{Script, Value};

use super::{every_shard, RedisStore};
use crate::store::keys::{instance_shard, order_shard};
use crate::store::{AccountIndex, AccountPage, Record, StoreError};

pub(super) struct Scripts {
    pending: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self { pending: Script::new(include_str!("account_pending.lua")) }
    }
}

#[async_trait]
impl AccountIndex for RedisStore {
    async fn account_link(&self, customer_id: &str, instance_id: &str, created_ms: i64) -> Result<(), StoreError> {
        // An instance is linked once (first link wins), as in the embedded
        // store: its owner is kept beside its record, and only the owner's
        // index gets it. Linking again to the owner (a retry) is a no-op.
        let shard = instance_shard(instance_id);
        let of = self.keys.account_of(shard);
        let mut claim = redis::cmd("HSETNX");
        claim.arg(&of).arg(instance_id).arg(customer_id);
        let mut owner = redis::cmd("HGET");
        owner.arg(&of).arg(instance_id);
        let mut clear = redis::cmd("ZREM");
        clear.arg(self.keys.account_pending(shard)).arg(instance_id);
        let replies: Vec<Value> = self.query_all(vec![(shard, claim), (shard, owner), (shard, clear)]).await?;
        let owner: Option<String> = replies.get(1).map(redis::from_redis_value).transpose()?.flatten();
        if owner.as_deref() == Some(customer_id) {
            let mut link = redis::cmd("ZADD");
            link.arg(self.keys.account(customer_id)).arg("NX").arg(created_ms).arg(instance_id);
            let _: Vec<i64> = self.query_all(vec![(order_shard(customer_id), link)]).await?;
        }
        Ok(())
    }

    async fn account_pending(&self, instance_id: &str, since_ms: i64) -> Result<(), StoreError> {
        let shard = instance_shard(instance_id);
        let mut conn = self.conn.clone();
        let _: i64 = self
            .accounts
            .pending
            .key(self.keys.account_pending(shard))
            .key(self.keys.account_of(shard))
            .arg(since_ms)
            .arg(instance_id)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn accounts_pending(&self) -> Result<u64, StoreError> {
        let cmds = every_shard(|s| redis::cmd("ZCARD").arg(self.keys.account_pending(s)).clone());
        let counts: Vec<u64> = self.query_all(cmds).await?;
        Ok(counts.into_iter().sum())
    }

    async fn account_instances(&self, customer_id: &str, offset: u64, limit: u64) -> Result<AccountPage, StoreError> {
        let key = self.keys.account(customer_id);
        let shard = order_shard(customer_id);
        let mut page = redis::cmd("ZREVRANGE");
        let stop = offset.saturating_add(limit).saturating_sub(1);
        page.arg(&key).arg(offset).arg(stop);
        let mut total = redis::cmd("ZCARD");
        total.arg(&key);
        let replies: Vec<Value> = self.query_all(vec![(shard, page), (shard, total)]).await?;
        let bad = || StoreError::Protocol(format!("unexpected account index reply {replies:?}"));
        let ids: Vec<String> = match (limit, replies.first()) {
            (0, _) => Vec::new(),
            (_, Some(v)) => redis::from_redis_value(v).map_err(|_| bad())?,
            (_, None) => return Err(bad()),
        };
        let total: u64 = replies.get(1).map(redis::from_redis_value).transpose().map_err(|_| bad())?.ok_or_else(bad)?;
        Ok(AccountPage { instance_ids: ids, total })
    }

    async fn instance_records(&self, instance_ids: &[String]) -> Result<Vec<Record>, StoreError> {
        self.read_instances(instance_ids.iter().map(String::as_str)).await
    }
}
