//! The usage workers of account settlement (protocol §10), over the model in
//! [`crate::usage`] and the [`crate::store`] usage ledger:
//!
//! - [`intake`]: `POST /v1/usage`, one verdict per record.
//! - [`push`]: the worker that pushes stored records to KooGallery.

pub mod intake;
pub mod push;
