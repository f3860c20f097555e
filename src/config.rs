//! Configuration: environment variables, optionally over a TOML file.
//!
//! Every setting has one name: `KOOGATE_<NAME>` in the environment, `<name>`
//! (lowercase) in the `--config` file; the environment wins. A bad or missing
//! value stops start-up with one sentence naming the variable. [`SETTINGS`]
//! is the documented list (docs/settings.md's table and `koogate serve --help` are checked against it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::events::SkuMap;
use crate::protocol::crypto::EncryptType;
use crate::protocol::verify::AccessKeys;
use crate::secret::Secret;
use crate::store::StoreSpec;

/// (name, default, meaning) of every setting.
pub const SETTINGS: &[(&str, &str, &str)] = &[
    ("KOOGATE_LISTEN", "0.0.0.0:8080", "address of the KooGallery listener"),
    ("KOOGATE_TLS_CERT", "(none: plain HTTP)", "PEM certificate chain: serve KooGallery calls over TLS 1.2+"),
    ("KOOGATE_TLS_KEY", "(none)", "PEM private key of KOOGATE_TLS_CERT"),
    ("KOOGATE_ACCESS_KEY", "(required)", "KooGallery access key (or KOOGATE_ACCESS_KEY_FILE)"),
    ("KOOGATE_PREVIOUS_ACCESS_KEY", "(none)", "previous access key, still accepted during a rotation (or _FILE)"),
    ("KOOGATE_PREVIOUS_ACCESS_KEY_UNTIL", "(none: no end)", "RFC 3339 time the previous key stops being accepted"),
    ("KOOGATE_STORE", "./data", "redis://…, redis+cluster://…, or a directory for the embedded store"),
    ("KOOGATE_KEY_PREFIX", "koogate:", "prefix of every Redis key"),
    ("KOOGATE_DATA_DIR", "the store directory, else ./data", "where events.jsonl is written"),
    ("KOOGATE_BILLING_URL", "(none)", "billing core endpoint for events"),
    ("KOOGATE_BILLING_SECRET", "(none)", "whsec_… signing secret for events (or _FILE)"),
    ("KOOGATE_DELIVERY_TIMEOUT_SECS", "10", "per-attempt timeout of a delivery to the billing core"),
    ("KOOGATE_RETRY_INITIAL_MS", "5000", "largest delay before the first retry (doubling, full jitter)"),
    ("KOOGATE_RETRY_MAX_MS", "3600000", "largest delay between retries"),
    ("KOOGATE_RETRY_MAX_ATTEMPTS", "40", "attempts before an event is dead-lettered"),
    ("KOOGATE_RETRY_GIVE_UP_SECS", "86400", "time after the first attempt when an event is dead-lettered"),
    ("KOOGATE_DELIVERY_VISIBILITY_SECS", "30", "a claimed event not finished by then is taken over by another replica"),
    ("KOOGATE_DELIVERY_CONCURRENCY", "32", "deliveries in flight at once (one per instance)"),
    ("KOOGATE_DELIVERY_ORDER_WAIT_SECS", "300", "longest wait for an instance's earlier event before sending anyway"),
    ("KOOGATE_ADMIN_LISTEN", "127.0.0.1:9090", "address of the admin listener (/metrics, admin API)"),
    ("KOOGATE_ADMIN_TOKEN", "(none: admin API off)", "bearer token of the admin API (or _FILE)"),
    ("KOOGATE_TIMESTAMP_SKEW_SECS", "60", "allowed clock difference of a V2 call's timestamp"),
    (
        "KOOGATE_V1_TIMESTAMP_SKEW_SECS",
        "14400",
        "allowed age of a V1 call's timeStamp (V1 documents no window; KooGallery retries a purchase for 3 h with the same URL: docs/conformance.md)",
    ),
    ("KOOGATE_FRONTEND_URL", "https://frontend.invalid/", "appInfo.frontEndUrl answered to newInstance"),
    ("KOOGATE_ADMIN_URL", "(none)", "appInfo.adminUrl answered to newInstance"),
    ("KOOGATE_SKU_MAP", "(none)", "TOML file mapping SKUs to settlement kinds"),
    (
        "KOOGATE_MARKETPLACE_URL",
        "https://mkt.myhuaweicloud.com",
        "KooGallery open API base URL (order query, usage push)",
    ),
    (
        "KOOGATE_MARKETPLACE_AK",
        "(none: no enrichment)",
        "Huawei Cloud access key ID for the order query API (or _FILE)",
    ),
    ("KOOGATE_MARKETPLACE_SK", "(none)", "Huawei Cloud secret access key (or _FILE)"),
    ("KOOGATE_MARKETPLACE_TIMEOUT_SECS", "5", "per-call timeout of the order query API"),
    (
        "KOOGATE_MARKETPLACE_FALLBACK_URLS",
        "(https://mkt.myhuaweicloud.cn behind the China and International sites, else none)",
        "comma-separated base URLs tried in order when the marketplace host cannot be reached (none: no fallback)",
    ),
    ("KOOGATE_ORDER_CACHE_SECS", "604800", "how long order query answers are cached in the store"),
    (
        "KOOGATE_USAGE_PUSH",
        "(on when KOOGATE_MARKETPLACE_URL or _AK/_SK are set)",
        "push accepted usage records to KooGallery (false: keep them until turned on)",
    ),
    ("KOOGATE_USAGE_BATCH", "1000", "usage records per push call (at most 1000)"),
    ("KOOGATE_USAGE_TIMEOUT_MS", "10000", "per-call timeout of the usage push"),
    ("KOOGATE_USAGE_LEASE_SECS", "60", "a claimed usage record not settled by then is pushed again (same metering_sn)"),
    ("KOOGATE_USAGE_HOLD_SECS", "60", "how often usage of a frozen instance is looked at again"),
    ("KOOGATE_USAGE_POLL_MS", "1000", "pause of the usage push when nothing is due"),
    (
        "KOOGATE_USAGE_APIG_SIGN",
        "true",
        "also sign usage pushes with API Gateway AK/SK signing when KOOGATE_MARKETPLACE_AK/SK are set",
    ),
    ("KOOGATE_FORWARD_TEST_EVENTS", "false", "forward events of testFlag=1 calls too"),
    ("KOOGATE_V2_PATH", "/koogallery/v2", "path of V2 calls (POST)"),
    ("KOOGATE_V1_PATH", "/koogallery/v1", "path of V1 calls (GET)"),
    ("KOOGATE_MAX_BODY_BYTES", "65536", "largest accepted request body"),
    ("KOOGATE_ENCRYPT_TYPE", "1", "encryptType of answers: 1 = AES-256, 2 = AES-128"),
    ("KOOGATE_ISSUE_CREDENTIALS", "false", "answer newInstance with an encrypted initial user name and password"),
    ("KOOGATE_MAX_CONNECTIONS", "10000", "open connections at most (more wait in the backlog)"),
    ("KOOGATE_MAX_INFLIGHT", "1024", "calls handled at once; more are answered 503/000005 at once"),
    ("KOOGATE_REQUEST_TIMEOUT_SECS", "10", "time to receive a request's headers"),
    (
        "KOOGATE_BODY_TIMEOUT_MS",
        "2000",
        "time to receive a V2 body, read before a call takes an in-flight slot; the connection is closed after it",
    ),
    (
        "KOOGATE_MAX_CONNS_PER_PEER",
        "256",
        "open connections per peer IP address (more are closed at once); 0 = no cap. Behind a load balancer that \
         presents few addresses, raise it or set 0",
    ),
    ("KOOGATE_STORE_TIMEOUT_SECS", "3", "longest wait for the store before answering 000005"),
    ("KOOGATE_SHUTDOWN_GRACE_SECS", "10", "time in-flight calls get to finish on SIGTERM"),
    ("KOOGATE_LOG_FORMAT", "text", "text or json"),
    ("KOOGATE_LOG", "info", "log filter: a level, or comma-separated target=level directives (info,koogate=debug)"),
    ("KOOGATE_CONFIG", "(none)", "TOML file of settings, the same as --config (the environment wins)"),
    (
        "KOOGATE_MARKETPLACE_ALLOW_HTTP",
        "false",
        "allow an http:// KOOGATE_MARKETPLACE_URL off loopback (signed traffic in clear)",
    ),
];

