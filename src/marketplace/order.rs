//! The order query API (`GET {base}/api/mkp-openapi-public/global/v1/order/query`)
//! and the facts koogate takes from its answer.

use std::time::Duration;

use chrono::SecondsFormat;
use serde::Deserialize;
use serde_json::Value;

use crate::protocol::call::parse_compact_time;
use crate::secret::Secret;

pub const ORDER_QUERY_PATH: &str = "/api/mkp-openapi-public/global/v1/order/query";
/// `resultCode` of a successful answer.
pub const SUCCESS: &str = "MKT.0000";

/// The sites of the order query API.
pub const SITES: &[(&str, &str)] = &[
    ("China", "https://mkt.myhuaweicloud.com"),
    ("International", "https://mkt-intl.myhuaweicloud.com"),
    ("Europe", "https://mkt.myhuaweicloud.eu"),
];

/// An answer of the order query API (unknown fields kept out, missing ones tolerated).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OrderAnswer {
    pub result_code: String,
    pub result_msg: Option<String>,
    pub order_info: Option<OrderInfo>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OrderInfo {
    pub order_id: String,
    pub order_type: Option<String>,
    pub create_time: Option<String>,
    pub order_amount: Option<Value>,
    /// Some pages put the buyer here instead of in `buyerInfo`.
    pub customer_id: Option<String>,
    pub customer_name: Option<String>,
    pub order_line: Vec<OrderLine>,
    pub buyer_info: Option<BuyerInfo>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OrderLine {
    pub order_line_id: String,
    pub charging_mode: Option<String>,
    pub period_type: Option<String>,
    pub period_number: Option<Value>,
    pub expire_time: Option<String>,
    pub product_info: Vec<ProductInfo>,
    pub currency: Option<Value>,
    pub currency_after_discount: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProductInfo {
    pub product_id: Option<String>,
    pub sku_code: Option<String>,
    pub linear_value: Option<Value>,
    pub product_name: Option<String>,
}

#[derive(Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BuyerInfo {
    pub customer_id: Option<String>,
    pub customer_name: Option<String>,
    pub user_id: Option<String>,
    pub user_name: Option<String>,
}

impl std::fmt::Debug for BuyerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuyerInfo").field("customer_id", &self.customer_id).finish_non_exhaustive()
    }
}

fn text(v: &Option<Value>) -> Option<String> {
    match v.as_ref()? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// What an order says about one of its lines, in event terms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    pub customer_id: Option<String>,
    pub customer_name: Option<String>,
    pub order_type: Option<String>,
    pub product_id: Option<String>,
    pub sku_code: Option<String>,
    pub product_name: Option<String>,
    pub charging_mode: Option<String>,
    pub period_type: Option<String>,
    pub period_number: Option<u64>,
    /// RFC 3339 UTC.
    pub expire_time: Option<String>,
    /// Yuan, as a decimal string.
    pub amount: Option<String>,
    /// `linearValue`: e.g. the number of stored-value cards.
    pub quantity: Option<u64>,
}

impl OrderInfo {
    /// The facts of `line` (the first line when `line` is None or unknown).
    pub fn facts(&self, line: Option<&str>) -> Facts {
        let l = line
            .and_then(|id| self.order_line.iter().find(|l| l.order_line_id == id))
            .or_else(|| self.order_line.first());
        let buyer = self.buyer_info.clone().unwrap_or_default();
        let product = l.and_then(|l| l.product_info.first());
        Facts {
            customer_id: buyer.customer_id.or_else(|| self.customer_id.clone()).filter(|s| !s.is_empty()),
            customer_name: buyer.customer_name.or_else(|| self.customer_name.clone()).filter(|s| !s.is_empty()),
            order_type: self.order_type.clone(),
            product_id: product.and_then(|p| p.product_id.clone()),
            sku_code: product.and_then(|p| p.sku_code.clone()),
            product_name: product.and_then(|p| p.product_name.clone()),
            charging_mode: l.and_then(|l| l.charging_mode.clone()),
            period_type: l.and_then(|l| l.period_type.clone()),
            period_number: l.and_then(|l| text(&l.period_number)).and_then(|n| n.parse().ok()),
            expire_time: l
                .and_then(|l| l.expire_time.as_deref())
                .and_then(|t| parse_compact_time("expireTime", t).ok())
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)),
            amount: l
                .and_then(|l| text(&l.currency_after_discount).or_else(|| text(&l.currency)))
                .or_else(|| text(&self.order_amount)),
            quantity: product.and_then(|p| text(&p.linear_value)).and_then(|q| q.split('.').next()?.parse().ok()),
        }
    }
}

