//! Wiring: config → store → gateway → listeners and background tasks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::config::Config;
use crate::delivery;
use crate::delivery::enrich::Enricher;
use crate::delivery::Target;
use crate::gateway::{Gateway, Settings};
use crate::http::{self, App, ListenerLimits};
use crate::store::{self, StoreError};

/// Why the gateway did not start: one line naming the setting and the fix. Each message carries its
/// cause as text (`{0}`), so none is also a `source` (a cause printed once, not once per layer).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("KOOGATE_STORE: cannot open the store: {0} (fix the URL, or start the store it names)")]
    Store(StoreError),
    #[error("KOOGATE_STORE: the store did not answer a ping within {} s", .0.as_secs())]
    StoreSilent(Duration),
    #[error("{setting}: cannot listen on {addr}: {kind} (stop what listens there, or choose another address)")]
    Listen { setting: &'static str, addr: SocketAddr, kind: std::io::ErrorKind },
    #[error("{0} (fix the file, or unset KOOGATE_TLS_CERT and KOOGATE_TLS_KEY)")]
    Tls(crate::tls::TlsError),
    #[error("KOOGATE_BILLING_SECRET: {0}")]
    BillingSecret(crate::delivery::webhook::SignatureError),
    #[error("KOOGATE_BILLING_URL: cannot build the HTTP client: {0}")]
    BillingClient(reqwest::Error),
    #[error("KOOGATE_BILLING_URL: cannot reach {url}: {problem} (start the billing core, or fix the URL)")]
    BillingUnreachable { url: String, problem: String },
    #[error("KOOGATE_MARKETPLACE_URL: {0}")]
    OrderApi(crate::marketplace::order::OrderError),
    #[error("KOOGATE_MARKETPLACE_URL: {0}")]
    UsageApi(String),
}

impl From<StoreError> for StartError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<crate::tls::TlsError> for StartError {
    fn from(e: crate::tls::TlsError) -> Self {
        Self::Tls(e)
    }
}

/// Binds a listener, naming its setting when that fails (the port is in use, the address is not this host's).
async fn bind(addr: SocketAddr, setting: &'static str) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let fail = |e: std::io::Error| StartError::Listen { setting, addr, kind: e.kind() };
    let listener = http::bind(addr, setting).await.map_err(fail)?;
    let local = listener.local_addr().map_err(fail)?;
    Ok((listener, local))
}

/// A running gateway.
pub struct Running {
    /// Where the KooGallery listener listens (useful with port 0).
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub store: Arc<dyn store::Store>,
    app: Arc<App>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    /// Stops accepting, lets in-flight calls finish (grace period), stops the forwarder.
    pub async fn stop(mut self) {
        self.app.draining.store(true, Ordering::Relaxed);
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Waits until a task ends on its own (it should not) or `shutdown` fires.
    pub async fn wait(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = shutdown => tracing::info!("shutting down: no new calls, finishing in-flight ones"),
            _ = self.tasks.join_next() => tracing::error!("a listener stopped unexpectedly"),
        }
        self.stop().await;
    }
}