/// Default V1 `timeStamp` window: 4 hours. Huawei documents no V1 window, and
/// KooGallery retries a failed V1 subscription call for 3 hours (renewal and
/// expiry calls for 1 hour); a retry may carry the first URL, so the window
/// covers the longest retry period plus an hour of margin. Replays inside it
/// are harmless: `authToken` is the V1 nonce and a repeat gets the first answer.
pub const DEFAULT_V1_TIMESTAMP_SKEW_SECS: u64 = 4 * 3600;

/// Settings whose secret may be given as a file named by `<NAME>_FILE`.
const FILE_SETTINGS: &[&str] = &[
    "KOOGATE_ACCESS_KEY",
    "KOOGATE_PREVIOUS_ACCESS_KEY",
    "KOOGATE_BILLING_SECRET",
    "KOOGATE_ADMIN_TOKEN",
    "KOOGATE_MARKETPLACE_AK",
    "KOOGATE_MARKETPLACE_SK",
];

fn is_known(name: &str) -> bool {
    SETTINGS.iter().any(|(n, _, _)| *n == name)
        || name.strip_suffix("_FILE").is_some_and(|base| FILE_SETTINGS.contains(&base))
}

/// The known setting closest to a misspelt one, if any is close.
fn did_you_mean(name: &str) -> Option<String> {
    let known = SETTINGS.iter().map(|(n, _, _)| n.to_string()).chain(FILE_SETTINGS.iter().map(|n| format!("{n}_FILE")));
    known
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
    for (name, default, meaning) in SETTINGS {
        out.push_str(&format!("  {name}\n      {meaning} [default: {default}]\n"));
    }
    out.push_str("Secrets (access keys, tokens, SK) may instead be given as a file path in <NAME>_FILE.");
    out
}

