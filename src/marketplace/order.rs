//! The order query API (`GET {base}/api/mkp-openapi-public/global/v1/order/query`)
//! and the facts koogate takes from its answer.

use std::time::Duration;

use chrono::SecondsFormat;
use serde::Deserialize;
use serde_json::Value;

use super::apig;
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

/// Why an order could not be had.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("KooGallery refused our AK/SK signature (HTTP {status}): {message}")]
    AuthRefused { status: u16, message: String },
    #[error("KooGallery does not know order {0}")]
    NotFound(String),
    #[error("KooGallery answered {code}: {message}")]
    Refused { code: String, message: String },
    #[error("KooGallery's answer is malformed: {0}")]
    Malformed(String),
    #[error("order query failed: {0}")]
    Transport(String),
}

impl OrderError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::AuthRefused { .. } => "auth_refused",
            Self::NotFound(_) => "not_found",
            Self::Refused { .. } => "refused",
            Self::Malformed(_) => "malformed",
            Self::Transport(_) => "transport",
        }
    }
}

/// Parses an answer body; `Ok` only for a success with an `orderInfo`.
pub fn parse_answer(order_id: &str, status: u16, body: &[u8]) -> Result<OrderInfo, OrderError> {
    if status == 401 || status == 403 {
        let message = String::from_utf8_lossy(body).chars().take(200).collect();
        return Err(OrderError::AuthRefused { status, message });
    }
    if status == 404 {
        return Err(OrderError::NotFound(order_id.to_owned()));
    }
    if !(200..300).contains(&status) {
        return Err(OrderError::Transport(format!("HTTP {status}")));
    }
    let answer: OrderAnswer = serde_json::from_slice(body).map_err(|e| OrderError::Malformed(e.to_string()))?;
    let message = answer.result_msg.clone().unwrap_or_default();
    if answer.result_code != SUCCESS {
        if crate::protocol::unconfirmed::order_not_found(&answer.result_code, &message) {
            return Err(OrderError::NotFound(order_id.to_owned()));
        }
        return Err(OrderError::Refused { code: answer.result_code, message });
    }
    answer.order_info.ok_or_else(|| OrderError::NotFound(order_id.to_owned()))
}

/// A pooled, verifying HTTPS client of the order query API.
#[derive(Clone)]
pub struct OrderApi {
    http: reqwest::Client,
    base: reqwest::Url,
    ak: Secret,
    sk: Secret,
}

impl OrderApi {
    pub fn new(base: &str, ak: Secret, sk: Secret, timeout: Duration) -> Result<Self, OrderError> {
        let base = reqwest::Url::parse(base).map_err(|e| OrderError::Transport(format!("bad URL {base}: {e}")))?;
        let http = super::http_client(timeout).map_err(|e| OrderError::Transport(e.to_string()))?;
        Ok(Self { http, base, ak, sk })
    }

    /// Queries one order (line); returns the raw answer body with the parsed order.
    pub async fn query(&self, order_id: &str, order_line_id: Option<&str>) -> Result<(String, OrderInfo), OrderError> {
        let mut url = self.base.join(ORDER_QUERY_PATH).map_err(|e| OrderError::Transport(e.to_string()))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("orderId", order_id);
            if let Some(line) = order_line_id {
                q.append_pair("orderLineId", line);
            }
        }
        let query: Vec<(String, String)> = url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        let date = chrono::Utc::now().format(apig::DATE_FORMAT).to_string();
        let headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("host".to_owned(), host),
            ("x-sdk-date".to_owned(), date.clone()),
        ];
        let authorization =
            apig::Request { method: "GET", path: url.path(), query: &query, headers: &headers, body: b"" }
                .authorization(self.ak.expose(), self.sk.expose());
        let res = self
            .http
            .get(url.clone())
            .header("content-type", "application/json")
            .header("x-sdk-date", date)
            .header("authorization", authorization)
            .send()
            .await
            .map_err(|e| OrderError::Transport(if e.is_timeout() { "timed out".into() } else { e.to_string() }))?;
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
    fn refusals_are_typed() {
        assert!(matches!(parse_answer("X", 401, b"{}"), Err(OrderError::AuthRefused { status: 401, .. })));
        assert!(matches!(parse_answer("X", 500, b""), Err(OrderError::Transport(_))));
        assert!(matches!(parse_answer("X", 200, b"not json"), Err(OrderError::Malformed(_))));
        assert!(matches!(
            parse_answer("X", 200, br#"{"resultCode":"MKT.0100","resultMsg":"The order does not exist."}"#),
            Err(OrderError::NotFound(_))
        ));
        assert!(matches!(
            parse_answer("X", 200, br#"{"resultCode":"MKT.9999","resultMsg":"system busy"}"#),
            Err(OrderError::Refused { .. })
        ));
        assert!(matches!(parse_answer("X", 200, br#"{"resultCode":"MKT.0000"}"#), Err(OrderError::NotFound(_))));
    }
}
