//! The `koogate` binary: a thin command line over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use koogate::client::KooClient;
use koogate::config::{Config, LogFormat};

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
    Serve,
    /// Check the configuration and exit.
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
}

#[derive(Args)]
struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: SocketAddr,
    /// The `whsec_…` secret the gateway signs with.
    #[arg(long, env = "KOOGATE_BILLING_SECRET", hide_env_values = true)]
    secret: String,
    /// Append accepted events to this JSONL file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Share of requests to fail on purpose (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    fail_share: f64,
    /// HTTP status of the failures.
    #[arg(long, default_value_t = 500)]
    fail_status: u16,
    /// Answer only after this many milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Allowed age of webhook-timestamp, seconds.
    #[arg(long, default_value_t = 300)]
    tolerance_secs: i64,
}

#[derive(Args)]
struct ReplayArgs {
    /// Fixture files or directories (sorted by name); `-` reads one payload from stdin.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Base URL of the gateway, e.g. https://gw.example.com or http://127.0.0.1:8080.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The product's access key.
    #[arg(long, env = "KOOGATE_ACCESS_KEY", hide_env_values = true)]
    key: String,
    /// Send as V1 (query parameters) even outside a `v1` folder.
    #[arg(long)]
    v1: bool,
    #[arg(long, default_value = "/koogallery/v2")]
    v2_path: String,
    #[arg(long, default_value = "/koogallery/v1")]
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
}

#[derive(Args)]
struct SimulateArgs {
    /// Address of the simulated order query API (port 0: any free port).
    #[arg(long, default_value = koogate::simulate::market::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// JSON file of orders (a list or map of orderInfo objects); default: the mock and scenario orders.
    #[arg(long)]
    orders: Option<PathBuf>,
    /// Access key id callers of the order query API must sign with.
    #[arg(long, env = "KOOGATE_MARKETPLACE_AK", default_value = koogate::simulate::market::DEFAULT_AK)]
    ak: String,
    /// Secret key of --ak.
    #[arg(long, env = "KOOGATE_MARKETPLACE_SK", hide_env_values = true)]
    #[arg(default_value = koogate::simulate::market::DEFAULT_SK)]
    sk: String,
    /// Share of order queries answered HTTP 500 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    fail_share: f64,
    /// Base URL of a gateway to run the scenarios against, e.g. http://127.0.0.1:8080.
    #[arg(long, conflicts_with = "serve_only")]
    gateway: Option<String>,
    /// The product's access key (signs calls, checks Body-Sign, verifies usage pushes).
    #[arg(long, env = "KOOGATE_ACCESS_KEY", hide_env_values = true)]
    key: Option<String>,
    #[arg(long, default_value = "/koogallery/v2")]
    v2_path: String,
    #[arg(long, default_value = "/koogallery/v1")]
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
    /// Bearer token of the gateway's admin API.
    #[arg(long, env = "KOOGATE_ADMIN_TOKEN", hide_env_values = true)]
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
    /// List dead letters.
    List,
    /// Show one dead letter with its event (with --usage: any usage record by metering_sn).
    Show { id: String },
    /// Put dead letters back into the outbox (with --usage: push them to KooGallery again).
    Redrive {
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Event ids (with --usage: metering_sn).
        ids: Vec<String>,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KOOGATE_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
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

fn load_config(path: Option<&std::path::Path>) -> Config {
    match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("koogate: configuration error: {e}");
            std::process::exit(2);
        }
    }
}

