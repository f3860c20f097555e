//! Shared test harness: real gateways on loopback, real Redis, real files.
#![allow(dead_code)]

pub mod billing;
pub mod catalogue;
pub mod cluster;
pub mod kooapi;
pub mod process;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use koogate::config::Config;
use koogate::server::Running;
use koogate::tools::client::{CallResponse, KooClient};
use serde_json::Value;

pub const AK: &str = "test-access-key-123";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Redis,
    Embedded,
}

pub const BACKENDS: [Backend; 2] = [Backend::Redis, Backend::Embedded];

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A unique key prefix so tests run in parallel against one Redis.
pub fn unique_prefix(name: &str) -> String {
    format!("kgtest:{name}:{}:", uuid::Uuid::new_v4().simple())
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

pub fn fixture_params(rel: &str) -> BTreeMap<String, String> {
    let v: BTreeMap<String, String> =
        serde_json::from_slice(&fixture(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"));
    v
}

/// Sorted fixture file names of a directory (relative to `fixtures/`).
pub fn fixture_files(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join(dir))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| format!("{dir}/{}", e.file_name().to_string_lossy()))
        .collect();
    names.sort();
    names
}

/// Checks `Body-Sign` with its own HMAC, independent of koogate's signer.
pub fn independent_body_sign_ok(key: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(header) = header else { return false };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body);
    let b64 = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    header == format!("sign_type=\"HMAC-SHA256\", signature=\"{b64}\"")
}

pub struct TestGateway {
    pub running: Option<Running>,
    pub client: KooClient,
    pub admin: KooClient,
    pub backend: Backend,
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub redis_url: String,
}

pub fn base_env(backend: Backend, prefix: &str, dir: &Path, redis_url: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("KOOGATE_ACCESS_KEY".into(), AK.into());
    env.insert("KOOGATE_LISTEN".into(), "127.0.0.1:0".into());
    env.insert("KOOGATE_ADMIN_LISTEN".into(), "127.0.0.1:0".into());
    env.insert("KOOGATE_FRONTEND_URL".into(), "https://console.example.com/koogallery".into());
    env.insert("KOOGATE_KEY_PREFIX".into(), prefix.into());
    env.insert("KOOGATE_DATA_DIR".into(), dir.join("data").display().to_string());
    env.insert("KOOGATE_SKU_MAP".into(), fixtures().join("sku-map.toml").display().to_string());
    env.insert("KOOGATE_SHUTDOWN_GRACE_SECS".into(), "2".into());
    let store = match backend {
        Backend::Redis => redis_url.to_owned(),
        Backend::Embedded => dir.join("store").display().to_string(),
    };
    env.insert("KOOGATE_STORE".into(), store);
    env
}

/// Starts a gateway in this process; its KooGallery and admin clients.
async fn boot(
    backend: Backend,
    prefix: &str,
    dir: &Path,
    redis_url: &str,
    extra: &[(&str, &str)],
) -> (Running, KooClient, KooClient) {
    let mut env = base_env(backend, prefix, dir, redis_url);
    for (k, v) in extra {
        env.insert((*k).into(), (*v).into());
    }
    let config = Config::from_parts(env, None).expect("test config is valid");
    let running = koogate::server::start(config).await.expect("gateway starts");
    let client = KooClient::new(&format!("http://{}", running.addr));
    let admin = KooClient::new(&format!("http://{}", running.admin_addr));
    (running, client, admin)
}

impl TestGateway {
    pub async fn start(backend: Backend, name: &str) -> Self {
        Self::start_with(backend, name, &[]).await
    }

    pub async fn start_with(backend: Backend, name: &str, extra: &[(&str, &str)]) -> Self {
        Self::start_on(backend, name, REDIS_URL, extra).await
    }

    pub async fn start_on(backend: Backend, name: &str, redis_url: &str, extra: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let prefix = unique_prefix(name);
        let (running, client, admin) = boot(backend, &prefix, dir.path(), redis_url, extra).await;
        Self { running: Some(running), client, admin, backend, prefix, dir, redis_url: redis_url.into() }
    }

    /// Stops the gateway and starts another on the same store and directories, with `extra` settings.
    pub async fn restart(&mut self, extra: &[(&str, &str)]) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        let (running, client, admin) = boot(self.backend, &self.prefix, self.dir.path(), &self.redis_url, extra).await;
        (self.running, self.client, self.admin) = (Some(running), client, admin);
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub async fn v2(&self, body: &[u8]) -> CallResponse {
        self.client.v2("/koogallery/v2", AK, body, now_ms()).await.expect("v2 call answered")
    }

    pub async fn v2_fixture(&self, rel: &str) -> CallResponse {
        self.v2(&fixture(rel)).await
    }

    pub async fn v1(&self, params: &BTreeMap<String, String>) -> CallResponse {
        self.client.v1("/koogallery/v1", AK, params, now_ms()).await.expect("v1 call answered")
    }

    pub async fn v1_fixture(&self, rel: &str) -> CallResponse {
        self.v1(&fixture_params(rel)).await
    }

    pub fn events_path(&self) -> PathBuf {
        self.dir.path().join("data").join("events.jsonl")
    }

