//! The embedded backend: one redb file, no server needed.
//!
//! All writes go through one writer thread that applies plans in arrival
//! order and commits them in small groups (group commit): each plan still
//! sees every earlier plan's writes, and a commit that fails fails every
//! plan of its group, so nothing is answered "stored" that is not on disk.
//! The database file is locked: one gateway process per directory.
//!
//! This file holds the plumbing every role shares (the tables of records,
//! the writer thread, JSON values in tables); each role of
//! [`crate::store::Store`] is implemented in its own file, by the same steps
//! as the Redis backend's file of that role: `calls`, `outbox`, `history`,
//! `orders`, `usage` and `accounts`.

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::oneshot;

use super::plan::{Outcome, Record, Redeem};
use super::{Store, StoreError};
use crate::usage::{Decision, UsageClaim};

mod accounts;
mod calls;
mod history;
mod orders;
mod outbox;
mod usage;

const NONCES: TableDefinition<&str, i64> = TableDefinition::new("nonces");
const ANSWERS: TableDefinition<&str, &str> = TableDefinition::new("answers");
const INSTANCES: TableDefinition<&str, &str> = TableDefinition::new("instances");
const ORDERS: TableDefinition<&str, &str> = TableDefinition::new("orders");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Most jobs committed together.
const MAX_GROUP: usize = 256;
/// How often expired nonces are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Embedded(e.to_string())
}

/// What a write job hands back.
enum Reply {
    Outcome(Outcome),
    Done,
    Moved(bool),
    Redeem(Redeem),
    Decisions(Vec<Decision>),
    Claims(Vec<UsageClaim>),
}

/// A write job: runs inside the group's transaction; says whether it wrote.
type TxnFn = Box<dyn FnOnce(&WriteTransaction) -> Result<(Reply, bool), StoreError> + Send>;

