//! Scheduler (run-queue delay) probe types.

/// When a tracked thread became runnable, and the target it belongs to. Times are of the
/// scheduler's clock (`ClockPair`), not CLOCK_MONOTONIC.
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

/// The scheduler's clock (the run queue clock the sched programs read, `ts_ns` above) and
/// CLOCK_MONOTONIC read together on one CPU: user space takes their difference to see how long
/// a thread has been runnable or blocked so far. The two drift apart (NTP slews only the
/// latter), so it is read again at every use.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ClockPair {
    pub sched_ns: u64,
    pub monotonic_ns: u64,
}

/// The map holding the one `ClockPair`.
pub const CLOCK_PAIR_MAP: &str = "CLOCK_PAIR";
/// The program that fills it when user space runs it (`BPF_PROG_TEST_RUN`; never attached).
pub const CLOCK_PAIR_PROGRAM: &str = "clock_pair";
