//! Process tracking: which processes (tgids) belong to which target.

/// Default capacity of the tracked-process map (tgid -> target id).
pub const TRACKED_MAX: u32 = 16_384;

/// `TRACKED_GEN`: two counters that change whenever the answer "which target is this thread
/// in?" may have changed. Entry `GEN_KERNEL` is bumped by the kernel (a thread exited, so its
/// kernel stack may serve a new thread; a fork added a child), entry `GEN_USER` by the agent after
/// it changed `TRACKED`. Separate entries, so neither side's write can undo the other's.
pub const GENERATION_MAP: &str = "TRACKED_GEN";
pub const GEN_KERNEL: u32 = 0;
pub const GEN_USER: u32 = 1;

/// A per-CPU memo of which target a thread is in (`NO_TARGET` for none), valid while both
/// tracking generations are unchanged. The thread is known by an address unique among live
/// threads that a probe has without a helper call: its `task_struct` (scheduler tracepoints'
/// arguments) or its saved registers, the top of its kernel stack (sys_enter/sys_exit's first
/// argument). Either may serve a new thread after this one exits, which bumps `GEN_KERNEL`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct TargetMemo {
    pub key: u64,
    pub gen_kernel: u64,
    pub gen_user: u64,
    pub target: u32,
    pub _pad: u32,
}

/// The last two threads looked up on a CPU (a ping-pong pair, a waker and its wakee, two threads
/// taking turns at syscalls); `victim` is the entry a third replaces.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct TargetMemos {
    pub entries: [TargetMemo; 2],
    pub victim: u32,
    pub _pad: u32,
}

/// Ring buffer bytes for process events. Exec events of every process on the node go through it
/// (user space matches them against comm/cmdline/cgroup selectors), so it is sized for bursts of
/// a few thousand execs between two reads.
pub const PROC_EVENTS_BYTES: u32 = 256 * 1024;

/// A process exec'd; user space decides whether it matches a target.
pub const EVENT_EXEC: u32 = 1;
/// A tracked process forked a new process; the kernel already added the child to its target.
pub const EVENT_FORK: u32 = 2;
/// A tracked process exited; the kernel already removed it.
pub const EVENT_EXIT: u32 = 3;

#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct ProcEvent {
    pub kind: u32,
    pub tgid: u32,
    /// Forking process for `EVENT_FORK`, 0 otherwise.
    pub parent_tgid: u32,
    /// Target id the kernel assigned (`EVENT_FORK`) or removed (`EVENT_EXIT`), else `NO_TARGET`.
    pub target: u32,
}
