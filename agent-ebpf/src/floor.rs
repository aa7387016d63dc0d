//! Empty programs on every hook the probes use, never attached by the agent: `cargo xtask
//! bench` attaches them alone (the `floor` tool of the tests crate) to measure what merely
//! running a BPF program at those hooks costs, the floor each probe's cost is compared with.
use agent_common::tcp::{TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_RECV, TCP_SYN_SENT};
use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    macros::{btf_map, btf_tracepoint, map, perf_event, tracepoint},
    maps::StackTrace,
    programs::{
        BtfTracePointContext, PerfEventContext, TracePointContext, tracing::StackIdContext as _,
    },
};

use crate::task_storage::{SkStorage, TaskStorage};

#[btf_tracepoint(function = "sys_enter")]
pub fn floor_sys_enter(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn floor_sys_exit(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn floor_sched_switch(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn floor_sched_wakeup(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn floor_sched_wakeup_new(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn floor_inet_sock_set_state(_ctx: TracePointContext) -> u32 {
    0
}

#[tracepoint(category = "tcp", name = "tcp_probe")]
pub fn floor_tcp_probe(_ctx: TracePointContext) -> u32 {
    0
}

#[tracepoint(category = "tcp", name = "tcp_rcv_space_adjust")]
pub fn floor_tcp_rcv_space_adjust(_ctx: TracePointContext) -> u32 {
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn floor_tcp_retransmit_skb(_ctx: TracePointContext) -> u32 {
    0
}

#[perf_event]
pub fn floor_cpu_sample(_ctx: PerfEventContext) -> u32 {
    0
}

// The floor of a latency probe: what timing each syscall costs before any map is touched (a
// clock read at entry and one at exit). `floor sys_enter+clock sys_exit+clock` attaches these.
#[btf_tracepoint(function = "sys_enter")]
pub fn floor_clock_sys_enter(_ctx: BtfTracePointContext) -> i32 {
    clock()
}

#[btf_tracepoint(function = "sys_exit")]
pub fn floor_clock_sys_exit(_ctx: BtfTracePointContext) -> i32 {
    clock()
}

#[inline(always)]
fn clock() -> i32 {
    // SAFETY: no preconditions. The value only has to be computed, not kept.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    i32::from(core::hint::black_box(now) == 0)
}

// The floor of a probe that keeps per-thread state across switches (the scheduler probe does, to
// count a wait whole across migrations and to keep each thread's totals for spans): one
// task-storage call for the thread leaving the CPU, and nothing else. `floor
// sched_switch+state` attaches it. Every switch pays it here, where the probe filters to tracked
// threads first; on the ping-pong benchmark every switch is of a tracked thread.
#[btf_map]
static FLOOR_STATE: TaskStorage<u64> = TaskStorage::new();

#[btf_tracepoint(function = "sched_switch")]
pub fn floor_state_sched_switch(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, ...).
    let prev: *const u8 = ctx.arg(1);
    if let Some(n) = FLOOR_STATE.get_or_create(prev) {
        // SAFETY: the task's own value; the scheduler serialises its switches.
        unsafe { *n += 1 };
    }
    0
}

// The floor of an off-CPU profiler: the user stack where a thread blocks, which can only be
// taken then (another task's user memory cannot be read when it wakes), and nothing else.
// `floor sched_switch+stack` attaches it. A switch that is not a preemption counts as blocking
// (the floor reads no task fields: their offsets are the agent loader's). One entry here, as the
// agent creates every map of the object; the `floor` tool sizes it at load.
#[map]
static FLOOR_STACKS: StackTrace = StackTrace::with_max_entries(1, 0);

#[btf_tracepoint(function = "sched_switch")]
pub fn floor_stack_sched_switch(ctx: BtfTracePointContext) -> i32 {
    let preempt: u64 = ctx.arg(0);
    if preempt & 0xff == 0 {
        let _ = ctx.get_stackid(&FLOOR_STACKS, u64::from(BPF_F_USER_STACK));
    }
    0
}

// The TCP hooks as BTF tracepoints, where a program gets the socket as a typed pointer: what
// running an empty program there costs, and the floor of an owner kept in socket-local storage
// (one storage call per state change, created at connect and accept), the alternative to the
// tcp probe's owner table. `floor inet_sock_set_state+raw` and `inet_sock_set_state+owner`
// attach them.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_raw_inet_sock_set_state(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_map]
static FLOOR_OWNERS: SkStorage<u64> = SkStorage::new();

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_owner_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate).
    let sk: *const u8 = ctx.arg(0);
    let old: u64 = ctx.arg(1);
    let new: u64 = ctx.arg(2);
    let create = matches!(
        (old as i32, new as i32),
        (TCP_CLOSE, TCP_SYN_SENT) | (TCP_SYN_RECV, TCP_ESTABLISHED)
    );
    let owner = if create {
        FLOOR_OWNERS.get_or_create(sk)
    } else {
        FLOOR_OWNERS.get(sk)
    };
    if let Some(n) = owner {
        // SAFETY: the socket's own value; one socket's state changes are serialised.
        unsafe { *n += 1 };
    }
    0
}
