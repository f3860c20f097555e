//! The order book of the simulated order query API: the nine mock orders of
//! KooGallery's seller console and the orders the scenarios buy, renew and
//! upgrade, as `orderInfo` objects shaped like the answer observed for
//! `MOCKPERIODYEARNEW` (`koogallery-openapi.md` §1).
//!
//! Scenario orders are *templates* (`SIMSUBNEW`, …): a run uses
//! `<template>-<run id>` (line `<template>-<run id>-000001`) so reruns against
//! one gateway never collide, and the book answers such an id with a copy of
//! its template, ids rewritten. So an order server in one process serves the
//! orders of scenarios run from another.

use std::collections::BTreeMap;
use std::path::Path;

use rand::Rng;
use serde_json::{json, Map, Value};

use super::SimulateError;

/// The id of an order's only line: `<orderId>-000001`.
pub fn line_id(order_id: &str) -> String {
    format!("{order_id}-000001")
}

/// The id a run gives a template order: `<template>-<run id>`.
pub fn run_order_id(template: &str, run_id: &str) -> String {
    format!("{template}-{run_id}")
}

/// A run id: 1 to 32 ASCII letters and digits, the first a letter (so a line
/// suffix like `000001` is never mistaken for one).
pub fn is_run_id(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric())
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
}

/// A fresh run id: `R` and 7 uppercase letters or digits.
pub fn new_run_id() -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    let tail: String = (0..7).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect();
    format!("R{tail}")
}

/// Who bought an order (`buyerInfo`).
#[derive(Clone, Copy, Debug)]
pub struct Buyer {
    pub customer_id: &'static str,
    pub customer_name: &'static str,
    pub real_name: &'static str,
    pub mobile_phone: &'static str,
}

/// The buyer of the mock orders, as in the observed answer.
pub const MOCK_BUYER: Buyer = Buyer {
    customer_id: "459bbbec25d24749b2eb83be37b602a8",
    customer_name: "mock_user_01",
    real_name: "测试用户1",
    mobile_phone: "18688888888",
};

/// The buyer of the subscription scenarios.
pub const SIM_BUYER: Buyer = Buyer {
    customer_id: "6f1d2c3b4a5948d7b6e5f4a3b2c1d0e9",
    customer_name: "sim_customer_02",
    real_name: "模拟用户2",
    mobile_phone: "18600000002",
};

/// One order with one line and one product.
#[derive(Clone, Copy, Debug)]
pub struct OrderSpec {
    pub id: &'static str,
    /// `NEW`, `TRIAL`, `TRIAL_TO_FORMAL`, `RENEW`, `CHANGE`, `UNSUBSCRIBE`.
    pub order_type: &'static str,
    /// `yyyyMMddHHmmss`.
    pub create_time: &'static str,
    /// `PERIOD`, `ONE_TIME`, `ON_DEMAND`, `ON_DEMAND_PKG`.
    pub charging_mode: &'static str,
    pub period_type: Option<&'static str>,
    pub period_number: Option<u32>,
    /// `yyyyMMddHHmmss`.
    pub expire_time: Option<&'static str>,
    pub product_id: &'static str,
    pub sku_code: &'static str,
    /// Quantity of a linearly priced SKU (e.g. stored-value cards).
    pub linear_value: Option<u64>,
    pub product_name: &'static str,
    /// Yuan, as the API writes it (`currency` and `currencyAfterDiscount`).
    pub amount: &'static str,
    pub buyer: Buyer,
    /// The line's `extendParams` of the observed mock answer.
    pub mock_extend_params: bool,
}

const MOCK_PRODUCT: &str = "OFFI846204237451911168";
const MOCK_SKU: &str = "0a4d1578-5295-46a7-92d4-7c803dccc51d";

