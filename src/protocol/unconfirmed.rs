//! Every protocol detail the reference marks **(unconfirmed)**, or that we had
//! to decide without a reference, lives here and nowhere else. When Huawei's
//! behaviour turns out different, this is the one file to change.

/// V2 `timestamp` is documented as 13-digit milliseconds; older pages say
/// seconds. A 10-digit value is read as seconds.
pub const V2_TIMESTAMP_SECONDS_DIGITS: usize = 10;

/// V1 `instanceStatus` (pay-per-use "Resource Status Change"): Huawei documents
/// `FREEZE` (frozen) and `NORMAL` (unfrozen), with an example URL for each
/// (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/en-us_topic_0070649069.html>).
/// `UNFREEZE` is not documented for V1; it is what the gateway accepted
/// before (read as "as V2 `status`") and stays a **tolerated alias** of
/// `NORMAL`, so nothing that worked stops working. ASCII case is ignored.
pub fn v1_instance_status_is_freeze(value: &str) -> Option<bool> {
    if value.eq_ignore_ascii_case("FREEZE") {
        Some(true)
    } else if value.eq_ignore_ascii_case("NORMAL") || value.eq_ignore_ascii_case(V1_UNFREEZE_ALIAS) {
        Some(false)
    } else {
        None
    }
}

/// The undocumented V1 spelling of "unfrozen" still accepted (see [`v1_instance_status_is_freeze`]).
pub const V1_UNFREEZE_ALIAS: &str = "UNFREEZE";

/// queryInstance `usageInfo[]` (protocol §6): one entry per billing item, and
/// for a package "the related instance id". Its wire name is not in the
/// reference: `relatedInstanceId` is answered. The gateway keeps the pushed
/// usage of an instance per metering item: records without
/// `relate_pkg_instance` (the instance's own billing item) make one entry,
/// each distinct `relate_pkg_instance` another, naming that package instance.
/// A pay-per-use package instance lists every billing item linked to it: the
/// usage each linked instance had deducted from it, naming that instance
/// (the store keeps the package → instances links; `gateway::package_usage`).
pub const USAGE_INFO_RELATED_INSTANCE: &str = "relatedInstanceId";

/// V2 pay-per-use: Huawei's V2 newInstance page asks for idempotency "based on
/// the order ID (orderId) and product ID (productId)" in pay-per-use
/// transactions (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649092.html>),
/// but the V2 call carries only `orderId` + `orderLineId`; the product ids are
/// in the order query's `productInfo[]` of that line
/// (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649116.html>),
/// read after the answer. KooGallery calls newInstance once per order line, so
/// the gateway answers one instance per order line, which covers every
/// billing item (`productInfo`) of the line; usage of each item is pushed for
/// that instance and queryInstance lists one `usageInfo` entry per item.
/// Not confirmed: whether KooGallery sends one newInstance per productId.
pub const V2_PAY_PER_USE_INSTANCE_PER_LINE: bool = true;

/// V1 `mobilePhone`/`email` are encrypted with the key size the seller chose
/// when publishing the product (protocol §7, §9): the gateway uses its
/// `KOOGATE_ENCRYPT_TYPE`, the same setting as its answers' `encryptType`.
/// Whether V1 ever sends a per-call `encryptType` is not documented: such a
/// parameter is ignored like any unknown one (it is still signed over).
pub const V1_ENCRYPT_TYPE_FROM_SETTING: bool = true;

/// `changeInstanceCheck.productInfo` sub-fields are unconfirmed: an object or
/// an array of objects is accepted and kept as sent; a `skuCode` found at the
/// top level or in the first element is used to judge the change.
pub fn change_check_sku(product_info: &serde_json::Value) -> Option<&str> {
    let first = match product_info {
        serde_json::Value::Array(items) => items.first()?,
        other => other,
    };
    first.get("skuCode")?.as_str()
}

/// V1 `refreshInstance` has no `scene`: it is inferred. `trialToFormal=1`
/// means a trial converted; a negative `orderAmount` a refunded renewal.
pub fn v1_refresh_scene(trial_to_formal: bool, order_amount: Option<&str>) -> super::call::Scene {
    use super::call::Scene;
    if trial_to_formal {
        Scene::TrialToFormal
    } else if order_amount.is_some_and(|a| a.trim_start().starts_with('-')) {
        Scene::UnsubscribeRenewalPeriod
    } else {
        Scene::Renewal
    }
}

/// V1 documents no nonce. Its `authToken` is an HMAC over every parameter and
/// the `timeStamp`, so it names one URL exactly and serves as the V1 nonce
/// (issue 15.5): a repeat inside the window is answered with the first call's
/// kept answer and changes nothing (no second event), so KooGallery's own
/// retries of the same URL still succeed. Refusing a repeat (as a V2 nonce is)
/// would fail those retries. See `gateway::v1_replay_guard`.
pub const V1_NONCE_PARAM: &str = "authToken";

/// The order query API documents no "order not found" code
/// (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649116.html>,
/// error table): `MKT.0100` is "Failure of input parameter" (input
/// validation), sent with HTTP 500. An order KooGallery does not know (or not
/// yet: an order just placed) is expected to come back so, but that is not
/// confirmed. koogate does not guess "not found": it reads `MKT.0100` as
/// `OrderError::Invalid`, and enrichment retries it with the delivery backoff
/// until the schedule gives up (the event then goes to the dead-letter list,
/// where it can be redriven). The simulator answers an unknown order with this code.
pub const ORDER_UNKNOWN_EXPECTED_CODE: &str = "MKT.0100";

