//! The load generator: KooGallery-signed V2 calls over keep-alive connections.
//!
//! Every call is signed as KooGallery signs it (`koogate::tools::client::v2_query`,
//! a fresh nonce each), and every answer must carry `"resultCode":"000000"`;
//! anything else counts as an error.
//!
//! Open loop (wrk2 style): connection `c` of `N` sends its `i`-th call at
//! `start + (i + c/N) × N/rate`, whatever the answers do. Latency runs from
//! that *scheduled* time when the connection was still busy with an earlier
//! call at that moment (the wait is the server's doing: no coordinated
//! omission), else from the actual send (so the generator's own timer slack
//! is not blamed on the server). Calls still unsent at the cutoff (duration
//! plus a grace period) count as `unsent`, with their wait so far as latency.
//!
//! Closed loop (peak finding, warm-up): every connection sends its next call
//! as soon as the previous one is answered.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// The access key every target is configured with.
pub const ACCESS_KEY: &str = "kgbench-access-key-7f3a9c";
const V2_PATH: &str = "/koogallery/v2";
/// Longest wait for one answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// What every accepted answer contains (koogate serializes `resultCode` first, compactly).
const OK_MARK: &[u8] = br#""resultCode":"000000""#;
/// Error answers kept as examples per phase.
const MAX_SAMPLES: usize = 5;
/// Instances remembered as release candidates at most.
const MAX_FRESH: usize = 50_000;
/// Renewals remembered for the Redis memory probe.
const MAX_RENEWAL_SAMPLES: usize = 64;
/// Connections opened at once by the idle-connection probe.
const OPEN_BATCH: usize = 64;

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Shares of the call mix; the rest are new orders.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Mix {
    /// Retries of an earlier newInstance (same body, fresh nonce).
    pub duplicate: f64,
    /// refreshInstance RENEWAL of an instance created in the warm-up.
    pub renewal: f64,
    /// releaseInstance of an instance created earlier in the run.
    pub release: f64,
}

impl Mix {
    pub const ALL_NEW: Mix = Mix { duplicate: 0.0, renewal: 0.0, release: 0.0 };

    pub fn new_orders(&self) -> f64 {
        (1.0 - self.duplicate - self.renewal - self.release).max(0.0)
    }
}

/// An order created by a newInstance the target accepted.
#[derive(Clone)]
pub struct Created {
    pub order_id: String,
    pub order_line_id: String,
    pub instance_id: String,
    pub body: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    New,
    Renewal,
    Release,
    Duplicate,
}

/// One call to make.
pub struct Call {
    pub kind: Kind,
    pub body: Bytes,
    /// New orders: what was created (once accepted).
    created: Option<Created>,
    /// Renewals: (instance id, renewal order id).
    renewal: Option<(String, String)>,
}

/// What to send: the mix, order numbering and the instances calls refer to.
pub struct Workload {
    mix: Mix,
    next: AtomicU64,
    /// Orders of the warm-up: renewed and retried, never released.
    pool: Vec<Created>,
    /// Orders accepted since: release candidates (the warm-up's become the next pool).
    fresh: Mutex<VecDeque<Created>>,
    renewals: Mutex<Vec<(String, String)>>,
}

impl Workload {
    /// A workload of new orders only (the warm-up), numbered from 0.
    pub fn warm_up() -> Self {
        Self::new_orders_from(0)
    }

    /// New orders only, numbered from `first` (keeps separate workloads' orders apart).
    pub fn new_orders_from(first: u64) -> Self {
        Self::with_pool(Mix::ALL_NEW, first, Vec::new())
    }

    /// The measured workload: continues `warm`'s numbering, renews and retries its orders.
    pub fn after(warm: &Workload, mix: Mix) -> Self {
        let pool = lock(&warm.fresh).iter().cloned().collect();
        Self::with_pool(mix, warm.next.load(Ordering::Relaxed), pool)
    }

    fn with_pool(mix: Mix, next: u64, pool: Vec<Created>) -> Self {
        Self {
            mix,
            next: AtomicU64::new(next),
            pool,
            fresh: Mutex::new(VecDeque::new()),
            renewals: Mutex::new(Vec::new()),
        }
    }

    /// Orders of the warm-up (for the Redis memory probe).
    pub fn pool(&self) -> &[Created] {
        &self.pool
    }

    /// Some renewals accepted: (instance id, renewal order id).
    pub fn renewal_samples(&self) -> Vec<(String, String)> {
        lock(&self.renewals).clone()
    }

