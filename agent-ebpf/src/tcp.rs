//! TCP connect latency, failed connects, RTT and retransmits per target, attributed to the
//! process that owns the socket, never to the task that happens to run the softirq.
use agent_common::{
    MAX_TARGETS,
    hist::{Log2Hist, slot_for_ns},
    lost,
    tcp::{
        CONNECTING_MAX, Connecting, IPPROTO_TCP, LISTENERS_MAX, Listener, SOCKETS_MAX, TCP_CLOSE,
        TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_RECV, TCP_SYN_SENT, TcpStats, globals::ABSENT,
    },
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};

use crate::{lost::count as count_lost, targets::target_of};

// Tracepoint field offsets, set by the loader from tracefs format files.
#[unsafe(no_mangle)]
static TCP_STATE_SKADDR: u32 = 8;
#[unsafe(no_mangle)]
static TCP_STATE_OLDSTATE: u32 = 16;
#[unsafe(no_mangle)]
static TCP_STATE_NEWSTATE: u32 = 20;
#[unsafe(no_mangle)]
static TCP_STATE_SPORT: u32 = 24;
#[unsafe(no_mangle)]
static TCP_STATE_PROTOCOL: u32 = 30;
#[unsafe(no_mangle)]
static TCP_PROBE_SKADDR: u32 = 128;
#[unsafe(no_mangle)]
static TCP_PROBE_SRTT: u32 = 100;
#[unsafe(no_mangle)]
static TCP_RETRANS_SKADDR: u32 = 16;
#[unsafe(no_mangle)]
static TCP_RETRANS_SKBADDR: u32 = 8;
#[unsafe(no_mangle)]
static TCP_RCV_SKADDR: u32 = 8;
#[unsafe(no_mangle)]
static TCP_SKB_GSO_SEGS: u32 = ABSENT;

/// Socket address -> target of the process that owns it.
#[map]
static SOCK_OWNER: HashMap<u64, u32> = HashMap::with_max_entries(SOCKETS_MAX, 0);

/// Local port -> listening socket of a tracked process; accepted sockets inherit its target.
#[map]
static LISTENERS: HashMap<u16, Listener> = HashMap::with_max_entries(LISTENERS_MAX, 0);

/// Client sockets in SYN_SENT: when the connect started.
#[map]
static CONNECTING: HashMap<u64, Connecting> = HashMap::with_max_entries(CONNECTING_MAX, 0);

#[map]
static TCP_STATS: PerCpuArray<TcpStats> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: &'static u32) -> Result<T, i32> {
    // SAFETY: volatile read of a loader-set global; read_at tolerates bad offsets.
    unsafe { ctx.read_at::<T>(core::ptr::read_volatile(offset) as usize) }
}

#[inline(always)]
fn stats(target: u32) -> Option<&'static mut TcpStats> {
    // SAFETY: per-CPU value; programs on one CPU do not run concurrently.
    TCP_STATS.get_ptr_mut(target).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn record(hist: &mut Log2Hist, ns: u64) {
    if let Some(slot) = hist.slots.get_mut(slot_for_ns(ns)) {
        *slot += 1;
    }
    hist.sum_ns += ns;
}