/// Checks a `KOOGATE_LOG` filter: every directive is a level or `target=level`.
pub fn check_log_filter(filter: &str) -> Result<(), ConfigError> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(problem(
                "KOOGATE_LOG",
                format!("{directive:?} is not a level (off, error, warn, info, debug, trace) or target=level"),
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| problem("KOOGATE_LOG", format!("{filter:?}: {e}")))?;
    Ok(())
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

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Certificate chain and key files for TLS on the KooGallery listener.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub access_keys: AccessKeys,
    pub store: StoreSpec,
    pub key_prefix: String,
    pub data_dir: PathBuf,
    pub billing_url: Option<String>,
    pub billing_secret: Option<Secret>,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<Secret>,
    pub timestamp_skew_secs: u64,
    /// V1 `timeStamp` window (docs/conformance.md, "V1 timestamp window").
    pub v1_timestamp_skew_secs: u64,
    pub frontend_url: String,
    pub frontend_url_is_default: bool,
    pub admin_url: Option<String>,
    pub sku_map: SkuMap,
    pub forward_test_events: bool,
    pub v2_path: String,
    pub v1_path: String,
    pub max_body_bytes: usize,
    pub encrypt_type: EncryptType,
    pub issue_credentials: bool,
    pub max_connections: usize,
    pub max_inflight: usize,
    pub request_timeout: Duration,
    pub body_timeout: Duration,
    /// Open connections per peer IP address; 0 = no cap.
    pub max_conns_per_peer: usize,
    pub store_timeout: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// `KOOGATE_LOG`, checked.
    pub log_filter: String,
    /// Said once at start-up (unknown `KOOGATE_*` variables).
    pub warnings: Vec<String>,
    pub delivery_timeout: Duration,
    pub retry: crate::backoff::Schedule,
    pub delivery_visibility: Duration,
    pub delivery_concurrency: usize,
    pub delivery_order_wait: Duration,
    pub marketplace: Option<Marketplace>,
    pub usage: Usage,
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
    pub batch: usize,
    pub timeout: Duration,
    pub lease: Duration,
    pub hold: Duration,
    pub poll: Duration,
    /// Tried in order when the host cannot be reached (`KOOGATE_MARKETPLACE_FALLBACK_URLS`).
    pub fallback_urls: Vec<String>,
    /// API Gateway AK/SK signing of every push (`KOOGATE_MARKETPLACE_AK/SK`, unless
    /// `KOOGATE_USAGE_APIG_SIGN=false`).
    pub apig: Option<(Secret, Secret)>,
}

