//! Small helpers with no dependencies: RFC 3339 formatting and UUID-shaped ids.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Formats a time the way Flux (chrono `to_rfc3339`) does: nanoseconds and `+00:00`.
pub fn rfc3339_nanos(t: SystemTime) -> String {
    // Times before 1970 cannot come from this process's clock in practice; clamp instead of panic.
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}+00:00",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        d.subsec_nanos()
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Lock-free id source. A counter run through a bijective mixer keeps ids unique without a
/// shared RNG lock on the hot path (one id per event at tens of thousands of events/s).
pub struct IdGen {
    seed: u64,
    counter: AtomicU64,
}

impl IdGen {
    pub fn new(seed: u64) -> Self {
        IdGen {
            seed: splitmix64(seed),
            counter: AtomicU64::new(0),
        }
    }

    fn next_bits(&self) -> (u64, u64) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let a = splitmix64(n ^ self.seed);
        (a, splitmix64(a ^ 0x5555_5555_5555_5555))
    }

    /// A UUIDv7-shaped id: 48-bit millisecond time, version 7, RFC 4122 variant.
    pub fn uuid_v7(&self) -> String {
        let ms = now_ms() & 0xFFFF_FFFF_FFFF;
        let (a, b) = self.next_bits();
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (ms >> 16) as u32,
            (ms & 0xFFFF) as u16,
            0x7000 | (a & 0x0FFF) as u16,
            0x8000 | ((b >> 48) & 0x3FFF) as u16,
            b & 0xFFFF_FFFF_FFFF
        )
    }

    /// A UUIDv4-shaped token (Flux namespace tokens are v4).
    pub fn uuid_v4(&self) -> String {
        let (a, b) = self.next_bits();
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (a >> 32) as u32,
            (a >> 16) as u16,
            0x4000 | (a & 0x0FFF) as u16,
            0x8000 | ((b >> 48) & 0x3FFF) as u16,
            b & 0xFFFF_FFFF_FFFF
        )
    }

    /// `ns_` + 8 chars of `[0-9a-z]`, like Flux namespace ids.
    pub fn namespace_id(&self) -> String {
        let (mut a, _) = self.next_bits();
        let mut s = String::from("ns_");
        for _ in 0..8 {
            let d = (a % 36) as u8;
            a /= 36;
            s.push(if d < 10 {
                (b'0' + d) as char
            } else {
                (b'a' + d - 10) as char
            });
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_values() {
        let t = UNIX_EPOCH + Duration::new(1_796_323_971, 963_549_616);
        assert_eq!(rfc3339_nanos(t), "2026-12-03T18:52:51.963549616+00:00");
        assert_eq!(
            rfc3339_nanos(UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000+00:00"
        );
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(rfc3339_nanos(leap).starts_with("2000-02-29T00:00:00"));
    }

    #[test]
    fn ids_are_uuid_shaped_and_distinct() {
        let g = IdGen::new(7);
        let a = g.uuid_v7();
        let b = g.uuid_v7();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "7");
        assert_eq!(&g.uuid_v4()[14..15], "4");
        assert_eq!(g.namespace_id().len(), 11);
    }
}
