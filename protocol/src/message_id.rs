//! Message ids in the format of RocketMQ 5 clients: 34 hex digits, `01` (the version), six
//! bytes naming the process's host, the process id, the seconds since 2021-01-01 and a
//! sequence number. A producer picks the id once and keeps it across retries, so the broker
//! and consumers can recognise a resend.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 2021-01-01T00:00:00Z, the epoch of the id's seconds field.
const ID_EPOCH: Duration = Duration::from_secs(1_609_459_200);

/// A new message id, unique across processes with overwhelming likelihood.
pub fn new_message_id() -> String {
    new_message_id_at(SystemTime::now())
}

/// [`new_message_id`] with the clock already read: a producer building a batch reads it once.
pub fn new_message_id_at(now: SystemTime) -> String {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    static NODE_AND_PID: OnceLock<(u64, u32)> = OnceLock::new();
    // The standard library seeds each `RandomState` randomly: 48 random bits stand in for
    // the MAC address, which the standard library cannot read.
    let (node, pid) = *NODE_AND_PID.get_or_init(|| {
        let node = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        (node & 0xFFFF_FFFF_FFFF, std::process::id() & 0xFFFF)
    });
    let seconds = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(ID_EPOCH)
        .as_secs()
        & 0xFFFF_FFFF;
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    // Written by hand rather than with `format!`, which was a visible part of a producer's
    // per-message cost.
    let mut id = [b'0'; 34];
    id[1] = b'1';
    put_hex(&mut id[2..14], node);
    put_hex(&mut id[14..18], u64::from(pid));
    put_hex(&mut id[18..26], seconds);
    put_hex(&mut id[26..34], u64::from(sequence));
    // Hex digits are ASCII, so the conversion cannot fail.
    std::str::from_utf8(&id)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Writes the low `4 * out.len()` bits of `value` into `out` as upper-case hex digits.
fn put_hex(out: &mut [u8], mut value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    for digit in out.iter_mut().rev() {
        *digit = DIGITS[(value & 0xF) as usize];
        value >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_34_hex_digits_and_distinct() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_message_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 34, "{id}");
            assert!(id.starts_with("01"), "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
    }

    #[test]
    fn hex_fields_are_upper_case_zero_padded_and_truncated_to_their_width() {
        let mut out = [0u8; 4];
        put_hex(&mut out, 0x2A);
        assert_eq!(&out, b"002A");
        put_hex(&mut out, 0xABCDEF);
        assert_eq!(&out, b"CDEF");
    }
}
