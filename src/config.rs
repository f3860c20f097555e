//! Configuration: environment variables, optionally over a TOML file.
//!
//! Every setting has one name: `KOOGATE_<NAME>` in the environment, `<name>`
//! (lowercase) in the `--config` file; the environment wins. A bad or missing
//! value stops start-up with one sentence naming the variable.
//!
//! **The table** (`settings!` below) declares each setting once: the part of koogate that reads it
//! ([`Component`]), what an unset setting means ([`Unset`]: a default value, nothing, or required), the
//! parser of its values, and its meaning. A default lives only there: the parser reads the declared
//! default string when the setting is unset, and a unit test parses every declared default.
//! [`SETTINGS`] lists the table (docs/settings.md's table and `koogate serve --help` are checked against it).
//!
//! **Per component**: [`Config`] is one struct per component ([`Listener`], [`AdminListener`],
//! [`StoreConfig`], [`GatewayConfig`], [`Delivery`], [`Marketplace`], [`Usage`], [`Log`]), each handed
//! whole to what uses it. Where a component has its own settings struct (`gateway::Settings`,
//! `metering::push::Settings`, `http::Routes`, `http::ListenerLimits`), config builds that struct.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backoff::Schedule;
use crate::events::SkuMap;
use crate::http::{ListenerLimits, Routes};
use crate::protocol::crypto::EncryptType;
use crate::protocol::verify::AccessKeys;
use crate::secret::Secret;
use crate::store::StoreSpec;

/// Which part of koogate reads a setting (and which field of [`Config`] holds it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// [`Config::listener`]: the KooGallery listener, its TLS, paths and limits.
    Listener,
    /// [`Config::gateway`]: keys, time windows and answers of the protocol.
    Gateway,
    /// [`Config::store`].
    Store,
    /// [`Config::delivery`]: events to the billing core, and the retry schedule.
    Delivery,
    /// [`Config::admin`]: the admin listener and API.
    Admin,
    /// [`Config::marketplace`]: KooGallery's open API (order query).
    Marketplace,
    /// [`Config::usage`]: the usage push.
    Usage,
    /// [`Config::log`].
    Logging,
    /// The command line (`--config`); read by clap, not by [`Config`].
    CommandLine,
}

/// What an unset setting means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unset {
    /// This value, parsed as if it had been given.
    Value(&'static str),
    /// No value; the text (shown as the default) says what that means.
    Absent(&'static str),
    /// Start-up stops.
    Required,
}

/// One setting as documented: its name, component, default and meaning.
#[derive(Clone, Copy, Debug)]
pub struct About {
    pub name: &'static str,
    pub component: Component,
    pub unset: Unset,
    pub help: &'static str,
}

impl About {
    /// The default as docs and `--help` show it.
    pub const fn default_text(&self) -> &'static str {
        match self.unset {
            Unset::Value(v) | Unset::Absent(v) => v,
            Unset::Required => "(required)",
        }
    }

    /// The key in the `--config` file: the name without `KOOGATE_`, lowercase.
    pub fn file_key(&self) -> String {
        self.name.trim_start_matches("KOOGATE_").to_ascii_lowercase()
    }
}

/// A setting: what it is ([`About`]) and how a value of it is read.
pub struct Setting<T: 'static> {
    pub about: About,
    parse: fn(&str, &About) -> Result<T, String>,
}

/// A setting of any type, as [`SETTINGS`] lists it.
pub trait Declared: Sync {
    fn about(&self) -> &About;
    /// A secret: it may instead be given as a file named by `<NAME>_FILE`.
    fn is_secret(&self) -> bool;
    /// Parses the declared default (a bad default in the table fails a test, not a start-up).
    fn check_default(&self) -> Result<(), String>;
}

impl<T: 'static> Declared for Setting<T> {
    fn about(&self) -> &About {
        &self.about
    }
    fn is_secret(&self) -> bool {
        std::any::TypeId::of::<T>() == std::any::TypeId::of::<Secret>()
    }
    fn check_default(&self) -> Result<(), String> {
        match self.about.unset {
            Unset::Value(v) => (self.parse)(v, &self.about).map(drop),
            Unset::Absent(_) | Unset::Required => Ok(()),
        }
    }
}

