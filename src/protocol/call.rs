//! Parsing a verified request into a typed [`Call`] (protocol §6 for V2, §7 for V1).
//!
//! Every field is checked for presence, type and length, and every refusal
//! names the field, so KooGallery's `resultMsg` and our log line say exactly
//! what was wrong. Unknown fields are ignored, as the protocol requires.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use super::crypto::{self, EncryptType};
use super::unconfirmed;
use super::{Generation, Rejection};

/// A verified, parsed KooGallery call.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub generation: Generation,
    /// `testFlag` = 1: a debug call or a probe on a mock order.
    pub test: bool,
    pub activity: Activity,
}

/// `refreshInstance` scenes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scene {
    TrialToFormal,
    Renewal,
    UnsubscribeRenewalPeriod,
    RenewalChange,
}

impl Scene {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TrialToFormal => "TRIAL_TO_FORMAL",
            Self::Renewal => "RENEWAL",
            Self::UnsubscribeRenewalPeriod => "UNSUBSCRIBE_RENEWAL_PERIOD",
            Self::RenewalChange => "RENEWAL_CHANGE",
        }
    }
    fn parse(value: &str) -> Option<Self> {
        [Self::TrialToFormal, Self::Renewal, Self::UnsubscribeRenewalPeriod, Self::RenewalChange]
            .into_iter()
            .find(|s| s.as_str() == value)
    }
}

/// Purchase details. V2 carries none of these (they come from the order
/// query API); V1 carries most of them on the call itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Purchase {
    pub customer_id: Option<String>,
    pub customer_name: Option<String>,
    pub user_id: Option<String>,
    pub user_name: Option<String>,
    /// Decrypted V1 contact fields. Personal data: never logged.
    pub mobile_phone: Option<String>,
    pub email: Option<String>,
    /// V1 contact fields that arrived but could not be decrypted (issue 13.10):
    /// the purchase goes on without them; the event marks them.
    pub undecryptable: Vec<Undecryptable>,
    pub product_id: Option<String>,
    pub sku_code: Option<String>,
    pub trial: bool,
    pub expire_time: Option<DateTime<Utc>>,
    pub charging_mode: Option<String>,
    pub period_type: Option<String>,
    pub period_number: Option<String>,
    pub amount: Option<String>,
    /// Linear quantity (V1 `amount` on upgrade; from the order API later).
    pub quantity: Option<String>,
}

/// A V1 contact field that could not be decrypted, and why (no content).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undecryptable {
    /// `mobilePhone` or `email`.
    pub field: &'static str,
    pub why: crypto::DecryptError,
}

/// The activities of both generations, with their fields.
#[derive(Clone, Debug, PartialEq)]
pub enum Activity {
    NewInstance {
        order_id: String,
        /// V1 has no order lines: `None`.
        order_line_id: Option<String>,
        business_id: String,
        purchase: Box<Purchase>,
    },
    RefreshInstance {
        instance_id: String,
        order_id: String,
        order_line_id: Option<String>,
        scene: Scene,
        expire_time: Option<DateTime<Utc>>,
        product_id: Option<String>,
        amount: Option<String>,
        period_type: Option<String>,
        period_number: Option<String>,
    },
    /// V2 updateInstanceStatus and V1 instanceStatus.
    UpdateStatus {
        instance_id: String,
        freeze: bool,
    },
    /// V1 only.
    ExpireInstance {
        instance_id: String,
        order_id: Option<String>,
    },
    ReleaseInstance {
        instance_id: String,
        order_id: Option<String>,
        order_line_id: Option<String>,
    },
    QueryInstance {
        instance_ids: Vec<String>,
    },
    OrderNotify {
        order_id: String,
        order_line_id: String,
    },
    /// V2 upgradeInstance and V1 upgrade.
    Upgrade {
        instance_id: String,
        order_id: String,
        order_line_id: Option<String>,
        sku_code: Option<String>,
        product_id: Option<String>,
        quantity: Option<String>,
    },
    ChangeInstanceCheck {
        instance_id: String,
        product_info: Option<Value>,
    },
}

