//! The embedded backend: one redb file, no server needed.
//!
//! All writes go through one writer thread that applies plans in arrival
//! order and commits them in small groups (group commit): each plan still
//! sees every earlier plan's writes, and a commit that fails fails every
//! plan of its group, so nothing is answered "stored" that is not on disk.
//! The database file is locked: one gateway process per directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use tokio::sync::oneshot;

use super::keys;
use super::plan::{event_id, Attempts, DeadLetter, OutboxEntry, Outcome, Plan, Record, Redeem, ABSENT, ANY};
use super::{Store, StoreError};
use crate::domain::{field, status};
use crate::usage::{Decision, UsageClaim};

mod accounts;
mod usage;

const NONCES: TableDefinition<&str, i64> = TableDefinition::new("nonces");
const ANSWERS: TableDefinition<&str, &str> = TableDefinition::new("answers");
const INSTANCES: TableDefinition<&str, &str> = TableDefinition::new("instances");
const ORDERS: TableDefinition<&str, &str> = TableDefinition::new("orders");
const OUTBOX: TableDefinition<u64, &str> = TableDefinition::new("outbox");
const ATTEMPTS: TableDefinition<&str, &str> = TableDefinition::new("attempts");
const DLQ: TableDefinition<&str, &str> = TableDefinition::new("dlq");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const ORDER_CACHE: TableDefinition<&str, &str> = TableDefinition::new("order_cache");

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

/// Which outbox entries are handed out and not yet acknowledged.
#[derive(Default)]
struct Claims {
    /// First sequence number never handed out.
    next: u64,
    /// Handed out, with when.
    inflight: BTreeMap<u64, Instant>,
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    /// `None` only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    claims: Mutex<Claims>,
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
    /// Opens (or creates) `dir/koogate.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("koogate.redb");
        let db = Database::create(&path).map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(err)?;
        {
            txn.open_table(NONCES).map_err(err)?;
            txn.open_table(ANSWERS).map_err(err)?;
            txn.open_table(INSTANCES).map_err(err)?;
            txn.open_table(ORDERS).map_err(err)?;
            txn.open_table(OUTBOX).map_err(err)?;
            txn.open_table(ATTEMPTS).map_err(err)?;
            txn.open_table(DLQ).map_err(err)?;
            txn.open_table(META).map_err(err)?;
            txn.open_table(ORDER_CACHE).map_err(err)?;
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
            ] {
                txn.open_table(table).map_err(err)?;
            }
        }
        txn.commit().map_err(err)?;
        let db = Arc::new(db);
        let (jobs, rx) = mpsc::channel();
        let writer_db = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("koogate-embedded-writer".into())
            .spawn(move || writer(&writer_db, &rx))
            .map_err(err)?;
        Ok(Self { db, jobs: Some(jobs), writer: Some(writer), claims: Mutex::new(Claims::default()) })
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

    fn read_entries(&self, seqs: &[u64]) -> Result<Vec<OutboxEntry>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(OUTBOX).map_err(err)?;
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(raw) = table.get(*seq).map_err(err)? {
                let mut e: OutboxEntry = serde_json::from_str(raw.value()).map_err(err)?;
                e.cursor = seq.to_string();
                out.push(e);
            }
        }
        Ok(out)
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

/// Appends an entry to the outbox.
fn push_outbox(txn: &WriteTransaction, entry: &OutboxEntry) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META).map_err(err)?;
    let next = meta.get("outbox_next").map_err(err)?.map(|v| v.value()).unwrap_or(1);
    meta.insert("outbox_next", next + 1).map_err(err)?;
    let json = serde_json::to_string(entry).map_err(err)?;
    txn.open_table(OUTBOX).map_err(err)?.insert(next, json.as_str()).map_err(err)?;
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