    fn number(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_call(&self) -> Call {
        let r: f64 = rand::thread_rng().gen();
        let m = self.mix;
        if r < m.duplicate && !self.pool.is_empty() {
            let i = rand::thread_rng().gen_range(0..self.pool.len());
            return Call { kind: Kind::Duplicate, body: self.pool[i].body.clone(), created: None, renewal: None };
        }
        if r < m.duplicate + m.renewal && !self.pool.is_empty() {
            let i = rand::thread_rng().gen_range(0..self.pool.len());
            return self.renewal(&self.pool[i].instance_id);
        }
        if r < m.duplicate + m.renewal + m.release {
            if let Some(victim) = lock(&self.fresh).pop_front() {
                return self.release(&victim.instance_id);
            }
        }
        self.new_order()
    }

    pub fn new_order(&self) -> Call {
        let n = self.number();
        let order_id = format!("CSBENCH{n}");
        let order_line_id = format!("{order_id}-000001");
        let body = format!(
            r#"{{"activity":"newInstance","businessId":"{}","orderId":"{order_id}","orderLineId":"{order_line_id}","testFlag":"0"}}"#,
            uuid::Uuid::new_v4()
        );
        let instance_id = koogate::store::keys::instance_id_for(&order_id, Some(&order_line_id));
        let body = Bytes::from(body);
        let created = Created { order_id, order_line_id, instance_id, body: body.clone() };
        Call { kind: Kind::New, body, created: Some(created), renewal: None }
    }

    fn renewal(&self, instance_id: &str) -> Call {
        let order_id = format!("CSBENCHR{}", self.number());
        let body = format!(
            r#"{{"activity":"refreshInstance","expireTime":"20271124023618256","instanceId":"{instance_id}","orderId":"{order_id}","orderLineId":"{order_id}-000001","productId":"OFFI461867333479178240","scene":"RENEWAL","testFlag":"0"}}"#
        );
        Call {
            kind: Kind::Renewal,
            body: Bytes::from(body),
            created: None,
            renewal: Some((instance_id.to_owned(), order_id)),
        }
    }

    fn release(&self, instance_id: &str) -> Call {
        let order_id = format!("CSBENCHX{}", self.number());
        let body = format!(
            r#"{{"activity":"releaseInstance","instanceId":"{instance_id}","orderId":"{order_id}","orderLineId":"{order_id}-000001","testFlag":"0"}}"#
        );
        Call { kind: Kind::Release, body: Bytes::from(body), created: None, renewal: None }
    }

    /// Remembers what an accepted call created.
    fn accepted(&self, call: Call) {
        match call.kind {
            Kind::New => {
                if let Some(created) = call.created {
                    let mut fresh = lock(&self.fresh);
                    if fresh.len() >= MAX_FRESH {
                        fresh.pop_front();
                    }
                    fresh.push_back(created);
                }
            }
            Kind::Renewal => {
                let mut samples = lock(&self.renewals);
                if samples.len() < MAX_RENEWAL_SAMPLES {
                    samples.extend(call.renewal);
                }
            }
            Kind::Release | Kind::Duplicate => {}
        }
    }
}

/// A poisoned lock only means another worker panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How one call ended.
enum Verdict {
    Accepted,
    /// Answered, but not `000000` (the answer or status, abridged).
    Refused(String),
    /// No answer: connection or timeout trouble.
    Failed(String),
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr} timed out"))?
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the connection closes; errors show up in the calls.
            let _ = conn.await;
        });
        Ok(Self { sender, host: addr.to_string() })
    }

    async fn roundtrip(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
        let exchange = async {
            self.sender.ready().await?;
            let res = self.sender.send_request(req).await?;
            let status = res.status().as_u16();
            let body = res.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(CALL_TIMEOUT, exchange).await.map_err(|_| anyhow::anyhow!("no answer within 10 s"))?
    }

    /// A plain GET (readiness, metrics).
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, Bytes)> {
        let req =
            Request::builder().method(Method::GET).uri(path).header(HOST, &self.host).body(Full::new(Bytes::new()))?;
        self.roundtrip(req).await
    }

    /// A V2 call, signed now with a fresh nonce.
    async fn call(&mut self, body: &Bytes) -> Verdict {
        let query = koogate::tools::client::v2_query(ACCESS_KEY, body, now_ms(), &koogate::tools::client::nonce());
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{V2_PATH}?{query}"))
            .header(HOST, &self.host)
            .header(CONTENT_TYPE, "application/json;charset=UTF-8")
            .body(Full::new(body.clone()));
        let req = match req {
            Ok(r) => r,
            Err(e) => return Verdict::Failed(format!("cannot build the request: {e}")),
        };
        match self.roundtrip(req).await {
            Ok((200, answer)) if contains(&answer, OK_MARK) => Verdict::Accepted,
            Ok((status, answer)) => {
                let text: String = String::from_utf8_lossy(&answer).chars().take(160).collect();
                Verdict::Refused(format!("HTTP {status}: {text}"))
            }
            Err(e) => Verdict::Failed(e.to_string()),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Statistics of one phase against one target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseStats {
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Open loop: the scheduled rate (calls/s).
    pub target_rate: Option<f64>,
    pub connections: usize,
    /// From the first send to the last answer.
    pub secs: f64,
    /// Calls answered (accepted or refused).
    pub answered: u64,
    pub accepted: u64,
    /// Refused answers plus calls without an answer.
    pub errors: u64,
    /// Open loop: calls scheduled but not sent by the cutoff (the target fell behind).
    pub unsent: u64,
    /// `answered / secs`.
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub error_rate: f64,
    pub error_samples: Vec<String>,
}

/// What one connection saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    accepted: u64,
    refused: u64,
    failed: u64,
    unsent: u64,
    samples: Vec<String>,
    last_answer: Option<Instant>,
}

impl Tally {
    fn record(&mut self, verdict: Verdict, latency: Duration) {
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        match verdict {
            Verdict::Accepted => {
                self.accepted += 1;
                self.latencies_us.push(us);
            }
            Verdict::Refused(why) => {
                self.refused += 1;
                self.latencies_us.push(us);
                self.sample(why);
            }
            Verdict::Failed(why) => {
                self.failed += 1;
                self.sample(why);
            }
        }
    }

    fn sample(&mut self, why: String) {
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(why);
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.accepted += other.accepted;
        self.refused += other.refused;
        self.failed += other.failed;
        self.unsent += other.unsent;
        for s in other.samples {
            if self.samples.len() < MAX_SAMPLES && !self.samples.contains(&s) {
                self.samples.push(s);
            }
        }
        self.last_answer = self.last_answer.max(other.last_answer);
    }

    fn stats(mut self, mode: &'static str, target_rate: Option<f64>, connections: usize, start: Instant) -> PhaseStats {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            let n = self.latencies_us.len();
            if n == 0 {
                return 0.0;
            }
            let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            f64::from(self.latencies_us[i]) / 1000.0
        };
        let secs = self.last_answer.map_or(0.0, |t| t.saturating_duration_since(start).as_secs_f64());
        let answered = self.accepted + self.refused;
        let errors = self.refused + self.failed;
        let tried = answered + self.failed;
        PhaseStats {
            mode,
            target_rate,
            connections,
            secs,
            answered,
            accepted: self.accepted,
            errors,
            unsent: self.unsent,
            rps: if secs > 0.0 { answered as f64 / secs } else { 0.0 },
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            p999_ms: pct(0.999),
            max_ms: pct(1.0),
            error_rate: if tried > 0 { errors as f64 / tried as f64 } else { 0.0 },
            error_samples: self.samples,
        }
    }
}

