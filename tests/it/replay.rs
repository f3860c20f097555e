//! `koogate replay` against running gateways: every fixture, both generations.

use std::process::Command;

use crate::common::*;

fn replay(gw: &TestGateway, key: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_koogate"))
        .arg("replay")
        .arg("--url")
        .arg(format!("http://{}", gw.running().addr))
        .arg("--key")
        .arg(key)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// Multi-threaded: the replay process blocks this test while the in-process gateway serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_every_fixture_of_both_generations() {
    for backend in BACKENDS {
        let gw = TestGateway::start(backend, "replay").await;
        let (ok, table, err) = replay(&gw, AK, &["fixtures/v2", "fixtures/v2/bad", "fixtures/v1", "fixtures/v1/bad"]);
        assert!(ok, "{table}\n{err}");
        let rows: Vec<&str> = table.lines().filter(|l| l.contains(".json")).collect();
        let expected = fixture_files("v2").len()
            + fixture_files("v2/bad").len()
            + fixture_files("v1").len()
            + fixture_files("v1/bad").len();
        assert_eq!(rows.len(), expected, "{table}");
        assert!(rows.iter().all(|r| r.contains(" ok ")), "every answer signed: {table}");
        let first = rows.iter().find(|r| r.contains("v2/01-newInstance.json")).unwrap();
        assert!(
            first.contains("newInstance")
                && first.contains("CS2211181819B4LVS")
                && first.contains("028e3b0c-7d93-5e10-9156-f940561c8e6a")
                && first.contains(" 200 "),
            "{first}"
        );
        let bad = rows.iter().find(|r| r.contains("bad/unknown-instance.json")).unwrap();
        assert!(bad.contains("000003"), "{bad}");
        assert!(table.contains(&format!("{expected} of {expected} answers as expected")), "{table}");

        // Retries from many connections: same instance id every time.
        let (ok, table, _) =
            replay(&gw, AK, &["--repeat", "6", "--concurrency", "3", "fixtures/v2/13-newInstance-trial.json"]);
        assert!(ok, "{table}");
        let ids: std::collections::BTreeSet<&str> = table
            .lines()
            .filter(|l| l.contains(".json"))
            .map(|l| l.split_whitespace().find(|w| w.len() == 36).unwrap())
            .collect();
        assert_eq!(ids.len(), 1, "{table}");
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_with_a_wrong_key_fails_with_a_clear_message() {
    let gw = TestGateway::start(Backend::Embedded, "replay-wrong-key").await;
    let (ok, table, err) = replay(&gw, "not-the-access-key", &["fixtures/v2/01-newInstance.json"]);
    assert!(!ok, "exit status is non-zero");
    assert!(table.contains("000001") && table.contains("BAD"), "{table}");
    assert!(err.contains("is --key (KOOGATE_ACCESS_KEY) the product's access key"), "{err}");
    // An expectation that is not met fails too, even when signed.
    let (ok, _, err) = replay(&gw, AK, &["--expect", "000003", "fixtures/v2/01-newInstance.json"]);
    assert!(!ok);
    assert!(err.contains("1 of 1 answers were not as expected"), "{err}");
    // Nothing listening: a clear error, non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_koogate"))
        .args([
            "replay",
            "--url",
            &format!("http://127.0.0.1:{}", free_port()),
            "--key",
            AK,
            "fixtures/v2/01-newInstance.json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("got no answer at all"));
    gw.stop().await;
}
