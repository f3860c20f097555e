//! The push worker: stored usage records to KooGallery's usage API.
//!
//! Each round claims due records for a lease, holds those of frozen
//! instances, pushes the rest in batches of at most 1000 and settles every
//! record. A batch KooGallery refuses is split in halves until the refused
//! records stand alone, so one bad record does not take 999 good ones into
//! the dead-letter list (with the code and a readable reason). Answers are read
//! from Huawei's error table (`unconfirmed::usage_answer_class`): a record
//! fault (`MKT.0150/0100/9001/9002/9004`, even under HTTP 500) splits; a
//! configuration fault (`400 MKT.0102` invalid body sign, a refused key) holds
//! every record and counts `koogate_usage_push_config_faults_total`; failures without
//! a usable answer are retried with the delivery backoff, same `metering_sn`s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::backoff::Schedule;
use crate::domain::Status;
use crate::marketplace::usage::{PushOutcome, PushRecord, Pushed, UsageApi, MAX_BATCH};
use crate::metrics as m;
use crate::protocol::unconfirmed::usage_code_reason;
use crate::store::{Store, StoreError, UsageLedger};
use crate::usage::{StoredUsage, UsageRecord, UsageSettle};

/// How the push worker behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Records per push call (at most 1000).
    pub batch: usize,
    /// A claimed record not settled by then is pushed again (same metering_sn).
    pub lease: Duration,
    /// How often the usage of a frozen instance is looked at again.
    pub hold: Duration,
    /// Pause between rounds when nothing was due.
    pub poll: Duration,
    pub schedule: Schedule,
}

/// Instance statuses whose usage waits: frozen (V2 FREEZE) and expired (V1
/// expireInstance, the same thing in the older protocol).
pub fn holds(status: &str) -> bool {
    matches!(Status::parse(status), Some(Status::Frozen | Status::Expired))
}

/// The push worker uses one role of the store, the [`UsageLedger`]; the
/// server hands it the whole store.
pub struct Pusher<S: ?Sized = dyn Store> {
    store: Arc<S>,
    api: UsageApi,
    settings: Settings,
    /// Held records near KooGallery's 21-day limit: metering_sn → when last seen held (ms).
    near_expiry: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl<S: UsageLedger + Send + Sync + ?Sized + 'static> Pusher<S> {
    pub fn new(store: Arc<S>, api: UsageApi, mut settings: Settings) -> Self {
        settings.batch = settings.batch.clamp(1, MAX_BATCH);
        Self { store, api, settings, near_expiry: Default::default() }
    }

