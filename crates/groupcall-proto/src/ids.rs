//! Identifiers, the mesh ordering rule and id generation.

use std::cmp::Ordering;
use std::fmt;

/// A participant device: a Matrix user id and one of its device ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    /// Matrix user id, e.g. `@alice:example.org`.
    pub user_id: String,
    /// Device id of that user, e.g. `ABCDEFGH`.
    pub device_id: String,
}

impl DeviceKey {
    /// Builds a key from its parts.
    pub fn new(user_id: impl Into<String>, device_id: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            device_id: device_id.into(),
        }
    }
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.user_id, self.device_id)
    }
}

/// Compares two strings the way JavaScript's `<` does: by UTF-16 code units.
///
/// MSC3401 says "lexicographically lower" without saying over what. The
/// reference implementation (matrix-js-sdk) compares JS strings, i.e. UTF-16
/// code units. That differs from Rust's byte-wise `str` order only when one
/// string has a character above U+FFFF where the other has one in
/// U+E000..=U+FFFF; we follow the reference so both sides agree on who calls.
pub fn cmp_utf16(a: &str, b: &str) -> Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

/// The full-mesh rule of MSC3401: does `local` place the call to `remote`?
///
/// The participant with the lower user id calls; for two devices of the same
/// user, the lower device id calls. A device never calls itself.
pub fn should_call(local: &DeviceKey, remote: &DeviceKey) -> bool {
    match cmp_utf16(&local.user_id, &remote.user_id) {
        Ordering::Less => true,
        Ordering::Greater => false,
        Ordering::Equal => cmp_utf16(&local.device_id, &remote.device_id) == Ordering::Less,
    }
}

/// A small deterministic random generator (SplitMix64) for ids.
///
/// The core has no access to OS randomness; the driver seeds it (from the OS
/// in production, from a fixed value in tests). Ids need to be unique, not
/// secret: nothing here is a cryptographic secret.
#[derive(Debug, Clone)]
pub struct IdGen {
    state: u64,
}

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

impl IdGen {
    /// A generator with the given seed.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A random string of `len` characters from `[A-Za-z0-9]` (valid in the
    /// MSC2746 id grammar).
    pub fn string(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| {
                let i = (self.next_u64() % ALPHABET.len() as u64) as usize;
                char::from(ALPHABET[i])
            })
            .collect()
    }

    /// A new `call_id`: the current time in ms followed by 16 random
    /// characters, like the reference. Older calls sort first, which makes
    /// glare resolution (smaller `call_id` wins) prefer the older call.
    pub fn call_id(&mut self, now_ms: u64) -> String {
        format!("{now_ms:013}{}", self.string(16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16_order_differs_from_bytes_where_it_should() {
        // U+FF5E (fullwidth tilde) vs U+1F600 (emoji, a surrogate pair in UTF-16).
        let a = "\u{FF5E}";
        let b = "\u{1F600}";
        assert_eq!(a.cmp(b), Ordering::Less); // bytes: EF.. < F0..
        assert_eq!(cmp_utf16(a, b), Ordering::Greater); // UTF-16: FF5E > D83D
    }

    #[test]
    fn mesh_rule() {
        let a = DeviceKey::new("@alice:x", "B");
        let b = DeviceKey::new("@bob:x", "A");
        let a2 = DeviceKey::new("@alice:x", "C");
        assert!(should_call(&a, &b));
        assert!(!should_call(&b, &a));
        assert!(should_call(&a, &a2));
        assert!(!should_call(&a2, &a));
        assert!(!should_call(&a, &a));
    }

    #[test]
    fn ids_are_deterministic_and_valid() {
        let mut g1 = IdGen::new(7);
        let mut g2 = IdGen::new(7);
        let id = g1.call_id(1_700_000_000_000);
        assert_eq!(id, g2.call_id(1_700_000_000_000));
        assert_eq!(id.len(), 29);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
