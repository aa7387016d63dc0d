//! Offsets into the running kernel's `struct task_struct`.
//!
//! aya's Rust eBPF programs get no CO-RE field relocations, so user space reads these offsets
//! from the kernel's BTF and sets them as globals at load time (`EbpfLoader::set_global`).

/// Global holding `offsetof(struct task_struct, pid)`.
pub const GLOBAL_PID_OFFSET: &str = "TASK_PID_OFFSET";
/// Global holding `offsetof(struct task_struct, tgid)`.
pub const GLOBAL_TGID_OFFSET: &str = "TASK_TGID_OFFSET";
/// Global holding the offset of the task state (`__state` since 5.14, `state` before).
pub const GLOBAL_STATE_OFFSET: &str = "TASK_STATE_OFFSET";

/// Global holding the offset of the saved thread pointer (`thread.fsbase`), 0 where unknown.
pub const GLOBAL_FSBASE_OFFSET: &str = "TASK_FSBASE_OFFSET";

/// Global holding the offset of `se.cfs_rq` in `task_struct`, 0 where unknown (a kernel without
/// `CONFIG_FAIR_GROUP_SCHED`): with the two below, the way from a task to its run queue's clock.
pub const GLOBAL_CFS_RQ_OFFSET: &str = "TASK_CFS_RQ_OFFSET";
/// Global holding `offsetof(struct cfs_rq, rq)`.
pub const GLOBAL_RQ_OFFSET: &str = "CFS_RQ_RQ_OFFSET";
/// Global holding `offsetof(struct rq, clock)`.
pub const GLOBAL_RQ_CLOCK_OFFSET: &str = "RQ_CLOCK_OFFSET";

/// Globals holding the offsets in `task_struct` of `sched_info.run_delay`, `.pcount`,
/// `.last_arrival` and `.last_queued` (CONFIG_SCHED_INFO), 0 where unknown.
pub const GLOBAL_RUN_DELAY_OFFSET: &str = "TASK_RUN_DELAY_OFFSET";
pub const GLOBAL_PCOUNT_OFFSET: &str = "TASK_PCOUNT_OFFSET";
pub const GLOBAL_LAST_ARRIVAL_OFFSET: &str = "TASK_LAST_ARRIVAL_OFFSET";
pub const GLOBAL_LAST_QUEUED_OFFSET: &str = "TASK_LAST_QUEUED_OFFSET";

/// `TASK_RUNNING`: a task switched out in this state was preempted and is still runnable.
pub const TASK_RUNNING: u32 = 0;

/// `TASK_DEAD`: the state of an exited task at its last switch-out.
pub const TASK_DEAD: u32 = 0x80;
