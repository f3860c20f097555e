//! The servers under test, each in its own process (the load generator keeps
//! the bench process to itself):
//!
//! - baseline A: a bare hyper 1 HTTP/1.1 server answering a fixed small JSON
//!   body, the HTTP ceiling (`koogate-bench baseline-a`);
//! - baseline B: the same plus one Redis `EVALSHA` per request of a trivial
//!   script (`INCR` of a per-request key), the floor of any design that
//!   deduplicates in Redis (`koogate-bench baseline-b`);
//! - koogate on Redis and koogate on its embedded store: the `koogate`
//!   binary next to this one, configured through its environment (the
//!   settings are checked with `koogate::config::Config::from_parts` first).
//!
//! Both baselines use what koogate uses: hyper 1's http1 server with
//! keep-alive, tokio's multi-threaded runtime, and one multiplexed
//! `redis::aio::ConnectionManager`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use crate::load;

/// What a baseline answers (the size of a koogate success answer, roughly).
const FIXED_ANSWER: &str = r#"{"resultCode":"000000","resultMsg":"success."}"#;
const FAILED_ANSWER: &str = r#"{"resultCode":"000005","resultMsg":"redis failed"}"#;
/// The trivial script of baseline B.
pub const BASELINE_B_SCRIPT: &str = "return redis.call('INCR', KEYS[1])";
/// First line a baseline prints on stdout.
const LISTENING: &str = "LISTENING ";
const START_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
pub enum TargetKind {
    /// Baseline A: bare hyper, fixed answer.
    A,
    /// Baseline B: bare hyper, one EVALSHA per request.
    B,
    /// koogate with the Redis store.
    Redis,
    /// koogate with the embedded store.
    Embedded,
}

impl TargetKind {
    /// Key in the JSON report.
    pub fn key(self) -> &'static str {
        match self {
            Self::A => "baseline_a",
            Self::B => "baseline_b",
            Self::Redis => "koogate_redis",
            Self::Embedded => "koogate_embedded",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::A => "A: bare hyper",
            Self::B => "B: hyper + 1 EVALSHA",
            Self::Redis => "koogate (redis)",
            Self::Embedded => "koogate (embedded)",
        }
    }

    pub fn is_koogate(self) -> bool {
        matches!(self, Self::Redis | Self::Embedded)
    }

    /// Does it talk to Redis (so Redis command counts mean something)?
    pub fn uses_redis(self) -> bool {
        matches!(self, Self::B | Self::Redis)
    }
}

/// What every target of one run shares.
pub struct Settings {
    pub redis_url: String,
    /// Prefix of every Redis key of this run (`kgbench:<uuid>:`).
    pub run_prefix: String,
    pub work_dir: PathBuf,
    pub koogate_bin: PathBuf,
    /// Run koogate inside the bench process instead (no per-process figures then).
    pub in_process: bool,
    /// `KOOGATE_LOG` of the koogate process.
    pub koogate_log: String,
    /// A baseline process stops on its own after this long (or when the bench goes away).
    pub max_secs: u64,
}

impl Settings {
    /// Key prefix of a target's own Redis keys.
    pub fn prefix_of(&self, kind: TargetKind) -> String {
        match kind {
            TargetKind::B => format!("{}b:", self.run_prefix),
            _ => format!("{}kg:", self.run_prefix),
        }
    }
}

enum Handle {
    Process(Child),
    InProcess(koogate::server::Running),
}

/// A started target.
pub struct Target {
    pub kind: TargetKind,
    pub addr: SocketAddr,
    /// koogate's admin listener (`/metrics`).
    pub admin_addr: Option<SocketAddr>,
    /// The server's own process, when it has one.
    pub pid: Option<u32>,
    handle: Handle,
}

impl Target {
    pub async fn start(kind: TargetKind, s: &Settings) -> anyhow::Result<Self> {
        let target = match kind {
            TargetKind::A | TargetKind::B => start_baseline(kind, s).await?,
            TargetKind::Redis | TargetKind::Embedded => start_koogate(kind, s, kind.key(), BTreeMap::new()).await?,
        };
        target.wait_ready().await?;
        Ok(target)
    }

    /// A koogate target with its own directory `name` under the run's and
    /// more settings (`extra` overrides the target's defaults).
    pub async fn start_with(
        kind: TargetKind,
        s: &Settings,
        name: &str,
        extra: BTreeMap<String, String>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(kind.is_koogate(), "{} is not koogate", kind.label());
        let target = start_koogate(kind, s, name, extra).await?;
        target.wait_ready().await?;
        Ok(target)
    }

