//! Empty programs on every hook the probes use, never attached by the agent: `cargo xtask
//! bench` attaches them alone (the `floor` tool of the tests crate) to measure what merely
//! running a BPF program at those hooks costs, the floor each probe's cost is compared with.
use aya_ebpf::{
    macros::{btf_tracepoint, perf_event, tracepoint},
    programs::{BtfTracePointContext, PerfEventContext, TracePointContext},
};

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