/// Sends `call` on `conn`, reconnecting once when the connection is gone.
async fn send(conn: &mut Conn, addr: SocketAddr, workload: &Workload, call: Call) -> Verdict {
    let verdict = conn.call(&call.body).await;
    let verdict = match verdict {
        Verdict::Failed(_) if conn.sender.is_closed() => match Conn::open(addr).await {
            Ok(fresh) => {
                *conn = fresh;
                conn.call(&call.body).await
            }
            Err(e) => Verdict::Failed(format!("reconnect failed: {e}")),
        },
        v => v,
    };
    if matches!(verdict, Verdict::Accepted) {
        workload.accepted(call);
    }
    verdict
}

async fn open_all(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(n);
    let mut pending = JoinSet::new();
    let mut remaining = n;
    while remaining > 0 {
        let batch = remaining.min(OPEN_BATCH);
        for _ in 0..batch {
            pending.spawn(Conn::open(addr));
        }
        while let Some(opened) = pending.join_next().await {
            conns.push(opened.context("connect task")??);
        }
        remaining -= batch;
    }
    Ok(conns)
}

async fn collect(mut workers: JoinSet<Tally>) -> anyhow::Result<Tally> {
    let mut total = Tally::default();
    while let Some(t) = workers.join_next().await {
        total.merge(t.context("load worker")?);
    }
    Ok(total)
}

/// How long a closed-loop phase runs.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    Calls(u64),
    Time(Duration),
}

