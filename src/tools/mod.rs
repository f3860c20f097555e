//! The tooling wing: stand-ins and drivers used by the binary's tool verbs,
//! the benchmark and the tests. Nothing in the product imports it
//! (`tests/it/layers.rs` checks).
//!
//! - [`client`]: calling a gateway as KooGallery does (signed V2 and V1 requests).
//! - [`replay`]: `koogate replay`, re-sending recorded calls.
//! - [`sink`]: `koogate sink`, the reference billing sink.
//! - [`simulate`]: `koogate simulate`: KooGallery's order query and usage APIs,
//!   the call scenarios.

pub mod client;
pub mod replay;
pub mod simulate;
pub mod sink;
