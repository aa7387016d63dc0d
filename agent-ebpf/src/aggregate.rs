//! Updates of map values shared by all CPUs (a per-CPU copy of every histogram would cost
//! megabytes per CPU for maps with thousands of entries).
use agent_common::hist::{Log2Hist, slot_for_ns};

/// Adds `v` to `*dst` atomically across CPUs.
///
/// # Safety
/// `dst` must point into a live map value.
#[inline(always)]
pub unsafe fn atomic_add(dst: *mut u64, v: u64) {
    // SAFETY: the caller guarantees dst is valid. core's atomics have no RMW for bpfel; the
    // intrinsic lowers to BPF's `lock xadd`, what `__sync_fetch_and_add` gives C programs.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            dst, v,
        );
    }
}

/// Atomically replaces `*dst` with `new` if it holds `old`; returns what it held.
///
/// # Safety
/// `dst` must point into a live map value.
#[inline(always)]
pub unsafe fn compare_exchange(dst: *mut u64, old: u64, new: u64) -> u64 {
    // SAFETY: as for atomic_add; lowers to BPF's atomic cmpxchg (64-bit: at the agent's
    // `--cpu generic`, the BPF backend has no 32-bit one and no fetch-and-add).
    unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::SeqCst },
            { core::intrinsics::AtomicOrdering::SeqCst },
        >(dst, old, new)
        .0
    }
}

/// Records a duration of `ns` in a shared histogram.
///
/// # Safety
/// `hist` must point into a live map value.
#[inline(always)]
pub unsafe fn record(hist: *mut Log2Hist, ns: u64) {
    // SAFETY: the caller guarantees hist is valid; the slot index is bounds-checked.
    unsafe {
        let hist = &mut *hist;
        if let Some(slot) = hist.slots.get_mut(slot_for_ns(ns)) {
            atomic_add(slot, 1);
        }
        atomic_add(&mut hist.sum_ns, ns);
    }
}
