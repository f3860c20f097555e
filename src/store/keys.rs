//! Key layout, shards and instance ids.
//!
//! Every key a call touches carries one hash tag, `{s<N>}`, N being the shard
//! of the call's instance (0..16), so a plan's keys always share one Redis
//! Cluster slot. An instance id we mint encodes its shard in its first hex
//! digit, chosen from the *order* id: so the purchase order's record, the
//! instance, its events and its outbox stream are all in one slot.
//!
//! Nonces live in the shard of the call too. That is sound because a nonce
//! replay only matters for a byte-identical signed request, and an identical
//! request names the same instance, hence the same shard.

use uuid::Uuid;

/// Number of shards (outbox streams). Fixed: changing it would move instances.
pub const SHARDS: u8 = 16;

/// Namespace of instance ids (UUIDv5). Fixed: ids must never change.
const INSTANCE_NAMESPACE: Uuid = Uuid::from_u128(0x6b6f_6f67_6174_6501_8000_0000_0000_0001);

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// Shard of an order id.
pub fn order_shard(order_id: &str) -> u8 {
    (fnv1a(order_id.as_bytes()) % u32::from(SHARDS)) as u8
}

/// Shard of an instance id: its first hex digit (ids we mint), else a hash.
pub fn instance_shard(instance_id: &str) -> u8 {
    match instance_id.as_bytes().first().map(|b| (*b as char).to_digit(16)) {
        Some(Some(d)) => d as u8,
        _ => (fnv1a(instance_id.as_bytes()) % u32::from(SHARDS)) as u8,
    }
}

/// The instance id of an order line: always the same for the same line, on
/// every replica, even if every record were lost. A UUIDv5 of the order line
/// whose first hex digit is the order's shard.
pub fn instance_id_for(order_id: &str, order_line_id: Option<&str>) -> String {
    let name = format!("{order_id}\n{}", order_line_id.unwrap_or(""));
    let mut bytes = *Uuid::new_v5(&INSTANCE_NAMESPACE, name.as_bytes()).as_bytes();
    bytes[0] = (bytes[0] & 0x0f) | (order_shard(order_id) << 4);
    Uuid::from_bytes(bytes).hyphenated().to_string()
}

/// The instance id of one pay-per-use billing item: KooGallery trades
/// pay-per-use by specification, and a specification with several billing
/// items makes one order carry several product ids; each gets its own
/// instance, keyed on order id + order line (V1: none) + product id
/// (<https://support.huaweicloud.com/intl/en-us/accessg-marketplace/en-us_topic_0070649013.html>).
/// Ids never contain control characters (the parser refuses them), so `\n`
/// separates the parts unambiguously, as in [`instance_id_for`]; the three-part
/// name can never equal a two-part one. The first hex digit is the order's shard.
pub fn instance_id_for_item(order_id: &str, order_line_id: Option<&str>, product_id: &str) -> String {
    let name = format!("{order_id}\n{}\n{product_id}", order_line_id.unwrap_or(""));
    let mut bytes = *Uuid::new_v5(&INSTANCE_NAMESPACE, name.as_bytes()).as_bytes();
    bytes[0] = (bytes[0] & 0x0f) | (order_shard(order_id) << 4);
    Uuid::from_bytes(bytes).hyphenated().to_string()
}

/// The kept-answer (dedup) key of a pay-per-use billing item's purchase:
/// order, order line and product id in the one composite encoding
/// ([`composite`]). New with issue 13: there is no legacy key to look up.
pub fn item_purchase_dedup(order_id: &str, order_line_id: Option<&str>, product_id: &str) -> Dedup {
    Dedup { key: composite("newitem", &[order_id, order_line_id.unwrap_or(""), product_id]), legacy: None }
}

/// The order record's field naming the instance of an order line (and, for a
/// pay-per-use billing item, its product id after a `\n`).
pub fn order_line_field(order_line_id: Option<&str>, product_id: Option<&str>) -> String {
    match product_id {
        None => format!("line:{}", order_line_id.unwrap_or("")),
        Some(p) => format!("line:{}\n{p}", order_line_id.unwrap_or("")),
    }
}

