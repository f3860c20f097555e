//! Secrets never leave: a full run's every output is searched for each secret.
//! Access key rotation without downtime.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::billing::SECRET;
use crate::common::process::Proc;
use crate::common::*;

const SECRETS: &[(&str, &str)] = &[
    ("KOOGATE_ACCESS_KEY", "ak-current-0f9e8d7c6b5a"),
    ("KOOGATE_PREVIOUS_ACCESS_KEY", "ak-previous-1a2b3c4d5e6f"),
    ("KOOGATE_ADMIN_TOKEN", "admin-token-77f0c3b2a1"),
    ("KOOGATE_BILLING_SECRET", SECRET),
    ("KOOGATE_MARKETPLACE_AK", "MARKETAK0123456789XY"),
    ("KOOGATE_MARKETPLACE_SK", "marketSk-9f8e7d6c5b4a3210zyxw"),
];
const PHONE: &str = "13912345678";
const EMAIL: &str = "very.private@customer.example";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_decrypted_field_appears_in_logs_errors_or_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let sink_out = dir.path().join("sink.jsonl");
    let sink = Proc::sink(SECRET, &sink_out, &["--fail-share", "0.3"]).await;
    let mut env: BTreeMap<String, String> = SECRETS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    env.insert("KOOGATE_STORE".into(), dir.path().join("store").display().to_string());
    env.insert("KOOGATE_DATA_DIR".into(), dir.path().join("data").display().to_string());
    env.insert("KOOGATE_BILLING_URL".into(), format!("http://127.0.0.1:{}/events", sink.port));
    env.insert("KOOGATE_MARKETPLACE_URL".into(), format!("http://127.0.0.1:{}", free_port())); // down: errors get logged
    env.insert("KOOGATE_RETRY_INITIAL_MS".into(), "50".into());
    env.insert("KOOGATE_ISSUE_CREDENTIALS".into(), "true".into());
    let (port, admin_port) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_koogate"))
        .arg("serve")
        .env_clear()
        .envs(&env)
        .env("KOOGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("KOOGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("KOOGATE_LOG", "debug")
        .env("KOOGATE_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ak = SECRETS[0].1;
    let client = koogate::tools::client::KooClient::new(&format!("http://127.0.0.1:{port}"));
    let admin = koogate::tools::client::KooClient::new(&format!("http://127.0.0.1:{admin_port}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.send(hyper::Method::GET, "/readyz", &[], bytes::Bytes::new()).await.map(|r| r.status).unwrap_or(0)
        != 200
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut bodies = Vec::new();
    // Good and bad calls of both generations, with the current and the previous key.
    for rel in fixture_files("v2").into_iter().chain(fixture_files("v2/bad")) {
        bodies.push(client.v2("/koogallery/v2", ak, &fixture(&rel), now_ms()).await.unwrap().body);
    }
    bodies.push(
        client
            .v2("/koogallery/v2", SECRETS[1].1, &fixture("v2/13-newInstance-trial.json"), now_ms())
            .await
            .unwrap()
            .body,
    );
    bodies.push(client.v2("/koogallery/v2", "wrong", &fixture("v2/01-newInstance.json"), now_ms()).await.unwrap().body);
    let key = koogate::protocol::crypto::derive_key(ak, koogate::protocol::crypto::EncryptType::Aes256);
    let mut params = fixture_params("v1/01-newInstance-stored-value-cards.json");
    params.insert("mobilePhone".into(), koogate::protocol::crypto::encrypt(&key, PHONE).unwrap());
    params.insert("email".into(), koogate::protocol::crypto::encrypt(&key, EMAIL).unwrap());
    bodies.push(client.v1("/koogallery/v1", ak, &params, now_ms()).await.unwrap().body);
    for rel in fixture_files("v1/bad") {
        bodies.push(client.v1("/koogallery/v1", ak, &fixture_params(&rel), now_ms()).await.unwrap().body);
    }
    // Admin API with wrong, missing and right tokens.
    for token in ["nope", "", SECRETS[2].1] {
        let auth = format!("Bearer {token}");
        let res =
            admin.send(hyper::Method::GET, "/v1/dlq", &[("authorization", &auth)], bytes::Bytes::new()).await.unwrap();
        bodies.push(res.body);
    }
    // Usage for the trial instance: accepted, then pushed (signed with the access key) to a KooGallery that is down.
    let trial: serde_json::Value = serde_json::from_slice(&fixture("v2/13-newInstance-trial.json")).unwrap();
    let instance =
        koogate::store::keys::instance_id_for(trial["orderId"].as_str().unwrap(), trial["orderLineId"].as_str());
    let day = (chrono::Utc::now() - chrono::Duration::days(2)).format("%Y%m%d").to_string(); // within 21 days
    let usage = serde_json::json!({"records": [{"instance_id": instance, "begin_time": format!("{day}T000000Z"),
        "end_time": format!("{day}T010000Z"), "usage_value": "1.5", "metering_sn": "sec-usage-1"}]});
    let auth = format!("Bearer {}", SECRETS[2].1);
    let res = admin
        .send(hyper::Method::POST, "/v1/usage", &[("authorization", &auth)], usage.to_string().into())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&res.body).contains("\"accepted\":1"), "{}", String::from_utf8_lossy(&res.body));
    bodies.push(res.body);
    tokio::time::sleep(Duration::from_millis(1500)).await; // deliveries, failures, enrichment errors, usage pushes
    let metrics = admin.send(hyper::Method::GET, "/metrics", &[], bytes::Bytes::new()).await.unwrap().body;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let out = tokio::task::spawn_blocking(move || {
        let _ = child.wait();
        let mut stdout = String::new();
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        format!("{stdout}\n{stderr}")
    })
    .await
    .unwrap();

    // A start-up error names the variable, never the value.
    let bad = Command::new(env!("CARGO_BIN_EXE_koogate"))
        .env_clear()
        .envs(&env)
        .env("KOOGATE_BILLING_SECRET", "whsec_!!!")
        .output()
        .unwrap();
    let bad_text = String::from_utf8_lossy(&bad.stderr).into_owned();

    let mut everything = out.clone();
    everything.push_str(&String::from_utf8_lossy(&metrics));
    everything.push_str(&bad_text);
    for b in &bodies {
        everything.push_str(&String::from_utf8_lossy(b));
    }
    let lines = out.lines().count();
    println!("searched {} bytes ({lines} log lines, {} answers, metrics, a start-up error) for {} secrets and 2 decrypted fields", everything.len(), bodies.len(), SECRETS.len());
    assert!(lines > 50, "debug logs were produced");
    assert!(everything.contains("usage push failed"), "the usage push to the down KooGallery was attempted");
    for (name, value) in SECRETS {
        assert!(!everything.contains(value), "{name} leaked");
        // The Base64 payload of the whsec_ secret too.
        if let Some(b64) = value.strip_prefix("whsec_") {
            assert!(!everything.contains(b64), "{name}'s key leaked");
        }
    }
    assert!(!everything.contains(PHONE) && !everything.contains(EMAIL), "decrypted contact data leaked");
    // Issue 13.10: the undecryptable V1 phone of v1/bad is warned about, without its ciphertext.
    assert!(out.contains("V1 contact field cannot be decrypted"), "no warning for the undecryptable phone");
    assert!(!out.contains("not-base64"), "the undecryptable ciphertext was logged");
    assert!(bad_text.contains("KOOGATE_BILLING_SECRET"));
}

#[tokio::test]
async fn the_access_key_rotates_without_downtime() {
    let until = (chrono::Utc::now() + chrono::Duration::seconds(3)).to_rfc3339();
    let gw = TestGateway::start_with(
        Backend::Embedded,
        "rotation",
        &[
            ("KOOGATE_ACCESS_KEY", "new-key"),
            ("KOOGATE_PREVIOUS_ACCESS_KEY", AK),
            ("KOOGATE_PREVIOUS_ACCESS_KEY_UNTIL", &until),
        ],
    )
    .await;
    // KooGallery still signs with the old key: accepted, and answered with the old key's Body-Sign.
    let old = gw.client.v2("/koogallery/v2", AK, &fixture("v2/01-newInstance.json"), now_ms()).await.unwrap();
    assert_eq!(old.result_code().as_deref(), Some("000000"));
    assert!(independent_body_sign_ok(AK, &old.body, old.body_sign.as_deref()));
    // The console switched to the new key: accepted too, signed with the new key.
    let new =
        gw.client.v2("/koogallery/v2", "new-key", &fixture("v2/13-newInstance-trial.json"), now_ms()).await.unwrap();
    assert_eq!(new.result_code().as_deref(), Some("000000"));
    assert!(independent_body_sign_ok("new-key", &new.body, new.body_sign.as_deref()));
    // After the grace period the old key is refused.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let late = gw
        .client
        .v2("/koogallery/v2", AK, &fixture("v2/02-newInstance-stored-value-cards.json"), now_ms())
        .await
        .unwrap();
    assert_eq!(late.result_code().as_deref(), Some("000001"));
    gw.stop().await;
}
