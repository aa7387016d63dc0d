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

/// The largest duration, in nanoseconds, of the last finite slot: above it, the overflow slot.
const LAST_FINITE_NS: u64 = 1000 << (SLOTS - 2);

/// The slot a duration of `ns` nanoseconds falls in.
///
/// Written without loops or `leading_zeros` so the BPF verifier and backend accept it as is, and
/// without a division: BPF has no multiply-high, so the compiler leaves `/ 1000` a 64-bit `div`,
/// about 4 ns of every histogram update on the Intel guest of docs/benchmarks.md.
#[inline(always)]
pub const fn slot_for_ns(ns: u64) -> usize {
    if ns > LAST_FINITE_NS {
        return SLOTS - 1;
    }
    // Round up so that the slot's bound is an upper bound in the `le` sense.
    let us = div_1000(ns + 999);
    if us <= 1 {
        return 0;
    }
    // us - 1 < 2^22: the 32-bit log2 suffices.
    let k = log2_u32((us - 1) as u32) as usize + 1;
    if k >= SLOTS { SLOTS - 1 } else { k }
}

/// `x / 1000` for `x < 2^32`, as a multiply and a shift: with `m = ceil(2^38 / 1000)`,
/// `m * 1000 - 2^38 = 56`, so `(x * m) >> 38` is exact for `x < 2^38 / 56`, and `x * m`
/// stays below 2^61.
#[inline(always)]
const fn div_1000(x: u64) -> u64 {
    (x * 274_877_907) >> 38
}

/// floor(log2(v)) for v > 0, 0 for v == 0. Branch-light, after libbpf-tools' `log2`.
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
        for v in [1u32, 2, 3, 4, 5, 7, 8, 1023, 1024, 1025, 1 << 22, u32::MAX] {
            assert_eq!(log2_u32(v), 31 - v.leading_zeros(), "log2({v})");
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

    /// The slot computed with a division, as it was: the multiply-and-shift must agree with it.
    fn slot_by_division(ns: u64) -> usize {
        let us = ns.saturating_add(999) / 1000;
        if us <= 1 {
            return 0;
        }
        ((63 - (us - 1).leading_zeros()) as usize + 1).min(SLOTS - 1)
    }

    #[test]
    fn slots_match_a_division() {
        // Every slot bound and its neighbours, a dense start, and a sparse walk of the whole
        // finite range up to the overflow.
        let bounds = (0..SLOTS as u32).flat_map(|k| {
            let b = 1000u64 << k;
            [-1001i64, -1000, -999, -1, 0, 1, 999, 1000, 1001].map(|d| b.saturating_add_signed(d))
        });
        let walk = (0..LAST_FINITE_NS + 5_000).step_by(99_991);
        for ns in (0..200_000u64)
            .chain(bounds)
            .chain(walk)
            .chain([u32::MAX as u64, u64::MAX])
        {
            assert_eq!(slot_for_ns(ns), slot_by_division(ns), "{ns} ns");
        }
    }

    #[test]
    fn div_1000_is_exact_where_used() {
        // The largest argument slot_for_ns gives it, and the last multiples before it.
        let top = LAST_FINITE_NS + 999;
        for x in (top - 5_000..=top).chain(0..5_000).chain([u32::MAX as u64]) {
            assert_eq!(div_1000(x), x / 1000, "{x}");
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
