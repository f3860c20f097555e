//! KooGallery's seller open API: the order query, signed with API Gateway
//! AK/SK signing ([`apig`]), and the usage push ([`usage`]).

pub mod apig;
pub mod order;
pub mod usage;

/// A pooled HTTPS client for KooGallery's open API with a per-call timeout.
pub fn http_client(timeout: std::time::Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(std::time::Duration::from_secs(5)))
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .user_agent(concat!("koogate/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Where Huawei says to retry when the China host cannot be reached: "If
/// mkt.myhuaweicloud.com (mkt-intl.myhuaweicloud.com) is unavailable, try
/// mkt.myhuaweicloud.cn"
/// (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649117.html>,
/// and the order query's notes).
pub const FALLBACK_CN: &str = "https://mkt.myhuaweicloud.cn";

/// The fallback list when `KOOGATE_MARKETPLACE_FALLBACK_URLS` is not set:
/// [`FALLBACK_CN`] behind the China and International sites (as documented),
/// nothing behind any other URL (the Europe site, a test stand-in: usage must
/// never go to a host the operator did not name).
pub fn default_fallbacks(primary: &str) -> Vec<String> {
    let host = reqwest::Url::parse(primary).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
    if matches!(host.as_str(), "mkt.myhuaweicloud.com" | "mkt-intl.myhuaweicloud.com") {
        vec![FALLBACK_CN.to_owned()]
    } else {
        Vec::new()
    }
}

/// The `host` label of a base URL: its host, with the port when one is given
/// (bounded: only configured URLs are labelled).
pub fn host_label(url: &reqwest::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

/// Parses the primary URL and its fallbacks, in the order they are tried.
pub fn bases(primary: &str, fallbacks: &[String]) -> Result<Vec<reqwest::Url>, String> {
    std::iter::once(primary)
        .chain(fallbacks.iter().map(String::as_str))
        .map(|u| reqwest::Url::parse(u).map_err(|e| format!("bad marketplace URL {u}: {e}")))
        .collect()
}

/// The API Gateway signature headers (`X-Sdk-Date`, `Authorization`) of a request to `url`.
pub fn apig_headers(method: &str, url: &reqwest::Url, body: &[u8], ak: &str, sk: &str) -> [(&'static str, String); 2] {
    let query: Vec<(String, String)> = url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let date = chrono::Utc::now().format(apig::DATE_FORMAT).to_string();
    let headers = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("host".to_owned(), host_label(url)),
        ("x-sdk-date".to_owned(), date.clone()),
    ];
    let authorization =
        apig::Request { method, path: url.path(), query: &query, headers: &headers, body }.authorization(ak, sk);
    [("x-sdk-date", date), ("authorization", authorization)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallbacks_only_behind_the_documented_hosts() {
        assert_eq!(default_fallbacks("https://mkt.myhuaweicloud.com"), [FALLBACK_CN]);
        assert_eq!(default_fallbacks("https://mkt-intl.myhuaweicloud.com/"), [FALLBACK_CN]);
        assert!(default_fallbacks("https://mkt.myhuaweicloud.eu").is_empty());
        assert!(default_fallbacks("http://127.0.0.1:9300").is_empty());
        let b = bases("http://127.0.0.1:1", &["https://mkt.myhuaweicloud.cn".into()]).unwrap();
        assert_eq!(b.iter().map(host_label).collect::<Vec<_>>(), ["127.0.0.1:1", "mkt.myhuaweicloud.cn"]);
    }
}