/// Declares each setting as a `Setting` constant and lists them all in [`SETTINGS`].
macro_rules! settings {
    ($( $(#[$doc:meta])* $name:ident: $ty:ty = $component:ident, $unset:expr, $parse:expr, $help:expr; )*) => {
        $(
            $(#[$doc])*
            pub const $name: Setting<$ty> = Setting {
                about: About {
                    name: concat!("KOOGATE_", stringify!($name)),
                    component: Component::$component,
                    unset: $unset,
                    help: $help,
                },
                parse: $parse,
            };
        )*
        /// Every setting, in the order docs and `--help` show them.
        pub const SETTINGS: &[&dyn Declared] = &[$(&$name),*];
    };
}

use Unset::{Absent, Required, Value};

settings! {
    // name: type of a value = component, when unset, parser, meaning;
    LISTEN: SocketAddr = Listener, Value("0.0.0.0:8080"), socket_addr, "address of the KooGallery listener";
    TLS_CERT: PathBuf = Listener, Absent("(none: plain HTTP)"), file_path,
        "PEM certificate chain: serve KooGallery calls over TLS 1.2+";
    TLS_KEY: PathBuf = Listener, Absent("(none)"), file_path, "PEM private key of KOOGATE_TLS_CERT";
    ACCESS_KEY: Secret = Gateway, Required, secret, "KooGallery access key (or KOOGATE_ACCESS_KEY_FILE)";
    PREVIOUS_ACCESS_KEY: Secret = Gateway, Absent("(none)"), secret,
        "previous access key, still accepted during a rotation (or _FILE)";
    PREVIOUS_ACCESS_KEY_UNTIL: i64 = Gateway, Absent("(none: no end)"), rfc3339_ms,
        "RFC 3339 time the previous key stops being accepted";
    STORE: StoreSpec = Store, Value("./data"), store_spec,
        "redis://…, redis+cluster://…, or a directory for the embedded store";
    KEY_PREFIX: String = Store, Value("koogate:"), key_prefix, "prefix of every Redis key";
    DATA_DIR: PathBuf = Delivery, Absent("the store directory, else ./data"), file_path,
        "where events.jsonl is written";
    BILLING_URL: reqwest::Url = Delivery, Absent("(none)"), http_url, "billing core endpoint for events";
    BILLING_SECRET: Secret = Delivery, Absent("(none)"), secret, "whsec_… signing secret for events (or _FILE)";
    DELIVERY_TIMEOUT_SECS: Duration = Delivery, Value("10"), secs,
        "per-attempt timeout of a delivery to the billing core";
    RETRY_INITIAL_MS: Duration = Delivery, Value("5000"), millis,
        "largest delay before the first retry (doubling, full jitter)";
    RETRY_MAX_MS: Duration = Delivery, Value("3600000"), millis, "largest delay between retries";
    RETRY_MAX_ATTEMPTS: u32 = Delivery, Value("40"), attempts, "attempts before an event is dead-lettered";
    RETRY_GIVE_UP_SECS: Duration = Delivery, Value("86400"), secs,
        "time after the first attempt when an event is dead-lettered";
    DELIVERY_VISIBILITY_SECS: Duration = Delivery, Value("30"), secs,
        "a claimed event not finished by then is taken over by another replica";
    DELIVERY_CONCURRENCY: usize = Delivery, Value("32"), count, "deliveries in flight at once (one per instance)";
    DELIVERY_ORDER_WAIT_SECS: Duration = Delivery, Value("300"), secs,
        "longest wait for an instance's earlier event before sending anyway";
    ADMIN_LISTEN: SocketAddr = Admin, Value("127.0.0.1:9090"), socket_addr,
        "address of the admin listener (/metrics, admin API)";
    ADMIN_TOKEN: Secret = Admin, Absent("(none: admin API off)"), secret, "bearer token of the admin API (or _FILE)";
    TIMESTAMP_SKEW_SECS: u64 = Gateway, Value("60"), positive, "allowed clock difference of a V2 call's timestamp";
    /// 4 hours: Huawei documents no V1 window, and KooGallery retries a failed V1 subscription call for
    /// 3 hours (renewal and expiry calls for 1 hour); a retry may carry the first URL, so the window
    /// covers the longest retry period plus an hour of margin. Replays inside it are harmless:
    /// `authToken` is the V1 nonce and a repeat gets the first answer.
    V1_TIMESTAMP_SKEW_SECS: u64 = Gateway, Value("14400"), positive,
        "allowed age of a V1 call's timeStamp (V1 documents no window; KooGallery retries a purchase for 3 h with \
         the same URL: docs/conformance.md)";
    FRONTEND_URL: String = Gateway, Value("https://frontend.invalid/"), frontend_url,
        "appInfo.frontEndUrl answered to newInstance";
    ADMIN_URL: String = Gateway, Absent("(none)"), text, "appInfo.adminUrl answered to newInstance";
    SKU_MAP: SkuMap = Gateway, Absent("(none)"), sku_map, "TOML file mapping SKUs to settlement kinds";
    MARKETPLACE_URL: String = Marketplace, Value("https://mkt.myhuaweicloud.com"), marketplace_url,
        "KooGallery open API base URL (order query, usage push)";
    MARKETPLACE_AK: Secret = Marketplace, Absent("(none: no enrichment)"), secret,
        "Huawei Cloud access key ID for the order query API (or _FILE)";
    MARKETPLACE_SK: Secret = Marketplace, Absent("(none)"), secret, "Huawei Cloud secret access key (or _FILE)";
    MARKETPLACE_TIMEOUT_SECS: Duration = Marketplace, Value("5"), secs, "per-call timeout of the order query API";
    MARKETPLACE_FALLBACK_URLS: Vec<String> = Marketplace,
        Absent("(https://mkt.myhuaweicloud.cn behind the China and International sites, else none)"), url_list,
        "comma-separated base URLs tried in order when the marketplace host cannot be reached (none: no fallback)";
    ORDER_CACHE_SECS: Duration = Marketplace, Value("604800"), secs,
        "how long order query answers are cached in the store";
    USAGE_PUSH: bool = Usage, Absent("(on when KOOGATE_MARKETPLACE_URL or _AK/_SK are set)"), flag,
        "push accepted usage records to KooGallery (false: keep them until turned on)";
    USAGE_BATCH: usize = Usage, Value("1000"), usage_batch, "usage records per push call (at most 1000)";
    USAGE_TIMEOUT_MS: Duration = Usage, Value("10000"), millis, "per-call timeout of the usage push";
    USAGE_LEASE_SECS: Duration = Usage, Value("60"), secs,
        "a claimed usage record not settled by then is pushed again (same metering_sn)";
    USAGE_HOLD_SECS: Duration = Usage, Value("60"), secs, "how often usage of a frozen instance is looked at again";
    USAGE_POLL_MS: Duration = Usage, Value("1000"), millis, "pause of the usage push when nothing is due";
    USAGE_APIG_SIGN: bool = Usage, Value("true"), flag,
        "also sign usage pushes with API Gateway AK/SK signing when KOOGATE_MARKETPLACE_AK/SK are set";
    FORWARD_TEST_EVENTS: bool = Delivery, Value("false"), flag, "forward events of testFlag=1 calls too";
    EVENT_RETENTION_SECS: Duration = Delivery, Value("2592000"), retention_secs,
        "how long delivered events are kept with their attempts for the admin API (30 days; 0 = keep none)";
    V2_PATH: String = Listener, Value("/koogallery/v2"), absolute_path, "path of V2 calls (POST)";
    V1_PATH: String = Listener, Value("/koogallery/v1"), absolute_path, "path of V1 calls (GET)";
    MAX_BODY_BYTES: usize = Listener, Value("65536"), count, "largest accepted request body";
    ENCRYPT_TYPE: EncryptType = Gateway, Value("1"), encrypt_type, "encryptType of answers: 1 = AES-256, 2 = AES-128";
    ISSUE_CREDENTIALS: bool = Gateway, Value("false"), flag,
        "answer newInstance with an encrypted initial user name and password";
    MAX_CONNECTIONS: usize = Listener, Value("10000"), count, "open connections at most (more wait in the backlog)";
    MAX_INFLIGHT: usize = Listener, Value("1024"), count, "calls handled at once; more are answered 503/000005 at once";
    REQUEST_TIMEOUT_SECS: Duration = Listener, Value("10"), secs, "time to receive a request's headers";
    BODY_TIMEOUT_MS: Duration = Listener, Value("2000"), millis,
        "time to receive a V2 body, read before a call takes an in-flight slot; the connection is closed after it";
    MAX_CONNS_PER_PEER: usize = Listener, Value("256"), whole,
        "open connections per peer IP address (more are closed at once); 0 = no cap. Behind a load balancer that \
         presents few addresses, raise it or set 0";
    STORE_TIMEOUT_SECS: Duration = Gateway, Value("3"), secs, "longest wait for the store before answering 000005";
    SHUTDOWN_GRACE_SECS: Duration = Listener, Value("10"), secs, "time in-flight calls get to finish on SIGTERM";
    LOG_FORMAT: LogFormat = Logging, Value("text"), log_format, "text or json";
    LOG: String = Logging, Value("info"), log_filter,
        "log filter: a level, or comma-separated target=level directives (info,koogate=debug)";
    CONFIG: PathBuf = CommandLine, Absent("(none)"), file_path,
        "TOML file of settings, the same as --config (the environment wins)";
    MARKETPLACE_ALLOW_HTTP: bool = Marketplace, Value("false"), flag,
        "allow an http:// KOOGATE_MARKETPLACE_URL off loopback (signed traffic in clear)";
}

// The parsers of the table: a value (given, or the declared default) to its type, or what is wrong with it.

fn text(v: &str, _: &About) -> Result<String, String> {
    Ok(v.to_owned())
}

fn secret(v: &str, _: &About) -> Result<Secret, String> {
    Ok(Secret::new(v))
}

fn file_path(v: &str, _: &About) -> Result<PathBuf, String> {
    Ok(PathBuf::from(v))
}

fn whole(v: &str, _: &About) -> Result<usize, String> {
    v.trim().parse().map_err(|_| format!("{v:?} is not a whole number"))
}

fn positive(v: &str, _: &About) -> Result<u64, String> {
    let n: u64 = v.trim().parse().map_err(|_| format!("{v:?} is not a whole number"))?;
    if n == 0 {
        return Err("must be greater than 0".into());
    }
    Ok(n)
}

fn count(v: &str, about: &About) -> Result<usize, String> {
    usize::try_from(positive(v, about)?).map_err(|_| "is too large".into())
}

fn attempts(v: &str, about: &About) -> Result<u32, String> {
    u32::try_from(positive(v, about)?).map_err(|_| "is too large".into())
}

fn secs(v: &str, about: &About) -> Result<Duration, String> {
    positive(v, about).map(Duration::from_secs)
}

/// Seconds, 0 allowed, at most 10 years (times in ms stay far from overflowing).
fn retention_secs(v: &str, _: &About) -> Result<Duration, String> {
    let n: u64 = v.trim().parse().map_err(|_| format!("{v:?} is not a whole number"))?;
    if n > 315_360_000 {
        return Err("must be at most 315360000 (10 years)".into());
    }
    Ok(Duration::from_secs(n))
}

fn millis(v: &str, about: &About) -> Result<Duration, String> {
    positive(v, about).map(Duration::from_millis)
}

fn flag(v: &str, _: &About) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "false" | "0" | "no" | "off" => Ok(false),
        "true" | "1" | "yes" | "on" => Ok(true),
        v => Err(format!("{v:?} is not true or false")),
    }
}

fn socket_addr(v: &str, about: &About) -> Result<SocketAddr, String> {
    v.trim().parse().map_err(|_| format!("{v:?} is not a socket address such as {}", about.default_text()))
}

fn rfc3339_ms(v: &str, _: &About) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis())
        .map_err(|_| format!("{v:?} is not an RFC 3339 time"))
}