/// §10: the usage push signs "the body with keys sorted" (Huawei: "sorted
/// naturally"). Read as: the JSON body with object keys in byte order at every
/// level, no whitespace. The gateway sends exactly these bytes, so the body
/// KooGallery reads is the body that was signed.
pub fn usage_canonical_body(value: &serde_json::Value) -> String {
    fn write(value: &serde_json::Value, out: &mut String) {
        match value {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort_unstable();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

/// §10: the string the usage push `signature` header covers.
pub fn usage_string_to_sign(ts: &str, nonce: &str, canonical_body: &str) -> String {
    format!("ts={ts}&nonce={nonce}&body={canonical_body}")
}

/// How the usage API's answer is read: Huawei's error table of "Pushing the
/// Pay-per-Use Resource Usage (New)"
/// (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649117.html>,
/// protocol §10). The answer's shape `{"error_code","error_msg"}` is assumed
/// (`resultCode`/`resultMsg` also understood: unconfirmed). Read as:
///
/// - `200 MKT.0000`: taken.
/// - `400 MKT.0102` "Invalid body sign", `401 MKT.0151/0154` (token, role) and
///   API Gateway's own 401/403 (`APIGW.*`): a **configuration fault** (wrong key,
///   or a body not signed as sent), never a record fault: the records are held.
/// - `401 MKT.0150` (the instance is not of the AK/SK's seller's product) and
///   `500 MKT.0100/9001/9002/9004`, and any other 4xx answer with a code: a
///   **record fault**: the batch is split until the record stands alone, which
///   is dead-lettered. Several record faults come back as HTTP 500: a 500 is
///   not automatically "retry the same batch".
/// - `500 MKT.9003` (more than 1000 records): split.
/// - `MKT.0999`, any other 5xx, 406/408/429, an answer without a code: retry
///   with the same `metering_sn`.
///
/// No duplicate code is documented (unconfirmed): a refusal whose message
/// says the `metering_sn` was already received counts as taken.
pub fn usage_answer_class(http_status: u16, code: Option<&str>, msg: &str) -> UsageAnswerClass {
    let m = msg.to_ascii_lowercase();
    match code {
        Some("MKT.0000") if (200..300).contains(&http_status) => UsageAnswerClass::Taken,
        _ if m.contains("metering_sn") && (m.contains("already") || m.contains("duplicate") || m.contains("exist")) => {
            UsageAnswerClass::AlreadyTaken
        }
        Some("MKT.0102" | "MKT.0151" | "MKT.0154") => UsageAnswerClass::ConfigFault,
        Some("MKT.0150" | "MKT.0100" | "MKT.9001" | "MKT.9002" | "MKT.9004") => UsageAnswerClass::RecordFault,
        Some("MKT.9003") => UsageAnswerClass::Split,
        Some("MKT.0999") => UsageAnswerClass::Retry,
        _ if matches!(http_status, 401 | 403) => UsageAnswerClass::ConfigFault,
        _ if matches!(http_status, 406 | 408 | 429) || http_status >= 500 => UsageAnswerClass::Retry,
        None => UsageAnswerClass::Retry,
        Some(_) if (400..500).contains(&http_status) => UsageAnswerClass::RecordFault,
        Some(_) => UsageAnswerClass::Retry,
    }
}

/// See [`usage_answer_class`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageAnswerClass {
    Taken,
    AlreadyTaken,
    /// Our key or signing is wrong: hold every record, alert; never dead-letter.
    ConfigFault,
    /// A record of the batch is refused: split; a single record is dead-lettered.
    RecordFault,
    /// Too many records in one call: split.
    Split,
    /// No usable answer: the same records again later, same `metering_sn`.
    Retry,
}

/// A readable reason for a documented usage push code (for the dead-letter list).
pub fn usage_code_reason(code: &str) -> &'static str {
    match code {
        "MKT.0102" => {
            "invalid body sign: the signature key (KOOGATE_ACCESS_KEY) is wrong, or the body was not signed as sent"
        }
        "MKT.0150" => "illegal operation: the instance is not of a product of this seller (the AK/SK's account)",
        "MKT.0151" => "no authority: the AK/SK's account does not have the seller role",
        "MKT.0154" => "illegal token: KooGallery could not authenticate the AK/SK",
        "MKT.0100" => "input validation failed: a field out of range, an illegal value or format",
        "MKT.9001" => "KooGallery does not know the instance id",
        "MKT.9002" => "invalid usage entities: the record does not match the product's metering items",
        "MKT.9003" => "more than 1000 records in one call",
        "MKT.9004" => "begin_time is more than 21 days before now: KooGallery no longer takes it",
        "MKT.0999" => "KooGallery internal error",
        c if c.starts_with("APIGW.") => {
            "API Gateway refused the call (AK/SK signature): check KOOGATE_MARKETPLACE_AK/SK"
        }
        _ => "undocumented code",
    }
}

/// queryInstance `usageInfo[].statisticalTime`: its format is not in the
/// reference. The end of the latest pushed period is answered in the usage
/// API's own format, UTC `yyyyMMdd'T'HHmmss'Z'`. When nothing was pushed yet
/// for an entry, the value is `0` and `statisticalTime` is the time of the
/// query: nothing was taken by KooGallery up to that moment (Huawei's V1
/// Instance Query page asks for "the usage in real time",
/// <https://support.huaweicloud.com/intl/en-us/accessg-marketplace/topic_0070649081.html>).
pub fn usage_statistical_time(end_secs: i64) -> String {
    super::compact_time(end_secs)
}
