//! Field encryption of protocol §9 (`appInfo` credentials, V1 `mobilePhone`/`email`).
//!
//! Input: one mode byte, then text (invalid UTF-8 is replaced, as a decoded query value is).
//! Every input exercises:
//! 1. `decrypt` of the text with the fixed access key's AES-256 and AES-128 keys, and with
//!    keys derived from the text itself (both sizes); a value that decrypts must be the
//!    canonical encryption of what it decrypts to (re-encrypting with its IV gives it back);
//! 2. `derive_key` of the text as an access key (16/32 bytes, the AES-128 key a prefix of
//!    the AES-256 one, as Java's SHA1PRNG stream makes them);
//! 3. `encrypt`/`decrypt` and `encrypt_with_iv`/`decrypt` round trips of the text as
//!    plaintext under both key sizes, which must give the text back exactly.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use std::sync::LazyLock;

use koogate::protocol::crypto::{decrypt, derive_key, encrypt, encrypt_with_iv, DecryptError, EncryptType};
use libfuzzer_sys::fuzz_target;

static KEY256: LazyLock<Vec<u8>> = LazyLock::new(|| derive_key(common::KEY, EncryptType::Aes256));
static KEY128: LazyLock<Vec<u8>> = LazyLock::new(|| derive_key(common::KEY, EncryptType::Aes128));

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

fn check_decrypt(key: &[u8], value: &str) {
    match decrypt(key, value) {
        Ok(plain) => {
            // Only ASCII IVs are ever made; a decrypting value has a 16-byte prefix on a
            // char boundary, which may be any text: re-encrypt only with what encrypt takes.
            let iv = &value[..16];
            if iv.is_ascii() {
                assert_eq!(encrypt_with_iv(key, iv, &plain).as_deref(), Ok(value), "not the canonical encryption");
            }
        }
        Err(e) => {
            let _ = e.to_string();
            if value.len() < 16 {
                assert_eq!(e, DecryptError::TooShort);
            }
        }
    }
}

fn round_trip(key: &[u8], iv: &str, text: &str) {
    let sealed = encrypt(key, text).expect("valid key");
    assert!(sealed.len() >= 16 + 24 && sealed.is_ascii(), "{sealed}");
    assert_eq!(decrypt(key, &sealed).as_deref(), Ok(text));
    let sealed = encrypt_with_iv(key, iv, text).expect("valid key and IV");
    assert!(sealed.starts_with(iv));
    assert_eq!(decrypt(key, &sealed).as_deref(), Ok(text));
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);

    // 1. Decryption of arbitrary text.
    check_decrypt(&KEY256, &text);
    check_decrypt(&KEY128, &text);

    // 2. Keys derived from arbitrary access keys.
    let own256 = derive_key(&text, EncryptType::Aes256);
    let own128 = derive_key(&text, EncryptType::Aes128);
    assert_eq!(own256.len(), 32);
    assert_eq!(own128.len(), 16);
    assert_eq!(own128[..], own256[..16]);
    if mode & 1 == 1 {
        check_decrypt(&own256, &text);
        check_decrypt(&own128, &text);
    }

    // 3. Round trips of arbitrary plaintext, with a random IV and with one from the input.
    let iv: String =
        (0..16).map(|i| ALNUM[usize::from(rest.get(i).copied().unwrap_or(mode)) % ALNUM.len()] as char).collect();
    round_trip(&KEY256, &iv, &text);
    round_trip(&KEY128, &iv, &text);
    if mode & 2 == 2 {
        round_trip(&own256, &iv, &text);
        round_trip(&own128, &iv, &text);
    }
});