/// The order line id (and billing item product id) named by an order record field.
pub fn parse_order_line_field(field: &str) -> Option<(&str, Option<&str>)> {
    let rest = field.strip_prefix("line:")?;
    Some(match rest.split_once('\n') {
        Some((line, product)) => (line, Some(product)),
        None => (rest, None),
    })
}

/// The kept-answer (dedup) key of one V1 call, named by its `authToken` (the
/// V1 nonce, issue 15.5). One component: nothing to encode.
pub fn v1_call_dedup(auth_token: &str) -> String {
    format!("v1call:{auth_token}")
}

/// The one encoding of a composite key: `<kind>#` then every part as
/// `<byte length>:<part>`, comma-separated (`new#8:CSORDER1,17:CSORDER1-000001`).
/// The lengths make it unambiguous whatever the ids contain (order `A/B` line
/// `C` and order `A` line `B/C` are two keys), and the `#` after the kind keeps
/// it apart from every legacy key (`<kind>:…`). Every key built from several
/// caller-supplied ids goes through here.
pub fn composite(kind: &str, parts: &[&str]) -> String {
    let mut out = String::with_capacity(kind.len() + 1 + parts.iter().map(|p| p.len() + 6).sum::<usize>());
    out.push_str(kind);
    out.push('#');
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&part.len().to_string());
        out.push(':');
        out.push_str(part);
    }
    out
}

/// A kept-answer (dedup) key, and the key the same call's answer was kept
/// under before issue 15 (`new:{orderId}/{orderLineId}` …), looked up when the
/// first is absent so answers kept by older versions are still found. The
/// legacy key is only given when it is unambiguous: when no part contains a
/// legacy separator (`/` or `:`), its string has exactly the structural
/// separators and no other ids can produce it. Ids with separators (which
/// KooGallery's ids never have) are looked up under the new key only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dedup {
    pub key: String,
    pub legacy: Option<String>,
}

impl Dedup {
    fn of(kind: &str, parts: &[&str], legacy: impl FnOnce() -> String) -> Self {
        let clean = parts.iter().all(|p| !p.contains(['/', ':']));
        Self { key: composite(kind, parts), legacy: clean.then(legacy) }
    }
}

/// The kept answer of a newInstance: order id and order line id.
pub fn dedup_new(order_id: &str, order_line_id: Option<&str>) -> Dedup {
    let line = order_line_id.unwrap_or("");
    Dedup::of("new", &[order_id, line], || format!("new:{order_id}/{line}"))
}

/// The kept answer of a refreshInstance: instance, order, order line and scene.
pub fn dedup_refresh(instance_id: &str, order_id: &str, order_line_id: Option<&str>, scene: &str) -> Dedup {
    let line = order_line_id.unwrap_or("");
    Dedup::of("refresh", &[instance_id, order_id, line, scene], || {
        format!("refresh:{instance_id}:{order_id}/{line}:{scene}")
    })
}

/// The kept answer of an upgradeInstance: instance, order and order line.
pub fn dedup_upgrade(instance_id: &str, order_id: &str, order_line_id: Option<&str>) -> Dedup {
    let line = order_line_id.unwrap_or("");
    Dedup::of("upgrade", &[instance_id, order_id, line], || format!("upgrade:{instance_id}:{order_id}/{line}"))
}

/// The kept answer of an orderNotify: order and order line.
pub fn dedup_notify(order_id: &str, order_line_id: &str) -> Dedup {
    Dedup::of("notify", &[order_id, order_line_id], || format!("notify:{order_id}/{order_line_id}"))
}