    /// Pushes until `shutdown`. A round in flight gets `grace` to finish (its
    /// records' lease would otherwise make them wait); a round cut short is
    /// safe: its records are pushed again, same metering_sn, when the lease ends.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        tracing::info!(url = %self.api.url(), batch = self.settings.batch, apig = self.api.signs_apig(), "usage push started");
        m::usage_push_series();
        m::usage_held_near_expiry(0);
        let mut store_backoff = self.settings.poll;
        let mut last_gauges = Instant::now() - GAUGES_EVERY;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let round = self.round();
            tokio::pin!(round);
            let outcome = tokio::select! {
                outcome = &mut round => outcome,
                _ = shutdown.cancelled() => match tokio::time::timeout(grace, &mut round).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        tracing::warn!("usage push: grace period over; the records in flight go out again after their lease");
                        break;
                    }
                },
            };
            let pause = match outcome {
                Ok(0) => {
                    store_backoff = self.settings.poll;
                    self.settings.poll
                }
                Ok(_) => Duration::ZERO,
                Err(e) => {
                    tracing::error!(error = %e, "usage push: store failed; will retry");
                    store_backoff = (store_backoff * 2).min(Duration::from_secs(5));
                    store_backoff
                }
            };
            if last_gauges.elapsed() >= GAUGES_EVERY {
                self.update_gauges().await;
                last_gauges = Instant::now();
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        tracing::info!("usage push stopped");
    }

    /// One round; returns how many records were claimed.
    pub async fn round(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let claims = self.store.usage_claim(self.settings.batch, now, self.settings.lease).await?;
        if claims.is_empty() {
            m::usage_held(0);
            self.track_near_expiry(&[], &[], now);
            return Ok(0);
        }
        let claimed = claims.len();
        let mut settles = Vec::with_capacity(claimed);
        let mut send = Vec::with_capacity(claimed);
        let mut near = Vec::new();
        for claim in claims {
            if holds(&claim.instance_status) {
                if crate::usage::record::near_expiry(claim.stored.record.begin, now.div_euclid(1000)) {
                    near.push(claim.stored.record.metering_sn.clone());
                }
                let at_ms = now + i64::try_from(self.settings.hold.as_millis()).unwrap_or(i64::MAX / 2);
                settles.push((claim.stored.record, UsageSettle::Hold { at_ms }));
            } else {
                send.push(claim.stored);
            }
        }
        m::usage_held(settles.len());
        self.track_near_expiry(&near, &send, now);
        for chunk in send.chunks(self.settings.batch) {
            settles.extend(self.push(chunk.to_vec()).await);
        }
        self.store.usage_settle(&settles, now_ms()).await?;
        Ok(claimed)
    }

    /// Pushes a batch; a refused batch of several records is split.
    fn push(&self, batch: Vec<StoredUsage>) -> BoxFuture<'_, Vec<(UsageRecord, UsageSettle)>> {
        Box::pin(async move {
            let records: Vec<PushRecord> = batch.iter().map(PushRecord::from_stored).collect();
            let started = Instant::now();
            let Pushed { outcome, host } = self.api.push_on(&records).await;
            let took = started.elapsed();
            let call = |outcome: &'static str| m::usage_push_call(outcome, &host, took);
            match outcome {
                PushOutcome::Taken => {
                    call("taken");
                    m::usage_pushed(batch.len() as u64);
                    tracing::info!(records = batch.len(), took_ms = took.as_millis() as u64, "usage pushed");
                    batch.into_iter().map(|s| (s.record, UsageSettle::Pushed)).collect()
                }
                PushOutcome::RecordFault { code, msg } | PushOutcome::Split { code, msg } if batch.len() > 1 => {
                    call("refused");
                    tracing::warn!(records = batch.len(), %code, %msg, reason = usage_code_reason(&code), "usage batch refused; splitting it to find the refused records");
                    self.split(batch).await
                }
                PushOutcome::RecordFault { code, msg } => {
                    call("refused");
                    m::usage_refused("refused", 1);
                    let sn = batch.first().map(|s| s.record.metering_sn.clone()).unwrap_or_default();
                    let reason = usage_code_reason(&code);
                    tracing::error!(metering_sn = %sn, %code, %msg, reason, "KooGallery refused a usage record; it is in the usage dead-letter list");
                    let msg = format!("{reason} (KooGallery: {msg})");
                    batch
                        .into_iter()
                        .map(|s| (s.record, UsageSettle::Dead { code: code.clone(), msg: msg.clone() }))
                        .collect()
                }
                PushOutcome::Split { code, msg } => {
                    // One record answered "more than 1000 records": not the record's fault.
                    call("retry");
                    let error = format!("{code} on a single record: {msg}");
                    batch.into_iter().map(|s| self.retry(s, &error)).collect()
                }
                PushOutcome::ConfigFault { code, msg } => {
                    // Wrong key or a body not signed as sent: every record would fail the same way.
                    // Hold them all (no attempt counted, never dead-lettered, the error kept on the
                    // record) and look again after the hold interval, until the operator fixes it.
                    call("config_fault");
                    m::usage_config_fault(&code);
                    let reason = usage_code_reason(&code);
                    tracing::error!(records = batch.len(), %code, %msg, reason, "usage push: KooGallery refused our signature or credentials; the records are held (not dead-lettered) until the configuration is fixed");
                    let at_ms = now_ms() + i64::try_from(self.settings.hold.as_millis()).unwrap_or(i64::MAX / 2);
                    let error = format!("configuration fault, held: {code}: {reason} (KooGallery: {msg})");
                    batch
                        .into_iter()
                        .map(|s| {
                            let attempts = s.attempts;
                            (s.record, UsageSettle::Retry { attempts, at_ms, error: error.clone() })
                        })
                        .collect()
                }
                PushOutcome::Retry(error) => {
                    call("retry");
                    tracing::warn!(records = batch.len(), %error, "usage push failed; will retry with the same metering_sn");
                    batch.into_iter().map(|s| self.retry(s, &error)).collect()
                }
            }
        })
    }

    /// Keeps `koogate_usage_held_near_expiry`: held records whose begin_time is
    /// close to KooGallery's 21-day limit, as seen by this replica in its last
    /// few hold intervals (a held record is claimed again every hold interval).
    fn track_near_expiry(&self, near: &[String], sent: &[StoredUsage], now: i64) {
        let mut map = self.near_expiry.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // One line per round, naming the first: a thousand held records must not be a thousand lines.
        let new: Vec<&String> = near.iter().filter(|sn| !map.contains_key(*sn)).collect();
        if let Some(first) = new.first() {
            tracing::warn!(records = new.len(), first_metering_sn = %first, "usage of a frozen instance is near KooGallery's 21-day limit: it becomes unbillable unless the instance is unfrozen soon");
        }
        for sn in near {
            map.insert(sn.clone(), now);
        }
        for s in sent {
            map.remove(&s.record.metering_sn);
        }
        let window = i64::try_from((self.settings.hold * 3 + self.settings.lease).as_millis()).unwrap_or(i64::MAX / 2);
        map.retain(|_, seen| now - *seen <= window);
        m::usage_held_near_expiry(map.len());
    }

    async fn split(&self, batch: Vec<StoredUsage>) -> Vec<(UsageRecord, UsageSettle)> {
        let mut second = batch;
        let first: Vec<StoredUsage> = second.drain(..second.len() / 2).collect();
        let mut out = self.push(first).await;
        out.extend(self.push(second).await);
        out
    }

    fn retry(&self, stored: StoredUsage, error: &str) -> (UsageRecord, UsageSettle) {
        let attempts = stored.attempts + 1;
        let age = Duration::from_millis(u64::try_from(now_ms() - stored.accepted_ms).unwrap_or(0));
        if self.settings.schedule.exhausted(attempts, age) {
            m::usage_refused("gave_up", 1);
            tracing::error!(metering_sn = %stored.record.metering_sn, attempts, %error, "usage push gave up; the record is in the usage dead-letter list");
            let msg = format!("gave up after {attempts} attempts: {error}");
            return (stored.record, UsageSettle::Dead { code: GAVE_UP.into(), msg });
        }
        let delay = i64::try_from(self.settings.schedule.delay(attempts).as_millis()).unwrap_or(i64::MAX / 4);
        (stored.record, UsageSettle::Retry { attempts, at_ms: now_ms() + delay, error: error.to_owned() })
    }

    async fn update_gauges(&self) {
        match self.store.usage_stats().await {
            Ok(stats) => {
                let age = stats
                    .oldest_unpushed_ms
                    .map(|ms| Duration::from_millis(u64::try_from(now_ms() - ms).unwrap_or(0)))
                    .unwrap_or_default();
                m::usage_gauges(stats.unpushed, stats.dead, age);
            }
            Err(e) => tracing::warn!(error = %e, "usage push: could not read the ledger's gauges"),
        }
    }
}

/// The code of a record dead-lettered because pushing it kept failing.
pub const GAVE_UP: &str = "koogate.gave_up";

const GAUGES_EVERY: Duration = Duration::from_secs(5);