const fn mock(
    id: &'static str,
    order_type: &'static str,
    charging_mode: &'static str,
    period: Option<(&'static str, u32)>,
    expire_time: Option<&'static str>,
    product_name: &'static str,
) -> OrderSpec {
    let (period_type, period_number) = match period {
        Some((t, n)) => (Some(t), Some(n)),
        None => (None, None),
    };
    OrderSpec {
        id,
        order_type,
        create_time: "20241121090846",
        charging_mode,
        period_type,
        period_number,
        expire_time,
        product_id: MOCK_PRODUCT,
        sku_code: MOCK_SKU,
        linear_value: Some(50),
        product_name,
        amount: "100",
        buyer: MOCK_BUYER,
        mock_extend_params: true,
    }
}

/// The nine mock orders KooGallery's seller console and twice-daily probes use.
pub const MOCK_ORDERS: [OrderSpec; 9] = [
    mock(
        "MOCKPERIODYEARNEW",
        "NEW",
        "PERIOD",
        Some(("year", 1)),
        Some("20251121235959"),
        "MOCK测试商品,测试规格,基础版,包周期",
    ),
    mock("MOCKONETIMENEW", "NEW", "ONE_TIME", None, None, "MOCK测试商品,测试规格,基础版,一次性"),
    mock("MOCKONDEMAND", "NEW", "ON_DEMAND", None, None, "MOCK测试商品,测试规格,基础版,按需"),
    mock(
        "MOCKONDEMANDPKG",
        "NEW",
        "ON_DEMAND_PKG",
        Some(("year", 1)),
        Some("20251121235959"),
        "MOCK测试商品,测试规格,基础版,按需套餐包",
    ),
    mock(
        "MOCKPERIODDAYTRIAL",
        "TRIAL",
        "PERIOD",
        Some(("day", 7)),
        Some("20241128235959"),
        "MOCK测试商品,测试规格,基础版,试用",
    ),
    mock(
        "MOCKMONTYTRIALTOFORMAL",
        "TRIAL_TO_FORMAL",
        "PERIOD",
        Some(("month", 1)),
        Some("20241221235959"),
        "MOCK测试商品,测试规格,基础版,试用转正",
    ),
    mock(
        "MOCKMONTYUNSUBSCRIBE",
        "UNSUBSCRIBE",
        "PERIOD",
        Some(("month", 1)),
        Some("20241221235959"),
        "MOCK测试商品,测试规格,基础版,退订",
    ),
    mock(
        "MOCKMONTYRENEW",
        "RENEW",
        "PERIOD",
        Some(("month", 1)),
        Some("20250121235959"),
        "MOCK测试商品,测试规格,基础版,续费",
    ),
    mock(
        "MOCKMONTYCHANGE",
        "CHANGE",
        "PERIOD",
        Some(("month", 1)),
        Some("20241221235959"),
        "MOCK测试商品,测试规格,专业版,变更",
    ),
];

/// Product of the subscription scenarios (`account_settlement`: not in the SKU map).
pub const SIM_PRODUCT: &str = "OFFI900000000000000001";
pub const SIM_SKU_PRO: &str = "sim-pro-monthly";
pub const SIM_SKU_ENTERPRISE: &str = "sim-enterprise-monthly";
/// Product of the stored-value cards (`svc-card-100` is a stored-value card in `fixtures/sku-map.toml`).
pub const SVC_PRODUCT: &str = "OFFI900000000000000100";
pub const SVC_SKU: &str = "svc-card-100";

const fn sim(
    id: &'static str,
    order_type: &'static str,
    create_time: &'static str,
    period: (&'static str, u32),
    expire_time: &'static str,
    sku_code: &'static str,
    amount: &'static str,
) -> OrderSpec {
    OrderSpec {
        id,
        order_type,
        create_time,
        charging_mode: "PERIOD",
        period_type: Some(period.0),
        period_number: Some(period.1),
        expire_time: Some(expire_time),
        product_id: SIM_PRODUCT,
        sku_code,
        linear_value: None,
        product_name: "Simulated SaaS, Pro edition, monthly",
        amount,
        buyer: SIM_BUYER,
        mock_extend_params: false,
    }
}

/// The template orders of the V2 scenarios (V1 calls carry their own details).
pub const SCENARIO_ORDERS: [OrderSpec; 9] = [
    OrderSpec {
        id: "SIMSVCCARDS",
        order_type: "NEW",
        create_time: "20261126093000",
        charging_mode: "ONE_TIME",
        period_type: None,
        period_number: None,
        expire_time: None,
        product_id: SVC_PRODUCT,
        sku_code: SVC_SKU,
        linear_value: Some(50),
        product_name: "Stored-value card, 100 CNY",
        amount: "5000.00",
        buyer: MOCK_BUYER,
        mock_extend_params: false,
    },
    sim("SIMSUBNEW", "NEW", "20261126093000", ("month", 1), "20261226235959", SIM_SKU_PRO, "99.00"),
    sim("SIMSUBRENEW", "RENEW", "20261220100000", ("month", 1), "20270126235959", SIM_SKU_PRO, "99.00"),
    sim("SIMSUBRENEWLATE", "RENEW", "20270128100000", ("month", 1), "20270226235959", SIM_SKU_PRO, "99.00"),
    sim("SIMSUBUPGRADE", "CHANGE", "20270201100000", ("month", 1), "20270226235959", SIM_SKU_ENTERPRISE, "150.00"),
    sim("SIMSUBUNSUB", "UNSUBSCRIBE", "20270210100000", ("month", 1), "20270210100000", SIM_SKU_ENTERPRISE, "0.00"),
    sim("SIMTRIALNEW", "TRIAL", "20261126093000", ("day", 7), "20261203235959", SIM_SKU_PRO, "0.00"),
    sim("SIMTRIALFORMAL", "TRIAL_TO_FORMAL", "20261202100000", ("month", 1), "20270102235959", SIM_SKU_PRO, "99.00"),
    sim("SIMDEDUPNEW", "NEW", "20261126093000", ("year", 1), "20271126235959", SIM_SKU_PRO, "990.00"),
];

/// Product of the pay-per-use scenario: one instance per workspace, usage pushed hourly.
pub const PPU_PRODUCT: &str = "OFFI900000000000000200";
pub const PPU_SKU: &str = "sim-ppu-workspace-hour";

const fn ppu(id: &'static str) -> OrderSpec {
    OrderSpec {
        id,
        order_type: "NEW",
        create_time: "20261126093000",
        charging_mode: "ON_DEMAND",
        period_type: None,
        period_number: None,
        expire_time: None,
        product_id: PPU_PRODUCT,
        sku_code: PPU_SKU,
        linear_value: None,
        product_name: "Simulated SaaS, pay per use, per workspace-hour",
        amount: "0.00",
        buyer: SIM_BUYER,
        mock_extend_params: false,
    }
}

/// The template orders of `account-settlement-usage`: three workspaces of one
/// customer, each a pay-per-use (`ON_DEMAND`) order. Not in
/// [`OrderBook::generated`] (whose copy is `fixtures/orders.json`): added by
/// [`OrderBook::with_usage_orders`].
pub const USAGE_ORDERS: [OrderSpec; 3] = [ppu("SIMPPUWSA"), ppu("SIMPPUWSB"), ppu("SIMPPUWSC")];

/// A scenario order by template id.
pub fn scenario_order(id: &str) -> Option<&'static OrderSpec> {
    SCENARIO_ORDERS.iter().chain(USAGE_ORDERS.iter()).find(|o| o.id == id)
}

impl OrderSpec {
    /// The `orderInfo` object of this order.
    pub fn order_info(&self) -> Value {
        let mut line = json!({
            "orderLineId": line_id(self.id),
            "chargingMode": self.charging_mode,
            "periodType": self.period_type,
            "periodNumber": self.period_number,
            "expireTime": self.expire_time,
            "productInfo": [{
                "productId": self.product_id,
                "skuCode": self.sku_code,
                "linearValue": self.linear_value,
                "productName": self.product_name,
            }],
            "currency": self.amount,
            "currencyAfterDiscount": self.amount,
        });
        if self.mock_extend_params {
            if let Some(l) = line.as_object_mut() {
                l.insert(
                    "extendParams".into(),
                    json!([{"name": "emailDomainName", "value": "test.xxxx.com"}, {"name": "ip", "value": "127.0.0.1"}]),
                );
            }
        }
        json!({
            "orderId": self.id,
            "orderType": self.order_type,
            "createTime": self.create_time,
            "orderLine": [line],
            "buyerInfo": {
                "mobilePhone": self.buyer.mobile_phone,
                "email": null,
                "customerId": self.buyer.customer_id,
                "customerName": self.buyer.customer_name,
                "customerRealName": self.buyer.real_name,
                "customerType": 0,
                "userId": null,
                "userName": null,
            },
            "extendParams": [],
        })
    }
}

/// Orders by id, as `orderInfo` objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrderBook {
    orders: BTreeMap<String, Value>,
}

