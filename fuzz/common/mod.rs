//! What the fuzz targets and the seed generator share: the fixed key ring and clock,
//! and how a target reads its input's first byte.
#![allow(dead_code)]

use koogate::protocol::verify::AccessKeys;
use koogate::protocol::Rejection;
use koogate::secret::Secret;

/// The access key every target verifies with (the one of the unit tests).
pub const KEY: &str = "test-access-key-123";
/// The previous access key of the ring, accepted during its grace.
pub const OLD_KEY: &str = "previous-access-key-456";
/// A key the ring does not hold.
pub const WRONG_KEY: &str = "not-the-access-key";
/// The gateway clock of every target (UNIX ms): 2023-11-14T22:13:20Z.
pub const NOW_MS: i64 = 1_700_000_000_000;
/// `KOOGATE_TIMESTAMP_SKEW_SECS`.
pub const WINDOW_SECS: u64 = 60;

/// The ring every target verifies with: current [`KEY`], previous [`OLD_KEY`]
/// accepted until [`NOW_MS`] exactly (its last valid instant).
pub fn keys() -> AccessKeys {
    AccessKeys::new(Secret::new(KEY)).with_previous(Secret::new(OLD_KEY), Some(NOW_MS))
}

/// The same ring once the previous key's grace has ended.
pub fn keys_after_grace() -> AccessKeys {
    AccessKeys::new(Secret::new(KEY)).with_previous(Secret::new(OLD_KEY), Some(NOW_MS - 1))
}

/// Who signs the correctly built variant of an input, from bits 1-2 of its mode byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// The current key: verification must pass (inside the window).
    Current,
    /// The previous key during its grace: must pass, reporting the previous key.
    Previous,
    /// The previous key after its grace: must be refused as a bad signature.
    PreviousExpired,
    /// A key nobody holds: must be refused as a bad signature.
    Wrong,
}

/// How a mode byte asks for a correctly built (signed) variant.
///
/// Bit 0 clear: build one. Bits 1-2: the [`Signer`]. Bits 3-7: the clock offset of
/// the signed timestamp, `(bits - 16) * 5` seconds, so -80 s..+75 s in 5 s steps,
/// hitting both edges of the 60 s window exactly.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    pub sign: bool,
    pub signer: Signer,
    pub offset_ms: i64,
}

impl Mode {
    pub fn new(byte: u8) -> Self {
        let signer = match (byte >> 1) & 3 {
            0 => Signer::Current,
            1 => Signer::Previous,
            2 => Signer::PreviousExpired,
            _ => Signer::Wrong,
        };
        Self { sign: byte & 1 == 0, signer, offset_ms: (i64::from(byte >> 3) - 16) * 5_000 }
    }

    /// The mode byte asking for `signer` at `offset_secs` (a multiple of 5 in -80..=75).
    pub fn byte(signer: Signer, offset_secs: i64) -> u8 {
        let bits = match signer {
            Signer::Current => 0,
            Signer::Previous => 1,
            Signer::PreviousExpired => 2,
            Signer::Wrong => 3,
        };
        ((((offset_secs / 5) + 16) as u8) << 3) | (bits << 1)
    }

    /// The key the signed variant is made with, and the ring it is verified against.
    pub fn signer_and_ring(self) -> (&'static str, AccessKeys) {
        match self.signer {
            Signer::Current => (KEY, keys()),
            Signer::Previous => (OLD_KEY, keys()),
            Signer::PreviousExpired => (OLD_KEY, keys_after_grace()),
            Signer::Wrong => (WRONG_KEY, keys()),
        }
    }

    /// Must the signed variant verify? (a known key inside the window)
    pub fn must_verify(self) -> bool {
        matches!(self.signer, Signer::Current | Signer::Previous) && self.in_window()
    }

    pub fn in_window(self) -> bool {
        self.offset_ms.abs() <= (WINDOW_SECS as i64) * 1000
    }
}

/// The only refusals a correctly signed call may get: stale (outside the
/// window) or a bad signature (signed with a key the ring does not hold).
pub fn check_signed_refusal(mode: Mode, refusal: &Rejection, signed: &str) {
    match refusal {
        Rejection::StaleTimestamp { allowed_secs, .. } => {
            assert_eq!(*allowed_secs, WINDOW_SECS);
            assert!(!mode.in_window(), "{mode:?} in window but refused as stale: {signed}");
        }
        Rejection::BadSignature => {
            assert!(
                !matches!(mode.signer, Signer::Current | Signer::Previous),
                "{mode:?}: a correctly signed call was refused: {signed}"
            );
        }
        other => panic!("{mode:?}: a correctly signed call was refused with {other:?}: {signed}"),
    }
}
