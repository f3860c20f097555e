//! The README's first command, run as a new user runs it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The first command line of the README's "Two commands" block, verbatim.
fn first_command() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("## Two commands").nth(1).expect("README has a \"Two commands\" section");
    let block = section.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    block.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).expect("a command line").to_owned()
}

/// `A=1 B=2 cargo run --release -- serve` → ([(A, 1), (B, 2)], ["serve"]).
fn parse(line: &str) -> (Vec<(String, String)>, Vec<String>) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let env: Vec<(String, String)> = words
        .iter()
        .map_while(|w| w.split_once('=').filter(|(k, _)| k.chars().all(|c| c.is_ascii_uppercase() || c == '_')))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let rest = &words[env.len()..];
    assert_eq!(
        rest.get(..2),
        Some(&["cargo", "run"][..]),
        "the README's first command is no longer `cargo run`: {line}"
    );
    let dashes = rest.iter().position(|w| *w == "--").unwrap_or(rest.len());
    assert!(
        !rest[..dashes].iter().any(|w| *w == "--bin" || w.starts_with("--bin=")),
        "`cargo run` must pick the gateway by default-run: {line}"
    );
    let argv = rest.get(dashes + 1..).unwrap_or_default().iter().map(|w| w.to_string()).collect();
    (env, argv)
}

#[tokio::test]
async fn the_readme_first_command_starts_a_healthy_gateway() {
    let line = first_command();
    println!("README first command: {line}");
    let (env, argv) = parse(&line);
    // `cargo run --release` builds the same binary as this test's debug build; run that one (CI stays fast).
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_koogate"))
        .args(&argv)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The README says where it listens: 0.0.0.0:8080, /healthz.
    let client = koogate::tools::client::KooClient::new("http://127.0.0.1:8080");
    let deadline = Instant::now() + Duration::from_secs(20);
    let healthy = loop {
        if let Ok(res) = client.send(hyper::Method::GET, "/healthz", &[], bytes::Bytes::new()).await {
            break res.status == 200;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(healthy, "`{line}` did not answer /healthz on 127.0.0.1:8080:\n{stderr}");
    assert!(stderr.contains("usage push is off"), "a first run must not push usage to KooGallery:\n{stderr}");
    assert!(dir.path().join("data").is_dir(), "the embedded store lives in ./data");
}

#[test]
fn the_parser_reads_env_and_argv() {
    let (env, argv) = parse("KOOGATE_ACCESS_KEY=dev-access-key cargo run --release -- serve");
    assert_eq!(env, vec![("KOOGATE_ACCESS_KEY".to_owned(), "dev-access-key".to_owned())]);
    assert_eq!(argv, vec!["serve".to_owned()]);
}
