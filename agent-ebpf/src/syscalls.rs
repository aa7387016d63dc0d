//! Syscall latency per (target, syscall) as log2 histograms plus error counts, aggregated in the
//! kernel. sys_enter/sys_exit fire for every syscall on the host, so whether the thread is traced
//! is answered from a per-CPU memo of the last two threads seen (`TargetMemos`) whenever it can be:
//! a repeat caller, traced or not, costs no helper call for it, where the current task and the
//! `TRACKED` lookup are one each (about an empty program's cost apiece on the machines of
//! docs/benchmarks.md).
//!
//! The syscall in flight and the thread's running totals stay in a per-CPU slot
//! (`SyscallOnCpu`) while the thread stays on the CPU, and move to its task storage when it
//! leaves (`syscall_switch`, or the scheduler probe's `sched_switch`, which looks the storage up
//! anyway, where that probe runs): a syscall that neither blocks nor is preempted, the common case,
//! costs no task-storage lookup (two helper calls a syscall; the probe went from 1.44-1.60x the
//! floor's cost to 1.30-1.38x without them in `cargo xtask bench`). A syscall that blocks is
//! found in the task storage at its exit, wherever the thread then runs. No per-thread hash entry to look up, to run
//! out of, or to clean up after a thread exits inside exit().
use core::ptr::write_volatile;

use agent_common::{
    MAX_TARGETS, NO_TARGET, lost,
    spans::ThreadState,
    syscalls::{
        MAX_NR, SLOT_INDEX_MAX, STATS_MAX, SYSCALLS_PER_TARGET, SyscallOnCpu, SyscallSlot,
        SyscallStart, SyscallStats,
    },
    targets::TargetMemos,
    task::TASK_DEAD,
};
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, map},
    maps::{Array, PerCpuArray},
    programs::BtfTracePointContext,
};

use crate::{
    aggregate::{atomic_add, compare_exchange, record},
    lost::count as count_lost,
    targets::{generation, recall, target_via_memo},
    task, thread,
};

/// Set by the loader: 1 traces every syscall, 0 only those marked in `SYSCALL_FILTER`.
#[unsafe(no_mangle)]
static SYSCALLS_TRACE_ALL: u32 = 1;

#[map]
static SYSCALL_FILTER: Array<u8> = Array::with_max_entries(MAX_NR, 0);

/// Shared across CPUs and updated with atomic adds: per-CPU copies of up to 8192 histograms
/// would cost megabytes per CPU. Layout: `agent_common::syscalls::SyscallSlot`.
#[map]
static SYSCALL_STATS: Array<SyscallSlot> = Array::with_max_entries(STATS_MAX, 0);
#[map]
static SYSCALL_SLOT: Array<u64> = Array::with_max_entries(SLOT_INDEX_MAX, 0);
#[map]
static SYSCALL_USED: Array<u64> = Array::with_max_entries(MAX_TARGETS, 0);

/// The last two threads to enter a syscall on each CPU, known by their saved registers.
#[map]
static SYSCALL_LAST: PerCpuArray<TargetMemos> = PerCpuArray::with_max_entries(1, 0);

/// The syscalls of the thread on each CPU that entered one last, until it leaves the CPU.
/// User space reads it with the task storage for the span history.
#[map]
static SYSCALL_ON_CPU: PerCpuArray<SyscallOnCpu> = PerCpuArray::with_max_entries(1, 0);

#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long id)
    let regs: u64 = ctx.arg(0);
    let Some(last) = SYSCALL_LAST.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's value; the syscall tracepoints run BPF programs with preemption off,
    // so no other sys_enter or sys_exit touches it meanwhile.
    let last = unsafe { &mut *last };
    // Its tgid is a plain load off the task pointer, where the pid_tgid helper would be one more
    // call.
    let target = target_via_memo(last, regs, generation(), || task::tgid(thread::current()));
    if target == NO_TARGET {
        return 0;
    }
    let nr: i64 = ctx.arg(1);
    if nr < 0 || nr >= i64::from(MAX_NR) {
        return 0;
    }
    let nr = nr as u32;
    // SAFETY: volatile read of a loader-set global.
    if unsafe { core::ptr::read_volatile(&SYSCALLS_TRACE_ALL) } == 0
        && SYSCALL_FILTER.get(nr).copied().unwrap_or(0) == 0
    {
        return 0;
    }
    let Some(cpu) = SYSCALL_ON_CPU.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's value; preemption is off here and in syscall_switch, its other writer.
    let cpu = unsafe { &mut *cpu };
    if cpu.regs != regs {
        take_over(cpu, regs);
    }
    cpu.start = SyscallStart {
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        nr,
        target,
    };
    0
}

