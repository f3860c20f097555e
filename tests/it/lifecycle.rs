//! Every activity of both generations, on both stores, over real HTTP.

use crate::common::*;
use serde_json::Value;

const V2_INSTANCE: &str = "028e3b0c-7d93-5e10-9156-f940561c8e6a";
const V1_INSTANCE: &str = "21ab9e22-5c60-5afb-b878-85ea829f9cda";

fn assert_signed(res: &koogate::tools::client::CallResponse) {
    assert!(
        independent_body_sign_ok(AK, &res.body, res.body_sign.as_deref()),
        "answer is not signed correctly: {:?} {:?}",
        res.body_sign,
        String::from_utf8_lossy(&res.body)
    );
    assert_eq!(res.content_type.as_deref(), Some("application/json;charset=UTF-8"));
}

/// (fixture, expected code, expected event type or "")
const V2_STEPS: &[(&str, &str, &str)] = &[
    ("v2/01-newInstance.json", "000000", "subscription.created"),
    ("v2/02-newInstance-stored-value-cards.json", "000000", "subscription.created"),
    ("v2/03-queryInstance.json", "000000", ""),
    ("v2/04-refreshInstance-renewal.json", "000000", "subscription.renewed"),
    ("v2/05-refreshInstance-unsubscribe-renewal-period.json", "000000", "subscription.renewal_cancelled"),
    ("v2/06-changeInstanceCheck.json", "000000", ""),
    ("v2/07-refreshInstance-renewal-change.json", "000000", "subscription.changed"),
    ("v2/08-upgradeInstance.json", "000000", "subscription.changed"),
    ("v2/09-orderNotify.json", "000000", "order.updated"),
    ("v2/10-updateInstanceStatus-freeze.json", "000000", "subscription.frozen"),
    ("v2/11-updateInstanceStatus-unfreeze.json", "000000", "subscription.unfrozen"),
    ("v2/12-releaseInstance.json", "000000", "subscription.released"),
    ("v2/13-newInstance-trial.json", "000000", "subscription.created"),
    ("v2/14-refreshInstance-trial-to-formal.json", "000000", "subscription.converted"),
    ("v2/15-newInstance-debug-probe.json", "000000", ""),
];

