//! Caller-supplied strings in logs, and how often refusals are logged.
//!
//! - [`clean`]: every string a caller chose (order ids, metering_sn, refusal
//!   reasons that quote a field, request paths) goes through it before it is
//!   logged, in both formats: control characters are escaped (`\n`, `\u{1b}`…),
//!   so a value cannot forge a log line or drive a terminal, and it is cut to
//!   [`MAX_CHARS`] characters (a 900 KB field makes a short line).
//! - [`refusal`]: refused calls are logged at most [`PER_SECOND`] lines per
//!   reason (result code) per second; the first line logged after a second in
//!   which lines were suppressed carries how many were. Metrics count every
//!   refusal regardless (they are counted where the call is decided).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Longest caller-supplied string kept in a log line, in characters.
pub const MAX_CHARS: usize = 256;
/// Refusal lines logged per reason per second at most.
pub const PER_SECOND: u32 = 20;

/// `s` made safe for a log line: control characters escaped, at most
/// [`MAX_CHARS`] characters, then `…(+N chars)` when cut.
pub fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_CHARS + 16));
    let mut chars = s.chars();
    for c in chars.by_ref().take(MAX_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    let rest = chars.count();
    if rest > 0 {
        out.push_str(&format!("…(+{rest} chars)"));
    }
    out
}

/// [`clean`] for an optional string.
pub fn clean_opt(s: Option<&str>) -> Option<String> {
    s.map(clean)
}

/// Whether to log one refusal line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines of this reason were dropped before it.
    Log { suppressed: u64 },
    /// Drop it (counted, reported with the next logged line of the reason).
    Suppress,
}

/// Per-reason windows of one second (pure: the caller gives the time).
#[derive(Debug, Default)]
pub struct Limiter {
    windows: HashMap<String, Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

impl Limiter {
    pub fn check(&mut self, reason: &str, now: Instant) -> Verdict {
        let w = self.windows.entry(reason.to_owned()).or_insert(Window { start: now, logged: 0, suppressed: 0 });
        if now.duration_since(w.start) >= Duration::from_secs(1) {
            w.start = now;
            w.logged = 0;
        }
        if w.logged < PER_SECOND {
            w.logged += 1;
            let suppressed = std::mem::take(&mut w.suppressed);
            Verdict::Log { suppressed }
        } else {
            w.suppressed += 1;
            Verdict::Suppress
        }
    }
}

/// The process's refusal limiter.
pub fn refusal(reason: &str) -> Verdict {
    static LIMITER: OnceLock<Mutex<Limiter>> = OnceLock::new();
    let limiter = LIMITER.get_or_init(|| Mutex::new(Limiter::default()));
    let mut limiter = limiter.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    limiter.check(reason, Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_strings_cut() {
        assert_eq!(clean("sn-1\n2026-12-02T00:00:00Z ERROR forged"), "sn-1\\n2026-12-02T00:00:00Z ERROR forged");
        assert_eq!(clean("a\u{1b}[31mred\r"), "a\\u{1b}[31mred\\r");
        assert_eq!(clean("CS2211181819B4LVS"), "CS2211181819B4LVS");
        let long = "é".repeat(900_000);
        let cut = clean(&long);
        assert!(cut.starts_with(&"é".repeat(MAX_CHARS)));
        assert!(cut.ends_with("…(+899744 chars)"), "{}", &cut[cut.len() - 30..]);
        assert!(cut.len() < 1024);
    }

    #[test]
    fn refusals_are_limited_per_reason_and_the_suppressed_counted() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for _ in 0..PER_SECOND {
            assert_eq!(l.check("000001", t0), Verdict::Log { suppressed: 0 });
        }
        for _ in 0..500 {
            assert_eq!(l.check("000001", t0 + Duration::from_millis(500)), Verdict::Suppress);
        }
        // Another reason has its own budget.
        assert_eq!(l.check("000002", t0), Verdict::Log { suppressed: 0 });
        // The next second: logged again, with the count.
        assert_eq!(l.check("000001", t0 + Duration::from_millis(1001)), Verdict::Log { suppressed: 500 });
        assert_eq!(l.check("000001", t0 + Duration::from_millis(1002)), Verdict::Log { suppressed: 0 });
    }
}
