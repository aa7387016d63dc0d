//! Run-queue delay: time from becoming runnable (wakeup, wakeup of a new task, or preemption while
//! runnable) to running, per target, as per-CPU log2 histograms. Nothing per event leaves the
//! kernel; user space reads `RUNQ_HIST` on scrape.
//!
//! The runnable-since timestamp lives in the task itself (task storage): these programs run on
//! every wakeup and switch of the host, and a hash insert plus lookup plus delete per wakeup cost
//! about ten times what the tracepoints themselves do (`cargo xtask bench`, context-switch
//! workload).
use agent_common::{
    MAX_TARGETS,
    hist::{Log2Hist, slot_for_ns},
    lost,
    sched::RunqStart,
    task::TASK_RUNNING,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_map, btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
};

use crate::{lost::count as count_lost, targets::target_of, task, task_storage::TaskStorage};

/// Of tracked threads that are runnable but not running yet: since when, and their target
/// (`ts_ns` 0: not waiting).
#[btf_map]
static RUNQ_SINCE: TaskStorage<RunqStart> = TaskStorage::new();

/// One histogram per target id.
#[map]
static RUNQ_HIST: PerCpuArray<Log2Hist> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

#[inline(always)]
fn enqueue(task: *const u8, target: u32) {
    match RUNQ_SINCE.get_or_create(task) {
        // SAFETY: the task's own storage; only the CPU switching or waking it writes it.
        Some(since) => unsafe {
            *since = RunqStart {
                // SAFETY: no preconditions.
                ts_ns: bpf_ktime_get_ns(),
                target,
                _pad: 0,
            }
        },
        None => count_lost(lost::RUNQ_PENDING_FULL),
    }
}

fn wakeup(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let task: *const u8 = ctx.arg(0);
    // An untracked task costs this read and one lookup.
    let Some(target) = target_of(task::tgid(task)?) else {
        return Ok(());
    };
    // The idle task never waits on a run queue.
    if task::pid(task)? != 0 {
        enqueue(task, target);
    }
    Ok(())
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    match wakeup(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    match wakeup(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    match try_sched_switch(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_sched_switch(ctx: &BtfTracePointContext) -> Result<(), i64> {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, ...).
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);

    // The tracepoint runs in prev's context, so prev's ids come from the helper.
    let prev_ids = bpf_get_current_pid_tgid();
    if let Some(target) = target_of((prev_ids >> 32) as u32) {
        // An involuntary preemption leaves prev on the run queue whatever its state says.
        if prev_ids as u32 != 0 && (preempt & 0xff != 0 || task::state(prev)? == TASK_RUNNING) {
            enqueue(prev, target);
        }
    }

    let Some(since) = RUNQ_SINCE.get(next) else {
        return Ok(());
    };
    // SAFETY: the task's own storage, read and cleared by the CPU switching it in.
    let start = unsafe {
        let start = *since;
        (*since).ts_ns = 0;
        start
    };
    if start.ts_ns == 0 {
        return Ok(());
    }
    // SAFETY: no preconditions.
    let delta = unsafe { bpf_ktime_get_ns() }.saturating_sub(start.ts_ns);
    if let Some(hist) = RUNQ_HIST.get_ptr_mut(start.target) {
        // SAFETY: per-CPU value; programs on one CPU do not run concurrently.
        let hist = unsafe { &mut *hist };
        if let Some(slot) = hist.slots.get_mut(slot_for_ns(delta)) {
            *slot += 1;
        }
        hist.sum_ns += delta;
    }
    Ok(())
}
