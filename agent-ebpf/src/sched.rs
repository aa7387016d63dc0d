//! Run-queue delay: time from becoming runnable (wakeup, wakeup of a new task, or preemption while
//! runnable) to running, per target, as per-CPU log2 histograms. Nothing per event leaves the
//! kernel; user space reads `RUNQ_HIST` on scrape.
//!
//! Whether a task is traced comes from a per-CPU memo of the last two tasks looked up there
//! (`TargetMemos`) when it can: a switch or wakeup between the same threads, traced or not, needs
//! no `TRACKED` lookup.
//!
//! The runnable-since timestamp lives in the task itself (task storage): these programs run on
//! every wakeup and switch of the host, and a hash insert plus lookup plus delete per wakeup cost
//! about ten times what the tracepoints themselves do (`cargo xtask bench`, context-switch
//! workload).
use agent_common::{
    MAX_TARGETS, NO_TARGET,
    hist::{Log2Hist, slot_for_ns},
    lost,
    targets::TargetMemos,
    task::{TASK_DEAD, TASK_RUNNING},
};
use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
};

use crate::{
    clock::{SchedNow, sched_clock},
    lost::count as count_lost,
    targets::{Generation, bump_generation, generation, recall, target_of, target_via_memo},
    task, thread,
};

/// One histogram per target id.
#[map]
static RUNQ_HIST: PerCpuArray<Log2Hist> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

/// Which target the threads last seen on each CPU are in: on a switch or wakeup between threads
/// seen just before, no `TRACKED` lookup (a helper call, about an empty program's cost on the
/// machines of docs/benchmarks.md).
#[map]
static SCHED_MEMO: PerCpuArray<TargetMemos> = PerCpuArray::with_max_entries(1, 0);

/// `task`'s target (`NO_TARGET` for none), from this CPU's memo or looked up and remembered.
#[inline(always)]
fn target_of_task(task: *const u8, generation: Generation) -> u32 {
    let Some(memo) = SCHED_MEMO.get_ptr_mut(0) else {
        return target_of(task::tgid(task)).unwrap_or(NO_TARGET);
    };
    // SAFETY: this CPU's value; scheduler tracepoints run with preemption off.
    let memo = unsafe { &mut *memo };
    target_via_memo(memo, task as u64, generation, || task::tgid(task))
}

/// Marks `task` runnable since `now`; if it was blocked, its blocked time ends here.
#[inline(always)]
fn enqueue(task: *const u8, target: u32, now: u64) {
    let Some(t) = thread::state(task) else {
        count_lost(lost::RUNQ_PENDING_FULL);
        return;
    };
    if t.runq.blocked_ns != 0 {
        t.totals.blocked_ns += now.saturating_sub(t.runq.blocked_ns);
        t.runq.blocked_ns = 0;
    }
    t.runq.ts_ns = now;
    t.runq.target = target;
}

fn wakeup(ctx: &BtfTracePointContext) {
    let task: *const u8 = ctx.arg(0);
    let target = target_of_task(task, generation());
    if target == NO_TARGET {
        return;
    }
    // The idle task never waits on a run queue.
    if task::pid(task) != 0 {
        enqueue(task, target, sched_clock(task));
    }
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    wakeup(&ctx);
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    wakeup(&ctx);
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    try_sched_switch(&ctx);
    0
}

fn try_sched_switch(ctx: &BtfTracePointContext) {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, ...).
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let mut now = SchedNow::of(next);

    // An exited task's last switch: its task_struct may soon be a new task's, which must not
    // find this one's target remembered. The exit's own generation bump is not enough: between
    // it and this switch the task may block (closing files, releasing its memory) and be
    // remembered again.
    let prev_state = task::state(prev);
    let generation = generation();
    let prev_target = if prev_state == TASK_DEAD {
        bump_generation();
        NO_TARGET
    } else {
        target_of_task(prev, generation)
    };
    if prev_target != NO_TARGET && task::pid(prev) != 0 {
        // An involuntary preemption leaves prev on the run queue whatever its state says.
        if preempt & 0xff != 0 || prev_state == TASK_RUNNING {
            enqueue(prev, prev_target, now.get());
        } else if let Some(t) = thread::state(prev) {
            // Blocking: off CPU until its wakeup.
            t.runq.blocked_ns = now.get();
        }
    }

    // A thread remembered as untraced was never marked runnable: no look at its storage.
    if let Some(memo) = SCHED_MEMO.get(0)
        && recall(memo, next as u64, generation) == Some(NO_TARGET)
    {
        return;
    }
    let Some(t) = thread::existing(next) else {
        return;
    };
    let start = t.runq;
    if start.ts_ns == 0 {
        return;
    }
    t.runq.ts_ns = 0;
    let delta = now.get().saturating_sub(start.ts_ns);
    if let Some(hist) = RUNQ_HIST.get_ptr_mut(start.target) {
        // SAFETY: per-CPU value; programs on one CPU do not run concurrently.
        let hist = unsafe { &mut *hist };
        if let Some(slot) = hist.slots.get_mut(slot_for_ns(delta)) {
            *slot += 1;
        }
        hist.sum_ns += delta;
    }
    t.totals.runq_ns += delta;
}