fn store_spec(v: &str, _: &About) -> Result<StoreSpec, String> {
    Ok(StoreSpec::parse(v))
}

fn key_prefix(v: &str, _: &About) -> Result<String, String> {
    if v.contains(['{', '}']) {
        return Err("must not contain { or } (they would break Redis Cluster hash tags)".into());
    }
    Ok(v.to_owned())
}

/// An `http://` or `https://` URL with a host: one a request can go to. The
/// parser itself refuses an http(s) URL without a host ("empty host").
fn http_url(v: &str, _: &About) -> Result<reqwest::Url, String> {
    let invalid = |problem: &str| format!("{v:?} is not a valid http:// or https:// URL ({problem})");
    let url = reqwest::Url::parse(v).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("not an http:// or https:// URL"));
    }
    Ok(url)
}

fn frontend_url(v: &str, _: &About) -> Result<String, String> {
    if v.chars().count() > 512 {
        return Err("is longer than 512 characters".into());
    }
    Ok(v.to_owned())
}

fn sku_map(v: &str, _: &About) -> Result<SkuMap, String> {
    SkuMap::load(Path::new(v)).map_err(|e| e.to_string())
}

fn marketplace_url(v: &str, _: &About) -> Result<String, String> {
    if !(v.starts_with("https://") || v.starts_with("http://")) {
        return Err(format!("{v:?} is not an https:// URL"));
    }
    Ok(v.to_owned())
}

/// Comma-separated URLs; `none` is the empty list.
fn url_list(v: &str, _: &About) -> Result<Vec<String>, String> {
    if v.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let urls: Vec<String> = v.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect();
    match urls
        .iter()
        .find(|u| !(u.starts_with("https://") || u.starts_with("http://")) || reqwest::Url::parse(u).is_err())
    {
        Some(bad) => Err(format!("{bad:?} is not an https:// URL")),
        None => Ok(urls),
    }
}

fn usage_batch(v: &str, about: &About) -> Result<usize, String> {
    let n = count(v, about)?;
    if n > crate::marketplace::usage::MAX_BATCH {
        return Err("must be at most 1000 (KooGallery's limit)".into());
    }
    Ok(n)
}

fn absolute_path(v: &str, _: &About) -> Result<String, String> {
    if !v.starts_with('/') || v.contains(['?', '#', ' ']) {
        return Err(format!("{v:?} is not an absolute path"));
    }
    Ok(v.to_owned())
}

fn encrypt_type(v: &str, _: &About) -> Result<EncryptType, String> {
    EncryptType::parse(v).ok_or_else(|| format!("{v:?} is not 1 or 2"))
}

fn log_format(v: &str, _: &About) -> Result<LogFormat, String> {
    match v {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        v => Err(format!("{v:?} is not text or json")),
    }
}

/// A `KOOGATE_LOG` filter: every directive is a level or `target=level`.
fn log_filter(filter: &str, _: &About) -> Result<String, String> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!("{directive:?} is not a level (off, error, warn, info, debug, trace) or target=level"));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| format!("{filter:?}: {e}"))?;
    Ok(filter.to_owned())
}

fn find(name: &str) -> Option<&'static dyn Declared> {
    SETTINGS.iter().copied().find(|s| s.about().name == name)
}

fn is_known(name: &str) -> bool {
    find(name).is_some() || name.strip_suffix("_FILE").and_then(find).is_some_and(|s| s.is_secret())
}

/// Every name a variable may have: the settings, and `<NAME>_FILE` of the secrets.
fn known_names() -> impl Iterator<Item = String> {
    SETTINGS.iter().flat_map(|s| {
        let name = s.about().name;
        std::iter::once(name.to_owned()).chain(s.is_secret().then(|| format!("{name}_FILE")))
    })
}

/// The known setting closest to a misspelt one, if any is close.
fn did_you_mean(name: &str) -> Option<String> {
    known_names()
        .map(|k| (strsim::levenshtein(name, &k), k))
        .filter(|(d, k)| *d <= 3 && *d * 4 < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// One warning per `KOOGATE_*` environment variable that is no setting, with the closest setting.
pub fn unknown_variables<'a>(names: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    names
        .into_iter()
        .filter(|n| n.starts_with("KOOGATE_") && !is_known(n))
        .map(|n| match did_you_mean(n) {
            Some(known) => format!("{n} is not a koogate setting and is ignored: did you mean {known}?"),
            None => format!("{n} is not a koogate setting and is ignored (`koogate serve --help` lists them)"),
        })
        .collect()
}

/// The settings table as `koogate serve --help` prints it.
pub fn settings_help() -> String {
    let mut out = String::from("Settings (environment, or lowercase without KOOGATE_ in the --config file):\n");
    for s in SETTINGS {
        let a = s.about();
        out.push_str(&format!("  {}\n      {} [default: {}]\n", a.name, a.help, a.default_text()));
    }
    out.push_str("Secrets (access keys, tokens, SK) may instead be given as a file path in <NAME>_FILE.");
    out
}

#[derive(Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    pub setting: String,
    pub problem: String,
}

fn problem(setting: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError { setting: setting.to_owned(), problem: problem.into() }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every setting of `serve`, one struct per component.
#[derive(Debug, Clone)]
pub struct Config {
    pub listener: Listener,
    pub admin: AdminListener,
    pub store: StoreConfig,
    pub gateway: GatewayConfig,
    pub delivery: Delivery,
    /// The order query API; `None` without `KOOGATE_MARKETPLACE_AK/SK` (no enrichment).
    pub marketplace: Option<Marketplace>,
    pub usage: Usage,
    pub log: Log,
    /// Said once at start-up (unknown `KOOGATE_*` variables).
    pub warnings: Vec<String>,
}

/// The KooGallery listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// Paths, body cap and body timeout of calls.
    pub routes: Routes,
    /// Calls handled at once.
    pub max_inflight: usize,
    /// Connections, header timeout, per-peer cap and shutdown grace (the admin listener has the same).
    pub limits: ListenerLimits,
}