struct Job {
    run: TxnFn,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

/// redb's page cache. Its default (1 GiB) let the cache grow with the file:
/// 236 MiB RSS at the benchmark's peak. Pages not cached are read back from
/// the OS page cache, so a small cache costs little.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

pub struct EmbeddedStore {
    db: Arc<Database>,
    /// `None` only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    claims: Mutex<outbox::Claims>,
    /// How long delivered events are kept in the history (zero: none).
    retention: Duration,
}

impl Drop for EmbeddedStore {
    /// Stops the writer thread and waits for it, so the file lock is released
    /// when the store is gone (a restart in the same process can reopen it).
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/koogate.redb`, keeping delivered events for
    /// `retention` (what is past it is pruned now).
    pub fn open(dir: &Path, retention: Duration) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("koogate.redb");
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(err)?;
        {
            txn.open_table(NONCES).map_err(err)?;
            txn.open_table(ANSWERS).map_err(err)?;
            txn.open_table(INSTANCES).map_err(err)?;
            txn.open_table(ORDERS).map_err(err)?;
            txn.open_table(outbox::OUTBOX).map_err(err)?;
            txn.open_table(outbox::ATTEMPTS).map_err(err)?;
            txn.open_table(outbox::DLQ).map_err(err)?;
            txn.open_table(history::HISTORY).map_err(err)?;
            txn.open_table(history::HISTORY_INDEX).map_err(err)?;
            txn.open_table(META).map_err(err)?;
            txn.open_table(orders::ORDER_CACHE).map_err(err)?;
            for table in [accounts::ACCOUNTS, accounts::ACCOUNT_OF] {
                txn.open_table(table).map_err(err)?;
            }
            txn.open_table(accounts::ACCOUNT_PENDING).map_err(err)?;
            for table in [
                usage::USAGE,
                usage::PACKAGE_LINKS,
                usage::USAGE_PERIODS,
                usage::USAGE_PENDING,
                usage::USAGE_UNPUSHED,
                usage::USAGE_DLQ,
                usage::USAGE_BY_INSTANCE,
            ] {
                txn.open_table(table).map_err(err)?;
            }
        }
        let pruned = history::prune_all(&txn, retention)?;
        if pruned > 0 {
            tracing::info!(pruned, "history: delivered events past the retention removed");
        }
        txn.commit().map_err(err)?;
        let db = Arc::new(db);
        let (jobs, rx) = mpsc::channel();
        let writer_db = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("koogate-embedded-writer".into())
            .spawn(move || writer(&writer_db, &rx))
            .map_err(err)?;
        Ok(Self {
            db,
            jobs: Some(jobs),
            writer: Some(writer),
            claims: Mutex::new(outbox::Claims::default()),
            retention,
        })
    }

    /// Runs `f` in the writer thread's next group transaction.
    async fn write(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<(Reply, bool), StoreError> + Send + 'static,
    ) -> Result<Reply, StoreError> {
        let (reply, rx) = oneshot::channel();
        let jobs = self.jobs.as_ref().ok_or_else(|| err("store is closing"))?;
        jobs.send(Job { run: Box::new(f), reply }).map_err(|_| err("writer thread is gone"))?;
        rx.await.map_err(|_| err("writer dropped the job (its group failed)"))?
    }

    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &str>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(table).map_err(err)?;
        let raw = t.get(key).map_err(err)?;
        raw.map(|v| serde_json::from_str(v.value()).map_err(err)).transpose()
    }
}

/// The writer thread: runs jobs in order, commits them in groups.
fn writer(db: &Database, rx: &mpsc::Receiver<Job>) {
    let mut last_sweep = Instant::now();
    loop {
        let first = match rx.recv_timeout(SWEEP_EVERY) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                sweep_nonces(db);
                last_sweep = Instant::now();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        run_group(db, group);
        if last_sweep.elapsed() >= SWEEP_EVERY {
            sweep_nonces(db);
            last_sweep = Instant::now();
        }
    }
}

/// Runs a group in one transaction. Replies go out only after the commit;
/// if anything fails, every job of the group is answered with the error.
fn run_group(db: &Database, group: Vec<Job>) {
    let mut done = Vec::with_capacity(group.len());
    let mut failed = Vec::new();
    let result = (|| -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(err)?;
        // A group that only read (replays) is not committed: the file stays byte-identical.
        let mut wrote = false;
        let mut jobs = group.into_iter();
        for Job { run, reply } in jobs.by_ref() {
            match run(&txn) {
                Ok((value, w)) => {
                    wrote |= w;
                    done.push((reply, value));
                }
                Err(e) => {
                    failed.push(reply);
                    failed.extend(jobs.map(|j| j.reply));
                    return Err(e);
                }
            }
        }
        if wrote {
            txn.commit().map_err(err)
        } else {
            txn.abort().map_err(err)
        }
    })();
    match result {
        Ok(()) => {
            for (reply, value) in done {
                let _ = reply.send(Ok(value));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "embedded store transaction failed; every call of the group is answered as failed");
            for reply in done.into_iter().map(|(r, _)| r).chain(failed) {
                let _ = reply.send(Err(err(&e)));
            }
        }
    }
}

fn get_json<T: serde::de::DeserializeOwned>(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &str>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let t = txn.open_table(table).map_err(err)?;
    let raw = t.get(key).map_err(err)?;
    raw.map(|v| serde_json::from_str(v.value()).map_err(err)).transpose()
}

fn put_json<T: serde::Serialize>(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &str>,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(value).map_err(err)?;
    txn.open_table(table).map_err(err)?.insert(key, json.as_str()).map_err(err)?;
    Ok(())
}

fn get_record(txn: &WriteTransaction, table: TableDefinition<&str, &str>, key: &str) -> Result<Record, StoreError> {
    let t = txn.open_table(table).map_err(err)?;
    let raw = t.get(key).map_err(err)?;
    match raw {
        Some(v) => serde_json::from_str(v.value()).map_err(err),
        None => Ok(Record::new()),
    }
}

fn put_record(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &str>,
    key: &str,
    record: &Record,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(record).map_err(err)?;
    txn.open_table(table).map_err(err)?.insert(key, json.as_str()).map_err(err)?;
    Ok(())
}

fn sweep_nonces(db: &Database) {
    let now = chrono::Utc::now().timestamp_millis();
    let swept = (|| -> Result<(), StoreError> {
        let expired = {
            let read = db.begin_read().map_err(err)?;
            let table = read.open_table(NONCES).map_err(err)?;
            let mut any = false;
            for item in table.iter().map_err(err)? {
                let (_, expires) = item.map_err(err)?;
                if expires.value() <= now {
                    any = true;
                    break;
                }
            }
            any
        };
        if !expired {
            return Ok(());
        }
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(NONCES).map_err(err)?.retain(|_, expires| expires > now).map_err(err)?;
        txn.commit().map_err(err)
    })();
    if let Err(e) = swept {
        tracing::warn!(error = %e, "sweeping expired nonces failed; will try again");
    }
}

fn unexpected() -> StoreError {
    err("writer answered another kind of job")
}

impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }
}