async fn v2_lifecycle(backend: Backend) {
    let gw = TestGateway::start(backend, "v2-lifecycle").await;
    let mut first_new = None;
    for (fixture, code, _) in V2_STEPS {
        let res = gw.v2_fixture(fixture).await;
        assert_eq!(res.status, 200, "{fixture}");
        assert_signed(&res);
        assert_eq!(res.result_code().as_deref(), Some(*code), "{fixture}: {}", String::from_utf8_lossy(&res.body));
        if fixture.ends_with("01-newInstance.json") {
            let json = res.json().unwrap();
            assert_eq!(json["instanceId"], V2_INSTANCE);
            assert_eq!(json["encryptType"], "1");
            assert_eq!(json["appInfo"]["frontEndUrl"], "https://console.example.com/koogallery");
            first_new = Some(res.clone());
        }
        if fixture.ends_with("03-queryInstance.json") {
            let info = res.json().unwrap()["info"].as_array().unwrap().clone();
            assert_eq!(info.len(), 2);
            assert_eq!(info[0]["instanceId"], V2_INSTANCE);
            assert_eq!(info[0]["appInfo"]["frontEndUrl"], "https://console.example.com/koogallery");
        }
    }

    // KooGallery retries the purchase (new businessId is not even needed: new nonce and timestamp).
    let first = first_new.unwrap();
    let retry = gw.v2_fixture("v2/01-newInstance.json").await;
    assert_eq!(retry.body, first.body, "a retry is answered byte for byte as the first call");
    assert_eq!(retry.body_sign, first.body_sign);
    // Same order line with another businessId: same instance.
    let other_business = String::from_utf8(fixture("v2/01-newInstance.json")).unwrap().replace("87b94795", "11111111");
    assert_eq!(gw.v2(other_business.as_bytes()).await.body, first.body);
    // Releasing twice answers success and changes nothing; a freeze after release: no instance.
    assert_eq!(gw.v2_fixture("v2/12-releaseInstance.json").await.result_code().as_deref(), Some("000000"));
    assert_eq!(gw.v2_fixture("v2/10-updateInstanceStatus-freeze.json").await.result_code().as_deref(), Some("000003"));
    // A renewal retried after later transitions still gets its first answer.
    assert_eq!(gw.v2_fixture("v2/04-refreshInstance-renewal.json").await.result_code().as_deref(), Some("000000"));

    gw.drain().await;
    let events = gw.events();
    let expected: Vec<&str> = V2_STEPS.iter().map(|s| s.2).filter(|t| !t.is_empty()).collect();
    let got: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    // Per-instance order is guaranteed; across instances the shards interleave.
    let of = |inst: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["data"]["instance_id"] == inst)
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(got.len(), expected.len(), "events: {got:?}");
    let mut sorted_got = got.clone();
    let mut sorted_expected = expected.clone();
    sorted_got.sort();
    sorted_expected.sort();
    assert_eq!(sorted_got, sorted_expected);
    assert_eq!(
        of(V2_INSTANCE),
        [
            "subscription.created",
            "subscription.renewed",
            "subscription.renewal_cancelled",
            "subscription.changed",
            "subscription.changed",
            "order.updated",
            "subscription.frozen",
            "subscription.unfrozen",
            "subscription.released"
        ]
    );
    let ids: Vec<String> = events
        .iter()
        .filter(|e| e["data"]["instance_id"] == V2_INSTANCE)
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, (1..=9).map(|n| format!("evt_{V2_INSTANCE}_{n}")).collect::<Vec<_>>());

    let renewed = events.iter().find(|e| e["type"] == "subscription.renewed").unwrap();
    assert_eq!(renewed["data"]["order_id"], "CS2311181819R3NEW");
    assert_eq!(renewed["data"]["purchase_order_id"], "CS2211181819B4LVS");
    assert_eq!(renewed["data"]["expire_time"], "2027-11-24T02:36:18.256Z");
    assert_eq!(renewed["data"]["scene"], "RENEWAL");
    assert_eq!(renewed["data"]["protocol"], "v2");
    assert_eq!(renewed["data"]["enriched"], false);
    assert_eq!(renewed["data"]["settlement"]["kind"], "account_settlement");
    let frozen = events.iter().find(|e| e["type"] == "subscription.frozen").unwrap();
    assert_eq!(frozen["data"]["status"], "frozen");
    assert_eq!(frozen["data"]["previous_status"], "active");
    let released = events.iter().find(|e| e["type"] == "subscription.released").unwrap();
    assert_eq!(released["data"]["status"], "released");
    let converted = events.iter().find(|e| e["type"] == "subscription.converted").unwrap();
    assert_eq!(converted["data"]["trial"], false);
    assert!(events.iter().all(|e| e["data"]["test"] == false), "the debug probe's event is not forwarded");
    let occurred = renewed["occurred_at"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(occurred).is_ok(), "{occurred}");

    let metrics = gw.metrics().await;
    assert!(metrics.contains("koogate_calls_total"), "{metrics}");
    assert!(metrics.contains("koogate_dedup_hits_total"));
    gw.stop().await;
}

#[tokio::test]
async fn v2_lifecycle_redis() {
    v2_lifecycle(Backend::Redis).await;
}

#[tokio::test]
async fn v2_lifecycle_embedded() {
    v2_lifecycle(Backend::Embedded).await;
}

const V1_STEPS: &[(&str, &str, &str)] = &[
    ("v1/01-newInstance-stored-value-cards.json", "000000", "subscription.created"),
    ("v1/02-refreshInstance.json", "000000", "subscription.renewed"),
    ("v1/03-upgrade.json", "000000", "subscription.changed"),
    ("v1/04-instanceStatus-freeze.json", "000000", "subscription.frozen"),
    ("v1/05-instanceStatus-unfreeze.json", "000000", "subscription.unfrozen"),
    ("v1/06-expireInstance.json", "000000", "subscription.expired"),
    ("v1/07-releaseInstance.json", "000000", "subscription.released"),
];