/// Certificate chain and key files for TLS on the KooGallery listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The admin listener and API.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminListener {
    pub addr: SocketAddr,
    /// `None`: the admin API is off (`/metrics` and `/healthz` stay on).
    pub token: Option<Secret>,
}

/// Where state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub spec: StoreSpec,
    pub key_prefix: String,
}

/// What the gateway (the protocol) needs: the keys calls are signed with, and its settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub keys: AccessKeys,
    pub settings: crate::gateway::Settings,
}

impl GatewayConfig {
    /// `appInfo.frontEndUrl` is still the placeholder.
    pub fn frontend_url_is_default(&self) -> bool {
        Some(self.settings.frontend_url.as_str()) == value_of(&FRONTEND_URL)
    }
}

/// Delivery of events: where they go (the sink) and how the worker moves them.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub sink: Target,
    /// The delivery worker's settings, handed over whole.
    pub worker: crate::delivery::Settings,
    /// How long delivered events are kept (with their attempts) in the store's
    /// history; zero keeps none. Handed to the store when it is opened.
    pub retention: Duration,
}

/// Where events go: the billing core over HTTP when it is set, else
/// `<data_dir>/events.jsonl` (`server::build_sink` picks the sink).
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub billing: Option<Billing>,
    /// Where `events.jsonl` is written (without a billing core).
    pub data_dir: PathBuf,
    /// Per-attempt timeout of an HTTP delivery.
    pub attempt_timeout: Duration,
}

/// The billing core's endpoint and signing secret (`whsec_…`, checked).
#[derive(Debug, Clone, PartialEq)]
pub struct Billing {
    pub url: reqwest::Url,
    pub secret: Secret,
}

/// The usage push (protocol §10): where, how much at once, how often.
#[derive(Debug, Clone)]
pub struct Usage {
    /// Push at all (records are accepted either way).
    pub push: bool,
    /// Why `push` is what it is, for the start-up log line.
    pub push_reason: &'static str,
    /// Base URL of KooGallery's open API (`KOOGATE_MARKETPLACE_URL`).
    pub url: String,
    /// Tried in order when the host cannot be reached (`KOOGATE_MARKETPLACE_FALLBACK_URLS`).
    pub fallback_urls: Vec<String>,
    pub timeout: Duration,
    /// API Gateway AK/SK signing of every push (`KOOGATE_MARKETPLACE_AK/SK`, unless
    /// `KOOGATE_USAGE_APIG_SIGN=false`).
    pub apig: Option<(Secret, Secret)>,
    /// Batch, lease, hold, poll and retry schedule of the push worker.
    pub pusher: crate::metering::push::Settings,
}

/// The order query API's address and credentials.
#[derive(Debug, Clone, PartialEq)]
pub struct Marketplace {
    pub url: String,
    pub fallback_urls: Vec<String>,
    pub ak: Secret,
    pub sk: Secret,
    pub timeout: Duration,
    pub cache_ttl: Duration,
}

/// Log lines: format and filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub format: LogFormat,
    /// `KOOGATE_LOG`, checked.
    pub filter: String,
}

/// The declared default value of a setting, if it has one.
fn value_of<T>(setting: &Setting<T>) -> Option<&'static str> {
    match setting.about.unset {
        Unset::Value(v) => Some(v),
        Unset::Absent(_) | Unset::Required => None,
    }
}

/// Where values come from: the environment over the file. The verbs other than `serve`
/// (`dlq`, `replay`, `sink`, `simulate`) read their few settings through it, so `--config` counts for them too.
pub struct Source {
    env: BTreeMap<String, String>,
    file: BTreeMap<String, String>,
}

impl Source {
    /// The process environment over an optional `--config` file.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env = std::env::vars().filter(|(k, _)| k.starts_with("KOOGATE_")).collect();
        let file = match file {
            Some(path) => file_values(path)?,
            None => BTreeMap::new(),
        };
        Ok(Self { env, file })
    }

    /// A value given for `name` (environment, else file); empty counts as not given.
    fn given(&self, name: &str) -> Option<String> {
        let file_key = name.trim_start_matches("KOOGATE_").to_ascii_lowercase();
        self.env.get(name).or_else(|| self.file.get(&file_key)).filter(|v| !v.is_empty()).cloned()
    }

    /// The setting (or for a secret its `_FILE`) is given.
    pub fn is_set<T>(&self, setting: &Setting<T>) -> bool {
        let name = setting.about.name;
        self.given(name).is_some() || (setting.is_secret() && self.given(&format!("{name}_FILE")).is_some())
    }

    /// The value given, as text; a secret also as `<NAME>_FILE` (a path whose content is the value).
    fn given_text<T>(&self, setting: &Setting<T>) -> Result<Option<String>, ConfigError> {
        let name = setting.about.name;
        if !setting.is_secret() {
            return Ok(self.given(name));
        }
        let file_setting = format!("{name}_FILE");
        match (self.given(name), self.given(&file_setting)) {
            (Some(_), Some(_)) => Err(problem(name, format!("set either {name} or {file_setting}, not both"))),
            (Some(v), None) => Ok(Some(v)),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| problem(&file_setting, format!("cannot read {path}: {e}")))?;
                let value = text.trim_end_matches(['\n', '\r']).to_owned();
                if value.is_empty() {
                    return Err(problem(&file_setting, format!("{path} is empty")));
                }
                Ok(Some(value))
            }
            (None, None) => Ok(None),
        }
    }

    /// The value as text, unparsed: given, else the declared default.
    pub fn text<T>(&self, setting: &Setting<T>) -> Result<Option<String>, ConfigError> {
        Ok(self.given_text(setting)?.or_else(|| value_of(setting).map(str::to_owned)))
    }

    /// The value: given, else the declared default; an unset setting without one is required.
    pub fn value<T>(&self, setting: &Setting<T>) -> Result<T, ConfigError> {
        let about = &setting.about;
        let v = self.text(setting)?.ok_or_else(|| problem(about.name, "is required"))?;
        (setting.parse)(&v, about).map_err(|p| problem(about.name, p))
    }

    /// The value if given (settings without a default, or whose unset meaning is worked out from others).
    pub fn optional<T>(&self, setting: &Setting<T>) -> Result<Option<T>, ConfigError> {
        let about = &setting.about;
        self.given_text(setting)?.map(|v| (setting.parse)(&v, about).map_err(|p| problem(about.name, p))).transpose()
    }
}