impl Activity {
    /// The activity name as it appears on the wire (V2 spelling for shared ones).
    pub fn name(&self, generation: Generation) -> &'static str {
        match (self, generation) {
            (Self::NewInstance { .. }, _) => "newInstance",
            (Self::RefreshInstance { .. }, _) => "refreshInstance",
            (Self::UpdateStatus { .. }, Generation::V2) => "updateInstanceStatus",
            (Self::UpdateStatus { .. }, Generation::V1) => "instanceStatus",
            (Self::ExpireInstance { .. }, _) => "expireInstance",
            (Self::ReleaseInstance { .. }, _) => "releaseInstance",
            (Self::QueryInstance { .. }, _) => "queryInstance",
            (Self::OrderNotify { .. }, _) => "orderNotify",
            (Self::Upgrade { .. }, Generation::V2) => "upgradeInstance",
            (Self::Upgrade { .. }, Generation::V1) => "upgrade",
            (Self::ChangeInstanceCheck { .. }, _) => "changeInstanceCheck",
        }
    }

    /// The order id the call names, for logs.
    pub fn order_id(&self) -> Option<&str> {
        match self {
            Self::NewInstance { order_id, .. }
            | Self::RefreshInstance { order_id, .. }
            | Self::OrderNotify { order_id, .. }
            | Self::Upgrade { order_id, .. } => Some(order_id),
            Self::ExpireInstance { order_id, .. } | Self::ReleaseInstance { order_id, .. } => order_id.as_deref(),
            _ => None,
        }
    }

    /// The instance id the call names, for logs.
    pub fn instance_id(&self) -> Option<&str> {
        match self {
            Self::RefreshInstance { instance_id, .. }
            | Self::UpdateStatus { instance_id, .. }
            | Self::ExpireInstance { instance_id, .. }
            | Self::ReleaseInstance { instance_id, .. }
            | Self::Upgrade { instance_id, .. }
            | Self::ChangeInstanceCheck { instance_id, .. } => Some(instance_id),
            Self::QueryInstance { instance_ids } => instance_ids.first().map(String::as_str),
            _ => None,
        }
    }
}

/// Largest number of ids one `queryInstance` may name.
pub const MAX_QUERY_IDS: usize = 100;
const ID_MAX: usize = 64;

