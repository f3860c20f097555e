//! Delivery: from the outbox to the billing core, durably.
//!
//! Each replica runs one [`Worker`]. It claims events from the outbox (new
//! ones, and ones a dead replica claimed and never finished, after the
//! visibility timeout), and delivers them:
//!
//! - **in order per instance**: an event is sent only when its instance's
//!   previous event is settled (delivered or dead-lettered); the store keeps
//!   each instance's delivered sequence. Other instances are not held up.
//! - **with retries**: exponential backoff with full jitter
//!   ([`crate::backoff`]); attempts are kept in the store, so a replica that
//!   takes over continues the same schedule.
//! - **then the dead-letter queue**: permanent refusals (4xx other than
//!   408/429) at once, others when the schedule is exhausted. A redriven
//!   event is delivered again under its own id.
//! - **with an attempt log**: each attempt (when, how long, the receiver's
//!   status and the start of its answer from the sink's [`Report`], the
//!   error) goes into the event's [`Attempts`] (the most recent 20); a
//!   delivered event is settled with it and kept in the store's history
//!   ([`crate::store::History`]) for the retention.
//!
//! The worker hands each event to a [`Sink`] (`Arc<dyn Sink>`), which owns
//! only the transport and says whether a failure is permanent or transient;
//! ordering, retries, the dead-letter queue, enrichment, skipping test events
//! and the metrics stay here, the same for every target (the split, and how to
//! add a target, are in [`sink`]). The targets, one file each:
//!
//! - [`webhook`]: the billing core over HTTP with Standard Webhooks
//!   signatures ([`webhook::WebhookSink`]);
//! - [`jsonl`]: `<data dir>/events.jsonl` when no billing URL is set
//!   ([`jsonl::JsonlSink`]).
//!
//! Events of `testFlag=1` calls are settled without being sent unless
//! `KOOGATE_FORWARD_TEST_EVENTS`. Before sending, V2 purchase, upgrade and
//! order-notify events are completed from KooGallery's order query API
//! ([`enrich`]).

pub mod enrich;
pub mod jsonl;
pub mod sink;
pub mod webhook;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::accounts;
use crate::backoff::Schedule;
use crate::events;
use crate::metrics as m;
use crate::store::{
    AccountIndex, AttemptRecord, Attempts, DeadLetter, Delivered, Outbox, OutboxEntry, Settle, Store, StoreError,
};
use enrich::Enricher;
pub use sink::{Answer, Message, Report, Sink, SinkError};

/// How delivery behaves (where events go is the [`Sink`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub forward_test: bool,
    pub schedule: Schedule,
    /// Claimed entries not settled nor touched for this long are taken over by other replicas.
    pub visibility: Duration,
    /// Deliveries in flight at once (one per instance at most).
    pub concurrency: usize,
    /// An event whose predecessor cannot be found waits at most this long, then goes anyway.
    pub order_wait: Duration,
}

/// Outcome of one attempt: delivered, or how it failed (the sink's word, or
/// the worker's own when the event could not be built or is still waiting),
/// with the receiver's answer when there was one.
type Attempt = Report;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn occurred_ms(entry: &OutboxEntry) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(&entry.occurred_at).ok().map(|t| t.timestamp_millis())
}

/// Consumer name of this process in the outbox's consumer group.
pub fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "koogate".into());
    let tag: u16 = rand::random();
    format!("{host}-{}-{tag:04x}", std::process::id())
}

/// Builds the event's JSON once, the same bytes for every sink, and hands it
/// to the sink. An entry that cannot become an event never will: permanent.
async fn deliver(sink: &dyn Sink, entry: &OutboxEntry) -> Attempt {
    let event = match events::assemble(entry) {
        Ok(event) => event,
        Err(e) => return Err(SinkError::Permanent(e.to_string())).into(),
    };
    let body = match serde_json::to_vec(&event) {
        Ok(body) => body,
        Err(e) => return Err(SinkError::Permanent(format!("cannot serialize event: {e}"))).into(),
    };
    sink.send(&Message { id: &entry.id, event: &event, body: &body }).await
}

