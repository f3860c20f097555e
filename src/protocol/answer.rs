//! Answer bodies (protocol §4, §5). Bodies are serialized once, stored as
//! bytes when they must be repeated, and signed over exactly those bytes.

use serde::{Deserialize, Serialize};

use super::ResultCode;

/// `appInfo` of a newInstance (and queryInstance) answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppInfo {
    pub front_end_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_url: Option<String>,
    /// Encrypted (§9).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
    /// Encrypted (§9).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memo: Option<String>,
}

/// One `queryInstance` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceInfo {
    pub instance_id: String,
    pub app_info: AppInfo,
    /// Pay-per-use instances: the usage KooGallery has taken, an array
    /// (`UsageInfo[]`) with one entry per billing item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_info: Option<Vec<UsageInfo>>,
}

/// One `usageInfo` entry of a pay-per-use instance in a queryInstance answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageInfo {
    /// Pushed usage of this billing item, a decimal string.
    pub usage_value: String,
    /// Up to when `usage_value` is counted: always present
    /// (`unconfirmed::usage_statistical_time`).
    pub statistical_time: String,
    /// The related (package) instance id of a billing item linked to a
    /// package (`unconfirmed::USAGE_INFO_RELATED_INSTANCE`).
    #[serde(rename = "relatedInstanceId", default, skip_serializing_if = "Option::is_none")]
    pub related_instance_id: Option<String>,
}

/// An answer body. Field order is the wire order.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    pub result_code: String,
    pub result_msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_info: Option<AppInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<Vec<InstanceInfo>>,
}

/// `resultMsg` is at most 255 characters.
const MAX_MSG: usize = 255;

impl Answer {
    pub fn new(code: ResultCode, msg: impl Into<String>) -> Self {
        let mut msg: String = msg.into();
        if msg.chars().count() > MAX_MSG {
            msg = msg.chars().take(MAX_MSG).collect();
        }
        Self {
            result_code: code.as_str().to_owned(),
            result_msg: msg,
            instance_id: None,
            encrypt_type: None,
            app_info: None,
            info: None,
        }
    }

    pub fn success() -> Self {
        Self::new(ResultCode::Success, "success")
    }

    /// The exact bytes to send.
    pub fn to_body(&self) -> String {
        // Serializing plain strings and options cannot fail.
        serde_json::to_string(self)
            .unwrap_or_else(|_| String::from(r#"{"resultCode":"000005","resultMsg":"internal error"}"#))
    }
}

/// The `resultCode` of an answer body, for logs and metrics of stored answers.
pub fn code_of(body: &str) -> Option<ResultCode> {
    #[derive(Deserialize)]
    struct Code<'a> {
        #[serde(rename = "resultCode", borrow)]
        result_code: &'a str,
    }
    serde_json::from_str::<Code>(body).ok().and_then(|c| ResultCode::parse(c.result_code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_wire_names_and_order() {
        let mut a = Answer::success();
        a.instance_id = Some("i-1".into());
        a.encrypt_type = Some("1".into());
        a.app_info = Some(AppInfo { front_end_url: "https://x".into(), ..AppInfo::default() });
        assert_eq!(
            a.to_body(),
            r#"{"resultCode":"000000","resultMsg":"success","instanceId":"i-1","encryptType":"1","appInfo":{"frontEndUrl":"https://x"}}"#
        );
        assert_eq!(code_of(&a.to_body()), Some(ResultCode::Success));
        assert_eq!(Answer::new(ResultCode::AuthFailed, "x".repeat(300)).result_msg.len(), 255);
    }
}
