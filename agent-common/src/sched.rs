//! Scheduler (run-queue delay) probe types.

/// When a tracked thread became runnable, and the target it belongs to.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct RunqStart {
    pub ts_ns: u64,
    pub target: u32,
    pub _pad: u32,
}