/// The attempt log's record of one attempt that ended at `now_ms` after `took`. Pure.
fn attempt_record(report: &Report, now_ms: i64, took: Duration) -> AttemptRecord {
    let duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
    AttemptRecord {
        at_ms: now_ms.saturating_sub(i64::try_from(duration_ms).unwrap_or(i64::MAX)),
        status: report.answer.as_ref().map(|a| a.status),
        duration_ms,
        response: report.answer.as_ref().map(|a| a.body.clone()).filter(|b| !b.is_empty()),
        error: report.result.as_ref().err().map(ToString::to_string),
    }
}

/// An event this replica holds.
struct Held {
    /// Shared with its delivery task while one is in flight (no copy per attempt).
    entry: Arc<OutboxEntry>,
    attempts: Attempts,
    /// When it became the head of its instance and started waiting for a predecessor.
    waiting_since: Option<Instant>,
}

/// The event of a held entry, taken out of its `Arc`: copied only when a
/// delivery task still holds it (it never does once its outcome is in).
fn unshared(entry: Arc<OutboxEntry>) -> OutboxEntry {
    Arc::try_unwrap(entry).unwrap_or_else(|shared| OutboxEntry::clone(&shared))
}

/// The delivery loop of one replica. It uses two roles of the store: the
/// [`Outbox`] (claim, attempts, settle, dead letters) and the
/// [`AccountIndex`] (linking a purchase to its buyer); the server hands it
/// the whole store.
pub struct Worker<S: ?Sized = dyn Store> {
    store: Arc<S>,
    /// Completes V2 purchase/upgrade/notify events from the order query API.
    enricher: Option<Arc<Enricher>>,
    settings: Settings,
    /// Where events go.
    sink: Arc<dyn Sink>,
    consumer: String,
    /// Held events by instance, in sequence order.
    held: BTreeMap<String, BTreeMap<u64, Held>>,
    /// Instances with a delivery in flight, or whose last delivery is being
    /// settled: their next event waits.
    busy: HashSet<String>,
    /// When the outbox was last asked for new events, and whether that claim was a full batch.
    last_claim: Option<(Instant, bool)>,
    /// When stale claims of dead replicas were last looked for.
    last_takeover: Option<Instant>,
    /// Where the next scan for due instances starts.
    scan_from: Option<String>,
    /// Entries that left the outbox here and are not settled in the store
    /// yet: settled together, in one batch (see [`Worker::run`]).
    to_settle: Vec<Leaving>,
    /// The delivered sequence of instances as this worker last settled or
    /// read it (a lower bound of the store's, which never goes back): an
    /// event right after it may go without asking the store.
    settled: HashMap<String, u64>,
}

/// A settle batch in flight (see [`Worker::run`]): the batch comes back with the store's verdict.
struct Settling {
    task: tokio::task::JoinHandle<SettleDone>,
    /// Its instances: busy until it is settled (their next events wait for it).
    subjects: Vec<String>,
}
type SettleDone = (Vec<Leaving>, Result<(), StoreError>);

/// How an entry leaves the outbox (see [`Settle`]).
enum Leaving {
    /// Settled without a delivery (a test event not forwarded, a stale claim).
    Skipped(OutboxEntry),
    /// Delivered now: kept in the history.
    Delivered(Delivered),
    Dead(DeadLetter),
}

impl Leaving {
    fn entry(&self) -> &OutboxEntry {
        match self {
            Self::Skipped(entry) => entry,
            Self::Delivered(d) => &d.entry,
            Self::Dead(d) => &d.entry,
        }
    }

    fn settle(&self) -> Settle<'_> {
        match self {
            Self::Skipped(entry) => Settle::skipped(entry),
            Self::Delivered(d) => Settle::delivered(d),
            Self::Dead(d) => Settle::dead(d),
        }
    }
}

