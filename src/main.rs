//! The `koogate` binary: a thin command line over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};
use koogate::config::{self, Config, ConfigError, LogFormat, Source};
use koogate::server::StartError;
use koogate::tools::client::KooClient;

/// jemalloc instead of glibc's malloc (feature `jemalloc`, on by default):
/// measured with `koogate-bench`, about a fifth less CPU per call, and with
/// the settings built in from `.cargo/config.toml` (background purging, dirty
/// pages returned after 1 s) less RSS after a burst (docs/operations.md,
/// "Memory"). mimalloc was measured too and kept more RSS than glibc.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "koogate", version, about = "KooGallery SaaS callback gateway")]
struct Cli {
    /// TOML file with settings (environment variables override it).
    #[arg(long, global = true, env = "KOOGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    #[command(after_help = koogate::config::settings_help())]
    Serve,
    /// Check the configuration as `serve` would (store reachable, billing URL reachable, TLS files) and exit.
    CheckConfig,
    /// Print the instance id an order line gets (the same on every replica, forever).
    InstanceId {
        order_id: String,
        /// V2 order line id; omit for a V1 order.
        order_line_id: Option<String>,
        /// Product id of a pay-per-use billing item (chargingMode 0 or 5): one instance per item.
        #[arg(long)]
        product_id: Option<String>,
    },
    /// Run the reference billing-core sink (verifies Standard Webhooks signatures, dedups, appends JSONL).
    Sink(SinkArgs),
    /// Send fixture payloads to a gateway, signed as KooGallery signs them, and check every answer.
    Replay(ReplayArgs),
    /// Simulate KooGallery: serve its order query and usage APIs and run call scenarios against a gateway.
    Simulate(Box<SimulateArgs>),
    /// Inspect and redrive dead-lettered events (or, with --usage, usage records) through a running gateway's admin API.
    Dlq {
        #[command(flatten)]
        admin: AdminArgs,
        /// The usage dead-letter list: usage records KooGallery refused (ids are metering_sn).
        #[arg(long, global = true)]
        usage: bool,
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Look up events (pending, dead and delivered, with their attempts) through a running gateway's admin API (`koogate dlq redrive --since` recovers dead ones).
    Events {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: EventsAction,
    },
    /// Account settlement binding: what a Huawei Cloud account holds, through a running gateway's admin API.
    Accounts {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: AccountsAction,
    },
    /// Look up an instance (resource id) through a running gateway's admin API.
    Instances {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: InstancesAction,
    },
    /// Print a shell completion script, e.g. `koogate completions bash > /etc/bash_completion.d/koogate`.
    Completions {
        /// bash, zsh or fish (also elvish, powershell).
        shell: clap_complete::Shell,
    },
}

impl Command {
    /// A verb that prints its answer and exits, as opposed to a long-running
    /// server (`serve`, `sink`), whose writes to a closed pipe must stay
    /// errors it handles rather than end the process.
    fn prints_for_a_reader(&self) -> bool {
        !matches!(self, Command::Serve | Command::Sink(_))
    }
}

#[derive(Subcommand)]
enum AccountsAction {
    /// The instances a Huawei Cloud account holds, newest first, with their status and usage.
    Show {
        /// The Huawei Cloud account ID (KooGallery's customerId).
        customer_id: String,
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Instances per page (1-500).
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// Skip this many (newest first).
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Does the account hold an active subscription (that instance, when named)? Exit 1 when not.
    Verify {
        customer_id: String,
        /// Check this instance (resource id) only.
        instance_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum EventsAction {
    /// Events matching every filter given: pending first, then dead letters, then delivered ones (newest first).
    List {
        /// Only events of this instance (resource id).
        #[arg(long)]
        instance: Option<String>,
        /// Only events of this order.
        #[arg(long)]
        order: Option<String>,
        /// Only events of the instances this Huawei Cloud account holds.
        #[arg(long)]
        customer: Option<String>,
        /// pending, dead or delivered.
        #[arg(long)]
        status: Option<String>,
        /// From this time on (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Up to this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// At most this many (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One event: its status, the event itself and every delivery attempt.
    Show { id: String },
}

#[derive(Subcommand)]
enum InstancesAction {
    /// One instance (the "Resource ID" a customer sees): its account, status, order lines, usage and events.
    Show {
        instance_id: String,
        /// Print the admin API's JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// An instance's usage records: how many are pending, pushed, held and dead, totals, the newest ones.
    Usage {
        instance_id: String,
        /// How many of the newest records to list (1-1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print the admin API's JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: SocketAddr,
    /// The `whsec_…` secret the gateway signs with (default: KOOGATE_BILLING_SECRET, also from --config).
    #[arg(long)]
    secret: Option<String>,
    /// Append accepted events to this JSONL file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Share of requests to fail on purpose (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    fail_share: f64,
    /// HTTP status of the failures.
    #[arg(long, default_value_t = koogate::tools::sink::FAIL_STATUS)]
    fail_status: u16,
    /// Answer only after this many milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Allowed age of webhook-timestamp, seconds.
    #[arg(long, default_value_t = koogate::tools::sink::TOLERANCE_SECS)]
    tolerance_secs: i64,
    /// Most recent accepted events GET /events shows (older ones are only in --out; every id stays deduplicated).
    #[arg(long, default_value_t = koogate::tools::sink::KEEP_EVENTS)]
    keep_events: usize,
}

#[derive(Args)]
struct ReplayArgs {
    /// Fixture files or directories (sorted by name); `-` reads one payload from stdin.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Base URL of the gateway, e.g. https://gw.example.com or http://127.0.0.1:8080.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The product's access key (default: KOOGATE_ACCESS_KEY, also from --config).
    #[arg(long)]
    key: Option<String>,
    /// Send as V1 (query parameters) even outside a `v1` folder.
    #[arg(long)]
    v1: bool,
    #[arg(long, default_value = config::V2_PATH.about.default_text())]
    v2_path: String,
    #[arg(long, default_value = config::V1_PATH.about.default_text())]
    v1_path: String,
    /// Send each fixture this many times (KooGallery retrying: watch the dedup).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Repeats in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Expected result code of every answer (default: expect.toml beside the fixture, else 000000).
    #[arg(long)]
    expect: Option<String>,
    /// PEM file of a CA to trust besides the system's (staging certificates).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Per-call timeout, seconds (KooGallery waits 5).
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
    /// Print only the summary line (and the verdict), not the table.
    #[arg(long, conflicts_with = "json")]
    quiet: bool,
    /// Print the answers and the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SimulateArgs {
    /// Address of the simulated order query API (port 0: any free port).
    #[arg(long, default_value = koogate::tools::simulate::market::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// JSON file of orders (a list or map of orderInfo objects); default: the mock and scenario orders.
    #[arg(long)]
    orders: Option<PathBuf>,
    /// Access key id callers of the order query API must sign with
    /// (default: KOOGATE_MARKETPLACE_AK, also from --config, else sim-ak).
    #[arg(long)]
    ak: Option<String>,
    /// Secret key of --ak (default: KOOGATE_MARKETPLACE_SK, also from --config, else sim-sk).
    #[arg(long)]
    sk: Option<String>,
    /// Share of order queries answered HTTP 500 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    fail_share: f64,
    /// Base URL of a gateway to run the scenarios against, e.g. http://127.0.0.1:8080.
    #[arg(long, conflicts_with = "serve_only")]
    gateway: Option<String>,
    /// The product's access key (signs calls, checks Body-Sign, verifies usage pushes;
    /// default: KOOGATE_ACCESS_KEY, also from --config).
    #[arg(long)]
    key: Option<String>,
    #[arg(long, default_value = config::V2_PATH.about.default_text())]
    v2_path: String,
    #[arg(long, default_value = config::V1_PATH.about.default_text())]
    v1_path: String,
    /// Run only this scenario (repeatable); default: all.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Retries of a call that got no answer, a non-200 status or 000005.
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// Wait before the first retry, milliseconds (doubling after).
    #[arg(long, default_value_t = 200)]
    retry_ms: u64,
    /// Per-attempt timeout, seconds (KooGallery waits 5).
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
    /// Suffix of this run's order ids (default: random).
    #[arg(long)]
    run_id: Option<String>,
    /// Only serve the order query and usage APIs until Ctrl-C/SIGTERM.
    #[arg(long)]
    serve_only: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Share of usage API calls answered HTTP 500, storing nothing (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    usage_fail_share: f64,
    /// Answer usage API calls this late after storing their records (a shorter push timeout loses the answer).
    #[arg(long, default_value_t = 0)]
    usage_delay_ms: u64,
    /// Share of usage API calls answered late (with --usage-delay-ms; 0.0 to 1.0).
    #[arg(long, default_value_t = 1.0)]
    usage_delay_share: f64,
    /// Instance id the usage API does not know: a push naming it is refused (repeatable).
    #[arg(long = "refuse-instance")]
    refuse_instances: Vec<String>,
    /// Base URL of the gateway's admin listener, e.g. http://127.0.0.1:9090 (the usage scenario posts usage there).
    #[arg(long)]
    admin: Option<String>,
    /// Bearer token of the gateway's admin API (default: KOOGATE_ADMIN_TOKEN, also from --config).
    #[arg(long)]
    admin_token: Option<String>,
    /// Longest wait for the usage API to receive every record of the usage scenario, seconds.
    #[arg(long, default_value_t = 30)]
    usage_wait_secs: u64,
    /// Base URL of the simulator the gateway pushes usage to, when it is not this one
    /// (e.g. a `koogate simulate --serve-only` at http://127.0.0.1:9300).
    #[arg(long)]
    usage_api: Option<String>,
}

#[derive(Args)]
struct AdminArgs {
    /// Base URL of the gateway's admin listener (default: http://$KOOGATE_ADMIN_LISTEN).
    #[arg(long, global = true)]
    admin: Option<String>,
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters, oldest first, a page at a time.
    List {
        /// Dead letters per page.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Page to show (1 = the oldest).
        #[arg(long, default_value_t = 1)]
        page: usize,
    },
    /// Show one dead letter with its event (with --usage: any usage record by metering_sn).
    Show { id: String },
    /// Put dead letters back into the outbox (with --usage: push them to KooGallery again).
    Redrive {
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["ids", "since"])]
        all: bool,
        /// Every dead letter that died at or after this RFC 3339 time (`POST /v1/events/recover`; not with --usage).
        #[arg(long, conflicts_with = "ids")]
        since: Option<String>,
        /// Event ids (with --usage: metering_sn).
        ids: Vec<String>,
    },
}

/// Lines the log writer holds before it drops new ones: 1.5 s of calls at the
/// benchmark's peak. Its queue is allocated and touched whole at start-up
/// (32 bytes a line: tracing-appender's default of 128,000 cost 4 MiB of RSS).
const LOG_BUFFER_LINES: usize = 16_384;

/// Logs to stderr; colour only when stderr is a terminal.
///
/// Lines are formatted on the caller's thread and written to stderr by a
/// writer thread (tracing-appender's non-blocking writer), so a call never
/// waits for a `write(2)` to stderr. When stderr cannot keep up and
/// [`LOG_BUFFER_LINES`] lines are waiting, new lines are dropped rather than
/// making calls wait (lossy), and counted in `koogate_log_lines_dropped_total`.
/// Keep the returned guard until the end: dropping it writes out the lines
/// still waiting (a graceful stop loses none).
fn init_logs(log: &config::Log) -> tracing_appender::non_blocking::WorkerGuard {
    let filter =
        tracing_subscriber::EnvFilter::try_new(&log.filter).unwrap_or_else(|_| config::LOG.about.default_text().into());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .lossy(true)
        .thread_name("koogate-log-writer")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    koogate::metrics::log_dropped_lines_from(move || dropped.dropped_lines() as u64);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    match log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}

/// Text logs for the tools (sink, simulate), with a `KOOGATE_LOG` checked like the gateway's.
fn tool_log(src: &Source) -> Result<config::Log, ConfigError> {
    Ok(config::Log { format: LogFormat::Text, filter: src.value(&config::LOG)? })
}

/// `check-config`: everything `serve` would fail on, without serving.
async fn check_config(config: &Config) -> anyhow::Result<()> {
    for warning in &config.warnings {
        eprintln!("koogate: warning: {warning}");
    }
    let store = koogate::store::open(&config.store.spec, &config.store.key_prefix, config.delivery.retention)
        .await
        .map_err(StartError::Store)?;
    let patience = Duration::from_secs(5);
    tokio::time::timeout(patience, store.ping())
        .await
        .map_err(|_| StartError::StoreSilent(patience))?
        .map_err(StartError::Store)?;
    println!("store: {} answers", store.backend());
    drop(store);
    if let Some(files) = &config.listener.tls {
        koogate::tls::acceptor(&files.cert, &files.key).map_err(StartError::Tls)?;
        println!("tls: certificate and key load");
    }
    if let Some(url) = config.delivery.sink.billing.as_ref().map(|b| &b.url) {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
        // Any HTTP answer will do: the event POSTs are signed, a bare HEAD is only to see that it answers.
        let res = client
            .head(url.clone())
            .send()
            .await
            .map_err(|e| StartError::BillingUnreachable { url: url.to_string(), problem: error_text(&e) })?;
        println!("billing core: {url} answers (HTTP {})", res.status().as_u16());
    }
    for (setting, addr) in
        [(config::LISTEN.about.name, config.listener.addr), (config::ADMIN_LISTEN.about.name, config.admin.addr)]
    {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            // A running gateway holds it: not an error of the configuration, but `serve` would stop on it now.
            eprintln!(
                "koogate: warning: {setting}: {addr} cannot be listened on now: {}",
                std::io::Error::from(e.kind())
            );
        }
    }
    Ok(())
}

/// The chain of an error on one line, each cause once (a cause already in its parent's text is not repeated).
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text.replace('\n', " ")
}

/// A running gateway's admin API, as the CLI verbs reach it.
struct AdminApi {
    base: String,
    client: KooClient,
    auth: String,
}

impl AdminApi {
    /// `--admin` (else `http://$KOOGATE_ADMIN_LISTEN`) and `KOOGATE_ADMIN_TOKEN` (environment or `--config`).
    fn connect(admin: &AdminArgs, src: &Source, timeout: Duration) -> anyhow::Result<Self> {
        let base = match &admin.admin {
            Some(url) => url.clone(),
            None => format!("http://{}", src.text(&config::ADMIN_LISTEN)?.unwrap_or_default()),
        };
        let token = match src.optional(&config::ADMIN_TOKEN)? {
            Some(t) => t.expose().trim().to_owned(),
            None => bail!("KOOGATE_ADMIN_TOKEN: must be set (or KOOGATE_ADMIN_TOKEN_FILE, in the environment or --config) to use the admin API"),
        };
        let client = KooClient::new(&base).with_timeout(timeout);
        Ok(Self { base, client, auth: format!("Bearer {token}") })
    }

    /// Sends a request; the answer's HTTP status and JSON body.
    async fn send(&self, method: hyper::Method, path: &str, body: String) -> anyhow::Result<(u16, serde_json::Value)> {
        let headers = [("authorization", self.auth.as_str()), ("content-type", "application/json")];
        let res = self
            .client
            .send(method, path, &headers, body.into())
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let json = serde_json::from_slice(&res.body).context("the admin API answered something that is not JSON")?;
        Ok((res.status, json))
    }
}

async fn dlq(admin: AdminArgs, usage: bool, action: DlqAction, src: &Source) -> anyhow::Result<ExitCode> {
    // A redrive of many ids is one request that may take a while: the store moves them one by one.
    let timeout = if matches!(action, DlqAction::Redrive { .. }) { 600 } else { 30 };
    let api = AdminApi::connect(&admin, src, Duration::from_secs(timeout))?;
    let (list, show, redrive) = if usage {
        ("/v1/usage/dlq", "/v1/usage/records", "/v1/usage/dlq/redrive")
    } else {
        ("/v1/dlq", "/v1/dlq", "/v1/dlq/redrive")
    };
    let (method, path, body) = match &action {
        DlqAction::List { .. } => (hyper::Method::GET, list.to_owned(), String::new()),
        DlqAction::Show { id } => (hyper::Method::GET, format!("{show}/{id}"), String::new()),
        DlqAction::Redrive { since: Some(since), .. } => {
            if usage {
                bail!("--since recovers dead events; usage records are redriven by metering_sn or --all");
            }
            eprintln!("redriving every dead letter since {since} in one request…");
            let since: String = form_urlencoded::byte_serialize(since.as_bytes()).collect();
            (hyper::Method::POST, format!("/v1/events/recover?since={since}"), String::new())
        }
        DlqAction::Redrive { all, ids, since: None } => {
            if !all && ids.is_empty() {
                bail!("give ids, --all or --since");
            }
            let what = if *all { "every dead letter".to_owned() } else { format!("{} id(s)", ids.len()) };
            eprintln!("redriving {what} in one request…");
            (hyper::Method::POST, redrive.to_owned(), serde_json::json!({"all": all, "ids": ids}).to_string())
        }
    };
    let (status, json) = api.send(method, &path, body).await?;
    if status >= 400 {
        bail!("admin API answered HTTP {status}: {}", json["message"].as_str().unwrap_or(""));
    }
    match action {
        DlqAction::List { limit, page } if usage => {
            let all = sorted_letters(&json, "metering_sn");
            let letters = page_of(&all, limit, page);
            println!(
                "{:<40} {:<38} {:>14} {:<12} {:<24}  MESSAGE",
                "METERING SN", "INSTANCE", "VALUE", "CODE", "DEAD AT"
            );
            for d in &letters {
                let text = |k: &str| d[k].as_str().unwrap_or("").to_owned();
                println!(
                    "{:<40} {:<38} {:>14} {:<12} {:<24}  {}",
                    text("metering_sn"),
                    text("instance_id"),
                    text("usage_value"),
                    text("code"),
                    text("dead_at"),
                    text("message")
                );
            }
            println!("{}", page_footer("dead usage record(s)", all.len(), limit, page));
        }
        DlqAction::List { limit, page } => {
            let all = sorted_letters(&json, "id");
            let letters = page_of(&all, limit, page);
            println!("{:<56} {:<32} {:>8}  {:<24}  LAST ERROR", "EVENT ID", "TYPE", "ATTEMPTS", "DEAD AT");
            for d in &letters {
                println!(
                    "{:<56} {:<32} {:>8}  {:<24}  {}",
                    d["id"].as_str().unwrap_or(""),
                    d["type"].as_str().unwrap_or(""),
                    d["attempts"],
                    d["dead_at"].as_str().unwrap_or(""),
                    d["last_error"].as_str().unwrap_or("")
                );
            }
            println!("{}", page_footer("dead letter(s)", all.len(), limit, page));
        }
        DlqAction::Show { .. } => println!("{}", serde_json::to_string_pretty(&json)?),
        DlqAction::Redrive { .. } => {
            let n = json["redriven"].as_array().map_or(0, Vec::len);
            let missing = json["missing"].as_array().map_or(0, Vec::len);
            if n == 0 && missing == 0 {
                println!("nothing to redrive");
                return Ok(ExitCode::SUCCESS);
            }
            println!("redriven: {n}");
            if let Some(missing) = json["missing"].as_array().filter(|m| !m.is_empty()) {
                println!("not in the dead-letter queue: {}", serde_json::to_string(missing)?);
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Dead letters by when they died (oldest first), then id.
/// A text field of an admin API answer, `-` when absent.
fn text(v: &serde_json::Value) -> String {
    v.as_str().map_or_else(|| if v.is_null() { "-".to_owned() } else { v.to_string() }, str::to_owned)
}

/// One instance as a table row: resource id, status, charging mode, SKU, created, pushed and unpushed usage.
fn instance_row(i: &serde_json::Value) -> String {
    format!(
        "{:<38} {:<9} {:<14} {:<28} {:<25} {:>12} {:>12}",
        text(&i["instance_id"]),
        text(&i["status"]),
        text(&i["charging_mode"]),
        text(&i["sku_code"]),
        text(&i["created_at"]),
        text(&i["usage"]["pushed"]),
        text(&i["usage"]["unpushed"]),
    )
}

const INSTANCE_HEADER: &str = "RESOURCE ID (INSTANCE)                 STATUS    CHARGING       SKU                          CREATED                         PUSHED     UNPUSHED";

async fn accounts(api: AdminApi, action: AccountsAction) -> anyhow::Result<ExitCode> {
    match action {
        AccountsAction::Show { customer_id, json, limit, offset } => {
            let path = format!("/v1/accounts/{}?offset={offset}&limit={limit}", encode_segment(&customer_id));
            let (status, view) = api.send(hyper::Method::GET, &path, String::new()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else if status == 200 {
                let shown = view["instances"].as_array().cloned().unwrap_or_default();
                println!("account {customer_id}: {} instance(s)", view["total"]);
                println!("{INSTANCE_HEADER}");
                for i in &shown {
                    println!("{}", instance_row(i));
                }
                if let Some(next) = view["next_offset"].as_u64() {
                    println!("more: --offset {next}");
                }
            }
            if let Some(note) = view["enrichment_note"].as_str() {
                eprintln!("{note}");
            }
            if status >= 400 {
                eprintln!("koogate accounts: HTTP {status}: {}", text(&view["message"]));
                return Ok(ExitCode::from(1));
            }
        }
        AccountsAction::Verify { customer_id, instance_id, json } => {
            let path = format!("/v1/accounts/{}/verify", encode_segment(&customer_id));
            let body = serde_json::json!({ "instance_id": instance_id }).to_string();
            let (status, verdict) = api.send(hyper::Method::POST, &path, body).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&verdict)?);
            } else if status == 200 {
                let ids: Vec<String> =
                    verdict["instances"].as_array().into_iter().flatten().map(|i| text(&i["instance_id"])).collect();
                println!("active: account {customer_id} holds {}", ids.join(", "));
            } else {
                println!("not active ({}): {}", text(&verdict["error"]), text(&verdict["message"]));
            }
            if status != 200 {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn instance(api: AdminApi, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let (status, view) =
        api.send(hyper::Method::GET, &format!("/v1/instances/{}", encode_segment(id)), String::new()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else if status == 200 {
        println!("{INSTANCE_HEADER}\n{}", instance_row(&view));
        let account = match view["account"]["customer_id"].as_str() {
            Some(c) => format!("{c} ({})", text(&view["account"]["customer_name"])),
            None if view["account_pending"] == true => "not known yet (order query pending)".to_owned(),
            None if view["account_note"].is_string() => format!("unknown: {}", text(&view["account_note"])),
            None => "-".to_owned(),
        };
        println!("account:     {account}");
        for line in view["order_lines"].as_array().into_iter().flatten() {
            println!("order line:  {} {}", text(&line["order_id"]), text(&line["order_line_id"]));
        }
        for item in view["usage"]["items"].as_array().into_iter().flatten() {
            let which = item["related_instance_id"].as_str().map_or("own".to_owned(), |p| format!("package {p}"));
            println!(
                "usage:       {which}: pushed {} (until {}), unpushed {}",
                text(&item["pushed"]),
                text(&item["pushed_until"]),
                text(&item["unpushed"])
            );
        }
        let events: Vec<String> = view["event_ids"].as_array().into_iter().flatten().map(text).collect();
        println!("events:      {}", events.join(" "));
    }
    if status >= 400 {
        eprintln!("koogate instances: HTTP {status}: {}", text(&view["message"]));
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn instance_usage(api: AdminApi, id: &str, limit: u32, json: bool) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/usage/instances/{}?limit={limit}", encode_segment(id));
    let (status, view) = api.send(hyper::Method::GET, &path, String::new()).await?;
    if status >= 400 {
        eprintln!("koogate instances usage: HTTP {status}: {}", text(&view["message"]));
        return Ok(ExitCode::from(1));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(ExitCode::SUCCESS);
    }
    let counts = &view["counts"];
    println!(
        "records:  {} ({} counted): pending {}, held {}, pushed {}, dead {}",
        view["total"], view["counted"], counts["pending"], counts["held"], counts["pushed"], counts["dead"]
    );
    println!("usage:    accepted {}, pushed {}", text(&view["totals"]["accepted"]), text(&view["totals"]["pushed"]));
    println!("{:<40} {:<18} {:<18} {:>14} {:<8}  ACCEPTED AT", "METERING SN", "BEGIN", "END", "VALUE", "STATUS");
    for r in view["records"].as_array().into_iter().flatten() {
        println!(
            "{:<40} {:<18} {:<18} {:>14} {:<8}  {}",
            text(&r["metering_sn"]),
            text(&r["begin_time"]),
            text(&r["end_time"]),
            text(&r["usage_value"]),
            text(&r["status"]),
            text(&r["accepted_at"])
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn events(api: AdminApi, action: EventsAction) -> anyhow::Result<ExitCode> {
    let (method, path) = match &action {
        EventsAction::List { instance, order, customer, status, since, until, limit, .. } => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            let filters = [
                ("instance_id", instance),
                ("order_id", order),
                ("customer_id", customer),
                ("status", status),
                ("since", since),
                ("until", until),
            ];
            for (name, value) in filters {
                if let Some(value) = value {
                    query.append_pair(name, value);
                }
            }
            query.append_pair("limit", &limit.to_string());
            (hyper::Method::GET, format!("/v1/events?{}", query.finish()))
        }
        EventsAction::Show { id } => (hyper::Method::GET, format!("/v1/events/{}", encode_segment(id))),
    };
    let (status, json) = api.send(method, &path, String::new()).await?;
    if status >= 400 {
        eprintln!("koogate events: HTTP {status}: {}", text(&json["message"]));
        return Ok(ExitCode::from(1));
    }
    match action {
        EventsAction::List { json: false, .. } => {
            let events = json["events"].as_array().cloned().unwrap_or_default();
            println!("{:<56} {:<28} {:<9} {:>8}  {:<24}  LAST ERROR", "EVENT ID", "TYPE", "STATUS", "ATTEMPTS", "AT");
            for e in &events {
                let at = [&e["delivered_at"], &e["dead_at"], &e["occurred_at"]]
                    .into_iter()
                    .find(|v| v.is_string())
                    .map_or_else(|| "-".to_owned(), text);
                println!(
                    "{:<56} {:<28} {:<9} {:>8}  {:<24}  {}",
                    text(&e["id"]),
                    text(&e["type"]),
                    text(&e["status"]),
                    e["attempts"],
                    at,
                    text(&e["last_error"])
                );
            }
            println!("{} event(s)", events.len());
        }
        EventsAction::List { json: true, .. } | EventsAction::Show { .. } => {
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A path segment, percent-encoded (ids are caller-controlled).
fn encode_segment(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

fn sorted_letters(json: &serde_json::Value, id: &str) -> Vec<serde_json::Value> {
    let mut letters = json["dead_letters"].as_array().cloned().unwrap_or_default();
    letters.sort_by(|a, b| {
        let key = |d: &serde_json::Value| (d["dead_at"].to_string(), d[id].to_string());
        key(a).cmp(&key(b))
    });
    letters
}

fn page_of(all: &[serde_json::Value], limit: usize, page: usize) -> Vec<serde_json::Value> {
    all.iter().skip(limit.saturating_mul(page.saturating_sub(1))).take(limit).cloned().collect()
}

fn page_footer(what: &str, total: usize, limit: usize, page: usize) -> String {
    let first = limit.saturating_mul(page.saturating_sub(1));
    let shown = total.saturating_sub(first).min(limit);
    let mut text = if shown == 0 {
        format!("{total} {what}")
    } else {
        format!("{total} {what}; showing {}-{}", first + 1, first + shown)
    };
    if first + shown < total {
        text.push_str(&format!(" (--page {} for more)", page + 1));
    }
    text
}

async fn replay(args: ReplayArgs, src: &Source) -> anyhow::Result<ExitCode> {
    use koogate::tools::replay;
    let key = match args.key.clone() {
        Some(k) => k,
        None => match src.optional(&config::ACCESS_KEY)? {
            Some(k) => k.expose().to_owned(),
            None => bail!("KOOGATE_ACCESS_KEY: give --key, or set it in the environment or --config"),
        },
    };
    let mut fixtures = Vec::new();
    let files: Vec<PathBuf> = args.paths.iter().filter(|p| p.as_os_str() != "-").cloned().collect();
    if args.paths.iter().any(|p| p.as_os_str() == "-") {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).context("cannot read stdin")?;
        let generation = if args.v1 { koogate::protocol::Generation::V1 } else { koogate::protocol::Generation::V2 };
        let expect = args.expect.clone().unwrap_or_else(|| "000000".into());
        fixtures.push(replay::Fixture { name: "<stdin>".into(), generation, bytes, expect });
    }
    if !files.is_empty() {
        fixtures.extend(replay::load(&files, args.v1, args.expect.as_deref())?);
    }
    let client = match &args.ca_cert {
        Some(path) => {
            let pem = std::fs::read(path).with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
            KooClient::with_ca(&args.url, &pem)?
        }
        None => KooClient::new(&args.url),
    }
    .with_timeout(Duration::from_secs(args.timeout_secs));
    let target =
        replay::Target { url: args.url.clone(), v2_path: args.v2_path, v1_path: args.v1_path, access_key: key };
    // A live progress line only on a terminal, and only when the table is wanted after it.
    let live = std::io::stderr().is_terminal() && !args.quiet && !args.json;
    let rows = replay::run_with_progress(&client, &target, &fixtures, args.repeat, args.concurrency, |done, total| {
        if live && total > 20 {
            eprint!("\r{done}/{total} answers");
            if done == total {
                eprint!("\r\x1b[K");
            }
        }
    })
    .await;
    let ok = rows.iter().filter(|r| r.ok()).count();
    let signed = rows.iter().filter(|r| r.signature_ok).count();
    if args.json {
        let out = serde_json::json!({
            "answers": rows.iter().map(replay::row_json).collect::<Vec<_>>(),
            "as_expected": ok,
            "signed": signed,
            "total": rows.len(),
            "verdict": replay::verdict(&rows),
        });
        println!("{out}");
    } else {
        if !args.quiet {
            print!("{}", replay::table(&rows));
        }
        println!("{ok} of {} answers as expected; {signed} with a valid Body-Sign", rows.len());
    }
    if let Some(verdict) = replay::verdict(&rows) {
        eprintln!("koogate replay: {verdict}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.as_ref().is_some_and(Command::prints_for_a_reader) {
        // Rust ignores SIGPIPE, so a closed stdout panics `println!` ("Broken
        // pipe"); a verb that prints for a reader ends on it instead, as `ls` does.
        sigpipe::reset();
    }
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // One line, no backtrace (even with RUST_BACKTRACE=1): these are the operator's errors.
            eprintln!("koogate: {}", error_text(e.as_ref()));
            let user_error = e.downcast_ref::<ConfigError>().is_some() || e.downcast_ref::<StartError>().is_some();
            ExitCode::from(if user_error { 2 } else { 1 })
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config_file = cli.config.as_deref();
    match cli.command.unwrap_or(Command::Serve) {
        Command::InstanceId { order_id, order_line_id, product_id } => {
            let id = match product_id {
                Some(p) => koogate::store::keys::instance_id_for_item(&order_id, order_line_id.as_deref(), &p),
                None => koogate::store::keys::instance_id_for(&order_id, order_line_id.as_deref()),
            };
            println!("{id}");
        }
        Command::CheckConfig => {
            let config = Config::load(config_file)?;
            check_config(&config).await?;
            println!("configuration is valid");
        }
        Command::Serve => {
            let config = Config::load(config_file)?;
            let _log_writer = init_logs(&config.log);
            let running = koogate::server::start(config).await?;
            running.wait(shutdown_signal()).await;
        }
        Command::Sink(args) => {
            let src = Source::load(config_file)?;
            let _log_writer = init_logs(&tool_log(&src)?);
            let secret = match args.secret {
                Some(s) => s,
                None => match src.optional(&config::BILLING_SECRET)? {
                    Some(s) => s.expose().to_owned(),
                    None => bail!("KOOGATE_BILLING_SECRET: give --secret, or set it in the environment or --config"),
                },
            };
            let sink = koogate::tools::sink::start(koogate::tools::sink::SinkConfig {
                listen: args.listen,
                secret,
                out: args.out,
                fail_share: args.fail_share,
                fail_status: args.fail_status,
                delay: Duration::from_millis(args.delay_ms),
                tolerance_secs: args.tolerance_secs,
                keep_events: args.keep_events,
            })
            .await
            .context("the sink could not start")?;
            tracing::info!(addr = %sink.addr, "sink listening");
            shutdown_signal().await;
            sink.stop().await;
        }
        Command::Dlq { admin, usage, action } => {
            let src = Source::load(config_file)?;
            return dlq(admin, usage, action, &src).await;
        }
        Command::Events { admin, action } => {
            let src = Source::load(config_file)?;
            return events(AdminApi::connect(&admin, &src, Duration::from_secs(30))?, action).await;
        }
        Command::Accounts { admin, action } => {
            let src = Source::load(config_file)?;
            return accounts(AdminApi::connect(&admin, &src, Duration::from_secs(30))?, action).await;
        }
        Command::Instances { admin, action } => {
            let src = Source::load(config_file)?;
            let api = AdminApi::connect(&admin, &src, Duration::from_secs(30))?;
            return match action {
                InstancesAction::Show { instance_id, json } => instance(api, &instance_id, json).await,
                InstancesAction::Usage { instance_id, limit, json } => {
                    instance_usage(api, &instance_id, limit, json).await
                }
            };
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "koogate", &mut std::io::stdout());
        }
        Command::Replay(args) => {
            let src = Source::load(config_file)?;
            return replay(args, &src).await;
        }
        Command::Simulate(a) => {
            let src = Source::load(config_file)?;
            let _log_writer = init_logs(&tool_log(&src)?);
            let from = |given: Option<String>,
                        setting: &config::Setting<koogate::secret::Secret>|
             -> Result<Option<String>, ConfigError> {
                Ok(match given {
                    Some(v) => Some(v),
                    None => src.optional(setting)?.map(|s| s.expose().to_owned()),
                })
            };
            let ak = from(a.ak, &config::MARKETPLACE_AK)?
                .unwrap_or_else(|| koogate::tools::simulate::market::DEFAULT_AK.to_owned());
            let sk = from(a.sk, &config::MARKETPLACE_SK)?
                .unwrap_or_else(|| koogate::tools::simulate::market::DEFAULT_SK.to_owned());
            let opts = koogate::tools::simulate::CliOptions {
                listen: a.listen,
                orders: a.orders,
                ak,
                sk: koogate::secret::Secret::new(sk),
                fail_share: a.fail_share,
                gateway: a.gateway,
                key: from(a.key, &config::ACCESS_KEY)?.map(koogate::secret::Secret::new),
                v2_path: a.v2_path,
                v1_path: a.v1_path,
                scenarios: a.scenarios,
                retries: a.retries,
                retry_ms: a.retry_ms,
                timeout_secs: a.timeout_secs,
                run_id: a.run_id,
                serve_only: a.serve_only,
                json: a.json,
                list: a.list,
                usage_fail_share: a.usage_fail_share,
                usage_delay: Duration::from_millis(a.usage_delay_ms),
                usage_delay_share: a.usage_delay_share,
                refuse_instances: a.refuse_instances,
                admin: a.admin,
                admin_token: from(a.admin_token, &config::ADMIN_TOKEN)?.map(koogate::secret::Secret::new),
                usage_wait_secs: a.usage_wait_secs,
                usage_api: a.usage_api,
            };
            if !koogate::tools::simulate::command(opts, shutdown_signal()).await.context("koogate simulate")? {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