/// The order query API's address and credentials.
#[derive(Debug, Clone)]
pub struct Marketplace {
    pub url: String,
    pub fallback_urls: Vec<String>,
    pub ak: Secret,
    pub sk: Secret,
    pub timeout: Duration,
    pub cache_ttl: Duration,
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

    pub fn get(&self, setting: &str) -> Option<String> {
        let file_key = setting.trim_start_matches("KOOGATE_").to_ascii_lowercase();
        self.env.get(setting).or_else(|| self.file.get(&file_key)).filter(|v| !v.is_empty()).cloned()
    }

    /// A secret given directly or as `<NAME>_FILE` (a path whose content is the value).
    pub fn secret(&self, setting: &str) -> Result<Option<Secret>, ConfigError> {
        let file_setting = format!("{setting}_FILE");
        match (self.get(setting), self.get(&file_setting)) {
            (Some(_), Some(_)) => Err(problem(setting, format!("set either {setting} or {file_setting}, not both"))),
            (Some(v), None) => Ok(Some(Secret::new(v))),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| problem(&file_setting, format!("cannot read {path}: {e}")))?;
                let value = text.trim_end_matches(['\n', '\r']).to_owned();
                if value.is_empty() {
                    return Err(problem(&file_setting, format!("{path} is empty")));
                }
                Ok(Some(Secret::new(value)))
            }
            (None, None) => Ok(None),
        }
    }

    fn parsed<T: std::str::FromStr>(&self, setting: &str, default: T, what: &str) -> Result<T, ConfigError> {
        match self.get(setting) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| problem(setting, format!("{v:?} is not {what}"))),
        }
    }

    fn flag(&self, setting: &str) -> Result<bool, ConfigError> {
        match self.get(setting).as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("false" | "0" | "no" | "off") => Ok(false),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some(v) => Err(problem(setting, format!("{v:?} is not true or false"))),
        }
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
    let known: Vec<String> =
        SETTINGS.iter().map(|(name, _, _)| name.trim_start_matches("KOOGATE_").to_ascii_lowercase()).collect();
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

        let current = src.secret("KOOGATE_ACCESS_KEY")?.ok_or_else(|| {
            problem("KOOGATE_ACCESS_KEY", "is required: the access key from the KooGallery seller console")
        })?;
        let mut access_keys = AccessKeys::new(current);
        if let Some(previous) = src.secret("KOOGATE_PREVIOUS_ACCESS_KEY")? {
            let until = match src.get("KOOGATE_PREVIOUS_ACCESS_KEY_UNTIL") {
                None => None,
                Some(v) => Some(
                    chrono::DateTime::parse_from_rfc3339(&v)
                        .map_err(|_| {
                            problem("KOOGATE_PREVIOUS_ACCESS_KEY_UNTIL", format!("{v:?} is not an RFC 3339 time"))
                        })?
                        .timestamp_millis(),
                ),
            };
            access_keys = access_keys.with_previous(previous, until);
        }

        let store = StoreSpec::parse(&src.get("KOOGATE_STORE").unwrap_or_else(|| "./data".into()));
        let key_prefix = src.get("KOOGATE_KEY_PREFIX").unwrap_or_else(|| "koogate:".into());
        if key_prefix.contains(['{', '}']) {
            return Err(problem(
                "KOOGATE_KEY_PREFIX",
                "must not contain { or } (they would break Redis Cluster hash tags)",
            ));
        }
        let data_dir = match (src.get("KOOGATE_DATA_DIR"), &store) {
            (Some(dir), _) => PathBuf::from(dir),
            (None, StoreSpec::Embedded(dir)) => dir.clone(),
            (None, _) => PathBuf::from("./data"),
        };

        let billing_url = src.get("KOOGATE_BILLING_URL");
        if let Some(url) = &billing_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(problem("KOOGATE_BILLING_URL", format!("{url:?} is not an http:// or https:// URL")));
            }
        }
        let billing_secret = src.secret("KOOGATE_BILLING_SECRET")?;
        if billing_url.is_some() && billing_secret.is_none() {
            return Err(problem(
                "KOOGATE_BILLING_SECRET",
                "is required when KOOGATE_BILLING_URL is set (events are signed)",
            ));
        }
        if let Some(secret) = &billing_secret {
            use base64::Engine;
            let ok = secret
                .expose()
                .strip_prefix("whsec_")
                .is_some_and(|b64| base64::engine::general_purpose::STANDARD.decode(b64).is_ok_and(|k| !k.is_empty()));
            if !ok {
                return Err(problem("KOOGATE_BILLING_SECRET", "must be whsec_ followed by Base64 of the signing key"));
            }
        }

        let frontend = src.get("KOOGATE_FRONTEND_URL");
        let frontend_url_is_default = frontend.is_none();
        let frontend_url = frontend.unwrap_or_else(|| "https://frontend.invalid/".into());
        if frontend_url.chars().count() > 512 {
            return Err(problem("KOOGATE_FRONTEND_URL", "is longer than 512 characters"));
        }
        let admin_url = src.get("KOOGATE_ADMIN_URL");

        let sku_map = match src.get("KOOGATE_SKU_MAP") {
            None => SkuMap::default(),
            Some(path) => SkuMap::load(Path::new(&path)).map_err(|e| problem("KOOGATE_SKU_MAP", e.to_string()))?,
        };

        let path = |setting: &str, default: &str| -> Result<String, ConfigError> {
            let p = src.get(setting).unwrap_or_else(|| default.into());
            if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
                return Err(problem(setting, format!("{p:?} is not an absolute path")));
            }
            Ok(p)
        };
        let v2_path = path("KOOGATE_V2_PATH", "/koogallery/v2")?;
        let v1_path = path("KOOGATE_V1_PATH", "/koogallery/v1")?;
        if v1_path == v2_path {
            return Err(problem("KOOGATE_V1_PATH", "must differ from KOOGATE_V2_PATH"));
        }

        let encrypt_type = match src.get("KOOGATE_ENCRYPT_TYPE") {
            None => EncryptType::Aes256,
            Some(v) => {
                EncryptType::parse(&v).ok_or_else(|| problem("KOOGATE_ENCRYPT_TYPE", format!("{v:?} is not 1 or 2")))?
            }
        };
        let log_format = match src.get("KOOGATE_LOG_FORMAT").as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(v) => return Err(problem("KOOGATE_LOG_FORMAT", format!("{v:?} is not text or json"))),
        };
        let log_filter = src.get("KOOGATE_LOG").unwrap_or_else(|| "info".into());
        check_log_filter(&log_filter)?;
        let positive = |setting: &str, default: u64| -> Result<u64, ConfigError> {
            let v: u64 = src.parsed(setting, default, "a whole number")?;
            if v == 0 {
                return Err(problem(setting, "must be greater than 0"));
            }
            Ok(v)
        };

        let marketplace_url_is_explicit = src.get("KOOGATE_MARKETPLACE_URL").is_some();
        let marketplace_url =
            src.get("KOOGATE_MARKETPLACE_URL").unwrap_or_else(|| "https://mkt.myhuaweicloud.com".into());
        if !(marketplace_url.starts_with("https://") || marketplace_url.starts_with("http://")) {
            return Err(problem("KOOGATE_MARKETPLACE_URL", format!("{marketplace_url:?} is not an https:// URL")));
        }
        let fallback_urls: Vec<String> = match src.get("KOOGATE_MARKETPLACE_FALLBACK_URLS") {
            None => crate::marketplace::default_fallbacks(&marketplace_url),
            Some(v) if v.trim().eq_ignore_ascii_case("none") => Vec::new(),
            Some(v) => v.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect(),
        };
        if let Some(bad) = fallback_urls
            .iter()
            .find(|u| !(u.starts_with("https://") || u.starts_with("http://")) || reqwest::Url::parse(u).is_err())
        {
            return Err(problem("KOOGATE_MARKETPLACE_FALLBACK_URLS", format!("{bad:?} is not an https:// URL")));
        }
        if marketplace_url.starts_with("http://")
            && !is_loopback_url(&marketplace_url)
            && !src.flag("KOOGATE_MARKETPLACE_ALLOW_HTTP")?
        {
            return Err(problem(
                "KOOGATE_MARKETPLACE_URL",
                format!(
                    "{marketplace_url:?} is plain http:// (signed order queries and usage in clear): use https://, \
                     or set KOOGATE_MARKETPLACE_ALLOW_HTTP=true"
                ),
            ));
        }
        let usage_batch = positive("KOOGATE_USAGE_BATCH", 1000)? as usize;
        if usage_batch > crate::marketplace::usage::MAX_BATCH {
            return Err(problem("KOOGATE_USAGE_BATCH", "must be at most 1000 (KooGallery's limit)"));
        }
        let credentials_given = src.get("KOOGATE_MARKETPLACE_AK").is_some()
            || src.get("KOOGATE_MARKETPLACE_AK_FILE").is_some()
            || src.get("KOOGATE_MARKETPLACE_SK").is_some()
            || src.get("KOOGATE_MARKETPLACE_SK_FILE").is_some();
        // A first run (nothing but an access key) must not push to the production usage API.
        let (push, push_reason) = match src.get("KOOGATE_USAGE_PUSH") {
            Some(_) if src.flag("KOOGATE_USAGE_PUSH")? => (true, "KOOGATE_USAGE_PUSH is true"),
            Some(_) => (false, "KOOGATE_USAGE_PUSH is false"),
            None if marketplace_url_is_explicit => (true, "KOOGATE_MARKETPLACE_URL is set"),
            None if credentials_given => (true, "KOOGATE_MARKETPLACE_AK/SK are set"),
            None => (false, "neither KOOGATE_MARKETPLACE_URL nor KOOGATE_MARKETPLACE_AK/SK is set"),
        };
        let usage = Usage {
            push,
            push_reason,
            url: marketplace_url.clone(),
            batch: usage_batch,
            timeout: Duration::from_millis(positive("KOOGATE_USAGE_TIMEOUT_MS", 10_000)?),
            lease: Duration::from_secs(positive("KOOGATE_USAGE_LEASE_SECS", 60)?),
            hold: Duration::from_secs(positive("KOOGATE_USAGE_HOLD_SECS", 60)?),
            poll: Duration::from_millis(positive("KOOGATE_USAGE_POLL_MS", 1000)?),
            fallback_urls: fallback_urls.clone(),
            apig: None,
        };
        let apig_sign = src.get("KOOGATE_USAGE_APIG_SIGN").is_none() || src.flag("KOOGATE_USAGE_APIG_SIGN")?;
        let mut usage = usage;
        let marketplace = match (src.secret("KOOGATE_MARKETPLACE_AK")?, src.secret("KOOGATE_MARKETPLACE_SK")?) {
            (Some(ak), Some(sk)) => Some(Marketplace {
                url: marketplace_url,
                fallback_urls,
                ak,
                sk,
                timeout: Duration::from_secs(positive("KOOGATE_MARKETPLACE_TIMEOUT_SECS", 5)?),
                cache_ttl: Duration::from_secs(positive("KOOGATE_ORDER_CACHE_SECS", 604_800)?),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(problem("KOOGATE_MARKETPLACE_SK", "is required when KOOGATE_MARKETPLACE_AK is set"))
            }
            (None, Some(_)) => {
                return Err(problem("KOOGATE_MARKETPLACE_AK", "is required when KOOGATE_MARKETPLACE_SK is set"))
            }
        };
        if apig_sign {
            usage.apig = marketplace.as_ref().map(|m| (m.ak.clone(), m.sk.clone()));
        }
        let tls = match (src.get("KOOGATE_TLS_CERT"), src.get("KOOGATE_TLS_KEY")) {
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (None, None) => None,
            (Some(_), None) => return Err(problem("KOOGATE_TLS_KEY", "is required when KOOGATE_TLS_CERT is set")),
            (None, Some(_)) => return Err(problem("KOOGATE_TLS_CERT", "is required when KOOGATE_TLS_KEY is set")),
        };

        Ok(Self {
            tls,
            listen: src.parsed(
                "KOOGATE_LISTEN",
                ([0, 0, 0, 0], 8080).into(),
                "a socket address such as 0.0.0.0:8080",
            )?,
            access_keys,
            store,
            key_prefix,
            data_dir,
            billing_url,
            billing_secret,
            admin_listen: src.parsed(
                "KOOGATE_ADMIN_LISTEN",
                ([127, 0, 0, 1], 9090).into(),
                "a socket address such as 127.0.0.1:9090",
            )?,
            admin_token: src.secret("KOOGATE_ADMIN_TOKEN")?,
            timestamp_skew_secs: positive("KOOGATE_TIMESTAMP_SKEW_SECS", 60)?,
            v1_timestamp_skew_secs: positive("KOOGATE_V1_TIMESTAMP_SKEW_SECS", DEFAULT_V1_TIMESTAMP_SKEW_SECS)?,
            frontend_url,
            frontend_url_is_default,
            admin_url,
            sku_map,
            forward_test_events: src.flag("KOOGATE_FORWARD_TEST_EVENTS")?,
            v2_path,
            v1_path,
            max_body_bytes: positive("KOOGATE_MAX_BODY_BYTES", 65_536)? as usize,
            encrypt_type,
            issue_credentials: src.flag("KOOGATE_ISSUE_CREDENTIALS")?,
            max_connections: positive("KOOGATE_MAX_CONNECTIONS", 10_000)? as usize,
            max_inflight: positive("KOOGATE_MAX_INFLIGHT", 1024)? as usize,
            request_timeout: Duration::from_secs(positive("KOOGATE_REQUEST_TIMEOUT_SECS", 10)?),
            body_timeout: Duration::from_millis(positive("KOOGATE_BODY_TIMEOUT_MS", 2000)?),
            max_conns_per_peer: src.parsed("KOOGATE_MAX_CONNS_PER_PEER", 256u64, "a whole number")? as usize,
            store_timeout: Duration::from_secs(positive("KOOGATE_STORE_TIMEOUT_SECS", 3)?),
            shutdown_grace: Duration::from_secs(positive("KOOGATE_SHUTDOWN_GRACE_SECS", 10)?),
            log_format,
            log_filter,
            warnings: Vec::new(),
            delivery_timeout: Duration::from_secs(positive("KOOGATE_DELIVERY_TIMEOUT_SECS", 10)?),
            retry: crate::backoff::Schedule {
                initial: Duration::from_millis(positive("KOOGATE_RETRY_INITIAL_MS", 5000)?),
                max: Duration::from_millis(positive("KOOGATE_RETRY_MAX_MS", 3_600_000)?),
                max_attempts: u32::try_from(positive("KOOGATE_RETRY_MAX_ATTEMPTS", 40)?)
                    .map_err(|_| problem("KOOGATE_RETRY_MAX_ATTEMPTS", "is too large"))?,
                give_up_after: Duration::from_secs(positive("KOOGATE_RETRY_GIVE_UP_SECS", 86_400)?),
            },
            delivery_visibility: Duration::from_secs(positive("KOOGATE_DELIVERY_VISIBILITY_SECS", 30)?),
            delivery_concurrency: positive("KOOGATE_DELIVERY_CONCURRENCY", 32)? as usize,
            usage,
            delivery_order_wait: Duration::from_secs(positive("KOOGATE_DELIVERY_ORDER_WAIT_SECS", 300)?),
            marketplace,
        })
    }
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

    #[test]
    fn defaults_need_only_the_access_key() {
        let c = Config::from_parts(env(&[("KOOGATE_ACCESS_KEY", "ak")]), None).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.store, StoreSpec::Embedded("./data".into()));
        assert_eq!(c.timestamp_skew_secs, 60);
        assert_eq!(c.v1_timestamp_skew_secs, 14_400);
        assert_eq!(c.max_body_bytes, 65_536);
        assert!(c.frontend_url_is_default);
        assert!(!format!("{c:?}").contains("\"ak\""), "secrets never print");
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
        assert_eq!(
            two.usage.fallback_urls,
            two.marketplace.map(|m| m.fallback_urls).unwrap_or(two.usage.fallback_urls.clone())
        );
        let keys = [("KOOGATE_MARKETPLACE_AK", "ak"), ("KOOGATE_MARKETPLACE_SK", "sk")];
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
        assert!(err(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_LISTEN", "nope")]).starts_with("KOOGATE_LISTEN:"));
        assert!(err(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_TIMESTAMP_SKEW_SECS", "-1")])
            .starts_with("KOOGATE_TIMESTAMP_SKEW_SECS:"));
        assert!(err(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_BILLING_SECRET", "nope")])
            .starts_with("KOOGATE_BILLING_SECRET:"));
        assert!(err(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_KEY_PREFIX", "x{y}")]).starts_with("KOOGATE_KEY_PREFIX:"));
        assert!(err(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_SKU_MAP", "/nonexistent.toml")])
            .starts_with("KOOGATE_SKU_MAP:"));
        assert!(
            err(&[("KOOGATE_ACCESS_KEY", "a"), ("KOOGATE_ACCESS_KEY_FILE", "/x")]).starts_with("KOOGATE_ACCESS_KEY:")
        );
        let msg = err(&[("KOOGATE_ACCESS_KEY", "topsecret"), ("KOOGATE_FORWARD_TEST_EVENTS", "maybe")]);
        assert!(msg.starts_with("KOOGATE_FORWARD_TEST_EVENTS:") && !msg.contains("topsecret"));
    }

    #[test]
    fn file_values_are_overridden_by_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("ak");
        std::fs::write(&key_file, "from-file\n").unwrap();
        let path = dir.path().join("koogate.toml");
        std::fs::write(
            &path,
            format!("access_key_file = {:?}\nlisten = \"127.0.0.1:1\"\ntimestamp_skew_secs = 30\nstore = \"redis://127.0.0.1:6379\"\n", key_file),
        )
        .unwrap();
        let c = Config::from_parts(env(&[("KOOGATE_LISTEN", "127.0.0.1:2")]), Some(&path)).unwrap();
        assert_eq!(c.access_keys.current().expose(), "from-file");
        assert_eq!(c.listen.to_string(), "127.0.0.1:2");
        assert_eq!(c.timestamp_skew_secs, 30);
        assert_eq!(c.store, StoreSpec::Redis("redis://127.0.0.1:6379".into()));
        std::fs::write(&path, "bogus = 1\n").unwrap();
        assert!(Config::from_parts(env(&[("KOOGATE_ACCESS_KEY", "a")]), Some(&path))
            .unwrap_err()
            .to_string()
            .contains("unknown key"));
    }

    #[test]
    fn unknown_variables_get_a_did_you_mean() {
        let names = ["KOOGATE_BILING_URL", "KOOGATE_ACCESS_KEY", "KOOGATE_ADMIN_TOKEN_FILE", "KOOGATE_ZZZ", "PATH"];
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let w = unknown_variables(&names);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("KOOGATE_BILING_URL") && w[0].contains("did you mean KOOGATE_BILLING_URL?"), "{w:?}");
        assert!(w[1].starts_with("KOOGATE_ZZZ") && !w[1].contains("did you mean"), "{w:?}");
        assert_eq!(did_you_mean("KOOGATE_ACESS_KEY_FILE").as_deref(), Some("KOOGATE_ACCESS_KEY_FILE"));
    }

    #[test]
    fn log_filters_are_checked() {
        assert!(check_log_filter("info").is_ok());
        assert!(check_log_filter("warn,koogate=debug").is_ok());
        assert!(check_log_filter("verbose").unwrap_err().to_string().starts_with("KOOGATE_LOG:"));
        assert!(check_log_filter("koogate=loud").is_err());
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
        let c = Config::from_parts(env(&[("KOOGATE_ACCESS_KEY", "a")]), None).unwrap();
        assert!(!c.usage.push, "{}", c.usage.push_reason);
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