async fn v1_lifecycle(backend: Backend) {
    let gw = TestGateway::start(backend, "v1-lifecycle").await;
    let mut params = fixture_params("v1/01-newInstance-stored-value-cards.json");
    // Contact fields arrive encrypted (§9) with the access key.
    let key = koogate::protocol::crypto::derive_key(AK, koogate::protocol::crypto::EncryptType::Aes256);
    params.insert("mobilePhone".into(), koogate::protocol::crypto::encrypt(&key, "13800000000").unwrap());
    params.insert("email".into(), koogate::protocol::crypto::encrypt(&key, "ops@acme.example").unwrap());
    let first = gw.v1(&params).await;
    assert_signed(&first);
    assert_eq!(first.result_code().as_deref(), Some("000000"));
    assert_eq!(first.json().unwrap()["instanceId"], V1_INSTANCE);
    for (fixture, code, _) in &V1_STEPS[1..] {
        let res = gw.v1_fixture(fixture).await;
        assert_signed(&res);
        assert_eq!(res.result_code().as_deref(), Some(*code), "{fixture}: {}", String::from_utf8_lossy(&res.body));
    }
    // The retried purchase (fresh timeStamp, so a new token) gets the first answer.
    let retry = gw.v1(&params).await;
    assert_eq!(retry.body, first.body);

    gw.drain().await;
    let events = gw.events();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, V1_STEPS.iter().map(|s| s.2).collect::<Vec<_>>());
    let created = &events[0];
    assert_eq!(created["id"], format!("evt_{V1_INSTANCE}_1"));
    assert_eq!(created["data"]["customer_id"], "68cbc86abc2018ab880d92f36422fa0e");
    assert_eq!(created["data"]["sku_code"], "svc-card-100");
    assert_eq!(created["data"]["charging_mode"], "ONE_TIME");
    assert_eq!(created["data"]["protocol"], "v1");
    assert_eq!(
        created["data"]["settlement"],
        serde_json::json!({"kind":"stored_value_card","cards":50,"face_value_cny":100,"total_cny":5000})
    );
    assert_eq!(created["data"]["contact"]["mobile_phone"], "13800000000");
    assert_eq!(created["data"]["contact"]["email"], "ops@acme.example");
    let changed = &events[2];
    assert_eq!(changed["data"]["settlement"]["cards"], 80);
    assert_eq!(events[5]["data"]["status"], "expired");
    assert_eq!(events[6]["data"]["status"], "released");
    assert!(events.iter().all(|e: &Value| e["data"]["instance_id"] == V1_INSTANCE));
    gw.stop().await;
}

#[tokio::test]
async fn v1_lifecycle_redis() {
    v1_lifecycle(Backend::Redis).await;
}

#[tokio::test]
async fn v1_lifecycle_embedded() {
    v1_lifecycle(Backend::Embedded).await;
}

async fn test_events_forwarded_when_asked(backend: Backend) {
    let gw = TestGateway::start_with(backend, "forward-test", &[("KOOGATE_FORWARD_TEST_EVENTS", "true")]).await;
    let res = gw.v2_fixture("v2/15-newInstance-debug-probe.json").await;
    assert_eq!(res.result_code().as_deref(), Some("000000"));
    assert!(res.json().unwrap()["instanceId"].is_string());
    gw.drain().await;
    let events = gw.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["data"]["test"], true);
    assert_eq!(events[0]["data"]["order_id"], "MOCKPERIODYEARNEW");
    gw.stop().await;
}

#[tokio::test]
async fn test_events_are_forwarded_only_when_asked() {
    for backend in BACKENDS {
        test_events_forwarded_when_asked(backend).await;
    }
}

#[tokio::test]
async fn issued_credentials_decrypt_with_the_access_key_and_reach_billing() {
    for backend in BACKENDS {
        let gw = TestGateway::start_with(
            backend,
            "credentials",
            &[("KOOGATE_ISSUE_CREDENTIALS", "true"), ("KOOGATE_ENCRYPT_TYPE", "2")],
        )
        .await;
        let res = gw.v2_fixture("v2/01-newInstance.json").await;
        let json = res.json().unwrap();
        assert_eq!(json["encryptType"], "2");
        let key = koogate::protocol::crypto::derive_key(AK, koogate::protocol::crypto::EncryptType::Aes128);
        let user = koogate::protocol::crypto::decrypt(&key, json["appInfo"]["userName"].as_str().unwrap()).unwrap();
        let password = koogate::protocol::crypto::decrypt(&key, json["appInfo"]["password"].as_str().unwrap()).unwrap();
        assert_eq!(user, "kg028e3b0c7d93");
        assert_eq!(password.len(), 16);
        gw.drain().await;
        let events = gw.events();
        assert_eq!(events[0]["data"]["credentials"]["user_name"], user);
        assert_eq!(events[0]["data"]["credentials"]["password"], password);
        gw.stop().await;
    }
}
