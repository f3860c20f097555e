//! The account index in the embedded store: the same links as the Redis
//! sorted sets (`crate::store::redis` `accounts`), as ordered redb keys.

use async_trait::async_trait;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{err, EmbeddedStore, Reply, INSTANCES};
use crate::store::{AccountIndex, AccountPage, Record, StoreError};

/// `<len>:<customer id>\t<purchase ms:020>\t<instance id>` → "" : one
/// account's links are one key range, in purchase order.
pub(super) const ACCOUNTS: TableDefinition<&str, &str> = TableDefinition::new("accounts");
/// instance id → customer id: an instance is linked once.
pub(super) const ACCOUNT_OF: TableDefinition<&str, &str> = TableDefinition::new("account_of");
/// instance id → since (UNIX ms): instances whose account is not known yet.
pub(super) const ACCOUNT_PENDING: TableDefinition<&str, i64> = TableDefinition::new("account_pending");

/// The key range of one account: `[start, end)`. The length prefix keeps an
/// account id from being a prefix of another's range.
fn account_range(customer_id: &str) -> (String, String) {
    let base = format!("{}:{customer_id}", customer_id.len());
    (format!("{base}\t"), format!("{base}\n"))
}

#[async_trait]
impl AccountIndex for EmbeddedStore {
    async fn account_link(&self, customer_id: &str, instance_id: &str, created_ms: i64) -> Result<(), StoreError> {
        let (customer, instance) = (customer_id.to_owned(), instance_id.to_owned());
        self.write(move |txn| {
            let mut of = txn.open_table(ACCOUNT_OF).map_err(err)?;
            let linked = of.get(instance.as_str()).map_err(err)?.is_some();
            let mut pending = txn.open_table(ACCOUNT_PENDING).map_err(err)?;
            let was_pending = pending.remove(instance.as_str()).map_err(err)?.is_some();
            if !linked {
                of.insert(instance.as_str(), customer.as_str()).map_err(err)?;
                let key = format!("{}{:020}\t{instance}", account_range(&customer).0, created_ms.max(0));
                txn.open_table(ACCOUNTS).map_err(err)?.insert(key.as_str(), "").map_err(err)?;
            }
            Ok((Reply::Done, !linked || was_pending))
        })
        .await?;
        Ok(())
    }

    async fn account_pending(&self, instance_id: &str, since_ms: i64) -> Result<(), StoreError> {
        let instance = instance_id.to_owned();
        self.write(move |txn| {
            if txn.open_table(ACCOUNT_OF).map_err(err)?.get(instance.as_str()).map_err(err)?.is_some() {
                return Ok((Reply::Done, false));
            }
            let mut pending = txn.open_table(ACCOUNT_PENDING).map_err(err)?;
            if pending.get(instance.as_str()).map_err(err)?.is_some() {
                return Ok((Reply::Done, false));
            }
            pending.insert(instance.as_str(), since_ms).map_err(err)?;
            Ok((Reply::Done, true))
        })
        .await?;
        Ok(())
    }

    async fn accounts_pending(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        txn.open_table(ACCOUNT_PENDING).map_err(err)?.len().map_err(err)
    }

    async fn account_instances(&self, customer_id: &str, offset: u64, limit: u64) -> Result<AccountPage, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(ACCOUNTS).map_err(err)?;
        let (start, end) = account_range(customer_id);
        let mut page = AccountPage::default();
        for row in table.range(start.as_str()..end.as_str()).map_err(err)?.rev() {
            let (key, _) = row.map_err(err)?;
            if page.total >= offset && (page.instance_ids.len() as u64) < limit {
                let instance = key.value().rsplit('\t').next().unwrap_or_default().to_owned();
                page.instance_ids.push(instance);
            }
            page.total += 1;
        }
        Ok(page)
    }

    async fn instance_records(&self, instance_ids: &[String]) -> Result<Vec<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(INSTANCES).map_err(err)?;
        instance_ids
            .iter()
            .map(|id| match table.get(id.as_str()).map_err(err)? {
                Some(raw) => serde_json::from_str(raw.value()).map_err(err),
                None => Ok(Record::new()),
            })
            .collect()
    }
}
