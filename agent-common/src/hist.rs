//! Log2 latency histograms, filled in the kernel and read on scrape.
//!
//! Slot `k` (for `k < SLOTS - 1`) counts durations `d` with `2^(k-1) us < d <= 2^k us` (slot 0:
//! `d <= 1 us`), so slot `k` is exactly the Prometheus bucket `le = 2^k us`. The last slot counts
//! everything above `2^(SLOTS-2) us` (about 4.2 s) and becomes the `+Inf` bucket.

/// Number of slots: 23 finite buckets from 1 us to 2^22 us (4.19 s), plus overflow.
pub const SLOTS: usize = 24;

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Log2Hist {
    pub slots: [u64; SLOTS],
    /// Sum of all recorded durations in nanoseconds (the histogram's `_sum`).
    pub sum_ns: u64,
}

impl Log2Hist {
    pub const ZERO: Self = Self {
        slots: [0; SLOTS],
        sum_ns: 0,
    };

    /// Adds `other` into `self` (used to sum per-CPU copies).
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.slots.iter_mut().zip(other.slots.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }

    pub fn count(&self) -> u64 {
        self.slots.iter().fold(0u64, |acc, v| acc.wrapping_add(*v))
    }
}

/// Upper bound of slot `k` in microseconds (`None` for the overflow slot).
pub const fn slot_upper_us(k: usize) -> Option<u64> {
    if k + 1 >= SLOTS { None } else { Some(1 << k) }
}

/// The slot a duration of `ns` nanoseconds falls in.
///
/// Written without loops or `leading_zeros` so the BPF verifier and backend accept it as is.
#[inline(always)]
pub const fn slot_for_ns(ns: u64) -> usize {
    // Round up so that the slot's bound is an upper bound in the `le` sense.
    let us = ns.saturating_add(999) / 1000;
    if us <= 1 {
        return 0;
    }
    let k = log2_floor(us - 1) as usize + 1;
    if k >= SLOTS { SLOTS - 1 } else { k }
}

/// floor(log2(v)) for v > 0, 0 for v == 0. Branch-light, after libbpf-tools' `log2l`.
#[inline(always)]
pub const fn log2_floor(v: u64) -> u32 {
    let hi = (v >> 32) as u32;
    if hi != 0 {
        log2_u32(hi) + 32
    } else {
        log2_u32(v as u32)
    }
}

#[inline(always)]
const fn log2_u32(mut v: u32) -> u32 {
    let mut r = ((v > 0xFFFF) as u32) << 4;
    v >>= r;
    let mut shift = ((v > 0xFF) as u32) << 3;
    v >>= shift;
    r |= shift;
    shift = ((v > 0xF) as u32) << 2;
    v >>= shift;
    r |= shift;
    shift = ((v > 0x3) as u32) << 1;
    v >>= shift;
    r |= shift;
    r | (v >> 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_matches_std() {
        for v in [
            1u64,
            2,
            3,
            4,
            5,
            7,
            8,
            1023,
            1024,
            1025,
            u32::MAX as u64,
            1 << 40,
            u64::MAX,
        ] {
            assert_eq!(log2_floor(v), 63 - v.leading_zeros(), "log2({v})");
        }
    }

    #[test]
    fn slots_are_le_buckets() {
        // Every duration must be <= its slot's upper bound and > the previous slot's bound.
        for ns in (0..20_000u64).chain([999_999, 1_000_000, 1_000_001, 4_194_304_000]) {
            let k = slot_for_ns(ns);
            let upper_ns = slot_upper_us(k).unwrap() * 1000;
            assert!(ns <= upper_ns, "{ns} ns in slot {k} (le {upper_ns} ns)");
            if k > 0 {
                let lower_ns = slot_upper_us(k - 1).unwrap() * 1000;
                assert!(ns > lower_ns, "{ns} ns in slot {k} but <= {lower_ns} ns");
            }
        }
    }

    #[test]
    fn overflow_slot() {
        assert_eq!(slot_for_ns(4_194_304_001), SLOTS - 1);
        assert_eq!(slot_for_ns(u64::MAX), SLOTS - 1);
        assert_eq!(slot_upper_us(SLOTS - 1), None);
        assert_eq!(slot_upper_us(SLOTS - 2), Some(4_194_304));
    }
}