/// Field access with named, specific errors. Implemented for the V2 JSON
/// object and the V1 parameter map so both parsers read alike.
trait Fields {
    /// `Ok(None)` when absent; an error when present with the wrong type.
    fn text(&self, field: &'static str) -> Result<Option<&str>, Rejection>;

    fn opt(&self, field: &'static str, max: usize) -> Result<Option<String>, Rejection> {
        match self.text(field)? {
            None => Ok(None),
            Some("") => Ok(None),
            Some(value) => check_text(field, value, max).map(|v| Some(v.to_owned())),
        }
    }

    fn req(&self, field: &'static str, max: usize) -> Result<String, Rejection> {
        self.opt(field, max)?.ok_or(Rejection::MissingField(field))
    }

    fn test_flag(&self) -> Result<bool, Rejection> {
        match self.text("testFlag")? {
            None | Some("0") | Some("") => Ok(false),
            Some("1") => Ok(true),
            Some(_) => Err(bad("testFlag", "must be \"0\" or \"1\"")),
        }
    }
}

fn bad(field: &'static str, problem: impl Into<String>) -> Rejection {
    Rejection::BadField { field, problem: problem.into() }
}

fn check_text<'a>(field: &'static str, value: &'a str, max: usize) -> Result<&'a str, Rejection> {
    if value.chars().count() > max {
        return Err(bad(field, format!("is longer than {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(bad(field, "contains control characters"));
    }
    Ok(value)
}

impl Fields for Map<String, Value> {
    fn text(&self, field: &'static str) -> Result<Option<&str>, Rejection> {
        match self.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            // testFlag is documented as a string but a number is harmless.
            Some(Value::Number(n)) if field == "testFlag" => match n.as_u64() {
                Some(0) => Ok(Some("0")),
                Some(1) => Ok(Some("1")),
                _ => Err(bad(field, "must be \"0\" or \"1\"")),
            },
            Some(_) => Err(bad(field, "must be a string")),
        }
    }
}

impl Fields for BTreeMap<String, String> {
    fn text(&self, field: &'static str) -> Result<Option<&str>, Rejection> {
        Ok(self.get(field).map(String::as_str))
    }
}

/// Parses `yyyyMMddHHmmss` or `yyyyMMddHHmmssSSS` (UTC).
pub fn parse_compact_time(field: &'static str, value: &str) -> Result<DateTime<Utc>, Rejection> {
    let problem = "must be UTC yyyyMMddHHmmss (optionally with milliseconds)";
    if !(value.len() == 14 || value.len() == 17) || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(field, problem));
    }
    let seconds = NaiveDateTime::parse_from_str(&value[..14], "%Y%m%d%H%M%S").map_err(|_| bad(field, problem))?;
    let millis: i64 = if value.len() == 17 { value[14..].parse().map_err(|_| bad(field, problem))? } else { 0 };
    Ok(seconds.and_utc() + chrono::Duration::milliseconds(millis))
}

fn opt_time(fields: &impl Fields, field: &'static str) -> Result<Option<DateTime<Utc>>, Rejection> {
    fields.opt(field, 17)?.map(|v| parse_compact_time(field, &v)).transpose()
}

/// A decimal amount: optional sign, digits, optional fraction of up to `decimals` places.
fn opt_decimal(fields: &impl Fields, field: &'static str, decimals: usize) -> Result<Option<String>, Rejection> {
    let Some(value) = fields.opt(field, 32)? else { return Ok(None) };
    let unsigned = value.strip_prefix('-').unwrap_or(&value);
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let ok = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.len() <= decimals
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !(unsigned.contains('.') && frac.is_empty());
    if !ok {
        return Err(bad(field, format!("must be a decimal number with at most {decimals} decimals")));
    }
    Ok(Some(value))
}

fn opt_count(fields: &impl Fields, field: &'static str) -> Result<Option<String>, Rejection> {
    let Some(value) = fields.opt(field, 9)? else { return Ok(None) };
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(field, "must be a whole number"));
    }
    Ok(Some(value))
}