fn orders_error(origin: &str, message: impl Into<String>) -> SimulateError {
    SimulateError::Orders { origin: origin.to_owned(), message: message.into() }
}

impl OrderBook {
    /// The nine mock orders and the scenario templates.
    pub fn generated() -> Self {
        let orders = MOCK_ORDERS
            .iter()
            .chain(SCENARIO_ORDERS.iter())
            .map(|spec| (spec.id.to_owned(), spec.order_info()))
            .collect();
        Self { orders }
    }

    /// The book with the usage scenario's orders ([`USAGE_ORDERS`]) added
    /// where it has no order of that id.
    pub fn with_usage_orders(mut self) -> Self {
        for spec in USAGE_ORDERS {
            self.orders.entry(spec.id.to_owned()).or_insert_with(|| spec.order_info());
        }
        self
    }

    /// Reads a JSON file: a list of `orderInfo` objects (or of whole answers
    /// with an `orderInfo`), a map of order id → `orderInfo`, or one of either.
    pub fn load(path: &Path) -> Result<Self, SimulateError> {
        let bytes = std::fs::read(path)
            .map_err(|source| SimulateError::ReadOrders { path: path.display().to_string(), source })?;
        Self::from_json(&bytes, &path.display().to_string())
    }

    /// [`OrderBook::load`] from bytes; `origin` names them in errors.
    pub fn from_json(bytes: &[u8], origin: &str) -> Result<Self, SimulateError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| orders_error(origin, format!("not valid JSON: {e}")))?;
        let mut book = Self::default();
        match value {
            Value::Array(items) => {
                for item in items {
                    book.insert_from(item, None, origin)?;
                }
            }
            Value::Object(map) if map.contains_key("orderInfo") || map.contains_key("orderId") => {
                book.insert_from(Value::Object(map), None, origin)?;
            }
            Value::Object(map) => {
                for (id, item) in map {
                    book.insert_from(item, Some(id), origin)?;
                }
            }
            _ => return Err(orders_error(origin, "must be a list or a map of orderInfo objects")),
        }
        Ok(book)
    }

    fn insert_from(&mut self, item: Value, key: Option<String>, origin: &str) -> Result<(), SimulateError> {
        let Value::Object(mut map) = item else {
            return Err(orders_error(origin, "every order must be a JSON object"));
        };
        if let Some(Value::Object(info)) = map.remove("orderInfo") {
            map = info;
        }
        if let Some(id) = key {
            map.entry("orderId").or_insert(Value::String(id));
        }
        self.insert(Value::Object(map)).map_err(|e| match e {
            SimulateError::Orders { message, .. } => orders_error(origin, message),
            other => other,
        })
    }

    /// Adds (or replaces) an order. It needs a non-empty string `orderId`;
    /// `orderLine`, when present, must be a list.
    pub fn insert(&mut self, order_info: Value) -> Result<(), SimulateError> {
        let Some(map) = order_info.as_object() else {
            return Err(orders_error("order", "an orderInfo must be a JSON object"));
        };
        let id = match map.get("orderId") {
            Some(Value::String(id)) if !id.is_empty() => id.clone(),
            _ => return Err(orders_error("order", "an orderInfo needs a non-empty string orderId")),
        };
        if map.get("orderLine").is_some_and(|l| !l.is_array()) {
            return Err(orders_error("order", format!("orderLine of {id} must be a list")));
        }
        self.orders.insert(id, order_info);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.orders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.orders.is_empty()
    }

    /// Order ids, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.orders.keys().map(String::as_str)
    }

    /// The book as a JSON list of `orderInfo` objects, sorted by id (the
    /// format of `fixtures/orders.json`).
    pub fn to_json(&self) -> Value {
        Value::Array(self.orders.values().cloned().collect())
    }

    /// The `orderInfo` of `order_id`, with only the line `order_line_id`
    /// when given (`None` when the order or that line is unknown). An id
    /// `<template>-<run id>` unknown as such is answered from its template.
    pub fn lookup(&self, order_id: &str, order_line_id: Option<&str>) -> Option<Value> {
        let mut info = match self.orders.get(order_id) {
            Some(info) => info.clone(),
            None => {
                let (template, run) = order_id.rsplit_once('-')?;
                if !is_run_id(run) {
                    return None;
                }
                let mut info = self.orders.get(template)?.clone();
                rename(&mut info, template, order_id);
                info
            }
        };
        if let Some(wanted) = order_line_id {
            let map = info.as_object_mut()?;
            let lines: Vec<Value> = match map.get("orderLine") {
                Some(Value::Array(lines)) => lines
                    .iter()
                    .filter(|l| l.get("orderLineId").and_then(Value::as_str) == Some(wanted))
                    .cloned()
                    .collect(),
                _ => Vec::new(),
            };
            if lines.is_empty() {
                return None;
            }
            map.insert("orderLine".into(), Value::Array(lines));
        }
        Some(info)
    }
}

