//! V2 request authentication and parsing.
//!
//! Input: one mode byte (see `common::Mode`), then the raw query string up to the
//! first `\n`, then the raw body. Every input exercises:
//! 1. `verify_v2` of the raw query over the raw body (and `parse_v2` when it passes);
//! 2. `parse_v2` of the body on its own (refusals must be `000002`, parsing deterministic);
//! 3. when the mode byte is even: the body correctly signed by `client::v2_query` with the
//!    mode's signer and clock offset, which must verify exactly when the signer is a key of
//!    the ring in its grace and the timestamp is inside the window, and then reaches `parse_v2`
//!    through the path the gateway takes after verification.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use common::{keys, Mode, NOW_MS, WINDOW_SECS};
use koogate::protocol::call::parse_v2;
use koogate::protocol::verify::verify_v2;
use koogate::protocol::{Generation, ResultCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (query, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    // A query string reaches the gateway as the request target's text.
    let query = String::from_utf8_lossy(query);
    let ring = keys();

    // 2. The body alone.
    let parsed = parse_v2(body);
    match &parsed {
        Ok(call) => assert_eq!(call.generation, Generation::V2),
        Err(rejection) => {
            assert_eq!(rejection.code(), ResultCode::InvalidParam, "{rejection:?}");
            let _ = (rejection.to_string(), rejection.reason());
        }
    }

    // 1. The raw query over the raw body.
    match verify_v2(&ring, &query, body, NOW_MS, WINDOW_SECS) {
        Ok(verified) => {
            assert!(!verified.nonce.is_empty() && verified.nonce.len() <= 128);
            assert_eq!(parse_v2(body), parsed);
        }
        Err(rejection) => {
            assert_eq!(rejection.code(), ResultCode::AuthFailed, "{rejection:?}");
            let _ = (rejection.to_string(), rejection.reason());
        }
    }

    // 3. A correctly signed variant.
    let mode = Mode::new(mode);
    if !mode.sign {
        return;
    }
    // client::v2_query puts the nonce in the query unescaped, as KooGallery's
    // (alphanumeric) nonces need no escaping: keep to that alphabet.
    let mut nonce: String = query.chars().filter(char::is_ascii_alphanumeric).take(128).collect();
    if nonce.is_empty() {
        nonce.push('n');
    }
    let (signer, ring) = mode.signer_and_ring();
    let timestamp_ms = NOW_MS + mode.offset_ms;
    let mut signed = koogate::tools::client::v2_query(signer, body, timestamp_ms, &nonce);
    // Hex case is ignored: send odd-length bodies' signatures in upper case.
    if body.len() % 2 == 1 {
        let upper = signed["signature=".len().."signature=".len() + 64].to_ascii_uppercase();
        signed.replace_range("signature=".len().."signature=".len() + 64, &upper);
    }
    match verify_v2(&ring, &signed, body, NOW_MS, WINDOW_SECS) {
        Ok(verified) => {
            assert!(mode.must_verify(), "{mode:?} verified: {signed}");
            assert_eq!(verified.key.expose(), signer);
            assert_eq!(verified.nonce, nonce);
            assert_eq!(verified.timestamp_ms, timestamp_ms);
            // What the gateway does next.
            assert_eq!(parse_v2(body), parsed);
        }
        Err(refusal) => common::check_signed_refusal(mode, &refusal, &signed),
    }
});
