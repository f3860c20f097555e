//! Every protocol detail the reference marks **(unconfirmed)**, or that we had
//! to decide without a reference, lives here and nowhere else. When Huawei's
//! behaviour turns out different, this is the one file to change.

use super::crypto::EncryptType;

/// V2 `timestamp` is documented as 13-digit milliseconds; older pages say
/// seconds. A 10-digit value is read as seconds.
pub const V2_TIMESTAMP_SECONDS_DIGITS: usize = 10;

/// V1 `instanceStatus` values are unconfirmed: the reference says "as V2
/// `status`", so `FREEZE`/`UNFREEZE` (ASCII case-insensitive) are accepted.
pub fn v1_instance_status_is_freeze(value: &str) -> Option<bool> {
    if value.eq_ignore_ascii_case("FREEZE") {
        Some(true)
    } else if value.eq_ignore_ascii_case("UNFREEZE") {
        Some(false)
    } else {
        None
    }
}

/// The encryption of V1 `mobilePhone`/`email` is not stated per call: an
/// `encryptType` parameter is honoured when present, else AES-256 (the V2
/// default) is assumed.
pub const V1_DEFAULT_ENCRYPT_TYPE: EncryptType = EncryptType::Aes256;

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

/// V1 has no nonce. A V1 call is authenticated by its `authToken` and its
/// `timeStamp` window only; KooGallery's retries of the same URL are answered
/// from the dedup record, so no replay check is made on V1 (documented in the README).
pub const V1_HAS_NONCE: bool = false;

/// The order query API's code for an unknown order is not documented here:
/// `MKT.0100` (what the simulator answers) or a message saying the order does
/// not exist is read as "not found"; every other non-`MKT.0000` code is a refusal.
pub fn order_not_found(code: &str, message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    code == "MKT.0100" || m.contains("not exist") || m.contains("not found")
}