/// Which credential fault KooGallery (or API Gateway in front of it) reported.
///
/// Huawei's error table of "Querying an Order"
/// (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649116.html>,
/// table mirrored at <https://huaweicloud.com/guide/productsdesc-bms_0dff4d8a9ede975f6674698a8064dbbesupport0>):
/// `401 MKT.0150` illegal operation (the order is not of a product of the
/// AK/SK's seller), `401 MKT.0151` no authority (the AK/SK's account has no
/// seller role), `401 MKT.0154` illegal token. API Gateway's own refusal of
/// the AK/SK signature is `401 APIGW.*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialFault {
    /// API Gateway refused the AK/SK signature (`APIGW.*`, or 401/403 without a KooGallery code).
    Signature,
    /// `MKT.0150`: the order belongs to a product of another seller than the AK/SK's.
    IllegalOperation,
    /// `MKT.0151`: the AK/SK's account has no seller role (no API access).
    NoAuthority,
    /// `MKT.0154`: the token derived from the AK/SK is invalid.
    IllegalToken,
}

impl CredentialFault {
    /// The fault of a documented code, if it is one.
    pub fn of_code(code: &str) -> Option<Self> {
        match code {
            "MKT.0150" => Some(Self::IllegalOperation),
            "MKT.0151" => Some(Self::NoAuthority),
            "MKT.0154" => Some(Self::IllegalToken),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Signature => "credentials_signature",
            Self::IllegalOperation => "credentials_illegal_operation",
            Self::NoAuthority => "credentials_no_authority",
            Self::IllegalToken => "credentials_illegal_token",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            Self::Signature => "API Gateway refused the AK/SK signature: check KOOGATE_MARKETPLACE_AK/SK",
            Self::IllegalOperation => {
                "illegal operation: the order is not of a product published by the AK/SK's seller account"
            }
            Self::NoAuthority => "no API access: the AK/SK's account does not have the seller role",
            Self::IllegalToken => "illegal token: KooGallery could not authenticate the AK/SK",
        }
    }
}

impl std::fmt::Display for CredentialFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.explain())
    }
}

/// Why an order could not be had. There is no "order not found": the
/// documented table has no such code (see
/// [`crate::protocol::unconfirmed::ORDER_UNKNOWN_EXPECTED_CODE`]).
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("KooGallery refused our credentials (HTTP {status}, {code}): {fault}: {message}")]
    Credentials { status: u16, code: String, fault: CredentialFault, message: String },
    #[error("KooGallery found the query invalid (HTTP {status}, {code}: input validation; an order it does not know, or not yet, is answered so): {message}")]
    Invalid { status: u16, code: String, message: String },
    #[error("KooGallery limits our call rate (HTTP {status}, {code}): {message}")]
    RateLimited { status: u16, code: String, message: String },
    #[error("KooGallery failed internally (HTTP {status}, {code}): {message}")]
    Unavailable { status: u16, code: String, message: String },
    #[error("KooGallery answered HTTP {status}, {code}: {message}")]
    Refused { status: u16, code: String, message: String },
    #[error("KooGallery's answer is malformed: {0}")]
    Malformed(String),
    #[error("order query failed: {0}")]
    Transport(String),
}

impl OrderError {
    /// The `outcome` label of `koogate_order_queries_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Credentials { fault, .. } => fault.label(),
            Self::Invalid { .. } => "invalid",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable { .. } => "unavailable",
            Self::Refused { .. } => "refused",
            Self::Malformed(_) => "malformed",
            Self::Transport(_) => "transport",
        }
    }

    /// Could the host not be reached at all (the only case the fallback host is tried)?
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Transport(_))
    }
}

/// `resultCode`/`resultMsg` of any answer (API Gateway's own errors say `error_code`/`error_msg`).
#[derive(Default, Deserialize)]
#[serde(default)]
struct Codes {
    #[serde(rename = "resultCode", alias = "error_code")]
    code: Option<String>,
    #[serde(rename = "resultMsg", alias = "error_msg")]
    msg: Option<String>,
}

