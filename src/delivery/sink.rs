//! The [`Sink`] trait: where the delivery worker hands an event, and how it
//! learns what became of it.
//!
//! The contract is deliberately narrow (one `send`, a `name`): the
//! [`Worker`](super::Worker) owns everything that must be the same for every
//! target, a sink owns only its transport.
//!
//! | the worker owns | a sink owns |
//! |---|---|
//! | claiming from the outbox, order per instance, concurrency | its transport (connections, files, its own timeouts) |
//! | enrichment, the account index, skipping `testFlag=1` events | what it adds per attempt (signature, timestamp) |
//! | the event's JSON (every sink gets the same bytes) | classifying its own failures: [`SinkError::Permanent`] or [`SinkError::Transient`] |
//! | retries with backoff, the dead-letter queue, settling | its resources (HTTP client pool, writer task, signals) |
//! | metrics (`koogate_delivery_*`, `koogate_outbox_depth`, `koogate_dlq_events`) and the delivery log lines | |
//!
//! A sink is called concurrently (up to `KOOGATE_DELIVERY_CONCURRENCY`
//! events at once, never two of one instance) and may be called again with an
//! event it already received (at least once: the answer of an earlier attempt
//! was lost, or a replica took over). `Ok(())` means the event is durably
//! where it goes; the worker then settles it and never sends it again.
//!
//! # Adding a target
//!
//! One new file plus its wiring (a `mod` line and one arm). Say a target
//! that puts events on a message queue, in `src/delivery/queue.rs`:
//!
//! ```ignore
//! //! The message queue target.
//! use super::sink::{Message, Sink, SinkError};
//!
//! pub struct QueueSink { client: queue::Client, topic: String }
//!
//! #[async_trait::async_trait]
//! impl Sink for QueueSink {
//!     fn name(&self) -> String {
//!         format!("queue:{}", self.topic)
//!     }
//!
//!     async fn send(&self, message: &Message<'_>) -> Result<(), SinkError> {
//!         // Bound the I/O yourself: the worker waits for every send to finish.
//!         match self.client.publish(&self.topic, message.id, message.body).await {
//!             Ok(()) => Ok(()),
//!             Err(e) if e.is_refused() => Err(SinkError::Permanent(format!("queue refused: {e}"))),
//!             Err(e) => Err(SinkError::transient(format!("queue unavailable: {e}"))),
//!         }
//!     }
//! }
//! ```
//!
//! Declare it beside the others in `src/delivery/mod.rs` (`pub mod queue;`)
//! and give it an arm in `server::build_sink`, the one place that chooses the
//! sink from the settings (the worker takes any `Arc<dyn Sink>`):
//!
//! ```ignore
//! Some(topic) => Arc::new(QueueSink::connect(&config.queue_url, topic)?),
//! ```
//!
//! Ordering, retries, the dead-letter queue, redrive, the admin API, metrics
//! and enrichment then work for it unchanged. The two existing targets are
//! [`super::webhook::WebhookSink`] (the billing core over HTTP, Standard
//! Webhooks signatures) and [`super::jsonl::JsonlSink`] (`events.jsonl`).

use std::time::Duration;

use crate::events::Event;

/// One event as the worker hands it to a sink.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    /// The event id (`evt_<instance>_<seq>`), the same on every attempt: the
    /// receiver deduplicates by it.
    pub id: &'a str,
    /// The event (for a sink that routes or labels by its fields).
    pub event: &'a Event,
    /// The event as JSON, exactly the bytes to deliver (no trailing newline).
    pub body: &'a [u8],
}

/// Why a send failed, as the worker needs to know it: whether to try again.
/// The text is what the dead letter keeps as `last_error` and the logs show.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Sending it again cannot succeed (e.g. the billing core refused it with
    /// a 4xx): the event is dead-lettered at once.
    #[error("{0}")]
    Permanent(String),
    /// Worth trying again with backoff; `retry_after` is the receiver's own
    /// wish (HTTP `Retry-After`), capped by the schedule's largest delay.
    #[error("{message}")]
    Transient { message: String, retry_after: Option<Duration> },
}

impl SinkError {
    /// A transient failure without a receiver-given delay.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient { message: message.into(), retry_after: None }
    }

    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Permanent(_))
    }
}

/// Where delivered events go: the billing core, a file, … (see the module docs).
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Where this sink sends, for the logs (`destination` of "delivery started"):
    /// a URL, a path.
    fn name(&self) -> String;

    /// Delivers one event. `Ok(())` once it is durably at the target; an error
    /// says whether trying again may help (see [`SinkError`]).
    async fn send(&self, message: &Message<'_>) -> Result<(), SinkError>;
}
