//! koogate: the seller-side endpoint of Huawei Cloud KooGallery's SaaS
//! callbacks, turning verified calls into normalized settlement events.
//!
//! # Layout
//! From the bottom up; a module imports only modules listed above it (no
//! cycles, checked by `tests/it/layers.rs`), and no product module imports the
//! tooling at the end.
//! - [`domain`]: the vocabulary: instance [`domain::Status`], record field names.
//! - [`secret`]: secrets that never print.
//! - [`logfmt`]: caller strings made safe for logs; refusal log rate limits.
//! - [`metrics`]: every Prometheus metric name.
//! - [`backoff`]: the retry schedule of deliveries and pushes.
//! - [`tls`]: optional TLS termination.
//! - [`protocol`]: the wire format. Verifying V2/V1 calls, parsing activities,
//!   signing answers, field encryption. Pure functions, tested with the
//!   reference's vectors.
//! - [`events`]: the normalized event model, the outbox entry and event ids,
//!   the SKU map.
//! - [`usage`]: the usage model of account settlement: records from the
//!   billing core, checked and in canonical form; the intake decision.
//! - [`marketplace`]: KooGallery's open API (API Gateway signing, order query,
//!   usage push).
//! - [`store`]: nonce, dedup, ledger, outbox and usage state behind role
//!   traits (calls, outbox, order cache, usage ledger, account index), with a
//!   Redis backend (one Lua script per call) and an embedded redb backend.
//! - [`gateway`]: the decisions. A parsed call becomes a store [`store::Plan`]
//!   (the instance state machine lives here, once) and a signed answer.
//! - [`accounts`]: account settlement binding: which instances a Huawei Cloud
//!   account holds (account and resource views, the binding check).
//! - [`metering`]: the usage workers: intake (`POST /v1/usage`) and the push
//!   to KooGallery's usage API, exactly once.
//! - [`delivery`]: moving events out of the outbox to a sink (the billing
//!   core over HTTP with Standard Webhooks signatures, or a JSONL file),
//!   completing them from KooGallery's orders first (`delivery::enrich`).
//! - [`config`]: settings from the environment and an optional TOML file.
//! - [`http`]: listeners, routing, limits, graceful shutdown.
//! - [`admin`]: the admin API (events, DLQ, order ledger, usage, accounts).
//! - [`server`]: wiring it all together.
//!
//! Tooling, in its own wing (stand-ins and drivers, used by the binary and
//! the tests; the product never imports it):
//! - [`tools`]: `client` (calling a gateway as KooGallery does), `replay`,
//!   `sink` (the reference billing sink), `simulate` (KooGallery's side).
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod backoff;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod events;
pub mod gateway;
pub mod http;
pub mod logfmt;
pub mod marketplace;
pub mod metering;
pub mod metrics;
pub mod protocol;
pub mod secret;
pub mod server;
pub mod store;
pub mod tls;
pub mod tools;
pub mod usage;

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
