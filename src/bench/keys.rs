//! Key and value generation for the benchmark.
//!
//! Every PUT writes a key nobody wrote before, so the replication check can tell "this node has the
//! value we acknowledged" apart from "this node has some older value". Keys are the whole request
//! URI, as the KV API uses `RequestURI` as the key: `/<prefix>-<index>`, the index zero-padded to
//! eight digits so that keys sort in write order and all have the same length.
//!
//! Values are derived from the index alone, so the checker recomputes them instead of keeping
//! `total × val_size` bytes in memory: the decimal index followed by `.`, repeated and cut to
//! `val_size` bytes (for index 42 and 10 bytes: `42.42.42.4`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Names the keys of one benchmark run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpace {
    prefix: String,
    val_size: usize,
}

impl KeySpace {
    /// A key space with the given prefix and value size.
    ///
    /// # Errors
    /// Returns the offending character if `prefix` holds anything but ASCII letters, digits, `-`,
    /// `_` and `.`: other characters would need percent-encoding in the URI, and the server would
    /// then store the encoded form, which makes keys hard to recognise.
    pub fn new(prefix: &str, val_size: usize) -> Result<Self, char> {
        if let Some(bad) = prefix
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(bad);
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            val_size,
        })
    }

    /// The key (request URI) of the `index`-th PUT.
    pub fn key(&self, index: u64) -> String {
        format!("/{}-{index:08}", self.prefix)
    }

    /// The value the `index`-th PUT writes.
    pub fn value(&self, index: u64) -> Vec<u8> {
        let unit = format!("{index}.");
        unit.bytes().cycle().take(self.val_size).collect()
    }

    /// The prefix shared by all keys of this run.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// A prefix that differs between runs (`bench-` and the current time in milliseconds, in hex), so a
/// rerun against the same cluster never finds its keys already present.
pub fn default_prefix() -> String {
    // A clock before 1970 only makes the prefix less unique; it is not worth failing the run.
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("bench-{millis:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_uris_with_padded_index() {
        let ks = KeySpace::new("bench-x", 4).unwrap();
        assert_eq!(ks.key(1), "/bench-x-00000001");
        assert_eq!(ks.key(123_456_789), "/bench-x-123456789");
        assert_eq!(ks.prefix(), "bench-x");
    }

    #[test]
    fn values_have_exact_size_and_differ_per_index() {
        let ks = KeySpace::new("p", 10).unwrap();
        assert_eq!(ks.value(42), b"42.42.42.4");
        assert_eq!(ks.value(7).len(), 10);
        assert_ne!(ks.value(1), ks.value(2));
        assert!(KeySpace::new("p", 0).unwrap().value(3).is_empty());
        assert_eq!(KeySpace::new("p", 128).unwrap().value(99_999).len(), 128);
    }

    #[test]
    fn prefix_must_not_need_escaping() {
        assert_eq!(KeySpace::new("a/b", 1), Err('/'));
        assert_eq!(KeySpace::new("a b", 1), Err(' '));
        assert_eq!(KeySpace::new("a?b", 1), Err('?'));
        assert!(KeySpace::new("A-z_0.9", 1).is_ok());
    }

    #[test]
    fn default_prefix_is_usable() {
        let p = default_prefix();
        assert!(p.starts_with("bench-"));
        assert!(KeySpace::new(&p, 1).is_ok());
    }
}
