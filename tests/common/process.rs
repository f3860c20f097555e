//! Real `koogate` processes (gateway and sink) for fault tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use koogate::tools::client::KooClient;

use super::free_port;

pub struct Proc {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub client: KooClient,
}

impl Proc {
    /// Starts `koogate serve` with `env` (ports are chosen here) and waits until it is ready.
    pub async fn gateway(env: &BTreeMap<String, String>) -> Self {
        let (port, admin_port) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_koogate"));
        cmd.arg("serve").env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).envs(env);
        cmd.env("KOOGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("KOOGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"));
        cmd.env("KOOGATE_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().expect("koogate starts");
        let client = KooClient::new(&format!("http://127.0.0.1:{port}"));
        let p = Self { child, port, admin_port, client };
        p.wait_ready("/readyz").await;
        p
    }

    /// Starts `koogate sink`.
    pub async fn sink(secret: &str, out: &std::path::Path, extra: &[&str]) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_koogate"))
            .args(["sink", "--listen", &format!("127.0.0.1:{port}"), "--secret", secret, "--out"])
            .arg(out)
            .args(extra)
            .env("KOOGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("koogate sink starts");
        let client = KooClient::new(&format!("http://127.0.0.1:{port}"));
        let p = Self { child, port, admin_port: 0, client };
        p.wait_ready("/stats").await;
        p
    }

    async fn wait_ready(&self, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(res) = self.client.send(hyper::Method::GET, path, &[], bytes::Bytes::new()).await {
                if res.status == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "process on port {} did not become ready", self.port);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().expect("process exits")
    }

    pub async fn stats(&self) -> serde_json::Value {
        let res = self.client.send(hyper::Method::GET, "/stats", &[], bytes::Bytes::new()).await.unwrap();
        serde_json::from_slice(&res.body).unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Event ids in a sink's JSONL file, with how often each appears.
pub fn jsonl_ids(path: &std::path::Path) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        *out.entry(v["id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    out
}
