//! Reads of `struct task_struct` fields at offsets user space found in the kernel's BTF.
use aya_ebpf::helpers::bpf_probe_read_kernel;

// Set by the loader (`agent_common::task::GLOBAL_*`); read volatile so the compiler does not fold
// the zero initialisers into the code.
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TASK_STATE_OFFSET: u32 = 0;
/// `thread.fsbase` (the saved thread pointer), 0 where this kernel has none.
#[unsafe(no_mangle)]
static TASK_FSBASE_OFFSET: u32 = 0;

/// A `u32` field of `task`, which must be a pointer the verifier knows as a `task_struct` (a
/// tp_btf argument or `bpf_get_current_task_btf()`): a plain load, which the verifier checks
/// against the kernel's BTF (the offset is a known constant, read from frozen .rodata) and the
/// JIT guards with an exception entry. `bpf_probe_read_kernel` would be a helper call, tens of
/// nanoseconds on a CPU with retpolines and return thunks, on hooks that run at every switch.
#[inline(always)]
fn load_u32_at(task: *const u8, offset: &'static u32) -> u32 {
    // SAFETY: volatile read of a global the loader initialised.
    let offset = unsafe { core::ptr::read_volatile(offset) };
    // SAFETY: `task` is a BTF-typed task_struct and `offset` one of its u32 fields, found in
    // that same BTF by the loader; the verifier rejects the program otherwise.
    unsafe { core::ptr::read_volatile(task.wrapping_add(offset as usize).cast::<u32>()) }
}

/// A `u64` field of `task`, as `load_u32_at`.
#[inline(always)]
fn load_u64_at(task: *const u8, offset: &'static u32) -> u64 {
    // SAFETY: volatile read of a global the loader initialised.
    let offset = unsafe { core::ptr::read_volatile(offset) };
    // SAFETY: as `load_u32_at`, for a u64 field.
    unsafe { core::ptr::read_volatile(task.wrapping_add(offset as usize).cast::<u64>()) }
}

/// Thread id (`task->pid`).
#[inline(always)]
pub fn pid(task: *const u8) -> u32 {
    load_u32_at(task, &TASK_PID_OFFSET)
}

/// Process id (`task->tgid`).
#[inline(always)]
pub fn tgid(task: *const u8) -> u32 {
    load_u32_at(task, &TASK_TGID_OFFSET)
}

/// Scheduler state (`task->__state`).
#[inline(always)]
pub fn state(task: *const u8) -> u32 {
    load_u32_at(task, &TASK_STATE_OFFSET)
}

/// The current task's thread pointer (what `pthread_self()` returns on x86_64), or None where
/// the loader found no `thread.fsbase` in this kernel.
#[inline(always)]
pub fn fsbase() -> Option<u64> {
    // SAFETY: volatile read of a global the loader initialised.
    let off = unsafe { core::ptr::read_volatile(&TASK_FSBASE_OFFSET) };
    if off == 0 {
        return None;
    }
    // SAFETY: the current task pointer is valid; the read is checked.
    unsafe {
        let task = aya_ebpf::helpers::bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel(task.wrapping_add(off as usize) as *const u64).ok()
    }
}

#[unsafe(no_mangle)]
static TASK_CFS_RQ_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static CFS_RQ_RQ_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static RQ_CLOCK_OFFSET: u32 = 0;

/// The clock of `task`'s run queue (`task->se.cfs_rq->rq->clock`, what the scheduler itself
/// times run-queue waits with): three loads the verifier checks against BTF, as `load_u32_at`;
/// on a scheduler hook the scheduler has just updated it, and it costs a fraction of
/// `bpf_ktime_get_ns` (docs/benchmarks.md). None where the loader found no way to it; Some(0)
/// where a pointer on the way was null.
#[inline(always)]
pub fn rq_clock(task: *const u8) -> Option<u64> {
    // SAFETY: volatile reads of globals the loader initialised.
    let (cfs_rq, rq, clock) = unsafe {
        (
            core::ptr::read_volatile(&TASK_CFS_RQ_OFFSET),
            core::ptr::read_volatile(&CFS_RQ_RQ_OFFSET),
            core::ptr::read_volatile(&RQ_CLOCK_OFFSET),
        )
    };
    if cfs_rq == 0 {
        return None;
    }
    // SAFETY: each pointer is a BTF-typed member of the struct before it, found in the kernel's
    // BTF by the loader; the verifier rejects the program otherwise, and the JIT turns a fault
    // (a null pointer) into a zero.
    unsafe {
        let cfs_rq_ptr =
            core::ptr::read_volatile(task.wrapping_add(cfs_rq as usize).cast::<*const u8>());
        let rq_ptr =
            core::ptr::read_volatile(cfs_rq_ptr.wrapping_add(rq as usize).cast::<*const u8>());
        Some(core::ptr::read_volatile(
            rq_ptr.wrapping_add(clock as usize).cast::<u64>(),
        ))
    }
}

// `task_struct.sched_info` members (CONFIG_SCHED_INFO), all 0 where this kernel has none: the
// loader then leaves the scheduler probe unattached.
#[unsafe(no_mangle)]
static TASK_RUN_DELAY_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TASK_PCOUNT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TASK_LAST_ARRIVAL_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TASK_LAST_QUEUED_OFFSET: u32 = 0;

/// The scheduler's own accounting of `task`'s waits on run queues (`sched_info`, kept on the run
/// queue's clock): run-queue time summed over its life (a wait is added when it ends, and the
/// part before a migration when the task leaves that run queue), switch-ins counted, the last
/// switch-in, and when it joined its run queue (0: not waiting). On `sched_switch` the kernel has
/// not yet accounted the switch it reports.
#[inline(always)]
pub fn run_delay(task: *const u8) -> u64 {
    load_u64_at(task, &TASK_RUN_DELAY_OFFSET)
}

#[inline(always)]
pub fn pcount(task: *const u8) -> u64 {
    load_u64_at(task, &TASK_PCOUNT_OFFSET)
}

#[inline(always)]
pub fn last_arrival(task: *const u8) -> u64 {
    load_u64_at(task, &TASK_LAST_ARRIVAL_OFFSET)
}

#[inline(always)]
pub fn last_queued(task: *const u8) -> u64 {
    load_u64_at(task, &TASK_LAST_QUEUED_OFFSET)
}
