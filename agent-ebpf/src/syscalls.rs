//! Syscall latency per (target, syscall) as log2 histograms plus error counts, aggregated in the
//! kernel. sys_enter/sys_exit fire for every syscall on the host: an untracked thread costs one
//! map lookup on entry and a look at its task's storage on exit. The syscall in flight is kept
//! in the thread's own task storage: no per-thread hash entry to look up twice per syscall, to
//! run out of, or to clean up after a thread exits inside exit().
use agent_common::{
    hist::Log2Hist,
    lost,
    syscalls::{MAX_NR, STATS_MAX, SyscallKey, SyscallStart, SyscallStats},
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap},
    programs::BtfTracePointContext,
};

use crate::{
    aggregate::{atomic_add, record},
    lost::count as count_lost,
    targets::target_of,
    task, thread,
};

/// Set by the loader: 1 traces every syscall, 0 only those marked in `SYSCALL_FILTER`.
#[unsafe(no_mangle)]
static SYSCALLS_TRACE_ALL: u32 = 1;

#[map]
static SYSCALL_FILTER: Array<u8> = Array::with_max_entries(MAX_NR, 0);

/// Shared across CPUs and updated with atomic adds: per-CPU copies of up to 8192 histograms
/// would cost megabytes per CPU.
#[map]
static SYSCALL_STATS: HashMap<SyscallKey, SyscallStats> = HashMap::with_max_entries(STATS_MAX, 0);

#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter(ctx: BtfTracePointContext) -> i32 {
    // One task pointer for the filter and the storage: its tgid is a plain load, where the
    // pid_tgid helper would be one more call on every syscall of the host.
    let current = thread::current();
    let Some(target) = target_of(task::tgid(current)) else {
        return 0;
    };
    // TP_PROTO(struct pt_regs *regs, long id)
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
    let start = SyscallStart {
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        nr,
        target,
    };
    match thread::state(current) {
        Some(t) => t.syscall = start,
        None => count_lost(lost::SYSCALL_PENDING_FULL),
    }
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit(ctx: BtfTracePointContext) -> i32 {
    let Some(t) = thread::existing(thread::current()) else {
        return 0;
    };
    let start = t.syscall;
    if start.ts_ns == 0 {
        return 0;
    }
    t.syscall.ts_ns = 0;
    // SAFETY: no preconditions.
    let delta = unsafe { bpf_ktime_get_ns() }.saturating_sub(start.ts_ns);
    t.totals.syscall_ns += delta;
    t.totals.syscalls += 1;
    // TP_PROTO(struct pt_regs *regs, long ret)
    let ret: i64 = ctx.arg(1);
    let key = SyscallKey {
        target: start.target,
        nr: start.nr,
    };
    let stats = match SYSCALL_STATS.get_ptr_mut(&key) {
        Some(p) => p,
        None => {
            let zero = SyscallStats {
                hist: Log2Hist::ZERO,
                errors: 0,
            };
            // Another CPU may insert the same key first: NOEXIST keeps its counts.
            let _ = SYSCALL_STATS.insert(&key, &zero, u64::from(BPF_NOEXIST));
            match SYSCALL_STATS.get_ptr_mut(&key) {
                Some(p) => p,
                None => {
                    count_lost(lost::SYSCALL_STATS_FULL);
                    return 0;
                }
            }
        }
    };
    // SAFETY: the map value lives as long as the entry; updates are atomic across CPUs.
    unsafe {
        let stats = &mut *stats;
        record(&mut stats.hist, delta);
        if ret < 0 {
            atomic_add(&mut stats.errors, 1);
        }
    }
    0
}