/// The same rules as `apply.lua`, step for step.
fn apply_in(txn: &WriteTransaction, plan: &Plan) -> Result<Outcome, StoreError> {
    let nonce_key = plan.nonce.as_ref().map(|n| format!("{}:{n}", plan.shard));
    if let Some(key) = &nonce_key {
        let nonces = txn.open_table(NONCES).map_err(err)?;
        let seen = nonces.get(key.as_str()).map_err(err)?.map(|v| v.value());
        if seen.is_some_and(|expires| expires > plan.now_ms) {
            return Ok(Outcome::Replay);
        }
    }
    let remember_nonce = || -> Result<(), StoreError> {
        if let Some(key) = &nonce_key {
            let ttl_ms = i64::try_from(plan.nonce_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
            let expires = plan.now_ms.saturating_add(ttl_ms);
            txn.open_table(NONCES).map_err(err)?.insert(key.as_str(), expires).map_err(err)?;
        }
        Ok(())
    };
    let dedup_key = plan.dedup.as_ref().map(|d| format!("{}:{d}", plan.shard));
    if let Some(key) = &dedup_key {
        let answers = txn.open_table(ANSWERS).map_err(err)?;
        let mut kept = answers.get(key.as_str()).map_err(err)?.map(|v| v.value().to_owned());
        if let (None, Some(legacy)) = (&kept, &plan.dedup_legacy) {
            // Kept by a version before composite keys were length-prefixed.
            let legacy = format!("{}:{legacy}", plan.shard);
            kept = answers.get(legacy.as_str()).map_err(err)?.map(|v| v.value().to_owned());
        }
        drop(answers);
        if let Some(kept) = kept {
            remember_nonce()?;
            let (code, answer) = kept.split_at(kept.len().min(6));
            return Ok(Outcome::Kept { code: code.to_owned(), answer: answer.to_owned() });
        }
    }
    if !plan.read.is_empty() {
        let records = plan.read.iter().map(|id| get_record(txn, INSTANCES, id)).collect::<Result<Vec<_>, _>>()?;
        remember_nonce()?;
        return Ok(Outcome::Read { records });
    }

    let mut record = get_record(txn, INSTANCES, &plan.subject)?;
    let status = record.get(field::STATUS).cloned().unwrap_or_else(|| ABSENT.to_owned());
    let branch = plan
        .branches
        .get(&status)
        .or_else(|| plan.branches.get(ANY))
        .ok_or_else(|| StoreError::Protocol(format!("plan has no branch for status {status:?}")))?;

    remember_nonce()?;
    let mut record_changed = !branch.set.is_empty();
    record.extend(branch.set.clone());
    if let (Some(order), false) = (&plan.order, branch.order_set.is_empty()) {
        let mut order_record = get_record(txn, ORDERS, order)?;
        order_record.extend(branch.order_set.clone());
        put_record(txn, ORDERS, order, &order_record)?;
    }
    let mut minted = None;
    if let Some(event) = &branch.event {
        let seq = record.get("seq").and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) + 1;
        record.insert("seq".into(), seq.to_string());
        record_changed = true;
        let id = event_id(&plan.subject, seq);
        let change = match serde_json::from_str(&event.change).map_err(err)? {
            serde_json::Value::Object(map) => map,
            _ => return Err(StoreError::Protocol("event change is not a JSON object".into())),
        };
        let entry = OutboxEntry {
            cursor: String::new(),
            shard: plan.shard,
            id: id.clone(),
            kind: event.kind.clone(),
            occurred_at: event.occurred_at.clone(),
            test: event.test,
            record: record.clone(),
            change,
            redrive: false,
        };
        push_outbox(txn, &entry)?;
        minted = Some(id);
    }
    if record_changed {
        put_record(txn, INSTANCES, &plan.subject, &record)?;
    }
    if let (true, Some(key)) = (branch.keep, &dedup_key) {
        let kept = format!("{}{}", branch.code, branch.answer);
        txn.open_table(ANSWERS).map_err(err)?.insert(key.as_str(), kept.as_str()).map_err(err)?;
    }
    Ok(Outcome::Applied {
        code: branch.code.clone(),
        answer: branch.answer.clone(),
        event_id: minted,
        prior_status: status,
    })
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

/// Removes outbox entries by sequence.
fn remove_outbox(txn: &WriteTransaction, seqs: &[u64]) -> Result<(), StoreError> {
    let mut table = txn.open_table(OUTBOX).map_err(err)?;
    for seq in seqs {
        table.remove(*seq).map_err(err)?;
    }
    Ok(())
}

/// settle: the same steps as `settle.lua`.
fn settle_in(txn: &WriteTransaction, entry: &OutboxEntry, dead: Option<&DeadLetter>) -> Result<(), StoreError> {
    let (subject, seq) = entry.subject_seq();
    let mut record = get_record(txn, INSTANCES, subject)?;
    let done = record.get("delivered_seq").and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    if seq > done {
        record.insert("delivered_seq".into(), seq.to_string());
        put_record(txn, INSTANCES, subject, &record)?;
    }
    if let Some(dead) = dead {
        put_json(txn, DLQ, &entry.id, dead)?;
    }
    txn.open_table(ATTEMPTS).map_err(err)?.remove(entry.id.as_str()).map_err(err)?;
    if let Ok(cursor) = entry.cursor.parse::<u64>() {
        remove_outbox(txn, &[cursor])?;
    }
    Ok(())
}

/// redeem: the same steps as `redeem.lua`.
fn redeem_in(
    txn: &WriteTransaction,
    order_id: &str,
    customer: &str,
    by: &str,
    at: &str,
) -> Result<(Redeem, bool), StoreError> {
    let mut order = get_record(txn, ORDERS, order_id)?;
    if order.is_empty() || order.get(field::CUSTOMER_ID).map(String::as_str) != Some(customer) {
        return Ok((Redeem::NotFound, false));
    }
    if order.contains_key("redeemed_at") {
        return Ok((Redeem::Already(order), false));
    }
    for (field, instance) in &order {
        if field.starts_with("line:")
            && get_record(txn, INSTANCES, instance)?.get(field::STATUS).map(String::as_str) == Some(status::RELEASED)
        {
            return Ok((Redeem::Released, false));
        }
    }
    order.insert("redeemed_at".into(), at.to_owned());
    order.insert("redeemed_by".into(), by.to_owned());
    put_record(txn, ORDERS, order_id, &order)?;
    Ok((Redeem::Redeemed(order), true))
}

fn unexpected() -> StoreError {
    err("writer answered another kind of job")
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn apply(&self, plan: &Plan) -> Result<Outcome, StoreError> {
        let plan = plan.clone();
        match self
            .write(move |txn| {
                let outcome = apply_in(txn, &plan)?;
                let wrote = outcome != Outcome::Replay;
                Ok((Reply::Outcome(outcome), wrote))
            })
            .await?
        {
            Reply::Outcome(o) => Ok(o),
            _ => Err(unexpected()),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        txn.open_table(META).map_err(err)?;
        Ok(())
    }

    async fn outbox_claim(
        &self,
        _consumer: &str,
        max: usize,
        stale: Option<Duration>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let seqs = {
            let mut claims = self.claims.lock().map_err(|_| err("claims lock poisoned"))?;
            let now = Instant::now();
            let mut seqs: Vec<u64> = claims
                .inflight
                .iter()
                .filter(|(_, at)| stale.is_some_and(|stale| now.duration_since(**at) >= stale))
                .map(|(seq, _)| *seq)
                .take(max)
                .collect();
            let txn = self.db.begin_read().map_err(err)?;
            let table = txn.open_table(OUTBOX).map_err(err)?;
            let start = claims.next;
            for item in table.range(start..).map_err(err)?.take(max.saturating_sub(seqs.len())) {
                let (seq, _) = item.map_err(err)?;
                seqs.push(seq.value());
            }
            for seq in &seqs {
                claims.inflight.insert(*seq, now);
                claims.next = claims.next.max(seq + 1);
            }
            seqs
        };
        self.read_entries(&seqs)
    }

    async fn outbox_ack(&self, entries: &[OutboxEntry]) -> Result<(), StoreError> {
        let seqs: Vec<u64> = entries.iter().filter_map(|e| e.cursor.parse().ok()).collect();
        let to_remove = seqs.clone();
        self.write(move |txn| remove_outbox(txn, &to_remove).map(|()| (Reply::Done, true))).await?;
        let mut claims = self.claims.lock().map_err(|_| err("claims lock poisoned"))?;
        for seq in seqs {
            claims.inflight.remove(&seq);
        }
        Ok(())
    }

    async fn outbox_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        txn.open_table(OUTBOX).map_err(err)?.len().map_err(err)
    }

    async fn outbox_touch(&self, _consumer: &str, entries: &[OutboxEntry]) -> Result<(), StoreError> {
        let mut claims = self.claims.lock().map_err(|_| err("claims lock poisoned"))?;
        let now = Instant::now();
        for e in entries {
            if let Some(at) = e.cursor.parse().ok().and_then(|seq: u64| claims.inflight.get_mut(&seq)) {
                *at = now;
            }
        }
        Ok(())
    }

    async fn attempts(&self, entries: &[OutboxEntry]) -> Result<Vec<Option<Attempts>>, StoreError> {
        entries.iter().map(|e| self.read_json(ATTEMPTS, &e.id)).collect()
    }

    async fn record_attempt(&self, entry: &OutboxEntry, attempts: &Attempts) -> Result<(), StoreError> {
        let (id, attempts) = (entry.id.clone(), attempts.clone());
        self.write(move |txn| put_json(txn, ATTEMPTS, &id, &attempts).map(|()| (Reply::Done, true))).await?;
        Ok(())
    }

    async fn settle(&self, entry: &OutboxEntry, dead: Option<&DeadLetter>) -> Result<(), StoreError> {
        let (e, d) = (entry.clone(), dead.cloned());
        self.write(move |txn| settle_in(txn, &e, d.as_ref()).map(|()| (Reply::Done, true))).await?;
        if let Ok(seq) = entry.cursor.parse::<u64>() {
            self.claims.lock().map_err(|_| err("claims lock poisoned"))?.inflight.remove(&seq);
        }
        Ok(())
    }

    async fn delivered_seq(&self, subjects: &[&str]) -> Result<Vec<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(INSTANCES).map_err(err)?;
        subjects
            .iter()
            .map(|s| {
                let raw = table.get(*s).map_err(err)?;
                let record: Record = match raw {
                    Some(v) => serde_json::from_str(v.value()).map_err(err)?,
                    None => Record::new(),
                };
                Ok(record.get("delivered_seq").and_then(|v| v.parse().ok()).unwrap_or(0))
            })
            .collect()
    }

    async fn outbox_entries(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let seqs: Vec<u64> = {
            let txn = self.db.begin_read().map_err(err)?;
            let table = txn.open_table(OUTBOX).map_err(err)?;
            let mut seqs = Vec::new();
            for item in table.iter().map_err(err)? {
                seqs.push(item.map_err(err)?.0.value());
            }
            seqs
        };
        self.read_entries(&seqs)
    }

    async fn oldest_pending_ms(&self) -> Result<Option<i64>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(OUTBOX).map_err(err)?;
        let first = table.first().map_err(err)?;
        Ok(first.and_then(|(_, v)| {
            let e: OutboxEntry = serde_json::from_str(v.value()).ok()?;
            chrono::DateTime::parse_from_rfc3339(&e.occurred_at).ok().map(|t| t.timestamp_millis())
        }))
    }

    async fn dlq_list(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(DLQ).map_err(err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(err)? {
            let (_, v) = item.map_err(err)?;
            out.push(serde_json::from_str::<DeadLetter>(v.value()).map_err(err)?);
        }
        out.sort_by_key(|d| d.dead_at_ms);
        Ok(out)
    }

    async fn dlq_redrive(&self, event_id: &str) -> Result<bool, StoreError> {
        let id = event_id.to_owned();
        let moved = self
            .write(move |txn| {
                let Some(dead) = get_json::<DeadLetter>(txn, DLQ, &id)? else {
                    return Ok((Reply::Moved(false), false));
                };
                let mut entry = dead.entry;
                entry.redrive = true;
                entry.cursor = String::new();
                push_outbox(txn, &entry)?;
                txn.open_table(DLQ).map_err(err)?.remove(id.as_str()).map_err(err)?;
                Ok((Reply::Moved(true), true))
            })
            .await?;
        match moved {
            Reply::Moved(m) => Ok(m),
            _ => Err(unexpected()),
        }
    }

    async fn instance(&self, instance_id: &str) -> Result<Record, StoreError> {
        Ok(self.read_json(INSTANCES, instance_id)?.unwrap_or_default())
    }

    async fn order(&self, order_id: &str) -> Result<Record, StoreError> {
        Ok(self.read_json(ORDERS, order_id)?.unwrap_or_default())
    }

    async fn redeem(
        &self,
        order_id: &str,
        customer_id: &str,
        redeemed_by: &str,
        at: &str,
    ) -> Result<Redeem, StoreError> {
        let (o, c, b, a) = (order_id.to_owned(), customer_id.to_owned(), redeemed_by.to_owned(), at.to_owned());
        match self.write(move |txn| redeem_in(txn, &o, &c, &b, &a).map(|(r, w)| (Reply::Redeem(r), w))).await? {
            Reply::Redeem(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

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

    async fn enrich(
        &self,
        instance_id: &str,
        fields: &Record,
        order_id: Option<&str>,
        order_fields: &Record,
    ) -> Result<(), StoreError> {
        let (instance_id, fields) = (instance_id.to_owned(), fields.clone());
        let (order_id, order_fields) = (order_id.map(str::to_owned), order_fields.clone());
        self.write(move |txn| {
            let mut wrote = false;
            let mut record = get_record(txn, INSTANCES, &instance_id)?;
            if !fields.is_empty() && record.contains_key(field::STATUS) {
                record.extend(fields);
                put_record(txn, INSTANCES, &instance_id, &record)?;
                wrote = true;
            }
            if let Some(order) = order_id.filter(|_| !order_fields.is_empty()) {
                let mut o = get_record(txn, ORDERS, &order)?;
                if !o.is_empty() {
                    o.extend(order_fields);
                    put_record(txn, ORDERS, &order, &o)?;
                    wrote = true;
                }
            }
            Ok((Reply::Done, wrote))
        })
        .await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }
}
