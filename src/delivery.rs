//! Moving events out of the outbox.
//!
//! Until HTTP delivery to the billing core exists, events are appended to
//! `<data dir>/events.jsonl` (one event per line, fsynced before the outbox
//! entry is removed: at-least-once, deduplicate by `id`). Events of
//! `testFlag=1` calls are dropped here unless `KOOGATE_FORWARD_TEST_EVENTS`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::events;
use crate::metrics as m;
use crate::store::{OutboxEntry, Store};

/// Entries taken per round.
const BATCH: usize = 128;
/// Pause when the outbox is empty.
const IDLE: Duration = Duration::from_millis(100);
/// An entry claimed this long ago and never acknowledged is taken over.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// Consumer name of this process in the outbox's consumer group.
pub fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "koogate".into());
    format!("{host}-{}", std::process::id())
}

/// Appends outbox events to a JSONL file until `shutdown`.
pub async fn run_jsonl(store: Arc<dyn Store>, path: PathBuf, forward_test: bool, shutdown: CancellationToken) {
    let consumer = consumer_name();
    let mut backoff = IDLE;
    loop {
        let round = forward_round(store.as_ref(), &path, &consumer, forward_test).await;
        let pause = match round {
            Ok(0) => {
                backoff = IDLE;
                IDLE
            }
            Ok(_) => {
                backoff = IDLE;
                Duration::ZERO
            }
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "forwarding events failed; will retry");
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff
            }
        };
        if let Ok(depth) = store.outbox_len().await {
            m::outbox_depth(depth);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot write events file: {0}")]
    Io(#[from] std::io::Error),
}

async fn forward_round(
    store: &dyn Store,
    path: &PathBuf,
    consumer: &str,
    forward_test: bool,
) -> Result<usize, ForwardError> {
    let entries = store.outbox_claim(consumer, BATCH, STALE_AFTER).await?;
    if entries.is_empty() {
        return Ok(0);
    }
    let mut lines = String::new();
    let mut skipped = 0u64;
    for entry in &entries {
        if entry.test && !forward_test {
            skipped += 1;
            continue;
        }
        match events::assemble(entry) {
            Ok(event) => {
                lines.push_str(&serde_json::to_string(&event).unwrap_or_default());
                lines.push('\n');
            }
            Err(e) => tracing::error!(event_id = %entry.id, error = %e, "event dropped: cannot be assembled"),
        }
    }
    if !lines.is_empty() {
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let mut file = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
        file.write_all(lines.as_bytes()).await?;
        file.sync_data().await?;
    }
    ack(store, &entries).await?;
    let written = entries.len() as u64 - skipped;
    m::forwarded("jsonl", "delivered", written);
    m::forwarded("jsonl", "skipped_test", skipped);
    Ok(entries.len())
}

async fn ack(store: &dyn Store, entries: &[OutboxEntry]) -> Result<(), crate::store::StoreError> {
    store.outbox_ack(entries).await
}