/// Parses an answer body; `Ok` only for a success with an `orderInfo`.
/// Every error is read from Huawei's documented table (see [`CredentialFault`]):
/// `500 MKT.0100`, `400 MKT.0101/0199` input faults; `401 MKT.0150/0151/0154`
/// credential faults; `406 MKT.0250` rate limit; `500 MKT.0999` internal error.
pub fn parse_answer(_order_id: &str, status: u16, body: &[u8]) -> Result<OrderInfo, OrderError> {
    let codes: Codes = serde_json::from_slice(body).unwrap_or_default();
    let code = codes.code.clone().filter(|c| !c.is_empty()).unwrap_or_default();
    let message =
        codes.msg.clone().unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect::<String>());
    if (200..300).contains(&status) && code == SUCCESS {
        let answer: OrderAnswer = serde_json::from_slice(body).map_err(|e| OrderError::Malformed(e.to_string()))?;
        return answer.order_info.ok_or_else(|| OrderError::Malformed("MKT.0000 without orderInfo".into()));
    }
    if let Some(fault) = CredentialFault::of_code(&code) {
        return Err(OrderError::Credentials { status, code, fault, message });
    }
    if status == 401 || status == 403 {
        return Err(OrderError::Credentials { status, code, fault: CredentialFault::Signature, message });
    }
    match code.as_str() {
        "MKT.0100" | "MKT.0101" | "MKT.0199" => return Err(OrderError::Invalid { status, code, message }),
        "MKT.0250" => return Err(OrderError::RateLimited { status, code, message }),
        "MKT.0999" => return Err(OrderError::Unavailable { status, code, message }),
        _ => {}
    }
    if status == 406 || status == 429 {
        return Err(OrderError::RateLimited { status, code, message });
    }
    if status >= 500 {
        return Err(OrderError::Unavailable { status, code, message });
    }
    if code.is_empty() && (200..300).contains(&status) {
        return Err(OrderError::Malformed(format!("no resultCode in: {message}")));
    }
    Err(OrderError::Refused { status, code, message })
}

/// A pooled, verifying HTTPS client of the order query API. When a host
/// cannot be reached (a transport error or a timeout, never a refusal) the
/// next one of its list is tried: the documented fallback
/// (`KOOGATE_MARKETPLACE_FALLBACK_URLS`, [`super::FALLBACK_CN`] by default).
#[derive(Clone)]
pub struct OrderApi {
    http: reqwest::Client,
    bases: Vec<reqwest::Url>,
    ak: Secret,
    sk: Secret,
}

impl OrderApi {
    pub fn new(base: &str, ak: Secret, sk: Secret, timeout: Duration) -> Result<Self, OrderError> {
        Self::with_fallbacks(base, &[], ak, sk, timeout)
    }

    /// `base` first, then each of `fallbacks` when the previous one cannot be reached.
    pub fn with_fallbacks(
        base: &str,
        fallbacks: &[String],
        ak: Secret,
        sk: Secret,
        timeout: Duration,
    ) -> Result<Self, OrderError> {
        let bases = super::bases(base, fallbacks).map_err(OrderError::Transport)?;
        let http = super::http_client(timeout).map_err(|e| OrderError::Transport(e.to_string()))?;
        Ok(Self { http, bases, ak, sk })
    }

    /// Queries one order (line); returns the raw answer body with the parsed order.
    pub async fn query(&self, order_id: &str, order_line_id: Option<&str>) -> Result<(String, OrderInfo), OrderError> {
        self.query_on(order_id, order_line_id).await.1
    }

    /// [`Self::query`], with the `host` label of the host that answered (or was tried last).
    pub async fn query_on(
        &self,
        order_id: &str,
        order_line_id: Option<&str>,
    ) -> (String, Result<(String, OrderInfo), OrderError>) {
        let mut unreachable = Vec::new();
        let mut host = String::new();
        for base in &self.bases {
            host = super::host_label(base);
            let result = self.query_one(base, order_id, order_line_id).await;
            match result {
                Err(OrderError::Transport(e)) => {
                    tracing::warn!(%host, error = %e, "order query: host cannot be reached; trying the next one");
                    unreachable.push(format!("{host}: {e}"));
                }
                other => return (host, other),
            }
        }
        (host, Err(OrderError::Transport(unreachable.join("; "))))
    }

    async fn query_one(
        &self,
        base: &reqwest::Url,
        order_id: &str,
        order_line_id: Option<&str>,
    ) -> Result<(String, OrderInfo), OrderError> {
        let mut url = base.join(ORDER_QUERY_PATH).map_err(|e| OrderError::Transport(e.to_string()))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("orderId", order_id);
            if let Some(line) = order_line_id {
                q.append_pair("orderLineId", line);
            }
        }
        let mut req = self.http.get(url.clone()).header("content-type", "application/json");
        for (name, value) in super::apig_headers("GET", &url, b"", self.ak.expose(), self.sk.expose()) {
            req = req.header(name, value);
        }
        let res = req.send().await.map_err(|e| {
            OrderError::Transport(if e.is_timeout() { "timed out".into() } else { crate::error_chain(&e) })
        })?;
        let status = res.status().as_u16();
        let body = res.bytes().await.map_err(|e| OrderError::Transport(e.to_string()))?;
        let info = parse_answer(order_id, status, &body)?;
        Ok((String::from_utf8_lossy(&body).into_owned(), info))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer observed for the mock order MOCKPERIODYEARNEW (koogallery-openapi.md).
    const MOCK: &str = r#"{"resultCode":"MKT.0000","resultMsg":"Success","orderInfo":{"orderId":"MOCKPERIODYEARNEW","orderType":"NEW","createTime":"20241121090846","orderLine":[{"orderLineId":"MOCKPERIODYEARNEW-000001","chargingMode":"PERIOD","periodType":"year","periodNumber":1,"expireTime":"20251121235959","productInfo":[{"productId":"OFFI846204237451911168","skuCode":"0a4d1578-5295-46a7-92d4-7c803dccc51d","linearValue":50,"productName":"MOCK测试商品,测试规格,基础版,包周期"}],"extendParams":[{"name":"emailDomainName","value":"test.xxxx.com"},{"name":"ip","value":"127.0.0.1"}],"currency":"100","currencyAfterDiscount":"100"}],"buyerInfo":{"mobilePhone":"18688888888","email":null,"customerId":"459bbbec25d24749b2eb83be37b602a8","customerName":"mock_user_01","customerRealName":"测试用户1","customerType":0,"userId":null,"userName":null},"extendParams":[]}}"#;