    /// koogate: `/readyz` answers 200 (store reachable). Baselines: they listen.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        if !self.kind.is_koogate() {
            return Ok(());
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match load::get(self.addr, "/readyz").await {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) if Instant::now() >= deadline => {
                    bail!(
                        "{} is not ready: /readyz answered {status} {}",
                        self.kind.label(),
                        String::from_utf8_lossy(&body)
                    )
                }
                Err(e) if Instant::now() >= deadline => bail!("{} is not ready: {e}", self.kind.label()),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Stops the target: SIGTERM (koogate drains gracefully), SIGKILL if it lingers.
    pub async fn stop(self) {
        match self.handle {
            Handle::InProcess(running) => running.stop().await,
            Handle::Process(mut child) => {
                if let Some(pid) = child.id() {
                    // The baselines also stop when their stdin closes (dropped with the child).
                    let _ = std::process::Command::new("kill")
                        .args(["-TERM", &pid.to_string()])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
                drop(child.stdin.take());
                if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                    let _ = child.start_kill();
                    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                }
            }
        }
    }
}

// ---------------------------------------------------------------- baselines

async fn start_baseline(kind: TargetKind, s: &Settings) -> anyhow::Result<Target> {
    let exe = std::env::current_exe().context("cannot find the bench executable")?;
    let mut cmd = Command::new(exe);
    match kind {
        TargetKind::A => cmd.arg("baseline-a"),
        _ => cmd.args(["baseline-b", "--redis-url", &s.redis_url, "--prefix", &s.prefix_of(kind)]),
    };
    cmd.args(["--listen", "127.0.0.1:0", "--max-secs", &s.max_secs.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("cannot start {}", kind.label()))?;
    let stdout = child.stdout.take().context("baseline stdout")?;
    let mut first = String::new();
    let read = tokio::time::timeout(START_TIMEOUT, BufReader::new(stdout).read_line(&mut first)).await;
    let addr = match read {
        Ok(Ok(_)) => first.trim().strip_prefix(LISTENING).and_then(|a| a.parse::<SocketAddr>().ok()),
        _ => None,
    };
    let Some(addr) = addr else {
        let _ = child.start_kill();
        bail!("{} did not start (first line: {:?})", kind.label(), first.trim());
    };
    Ok(Target { kind, addr, admin_addr: None, pid: child.id(), handle: Handle::Process(child) })
}

/// The hidden `baseline-a` / `baseline-b` subcommands: serve until stdin
/// closes (the bench went away) or `max_secs` pass.
pub async fn serve_baseline(listen: SocketAddr, redis: Option<(String, String)>, max_secs: u64) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let backend = match redis {
        None => None,
        Some((url, prefix)) => {
            let client = redis::Client::open(url.as_str())?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Duration::from_secs(2))
                .set_response_timeout(Duration::from_secs(3));
            let conn = redis::aio::ConnectionManager::new_with_config(client, config)
                .await
                .with_context(|| format!("cannot connect to {url}"))?;
            Some(Arc::new(RedisBackend {
                conn,
                script: redis::Script::new(BASELINE_B_SCRIPT),
                prefix,
                counter: AtomicU64::new(0),
            }))
        }
    };
    println!("{LISTENING}{}", listener.local_addr()?);
    let serve = async {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let backend = backend.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let backend = backend.clone();
                async move { Ok::<_, Infallible>(answer(req, backend.as_deref()).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    };
    let parent_gone = async {
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    };
    tokio::select! {
        () = serve => {}
        () = parent_gone => {}
        () = tokio::time::sleep(Duration::from_secs(max_secs)) => {}
    }
    Ok(())
}

struct RedisBackend {
    conn: redis::aio::ConnectionManager,
    script: redis::Script,
    prefix: String,
    counter: AtomicU64,
}

async fn answer(req: Request<Incoming>, backend: Option<&RedisBackend>) -> Response<Full<Bytes>> {
    // Read the body as koogate does; its content does not matter here.
    let body_ok = req.into_body().collect().await.is_ok();
    let mut ok = body_ok;
    if let (true, Some(b)) = (body_ok, backend) {
        let key = format!("{}{}", b.prefix, b.counter.fetch_add(1, Ordering::Relaxed));
        let mut conn = b.conn.clone();
        // EVALSHA, with a transparent SCRIPT LOAD after NOSCRIPT, as koogate does.
        ok = b.script.key(key).invoke_async::<i64>(&mut conn).await.is_ok();
    }
    let mut res =
        Response::new(Full::new(Bytes::from_static(if ok { FIXED_ANSWER } else { FAILED_ANSWER }.as_bytes())));
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json;charset=UTF-8"));
    res
}

// ------------------------------------------------------------------ koogate

/// koogate's settings for a target, as environment variables.
pub fn koogate_env(kind: TargetKind, s: &Settings) -> BTreeMap<String, String> {
    let dir = s.work_dir.join(kind.key());
    let store = match kind {
        TargetKind::Redis => s.redis_url.clone(),
        _ => dir.join("store").display().to_string(),
    };
    BTreeMap::from([
        ("KOOGATE_ACCESS_KEY".into(), load::ACCESS_KEY.into()),
        ("KOOGATE_LISTEN".into(), "127.0.0.1:0".into()),
        ("KOOGATE_ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
        ("KOOGATE_STORE".into(), store),
        ("KOOGATE_KEY_PREFIX".into(), s.prefix_of(kind)),
        ("KOOGATE_DATA_DIR".into(), dir.join("data").display().to_string()),
        ("KOOGATE_MAX_INFLIGHT".into(), "100000".into()),
        // Every connection of the bench comes from 127.0.0.1: the per-peer cap (256 by default)
        // would close most of the 1,000 idle connections at once.
        ("KOOGATE_MAX_CONNS_PER_PEER".into(), "0".into()),
        ("KOOGATE_FRONTEND_URL".into(), "https://bench.invalid/koogallery".into()),
        ("KOOGATE_LOG_FORMAT".into(), "json".into()),
        ("KOOGATE_SHUTDOWN_GRACE_SECS".into(), "2".into()),
    ])
}

async fn start_koogate(
    kind: TargetKind,
    s: &Settings,
    name: &str,
    extra: BTreeMap<String, String>,
) -> anyhow::Result<Target> {
    let mut env = koogate_env(kind, s);
    let dir = s.work_dir.join(name);
    if name != kind.key() {
        env.insert("KOOGATE_DATA_DIR".into(), dir.join("data").display().to_string());
        if kind == TargetKind::Embedded {
            env.insert("KOOGATE_STORE".into(), dir.join("store").display().to_string());
        }
    }
    env.extend(extra);
    let config = koogate::config::Config::from_parts(env.clone(), None)
        .map_err(|e| anyhow::anyhow!("the bench's koogate settings are invalid: {e}"))?;
    if s.in_process {
        let running = koogate::server::start(config).await.context("koogate could not start in-process")?;
        let (addr, admin_addr) = (running.addr, running.admin_addr);
        return Ok(Target { kind, addr, admin_addr: Some(admin_addr), pid: None, handle: Handle::InProcess(running) });
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log_path = dir.join("koogate.log");
    let log = std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = Command::new(&s.koogate_bin);
    // Only the settings chosen here: nothing leaks in from the caller's environment.
    for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("KOOGATE_")) {
        cmd.env_remove(name);
    }
    cmd.arg("serve")
        .envs(&env)
        .env("KOOGATE_LOG", &s.koogate_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {}", s.koogate_bin.display()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some((addr, admin_addr)) = listening_line(&log_path) {
            return Ok(Target {
                kind,
                addr,
                admin_addr: Some(admin_addr),
                pid: child.id(),
                handle: Handle::Process(child),
            });
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("koogate exited at start ({status}); its log says:\n{}", tail(&log_path, 20));
        }
        if Instant::now() >= deadline {
            let _ = child.start_kill();
            bail!("koogate did not start within {START_TIMEOUT:?}; its log says:\n{}", tail(&log_path, 20));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The addresses from koogate's JSON log line "koogate is listening".
fn listening_line(log: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let field = |name: &str| v.get(name).and_then(|f| f.as_str()).map(str::to_owned);
        if field("message")?.as_str() != "koogate is listening" {
            return None;
        }
        Some((field("addr")?.parse().ok()?, field("admin_addr")?.parse().ok()?))
    })
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The koogate binary next to this one, or a clear error.
pub fn koogate_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe().context("cannot find the bench executable")?.with_file_name("koogate"),
    };
    if !path.is_file() {
        bail!(
            "the koogate binary is missing at {}.\n`cargo run --bin koogate-bench` builds only the bench: build both with\n    cargo build --release --bins && target/release/koogate-bench\n(or pass --koogate-bin PATH, or --in-process)",
            path.display()
        );
    }
    Ok(path)
}

// -------------------------------------------------------------------- Redis

/// A private `redis-server` for the run, on a free loopback port, without
/// persistence (as the CI's): nobody else's commands in `INFO commandstats`
/// and nobody else's load on the Redis that baseline B and koogate share.
pub struct OwnRedis {
    pub url: String,
    child: Child,
}

impl OwnRedis {
    /// `None` when `redis-server` is not installed.
    pub async fn start(dir: &Path) -> anyhow::Result<Option<Self>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        std::fs::create_dir_all(dir)?;
        let spawned = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "yes", "--logfile", ""])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context("cannot run redis-server"),
        };
        let url = format!("redis://127.0.0.1:{port}");
        let mut own = Self { url, child };
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = own.child.try_wait() {
                bail!("the bench's redis-server exited at start ({status})");
            }
            if Instant::now() >= deadline {
                own.stop().await;
                bail!("the bench's redis-server did not listen on port {port} within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Some(own))
    }

    pub async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}