    /// Events written so far, each checked against its schema in docs/events/.
    pub fn events(&self) -> Vec<Value> {
        let events: Vec<Value> = match std::fs::read_to_string(self.events_path()) {
            Ok(text) => text.lines().map(|l| serde_json::from_str(l).expect("events.jsonl line is JSON")).collect(),
            Err(_) => Vec::new(),
        };
        events.iter().for_each(catalogue::assert_event);
        events
    }

    /// Waits until the outbox is empty (everything forwarded).
    pub async fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let len = self.running().store.outbox_len().await.expect("outbox_len");
            if len == 0 {
                // let the forwarder finish its ack round
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.running().store.outbox_len().await.unwrap() == 0 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "outbox did not drain: {len} left");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the store holds, for "nothing was written" checks.
    pub async fn snapshot(&self) -> BTreeMap<String, String> {
        match self.backend {
            Backend::Redis => redis_snapshot(&self.redis_url, &self.prefix).await,
            Backend::Embedded => {
                let bytes = std::fs::read(self.dir.path().join("store").join("koogate.redb")).unwrap();
                let digest = <sha2::Sha256 as sha2::Digest>::digest(&bytes);
                BTreeMap::from([("redb".to_owned(), hex::encode(digest))])
            }
        }
    }

    pub async fn metrics(&self) -> String {
        let res = self.admin.send(hyper::Method::GET, "/metrics", &[], bytes::Bytes::new()).await.unwrap();
        String::from_utf8(res.body.to_vec()).unwrap()
    }

    /// A request to the admin API: `token` as the bearer, `body` as JSON (none when empty); the status
    /// and the answer as JSON (`Null` when it is not JSON).
    pub async fn admin_json(
        &self,
        method: hyper::Method,
        path: &str,
        token: Option<&str>,
        body: impl Into<bytes::Bytes>,
    ) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("authorization", auth.as_str()));
        }
        let res = self.admin.send(method, path, &headers, body.into()).await.expect("admin API answers");
        (res.status, serde_json::from_slice(&res.body).unwrap_or(Value::Null))
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        if self.backend == Backend::Redis {
            delete_prefix(&self.redis_url, &self.prefix).await;
        }
    }
}

/// Asks `done` every 20 ms until it holds; fails saying `what` did not happen once `within` has passed.
pub async fn wait_until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one series of a Prometheus exposition (`name` or `name{labels}`, written as exported).
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The simulator's KooGallery APIs (order query, usage) on a free loopback port.
pub async fn market() -> koogate::tools::simulate::MarketServer {
    use koogate::tools::simulate::{MarketConfig, MarketServer};
    MarketServer::start(MarketConfig::new("127.0.0.1:0".parse().unwrap())).await.unwrap()
}

/// Serves HTTP/1.1 on `listener` with `handle` for every request, until the task is aborted.
pub fn serve_http<F, Fut>(listener: tokio::net::TcpListener, handle: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<http_body_util::Full<bytes::Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let handle = handle.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let res = handle(req);
                    async move { Ok::<_, std::convert::Infallible>(res.await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    })
}

pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.expect("redis is reachable")
}

pub async fn redis_snapshot(url: &str, prefix: &str) -> BTreeMap<String, String> {
    let mut conn = redis_conn(url).await;
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.unwrap();
    let mut out = BTreeMap::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.unwrap();
        let value = match kind.as_str() {
            "hash" => {
                let m: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await.unwrap();
                format!("{:?}", m.into_iter().collect::<BTreeMap<_, _>>())
            }
            "string" => redis::cmd("GET").arg(&key).query_async::<String>(&mut conn).await.unwrap(),
            "stream" => {
                let n: u64 = redis::cmd("XLEN").arg(&key).query_async(&mut conn).await.unwrap();
                format!("stream of {n}")
            }
            other => other.to_owned(),
        };
        out.insert(key, value);
    }
    out
}

pub async fn delete_prefix(url: &str, prefix: &str) {
    // The test may have stopped its Redis: nothing to clean then.
    let Ok(client) = redis::Client::open(url) else { return };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return };
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
    }
}

/// A private redis-server on a free loopback port, stopped on drop.
pub struct OwnRedis {
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl OwnRedis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// With extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(extra)
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs");
        wait_for_port(port, Duration::from_secs(10), "own redis-server");
        Self { port, child, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Blocks the server for `secs` (it answers nothing meanwhile), in the
    /// background; needs `start_with(&["--enable-debug-command", "local"])`.
    pub async fn sleep(&self, secs: f64) -> tokio::task::JoinHandle<()> {
        let mut conn = redis_conn(&self.url()).await;
        let task = tokio::spawn(async move {
            let _: () = redis::cmd("DEBUG").arg("SLEEP").arg(secs).query_async(&mut conn).await.expect("DEBUG SLEEP");
        });
        // Let the command reach the server before the calls that should wait on it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        task
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits (blocking) until something listens on 127.0.0.1:`port`; panics naming `what` after `within`.
pub fn wait_for_port(port: u16, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port} within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `INFO commandstats` as command → calls.
pub async fn commandstats(url: &str) -> BTreeMap<String, u64> {
    let mut conn = redis_conn(url).await;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    info.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}