/// Makes `cpu` the current thread's, known by `regs`: the first syscall of a thread since it came
/// onto this CPU. The thread there before emptied it as it left; anything still there is counted
/// as lost.
#[inline(never)]
fn take_over(cpu: &mut SyscallOnCpu, regs: u64) {
    if cpu.start.ts_ns != 0 || cpu.syscalls != 0 {
        count_lost(lost::SYSCALL_PENDING_FULL);
    }
    let task = thread::current();
    reset(cpu, regs, task as u64);
    // SAFETY: a write to a field of a live value.
    unsafe { write_volatile(&raw mut cpu.tid, task::pid(task)) };
}

/// Makes `cpu` the slot of the thread known by `regs` and `task` (0 and 0: nobody's), holding
/// nothing, field by field. A whole-value store (`*cpu = SyscallOnCpu::default()`) becomes a
/// call to `memset`, which bpf-linker leaves to compiler_builtins' loop of byte stores (56
/// stores and their loop at every switch-out of a thread with syscalls); volatile stores are
/// not merged into one.
#[inline(always)]
fn reset(cpu: &mut SyscallOnCpu, regs: u64, task: u64) {
    // SAFETY: writes to fields of a live value.
    unsafe {
        write_volatile(&raw mut cpu.regs, regs);
        write_volatile(&raw mut cpu.task, task);
        write_volatile(&raw mut cpu.start.ts_ns, 0);
        write_volatile(&raw mut cpu.syscall_ns, 0);
        write_volatile(&raw mut cpu.syscalls, 0);
    }
}

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long ret)
    let regs: u64 = ctx.arg(0);
    if let Some(last) = SYSCALL_LAST.get(0)
        && recall(last, regs, generation()) == Some(NO_TARGET)
    {
        // Remembered as untraced, and nothing changed since: its entry recorded no start.
        return 0;
    }
    let Some(cpu) = SYSCALL_ON_CPU.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: as in sys_enter.
    let cpu = unsafe { &mut *cpu };
    let start;
    let delta;
    if cpu.regs == regs {
        // The slot is given up at every switch-out, so the thread has been on this CPU since a
        // recorded entry here, and no syscall starts between this one's entry and exit: the
        // start is here, and so are its totals until it leaves. None: this syscall entered
        // unrecorded (not selected), with no task storage to look at.
        if cpu.start.ts_ns == 0 {
            return 0;
        }
        start = cpu.start;
        cpu.start.ts_ns = 0;
        // SAFETY: no preconditions.
        delta = unsafe { bpf_ktime_get_ns() }.saturating_sub(start.ts_ns);
        cpu.syscall_ns += delta;
        cpu.syscalls += 1;
    } else {
        // It left the CPU inside the syscall, which moved the start to its task storage.
        let Some(t) = thread::existing(thread::current()) else {
            return 0;
        };
        start = t.syscall;
        if start.ts_ns == 0 {
            return 0;
        }
        t.syscall.ts_ns = 0;
        // SAFETY: no preconditions.
        delta = unsafe { bpf_ktime_get_ns() }.saturating_sub(start.ts_ns);
        t.totals.syscall_ns += delta;
        t.totals.syscalls += 1;
    }
    let ret: i64 = ctx.arg(1);
    let Some(stats) = stats_of(start.target, start.nr) else {
        count_lost(lost::SYSCALL_STATS_FULL);
        return 0;
    };
    // SAFETY: an array value lives as long as the map; updates are atomic across CPUs.
    unsafe {
        let stats = &mut *stats;
        record(&mut stats.hist, delta);
        if ret < 0 {
            atomic_add(&mut stats.errors, 1);
        }
    }
    0
}