fn file_values(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let setting = "--config";
    let text =
        std::fs::read_to_string(path).map_err(|e| problem(setting, format!("cannot read {}: {e}", path.display())))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let at = e.span().map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!(" at line {line}, column {column}")
        });
        problem(
            setting,
            format!(
                "{} is not valid TOML{}: {}",
                path.display(),
                at.unwrap_or_default(),
                e.message().trim_end().replace('\n', "; ")
            ),
        )
    })?;
    let known: Vec<String> = SETTINGS.iter().map(|s| s.about().file_key()).collect();
    let mut out = BTreeMap::new();
    for (key, value) in table {
        let base = key.trim_end_matches("_file");
        if key == "config" || !known.iter().any(|k| k == &key || k == base) {
            let hint = did_you_mean(&format!("KOOGATE_{}", key.to_ascii_uppercase()))
                .map(|k| format!(": did you mean {:?}?", k.trim_start_matches("KOOGATE_").to_ascii_lowercase()))
                .unwrap_or_default();
            return Err(problem(setting, format!("{} has an unknown key {key:?}{hint}", path.display())));
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(problem(
                    setting,
                    format!("key {key:?} must be a string, number or boolean, not {}", other.type_str()),
                ))
            }
        };
        out.insert(key, value);
    }
    Ok(out)
}

impl Config {
    /// Loads from the process environment and an optional file.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("KOOGATE_")).collect();
        let warnings = unknown_variables(env.keys());
        let mut config = Self::from_parts(env, file)?;
        config.warnings = warnings;
        Ok(config)
    }

    /// Loads from explicit environment values (tests).
    pub fn from_parts(env: BTreeMap<String, String>, file: Option<&Path>) -> Result<Self, ConfigError> {
        let file = match file {
            Some(path) => file_values(path)?,
            None => BTreeMap::new(),
        };
        let src = Source { env, file };
        let gateway = GatewayConfig::from_source(&src)?;
        let store = StoreConfig { spec: src.value(&STORE)?, key_prefix: src.value(&KEY_PREFIX)? };
        let delivery = Delivery::from_source(&src, &store.spec)?;
        let listener = Listener::from_source(&src)?;
        let log = Log::from_source(&src)?;
        let (marketplace, usage) = marketplace_and_usage(&src, delivery.worker.schedule)?;
        let admin = AdminListener { addr: src.value(&ADMIN_LISTEN)?, token: src.optional(&ADMIN_TOKEN)? };
        Ok(Self { listener, admin, store, gateway, delivery, marketplace, usage, log, warnings: Vec::new() })
    }
}

impl GatewayConfig {
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let current = src.optional(&ACCESS_KEY)?.ok_or_else(|| {
            problem(ACCESS_KEY.about.name, "is required: the access key from the KooGallery seller console")
        })?;
        let mut keys = AccessKeys::new(current);
        if let Some(previous) = src.optional(&PREVIOUS_ACCESS_KEY)? {
            keys = keys.with_previous(previous, src.optional(&PREVIOUS_ACCESS_KEY_UNTIL)?);
        }
        let settings = crate::gateway::Settings {
            window_secs: src.value(&TIMESTAMP_SKEW_SECS)?,
            v1_window_secs: src.value(&V1_TIMESTAMP_SKEW_SECS)?,
            frontend_url: src.value(&FRONTEND_URL)?,
            admin_url: src.optional(&ADMIN_URL)?,
            encrypt_type: src.value(&ENCRYPT_TYPE)?,
            issue_credentials: src.value(&ISSUE_CREDENTIALS)?,
            sku_map: src.optional(&SKU_MAP)?.unwrap_or_default(),
            store_timeout: src.value(&STORE_TIMEOUT_SECS)?,
        };
        Ok(Self { keys, settings })
    }
}

impl Delivery {
    fn from_source(src: &Source, store: &StoreSpec) -> Result<Self, ConfigError> {
        let data_dir = match (src.optional(&DATA_DIR)?, store) {
            (Some(dir), _) => dir,
            (None, StoreSpec::Embedded(dir)) => dir.clone(),
            (None, _) => PathBuf::from(value_of(&STORE).unwrap_or_default()),
        };
        let url = src.optional(&BILLING_URL)?;
        let secret = src.optional(&BILLING_SECRET)?;
        let name = BILLING_SECRET.about.name;
        if url.is_some() && secret.is_none() {
            return Err(problem(name, "is required when KOOGATE_BILLING_URL is set (events are signed)"));
        }
        // The rule is the signer's own (`webhook::key_of`), checked here so a bad secret stops `check-config` too.
        if secret.as_ref().is_some_and(|s| crate::delivery::webhook::key_of(s.expose()).is_err()) {
            return Err(problem(name, "must be whsec_ followed by Base64 of the signing key"));
        }
        Ok(Self {
            sink: Target {
                billing: url.zip(secret).map(|(url, secret)| Billing { url, secret }),
                data_dir,
                attempt_timeout: src.value(&DELIVERY_TIMEOUT_SECS)?,
            },
            worker: crate::delivery::Settings {
                forward_test: src.value(&FORWARD_TEST_EVENTS)?,
                schedule: Schedule {
                    initial: src.value(&RETRY_INITIAL_MS)?,
                    max: src.value(&RETRY_MAX_MS)?,
                    max_attempts: src.value(&RETRY_MAX_ATTEMPTS)?,
                    give_up_after: src.value(&RETRY_GIVE_UP_SECS)?,
                },
                visibility: src.value(&DELIVERY_VISIBILITY_SECS)?,
                concurrency: src.value(&DELIVERY_CONCURRENCY)?,
                order_wait: src.value(&DELIVERY_ORDER_WAIT_SECS)?,
            },
            retention: src.value(&EVENT_RETENTION_SECS)?,
        })
    }
}

impl Listener {
    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let routes = Routes {
            v2_path: src.value(&V2_PATH)?,
            v1_path: src.value(&V1_PATH)?,
            max_body_bytes: src.value(&MAX_BODY_BYTES)?,
            body_timeout: src.value(&BODY_TIMEOUT_MS)?,
        };
        if routes.v1_path == routes.v2_path {
            return Err(problem(V1_PATH.about.name, "must differ from KOOGATE_V2_PATH"));
        }
        let tls = match (src.optional(&TLS_CERT)?, src.optional(&TLS_KEY)?) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => return Err(problem(TLS_KEY.about.name, "is required when KOOGATE_TLS_CERT is set")),
            (None, Some(_)) => return Err(problem(TLS_CERT.about.name, "is required when KOOGATE_TLS_KEY is set")),
        };
        Ok(Self {
            addr: src.value(&LISTEN)?,
            tls,
            routes,
            max_inflight: src.value(&MAX_INFLIGHT)?,
            limits: ListenerLimits {
                max_connections: src.value(&MAX_CONNECTIONS)?,
                header_timeout: src.value(&REQUEST_TIMEOUT_SECS)?,
                max_conns_per_peer: src.value(&MAX_CONNS_PER_PEER)?,
                shutdown_grace: src.value(&SHUTDOWN_GRACE_SECS)?,
            },
        })
    }
}

impl Log {
    /// `KOOGATE_LOG_FORMAT` and `KOOGATE_LOG` (the tools read them too).
    pub fn from_source(src: &Source) -> Result<Self, ConfigError> {
        Ok(Self { format: src.value(&LOG_FORMAT)?, filter: src.value(&LOG)? })
    }
}

