//! `koogate simulate`: KooGallery's side of the wire, for local runs, tests,
//! demos and the benchmark.
//!
//! - [`market`]: the order query API (`GET …/order/query`) on loopback,
//!   verifying API Gateway AK/SK signatures as Huawei does, answering from
//!   an [`OrderBook`]; it can fail on purpose and counts what it was asked.
//! - [`usage`]: on the same server, KooGallery's usage API (`POST
//!   …/isv/usage-data`): verifies the push signature with the product's
//!   access key (`--key`), checks every record, deduplicates by
//!   `metering_sn`, keeps per-instance totals (`GET /sim/usage`); it can fail
//!   a share of calls (`--usage-fail-share`), answer late after storing (the
//!   answer "lost": `--usage-delay-ms`, `--usage-delay-share`) and refuse
//!   instances it "does not know" (`--refuse-instance`).
//! - [`orders`]: the order book: KooGallery's nine mock orders and the
//!   scenario orders (also `fixtures/orders.json`), or a JSON file.
//! - [`scenario`]: named call sequences (purchase, renewal, freeze, upgrade,
//!   release, trial, probes, retries, pay-per-use usage; V2 and V1) with
//!   expected result codes.
//! - [`driver`]: calls a gateway as KooGallery does, retries what KooGallery
//!   retries, checks every answer; [`report`]: what it saw.
//! - [`usage_flow`]: the usage step of `account-settlement-usage`: posts a
//!   day of hourly usage of 3 workspaces to the gateway's admin API
//!   (`--admin`, `--admin-token`), waits until the usage API received every
//!   record, and compares the totals. Without the admin API that scenario is
//!   skipped (and said so in the report).
//!
//! ```no_run
//! # async fn demo() -> Result<(), koogate::tools::simulate::SimulateError> {
//! use koogate::secret::Secret;
//! use koogate::tools::simulate::{run_scenarios, GatewayTarget, MarketConfig, MarketServer, RunOptions, UsageTarget};
//! let mut config = MarketConfig::new("127.0.0.1:0".parse().unwrap());
//! config.usage_key = Some(Secret::new("access-key"));
//! let market = MarketServer::start(config).await?;
//! // start the gateway with KOOGATE_MARKETPLACE_URL = market.url(), then:
//! let mut run = RunOptions::new(GatewayTarget::new("http://127.0.0.1:8080", "access-key"));
//! run.usage = Some(UsageTarget::new("http://127.0.0.1:9090", Secret::new("admin-token"), &market.url()));
//! let report = run_scenarios(&run).await?;
//! println!("{}", report.summary());
//! println!("{:?}", market.usage_stats().instances);
//! market.stop().await;
//! # Ok(()) }
//! ```

pub mod driver;
pub mod market;
pub mod orders;
pub mod report;
pub mod scenario;
pub mod usage;
pub mod usage_flow;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use driver::{run_scenarios, select, GatewayTarget, RetryPolicy, RunOptions};
pub use market::{MarketConfig, MarketServer, MarketStats};
pub use orders::OrderBook;
pub use report::{CallRecord, Report, ScenarioReport, Skipped};
pub use scenario::{Scenario, NAMES as SCENARIOS, USAGE_SCENARIO};
pub use usage::UsageSimStats;
pub use usage_flow::UsageTarget;

use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("cannot read orders from {path}: {source}")]
    ReadOrders { path: String, source: std::io::Error },
    #[error("orders in {origin}: {message}")]
    Orders { origin: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("unknown scenario {name:?}; the scenarios are: {known}")]
    UnknownScenario { name: String, known: String },
    #[error("run id {0:?} must be 1 to 32 letters and digits, starting with a letter")]
    RunId(String),
    #[error("--gateway {0:?} is not a URL like http://127.0.0.1:8080")]
    GatewayUrl(String),
    #[error("--key (or KOOGATE_ACCESS_KEY) is required with --gateway: the product's access key")]
    MissingKey,
    #[error("--fail-share must be between 0 and 1, not {0}")]
    FailShare(f64),
    #[error("{flag} must be between 0 and 1, not {value}")]
    Share { flag: &'static str, value: f64 },
    #[error("--admin {0:?} is not a URL like http://127.0.0.1:9090")]
    AdminUrl(String),
    #[error("interrupted before the scenarios finished")]
    Interrupted,
}

/// The `koogate simulate` command line, as plain values.
#[derive(Clone, Debug)]
pub struct CliOptions {
    /// Where the order query API listens.
    pub listen: SocketAddr,
    /// Orders file (default: the generated book).
    pub orders: Option<PathBuf>,
    pub ak: String,
    pub sk: Secret,
    /// Share of order queries failed with HTTP 500.
    pub fail_share: f64,
    /// Gateway base URL: run the scenarios against it.
    pub gateway: Option<String>,
    /// The product's access key.
    pub key: Option<Secret>,
    pub v2_path: String,
    pub v1_path: String,
    /// Scenario names; empty: all.
    pub scenarios: Vec<String>,
    pub retries: u32,
    pub retry_ms: u64,
    pub timeout_secs: u64,
    pub run_id: Option<String>,
    /// Only serve the order query API.
    pub serve_only: bool,
    /// Print the report as JSON.
    pub json: bool,
    /// Print the scenarios and exit.
    pub list: bool,
    /// Share of usage calls answered HTTP 500, storing nothing.
    pub usage_fail_share: f64,
    /// Usage calls answered this late after storing their records …
    pub usage_delay: Duration,
    /// … this share of them.
    pub usage_delay_share: f64,
    /// Instance ids the usage API refuses ("does not exist").
    pub refuse_instances: Vec<String>,
    /// Base URL of the gateway's admin listener (the usage scenario posts usage there).
    pub admin: Option<String>,
    /// Its bearer token.
    pub admin_token: Option<Secret>,
    /// Longest wait for the usage API to receive every record of the usage scenario.
    pub usage_wait_secs: u64,
    /// The simulator the gateway pushes usage to, when not this one.
    pub usage_api: Option<String>,
}

