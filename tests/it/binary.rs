//! The `koogate` binary as an operator runs it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn koogate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_koogate"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd
}

#[test]
fn a_bad_setting_stops_start_up_with_one_sentence_naming_it() {
    let out = koogate().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KOOGATE_ACCESS_KEY: is required"), "{err}");

    let out =
        koogate().env("KOOGATE_ACCESS_KEY", "s3cr3t-key").env("KOOGATE_TIMESTAMP_SKEW_SECS", "soon").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KOOGATE_TIMESTAMP_SKEW_SECS: \"soon\" is not a whole number"), "{err}");
    assert!(!err.contains("s3cr3t-key"));
}

#[tokio::test]
async fn serves_on_the_embedded_store_logs_json_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let secret = "binary-test-access-key-0042";
    let mut child = koogate()
        .arg("serve")
        .env("KOOGATE_ACCESS_KEY", secret)
        .env("KOOGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("KOOGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("KOOGATE_STORE", dir.path().join("store"))
        .env("KOOGATE_DATA_DIR", dir.path().join("data"))
        .env("KOOGATE_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = koogate::tools::client::KooClient::new(&format!("http://127.0.0.1:{port}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(res) = client.send(hyper::Method::GET, "/readyz", &[], bytes::Bytes::new()).await {
            if res.status == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "gateway did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let res = client.v2("/koogallery/v2", secret, &fixture("v2/01-newInstance.json"), now_ms()).await.unwrap();
    assert_eq!(res.result_code().as_deref(), Some("000000"));
    assert!(independent_body_sign_ok(secret, &res.body, res.body_sign.as_deref()));
    let bad = client.v2("/koogallery/v2", "wrong-key", &fixture("v2/01-newInstance.json"), now_ms()).await.unwrap();
    assert_eq!(bad.result_code().as_deref(), Some("000001"));

    let events = dir.path().join("data").join("events.jsonl");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&events).is_ok_and(|t| t.contains("subscription.created")) {
        assert!(Instant::now() < deadline, "event did not reach events.jsonl");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGTERM: graceful stop, exit 0.
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        (status, stderr)
    });
    let (status, stderr) = tokio::time::timeout(Duration::from_secs(20), status).await.unwrap().unwrap();
    assert!(status.success(), "exit status {status:?}\n{stderr}");
    assert!(!stderr.contains(secret), "the access key never appears in logs");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON log line: {l}")))
        .collect();
    let answered = lines.iter().find(|l| l["message"] == "call answered").expect("a call log line");
    assert_eq!(answered["activity"], "newInstance");
    assert_eq!(answered["code"], "000000");
    assert_eq!(answered["order_id"], "CS2211181819B4LVS");
    assert_eq!(answered["instance_id"], "028e3b0c-7d93-5e10-9156-f940561c8e6a");
    assert!(answered["latency_ms"].is_number());
    let refused = lines.iter().find(|l| l["message"] == "call refused").expect("a refusal log line");
    assert_eq!(refused["code"], "000001");
    // The refusal says what the call claimed to be, read from the unverified body.
    assert_eq!(refused["activity"], "newInstance");
    assert_eq!(refused["order_id"], "CS2211181819B4LVS");
    // Latencies rounded to the microsecond; no key twice on a line (strict JSON parsers refuse that).
    for line in stderr.lines().filter(|l| l.contains("\"latency_ms\"")) {
        let value = line.split("\"latency_ms\":").nth(1).unwrap().split([',', '}']).next().unwrap();
        assert!(value.split('.').nth(1).is_none_or(|decimals| decimals.len() <= 3), "latency_ms={value}");
    }
    for line in stderr.lines() {
        assert!(line.matches("\"target\":").count() <= 1, "a key twice: {line}");
    }
    let started = lines.iter().find(|l| l["message"] == "delivery started").expect("a delivery started line");
    assert!(started["destination"].is_string(), "{started}");
    assert!(refused["reason"].as_str().unwrap().contains("signature does not match"));
}