/// The order query (with AK/SK) and the usage push: one base URL and fallbacks, shared credentials.
fn marketplace_and_usage(src: &Source, schedule: Schedule) -> Result<(Option<Marketplace>, Usage), ConfigError> {
    let url = src.value(&MARKETPLACE_URL)?;
    let url_is_explicit = src.is_set(&MARKETPLACE_URL);
    let fallback_urls = match src.optional(&MARKETPLACE_FALLBACK_URLS)? {
        Some(urls) => urls,
        None => crate::marketplace::default_fallbacks(&url),
    };
    if url.starts_with("http://") && !is_loopback_url(&url) && !src.value(&MARKETPLACE_ALLOW_HTTP)? {
        return Err(problem(
            MARKETPLACE_URL.about.name,
            format!(
                "{url:?} is plain http:// (signed order queries and usage in clear): use https://, \
                 or set KOOGATE_MARKETPLACE_ALLOW_HTTP=true"
            ),
        ));
    }
    let pusher = crate::metering::push::Settings {
        batch: src.value(&USAGE_BATCH)?,
        lease: src.value(&USAGE_LEASE_SECS)?,
        hold: src.value(&USAGE_HOLD_SECS)?,
        poll: src.value(&USAGE_POLL_MS)?,
        schedule,
    };
    let credentials_given = src.is_set(&MARKETPLACE_AK) || src.is_set(&MARKETPLACE_SK);
    // A first run (nothing but an access key) must not push to the production usage API.
    let (push, push_reason) = match src.optional(&USAGE_PUSH)? {
        Some(true) => (true, "KOOGATE_USAGE_PUSH is true"),
        Some(false) => (false, "KOOGATE_USAGE_PUSH is false"),
        None if url_is_explicit => (true, "KOOGATE_MARKETPLACE_URL is set"),
        None if credentials_given => (true, "KOOGATE_MARKETPLACE_AK/SK are set"),
        None => (false, "neither KOOGATE_MARKETPLACE_URL nor KOOGATE_MARKETPLACE_AK/SK is set"),
    };
    let usage_timeout = src.value(&USAGE_TIMEOUT_MS)?;
    let apig_sign = src.value(&USAGE_APIG_SIGN)?;
    let marketplace = match (src.optional(&MARKETPLACE_AK)?, src.optional(&MARKETPLACE_SK)?) {
        (Some(ak), Some(sk)) => Some(Marketplace {
            url: url.clone(),
            fallback_urls: fallback_urls.clone(),
            ak,
            sk,
            timeout: src.value(&MARKETPLACE_TIMEOUT_SECS)?,
            cache_ttl: src.value(&ORDER_CACHE_SECS)?,
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(problem(MARKETPLACE_SK.about.name, "is required when KOOGATE_MARKETPLACE_AK is set"))
        }
        (None, Some(_)) => {
            return Err(problem(MARKETPLACE_AK.about.name, "is required when KOOGATE_MARKETPLACE_SK is set"))
        }
    };
    let usage = Usage {
        push,
        push_reason,
        url,
        fallback_urls,
        timeout: usage_timeout,
        apig: marketplace.as_ref().filter(|_| apig_sign).map(|m| (m.ak.clone(), m.sk.clone())),
        pusher,
    };
    Ok((marketplace, usage))
}

/// `http://127.0.0.1:…`, `http://localhost…`, `http://[::1]…`: traffic that never leaves the machine.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().map_or("", |h| h.trim_start_matches('['))
    } else {
        host.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn defaults() -> Config {
        Config::from_parts(env(&[("KOOGATE_ACCESS_KEY", "ak")]), None).unwrap()
    }

    #[test]
    fn every_declared_default_parses_with_its_own_parser() {
        for s in SETTINGS {
            let a = s.about();
            assert!(s.check_default().is_ok(), "{}: default {:?}: {:?}", a.name, a.default_text(), s.check_default());
        }
        // and the check can fail: a bad default is caught.
        let bad: Setting<Duration> = Setting {
            about: About { unset: Value("ten"), ..DELIVERY_TIMEOUT_SECS.about },
            parse: DELIVERY_TIMEOUT_SECS.parse,
        };
        assert_eq!(bad.check_default(), Err("\"ten\" is not a whole number".to_owned()));
    }

    #[test]
    fn the_table_names_each_setting_once() {
        let names: std::collections::BTreeSet<&str> = SETTINGS.iter().map(|s| s.about().name).collect();
        assert_eq!(names.len(), SETTINGS.len());
        assert!(names.iter().all(|n| n.starts_with("KOOGATE_") && !n.ends_with("_FILE")));
        let secrets: Vec<&str> = SETTINGS.iter().filter(|s| s.is_secret()).map(|s| s.about().name).collect();
        assert_eq!(
            secrets,
            [
                "KOOGATE_ACCESS_KEY",
                "KOOGATE_PREVIOUS_ACCESS_KEY",
                "KOOGATE_BILLING_SECRET",
                "KOOGATE_ADMIN_TOKEN",
                "KOOGATE_MARKETPLACE_AK",
                "KOOGATE_MARKETPLACE_SK"
            ]
        );
    }

    /// The default column of docs/settings.md shows each declared default value (in backticks).
    #[test]
    fn the_docs_show_the_declared_defaults() {
        let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/settings.md")).unwrap();
        for s in SETTINGS {
            let a = s.about();
            let Unset::Value(v) = a.unset else { continue };
            let row = docs.lines().find(|l| l.starts_with(&format!("| `{}` |", a.name)));
            let row = row.unwrap_or_else(|| panic!("{} has no row in docs/settings.md", a.name));
            let column = row.split(" | ").nth(1).unwrap_or("");
            assert_eq!(column, format!("`{v}`"), "{}: docs/settings.md shows another default", a.name);
        }
    }

    /// Each component from an empty environment (but the required access key) is what docs/settings.md documents.
    #[test]
    fn each_component_from_an_empty_environment_is_the_documented_default() {
        let c = defaults();
        assert_eq!(
            c.listener,
            Listener {
                addr: "0.0.0.0:8080".parse().unwrap(),
                tls: None,
                routes: Routes {
                    v2_path: "/koogallery/v2".into(),
                    v1_path: "/koogallery/v1".into(),
                    max_body_bytes: 65_536,
                    body_timeout: Duration::from_millis(2000),
                },
                max_inflight: 1024,
                limits: ListenerLimits {
                    max_connections: 10_000,
                    header_timeout: Duration::from_secs(10),
                    max_conns_per_peer: 256,
                    shutdown_grace: Duration::from_secs(10),
                },
            }
        );
        assert_eq!(c.admin, AdminListener { addr: "127.0.0.1:9090".parse().unwrap(), token: None });
        assert_eq!(c.store, StoreConfig { spec: StoreSpec::Embedded("./data".into()), key_prefix: "koogate:".into() });
        assert_eq!(c.gateway.keys.current().expose(), "ak");
        assert_eq!(
            c.gateway.settings,
            crate::gateway::Settings {
                window_secs: 60,
                v1_window_secs: 14_400,
                frontend_url: "https://frontend.invalid/".into(),
                admin_url: None,
                encrypt_type: EncryptType::Aes256,
                issue_credentials: false,
                sku_map: SkuMap::default(),
                store_timeout: Duration::from_secs(3),
            }
        );
        assert!(c.gateway.frontend_url_is_default());
        assert_eq!(
            c.delivery,
            Delivery {
                sink: Target { billing: None, data_dir: "./data".into(), attempt_timeout: Duration::from_secs(10) },
                worker: crate::delivery::Settings {
                    forward_test: false,
                    schedule: Schedule {
                        initial: Duration::from_millis(5000),
                        max: Duration::from_millis(3_600_000),
                        max_attempts: 40,
                        give_up_after: Duration::from_secs(86_400),
                    },
                    visibility: Duration::from_secs(30),
                    concurrency: 32,
                    order_wait: Duration::from_secs(300),
                },
                retention: Duration::from_secs(2_592_000),
            }
        );
        assert_eq!(c.marketplace, None);
        let u = &c.usage;
        assert!(!u.push, "the first run does not push: {}", u.push_reason);
        assert_eq!(u.url, "https://mkt.myhuaweicloud.com");
        assert_eq!(u.fallback_urls, ["https://mkt.myhuaweicloud.cn"]);
        assert_eq!(u.timeout, Duration::from_millis(10_000));
        assert!(u.apig.is_none());
        assert_eq!(
            u.pusher,
            crate::metering::push::Settings {
                batch: 1000,
                lease: Duration::from_secs(60),
                hold: Duration::from_secs(60),
                poll: Duration::from_millis(1000),
                schedule: c.delivery.worker.schedule,
            }
        );
        assert_eq!(c.log, Log { format: LogFormat::Text, filter: "info".into() });
        assert!(!format!("{c:?}").contains("\"ak\""), "secrets never print");
    }

    #[test]
    fn components_take_what_is_given() {
        let c = Config::from_parts(
            env(&[
                ("KOOGATE_ACCESS_KEY", "a"),
                ("KOOGATE_STORE", "redis://127.0.0.1:6379"),
                ("KOOGATE_BILLING_URL", "https://billing.example.com/events"),
                ("KOOGATE_BILLING_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
                ("KOOGATE_RETRY_MAX_ATTEMPTS", "3"),
                ("KOOGATE_MARKETPLACE_AK", "mak"),
                ("KOOGATE_MARKETPLACE_SK", "msk"),
                ("KOOGATE_MARKETPLACE_TIMEOUT_SECS", "7"),
                ("KOOGATE_TLS_CERT", "/c.pem"),
                ("KOOGATE_TLS_KEY", "/k.pem"),
                ("KOOGATE_MAX_CONNS_PER_PEER", "0"),
                ("KOOGATE_LOG_FORMAT", "json"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(c.delivery.sink.data_dir, PathBuf::from("./data"), "not the store: it is Redis");
        assert_eq!(
            c.delivery.sink.billing.as_ref().map(|b| b.url.as_str()),
            Some("https://billing.example.com/events")
        );
        assert_eq!(c.delivery.worker.schedule.max_attempts, 3);
        assert_eq!(c.usage.pusher.schedule.max_attempts, 3, "the usage push retries on the same schedule");
        let m = c.marketplace.as_ref().unwrap();
        assert_eq!((m.ak.expose(), m.timeout), ("mak", Duration::from_secs(7)));
        assert!(c.usage.push && c.usage.apig.is_some());
        assert_eq!(c.listener.tls, Some(TlsFiles { cert: "/c.pem".into(), key: "/k.pem".into() }));
        assert_eq!(c.listener.limits.max_conns_per_peer, 0);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn fallback_hosts_and_the_usage_apig_signature() {
        let c = |pairs: &[(&str, &str)]| {
            let mut all = vec![("KOOGATE_ACCESS_KEY", "a")];
            all.extend_from_slice(pairs);
            Config::from_parts(env(&all), None).unwrap()
        };
        let d = c(&[]);
        assert_eq!(d.usage.url, "https://mkt.myhuaweicloud.com");
        assert_eq!(d.usage.fallback_urls, ["https://mkt.myhuaweicloud.cn"]);
        assert!(d.usage.apig.is_none() && d.marketplace.is_none());
        assert!(c(&[("KOOGATE_MARKETPLACE_URL", "http://127.0.0.1:9300")]).usage.fallback_urls.is_empty());
        assert!(c(&[("KOOGATE_MARKETPLACE_FALLBACK_URLS", "none")]).usage.fallback_urls.is_empty());
        let two = c(&[("KOOGATE_MARKETPLACE_FALLBACK_URLS", "http://a:1, https://b")]);
        assert_eq!(two.usage.fallback_urls, ["http://a:1", "https://b"]);
        let keys = [("KOOGATE_MARKETPLACE_AK", "ak"), ("KOOGATE_MARKETPLACE_SK", "sk")];
        let both = c(&keys);
        assert_eq!(both.usage.fallback_urls, both.marketplace.map(|m| m.fallback_urls).unwrap_or_default());
        assert!(c(&keys).usage.apig.is_some());
        let mut off = keys.to_vec();
        off.push(("KOOGATE_USAGE_APIG_SIGN", "false"));
        assert!(c(&off).usage.apig.is_none());
        let bad = Config::from_parts(
            env(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_MARKETPLACE_FALLBACK_URLS", "ftp://x")]),
            None,
        );
        assert!(bad.unwrap_err().to_string().starts_with("KOOGATE_MARKETPLACE_FALLBACK_URLS:"));
    }

    #[test]
    fn bad_values_name_their_variable() {
        let err = |pairs: &[(&str, &str)]| Config::from_parts(env(pairs), None).unwrap_err().to_string();
        assert!(err(&[]).starts_with("KOOGATE_ACCESS_KEY: is required"));
        // (variable, value, the whole message)
        let exact = [
            ("KOOGATE_LISTEN", "nope", "KOOGATE_LISTEN: \"nope\" is not a socket address such as 0.0.0.0:8080"),
            (
                "KOOGATE_ADMIN_LISTEN",
                "nope",
                "KOOGATE_ADMIN_LISTEN: \"nope\" is not a socket address such as 127.0.0.1:9090",
            ),
            ("KOOGATE_TIMESTAMP_SKEW_SECS", "-1", "KOOGATE_TIMESTAMP_SKEW_SECS: \"-1\" is not a whole number"),
            ("KOOGATE_DELIVERY_TIMEOUT_SECS", "0", "KOOGATE_DELIVERY_TIMEOUT_SECS: must be greater than 0"),
            ("KOOGATE_RETRY_MAX_ATTEMPTS", "4294967296", "KOOGATE_RETRY_MAX_ATTEMPTS: is too large"),
            ("KOOGATE_USAGE_BATCH", "1001", "KOOGATE_USAGE_BATCH: must be at most 1000 (KooGallery's limit)"),
            ("KOOGATE_V1_PATH", "/koogallery/v2", "KOOGATE_V1_PATH: must differ from KOOGATE_V2_PATH"),
            ("KOOGATE_TLS_CERT", "/c.pem", "KOOGATE_TLS_KEY: is required when KOOGATE_TLS_CERT is set"),
            (
                "KOOGATE_BILLING_URL",
                "http://b",
                "KOOGATE_BILLING_SECRET: is required when KOOGATE_BILLING_URL is set (events are signed)",
            ),
            ("KOOGATE_MARKETPLACE_AK", "x", "KOOGATE_MARKETPLACE_SK: is required when KOOGATE_MARKETPLACE_AK is set"),
            // A URL no request could go to is refused at start, not at every delivery attempt.
            (
                "KOOGATE_BILLING_URL",
                "http://billing core/events",
                "KOOGATE_BILLING_URL: \"http://billing core/events\" is not a valid http:// or https:// URL (invalid international domain name)",
            ),
            (
                "KOOGATE_BILLING_URL",
                "https://:8443/events",
                "KOOGATE_BILLING_URL: \"https://:8443/events\" is not a valid http:// or https:// URL (empty host)",
            ),
            (
                "KOOGATE_BILLING_URL",
                "ftp://billing/events",
                "KOOGATE_BILLING_URL: \"ftp://billing/events\" is not a valid http:// or https:// URL (not an http:// or https:// URL)",
            ),
            ("KOOGATE_ENCRYPT_TYPE", "3", "KOOGATE_ENCRYPT_TYPE: \"3\" is not 1 or 2"),
        ];
        for (variable, value, message) in exact {
            assert_eq!(err(&[("KOOGATE_ACCESS_KEY", "a"), (variable, value)]), message);
        }
        assert!(err(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_BILLING_SECRET", "nope")])
            .starts_with("KOOGATE_BILLING_SECRET:"));
        assert!(err(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_KEY_PREFIX", "x{y}")]).starts_with("KOOGATE_KEY_PREFIX:"));
        assert!(err(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_SKU_MAP", "/nonexistent.toml")])
            .starts_with("KOOGATE_SKU_MAP:"));
        assert!(
            err(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_ACCESS_KEY_FILE", "/x")]).starts_with("KOOGATE_ACCESS_KEY:")
        );
        let msg = err(&[("KOOGATE_ACCESS_KEY", "topsecret"), ("KOOGATE_FORWARD_TEST_EVENTS", "Maybe")]);
        assert_eq!(msg, "KOOGATE_FORWARD_TEST_EVENTS: \"maybe\" is not true or false");
    }

    #[test]
    fn secrets_may_be_files() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0k\r\n").unwrap();
        let path = token.display().to_string();
        let c =
            Config::from_parts(env(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_ADMIN_TOKEN_FILE", path.as_str())]), None)
                .unwrap();
        assert_eq!(c.admin.token.as_ref().map(Secret::expose), Some("t0k"));
        std::fs::write(&token, "\n").unwrap();
        let err = Config::from_parts(env(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_ADMIN_TOKEN_FILE", &path)]), None)
            .unwrap_err()
            .to_string();
        assert_eq!(err, format!("KOOGATE_ADMIN_TOKEN_FILE: {path} is empty"));
    }

    #[test]
    fn file_values_are_overridden_by_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("ak");
        std::fs::write(&key_file, "from-file\n").unwrap();
        let path = dir.path().join("koogate.toml");
        std::fs::write(
            &path,
            format!("access_key_file = {:?}\nlisten = \"127.0.0.1:1\"\ntimestamp_skew_secs = 30\nstore = \"redis://127.0.0.1:6379\"\nusage_apig_sign = false\n", key_file),
        )
        .unwrap();
        let c = Config::from_parts(env(&[("KOOGATE_LISTEN", "127.0.0.1:2")]), Some(&path)).unwrap();
        assert_eq!(c.gateway.keys.current().expose(), "from-file");
        assert_eq!(c.listener.addr.to_string(), "127.0.0.1:2", "the environment wins");
        assert_eq!(c.gateway.settings.window_secs, 30, "the file beats the default");
        assert_eq!(c.store.spec, StoreSpec::Redis("redis://127.0.0.1:6379".into()));
        let c = Config::from_parts(env(&[("KOOGATE_TIMESTAMP_SKEW_SECS", "45")]), Some(&path)).unwrap();
        assert_eq!(c.gateway.settings.window_secs, 45);
        std::fs::write(&path, "bogus = 1\n").unwrap();
        assert!(Config::from_parts(env(&[("KOOGATE_ACCESS_KEY", "a")]), Some(&path))
            .unwrap_err()
            .to_string()
            .contains("unknown key"));
        std::fs::write(&path, "admin_lsten = \"x\"\n").unwrap();
        let err = Config::from_parts(env(&[("KOOGATE_ACCESS_KEY", "a")]), Some(&path)).unwrap_err().to_string();
        assert!(err.ends_with("has an unknown key \"admin_lsten\": did you mean \"admin_listen\"?"), "{err}");
    }

    #[test]
    fn unknown_variables_get_a_did_you_mean() {
        let names = ["KOOGATE_BILING_URL", "KOOGATE_ACCESS_KEY", "KOOGATE_ADMIN_TOKEN_FILE", "KOOGATE_ZZZ", "PATH"];
        let mut names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        names.push("KOOGATE_LISTEN_FILE".into());
        let w = unknown_variables(&names);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("KOOGATE_BILING_URL") && w[0].contains("did you mean KOOGATE_BILLING_URL?"), "{w:?}");
        assert!(w[1].starts_with("KOOGATE_ZZZ") && !w[1].contains("did you mean"), "{w:?}");
        assert!(w[2].starts_with("KOOGATE_LISTEN_FILE"), "only secrets have a _FILE: {w:?}");
        assert_eq!(did_you_mean("KOOGATE_ACESS_KEY_FILE").as_deref(), Some("KOOGATE_ACCESS_KEY_FILE"));
    }

    #[test]
    fn log_filters_are_checked() {
        let log = |filter: &str| Source { env: env(&[("KOOGATE_LOG", filter)]), file: BTreeMap::new() }.value(&LOG);
        assert!(log("info").is_ok());
        assert!(log("warn,koogate=debug").is_ok());
        assert!(log("verbose").unwrap_err().to_string().starts_with("KOOGATE_LOG:"));
        assert!(log("koogate=loud").is_err());
    }

    #[test]
    fn plain_http_marketplace_urls_need_an_opt_in_off_loopback() {
        let load = |pairs: &[(&str, &str)]| {
            let mut all = vec![("KOOGATE_ACCESS_KEY", "a")];
            all.extend_from_slice(pairs);
            Config::from_parts(env(&all), None)
        };
        assert!(load(&[("KOOGATE_MARKETPLACE_URL", "http://127.0.0.1:9300")]).is_ok());
        assert!(load(&[("KOOGATE_MARKETPLACE_URL", "http://[::1]:9300/x")]).is_ok());
        let err = load(&[("KOOGATE_MARKETPLACE_URL", "http://mkt.example.com")]).unwrap_err().to_string();
        assert!(err.starts_with("KOOGATE_MARKETPLACE_URL:") && err.contains("KOOGATE_MARKETPLACE_ALLOW_HTTP"), "{err}");
        let ok =
            load(&[("KOOGATE_MARKETPLACE_URL", "http://mkt.example.com"), ("KOOGATE_MARKETPLACE_ALLOW_HTTP", "true")]);
        assert!(ok.is_ok());
    }

    #[test]
    fn the_first_run_does_not_push_usage() {
        assert!(!defaults().usage.push);
        let c = Config::from_parts(
            env(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_MARKETPLACE_URL", "https://mkt.example.com")]),
            None,
        )
        .unwrap();
        assert!(c.usage.push);
        let c = Config::from_parts(env(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_USAGE_PUSH", "true")]), None).unwrap();
        assert!(c.usage.push);
    }

    #[test]
    fn toml_errors_keep_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("koogate.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\nstore = = 3\n").unwrap();
        let err = Config::from_parts(env(&[("KOOGATE_ACCESS_KEY", "a")]), Some(&path)).unwrap_err().to_string();
        assert!(err.contains("at line 2, column"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
}
