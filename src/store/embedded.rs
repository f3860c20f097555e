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
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::plan::{event_id, OutboxEntry, Outcome, Plan, Record, ABSENT, ANY};
use super::{Store, StoreError};

const NONCES: TableDefinition<&str, i64> = TableDefinition::new("nonces");
const ANSWERS: TableDefinition<&str, &str> = TableDefinition::new("answers");
const INSTANCES: TableDefinition<&str, &str> = TableDefinition::new("instances");
const ORDERS: TableDefinition<&str, &str> = TableDefinition::new("orders");
const OUTBOX: TableDefinition<u64, &str> = TableDefinition::new("outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Most plans committed together.
const MAX_GROUP: usize = 256;
/// How often expired nonces are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Embedded(e.to_string())
}

/// An outbox entry as stored.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    shard: u8,
    id: String,
    #[serde(rename = "type")]
    kind: String,
    occurred_at: String,
    test: bool,
    record: Record,
    change: serde_json::Map<String, serde_json::Value>,
}

enum Job {
    Apply(Box<Plan>, oneshot::Sender<Result<Outcome, StoreError>>),
    Ack(Vec<u64>, oneshot::Sender<Result<(), StoreError>>),
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
    jobs: mpsc::Sender<Job>,
    claims: Mutex<Claims>,
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
            txn.open_table(META).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        let db = Arc::new(db);
        let (jobs, rx) = mpsc::channel();
        let writer_db = Arc::clone(&db);
        std::thread::Builder::new()
            .name("koogate-embedded-writer".into())
            .spawn(move || writer(&writer_db, &rx))
            .map_err(err)?;
        Ok(Self { db, jobs, claims: Mutex::new(Claims::default()) })
    }

    fn read_entries(&self, seqs: &[u64]) -> Result<Vec<OutboxEntry>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(OUTBOX).map_err(err)?;
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(raw) = table.get(*seq).map_err(err)? {
                let e: StoredEntry = serde_json::from_str(raw.value()).map_err(err)?;
                out.push(OutboxEntry {
                    cursor: seq.to_string(),
                    shard: e.shard,
                    id: e.id,
                    kind: e.kind,
                    occurred_at: e.occurred_at,
                    test: e.test,
                    record: e.record,
                    change: e.change,
                });
            }
        }
        Ok(out)
    }
}

/// The writer thread: applies jobs in order, commits them in groups.
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

enum Done {
    Apply(oneshot::Sender<Result<Outcome, StoreError>>, Outcome),
    Ack(oneshot::Sender<Result<(), StoreError>>),
}

fn run_group(db: &Database, group: Vec<Job>) {
    let mut done = Vec::with_capacity(group.len());
    let mut senders_on_failure = Vec::new();
    let result = (|| -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(err)?;
        // A group that only read (replays) is not committed: the file stays byte-identical.
        let mut wrote = false;
        let mut jobs = group.into_iter();
        for job in jobs.by_ref() {
            match job {
                Job::Apply(plan, tx) => match apply_in(&txn, &plan) {
                    Ok(outcome) => {
                        wrote |= outcome != Outcome::Replay;
                        done.push(Done::Apply(tx, outcome));
                    }
                    Err(e) => {
                        senders_on_failure.push(Done::Apply(tx, Outcome::Replay));
                        return Err(e);
                    }
                },
                Job::Ack(seqs, tx) => {
                    let mut table = txn.open_table(OUTBOX).map_err(err)?;
                    for seq in seqs {
                        table.remove(seq).map_err(err)?;
                    }
                    wrote = true;
                    done.push(Done::Ack(tx));
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
            for d in done {
                match d {
                    Done::Apply(tx, outcome) => {
                        let _ = tx.send(Ok(outcome));
                    }
                    Done::Ack(tx) => {
                        let _ = tx.send(Ok(()));
                    }
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "embedded store commit failed; every call of the group is answered as failed");
            // Jobs after the failing one were dropped with their senders: their callers see a closed channel.
            for d in done.into_iter().chain(senders_on_failure) {
                match d {
                    Done::Apply(tx, _) => {
                        let _ = tx.send(Err(err(&e)));
                    }
                    Done::Ack(tx) => {
                        let _ = tx.send(Err(err(&e)));
                    }
                }
            }
        }
    }
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
        let kept = answers.get(key.as_str()).map_err(err)?.map(|v| v.value().to_owned());
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
    let status = record.get("status").cloned().unwrap_or_else(|| ABSENT.to_owned());
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
        let entry = StoredEntry {
            shard: plan.shard,
            id: id.clone(),
            kind: event.kind.clone(),
            occurred_at: event.occurred_at.clone(),
            test: event.test,
            record: record.clone(),
            change,
        };
        let mut meta = txn.open_table(META).map_err(err)?;
        let next = meta.get("outbox_next").map_err(err)?.map(|v| v.value()).unwrap_or(1);
        meta.insert("outbox_next", next + 1).map_err(err)?;
        let json = serde_json::to_string(&entry).map_err(err)?;
        txn.open_table(OUTBOX).map_err(err)?.insert(next, json.as_str()).map_err(err)?;
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

#[async_trait]
impl Store for EmbeddedStore {
    async fn apply(&self, plan: &Plan) -> Result<Outcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Apply(Box::new(plan.clone()), tx)).map_err(|_| err("writer thread is gone"))?;
        rx.await.map_err(|_| err("writer dropped the call (its group failed)"))?
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        txn.open_table(META).map_err(err)?;
        Ok(())
    }

    async fn outbox_claim(&self, _consumer: &str, max: usize, stale: Duration) -> Result<Vec<OutboxEntry>, StoreError> {
        let seqs = {
            let mut claims = self.claims.lock().map_err(|_| err("claims lock poisoned"))?;
            let now = Instant::now();
            let mut seqs: Vec<u64> = claims
                .inflight
                .iter()
                .filter(|(_, at)| now.duration_since(**at) >= stale)
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
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Ack(seqs.clone(), tx)).map_err(|_| err("writer thread is gone"))?;
        rx.await.map_err(|_| err("writer dropped the ack"))??;
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

    async fn instance(&self, instance_id: &str) -> Result<Record, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(INSTANCES).map_err(err)?;
        let raw = table.get(instance_id).map_err(err)?;
        match raw {
            Some(v) => serde_json::from_str(v.value()).map_err(err),
            None => Ok(Record::new()),
        }
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }
}