/// Parses a V2 JSON body (already verified byte for byte).
pub fn parse_v2(body: &[u8]) -> Result<Call, Rejection> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Rejection::MalformedJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(Rejection::MalformedJson("top level is not an object".into()));
    };
    let activity_name = obj.req("activity", 64)?;
    let test = obj.test_flag()?;
    let activity = match activity_name.as_str() {
        "newInstance" => Activity::NewInstance {
            order_id: obj.req("orderId", ID_MAX)?,
            order_line_id: Some(obj.req("orderLineId", ID_MAX)?),
            business_id: obj.req("businessId", ID_MAX)?,
            purchase: Box::default(),
        },
        "refreshInstance" => {
            let scene = obj.req("scene", 64)?;
            Activity::RefreshInstance {
                instance_id: obj.req("instanceId", ID_MAX)?,
                order_id: obj.req("orderId", ID_MAX)?,
                order_line_id: Some(obj.req("orderLineId", ID_MAX)?),
                scene: Scene::parse(&scene).ok_or_else(|| {
                    bad("scene", "must be TRIAL_TO_FORMAL, RENEWAL, UNSUBSCRIBE_RENEWAL_PERIOD or RENEWAL_CHANGE")
                })?,
                expire_time: Some(opt_time(&obj, "expireTime")?.ok_or(Rejection::MissingField("expireTime"))?),
                product_id: obj.opt("productId", ID_MAX)?,
                amount: None,
                period_type: None,
                period_number: None,
            }
        }
        "updateInstanceStatus" => {
            let status = obj.req("status", 16)?;
            Activity::UpdateStatus {
                instance_id: obj.req("instanceId", ID_MAX)?,
                freeze: match status.as_str() {
                    "FREEZE" => true,
                    "UNFREEZE" => false,
                    _ => return Err(bad("status", "must be FREEZE or UNFREEZE")),
                },
            }
        }
        "releaseInstance" => Activity::ReleaseInstance {
            instance_id: obj.req("instanceId", ID_MAX)?,
            order_id: obj.opt("orderId", ID_MAX)?,
            order_line_id: obj.opt("orderLineId", ID_MAX)?,
        },
        "queryInstance" => Activity::QueryInstance { instance_ids: parse_id_list(&obj.req("instanceId", 64 * 101)?)? },
        "orderNotify" => Activity::OrderNotify {
            order_id: obj.req("orderId", ID_MAX)?,
            order_line_id: obj.req("orderLineId", ID_MAX)?,
        },
        "upgradeInstance" => Activity::Upgrade {
            instance_id: obj.req("instanceId", ID_MAX)?,
            order_id: obj.req("orderId", ID_MAX)?,
            order_line_id: Some(obj.req("orderLineId", ID_MAX)?),
            sku_code: None,
            product_id: None,
            quantity: None,
        },
        "changeInstanceCheck" => Activity::ChangeInstanceCheck {
            instance_id: obj.req("instanceId", ID_MAX)?,
            product_info: match obj.get("productInfo") {
                None | Some(Value::Null) => None,
                Some(v @ (Value::Object(_) | Value::Array(_))) => Some(v.clone()),
                Some(_) => return Err(bad("productInfo", "must be an object or an array")),
            },
        },
        other => return Err(Rejection::UnknownActivity(truncate(other))),
    };
    Ok(Call { generation: Generation::V2, test, activity })
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `queryInstance.instanceId`: comma-separated, 1 to 100 ids.
fn parse_id_list(list: &str) -> Result<Vec<String>, Rejection> {
    let ids: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
    if ids.iter().any(String::is_empty) {
        return Err(bad("instanceId", "has an empty id in its comma-separated list"));
    }
    if ids.len() > MAX_QUERY_IDS {
        return Err(bad("instanceId", format!("names more than {MAX_QUERY_IDS} ids")));
    }
    if ids.iter().any(|id| id.chars().count() > ID_MAX) {
        return Err(bad("instanceId", format!("has an id longer than {ID_MAX} characters")));
    }
    Ok(ids)
}