/// Opens the store, binds the listeners and starts serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    crate::metrics::install();
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let store = store::open(&config.store, &config.key_prefix).await?;
    tracing::info!(backend = store.backend(), "store opened");
    crate::metrics::store_opened(store.backend());
    if config.frontend_url_is_default {
        tracing::warn!(
            "KOOGATE_FRONTEND_URL is not set: newInstance answers carry the placeholder https://frontend.invalid/"
        );
    }

    let settings = Settings {
        window_secs: config.timestamp_skew_secs,
        v1_window_secs: config.v1_timestamp_skew_secs,
        frontend_url: config.frontend_url.clone(),
        admin_url: config.admin_url.clone(),
        encrypt_type: config.encrypt_type,
        issue_credentials: config.issue_credentials,
        sku_map: config.sku_map.clone(),
        store_timeout: config.store_timeout,
    };
    let app = Arc::new(App {
        gateway: Gateway::new(config.access_keys.clone(), Arc::clone(&store), settings),
        v2_path: config.v2_path.clone(),
        v1_path: config.v1_path.clone(),
        max_body_bytes: config.max_body_bytes,
        body_timeout: config.body_timeout,
        inflight: Semaphore::new(config.max_inflight),
        draining: AtomicBool::new(false),
    });

    let (listener, addr) = bind(config.listen, "KOOGATE_LISTEN").await?;
    let (admin, admin_addr) = bind(config.admin_listen, "KOOGATE_ADMIN_LISTEN").await?;
    let limits = ListenerLimits {
        max_connections: config.max_connections,
        header_timeout: config.request_timeout,
        max_conns_per_peer: config.max_conns_per_peer,
        shutdown_grace: config.shutdown_grace,
    };

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let tls = match &config.tls {
        Some((cert, key)) => Some(crate::tls::acceptor(cert, key)?),
        None => None,
    };
    tracing::info!(
        tls = tls.is_some(),
        "KooGallery listener {}",
        if tls.is_some() { "terminates TLS" } else { "speaks plain HTTP (terminate TLS in front)" }
    );
    tasks.spawn(http::serve_tls(listener, tls, limits, shutdown.clone(), http::koogallery_handler(Arc::clone(&app))));
    let admin_api = Arc::new(Admin {
        store: Arc::clone(&store),
        token: config.admin_token.clone(),
        enrichment: config.marketplace.is_some(),
    });
    if config.admin_token.is_none() {
        tracing::info!("KOOGATE_ADMIN_TOKEN is not set: the admin API is off (/metrics and /healthz stay on)");
    }
    tasks.spawn(http::serve(admin, limits, shutdown.clone(), move |req| {
        let admin_api = Arc::clone(&admin_api);
        async move { admin_api.route(req).await }
    }));

    let target = match (&config.billing_url, &config.billing_secret) {
        (Some(url), Some(secret)) => {
            let key = crate::delivery::webhook::key_of(secret.expose()).map_err(StartError::BillingSecret)?;
            tracing::info!(url = %url, "events are delivered to the billing core");
            Target::Http { url: url.clone(), key }
        }
        _ => {
            let path = config.data_dir.join("events.jsonl");
            tracing::info!(path = %path.display(), "KOOGATE_BILLING_URL is not set: events are appended to a JSONL file");
            Target::Jsonl(path)
        }
    };
    let enricher = match &config.marketplace {
        Some(m) => {
            let api = crate::marketplace::order::OrderApi::with_fallbacks(
                &m.url,
                &m.fallback_urls,
                m.ak.clone(),
                m.sk.clone(),
                m.timeout,
            )
            .map_err(StartError::OrderApi)?;
            tracing::info!(url = %m.url, "V2 purchase, upgrade and order-notify events are completed from KooGallery's order query API before delivery");
            Some(Enricher { api, store: Arc::clone(&store), sku_map: config.sku_map.clone(), cache_ttl: m.cache_ttl })
        }
        None => {
            tracing::warn!("KOOGATE_MARKETPLACE_AK/SK are not set: V2 events go out with only what the call carried (\"enriched\": false: no buyer account id, SKU or card count)");
            None
        }
    };
    let worker = delivery::Worker::new(
        Arc::clone(&store),
        delivery::Settings {
            target,
            forward_test: config.forward_test_events,
            attempt_timeout: config.delivery_timeout,
            schedule: config.retry,
            visibility: config.delivery_visibility,
            concurrency: config.delivery_concurrency,
            order_wait: config.delivery_order_wait,
        },
        enricher,
    )
    .map_err(StartError::BillingClient)?;
    tasks.spawn(worker.run(shutdown.clone(), config.shutdown_grace));
    let hosts: Vec<String> = std::iter::once(&config.usage.url)
        .chain(&config.usage.fallback_urls)
        .filter_map(|u| reqwest::Url::parse(u).ok())
        .map(|u| crate::marketplace::host_label(&u))
        .collect();
    crate::metrics::marketplace_hosts(&hosts);
    if config.usage.push {
        tracing::info!(url = %config.usage.url, "usage push is on ({}): accepted usage records are pushed to KooGallery", config.usage.push_reason);
        let mut api = crate::marketplace::usage::UsageApi::with_fallbacks(
            &config.usage.url,
            &config.usage.fallback_urls,
            config.access_keys.current().clone(),
            config.usage.timeout,
        )
        .map_err(StartError::UsageApi)?;
        if let Some((ak, sk)) = &config.usage.apig {
            api = api.with_apig(ak.clone(), sk.clone());
        }
        let pusher = crate::metering::push::Pusher::new(
            Arc::clone(&store),
            api,
            crate::metering::push::Settings {
                batch: config.usage.batch,
                lease: config.usage.lease,
                hold: config.usage.hold,
                poll: config.usage.poll,
                schedule: config.retry,
            },
        );
        tasks.spawn(pusher.run(shutdown.clone(), config.shutdown_grace));
    } else {
        tracing::info!(
            "usage push is off ({}): usage records are accepted and kept, not pushed (set KOOGATE_USAGE_PUSH=true to push)",
            config.usage.push_reason
        );
    }
    tasks.spawn(watch_readiness(Arc::clone(&store), shutdown.clone()));
    tracing::info!(%addr, v2 = %config.v2_path, v1 = %config.v1_path, %admin_addr, "koogate is listening");
    Ok(Running { addr, admin_addr, store, app, shutdown, tasks })
}

/// Keeps `koogate_ready` current for alerting (1 = the store answers).
async fn watch_readiness(store: Arc<dyn store::Store>, shutdown: CancellationToken) {
    loop {
        let ok = matches!(tokio::time::timeout(std::time::Duration::from_secs(2), store.ping()).await, Ok(Ok(())));
        crate::metrics::ready(ok);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
    }
}
