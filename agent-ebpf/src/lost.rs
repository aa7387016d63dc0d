//! Per-CPU counters of what the kernel side had to drop, read into
//! `pipeprobe_events_lost_total{reason}`.
use agent_common::lost;
use aya_ebpf::{macros::map, maps::PerCpuArray};

#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(lost::COUNT, 0);

#[inline(always)]
pub fn count(reason: u32) {
    if let Some(slot) = LOST.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, programs on one CPU do not preempt each other.
        unsafe { *slot += 1 };
    }
}
