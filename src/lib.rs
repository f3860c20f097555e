//! koogate: the seller-side endpoint of Huawei Cloud KooGallery's SaaS
//! callbacks, turning verified calls into normalized settlement events.
//!
//! # Layout
//! - [`protocol`]: the wire format. Verifying V2/V1 calls, parsing activities,
//!   signing answers, field encryption. Pure functions, tested with the
//!   reference's vectors.
//! - [`gateway`]: the decisions. A parsed call becomes a store [`store::Plan`]
//!   (the instance state machine lives here, once) and a signed answer.
//! - [`store`]: nonce, dedup, ledger and outbox state behind one trait, with a
//!   Redis backend (one Lua script per call) and an embedded redb backend.
//! - [`events`]: the normalized event model and the SKU map.
//! - [`delivery`]: moving events out of the outbox.
//! - [`jsonl`]: the JSONL event target (group commit, rotation).
//! - [`logfmt`]: caller strings made safe for logs; refusal log rate limits.
//! - [`usage`]: account settlement: usage records from the billing core,
//!   checked, stored and pushed to KooGallery's usage API exactly once.
//! - [`accounts`]: account settlement binding: which instances a Huawei Cloud
//!   account holds (account and resource views, the binding check).
//! - [`marketplace`]: KooGallery's open API (order query, usage push).
//! - [`http`]: listeners, routing, limits, graceful shutdown.
//! - [`config`]: settings from the environment and an optional TOML file.
//! - [`metrics`]: every Prometheus metric name.
//! - [`server`]: wiring it all together.
//! - [`client`]: calling a gateway as KooGallery does (replay, simulator, tests).
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod backoff;
pub mod client;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod enrich;
pub mod events;
pub mod gateway;
pub mod http;
pub mod jsonl;
pub mod logfmt;
pub mod marketplace;
pub mod metering;
pub mod metrics;
pub mod protocol;
pub mod replay;
pub mod secret;
pub mod server;
pub mod simulate;
pub mod sink;
pub mod store;
pub mod tls;
pub mod usage;
pub mod webhook;

/// An error with its sources, `outer: inner: innermost` (for log lines and
/// dead letters, where "error sending request" alone says nothing).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