/// Parses a V1 call's parameters (already verified). `access_key` decrypts
/// `mobilePhone`/`email` with the product's key size `encrypt_type`
/// (`KOOGATE_ENCRYPT_TYPE`: the size the seller chose when publishing the
/// product; V1 carries none per call).
pub fn parse_v1(
    params: &BTreeMap<String, String>,
    access_key: &str,
    encrypt_type: EncryptType,
) -> Result<Call, Rejection> {
    let activity_name = params.req("activity", 64)?;
    let test = params.test_flag()?;
    let activity = match activity_name.as_str() {
        "newInstance" => {
            let key = crypto::derive_key(access_key, encrypt_type);
            let mut undecryptable = Vec::new();
            // A contact field that does not decrypt must not fail the
            // purchase (a failed order is refunded, and counts against the
            // product): it is left out and marked (issue 13.10).
            let mut decrypt = |field: &'static str| -> Result<Option<String>, Rejection> {
                let Some(v) = params.opt(field, 256)? else { return Ok(None) };
                match crypto::decrypt(&key, &v) {
                    Ok(plain) => Ok(Some(plain)),
                    Err(why) => {
                        undecryptable.push(Undecryptable { field, why });
                        Ok(None)
                    }
                }
            };
            let mobile_phone = decrypt("mobilePhone")?;
            let email = decrypt("email")?;
            let trial = match params.opt("trialFlag", 1)?.as_deref() {
                None | Some("0") => false,
                Some("1") => true,
                Some(_) => return Err(bad("trialFlag", "must be \"0\" or \"1\"")),
            };
            let charging_mode = params.opt("chargingMode", 8)?.map(|m| v1_charging_mode(&m)).transpose()?;
            // Pay-per-use is one instance per billing item (orderId + productId):
            // without a productId the item cannot be told apart.
            if is_pay_per_use(charging_mode.as_deref()) && params.opt("productId", ID_MAX)?.is_none() {
                return Err(Rejection::MissingField("productId"));
            }
            Activity::NewInstance {
                order_id: params.req("orderId", ID_MAX)?,
                order_line_id: None,
                business_id: params.req("businessId", ID_MAX)?,
                purchase: Box::new(Purchase {
                    customer_id: Some(params.req("customerId", ID_MAX)?),
                    customer_name: params.opt("customerName", 256)?,
                    user_id: params.opt("userId", ID_MAX)?,
                    user_name: params.opt("userName", 256)?,
                    mobile_phone,
                    email,
                    undecryptable,
                    product_id: params.opt("productId", ID_MAX)?,
                    sku_code: params.opt("skuCode", ID_MAX)?,
                    trial,
                    expire_time: opt_time(params, "expireTime")?,
                    charging_mode,
                    period_type: params.opt("periodType", 16)?,
                    period_number: opt_count(params, "periodNumber")?,
                    amount: opt_decimal(params, "orderAmount", 3)?,
                    quantity: None,
                }),
            }
        }
        "refreshInstance" => {
            let trial_to_formal = params.opt("trialToFormal", 1)?.as_deref() == Some("1");
            let amount = opt_decimal(params, "orderAmount", 3)?;
            Activity::RefreshInstance {
                instance_id: params.req("instanceId", ID_MAX)?,
                order_id: params.req("orderId", ID_MAX)?,
                order_line_id: None,
                scene: unconfirmed::v1_refresh_scene(trial_to_formal, amount.as_deref()),
                expire_time: opt_time(params, "expireTime")?,
                product_id: params.opt("productId", ID_MAX)?,
                amount,
                period_type: params.opt("periodType", 16)?,
                period_number: opt_count(params, "periodNumber")?,
            }
        }
        "upgrade" => Activity::Upgrade {
            instance_id: params.req("instanceId", ID_MAX)?,
            order_id: params.req("orderId", ID_MAX)?,
            order_line_id: None,
            sku_code: params.opt("skuCode", ID_MAX)?,
            product_id: params.opt("productId", ID_MAX)?,
            quantity: opt_count(params, "amount")?,
        },
        "expireInstance" => Activity::ExpireInstance {
            instance_id: params.req("instanceId", ID_MAX)?,
            order_id: params.opt("orderId", ID_MAX)?,
        },
        "releaseInstance" => Activity::ReleaseInstance {
            instance_id: params.req("instanceId", ID_MAX)?,
            order_id: params.opt("orderId", ID_MAX)?,
            order_line_id: None,
        },
        // V1 Instance Query (GET; mandatory for pay-per-use products), answered as V2's:
        // https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649081.html
        "queryInstance" => {
            Activity::QueryInstance { instance_ids: parse_id_list(&params.req("instanceId", 64 * 101)?)? }
        }
        "instanceStatus" => {
            let status = params.req("instanceStatus", 16)?;
            Activity::UpdateStatus {
                instance_id: params.req("instanceId", ID_MAX)?,
                freeze: unconfirmed::v1_instance_status_is_freeze(&status)
                    .ok_or_else(|| bad("instanceStatus", "must be FREEZE or NORMAL"))?,
            }
        }
        other => return Err(Rejection::UnknownActivity(truncate(other))),
    };
    Ok(Call { generation: Generation::V1, test, activity })
}

/// V1 `chargingMode` (normalized to the order API's words): `0` pay-per-use,
/// `1` period, `3` one-time, `5` pay-per-use package
/// (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/en-us_topic_0070649013.html>).
fn v1_charging_mode(code: &str) -> Result<String, Rejection> {
    match code {
        "0" => Ok(PAY_PER_USE.into()),
        "1" => Ok("PERIOD".into()),
        "3" => Ok("ONE_TIME".into()),
        "5" => Ok(PAY_PER_USE_PACKAGE.into()),
        _ => Err(bad("chargingMode", "must be 0 (pay-per-use), 1 (period), 3 (one-time) or 5 (pay-per-use package)")),
    }
}

/// The order API's `chargingMode` of a pay-per-use specification.
pub const PAY_PER_USE: &str = "ON_DEMAND";
/// The order API's `chargingMode` of a pay-per-use package.
pub const PAY_PER_USE_PACKAGE: &str = "ON_DEMAND_PKG";