/// Key names under a prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` must not contain `{` or `}` (it would break the hash tag).
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }
    fn key(&self, shard: u8, kind: &str, id: &str) -> String {
        format!("{}{{s{shard}}}:{kind}:{id}", self.prefix)
    }
    pub fn nonce(&self, shard: u8, nonce: &str) -> String {
        self.key(shard, "nonce", nonce)
    }
    pub fn answer(&self, shard: u8, dedup: &str) -> String {
        self.key(shard, "ans", dedup)
    }
    pub fn instance(&self, instance_id: &str) -> String {
        self.key(instance_shard(instance_id), "inst", instance_id)
    }
    pub fn order(&self, order_id: &str) -> String {
        self.key(order_shard(order_id), "order", order_id)
    }
    /// Delivery attempts of the shard's events (hash: event id → JSON).
    pub fn attempts(&self, shard: u8) -> String {
        format!("{}{{s{shard}}}:attempts", self.prefix)
    }
    /// Dead letters of the shard (hash: event id → JSON).
    pub fn dlq(&self, shard: u8) -> String {
        format!("{}{{s{shard}}}:dlq", self.prefix)
    }
    /// A cached order query answer.
    pub fn order_cache(&self, order_id: &str, line: &str) -> String {
        self.key(order_shard(order_id), "orderq", &composite("q", &[order_id, line]))
    }
    pub fn outbox(&self, shard: u8) -> String {
        format!("{}{{s{shard}}}:outbox", self.prefix)
    }
    /// All outbox streams.
    pub fn outboxes(&self) -> Vec<String> {
        (0..SHARDS).map(|s| self.outbox(s)).collect()
    }
    /// The prefix of every key of a shard: `<prefix>{s<N>}:` (the usage scripts
    /// build their per-record keys from it, inside the shard's slot).
    pub fn shard_prefix(&self, shard: u8) -> String {
        format!("{}{{s{shard}}}:", self.prefix)
    }
    /// Usage records waiting to be pushed (sorted set: metering_sn → when due, UNIX ms).
    pub fn usage_pending(&self, shard: u8) -> String {
        format!("{}{{s{shard}}}:usage:pending", self.prefix)
    }
    /// Usage records not yet pushed (sorted set: metering_sn → accepted at, UNIX ms).
    pub fn usage_unpushed(&self, shard: u8) -> String {
        format!("{}{{s{shard}}}:usage:unpushed", self.prefix)
    }
    /// Usage records KooGallery refused (sorted set: metering_sn → dead at, UNIX ms).
    pub fn usage_dlq(&self, shard: u8) -> String {
        format!("{}{{s{shard}}}:usage:dlq", self.prefix)
    }
    /// One usage record (hash of its fields), in its instance's shard.
    pub fn usage_record(&self, instance_id: &str, metering_sn: &str) -> String {
        self.key(instance_shard(instance_id), "usage:r", metering_sn)
    }
    /// The usage records of an instance (sorted set: metering_sn → accepted
    /// at, UNIX ms), beside the records, in the instance's shard.
    pub fn usage_by_instance(&self, instance_id: &str) -> String {
        self.key(instance_shard(instance_id), "usage:i", instance_id)
    }
    /// Which record holds a metering_sn (hash: metering_sn → record content), in
    /// the metering_sn's own shard: it makes the sn unique across all instances.
    pub fn usage_sn_registry(&self, metering_sn: &str) -> (u8, String) {
        let shard = order_shard(metering_sn);
        (shard, format!("{}{{s{shard}}}:usage:sn", self.prefix))
    }
    /// The pay-per-use instances whose usage was deducted from a package
    /// instance (set of instance ids), in the package's shard: what the
    /// package's queryInstance lists in `usageInfo[]`.
    pub fn package_links(&self, package_id: &str) -> String {
        self.key(instance_shard(package_id), "pkglinks", package_id)
    }
    /// The instances an account holds (sorted set: instance id → purchase
    /// time, UNIX ms), in the shard of the customer id: one key per account,
    /// so a page of it is one command on one node, Redis Cluster included.
    pub fn account(&self, customer_id: &str) -> String {
        self.key(order_shard(customer_id), "acct", customer_id)
    }
    /// The account each instance of the shard is linked to (hash: instance id
    /// → customer id), beside the instance records: an instance is linked once.
    pub fn account_of(&self, shard: u8) -> String {
        format!("{}{{s{shard}}}:acct:of", self.prefix)
    }
    /// Instances of the shard whose account is not known yet (sorted set:
    /// instance id → since, UNIX ms), beside the instance records.
    pub fn account_pending(&self, shard: u8) -> String {
        format!("{}{{s{shard}}}:acct:pending", self.prefix)
    }
    /// How many requests hold a claim on a registered metering_sn (hash: metering_sn →
    /// count), beside the registry: an sn is unregistered only when none is left.
    pub fn usage_sn_claims(&self, metering_sn: &str) -> String {
        let shard = order_shard(metering_sn);
        format!("{}{{s{shard}}}:usage:sn_claims", self.prefix)
    }
    /// A delivered event kept in the history (string: JSON, expiring with
    /// the retention), in its instance's shard.
    pub fn history(&self, event_id: &str) -> String {
        let shard = crate::events::parse_event_id(event_id).map_or(0, |(subject, _)| instance_shard(subject));
        self.key(shard, "hist", event_id)
    }
    /// The history of the shard by delivery time (sorted set: event id →
    /// delivered at, UNIX ms), trimmed to the retention as it is written.
    pub fn history_by_time(&self, shard: u8) -> String {
        format!("{}{{s{shard}}}:hist:time", self.prefix)
    }
    /// The history of the shard's events naming an order id (sorted set:
    /// event id → delivered at). In the *event's* shard, not the order's (a
    /// renewal's order id hashes elsewhere): a look-up by order asks every shard.
    pub fn history_by_order(&self, shard: u8, order_id: &str) -> String {
        self.key(shard, "hist:o", order_id)
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_stable_and_carry_the_order_shard() {
        let a = instance_id_for("CS2211181819B4LVS", Some("CS2211181819B4LVS-000001"));
        assert_eq!(a, instance_id_for("CS2211181819B4LVS", Some("CS2211181819B4LVS-000001")));
        assert_ne!(a, instance_id_for("CS2211181819B4LVS", Some("CS2211181819B4LVS-000002")));
        assert_eq!(a.len(), 36);
        for order in ["CS2211181819B4LVS", "MOCKPERIODYEARNEW", "x", "CS1906666666ABCDE"] {
            let id = instance_id_for(order, Some("1"));
            assert_eq!(instance_shard(&id), order_shard(order), "{order}");
            let keys = Keys::new("kg:");
            let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_owned();
            assert_eq!(tag(&keys.instance(&id)), tag(&keys.order(order)));
        }
    }

    #[test]
    fn billing_items_get_their_own_instances_and_keys() {
        let a = instance_id_for_item("CS1", None, "P1");
        assert_eq!(a, instance_id_for_item("CS1", None, "P1"));
        assert_ne!(a, instance_id_for_item("CS1", None, "P2"));
        assert_ne!(a, instance_id_for("CS1", None));
        assert_ne!(a, instance_id_for("CS1", Some("P1")));
        assert_eq!(instance_shard(&a), order_shard("CS1"));
        assert_ne!(item_purchase_dedup("A/B", None, "C"), item_purchase_dedup("A", None, "B/C"));
        assert_ne!(item_purchase_dedup("A1", Some(""), "2"), item_purchase_dedup("A", Some("1"), "2"));
        assert_eq!(parse_order_line_field(&order_line_field(None, Some("P1"))), Some(("", Some("P1"))));
        assert_eq!(parse_order_line_field(&order_line_field(Some("L"), None)), Some(("L", None)));
        assert_eq!(parse_order_line_field("customer_id"), None);
    }

    #[test]
    fn composite_keys_are_unambiguous() {
        assert_ne!(dedup_new("A/B", Some("C")).key, dedup_new("A", Some("B/C")).key);
        assert_ne!(dedup_notify("A:1", "2").key, dedup_notify("A", "1:2").key);
        assert_ne!(dedup_refresh("i", "o", Some("l:x"), "s").key, dedup_refresh("i", "o", Some("l"), "x:s").key);
        assert_ne!(composite("new", &["1:a", ""]), composite("new", &["1", "a"]));
        assert_eq!(composite("new", &["CSORDER1", "CSORDER1-000001"]), "new#8:CSORDER1,15:CSORDER1-000001");
        // Legacy keys only where they were unambiguous, spelled as before.
        let d = dedup_upgrade("inst", "CS1", Some("CS1-000001"));
        assert_eq!(d.legacy.as_deref(), Some("upgrade:inst:CS1/CS1-000001"));
        assert_eq!(dedup_new("A/B", Some("C")).legacy, None);
        assert_eq!(dedup_new("A", None).legacy.as_deref(), Some("new:A/"));
    }

    #[test]
    fn shards_cover_the_range() {
        let mut seen = [false; SHARDS as usize];
        for i in 0..200 {
            seen[order_shard(&format!("CS{i}")) as usize] = true;
            assert!(instance_shard(&format!("zz{i}")) < SHARDS);
        }
        assert!(seen.iter().all(|s| *s));
    }
}
