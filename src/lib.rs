//! koogate: the seller-side endpoint of Huawei Cloud KooGallery's SaaS
//! callbacks, turning verified calls into normalized settlement events.
//!
//! # Layout
//! From the bottom up, one line per module; a top-level module imports only
//! modules listed above it (no cycles, checked by `tests/it/layers.rs`, which
//! also checks that this list names every module), and no product module
//! imports the tooling at the end. The paths through them are drawn in
//! `docs/architecture.md`.
//! - [`domain`]: the vocabulary: instance [`domain::Status`], record field names.
//! - [`secret`]: secrets that never print.
//! - [`logfmt`]: caller strings made safe for logs; refusal log rate limits.
//! - [`metrics`]: every Prometheus metric name.
//! - [`backoff`]: the retry schedule of deliveries and pushes.
//! - [`tls`]: optional TLS termination.
//! - [`protocol`]: the KooGallery wire format; pure functions, tested with the reference's vectors.
//!   - [`protocol::sign`]: every HMAC of the protocol (Body-Sign, V2 and V1 signatures).
//!   - [`protocol::verify`]: authenticating a V2 or V1 call (signature, timestamp window, key rotation).
//!   - [`protocol::call`]: parsing a verified request into a typed activity.
//!   - [`protocol::answer`]: answer bodies, serialized once.
//!   - [`protocol::crypto`]: field encryption (§9) of answers and calls.
//!   - [`protocol::unconfirmed`]: every detail the reference leaves unconfirmed, and Huawei's word on it.
//! - [`events`]: the normalized event model, the outbox entry and event ids, the SKU map.
//! - [`usage`]: the usage model of account settlement; the intake decision.
//!   - [`usage::record`]: usage records from the billing core, checked and in canonical form.
//! - [`marketplace`]: KooGallery's open API.
//!   - [`marketplace::apig`]: Huawei API Gateway AK/SK signing (`SDK-HMAC-SHA256`).
//!   - [`marketplace::order`]: the order query client.
//!   - [`marketplace::usage`]: the usage push client.
//! - [`store`]: nonce, dedup, ledger, outbox and usage state behind role traits.
//!   - [`store::plan`]: the command language both backends interpret.
//!   - [`store::keys`]: key layout, shards, instance ids.
//!   - [`store::redis`]: the production backend (one Lua script per call, Cluster-ready); per role:
//!     - `store::redis::calls`: `CallStore` (`apply.lua`, `redeem.lua`).
//!     - `store::redis::outbox`: `Outbox` (streams per shard; `settle.lua`, `redrive.lua`).
//!     - `store::redis::history`: `History` (delivered events kept by `settle.lua`, sorted-set indexes).
//!     - `store::redis::orders`: `OrderCache`.
//!     - `store::redis::usage`: `UsageLedger` (`usage_*.lua`).
//!     - `store::redis::accounts`: `AccountIndex` (`account_pending.lua`).
//!   - [`store::embedded`]: a redb file, the default without Redis; per role:
//!     - `store::embedded::calls`: `CallStore`.
//!     - `store::embedded::outbox`: `Outbox`.
//!     - `store::embedded::history`: `History` (kept in the settle transaction, index tables by time).
//!     - `store::embedded::orders`: `OrderCache`.
//!     - `store::embedded::usage`: `UsageLedger`.
//!     - `store::embedded::accounts`: `AccountIndex`.
//! - [`gateway`]: the decisions: a parsed call becomes a [`store::Plan`] (the state machine, once) and a signed answer.
//! - [`accounts`]: account settlement binding: account and resource views, the binding check.
//! - [`metering`]: the usage workers of account settlement.
//!   - [`metering::intake`]: `POST /v1/usage`, records decided and stored before the answer.
//!   - [`metering::push`]: the push to KooGallery's usage API, exactly once per record.
//! - [`delivery`]: the worker moving events from the outbox to a sink, in order per instance, with retries and a DLQ.
//!   - [`delivery::sink`]: the `Sink` trait (how to add a target).
//!   - [`delivery::webhook`]: the billing core over HTTP, Standard Webhooks signatures.
//!   - [`delivery::jsonl`]: the JSONL file target (group commit, rotation).
//!   - [`delivery::enrich`]: completing events from KooGallery's order query before delivery.
//! - [`http`]: listeners, routing, limits, graceful shutdown.
//! - [`console`]: the operator web console, static files embedded, served on the admin listener.
//! - [`config`]: one table declaring each setting once, read into one struct per component.
//! - [`admin`]: the admin API (events and their history, DLQ, order ledger, usage, accounts).
//! - [`server`]: wiring it all together.
//!
//! Tooling, in its own wing (stand-ins and drivers for the binary's tool verbs
//! and the tests; the product never imports it):
//! - [`tools`]: the wing.
//!   - [`tools::client`]: calling a gateway as KooGallery does (signed V2 and V1 requests).
//!   - [`tools::replay`]: `koogate replay`, re-sending fixture payloads.
//!   - [`tools::sink`]: `koogate sink`, the reference billing-core sink.
//!   - [`tools::simulate`]: `koogate simulate`, KooGallery's side of the wire.
//!     - [`tools::simulate::market`]: the order query API.
//!     - [`tools::simulate::orders`]: the simulator's order book (the mock orders).
//!     - [`tools::simulate::usage`]: the usage API.
//!     - [`tools::simulate::scenario`]: the scenarios: named call sequences and what each expects.
//!     - [`tools::simulate::driver`]: running a scenario against a gateway.
//!     - [`tools::simulate::usage_flow`]: the usage step of `account-settlement-usage`.
//!     - [`tools::simulate::report`]: what a run saw, violations in words.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod backoff;
pub mod config;
pub mod console;
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