/// The settings table (docs/settings.md) lists exactly the settings the code reads.
#[test]
fn docs_document_every_setting() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/settings.md")).unwrap();
    let table: std::collections::BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `KOOGATE_"))
        .filter_map(|l| l.split('`').next())
        .map(|name| format!("KOOGATE_{name}"))
        .collect();
    let code: std::collections::BTreeSet<String> =
        koogate::config::SETTINGS.iter().map(|s| s.about().name.to_string()).collect();
    assert_eq!(table, code, "docs/settings.md table and config::SETTINGS differ");
}

/// stderr of a finished command, with the exit code.
fn failure(cmd: &mut Command) -> (Option<i32>, String) {
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The one `koogate: …` line of a start-up failure (log lines before it are allowed, nothing after).
fn one_error_line(stderr: &str) -> String {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("koogate: ") && !l.contains("warning:")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line:\n{stderr}");
    assert_eq!(stderr.lines().last(), Some(errors[0]), "the error line is the last:\n{stderr}");
    assert!(!stderr.contains("stack backtrace") && !stderr.contains("Caused by"), "no backtrace or chain:\n{stderr}");
    errors[0].to_owned()
}

#[test]
fn start_up_failures_are_one_line_naming_the_setting_exit_2_without_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let base = |cmd: &mut Command| {
        cmd.env("KOOGATE_ACCESS_KEY", "k")
            .env("RUST_BACKTRACE", "1")
            .env("KOOGATE_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("KOOGATE_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("KOOGATE_DATA_DIR", dir.path());
    };
    // (what, variable, value): the variable is also the setting the line must name.
    let cases = [
        ("unparsable store URL", "KOOGATE_STORE", "redis://bad url".to_owned()),
        ("Redis unreachable", "KOOGATE_STORE", format!("redis://127.0.0.1:{}", free_port())),
        ("bad log filter", "KOOGATE_LOG", "verbose".to_owned()),
    ];
    for verb in ["serve", "check-config"] {
        for (what, setting, value) in &cases {
            let mut cmd = koogate();
            cmd.arg(verb);
            base(&mut cmd);
            cmd.env(setting, value);
            let (code, stderr) = failure(&mut cmd);
            let line = one_error_line(&stderr);
            println!("{verb} / {what}: exit {code:?}: {line}");
            assert_eq!(code, Some(2), "{verb} / {what}: {stderr}");
            assert!(line.starts_with(&format!("koogate: {setting}: ")), "{verb} / {what}: {line}");
            let first_cause = line.split(": ").nth(3).unwrap_or("").to_owned();
            assert!(first_cause.is_empty() || line.matches(&first_cause).count() == 1, "a cause repeated: {line}");
        }
    }

    // Port in use (and an unknown variable is reported with a did-you-mean before it).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = koogate();
    cmd.arg("serve");
    base(&mut cmd);
    cmd.env("KOOGATE_STORE", dir.path().join("store"))
        .env("KOOGATE_LISTEN", taken.local_addr().unwrap().to_string())
        .env("KOOGATE_BILING_URL", "http://127.0.0.1:1/");
    let (code, stderr) = failure(&mut cmd);
    let line = one_error_line(&stderr);
    println!("port in use: exit {code:?}: {line}");
    assert_eq!(code, Some(2));
    assert!(line.starts_with("koogate: KOOGATE_LISTEN: cannot listen on") && line.contains("in use"), "{line}");
    assert!(
        stderr.contains(" WARN ") && !stderr.contains('\x1b'),
        "text logs without colour off a terminal:\n{stderr}"
    );
    assert!(
        stderr
            .contains("KOOGATE_BILING_URL is not a koogate setting and is ignored: did you mean KOOGATE_BILLING_URL?"),
        "{stderr}"
    );

    // TOML errors keep their line and column.
    let toml = dir.path().join("koogate.toml");
    std::fs::write(&toml, "listen = \"127.0.0.1:1\"\nstore = = 3\n").unwrap();
    let (code, stderr) =
        failure(koogate().arg("--config").arg(&toml).arg("check-config").env("KOOGATE_ACCESS_KEY", "k"));
    let line = one_error_line(&stderr);
    assert_eq!(code, Some(2));
    assert!(line.contains("at line 2, column 9"), "{line}");
}

#[test]
fn serve_help_lists_every_setting_with_default_and_meaning() {
    let out = koogate().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in koogate::config::SETTINGS {
        let (name, default, meaning) = (s.about().name, s.about().default_text(), s.about().help);
        let at = help.find(&format!("  {name}\n")).unwrap_or_else(|| panic!("{name} missing from serve --help"));
        let entry = &help[at..];
        assert!(entry.contains(meaning) && entry.contains(&format!("[default: {default}]")), "{name}");
    }
}

#[test]
fn check_config_reaches_the_billing_url_and_every_verb_reads_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let dead = free_port();
    let toml = dir.path().join("koogate.toml");
    std::fs::write(
        &toml,
        format!(
            "access_key = \"k\"\nstore = {:?}\nbilling_url = \"http://127.0.0.1:{dead}/events\"\n\
             billing_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nadmin_listen = \"127.0.0.1:{dead}\"\n\
             admin_token = \"t\"\n",
            dir.path().join("store")
        ),
    )
    .unwrap();
    let (code, stderr) = failure(koogate().arg("--config").arg(&toml).arg("check-config"));
    let line = one_error_line(&stderr);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(line.starts_with("koogate: KOOGATE_BILLING_URL: cannot reach"), "{line}");

    // dlq takes the admin address and token from the file: it gets as far as calling the dead port.
    let (code, stderr) = failure(koogate().arg("--config").arg(&toml).args(["dlq", "list"]));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot reach http://127.0.0.1:{dead}")), "{stderr}");
    // replay takes the access key from it: without --key or the file it refuses.
    let (_, stderr) = failure(koogate().args(["replay", "--url", &format!("http://127.0.0.1:{dead}"), "fixtures/v2"]));
    assert!(stderr.contains("KOOGATE_ACCESS_KEY: give --key"), "{stderr}");
    let (_, stderr) = failure(
        koogate()
            .arg("--config")
            .arg(&toml)
            .args(["replay", "--url", &format!("http://127.0.0.1:{dead}"), "-"])
            .stdin(Stdio::null()),
    );
    assert!(!stderr.contains("KOOGATE_ACCESS_KEY"), "{stderr}");
}