#[inline(always)]
fn own(sk: u64, target: u32) {
    if SOCK_OWNER.insert(&sk, &target, 0).is_err() {
        count_lost(lost::TCP_SOCKETS_FULL);
    }
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_set_state(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    if field::<u16>(ctx, &TCP_STATE_PROTOCOL)? != IPPROTO_TCP {
        return Ok(());
    }
    let sk: u64 = field(ctx, &TCP_STATE_SKADDR)?;
    let old: i32 = field(ctx, &TCP_STATE_OLDSTATE)?;
    let new: i32 = field(ctx, &TCP_STATE_NEWSTATE)?;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match (old, new) {
        // connect() and listen() run in the owner's context: the one place `current` is right.
        (TCP_CLOSE, TCP_SYN_SENT) => {
            if let Some(target) = target_of((bpf_get_current_pid_tgid() >> 32) as u32) {
                own(sk, target);
                let c = Connecting {
                    ts_ns: now,
                    target,
                    _pad: 0,
                };
                if CONNECTING.insert(&sk, &c, 0).is_err() {
                    count_lost(lost::TCP_CONNECTS_FULL);
                }
            }
        }
        (TCP_CLOSE, TCP_LISTEN) => {
            if let Some(target) = target_of((bpf_get_current_pid_tgid() >> 32) as u32) {
                own(sk, target);
                let port: u16 = field(ctx, &TCP_STATE_SPORT)?;
                let l = Listener {
                    sk,
                    target,
                    _pad: 0,
                };
                if LISTENERS.insert(&port, &l, 0).is_err() {
                    count_lost(lost::TCP_CONNECTS_FULL);
                }
            }
        }
        (TCP_SYN_SENT, TCP_ESTABLISHED) => {
            // SAFETY: copied out before removal.
            if let Some(c) = unsafe { CONNECTING.get(&sk).copied() } {
                let _ = CONNECTING.remove(&sk);
                if let Some(s) = stats(c.target) {
                    record(&mut s.connect, now.saturating_sub(c.ts_ns));
                }
            }
        }
        // An accepted connection, created in softirq: it belongs to the owner of its listener.
        (TCP_SYN_RECV, TCP_ESTABLISHED) => {
            let port: u16 = field(ctx, &TCP_STATE_SPORT)?;
            // SAFETY: copied out.
            if let Some(l) = unsafe { LISTENERS.get(&port).copied() } {
                own(sk, l.target);
            }
        }
        _ => {}
    }
    if new == TCP_CLOSE {
        if old == TCP_SYN_SENT {
            // SAFETY: copied out before removal.
            if let Some(c) = unsafe { CONNECTING.get(&sk).copied() } {
                let _ = CONNECTING.remove(&sk);
                if let Some(s) = stats(c.target) {
                    s.connect_failures += 1;
                }
            }
        }
        if old == TCP_LISTEN {
            let port: u16 = field(ctx, &TCP_STATE_SPORT)?;
            // SAFETY: copied out.
            if unsafe { LISTENERS.get(&port) }.is_some_and(|l| l.sk == sk) {
                let _ = LISTENERS.remove(&port);
            }
        }
        let _ = SOCK_OWNER.remove(&sk);
    }
    Ok(())
}

/// recvmsg() on a TCP socket, in the reading process's context: claims sockets that were
/// opened before the process was tracked (a service started before the agent, or connecting
/// in the milliseconds between its exec and its match).
#[tracepoint(category = "tcp", name = "tcp_rcv_space_adjust")]
pub fn tcp_rcv_space_adjust(ctx: TracePointContext) -> u32 {
    let Some(target) = target_of((bpf_get_current_pid_tgid() >> 32) as u32) else {
        return 0;
    };
    let Ok(sk) = field::<u64>(&ctx, &TCP_RCV_SKADDR) else {
        return 0;
    };
    // SAFETY: presence check only.
    if unsafe { SOCK_OWNER.get(&sk) }.is_none() {
        own(sk, target);
    }
    0
}

#[tracepoint(category = "tcp", name = "tcp_probe")]
pub fn tcp_probe(ctx: TracePointContext) -> u32 {
    match try_tcp_probe(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_tcp_probe(ctx: &TracePointContext) -> Result<(), i32> {
    let sk: u64 = field(ctx, &TCP_PROBE_SKADDR)?;
    // SAFETY: copied out.
    let Some(target) = (unsafe { SOCK_OWNER.get(&sk).copied() }) else {
        return Ok(());
    };
    // srtt in microseconds (the kernel's srtt_us >> 3).
    let srtt_us: u32 = field(ctx, &TCP_PROBE_SRTT)?;
    if srtt_us > 0
        && let Some(s) = stats(target)
    {
        record(&mut s.rtt, u64::from(srtt_us) * 1000);
    }
    Ok(())
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    match try_retransmit(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_retransmit(ctx: &TracePointContext) -> Result<(), i32> {
    let sk: u64 = field(ctx, &TCP_RETRANS_SKADDR)?;
    // SAFETY: copied out.
    let Some(target) = (unsafe { SOCK_OWNER.get(&sk).copied() }) else {
        return Ok(());
    };
    // Every attempt counts, as in the kernel's total_retrans (ss, nstat TcpRetransSegs); one
    // skb can carry several segments (GSO): count segments.
    let gso_off = unsafe { core::ptr::read_volatile(&TCP_SKB_GSO_SEGS) };
    let segs = if gso_off == ABSENT {
        1
    } else {
        let skb: u64 = field(ctx, &TCP_RETRANS_SKBADDR)?;
        // SAFETY: bpf_probe_read_kernel tolerates any address.
        let segs = unsafe {
            bpf_probe_read_kernel((skb as *const u8).wrapping_add(gso_off as usize) as *const u16)
        }
        .map_err(|e| e as i32)?;
        u64::from(segs.max(1))
    };
    if let Some(s) = stats(target) {
        s.retransmits += segs;
    }
    Ok(())
}
