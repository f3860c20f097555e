//! `koogate simulate`: KooGallery's side of the wire, for local runs, tests,
//! demos and the benchmark.
//!
//! - [`market`]: the order query API (`GET …/order/query`) on loopback,
//!   verifying API Gateway AK/SK signatures as Huawei does, answering from
//!   an [`OrderBook`]; it can fail on purpose and counts what it was asked.
//! - [`orders`]: the order book: KooGallery's nine mock orders and the
//!   scenario orders (also `fixtures/orders.json`), or a JSON file.
//! - [`scenario`]: named call sequences (purchase, renewal, freeze, upgrade,
//!   release, trial, probes, retries; V2 and V1) with expected result codes.
//! - [`driver`]: calls a gateway as KooGallery does, retries what KooGallery
//!   retries, checks every answer; [`report`]: what it saw.
//!
//! ```no_run
//! # async fn demo() -> Result<(), koogate::simulate::SimulateError> {
//! use koogate::simulate::{run_scenarios, GatewayTarget, MarketConfig, MarketServer, RunOptions};
//! let market = MarketServer::start(MarketConfig::new("127.0.0.1:0".parse().unwrap())).await?;
//! // start the gateway with KOOGATE_MARKETPLACE_URL = market.url(), then:
//! let report = run_scenarios(&RunOptions::new(GatewayTarget::new("http://127.0.0.1:8080", "access-key"))).await?;
//! println!("{}", report.summary());
//! market.stop().await;
//! # Ok(()) }
//! ```

pub mod driver;
pub mod market;
pub mod orders;
pub mod report;
pub mod scenario;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use driver::{run_scenarios, select, GatewayTarget, RetryPolicy, RunOptions};
pub use market::{MarketConfig, MarketServer, MarketStats};
pub use orders::OrderBook;
pub use report::{CallRecord, Report, ScenarioReport};
pub use scenario::{Scenario, NAMES as SCENARIOS};

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
}

/// Runs `koogate simulate`. `Ok(false)`: a scenario saw a protocol violation
/// (the command exits non-zero).
pub async fn command(opts: CliOptions, shutdown: impl Future<Output = ()>) -> Result<bool, SimulateError> {
    if opts.list {
        for s in Scenario::all("RLIST") {
            println!("{:<30} {} calls: {}", s.name, s.steps.len(), s.about);
        }
        return Ok(true);
    }
    let book = match &opts.orders {
        Some(path) => OrderBook::load(path)?,
        None => OrderBook::generated(),
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
    let say = |line: String| if opts.json { eprintln!("{line}") } else { println!("{line}") };
    let orders = book.len();
    let sk_hint = if opts.sk.expose() == market::DEFAULT_SK { market::DEFAULT_SK } else { "<your --sk>" };
    let config = MarketConfig {
        listen: opts.listen,
        ak: opts.ak.clone(),
        sk: opts.sk.clone(),
        book,
        fail_share: opts.fail_share,
    };
    let market = MarketServer::start(config).await?;
    say(format!("order query API on {} ({orders} orders); point the gateway at it with:", market.url()));
    say(format!(
        "  KOOGATE_MARKETPLACE_URL={} KOOGATE_MARKETPLACE_AK={} KOOGATE_MARKETPLACE_SK={sk_hint}",
        market.url(),
        opts.ak
    ));
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
    market.stop().await;
    let report = report?;
    say(format!(
        "order query API: {} requests ({} answered, {} unknown orders, {} refused 401, {} failed on purpose)",
        stats.requests, stats.found, stats.not_found, stats.unauthorized, stats.failed_on_purpose
    ));
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