const CLAIM_BATCH: usize = 256;
const MAX_HELD: usize = 1024;
const TICK: Duration = Duration::from_millis(50);
const GAUGES_EVERY: Duration = Duration::from_secs(2);
/// Instances whose delivered sequence the worker remembers at most (then it
/// forgets them all, memory included, and asks the store again). An
/// instance's first event needs no look-up, so the cache serves later events
/// of recently settled instances; 16,384 entries hold about 2 MiB (65,536
/// kept about 8 MiB of heap after a burst of new instances).
const SETTLED_CACHE: usize = 16_384;

impl<S: Outbox + AccountIndex + Send + Sync + ?Sized + 'static> Worker<S> {
    pub fn new(store: Arc<S>, sink: Arc<dyn Sink>, settings: Settings, enricher: Option<Enricher>) -> Self {
        Self {
            store,
            enricher: enricher.map(Arc::new),
            settings,
            sink,
            consumer: consumer_name(),
            held: BTreeMap::new(),
            busy: HashSet::new(),
            last_claim: None,
            last_takeover: None,
            scan_from: None,
            to_settle: Vec::new(),
            settled: HashMap::new(),
        }
    }

    fn held_count(&self) -> usize {
        self.held.values().map(BTreeMap::len).sum()
    }

    /// Runs until `shutdown`; then lets in-flight deliveries finish within `grace`.
    /// Events not delivered stay in the outbox for the next start or another replica.
    pub async fn run(mut self, shutdown: CancellationToken, grace: Duration) {
        // Not `target`: the JSON log line has a `target` key of its own (the module).
        tracing::info!(consumer = %self.consumer, destination = ?self.sink.name(), "delivery started");
        let mut inflight: JoinSet<(Arc<OutboxEntry>, Attempt, Duration)> = JoinSet::new();
        let mut last_touch = Instant::now();
        let mut last_gauges = Instant::now() - GAUGES_EVERY;
        let mut store_backoff = TICK;
        // The settle batch in flight, at most one. On a store that settles
        // concurrently the loop goes on claiming and starting deliveries while
        // it settles; an instance's next event waits for its predecessor's
        // settle all the same (the instance stays busy until then).
        let mut settling: Option<Settling> = None;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            self.settle(&mut settling).await;
            let round = self.round(&mut inflight).await;
            self.settle(&mut settling).await;
            let pause = match round {
                Ok(()) => {
                    store_backoff = TICK;
                    TICK
                }
                Err(e) => {
                    tracing::error!(error = %e, "delivery: store failed; will retry");
                    store_backoff = (store_backoff * 2).min(Duration::from_secs(5));
                    store_backoff
                }
            };
            if last_touch.elapsed() >= self.settings.visibility / 3 {
                let entries: Vec<OutboxEntry> =
                    self.held.values().flat_map(|m| m.values().map(|h| OutboxEntry::clone(&h.entry))).collect();
                if let Err(e) = self.store.outbox_touch(&self.consumer, &entries).await {
                    tracing::warn!(error = %e, "delivery: could not refresh claims");
                }
                last_touch = Instant::now();
            }
            if last_gauges.elapsed() >= GAUGES_EVERY {
                self.update_gauges().await;
                last_gauges = Instant::now();
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                    // Every delivery that is done by now, settled together in the next batch.
                    let mut done = Some(done);
                    while let Some(next) = done {
                        if let Ok((entry, attempt, took)) = next {
                            self.finish(entry, attempt, took).await;
                        }
                        done = inflight.try_join_next();
                    }
                }
                joined = async {
                    match settling.as_mut() {
                        Some(s) => (&mut s.task).await,
                        None => std::future::pending().await,
                    }
                }, if settling.is_some() => {
                    if let Some(done) = settling.take() {
                        self.settled_batch(joined, &done.subjects);
                    }
                }
                _ = tokio::time::sleep(pause) => {}
            }
        }
        self.await_settle(&mut settling).await;
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        while !inflight.is_empty() {
            tokio::select! {
                Some(done) = inflight.join_next() => {
                    if let Ok((entry, attempt, took)) = done {
                        self.finish(entry, attempt, took).await;
                    }
                }
                _ = &mut deadline => {
                    tracing::warn!(left = inflight.len(), "delivery: grace period over; unfinished deliveries stay in the outbox");
                    break;
                }
            }
        }
        self.start_settle(&mut settling);
        self.await_settle(&mut settling).await;
        tracing::info!("delivery stopped");
    }

    /// Claims more events when there is room, then starts every delivery that may go.
    async fn round(&mut self, inflight: &mut JoinSet<(Arc<OutboxEntry>, Attempt, Duration)>) -> Result<(), StoreError> {
        // Ask the outbox again after a full batch at once, else at most every tick; look for
        // a dead replica's events every third of the visibility timeout.
        let due = match self.last_claim {
            None => true,
            Some((at, full)) => full || at.elapsed() >= TICK,
        };
        if self.held_count() < MAX_HELD && due {
            let takeover = self.last_takeover.is_none_or(|at| at.elapsed() >= self.settings.visibility / 3);
            let stale = takeover.then_some(self.settings.visibility);
            let claimed = self.store.outbox_claim(&self.consumer, CLAIM_BATCH, stale).await?;
            if takeover {
                self.last_takeover = Some(Instant::now());
            }
            self.last_claim = Some((Instant::now(), claimed.len() >= CLAIM_BATCH));
            if !claimed.is_empty() {
                // Only a redriven entry, or one taken over from another consumer,
                // can have attempts on record: an entry read for the first time
                // was never tried (attempts are kept only once an entry is claimed).
                let may_have_attempts = |e: &OutboxEntry| takeover || e.redrive;
                let asked: Vec<OutboxEntry> = claimed.iter().filter(|e| may_have_attempts(e)).cloned().collect();
                let mut recorded = self.store.attempts(&asked).await?.into_iter();
                let attempts: Vec<Option<Attempts>> = claimed
                    .iter()
                    .map(|e| if may_have_attempts(e) { recorded.next().flatten() } else { None })
                    .collect();
                for (entry, attempts) in claimed.into_iter().zip(attempts) {
                    let (subject, seq) = entry.subject_seq();
                    let slot = self.held.entry(subject.to_owned()).or_default();
                    slot.entry(seq).or_insert(Held {
                        entry: Arc::new(entry),
                        attempts: attempts.unwrap_or_default(),
                        waiting_since: None,
                    });
                }
            }
        }
        let free = self.settings.concurrency.saturating_sub(inflight.len());
        if free == 0 || self.held.is_empty() {
            return Ok(());
        }
        // Only instances whose first held event is due need their delivered
        // sequence looked up, and no more of them than can be started now (a
        // few spare for heads still waiting on a predecessor). The scan starts
        // where the last one stopped, so no instance is starved.
        let now = now_ms();
        let wanted = free * 4;
        let due = |s: &String, q: &BTreeMap<u64, Held>| {
            !self.busy.contains(s) && q.values().next().is_some_and(|h| h.attempts.next_attempt_ms <= now)
        };
        let mut heads: Vec<String> = Vec::new();
        if let Some(after) = self.scan_from.take() {
            let rest = self.held.range::<String, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded));
            heads.extend(rest.filter(|(s, q)| due(s, q)).map(|(s, _)| s.clone()).take(wanted));
        }
        if heads.len() < wanted {
            let first: Vec<String> = self
                .held
                .iter()
                .filter(|(s, q)| due(s, q) && !heads.contains(s))
                .map(|(s, _)| s.clone())
                .take(wanted - heads.len())
                .collect();
            heads.extend(first);
        }
        self.scan_from = heads.last().cloned();
        if heads.is_empty() {
            return Ok(());
        }
        // The store is asked only for heads this worker's own settles do not
        // place: a redrive goes anyway; an event right after the last one
        // settled here may go; one at or before it was settled already; an
        // instance's first event goes (it has no predecessor).
        let mut known: Vec<Option<u64>> = heads
            .iter()
            .map(|s| {
                let queue = self.held.get(s)?;
                let (&seq, head) = queue.iter().next()?;
                let settled = self.settled.get(s).copied();
                if head.entry.redrive {
                    Some(0)
                } else {
                    // An instance's first event has no predecessor to wait for.
                    settled.filter(|&done| seq <= done + 1).or((seq == 1).then_some(0))
                }
            })
            .collect();
        let ask: Vec<&str> = heads.iter().zip(&known).filter(|(_, k)| k.is_none()).map(|(s, _)| s.as_str()).collect();
        if !ask.is_empty() {
            let asked = self.store.delivered_seq(&ask).await?;
            // What the store said is a lower bound too: remembered, the next
            // round does not ask again for a head that waited for a free slot.
            if self.settled.len() + asked.len() > SETTLED_CACHE {
                self.settled = HashMap::new();
            }
            for (subject, &done) in ask.iter().zip(&asked) {
                let known = self.settled.entry((*subject).to_owned()).or_default();
                *known = (*known).max(done);
            }
            let mut asked = asked.into_iter();
            for k in known.iter_mut().filter(|k| k.is_none()) {
                *k = asked.next();
            }
        }
        let mut started = 0;
        for (subject, done) in heads.into_iter().zip(known) {
            let done = done.unwrap_or_default();
            if started >= free {
                break;
            }
            let Some(queue) = self.held.get_mut(&subject) else { continue };
            let Some((&seq, head)) = queue.iter_mut().next() else { continue };
            if !head.entry.redrive && seq <= done {
                // Settled before (a stale claim of an event another replica finished).
                if let Some(held) = queue.remove(&seq) {
                    self.to_settle.push(Leaving::Skipped(unshared(held.entry)));
                }
                continue;
            }
            if !head.entry.redrive && seq > done + 1 {
                let since = *head.waiting_since.get_or_insert_with(Instant::now);
                if since.elapsed() < self.settings.order_wait {
                    continue; // an earlier event of this instance is not settled yet
                }
                tracing::warn!(event_id = %head.entry.id, delivered_seq = done, "delivery: predecessor never settled; sending out of order");
            }
            if head.attempts.next_attempt_ms > now {
                continue;
            }
            if head.entry.test && !self.settings.forward_test {
                let held = queue.remove(&seq);
                if queue.is_empty() {
                    self.held.remove(&subject);
                }
                if let Some(held) = held {
                    self.to_settle.push(Leaving::Skipped(unshared(held.entry)));
                }
                m::delivery_attempt("skipped_test");
                continue;
            }
            let entry = Arc::clone(&head.entry);
            self.busy.insert(subject);
            let sink = Arc::clone(&self.sink);
            let enricher = self.enricher.clone();
            let store = Arc::clone(&self.store);
            inflight.spawn(async move {
                let started = Instant::now();
                let mut waiting = None;
                // Enrichment completes a copy (the outbox keeps the event as it was accepted);
                // without it the event goes as it is, uncopied.
                let mut enriched = None;
                if let Some(enricher) = &enricher {
                    let mut outgoing = OutboxEntry::clone(&entry);
                    let completed = if Enricher::needs(&outgoing) {
                        enricher.enrich(&mut outgoing).await
                    } else {
                        enricher.refresh_facts(&mut outgoing).await
                    };
                    waiting = completed.err().map(|e| format!("waiting for the order query API: {e}"));
                    enriched = Some(outgoing);
                }
                let outgoing = enriched.as_ref().unwrap_or(&entry);
                // The account index learns the buyer here (or that it is still unknown).
                let may_learn = enricher.is_some();
                if let Err(e) = accounts::link_on_delivery(&*store, outgoing, now_ms(), may_learn).await {
                    waiting = Some(format!("could not update the account index: {e}"));
                }
                if let Some(error) = waiting {
                    return (entry, Err(SinkError::transient(error)).into(), started.elapsed());
                }
                let attempt = deliver(&*sink, outgoing).await;
                (entry, attempt, started.elapsed())
            });
            started += 1;
        }
        Ok(())
    }

    /// Records an attempt's outcome.
    async fn finish(&mut self, entry: Arc<OutboxEntry>, attempt: Attempt, took: Duration) {
        let (subject, seq) = entry.subject_seq();
        let subject = subject.to_owned();
        drop(entry); // the held one is the same event: it leaves unshared, without a copy
        self.busy.remove(&subject);
        m::delivery_duration(took);
        let Some(held) = self.held.get_mut(&subject).and_then(|q| q.remove(&seq)) else { return };
        // The held event leaves the worker here (settled, dead-lettered or held again): moved, not cloned.
        let Held { entry: shared, mut attempts, .. } = held;
        let event = unshared(shared);
        let event_id = event.id.clone();
        let now = now_ms();
        if attempts.attempts == 0 {
            attempts.first_attempt_ms = now;
        }
        attempts.attempts += 1;
        attempts.log_attempt(attempt_record(&attempt, now, took));
        let result = match attempt.result {
            Ok(()) => {
                m::delivery_attempt("delivered");
                if let Some(t) = occurred_ms(&event) {
                    m::delivery_lag(Duration::from_millis(u64::try_from(now - t).unwrap_or(0)));
                }
                tracing::debug!(event_id = %event.id, attempts = attempts.attempts, "delivered");
                attempts.next_attempt_ms = 0;
                self.to_settle.push(Leaving::Delivered(Delivered { entry: event, attempts, delivered_at_ms: now }));
                self.busy.insert(subject.clone()); // until settled
                Ok(())
            }
            Err(SinkError::Permanent(error)) => {
                m::delivery_attempt("failed_permanent");
                attempts.last_error = Some(error);
                self.dead_letter(event, attempts)
            }
            Err(SinkError::Transient { message: error, retry_after: after }) => {
                m::delivery_attempt("failed_retryable");
                attempts.last_error = Some(error.clone());
                let since = Duration::from_millis(u64::try_from(now - attempts.first_attempt_ms).unwrap_or(0));
                if self.settings.schedule.exhausted(attempts.attempts, since) {
                    self.dead_letter(event, attempts)
                } else {
                    let delay = after.map_or_else(
                        || self.settings.schedule.delay(attempts.attempts),
                        |a| a.min(self.settings.schedule.max),
                    );
                    attempts.next_attempt_ms = now + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
                    tracing::warn!(event_id = %event.id, attempt = attempts.attempts, retry_in_ms = delay.as_millis() as u64, %error, "delivery failed; will retry");
                    let stored = self.store.record_attempt(&event, &attempts).await;
                    self.held
                        .entry(subject.clone())
                        .or_default()
                        .insert(seq, Held { entry: Arc::new(event), attempts, waiting_since: None });
                    stored
                }
            }
        };
        if self.held.get(&subject).is_some_and(BTreeMap::is_empty) {
            self.held.remove(&subject);
        }
        if let Err(e) = result {
            // The entry stays in the outbox (claimed): it is retried after the visibility timeout.
            tracing::error!(%event_id, error = %e, "delivery: could not record the outcome; the event will be tried again");
        }
    }

    fn dead_letter(&mut self, entry: OutboxEntry, attempts: Attempts) -> Result<(), StoreError> {
        m::delivery_attempt("dead_lettered");
        tracing::error!(event_id = %entry.id, attempts = attempts.attempts, last_error = attempts.last_error.as_deref().unwrap_or(""), "event dead-lettered");
        self.busy.insert(entry.subject_seq().0.to_owned()); // until settled
        let dead = DeadLetter { entry, attempts, dead_at_ms: now_ms() };
        self.to_settle.push(Leaving::Dead(dead));
        Ok(())
    }

    /// Settles what left the outbox since the last batch: in the background
    /// when the store settles concurrently ([`Outbox::settle_concurrently`]),
    /// else now.
    async fn settle(&mut self, settling: &mut Option<Settling>) {
        self.start_settle(settling);
        if !self.store.settle_concurrently() {
            self.await_settle(settling).await;
        }
    }

    /// Starts settling what left the outbox since the last batch, in one
    /// batch, unless a batch is being settled (then these go in the next).
    fn start_settle(&mut self, settling: &mut Option<Settling>) {
        if settling.is_some() || self.to_settle.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.to_settle);
        let subjects = batch.iter().map(|l| l.entry().subject_seq().0.to_owned()).collect();
        let store = Arc::clone(&self.store);
        let task = tokio::spawn(async move {
            let settles: Vec<Settle<'_>> = batch.iter().map(Leaving::settle).collect();
            let result = store.settle(&settles).await;
            drop(settles);
            (batch, result)
        });
        *settling = Some(Settling { task, subjects });
    }

    /// Waits for the batch in flight, if any, and takes it in.
    async fn await_settle(&mut self, settling: &mut Option<Settling>) {
        if let Some(s) = settling.take() {
            let joined = s.task.await;
            self.settled_batch(joined, &s.subjects);
        }
    }

    /// Takes in a settled batch: remembers each instance's delivered
    /// sequence. On failure the entries stay in the outbox, claimed: they are
    /// tried again after the visibility timeout (as when a single settle failed).
    fn settled_batch(&mut self, joined: Result<SettleDone, tokio::task::JoinError>, subjects: &[String]) {
        for subject in subjects {
            self.busy.remove(subject);
        }
        let (batch, result) = match joined {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "delivery: a settle task failed; its events will be tried again");
                return;
            }
        };
        match result {
            Ok(()) => {
                if self.settled.len() + batch.len() > SETTLED_CACHE {
                    self.settled = HashMap::new();
                }
                for entry in batch.iter().map(Leaving::entry) {
                    let (subject, seq) = entry.subject_seq();
                    let done = self.settled.entry(subject.to_owned()).or_default();
                    *done = (*done).max(seq);
                }
            }
            Err(e) => {
                for entry in batch.iter().map(Leaving::entry) {
                    tracing::error!(event_id = %entry.id, error = %e, "delivery: could not record the outcome; the event will be tried again");
                }
            }
        }
    }

    async fn update_gauges(&self) {
        if let Ok(depth) = self.store.outbox_len().await {
            m::outbox_depth(depth);
        }
        if let Ok(dlq) = self.store.dlq_list().await {
            m::dlq_events(dlq.len() as u64);
        }
        if let Ok(n) = self.store.accounts_pending().await {
            m::accounts_pending(n);
        }
        match self.store.oldest_pending_ms().await {
            Ok(Some(ms)) => m::oldest_pending_age(Duration::from_millis(u64::try_from(now_ms() - ms).unwrap_or(0))),
            Ok(None) => m::oldest_pending_age(Duration::ZERO),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_record_says_when_it_started_what_was_answered_and_why_it_failed() {
        let failed = Report::answered(
            Err(SinkError::transient("billing core answered HTTP 503")),
            Answer { status: 503, body: "busy".into() },
        );
        let r = attempt_record(&failed, 10_000, Duration::from_millis(250));
        assert_eq!(
            r,
            AttemptRecord {
                at_ms: 9_750,
                status: Some(503),
                duration_ms: 250,
                response: Some("busy".into()),
                error: Some("billing core answered HTTP 503".into()),
            }
        );
        let ok = Report::answered(Ok(()), Answer { status: 204, body: String::new() });
        let r = attempt_record(&ok, 10_000, Duration::ZERO);
        assert_eq!((r.status, r.response, r.error), (Some(204), None, None), "an empty body is not kept");
        let refused: Report = Err(SinkError::transient("request failed: connection refused")).into();
        let r = attempt_record(&refused, 10_000, Duration::from_millis(3));
        assert_eq!((r.status, r.error.as_deref()), (None, Some("request failed: connection refused")));
    }
}
