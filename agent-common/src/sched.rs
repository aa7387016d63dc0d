//! Scheduler (run-queue delay) probe types.

/// Threads waiting on a run queue at once that can be timestamped. A thread is in the map from
/// wakeup (or preemption) to switch-in, so this bounds runnable threads of tracked processes.
pub const RUNQ_PENDING_MAX: u32 = 16_384;

/// When a tracked thread became runnable, and the target it belongs to.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct RunqStart {
    pub ts_ns: u64,
    pub target: u32,
    pub _pad: u32,
}
