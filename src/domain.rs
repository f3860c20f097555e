//! The domain vocabulary: instance statuses and the record field names that
//! several modules (and the Redis Lua scripts, which spell the same strings)
//! read and write. A leaf: it imports nothing from the crate, everything else
//! may import it.
//!
//! The strings are stored: changing one is a data migration, not a refactor.

use std::fmt;

/// The status of an instance, as stored in its record's [`field::STATUS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Active,
    Frozen,
    Expired,
    Released,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 4] = [Status::Active, Status::Frozen, Status::Expired, Status::Released];

    /// The stored string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Active => status::ACTIVE,
            Status::Frozen => status::FROZEN,
            Status::Expired => status::EXPIRED,
            Status::Released => status::RELEASED,
        }
    }

    /// The status a stored string names (`None`: absent or unknown).
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stored status strings, for string matches on records.
pub mod status {
    pub const ACTIVE: &str = "active";
    pub const FROZEN: &str = "frozen";
    pub const EXPIRED: &str = "expired";
    pub const RELEASED: &str = "released";
}

/// Instance (and order) record field names used by more than one module.
pub mod field {
    /// The instance status (see [`super::Status`]).
    pub const STATUS: &str = "status";
    pub const CUSTOMER_ID: &str = "customer_id";
    pub const ORDER_ID: &str = "order_id";
    pub const ORDER_LINE_ID: &str = "order_line_id";
    pub const CREATED_AT: &str = "created_at";
    pub const UPDATED_AT: &str = "updated_at";
    /// The sequence number of the instance's latest event (its ids are
    /// `evt_<instance>_<seq>`, 1 to this), set by the store as it applies a transition.
    pub const SEQ: &str = "seq";
    /// Pushed usage of the instance, in units of 0.0001 (queryInstance).
    pub const USAGE_E4: &str = "usage_e4";
    /// End of the latest pushed usage period (UNIX s).
    pub const USAGE_END: &str = "usage_end";
    /// Usage accepted and not yet pushed (nor dead), in units of 0.0001,
    /// beside `usage_unpushed_e4:<item>` per metering item: added at intake
    /// and redrive, taken off when a record is pushed or dies.
    pub const USAGE_UNPUSHED_E4: &str = "usage_unpushed_e4";
    /// The customer and product facts an order gives an instance (by the call, or by the order query
    /// API through enrichment): shown by the account views, refreshed into events once enriched.
    pub const ORDER_FACTS: &[&str] = &[
        CUSTOMER_ID,
        "customer_name",
        "product_id",
        "sku_code",
        "charging_mode",
        "period_type",
        "period_number",
        "quantity",
    ];
}

/// The instance record fields of the pushed usage of one metering item
/// (`relate_pkg_instance`), beside the totals ([`field::USAGE_E4`],
/// [`field::USAGE_END`]); the Redis settle script builds the same names
/// (`usage_e4:<item>`, `usage_end:<item>`).
pub fn item_usage_fields(item: &str) -> (String, String) {
    (format!("{}:{item}", field::USAGE_E4), format!("{}:{item}", field::USAGE_END))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_as_stored() {
        let stored: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(stored, ["active", "frozen", "expired", "released"]);
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(Status::parse(""), None);
        assert_eq!(Status::parse("Active"), None);
    }

    #[test]
    fn item_fields_are_the_lua_names() {
        assert_eq!(item_usage_fields("pkg"), ("usage_e4:pkg".to_owned(), "usage_end:pkg".to_owned()));
    }
}
