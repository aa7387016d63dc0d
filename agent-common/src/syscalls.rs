//! Syscall latency probe types.

/// Syscall numbers at or above this are ignored (x86_64 and aarch64 are below 470).
pub const MAX_NR: u32 = 512;
/// Distinct syscalls aggregated per target (a Python service makes 40-80); a target's further
/// ones are counted as lost (`syscall_stats_full`).
pub const SYSCALLS_PER_TARGET: u32 = 128;
/// Slots of `SYSCALL_STATS`: a block of `SYSCALLS_PER_TARGET` per target id.
pub const STATS_MAX: u32 = crate::MAX_TARGETS * SYSCALLS_PER_TARGET;
/// Entries of `SYSCALL_SLOT`: one per (target id, syscall number).
pub const SLOT_INDEX_MAX: u32 = crate::MAX_TARGETS * MAX_NR;

/// Global: 1 to trace every syscall, 0 to trace only those set in the `SYSCALL_FILTER` array.
pub const GLOBAL_TRACE_ALL: &str = "SYSCALLS_TRACE_ALL";

#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct SyscallStats {
    pub hist: crate::hist::Log2Hist,
    /// Returns with a negative value (-errno).
    pub errors: u64,
}

/// One slot of `SYSCALL_STATS`. Arrays, not a hash map keyed by (target, syscall): the verifier
/// turns an array lookup into a few instructions, where a hash lookup is a call that costs about
/// as much as an empty program on the benchmark machines, on every syscall's exit. A target's
/// slots are handed out in the kernel in the order its syscalls first end
/// (`SYSCALL_USED[target]` counts them); `SYSCALL_SLOT[target * MAX_NR + nr]` is 1 + the slot's
/// index in the target's block, 0 before its first.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct SyscallSlot {
    /// 1 + the syscall number the slot counts; 0 while it is being claimed. Two CPUs may claim
    /// a slot for the same syscall at once: the loser's stays empty, and readers add up slots of
    /// the same syscall.
    pub syscall: u32,
    pub _pad: u32,
    pub stats: SyscallStats,
}

/// The syscalls of the thread that entered one last on a CPU (`SYSCALL_ON_CPU`, per CPU), kept
/// there while it stays on that CPU: its task storage, two helper calls away, is written only
/// when it leaves the CPU (`syscall_switch`, or the scheduler probe's `sched_switch` where that
/// probe runs). A thread is on one CPU at a time, so its state is
/// in one place at a time: here until it switches out, in its `ThreadState` after.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SyscallOnCpu {
    /// Its saved registers' address, what sys_enter and sys_exit know a thread by; 0 for none.
    pub regs: u64,
    /// Its task_struct's address, what sched_switch knows it by.
    pub task: u64,
    /// Its thread id, for user space.
    pub tid: u32,
    pub _pad: u32,
    /// The syscall in flight (`ts_ns` 0: none, or it moved to the task storage).
    pub start: SyscallStart,
    /// Time inside syscalls, and syscalls ended, not yet added to its `ThreadTotals`.
    pub syscall_ns: u64,
    pub syscalls: u64,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SyscallStart {
    pub ts_ns: u64,
    pub nr: u32,
    pub target: u32,
}
