//! Per-thread state kept in the thread's own task storage: what the sched and syscalls probes
//! need between two events, and the running totals that span enrichment looks back into.
//!
//! The kernel adds to the totals as events happen (nothing per event leaves it); user space
//! samples them every few milliseconds into a bounded history (looking a thread's storage up by
//! its pidfd), so the share of any past window can be read off after a span ends (spans arrive
//! in batches, after the fact).
use crate::{sched::SchedThread, syscalls::SyscallStart};

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadTotals {
    /// Time runnable but not running (wakeup or preemption to switch-in), added at the thread's
    /// switch-out after the wait.
    pub runq_ns: u64,
    /// Time off CPU and not runnable. The kernel leaves it 0: user space derives it from
    /// `SchedThread` (time since `since_ns`, less time on CPU and on run queues).
    pub blocked_ns: u64,
    /// Time inside traced syscalls, and how many ended.
    pub syscall_ns: u64,
    pub syscalls: u64,
}

/// Where a tracked thread blocked, for the span flamegraphs' off-CPU time (only while the span
/// sampler runs).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SpanOff {
    /// Blocked since (0: not blocked).
    pub ts_ns: u64,
    pub user_stack: i32,
    pub _pad: u32,
    /// Key of its Python stack in SPAN_PY_STACKS, 0 for none.
    pub py_stack: u64,
}

/// Where a thread of an off-CPU capture's subject blocked (`offcpu_switch`): kept in its task
/// storage, which costs no map insert and delete per switch and cannot fill up.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct CaptureOff {
    /// Blocked since (0: not blocked).
    pub ts_ns: u64,
    /// `CaptureConfig::generation` of the capture it blocked in.
    pub generation: u32,
    pub user_stack: i32,
    /// Key of its Python stack in PY_STACKS, 0 for none.
    pub py_stack: u64,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ThreadState {
    pub sched: SchedThread,
    pub syscall: SyscallStart,
    pub totals: ThreadTotals,
    pub span_off: SpanOff,
    pub capture_off: CaptureOff,
}