/// Rewrites a template's ids: `orderId`, and every line id starting with the template id.
fn rename(info: &mut Value, template: &str, order_id: &str) {
    let Some(map) = info.as_object_mut() else { return };
    map.insert("orderId".into(), Value::String(order_id.to_owned()));
    if let Some(Value::Array(lines)) = map.get_mut("orderLine") {
        for line in lines.iter_mut().filter_map(Value::as_object_mut) {
            let renamed = line
                .get("orderLineId")
                .and_then(Value::as_str)
                .and_then(|id| id.strip_prefix(template))
                .map(|rest| format!("{order_id}{rest}"));
            if let Some(id) = renamed {
                line.insert("orderLineId".into(), Value::String(id));
            }
        }
    }
}

/// The answer of the order query API for a found order.
pub fn found_answer(order_info: Value, code: &str, msg: &str) -> Value {
    let mut answer = Map::new();
    answer.insert("resultCode".into(), json!(code));
    answer.insert("resultMsg".into(), json!(msg));
    answer.insert("orderInfo".into(), order_info);
    Value::Object(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verbatim from koogallery-openapi.md §1.
    const OBSERVED: &str = r#"{"resultCode":"MKT.0000","resultMsg":"Success","orderInfo":{"orderId":"MOCKPERIODYEARNEW","orderType":"NEW","createTime":"20241121090846","orderLine":[{"orderLineId":"MOCKPERIODYEARNEW-000001","chargingMode":"PERIOD","periodType":"year","periodNumber":1,"expireTime":"20251121235959","productInfo":[{"productId":"OFFI846204237451911168","skuCode":"0a4d1578-5295-46a7-92d4-7c803dccc51d","linearValue":50,"productName":"MOCK测试商品,测试规格,基础版,包周期"}],"extendParams":[{"name":"emailDomainName","value":"test.xxxx.com"},{"name":"ip","value":"127.0.0.1"}],"currency":"100","currencyAfterDiscount":"100"}],"buyerInfo":{"mobilePhone":"18688888888","email":null,"customerId":"459bbbec25d24749b2eb83be37b602a8","customerName":"mock_user_01","customerRealName":"测试用户1","customerType":0,"userId":null,"userName":null},"extendParams":[]}}"#;

    #[test]
    fn the_generated_mock_order_is_the_observed_answer() {
        let book = OrderBook::generated();
        let info = book.lookup("MOCKPERIODYEARNEW", Some("MOCKPERIODYEARNEW-000001")).unwrap();
        let observed: Value = serde_json::from_str(OBSERVED).unwrap();
        assert_eq!(found_answer(info, "MKT.0000", "Success"), observed);
    }

    #[test]
    fn every_mock_order_has_its_line() {
        let book = OrderBook::generated();
        assert_eq!(book.len(), MOCK_ORDERS.len() + SCENARIO_ORDERS.len());
        for spec in MOCK_ORDERS {
            let info = book.lookup(spec.id, Some(&line_id(spec.id))).unwrap();
            assert_eq!(info["orderType"], spec.order_type);
        }
        assert!(book.lookup("MOCKPERIODYEARNEW", Some("MOCKPERIODYEARNEW-000002")).is_none());
        assert!(book.lookup("NOSUCHORDER", None).is_none());
    }

    #[test]
    fn run_ids_resolve_to_their_template() {
        let book = OrderBook::generated();
        let id = run_order_id("SIMSVCCARDS", "R1A2B3C4");
        let info = book.lookup(&id, Some(&line_id(&id))).unwrap();
        assert_eq!(info["orderId"], "SIMSVCCARDS-R1A2B3C4");
        assert_eq!(info["orderLine"][0]["orderLineId"], "SIMSVCCARDS-R1A2B3C4-000001");
        assert_eq!(info["orderLine"][0]["productInfo"][0]["skuCode"], "svc-card-100");
        assert_eq!(info["orderLine"][0]["productInfo"][0]["linearValue"], 50);
        assert_eq!(info["orderLine"][0]["currencyAfterDiscount"], "5000.00");
        // a line id is not a run id, nor is an unknown template
        assert!(book.lookup("MOCKPERIODYEARNEW-000001", None).is_none());
        assert!(book.lookup("NOSUCH-R1A2B3C4", None).is_none());
        assert!(is_run_id(&new_run_id()));
        assert!(!is_run_id("1ABC") && !is_run_id("") && !is_run_id("A-B"));
    }

    #[test]
    fn the_usage_orders_are_pay_per_use_orders_of_one_customer() {
        let book = OrderBook::generated().with_usage_orders();
        assert_eq!(book.len(), OrderBook::generated().len() + USAGE_ORDERS.len());
        for spec in USAGE_ORDERS {
            let id = run_order_id(spec.id, "RUSAGE1");
            let info = book.lookup(&id, Some(&line_id(&id))).unwrap();
            assert_eq!(info["orderLine"][0]["chargingMode"], "ON_DEMAND");
            assert_eq!(info["buyerInfo"]["customerId"], SIM_BUYER.customer_id);
            assert!(OrderBook::generated().lookup(&id, None).is_none());
        }
        // an order of that id in the book is kept
        let mut book = OrderBook::default();
        book.insert(json!({"orderId": "SIMPPUWSA", "orderType": "CUSTOM"})).unwrap();
        assert_eq!(book.with_usage_orders().lookup("SIMPPUWSA", None).unwrap()["orderType"], "CUSTOM");
    }

    #[test]
    fn files_may_be_lists_maps_or_answers() {
        let list = OrderBook::from_json(br#"[{"orderId":"A","orderLine":[]}]"#, "t").unwrap();
        assert_eq!(list.ids().collect::<Vec<_>>(), ["A"]);
        let map = OrderBook::from_json(br#"{"B":{"orderType":"NEW"}}"#, "t").unwrap();
        assert_eq!(map.lookup("B", None).unwrap()["orderId"], "B");
        let answers = OrderBook::from_json(OBSERVED.as_bytes(), "t").unwrap();
        assert_eq!(answers.ids().collect::<Vec<_>>(), ["MOCKPERIODYEARNEW"]);
        assert!(OrderBook::from_json(b"[1]", "t").is_err());
        assert!(OrderBook::from_json(br#"[{"orderLine":[]}]"#, "t").is_err());
        assert!(OrderBook::from_json(b"nope", "t").is_err());
        let round = OrderBook::from_json(OrderBook::generated().to_json().to_string().as_bytes(), "t").unwrap();
        assert_eq!(round, OrderBook::generated());
    }
}