    #[test]
    fn facts_of_the_mock_answer() {
        let info = parse_answer("MOCKPERIODYEARNEW", 200, MOCK.as_bytes()).unwrap();
        let f = info.facts(Some("MOCKPERIODYEARNEW-000001"));
        assert_eq!(f.customer_id.as_deref(), Some("459bbbec25d24749b2eb83be37b602a8"));
        assert_eq!(f.customer_name.as_deref(), Some("mock_user_01"));
        assert_eq!(f.order_type.as_deref(), Some("NEW"));
        assert_eq!(f.sku_code.as_deref(), Some("0a4d1578-5295-46a7-92d4-7c803dccc51d"));
        assert_eq!(f.quantity, Some(50));
        assert_eq!(f.period_number, Some(1));
        assert_eq!(f.expire_time.as_deref(), Some("2025-11-21T23:59:59.000Z"));
        assert_eq!(f.amount.as_deref(), Some("100"));
        assert_eq!(f.charging_mode.as_deref(), Some("PERIOD"));
        assert!(!format!("{:?}", info.buyer_info).contains("18688888888"), "contact data is not printed");
    }

    #[test]
    fn errors_follow_the_documented_table() {
        let e = |status, body: &[u8]| parse_answer("X", status, body).unwrap_err();
        for (code, fault) in [
            ("MKT.0150", CredentialFault::IllegalOperation),
            ("MKT.0151", CredentialFault::NoAuthority),
            ("MKT.0154", CredentialFault::IllegalToken),
        ] {
            let body = format!(r#"{{"resultCode":"{code}","resultMsg":"x"}}"#);
            match e(401, body.as_bytes()) {
                OrderError::Credentials { fault: f, code: c, .. } => assert_eq!((f, c.as_str()), (fault, code)),
                other => panic!("{code}: {other:?}"),
            }
        }
        let apigw = e(401, br#"{"error_code":"APIGW.0301","error_msg":"Incorrect IAM authentication information"}"#);
        assert!(matches!(apigw, OrderError::Credentials { fault: CredentialFault::Signature, .. }), "{apigw:?}");
        assert_eq!(apigw.label(), "credentials_signature");
        // MKT.0100 is input validation, sent with HTTP 500: not "not found", not a retryable 500.
        let invalid = e(500, br#"{"resultCode":"MKT.0100","resultMsg":"Failure of input parameter"}"#);
        assert!(matches!(invalid, OrderError::Invalid { status: 500, .. }), "{invalid:?}");
        assert!(invalid.to_string().contains("input validation"));
        assert!(matches!(
            e(400, br#"{"resultCode":"MKT.0101","resultMsg":"Invalid parameter"}"#),
            OrderError::Invalid { .. }
        ));
        assert!(matches!(
            e(406, br#"{"resultCode":"MKT.0250","resultMsg":"overlimit"}"#),
            OrderError::RateLimited { .. }
        ));
        assert!(matches!(
            e(500, br#"{"resultCode":"MKT.0999","resultMsg":"System internal error."}"#),
            OrderError::Unavailable { .. }
        ));
        assert!(matches!(e(502, b""), OrderError::Unavailable { status: 502, .. }));
        assert!(matches!(e(200, b"not json"), OrderError::Malformed(_)));
        assert!(matches!(e(200, br#"{"resultCode":"MKT.0000"}"#), OrderError::Malformed(_)));
        assert!(matches!(e(200, br#"{"resultCode":"MKT.1234","resultMsg":"?"}"#), OrderError::Refused { .. }));
        assert!(!e(500, b"").is_unreachable());
    }
}
