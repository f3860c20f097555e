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
//! | retries with backoff, the dead-letter queue, settling | what the receiver answered, if it did ([`Answer`]: a status, the start of the body) |
//! | the attempt log (when, how long, the sink's [`Report`]) and the history of delivered events | its resources (HTTP client pool, writer task, signals) |
//! | metrics (`koogate_delivery_*`, `koogate_outbox_depth`, `koogate_dlq_events`) and the delivery log lines | |
//!
//! A sink is called concurrently (up to `KOOGATE_DELIVERY_CONCURRENCY`
//! events at once, never two of one instance) and may be called again with an
//! event it already received (at least once: the answer of an earlier attempt
//! was lost, or a replica took over). A send answers a [`Report`]: its
//! `result` `Ok(())` means the event is durably where it goes (the worker then
//! settles it and never sends it again); its `answer` is what the receiver
//! said, when it said something (the attempt log keeps it, delivered or not).
//! A sink without answers (a file) turns its `Result` into a report with
//! `.into()`.
//!
//! # Adding a target
//!
//! One new file plus its wiring (a `mod` line and one arm). Say a target
//! that puts events on a message queue, in `src/delivery/queue.rs`:
//!
//! ```ignore
//! //! The message queue target.
//! use super::sink::{Message, Report, Sink, SinkError};
//!
//! pub struct QueueSink { client: queue::Client, topic: String }
//!
//! #[async_trait::async_trait]
//! impl Sink for QueueSink {
//!     fn name(&self) -> String {
//!         format!("queue:{}", self.topic)
//!     }
//!
//!     async fn send(&self, message: &Message<'_>) -> Report {
//!         // Bound the I/O yourself: the worker waits for every send to finish.
//!         let result = match self.client.publish(&self.topic, message.id, message.body).await {
//!             Ok(()) => Ok(()),
//!             Err(e) if e.is_refused() => Err(SinkError::Permanent(format!("queue refused: {e}"))),
//!             Err(e) => Err(SinkError::transient(format!("queue unavailable: {e}"))),
//!         };
//!         // No answer to keep here; an HTTP target gives `Report::answered(result, answer)`.
//!         result.into()
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
//! Ordering, retries, the dead-letter queue, redrive, the attempt log and the
//! history, the admin API, metrics and enrichment then work for it unchanged. The two existing targets are
//! [`super::webhook::WebhookSink`] (the billing core over HTTP, Standard
//! Webhooks signatures) and [`super::jsonl::JsonlSink`] (`events.jsonl`).

use std::time::Duration;

use crate::events::Event;
pub use crate::store::plan::RESPONSE_EXCERPT_MAX;

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

    /// Delivers one event: its [`Report`]'s result is `Ok(())` once it is
    /// durably at the target, an error says whether trying again may help (see
    /// [`SinkError`]); its answer is the receiver's, when it gave one.
    async fn send(&self, message: &Message<'_>) -> Report;
}

/// What the receiver answered one send: an HTTP status and the start of the
/// body (at most [`RESPONSE_EXCERPT_MAX`] bytes, see [`excerpt`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// What became of one send: the outcome, and the receiver's answer when it
/// gave one (on success and on failure alike).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub result: Result<(), SinkError>,
    pub answer: Option<Answer>,
}

impl Report {
    /// An outcome with the receiver's answer.
    pub fn answered(result: Result<(), SinkError>, answer: Answer) -> Self {
        Self { result, answer: Some(answer) }
    }
}

/// An outcome without an answer (the receiver said nothing: a file, a refused connection).
impl From<Result<(), SinkError>> for Report {
    fn from(result: Result<(), SinkError>) -> Self {
        Self { result, answer: None }
    }
}

/// The start of a response body as the attempt log keeps it: at most
/// [`RESPONSE_EXCERPT_MAX`] bytes, invalid UTF-8 replaced, cut on a character
/// boundary (a character the cut would split is left out). Pure.
pub fn excerpt(body: &[u8]) -> String {
    let head = &body[..body.len().min(RESPONSE_EXCERPT_MAX)];
    let mut text = String::from_utf8_lossy(head).into_owned();
    if head.len() < body.len() && std::str::from_utf8(head).err().is_some_and(|e| e.error_len().is_none()) {
        // The cut split a character: it came out as U+FFFD; leave it out.
        text.pop();
    }
    // Replacements (3 bytes for 1) may push the text past the limit.
    let mut end = text.len().min(RESPONSE_EXCERPT_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_cut_on_a_character_boundary() {
        assert_eq!(excerpt(b"busy"), "busy");
        assert_eq!(excerpt(b""), "");
        let ascii = vec![b'a'; 5000];
        assert_eq!(excerpt(&ascii), "a".repeat(RESPONSE_EXCERPT_MAX));
        // 'é' is two bytes: 1023 bytes of 'a', then an 'é' split by the cut.
        let mut split = vec![b'a'; RESPONSE_EXCERPT_MAX - 1];
        split.extend_from_slice("éé".as_bytes());
        assert_eq!(excerpt(&split), "a".repeat(RESPONSE_EXCERPT_MAX - 1));
        // Whole multi-byte characters that fit stay: 341 of 3 bytes.
        assert_eq!(excerpt("€".repeat(400).as_bytes()), "€".repeat(341));
        // Invalid bytes are replaced, and the result still fits.
        let cut = excerpt(&[0xffu8; 2000]);
        assert!(cut.len() <= RESPONSE_EXCERPT_MAX && cut.chars().all(|c| c == '\u{fffd}'), "{}", cut.len());
        assert_eq!(excerpt(&[0xff, b'o', b'k']), "\u{fffd}ok");
    }
}