/// Moves what this CPU's slot holds for `prev` into its task storage as it leaves the CPU: its
/// syscall in flight, if it blocks or is preempted inside one, and its totals since it last
/// left. Attached before sys_enter and sys_exit, so that no slot is written before its thread's
/// switch-out is seen; not attached where the scheduler probe's `sched_switch` is, which does
/// the same (`take_slot`, `hand_over`) with the task-storage lookup it makes anyway.
#[btf_tracepoint(function = "sched_switch")]
pub fn syscall_switch(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, ...).
    let prev: *const u8 = ctx.arg(1);
    if let Some(held) = take_slot(prev, || task::state(prev) == TASK_DEAD) {
        hand_over(thread::state(prev), &held);
    }
    0
}

/// Empties this CPU's slot if it is `prev`'s, as `prev` leaves the CPU; what it held that its
/// task storage must keep, if anything. `dead` says whether `prev` is exiting (asked only when
/// the slot is its: the scheduler probe has read its state already).
#[inline(always)]
pub fn take_slot(prev: *const u8, dead: impl FnOnce() -> bool) -> Option<SyscallOnCpu> {
    let cpu = SYSCALL_ON_CPU.get_ptr_mut(0)?;
    // SAFETY: as in sys_enter.
    let cpu = unsafe { &mut *cpu };
    if cpu.task != prev as u64 {
        return None;
    }
    let held = *cpu;
    // The slot is a thread's only while it runs: the next thread here may have the same saved
    // registers' address (a dead thread's kernel stack, reused), and must take it over.
    reset(cpu, 0, 0);
    // An exiting thread's last switch: nobody reads its totals any more.
    if (held.start.ts_ns == 0 && held.syscalls == 0) || dead() {
        return None;
    }
    Some(held)
}

/// Adds what `take_slot` returned to the thread's task storage (None: it has none, memory ran
/// out).
#[inline(always)]
pub fn hand_over(t: Option<&mut ThreadState>, held: &SyscallOnCpu) {
    let Some(t) = t else {
        count_lost(lost::SYSCALL_PENDING_FULL);
        return;
    };
    if held.start.ts_ns != 0 {
        t.syscall = held.start;
    }
    t.totals.syscall_ns += held.syscall_ns;
    t.totals.syscalls += held.syscalls;
}

/// The stats of `nr` for `target`, its slot claimed on first use; None once the target's block
/// is full.
#[inline(always)]
fn stats_of(target: u32, nr: u32) -> Option<*mut SyscallStats> {
    if target >= MAX_TARGETS || nr >= MAX_NR {
        return None;
    }
    let index = SYSCALL_SLOT.get_ptr_mut(target * MAX_NR + nr)?;
    // SAFETY: an array value lives as long as the map.
    let mut slot = unsafe { core::ptr::read_volatile(index) };
    if slot == 0 {
        slot = claim(target, nr, index)?;
    }
    // At most SYSCALLS_PER_TARGET: claim() hands out no more.
    let slot = SYSCALL_STATS.get_ptr_mut(target * SYSCALLS_PER_TARGET + (slot as u32 - 1))?;
    // SAFETY: as above.
    Some(unsafe { &raw mut (*slot).stats })
}

/// Takes the target's next free slot for `nr` and publishes it in `index`; returns 1 + the slot
/// that won, which is another CPU's when it claimed one for `nr` at the same time.
#[inline(never)]
fn claim(target: u32, nr: u32, index: *mut u64) -> Option<u64> {
    let used = SYSCALL_USED.get_ptr_mut(target)?;
    // SAFETY: array values live as long as their maps; the add and the exchange are atomic.
    unsafe {
        // A fetch-and-add, as compare-exchange retries: CPUs racing for a target's first use
        // of different syscalls at once are rare, and one that loses four times counts as lost.
        let mut mine = core::ptr::read_volatile(used);
        let mut taken = false;
        for _ in 0..4 {
            if mine >= u64::from(SYSCALLS_PER_TARGET) {
                return None;
            }
            let was = compare_exchange(used, mine, mine + 1);
            if was == mine {
                taken = true;
                break;
            }
            mine = was;
        }
        if !taken {
            return None;
        }
        let slot = SYSCALL_STATS.get_ptr_mut(target * SYSCALLS_PER_TARGET + mine as u32)?;
        // Named before it is published, so a reader that finds it finds what it counts.
        core::ptr::write_volatile(&raw mut (*slot).syscall, nr + 1);
        let won = compare_exchange(index, 0, mine + 1);
        Some(if won == 0 { mine + 1 } else { won })
    }
}