/// Runs `koogate simulate`. `Ok(false)`: a scenario saw a protocol violation
/// (the command exits non-zero).
pub async fn command(opts: CliOptions, shutdown: impl Future<Output = ()>) -> Result<bool, SimulateError> {
    if opts.list {
        for s in Scenario::all("RLIST") {
            let usage = s.usage.as_ref().map(|u| format!(" + {} usage records", u.records.len())).unwrap_or_default();
            println!("{:<30} {} calls{usage}: {}", s.name, s.steps.len(), s.about);
        }
        return Ok(true);
    }
    let book = match &opts.orders {
        Some(path) => OrderBook::load(path)?,
        None => OrderBook::generated().with_usage_orders(),
    };
    let run = match (&opts.gateway, opts.serve_only) {
        (Some(url), false) => {
            let key = opts.key.as_ref().filter(|k| !k.expose().is_empty()).ok_or(SimulateError::MissingKey)?;
            let mut target = GatewayTarget::new(url, key.expose());
            target.v2_path.clone_from(&opts.v2_path);
            target.v1_path.clone_from(&opts.v1_path);
            let mut run = RunOptions::new(target);
            run.retry = RetryPolicy { retries: opts.retries, first_delay: Duration::from_millis(opts.retry_ms) };
            run.timeout = Duration::from_secs(opts.timeout_secs.max(1));
            if let Some(id) = &opts.run_id {
                run.run_id.clone_from(id);
            }
            run.scenarios.clone_from(&opts.scenarios);
            select(&run.scenarios, &run.run_id)?;
            reqwest::Url::parse(url).map_err(|_| SimulateError::GatewayUrl(url.clone()))?;
            Some(run)
        }
        _ => None,
    };
    let token = opts.admin_token.clone().filter(|t| !t.expose().is_empty());
    let admin = match (&opts.admin, token) {
        (Some(url), Some(token)) => {
            reqwest::Url::parse(url).map_err(|_| SimulateError::AdminUrl(url.clone()))?;
            Some((url.clone(), token))
        }
        (Some(_), None) => {
            eprintln!("koogate simulate: --admin without --admin-token (or KOOGATE_ADMIN_TOKEN): the usage scenario is skipped");
            None
        }
        (None, Some(_)) => {
            eprintln!("koogate simulate: --admin-token without --admin: the usage scenario is skipped");
            None
        }
        (None, None) => None,
    };
    let say = |line: String| if opts.json { eprintln!("{line}") } else { println!("{line}") };
    let orders = book.len();
    let sk_hint = if opts.sk.expose() == market::DEFAULT_SK { market::DEFAULT_SK } else { "<your --sk>" };
    let config = MarketConfig {
        listen: opts.listen,
        ak: opts.ak.clone(),
        sk: opts.sk.clone(),
        book,
        fail_share: opts.fail_share,
        usage_key: opts.key.clone(),
        usage_fail_share: opts.usage_fail_share,
        usage_require_apig: false,
        refuse_instances: opts.refuse_instances.iter().cloned().collect(),
        usage_delay_after_store: opts.usage_delay,
        usage_delay_share: opts.usage_delay_share,
    };
    let market = MarketServer::start(config).await?;
    say(format!("order query API on {} ({orders} orders); point the gateway at it with:", market.url()));
    say(format!(
        "  KOOGATE_MARKETPLACE_URL={} KOOGATE_MARKETPLACE_AK={} KOOGATE_MARKETPLACE_SK={sk_hint}",
        market.url(),
        opts.ak
    ));
    let key_note = if market.usage_key_set() {
        "signatures checked with --key"
    } else {
        "no --key: every usage call is refused 401"
    };
    say(format!(
        "usage API on {}{} ({key_note}); received: GET {}{}",
        market.url(),
        usage::USAGE_PATH,
        market.url(),
        usage::STATS_PATH
    ));
    let run = run.map(|mut run| {
        run.usage = admin.map(|(url, token)| {
            let usage_api = opts.usage_api.clone().unwrap_or_else(|| market.url());
            let mut target = UsageTarget::new(&url, token, &usage_api);
            target.wait = Duration::from_secs(opts.usage_wait_secs.max(1));
            target
        });
        run
    });
    let Some(run) = run else {
        say("serving until Ctrl-C or SIGTERM".into());
        shutdown.await;
        market.stop().await;
        return Ok(true);
    };
    let report = tokio::select! {
        report = run_scenarios(&run) => report,
        _ = shutdown => Err(SimulateError::Interrupted),
    };
    let stats = market.stats();
    let usage = market.usage_stats();
    market.stop().await;
    let report = report?;
    say(format!(
        "order query API: {} requests ({} answered, {} unknown orders, {} refused 401, {} failed on purpose)",
        stats.requests, stats.found, stats.not_found, stats.unauthorized, stats.failed_on_purpose
    ));
    if usage.calls > 0 {
        say(format!(
            "usage API: {} calls ({} taken, {} refused 401, {} refused 400, {} failed on purpose, {} answered late), {} records, {} duplicate receipts",
            usage.calls,
            usage.taken_calls,
            usage.unauthorized_calls,
            usage.refused_calls,
            usage.failed_calls,
            usage.delayed_answers,
            usage.records,
            usage.duplicates
        ));
    }
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", report.table());
    }
    if !report.ok() {
        eprintln!("koogate simulate: {}; protocol violations:", report.summary());
        for line in report.violation_lines() {
            eprintln!("  {line}");
        }
    }
    Ok(report.ok())
}
