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
