//! Process tracking in the kernel: the tgid -> target map every probe filters on, kept current
//! across fork and exit without a round trip to user space. Exec events of untracked processes go
//! to user space, which alone can match comm/cmdline/cgroup selectors.
use agent_common::{
    NO_TARGET, lost,
    targets::{
        EVENT_EXEC, EVENT_EXIT, EVENT_FORK, GEN_KERNEL, GEN_USER, PROC_EVENTS_BYTES, ProcEvent,
        TRACKED_MAX, TargetMemo, TargetMemos,
    },
};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, RingBuf},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;

use crate::{aggregate::atomic_add, lost::count as count_lost, task};

/// tgid -> target id. User space sizes it (`max_tracked_processes`) and fills it from /proc and
/// exec events; the fork and exit programs below keep it current.
#[map]
static TRACKED: HashMap<u32, u32> = HashMap::with_max_entries(TRACKED_MAX, 0);

/// Tracking generations (`agent_common::targets::GENERATION_MAP`): what a cached answer of
/// `target_of` is checked against.
#[map]
static TRACKED_GEN: Array<u64> = Array::with_max_entries(2, 0);

#[map]
static PROC_EVENTS: RingBuf = RingBuf::with_byte_size(PROC_EVENTS_BYTES, 0);

/// The target of process `tgid`, if it is tracked. This one lookup is all an untracked process
/// costs any probe.
#[inline(always)]
pub fn target_of(tgid: u32) -> Option<u32> {
    // SAFETY: the value is copied out before any other map operation.
    unsafe { TRACKED.get(&tgid).copied() }
}

/// Both tracking generations, read before the `TRACKED` lookup whose answer is remembered with
/// them, so that a change after the read leaves the memo stale, never the reverse.
#[derive(Clone, Copy)]
pub struct Generation(u64, u64);

#[inline(always)]
pub fn generation() -> Generation {
    let read = |i| {
        TRACKED_GEN
            .get_ptr(i)
            // SAFETY: an array value lives as long as the map.
            .map_or(0, |p| unsafe { core::ptr::read_volatile(p) })
    };
    Generation(read(GEN_KERNEL), read(GEN_USER))
}

/// The target `memos` remember for the thread known by `key`, while they are valid.
#[inline(always)]
pub fn recall(memos: &TargetMemos, key: u64, generation: Generation) -> Option<u32> {
    let holds =
        |m: &TargetMemo| m.key == key && m.gen_kernel == generation.0 && m.gen_user == generation.1;
    let [a, b] = &memos.entries;
    if holds(a) {
        Some(a.target)
    } else if holds(b) {
        Some(b.target)
    } else {
        None
    }
}

/// The target (`NO_TARGET` for none) of the thread known by `key`: from `memos` while they hold,
/// else looked up by its process (`tgid` runs only then) and remembered in place of the older
/// entry.
#[inline(always)]
pub fn target_via_memo(
    memos: &mut TargetMemos,
    key: u64,
    generation: Generation,
    tgid: impl FnOnce() -> u32,
) -> u32 {
    if let Some(target) = recall(memos, key, generation) {
        return target;
    }
    let target = target_of(tgid()).unwrap_or(NO_TARGET);
    let memo = TargetMemo {
        key,
        gen_kernel: generation.0,
        gen_user: generation.1,
        target,
        _pad: 0,
    };
    if memos.victim == 0 {
        memos.entries[0] = memo;
        memos.victim = 1;
    } else {
        memos.entries[1] = memo;
        memos.victim = 0;
    }
    target
}

/// Invalidates every memo: the kernel's side of the generations.
#[inline(always)]
pub fn bump_generation() {
    if let Some(p) = TRACKED_GEN.get_ptr_mut(GEN_KERNEL) {
        // SAFETY: an array value lives as long as the map; the add is atomic.
        unsafe { atomic_add(p, 1) };
    }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

fn emit(kind: u32, tgid: u32, parent_tgid: u32, target: u32) {
    match PROC_EVENTS.reserve::<ProcEvent>(0) {
        Some(mut entry) => {
            entry.write(ProcEvent {
                kind,
                tgid,
                parent_tgid,
                target,
            });
            entry.submit(0);
        }
        None => count_lost(lost::PROC_EVENTS_FULL),
    }
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(_ctx: BtfTracePointContext) -> i32 {
    let tgid = current_tgid();
    // A tracked process stays in its target across exec (a shell script exec'ing python).
    if target_of(tgid).is_none() {
        emit(EVENT_EXEC, tgid, 0, NO_TARGET);
    }
    0
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    try_sched_process_fork(&ctx);
    0
}

fn try_sched_process_fork(ctx: &BtfTracePointContext) {
    let child: *const u8 = ctx.arg(1);
    let child_tgid = task::tgid(child);
    // A new thread shares its process's tgid, tracked or not. Told first, by two loads from the
    // tracepoint's task pointer: most forks are threads (thread pools), and the parent's look-up
    // below is a helper call and a hash look-up.
    if task::pid(child) != child_tgid {
        return;
    }
    // The tracepoint fires in the parent's context.
    let parent_tgid = current_tgid();
    let Some(target) = target_of(parent_tgid) else {
        return;
    };
    if TRACKED.insert(&child_tgid, &target, 0).is_err() {
        count_lost(lost::TRACKED_MAP_FULL);
        warn!(
            ctx,
            "tracked-process map full: child {} of {} not tracked", child_tgid, parent_tgid
        );
        return;
    }
    bump_generation();
    emit(EVENT_FORK, child_tgid, parent_tgid, target);
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(_ctx: BtfTracePointContext) -> i32 {
    // Any thread's exit: the kernel stack it leaves may go to a new thread, which must not inherit
    // what was cached for this one.
    bump_generation();
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, pid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // Only the thread group leader's exit ends the process; other threads' exits need no look-up.
    if pid != tgid {
        return 0;
    }
    if let Some(target) = target_of(tgid) {
        let _ = TRACKED.remove(&tgid);
        emit(EVENT_EXIT, tgid, 0, target);
    }
    0
}