/// Closed loop over `connections` connections until `limit`.
pub async fn closed_loop(
    addr: SocketAddr,
    workload: &Arc<Workload>,
    connections: usize,
    limit: Limit,
) -> anyhow::Result<PhaseStats> {
    let conns = open_all(addr, connections).await?;
    let budget = Arc::new(AtomicU64::new(match limit {
        Limit::Calls(n) => n,
        Limit::Time(_) => u64::MAX,
    }));
    // A hard stop even for a call budget: a stuck target must not hang the bench.
    let max_time = match limit {
        Limit::Calls(_) => Duration::from_secs(60),
        Limit::Time(d) => d,
    };
    let start = Instant::now();
    let deadline = start + max_time;
    let mut workers = JoinSet::new();
    for mut conn in conns {
        let workload = Arc::clone(workload);
        let budget = Arc::clone(&budget);
        workers.spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < deadline && take(&budget) {
                let sent = Instant::now();
                let verdict = send(&mut conn, addr, &workload, workload.next_call()).await;
                let done = Instant::now();
                tally.record(verdict, done - sent);
                tally.last_answer = Some(done);
            }
            tally
        });
    }
    Ok(collect(workers).await?.stats("closed", None, connections, start))
}

fn take(budget: &AtomicU64) -> bool {
    budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1)).is_ok()
}

/// Open loop at `rate` calls/s over `connections` connections for `duration`.
pub async fn open_loop(
    addr: SocketAddr,
    workload: &Arc<Workload>,
    connections: usize,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<PhaseStats> {
    anyhow::ensure!(rate > 0.0 && rate.is_finite(), "open-loop rate must be positive, not {rate}");
    let conns = open_all(addr, connections).await?;
    let n = conns.len();
    let interval = n as f64 / rate;
    let grace = Duration::from_secs_f64((duration.as_secs_f64() * 0.25).clamp(0.5, 3.0));
    let start = Instant::now() + Duration::from_millis(20);
    let cutoff = start + duration + grace;
    let mut workers = JoinSet::new();
    for (c, mut conn) in conns.into_iter().enumerate() {
        let workload = Arc::clone(workload);
        let offset = interval * c as f64 / n as f64;
        let count = ((duration.as_secs_f64() - offset) / interval).ceil().max(0.0) as u64;
        workers.spawn(async move {
            let mut tally = Tally::default();
            let mut last_done = start;
            for i in 0..count {
                let scheduled = start + Duration::from_secs_f64(offset + interval * i as f64);
                let now = Instant::now();
                if now >= cutoff {
                    // The target fell behind: the rest was never sent. Their
                    // wait so far is a lower bound of their latency.
                    for j in i..count {
                        let s = start + Duration::from_secs_f64(offset + interval * j as f64);
                        let us = u32::try_from(cutoff.saturating_duration_since(s).as_micros()).unwrap_or(u32::MAX);
                        tally.latencies_us.push(us);
                    }
                    tally.unsent += count - i;
                    break;
                }
                if scheduled > now {
                    tokio::time::sleep_until(scheduled.into()).await;
                }
                let sent = Instant::now();
                let origin = if last_done > scheduled { scheduled } else { sent };
                let verdict = send(&mut conn, addr, &workload, workload.next_call()).await;
                let done = Instant::now();
                tally.record(verdict, done - origin);
                tally.last_answer = Some(done);
                last_done = done;
            }
            tally
        });
    }
    Ok(collect(workers).await?.stats("open", Some(rate), n, start))
}

/// `n` connections, each after one accepted call, kept open and idle.
pub struct IdleConnections {
    _conns: Vec<Conn>,
    pub stats: PhaseStats,
}

/// Opens `n` connections and makes one new-order call on each.
pub async fn idle_connections(addr: SocketAddr, workload: &Arc<Workload>, n: usize) -> anyhow::Result<IdleConnections> {
    let conns = open_all(addr, n).await?;
    let start = Instant::now();
    let mut kept = Vec::with_capacity(n);
    let mut total = Tally::default();
    let mut queue = conns.into_iter();
    loop {
        let mut batch = JoinSet::new();
        for mut conn in queue.by_ref().take(OPEN_BATCH) {
            let workload = Arc::clone(workload);
            batch.spawn(async move {
                let mut tally = Tally::default();
                let sent = Instant::now();
                let verdict = send(&mut conn, addr, &workload, workload.new_order()).await;
                let done = Instant::now();
                tally.record(verdict, done - sent);
                tally.last_answer = Some(done);
                (conn, tally)
            });
        }
        if batch.is_empty() {
            break;
        }
        while let Some(joined) = batch.join_next().await {
            let (conn, tally) = joined.context("idle connection task")?;
            kept.push(conn);
            total.merge(tally);
        }
    }
    Ok(IdleConnections { _conns: kept, stats: total.stats("idle", None, n, start) })
}

/// A GET on a fresh connection (readiness, metrics).
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Bytes)> {
    Conn::open(addr).await?.get(path).await
}