/// Is this (normalized) charging mode pay-per-use or a pay-per-use package?
pub fn is_pay_per_use(charging_mode: Option<&str>) -> bool {
    matches!(charging_mode, Some(PAY_PER_USE | PAY_PER_USE_PACKAGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_reference_v2_examples() {
        let call = parse_v2(br#"{"activity":"newInstance","businessId":"87b94795-0603-4e24-8ae5-69420d60e3c8","orderId":"CS2211181819B4LVS","orderLineId":"CS2211181819B4LVS-000001","testFlag":"0"}"#).unwrap();
        assert!(!call.test);
        assert!(matches!(call.activity, Activity::NewInstance { ref order_id, .. } if order_id == "CS2211181819B4LVS"));

        let call = parse_v2(br#"{"activity":"refreshInstance","expireTime":"20221124023618256","instanceId":"10e758d0-31ad-4c4b-8f1b-81d03469a10e","orderId":"CS2211181819B4LVS","orderLineId":"CS2211181819B4LVS-000001","productId":"OFFI461867333479178240","scene":"RENEWAL","testFlag":"1"}"#).unwrap();
        assert!(call.test);
        match call.activity {
            Activity::RefreshInstance { scene, expire_time, .. } => {
                assert_eq!(scene, Scene::Renewal);
                assert_eq!(expire_time.unwrap().to_rfc3339(), "2022-11-24T02:36:18.256+00:00");
            }
            other => panic!("{other:?}"),
        }
        let call =
            parse_v2(br#"{"activity":"updateInstanceStatus","instanceId":"i","status":"FREEZE","testFlag":"1"}"#)
                .unwrap();
        assert_eq!(call.activity, Activity::UpdateStatus { instance_id: "i".into(), freeze: true });
        let call = parse_v2(br#"{"activity":"queryInstance","instanceId":"a, b,c"}"#).unwrap();
        assert_eq!(call.activity, Activity::QueryInstance { instance_ids: vec!["a".into(), "b".into(), "c".into()] });
    }

    #[test]
    fn v2_refusals_name_the_field() {
        let err = |b: &str| parse_v2(b.as_bytes()).unwrap_err();
        assert_eq!(
            err(r#"{"activity":"newInstance","orderId":"A","businessId":"b"}"#),
            Rejection::MissingField("orderLineId")
        );
        assert_eq!(
            err(r#"{"activity":"newInstance","orderId":5,"orderLineId":"x","businessId":"b"}"#),
            Rejection::BadField { field: "orderId", problem: "must be a string".into() }
        );
        assert_eq!(err(r#"{"activity":"explode"}"#), Rejection::UnknownActivity("explode".into()));
        assert!(matches!(err(r#"{"activity":"#), Rejection::MalformedJson(_)));
        assert!(matches!(err("[1,2]"), Rejection::MalformedJson(_)));
        assert!(matches!(parse_v2(b"{\"activity\":\"\xff\"}").unwrap_err(), Rejection::MalformedJson(_)));
        assert!(matches!(
            err(&format!(r#"{{"activity":"orderNotify","orderId":"{}","orderLineId":"x"}}"#, "A".repeat(65))),
            Rejection::BadField { field: "orderId", .. }
        ));
        assert!(matches!(
            err(r#"{"activity":"updateInstanceStatus","instanceId":"i","status":"MELT"}"#),
            Rejection::BadField { field: "status", .. }
        ));
        assert!(matches!(
            err(
                r#"{"activity":"refreshInstance","instanceId":"i","orderId":"o","orderLineId":"l","scene":"RENEWAL","expireTime":"2022"}"#
            ),
            Rejection::BadField { field: "expireTime", .. }
        ));
        let many: Vec<String> = (0..101).map(|i| format!("id{i}")).collect();
        assert!(matches!(
            err(&format!(r#"{{"activity":"queryInstance","instanceId":"{}"}}"#, many.join(","))),
            Rejection::BadField { field: "instanceId", .. }
        ));
        assert!(matches!(
            err(r#"{"activity":"newInstance","orderId":"A\u0000","orderLineId":"x","businessId":"b"}"#),
            Rejection::BadField { field: "orderId", .. }
        ));
        assert!(matches!(
            err(r#"{"activity":"newInstance","orderId":"A","orderLineId":"x","businessId":"b","testFlag":"yes"}"#),
            Rejection::BadField { field: "testFlag", .. }
        ));
    }

    #[test]
    fn parses_v1_purchase_and_decrypts_contacts() {
        let key = crypto::derive_key("test-access-key-123", EncryptType::Aes256);
        let mut params: BTreeMap<String, String> = [
            ("activity", "newInstance"),
            ("businessId", "61e834ba-7b97-4418-b8f7-e5345137278c"),
            ("customerId", "68cbc86abc2018ab880d92f36422fa0e"),
            ("expireTime", "20200727153156"),
            ("orderId", "CS1906666666ABCDE"),
            ("productId", "00301-666666-0--0"),
            ("chargingMode", "3"),
            ("orderAmount", "5000.00"),
            ("testFlag", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        params.insert("mobilePhone".into(), crypto::encrypt(&key, "13800000000").unwrap());
        let call = parse_v1(&params, "test-access-key-123", EncryptType::Aes256).unwrap();
        assert!(call.test);
        match call.activity {
            Activity::NewInstance { purchase, order_line_id, .. } => {
                assert_eq!(order_line_id, None);
                assert_eq!(purchase.mobile_phone.as_deref(), Some("13800000000"));
                assert_eq!(purchase.charging_mode.as_deref(), Some("ONE_TIME"));
                assert_eq!(purchase.expire_time.unwrap().to_rfc3339(), "2020-07-27T15:31:56+00:00");
            }
            other => panic!("{other:?}"),
        }
        // AES-128 products: the same field, encrypted with the 16-byte key.
        let key128 = crypto::derive_key("test-access-key-123", EncryptType::Aes128);
        params.insert("mobilePhone".into(), crypto::encrypt(&key128, "13900000000").unwrap());
        match parse_v1(&params, "test-access-key-123", EncryptType::Aes128).unwrap().activity {
            Activity::NewInstance { purchase, .. } => {
                assert_eq!(purchase.mobile_phone.as_deref(), Some("13900000000"));
                assert!(purchase.undecryptable.is_empty());
            }
            other => panic!("{other:?}"),
        }
        // Undecryptable: the purchase parses, the field is marked (13.10).
        params.insert("mobilePhone".into(), "abcdefgh12345678%%%".into());
        match parse_v1(&params, "test-access-key-123", EncryptType::Aes256).unwrap().activity {
            Activity::NewInstance { purchase, .. } => {
                assert_eq!(purchase.mobile_phone, None);
                assert_eq!(purchase.undecryptable.len(), 1);
                assert_eq!(purchase.undecryptable[0].field, "mobilePhone");
            }
            other => panic!("{other:?}"),
        }
        params.insert("mobilePhone".into(), crypto::encrypt(&key, "1").unwrap());
        params.insert("orderAmount".into(), "1.23456".into());
        assert!(matches!(
            parse_v1(&params, "test-access-key-123", EncryptType::Aes256).unwrap_err(),
            Rejection::BadField { field: "orderAmount", .. }
        ));
    }

    #[test]
    fn v1_refresh_scene_is_inferred() {
        let base = |extra: &[(&str, &str)]| {
            let mut p: BTreeMap<String, String> =
                [("activity", "refreshInstance"), ("instanceId", "i"), ("orderId", "o")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            for (k, v) in extra {
                p.insert(k.to_string(), v.to_string());
            }
            match parse_v1(&p, "k", EncryptType::Aes256).unwrap().activity {
                Activity::RefreshInstance { scene, .. } => scene,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(base(&[]), Scene::Renewal);
        assert_eq!(base(&[("trialToFormal", "1")]), Scene::TrialToFormal);
        assert_eq!(base(&[("orderAmount", "-30.5")]), Scene::UnsubscribeRenewalPeriod);
    }
}
