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
use crate::config::Target;
use crate::delivery;
use crate::delivery::enrich::Enricher;
use crate::delivery::jsonl::JsonlSink;
use crate::delivery::webhook::WebhookSink;
use crate::delivery::Sink;
use crate::gateway::Gateway;
use crate::http::{self, App};
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
    #[error("cannot start the delivery thread: {0}")]
    DeliveryThread(std::io::Error),
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

/// Runs the delivery worker on a thread of its own, with a one-thread Tokio
/// runtime: delivery catching up with a backlog gets one thread's share of
/// the machine beside the call path's runtime, and its bursts of work
/// (building, signing and sending events) do not queue on the threads that
/// answer calls. A task of the main runtime waits for it, so stopping waits
/// for delivery's grace period as before.
fn spawn_delivery(
    tasks: &mut JoinSet<()>,
    worker: delivery::Worker,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), StartError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("koogate-delivery")
        .build()
        .map_err(StartError::DeliveryThread)?;
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("koogate-delivery".into())
        .spawn(move || {
            runtime.block_on(worker.run(shutdown, grace));
            let _ = done.send(());
        })
        .map_err(StartError::DeliveryThread)?;
    tasks.spawn(async move {
        let _ = finished.await;
    });
    Ok(())
}

/// Opens the store, binds the listeners and starts serving. Each component gets its part of `config`.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let Config { listener, admin, store, gateway, delivery, marketplace, usage, log: _, warnings } = config;
    crate::metrics::install();
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    let store_config = store;
    let store = store::open(&store_config.spec, &store_config.key_prefix, delivery.retention).await?;
    tracing::info!(backend = store.backend(), "store opened");
    crate::metrics::store_opened(store.backend());
    if gateway.frontend_url_is_default() {
        tracing::warn!(
            "KOOGATE_FRONTEND_URL is not set: newInstance answers carry the placeholder {}",
            gateway.settings.frontend_url
        );
    }
    let sku_map = gateway.settings.sku_map.clone();
    let access_key = gateway.keys.current().clone();
    let app = Arc::new(App {
        gateway: Gateway::new(gateway.keys, Arc::clone(&store), gateway.settings),
        routes: listener.routes,
        inflight: Semaphore::new(listener.max_inflight),
        draining: AtomicBool::new(false),
    });

    let (koogallery, addr) = bind(listener.addr, "KOOGATE_LISTEN").await?;
    let (admin_listener, admin_addr) = bind(admin.addr, "KOOGATE_ADMIN_LISTEN").await?;
    let limits = listener.limits;
    let grace = limits.shutdown_grace;

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let tls = match &listener.tls {
        Some(files) => Some(crate::tls::acceptor(&files.cert, &files.key)?),
        None => None,
    };
    tracing::info!(
        tls = tls.is_some(),
        "KooGallery listener {}",
        if tls.is_some() { "terminates TLS" } else { "speaks plain HTTP (terminate TLS in front)" }
    );
    tasks.spawn(http::serve_tls(koogallery, tls, limits, shutdown.clone(), http::koogallery_handler(Arc::clone(&app))));
    if admin.token.is_none() {
        tracing::info!("KOOGATE_ADMIN_TOKEN is not set: the admin API is off (/metrics and /healthz stay on)");
    }
    let admin_api =
        Arc::new(Admin { store: Arc::clone(&store), token: admin.token, enrichment: marketplace.is_some() });
    tasks.spawn(http::serve(admin_listener, limits, shutdown.clone(), move |req| {
        let admin_api = Arc::clone(&admin_api);
        async move { admin_api.route(req).await }
    }));

    let sink = build_sink(&delivery.sink)?;
    let enricher = match &marketplace {
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
            Some(Enricher { api, store: Arc::clone(&store), sku_map, cache_ttl: m.cache_ttl })
        }
        None => {
            tracing::warn!("KOOGATE_MARKETPLACE_AK/SK are not set: V2 events go out with only what the call carried (\"enriched\": false: no buyer account id, SKU or card count)");
            None
        }
    };
    let delivery_store =
        store::open_for_delivery(&store_config.spec, &store_config.key_prefix, delivery.retention, &store).await?;
    let worker = delivery::Worker::new(delivery_store, sink, delivery.worker, enricher);
    spawn_delivery(&mut tasks, worker, shutdown.clone(), grace)?;
    let hosts: Vec<String> = std::iter::once(&usage.url)
        .chain(&usage.fallback_urls)
        .filter_map(|u| reqwest::Url::parse(u).ok())
        .map(|u| crate::marketplace::host_label(&u))
        .collect();
    crate::metrics::marketplace_hosts(&hosts);
    if usage.push {
        tracing::info!(url = %usage.url, "usage push is on ({}): accepted usage records are pushed to KooGallery", usage.push_reason);
        let mut api = crate::marketplace::usage::UsageApi::with_fallbacks(
            &usage.url,
            &usage.fallback_urls,
            access_key,
            usage.timeout,
        )
        .map_err(StartError::UsageApi)?;
        if let Some((ak, sk)) = usage.apig {
            api = api.with_apig(ak, sk);
        }
        let pusher = crate::metering::push::Pusher::new(Arc::clone(&store), api, usage.pusher);
        tasks.spawn(pusher.run(shutdown.clone(), grace));
    } else {
        tracing::info!(
            "usage push is off ({}): usage records are accepted and kept, not pushed (set KOOGATE_USAGE_PUSH=true to push)",
            usage.push_reason
        );
    }
    tasks.spawn(watch_readiness(Arc::clone(&store), shutdown.clone()));
    tracing::info!(%addr, v2 = %app.routes.v2_path, v1 = %app.routes.v1_path, %admin_addr, "koogate is listening");
    Ok(Running { addr, admin_addr, store, app, shutdown, tasks })
}

/// Where events go: the one place that chooses the delivery [`Sink`] (a new
/// target is one arm here; see `delivery::sink`).
fn build_sink(target: &Target) -> Result<Arc<dyn Sink>, StartError> {
    Ok(match &target.billing {
        Some(billing) => {
            let key = crate::delivery::webhook::key_of(billing.secret.expose()).map_err(StartError::BillingSecret)?;
            tracing::info!(url = %billing.url, "events are delivered to the billing core");
            let sink = WebhookSink::new(billing.url.clone(), key, target.attempt_timeout)
                .map_err(StartError::BillingClient)?;
            Arc::new(sink)
        }
        None => {
            let path = target.data_dir.join("events.jsonl");
            tracing::info!(path = %path.display(), "KOOGATE_BILLING_URL is not set: events are appended to a JSONL file");
            Arc::new(JsonlSink::start(path))
        }
    })
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