/// A gateway binary on the embedded store with the admin API on; killed on drop.
struct Gateway {
    child: std::process::Child,
    port: u16,
    admin_port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn gateway(key: &str, token: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let child = koogate()
        .env("KOOGATE_ACCESS_KEY", key)
        .env("KOOGATE_ADMIN_TOKEN", token)
        .env("KOOGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("KOOGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("KOOGATE_STORE", dir.path().join("store"))
        .env("KOOGATE_DATA_DIR", dir.path().join("data"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = koogate::tools::client::KooClient::new(&format!("http://127.0.0.1:{port}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client.send(hyper::Method::GET, "/readyz", &[], bytes::Bytes::new()).await.is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline, "gateway did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Gateway { child, port, admin_port, _dir: dir }
}

#[tokio::test]
async fn dlq_and_replay_as_an_operator_uses_them() {
    let gw = gateway("cli-key", "cli-token").await;
    let admin = format!("http://127.0.0.1:{}", gw.admin_port);
    let run = |args: &[&str]| {
        let out = koogate().env("KOOGATE_ADMIN_TOKEN", "cli-token").args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for usage in [false, true] {
        let mut args = vec!["dlq", "--admin", &admin, "redrive", "--all"];
        if usage {
            args.insert(1, "--usage");
        }
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        assert_eq!(stdout.trim(), "nothing to redrive", "{stderr}");
        assert!(stderr.contains("in one request"), "{stderr}");
    }
    let (code, stdout, _) = run(&["dlq", "--admin", &admin, "list", "--limit", "10"]);
    assert_eq!(code, Some(0));
    assert!(stdout.ends_with("0 dead letter(s)\n"), "{stdout}");

    // replay: the table names fixtures with their folder; --quiet only the summary; --json one object.
    let url = format!("http://127.0.0.1:{}", gw.port);
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/v2/01-newInstance.json");
    let (code, stdout, stderr) = run(&["replay", "--url", &url, "--key", "cli-key", fixtures]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.lines().nth(1).is_some_and(|l| l.starts_with("v2/01-newInstance.json ")), "{stdout}");
    let widths: Vec<usize> = stdout.lines().take(2).map(|l| l.find("ACTIVITY").unwrap_or(0)).collect();
    println!("{stdout}");
    assert!(widths[0] <= "v2/01-newInstance.json ".len(), "columns fit their content:\n{stdout}");
    let (code, stdout, _) = run(&["replay", "--quiet", "--url", &url, "--key", "cli-key", fixtures]);
    assert_eq!(code, Some(0));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("1 of 1 answers as expected"), "{stdout}");
    let (code, stdout, _) = run(&["replay", "--json", "--url", &url, "--key", "cli-key", fixtures]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("--json prints one JSON object");
    assert_eq!(json["total"], 1);
    assert_eq!(json["answers"][0]["fixture"], "v2/01-newInstance.json");
    assert_eq!(json["answers"][0]["ok"], true);
}

/// The verbs `koogate --help` lists (its `Commands:` section), `help` aside.
fn verbs() -> Vec<String> {
    let out = koogate().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let section = help.split("Commands:").nth(1).unwrap_or_else(|| panic!("no Commands: in {help}"));
    section
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|v| *v != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn completions_for_bash_zsh_and_fish_name_every_verb() {
    let verbs = verbs();
    assert!(verbs.len() >= 10 && verbs.iter().any(|v| v == "completions"), "{verbs:?}");
    for (shell, marker) in
        [("bash", "complete -F _koogate"), ("zsh", "#compdef koogate"), ("fish", "complete -c koogate")]
    {
        let out = koogate().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        let missing: Vec<&String> = verbs.iter().filter(|v| !script.contains(v.as_str())).collect();
        assert!(missing.is_empty(), "{shell} completions do not name {missing:?}");
        // Nested verbs and flags too, not only the top level.
        assert!(script.contains("redrive") && script.contains("admin-token"), "{shell}: nested verbs or flags missing");
        if shell == "bash" {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("koogate.bash");
            std::fs::write(&file, &script).unwrap();
            let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
            assert!(check.status.success(), "bash -n refuses the script: {}", String::from_utf8_lossy(&check.stderr));
        }
    }
    let out = koogate().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");
}

/// A verb whose reader is gone (`koogate events list | head -1`) ends on
/// SIGPIPE, quietly, as Unix tools do, instead of panicking "Broken pipe".
#[test]
fn a_verb_whose_reader_is_gone_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    for args in [&["completions", "bash"][..], &["instance-id", "CS2211181819B4LVS", "CS2211181819B4LVS-000001"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = koogate().args(args).stdout(writer).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), Some(13), "{args:?}: not ended by SIGPIPE ({:?}): {stderr}", out.status);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// `rust-version` in Cargo.toml is the oldest Rust that builds the locked
/// dependencies: none of them asks for a newer one (a user on the stated
/// version would otherwise meet a dependency's error instead of Cargo's).
#[test]
fn rust_version_covers_every_locked_dependency() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // "1.89" is "1.89.0".
    let version = |v: &str| -> Vec<u64> {
        let mut parts: Vec<u64> = v.split('.').map(|p| p.parse().unwrap_or(0)).collect();
        parts.resize(3, 0);
        parts
    };
    let packages = meta["packages"].as_array().unwrap();
    let ours = packages.iter().find(|p| p["name"] == "koogate").unwrap();
    let stated = version(ours["rust_version"].as_str().expect("Cargo.toml states rust-version"));
    let newer: Vec<String> = packages
        .iter()
        .filter_map(|p| Some((p["name"].as_str()?, p["version"].as_str()?, p["rust_version"].as_str()?)))
        .filter(|(_, _, needs)| version(needs) > stated)
        .map(|(name, v, needs)| format!("{name} {v} needs Rust {needs}"))
        .collect();
    assert!(newer.is_empty(), "rust-version {stated:?} is older than the locked dependencies ask: {newer:?}");
}
