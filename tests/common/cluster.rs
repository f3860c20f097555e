//! A real local Redis Cluster (3 masters), started by a test and stopped when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub struct Cluster {
    nodes: Vec<Child>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes = ports
            .iter()
            .map(|port| {
                let node_dir = dir.path().join(port.to_string());
                std::fs::create_dir_all(&node_dir).unwrap();
                Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
                    .args(["--save", "", "--appendonly", "no", "--cluster-node-timeout", "2000"])
                    .arg("--dir")
                    .arg(&node_dir)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("redis-server runs")
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in &ports {
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(Instant::now() < deadline, "cluster node did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stdout));
        let cluster = Self { nodes, ports, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !cluster.info().contains("cluster_state:ok") {
            assert!(Instant::now() < deadline, "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    pub fn info(&self) -> String {
        let out =
            Command::new("redis-cli").args(["-p", &self.ports[0].to_string(), "cluster", "info"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn keyslot(&self, key: &str) -> u16 {
        let out = Command::new("redis-cli")
            .args(["-p", &self.ports[0].to_string(), "cluster", "keyslot", key])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

impl Cluster {
    /// The gateway's `KOOGATE_STORE` for this cluster.
    pub fn url(&self) -> String {
        format!("redis+cluster://127.0.0.1:{}", self.ports[0])
    }
}
