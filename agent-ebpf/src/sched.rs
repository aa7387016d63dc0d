//! Run-queue delay: time from becoming runnable (wakeup, wakeup of a new task, or preemption while
//! runnable) to running, per target, as per-CPU log2 histograms, and each tracked thread's time on
//! CPU, on run queues and blocked for the span breakdown. Nothing per event leaves the kernel;
//! user space reads `RUNQ_HIST` on scrape.
//!
//! One program, on `sched_switch`, and no wakeup hook: the scheduler accounts every task's waits
//! itself (`task_struct.sched_info`, CONFIG_SCHED_INFO) on the run queue's clock, which this
//! program reads too. When a tracked thread leaves a CPU, the growth of its `run_delay` since its
//! previous switch-out is the one wait that ended at its switch-in between, counted whole even
//! when the thread waited on two run queues (a load-balancing migration of a waiting task adds
//! the part before it to `run_delay` and restarts `last_queued`), which is what runqlat counts.
//! Its storage is the only helper call a tracked switch pays (`cargo xtask bench`: a wakeup
//! program with a task-storage call and a switch program with two cost about 1.9x empty
//! programs on the same hooks). The same look-up moves the syscalls probe's per-CPU slot of the
//! leaving thread into its storage, so that probe needs no program of its own on this hook when
//! this one runs (`syscall_switch` is then not loaded): one program run and one storage call a
//! switch instead of two.
//!
//! The thread's storage then holds its totals up to its last switch-out; while it runs, this
//! CPU's `SCHED_ON_CPU` says since when and what its wait was, so a span ending while its thread
//! runs gets its last wait on the run-queue side.
//!
//! Whether a task is traced comes from a per-CPU memo of the last two tasks looked up there
//! (`TargetMemos`) when it can: a switch between the same threads, traced or not, needs no
//! `TRACKED` lookup.
use agent_common::{
    MAX_TARGETS, NO_TARGET,
    hist::{Log2Hist, slot_for_ns},
    lost,
    sched::SchedOnCpu,
    syscalls::SyscallOnCpu,
    targets::TargetMemos,
    task::{TASK_DEAD, TASK_RUNNING},
};
use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
};

use crate::{
    clock::SchedNow,
    lost::count as count_lost,
    syscalls,
    targets::{Generation, bump_generation, generation, target_of, target_via_memo},
    task, thread,
};

/// One histogram per target id.
#[map]
static RUNQ_HIST: PerCpuArray<Log2Hist> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

/// Which target the threads last seen on each CPU are in: on a switch between threads seen just
/// before, no `TRACKED` lookup (a helper call, about an empty program's cost on the machines of
/// docs/benchmarks.md).
#[map]
static SCHED_MEMO: PerCpuArray<TargetMemos> = PerCpuArray::with_max_entries(1, 0);

/// The tracked thread on each CPU, for user space (`SchedOnCpu`).
#[map]
static SCHED_ON_CPU: PerCpuArray<SchedOnCpu> = PerCpuArray::with_max_entries(1, 0);

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
    // What the syscalls probe kept for prev on this CPU, which its task storage must now hold:
    // moved there with the look-up below, one storage call for both probes.
    let syscalls_held = syscalls::take_slot(prev, || prev_state == TASK_DEAD);
    if prev_target != NO_TARGET && task::pid(prev) != 0 {
        // An involuntary preemption leaves prev on the run queue whatever its state says.
        let runnable = preempt & 0xff != 0 || prev_state == TASK_RUNNING;
        switch_out(
            prev,
            prev_target,
            runnable,
            now.get(),
            syscalls_held.as_ref(),
        );
    } else if let Some(held) = syscalls_held {
        // No longer a target (the list was reloaded), with syscalls counted while it was one.
        syscalls::hand_over(thread::state(prev), &held);
    }

    let Some(on_cpu) = SCHED_ON_CPU.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's value; scheduler tracepoints run with preemption off.
    let on_cpu = unsafe { &mut *on_cpu };
    let tid = task::pid(next);
    if tid == 0 || target_of_task(next, generation) == NO_TARGET {
        if on_cpu.tid != 0 {
            on_cpu.tid = 0;
        }
        return;
    }
    let in_ns = now.get();
    let queued = task::last_queued(next);
    *on_cpu = SchedOnCpu {
        tid,
        _pad: 0,
        in_ns,
        wait_ns: if queued != 0 {
            in_ns.saturating_sub(queued)
        } else {
            0
        },
    };
}

/// `prev`, tracked, leaves its CPU at `now`: its slice on CPU and the wait before it go into its
/// storage and the wait into its target's histogram, and so does what the syscalls probe held.
#[inline(always)]
fn switch_out(
    prev: *const u8,
    target: u32,
    runnable: bool,
    now: u64,
    syscalls_held: Option<&SyscallOnCpu>,
) {
    let Some(t) = thread::state(prev) else {
        count_lost(lost::RUNQ_PENDING_FULL);
        if let Some(held) = syscalls_held {
            syscalls::hand_over(None, held);
        }
        return;
    };
    if let Some(held) = syscalls_held {
        syscalls::hand_over(Some(&mut *t), held);
    }
    let s = &mut t.sched;
    // Not yet accounted: this switch-out (the kernel does it after the tracepoint).
    let run_delay = task::run_delay(prev);
    let pcount = task::pcount(prev);
    let arrival = task::last_arrival(prev);
    // The wait that ended at this slice's switch-in: exact when this is the first switch-in since
    // the last switch-out seen (one wait in between), or the thread's first since it began.
    let wait = if s.since_ns != 0 {
        let waits = run_delay.saturating_sub(s.run_delay_out);
        t.totals.runq_ns += waits;
        // Earlier slices whose switch-out was not seen (the thread untracked then) count as
        // off CPU; their waits are in `waits`, which is then no single wait.
        s.oncpu_ns += now.saturating_sub(arrival);
        (pcount == s.pcount_out + 1).then_some(waits)
    } else {
        s.since_ns = arrival;
        s.oncpu_ns = now.saturating_sub(arrival);
        (pcount == 1).then_some(run_delay)
    };
    s.out_ns = now;
    s.run_delay_out = run_delay;
    s.pcount_out = pcount;
    s.preempted = u32::from(runnable);
    let Some(wait) = wait else {
        return;
    };
    if let Some(hist) = RUNQ_HIST.get_ptr_mut(target) {
        // SAFETY: per-CPU value; programs on one CPU do not run concurrently.
        let hist = unsafe { &mut *hist };
        if let Some(slot) = hist.slots.get_mut(slot_for_ns(wait)) {
            *slot += 1;
        }
        hist.sum_ns += wait;
    }
}
