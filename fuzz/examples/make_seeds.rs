//! Writes the seed corpora of every fuzz target from `fixtures/` (`scripts/fuzz seed`).
//!
//! `cargo run --example make_seeds -- <fixtures dir> <seeds dir>`. Deterministic: every
//! signature is made at the targets' fixed clock and every encryption with a fixed IV, so
//! rerunning it rewrites the same files. Seed file names say what they hold.

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::{Mode, Signer, KEY, NOW_MS};
use koogate::tools::client::{v1_query, v2_query};
use koogate::protocol::crypto::{derive_key, encrypt_with_iv, EncryptType};

type Params = BTreeMap<String, String>;

/// `(name, bytes)` of every `*.json` in `dir` (bad cases included), in name order.
fn fixtures(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in [dir.to_path_buf(), dir.join("bad")] {
        let mut paths: Vec<PathBuf> = fs::read_dir(&sub)
            .unwrap_or_else(|e| panic!("{}: {e}", sub.display()))
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for path in paths {
            let stem = path.file_stem().expect("a file name").to_string_lossy().into_owned();
            let name = if sub == dir { stem } else { format!("bad-{stem}") };
            out.push((name, fs::read(&path).expect("a readable fixture")));
        }
    }
    out
}

/// A V1 fixture: a JSON object of parameters (non-strings kept as their JSON text).
fn v1_params(bytes: &[u8]) -> Params {
    let value: serde_json::Value = serde_json::from_slice(bytes).expect("a V1 fixture is JSON");
    value
        .as_object()
        .expect("a V1 fixture is an object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
        .collect()
}

fn form(params: &Params) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    ser.finish()
}

struct Out {
    root: PathBuf,
    count: usize,
}

impl Out {
    fn put(&mut self, target: &str, name: &str, mode: u8, payload: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).expect("seed directory");
        let mut bytes = vec![mode];
        bytes.extend_from_slice(payload);
        fs::write(dir.join(name), bytes).expect("seed file");
        self.count += 1;
    }
}

const IV: &str = "abcdefgh12345678";
const PHONE: &str = "13800000000";
const EMAIL: &str = "ops-lead@acme.example";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (fixtures_dir, seeds_dir) = match &args[..] {
        [_, f, s] => (PathBuf::from(f), PathBuf::from(s)),
        _ => {
            eprintln!("usage: make_seeds <fixtures dir> <seeds dir>");
            std::process::exit(2);
        }
    };
    for target in ["v2_request", "v1_query", "field_decryption", "event_normalizer"] {
        let _ = fs::remove_dir_all(seeds_dir.join(target));
    }
    let mut out = Out { root: seeds_dir, count: 0 };
    let signed = Mode::byte(Signer::Current, 0);
    let raw = signed | 1;

    // V2 bodies.
    for (name, body) in fixtures(&fixtures_dir.join("v2")) {
        // Signed by the target itself (even mode), after a query line it ignores.
        let mut input = b"signature=&timestamp=&nonce=abcd1234abcd1234\n".to_vec();
        input.extend_from_slice(&body);
        out.put("v2_request", &format!("{name}-target-signs"), signed, &input);
        // A raw query already signed at the targets' clock.
        let mut input = v2_query(KEY, &body, NOW_MS, "abcd1234abcd1234").into_bytes();
        input.push(b'\n');
        input.extend_from_slice(&body);
        out.put("v2_request", &format!("{name}-raw-signed"), raw, &input);
        // The previous key, and a stale timestamp (bodies of the lifecycle only).
        if !name.starts_with("bad-") {
            let mut input = b"nonce=0123456789abcdef\n".to_vec();
            input.extend_from_slice(&body);
            if name.starts_with("01-") {
                out.put("v2_request", &format!("{name}-previous-key"), Mode::byte(Signer::Previous, 60), &input);
                out.put("v2_request", &format!("{name}-stale"), Mode::byte(Signer::Current, -65), &input);
            }
        }
        for (suffix, settings) in [("", 0u8), ("-credentials-aes128", 2 | 4), ("-admin-no-default", 8 | 16)] {
            out.put("event_normalizer", &format!("v2-{name}{suffix}"), settings, &body);
        }
    }

    // V1 parameters, plus newInstances with encrypted contacts.
    let mut v1 = Vec::new();
    for (name, bytes) in fixtures(&fixtures_dir.join("v1")) {
        v1.push((name, v1_params(&bytes)));
    }
    if let Some((_, first)) = v1.iter().find(|(n, _)| n.starts_with("01-")).cloned() {
        for (kind, code) in [(EncryptType::Aes256, "1"), (EncryptType::Aes128, "2")] {
            let key = derive_key(KEY, kind);
            let mut p = first.clone();
            p.insert("encryptType".into(), code.into());
            p.insert("mobilePhone".into(), encrypt_with_iv(&key, IV, PHONE).expect("valid IV"));
            p.insert("email".into(), encrypt_with_iv(&key, IV, EMAIL).expect("valid IV"));
            p.insert("testFlag".into(), "1".into());
            p.insert("trialFlag".into(), "1".into());
            v1.push((format!("01-newInstance-contacts-encrypt-type-{code}"), p));
        }
    }
    for (name, params) in &v1 {
        out.put("v1_query", &format!("{name}-target-signs"), signed, form(params).as_bytes());
        out.put("v1_query", &format!("{name}-raw-signed"), raw, v1_query(KEY, params, NOW_MS).as_bytes());
        if name.starts_with("01-newInstance-stored") {
            let p = form(params);
            out.put("v1_query", &format!("{name}-previous-key"), Mode::byte(Signer::Previous, -60), p.as_bytes());
            out.put("v1_query", &format!("{name}-stale"), Mode::byte(Signer::Current, 75), p.as_bytes());
        }
        for (suffix, settings) in [("", 1u8), ("-credentials-aes128", 1 | 2 | 4), ("-admin-no-default", 1 | 8 | 16)] {
            out.put("event_normalizer", &format!("v1-{name}{suffix}"), settings, form(params).as_bytes());
        }
    }

    // Encrypted fields: values the targets' key decrypts, values it does not, plaintexts.
    for (kind, bits) in [(EncryptType::Aes256, 256), (EncryptType::Aes128, 128)] {
        let key = derive_key(KEY, kind);
        for (what, text) in [("phone", PHONE), ("email", EMAIL), ("empty", ""), ("unicode", "测试用户1 ✓")] {
            out.put(
                "field_decryption",
                &format!("aes{bits}-{what}"),
                0,
                encrypt_with_iv(&key, IV, text).expect("valid IV").as_bytes(),
            );
        }
        // Encrypted with a key derived from the value's own text is out of reach; with another key:
        let other = derive_key("another-key", kind);
        out.put(
            "field_decryption",
            &format!("aes{bits}-other-key"),
            1,
            encrypt_with_iv(&other, IV, PHONE).expect("valid IV").as_bytes(),
        );
    }
    for (name, params) in &v1 {
        for field in ["mobilePhone", "email"] {
            if let Some(value) = params.get(field) {
                out.put("field_decryption", &format!("v1-{name}-{field}"), 0, value.as_bytes());
            }
        }
    }
    for (what, text) in [("plain-phone", PHONE), ("plain-email", EMAIL), ("short", "abc"), ("iv-only", IV)] {
        out.put("field_decryption", what, 3, text.as_bytes());
    }

    println!("wrote {} seed files", out.count);
}
