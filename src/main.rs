//! The `koogate` binary: a thin command line over the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::InstanceId { order_id, order_line_id }) = &cli.command {
        println!("{}", koogate::store::keys::instance_id_for(order_id, order_line_id.as_deref()));
        return Ok(());
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("koogate: configuration error: {e}");
            std::process::exit(2);
        }
    };
    init_logs(config.log_format);
    match cli.command.unwrap_or(Command::Serve) {
        Command::InstanceId { .. } => Ok(()),
        Command::CheckConfig => {
            println!("configuration is valid");
            Ok(())
        }
        Command::Serve => {
            let running = koogate::server::start(config).await.context("koogate could not start")?;
            running.wait(shutdown_signal()).await;
            Ok(())
        }
    }
}
