//! Scheduler (run-queue delay) probe types.

/// When a tracked thread became runnable, and the target it belongs to.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct RunqStart {
    /// Runnable since (0: not waiting on a run queue).
    pub ts_ns: u64,
    pub target: u32,
    pub _pad: u32,
    /// Blocked since: switched out while not runnable (0: not blocked).
    pub blocked_ns: u64,
}