async fn dlq(admin: AdminArgs, usage: bool, action: DlqAction) -> anyhow::Result<()> {
    let base = match admin.admin {
        Some(url) => url,
        None => format!("http://{}", std::env::var("KOOGATE_ADMIN_LISTEN").unwrap_or_else(|_| "127.0.0.1:9090".into())),
    };
    let token = match (std::env::var("KOOGATE_ADMIN_TOKEN"), std::env::var("KOOGATE_ADMIN_TOKEN_FILE")) {
        (Ok(t), _) => t,
        (Err(_), Ok(path)) => {
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?.trim().to_owned()
        }
        _ => bail!("KOOGATE_ADMIN_TOKEN (or KOOGATE_ADMIN_TOKEN_FILE) must be set to use the admin API"),
    };
    let client = KooClient::new(&base).with_timeout(Duration::from_secs(30));
    let auth = format!("Bearer {token}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let (list, show, redrive) = if usage {
        ("/v1/usage/dlq", "/v1/usage/records", "/v1/usage/dlq/redrive")
    } else {
        ("/v1/dlq", "/v1/dlq", "/v1/dlq/redrive")
    };
    let (method, path, body) = match &action {
        DlqAction::List => (hyper::Method::GET, list.to_owned(), String::new()),
        DlqAction::Show { id } => (hyper::Method::GET, format!("{show}/{id}"), String::new()),
        DlqAction::Redrive { all, ids } => {
            if !all && ids.is_empty() {
                bail!("give ids or --all");
            }
            (hyper::Method::POST, redrive.to_owned(), serde_json::json!({"all": all, "ids": ids}).to_string())
        }
    };
    let res =
        client.send(method, &path, &headers, body.into()).await.with_context(|| format!("cannot reach {base}"))?;
    let json: serde_json::Value =
        serde_json::from_slice(&res.body).context("the admin API answered something that is not JSON")?;
    if res.status >= 400 {
        bail!("admin API answered HTTP {}: {}", res.status, json["message"].as_str().unwrap_or(""));
    }
    match action {
        DlqAction::List if usage => {
            let letters = json["dead_letters"].as_array().cloned().unwrap_or_default();
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
            println!("{} dead usage record(s)", letters.len());
        }
        DlqAction::List => {
            let letters = json["dead_letters"].as_array().cloned().unwrap_or_default();
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
            println!("{} dead letter(s)", letters.len());
        }
        DlqAction::Show { .. } => println!("{}", serde_json::to_string_pretty(&json)?),
        DlqAction::Redrive { .. } => {
            let n = json["redriven"].as_array().map_or(0, Vec::len);
            println!("redriven: {n}");
            if let Some(missing) = json["missing"].as_array().filter(|m| !m.is_empty()) {
                println!("not in the dead-letter queue: {}", serde_json::to_string(missing)?);
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    use koogate::replay;
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
        replay::Target { url: args.url.clone(), v2_path: args.v2_path, v1_path: args.v1_path, access_key: args.key };
    let rows = replay::run(&client, &target, &fixtures, args.repeat, args.concurrency).await;
    print!("{}", replay::table(&rows));
    let ok = rows.iter().filter(|r| r.ok()).count();
    let signed = rows.iter().filter(|r| r.signature_ok).count();
    println!("{ok} of {} answers as expected; {signed} with a valid Body-Sign", rows.len());
    if let Some(verdict) = replay::verdict(&rows) {
        eprintln!("koogate replay: {verdict}");
        std::process::exit(1);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::InstanceId { order_id, order_line_id, product_id } => {
            let id = match product_id {
                Some(p) => koogate::store::keys::instance_id_for_item(&order_id, order_line_id.as_deref(), &p),
                None => koogate::store::keys::instance_id_for(&order_id, order_line_id.as_deref()),
            };
            println!("{id}");
            Ok(())
        }
        Command::CheckConfig => {
            load_config(cli.config.as_deref());
            println!("configuration is valid");
            Ok(())
        }
        Command::Serve => {
            let config = load_config(cli.config.as_deref());
            init_logs(config.log_format);
            let running = koogate::server::start(config).await.context("koogate could not start")?;
            running.wait(shutdown_signal()).await;
            Ok(())
        }
        Command::Sink(args) => {
            init_logs(LogFormat::Text);
            let sink = koogate::sink::start(koogate::sink::SinkConfig {
                listen: args.listen,
                secret: args.secret,
                out: args.out,
                fail_share: args.fail_share,
                fail_status: args.fail_status,
                delay: Duration::from_millis(args.delay_ms),
                tolerance_secs: args.tolerance_secs,
            })
            .await
            .context("the sink could not start")?;
            tracing::info!(addr = %sink.addr, "sink listening");
            shutdown_signal().await;
            sink.stop().await;
            Ok(())
        }
        Command::Dlq { admin, usage, action } => dlq(admin, usage, action).await,
        Command::Replay(args) => replay(args).await,
        Command::Simulate(a) => {
            init_logs(LogFormat::Text);
            let opts = koogate::simulate::CliOptions {
                listen: a.listen,
                orders: a.orders,
                ak: a.ak,
                sk: koogate::secret::Secret::new(a.sk),
                fail_share: a.fail_share,
                gateway: a.gateway,
                key: a.key.map(koogate::secret::Secret::new),
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
                admin_token: a.admin_token.map(koogate::secret::Secret::new),
                usage_wait_secs: a.usage_wait_secs,
                usage_api: a.usage_api,
            };
            if !koogate::simulate::command(opts, shutdown_signal()).await.context("koogate simulate")? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
