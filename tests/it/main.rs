//! The integration tests, one test binary: each module was a `tests/*.rs` binary of its own, and each
//! compiled `tests/common` and linked koogate again. Run one module with `cargo test --test it lifecycle::`.
//! Apart, in binaries of their own: `tests/slow_body.rs` (needs the machine alone), `tests/metrics.rs` and
//! `tests/dashboards.rs` (they read the process-wide metrics recorder: other tests in the process would
//! change the counts, or export a series the dashboard test must produce itself), and `tests/console.rs`
//! (it drives a browser).

#[path = "../common/mod.rs"]
mod common;

mod accounts;
mod bad_input;
mod binary;
mod catalogue;
mod cluster;
mod conformance;
mod delivery;
mod differential;
mod enrichment;
mod faults;
mod hardening;
mod history;
mod layers;
mod lifecycle;
mod limits;
mod openapi;
mod readme;
mod redis_store;
mod replay;
mod security;
mod simulate;
mod simulate_usage;
mod tls;
mod usage;
