//! V1 call authentication and parsing.
//!
//! Input: one mode byte (see `common::Mode`), then a raw query string. Every input exercises:
//! 1. `verify_v1` of the raw query (and `parse_v1` of its parameters when it passes);
//! 2. `parse_v1` of the parameter map decoded from the query (`form_urlencoded`, a repeated
//!    name keeps its last value), with the access key decrypting `mobilePhone`/`email`;
//! 3. when the mode byte is even: that parameter map correctly signed by `client::v1_query`
//!    with the mode's signer and clock offset, which must verify exactly when the signer is a
//!    key of the ring in its grace and the timestamp is inside the window, must give back the
//!    parameters signed, and then reaches `parse_v1` as the gateway does.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::{keys, Mode, KEY, NOW_MS, WINDOW_SECS};
use koogate::protocol::call::parse_v1;
use koogate::protocol::verify::{format_v1_timestamp, verify_v1};
use koogate::protocol::{Generation, ResultCode};
use libfuzzer_sys::fuzz_target;

fn check_parse(params: &BTreeMap<String, String>, key: &str) {
    match parse_v1(params, key, koogate::protocol::crypto::EncryptType::Aes256) {
        Ok(call) => assert_eq!(call.generation, Generation::V1),
        Err(rejection) => {
            assert_eq!(rejection.code(), ResultCode::InvalidParam, "{rejection:?}");
            let _ = (rejection.to_string(), rejection.reason());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, query)) = data.split_first() else { return };
    let query = String::from_utf8_lossy(query);
    let ring = keys();

    // 1. The raw query.
    match verify_v1(&ring, &query, NOW_MS, WINDOW_SECS) {
        Ok(verified) => {
            assert!(!verified.params.contains_key("authToken"));
            check_parse(&verified.params, verified.key.expose());
        }
        Err(rejection) => {
            let _ = (rejection.to_string(), rejection.reason());
        }
    }

    // 2. The parameters alone.
    let params: BTreeMap<String, String> =
        form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    check_parse(&params, KEY);

    // 3. A correctly signed variant.
    let mode = Mode::new(mode);
    if !mode.sign {
        return;
    }
    let (signer, ring) = mode.signer_and_ring();
    let timestamp_ms = NOW_MS + mode.offset_ms;
    let signed = koogate::tools::client::v1_query(signer, &params, timestamp_ms);
    match verify_v1(&ring, &signed, NOW_MS, WINDOW_SECS) {
        Ok(verified) => {
            assert!(mode.must_verify(), "{mode:?} verified: {signed}");
            assert_eq!(verified.key.expose(), signer);
            let mut sent = params.clone();
            sent.remove("authToken");
            sent.insert("timeStamp".into(), format_v1_timestamp(timestamp_ms));
            assert_eq!(verified.params, sent, "{signed}");
            // What the gateway does next.
            check_parse(&verified.params, verified.key.expose());
        }
        Err(refusal) => common::check_signed_refusal(mode, &refusal, &signed),
    }
});
