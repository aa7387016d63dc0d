//! TCP connect latency, failed connects, RTT and retransmits per target, attributed to the
//! process that owns the socket, never to the task that happens to run the softirq; optionally
//! broken down per remote peer.
use core::{mem::MaybeUninit, ptr::write_volatile};

use agent_common::{
    MAX_TARGETS,
    hist::{Log2Hist, slot_for_ns},
    lost,
    tcp::{
        AF_INET, AF_INET6, IPPROTO_TCP, LISTENERS_MAX, Listener, ListenerKey, OWNER_CLIENT,
        PEERS_DEFAULT, PROBE_RECORD_BYTES, PROC_RETRANS_MAX, PeerKey, PeerStats,
        RCV_SPACE_RECORD_BYTES, RETRANSMIT_RECORD_BYTES, SET_STATE_RECORD_BYTES, SockMemo,
        SockMemos, SockOwner, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_RECV, TCP_SYN_SENT,
        TcpStats, globals::ABSENT,
    },
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TracePointContext,
};

mod owners;

use crate::{aggregate, clock::Now, lost::count as count_lost, targets::target_of};

// Tracepoint field offsets, set by the loader from tracefs format files (defaults: Linux 6.18).
#[unsafe(no_mangle)]
static TCP_STATE_SKADDR: u32 = 8;
#[unsafe(no_mangle)]
static TCP_STATE_OLDSTATE: u32 = 16;
#[unsafe(no_mangle)]
static TCP_STATE_NEWSTATE: u32 = 20;
#[unsafe(no_mangle)]
static TCP_STATE_SPORT: u32 = 24;
#[unsafe(no_mangle)]
static TCP_STATE_DPORT: u32 = 26;
#[unsafe(no_mangle)]
static TCP_STATE_FAMILY: u32 = 28;
#[unsafe(no_mangle)]
static TCP_STATE_PROTOCOL: u32 = 30;
#[unsafe(no_mangle)]
static TCP_STATE_DADDR: u32 = 36;
#[unsafe(no_mangle)]
static TCP_STATE_DADDR_V6: u32 = 56;
#[unsafe(no_mangle)]
static TCP_PROBE_SKADDR: u32 = 128;
#[unsafe(no_mangle)]
static TCP_PROBE_SRTT: u32 = 100;
#[unsafe(no_mangle)]
static TCP_PROBE_FAMILY: u32 = 68;
#[unsafe(no_mangle)]
static TCP_PROBE_DADDR: u32 = 36;
#[unsafe(no_mangle)]
static TCP_RETRANS_SKADDR: u32 = 16;
#[unsafe(no_mangle)]
static TCP_RETRANS_SKBADDR: u32 = 8;
#[unsafe(no_mangle)]
static TCP_RCV_SKADDR: u32 = 8;
#[unsafe(no_mangle)]
static TCP_PROBE_COOKIE: u32 = ABSENT;
#[unsafe(no_mangle)]
static TCP_RCV_COOKIE: u32 = ABSENT;
// Words of each record its program copies (`agent_common::tcp::SET_STATE_RECORD_BYTES`).
#[unsafe(no_mangle)]
static TCP_STATE_WORDS: u32 = 9;
#[unsafe(no_mangle)]
static TCP_PROBE_WORDS: u32 = 17;
#[unsafe(no_mangle)]
static TCP_RETRANS_WORDS: u32 = 6;
#[unsafe(no_mangle)]
static TCP_RCV_WORDS: u32 = 9;
#[unsafe(no_mangle)]
static TCP_SKB_GSO_SEGS: u32 = ABSENT;
#[unsafe(no_mangle)]
static TCP_PER_PEER: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_NET: u32 = ABSENT;

/// (network namespace, local port) -> listening socket of a tracked process; accepted sockets
/// inherit its target.
#[map]
static LISTENERS: HashMap<ListenerKey, Listener> = HashMap::with_max_entries(LISTENERS_MAX, 0);

#[map]
static SOCK_MEMO: PerCpuArray<SockMemos> = PerCpuArray::with_max_entries(1, 0);

#[map]
static TCP_STATS: PerCpuArray<TcpStats> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

/// Owning process -> retransmitted segments of its sockets, for the retransmits of a span's
/// process: user space samples it into the span history with the per-thread totals.
#[map]
static PROC_RETRANS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(PROC_RETRANS_MAX, 0);

/// Per (target, peer) latencies, only filled when the breakdown is on; sized by the loader.
#[map]
static TCP_PEERS: HashMap<PeerKey, PeerStats> = HashMap::with_max_entries(PEERS_DEFAULT, 0);

#[inline(always)]
fn global(g: &'static u32) -> u32 {
    // SAFETY: volatile read of a loader-set global.
    unsafe { core::ptr::read_volatile(g) }
}

/// The start of a tracepoint's record, `W` words of it, copied with plain loads into this CPU's
/// `TCP_RECORD`. A classic tracepoint program may load from its record directly, but only at
/// offsets fixed in the instruction; the field offsets here are the loader's (tracefs formats),
/// so fields are read from the copy, where `TracePointContext::read_at` would make a
/// `bpf_probe_read_kernel` call per field (a helper call costs about an empty program's run on
/// the machines of docs/benchmarks.md, and `tcp_probe` fires per segment).
///
/// The copy is in a map, not on the stack, and written and read with volatile accesses: a stack
/// array kept as values by the compiler had each exit of the unrolled loop below store all the
/// zeros after it again (about W * W / 2 stores, most of `tcp_probe`'s run), and one kept in
/// memory was zeroed byte by byte first.
struct Record<const W: usize> {
    words: *mut u64,
    bytes: usize,
}

/// The longest copy (`PROBE_RECORD_BYTES`).
const RECORD_WORDS_MAX: usize = words(PROBE_RECORD_BYTES);

/// Where each CPU's TCP programs copy their record: they never nest on a CPU (the kernel skips a
/// classic tracepoint program that fires while another BPF program of its kind runs there).
#[map]
static TCP_RECORD: PerCpuArray<[u64; RECORD_WORDS_MAX]> = PerCpuArray::with_max_entries(1, 0);

const fn words(bytes: u32) -> usize {
    (bytes / 8) as usize
}

impl<const W: usize> Record<W> {
    /// The first `len` words (a loader-set global, at most `W`) of the record; None only if the
    /// scratch map is missing.
    #[inline(always)]
    fn of(ctx: &TracePointContext, len: &'static u32) -> Option<Self> {
        const { assert!(W <= RECORD_WORDS_MAX) };
        let words = TCP_RECORD.get_ptr_mut(0)?.cast::<u64>();
        let p = ctx.as_ptr() as *const u64;
        let len = global(len) as usize;
        // The first word (the common fields) is not the program's to read: the kernel keeps the
        // registers' address there for helpers, and the verifier refuses loads below 8 bytes.
        for i in 1..W {
            // The verifier knows `len` (frozen .rodata) and skips the loads past it: the kernel
            // attaches no program that may read past its tracepoint's record.
            if i < len {
                // SAFETY: within the record, at an offset fixed in the instruction (the loop is
                // unrolled: the verifier refuses a moving pointer into the record), into word i
                // of this CPU's scratch value.
                unsafe {
                    core::ptr::write_volatile(words.add(i), core::ptr::read_volatile(p.add(i)))
                };
            }
        }
        Some(Self {
            words,
            bytes: len * 8,
        })
    }

    /// The field at the loader-set offset `offset`.
    #[inline(always)]
    fn field<T: Copy>(&self, offset: &'static u32) -> Result<T, i32> {
        self.at(global(offset) as usize)
    }

    /// The `T` at `offset`, which must be aligned for it (tracepoint fields are).
    #[inline(always)]
    fn at<T: Copy>(&self, offset: usize) -> Result<T, i32> {
        if offset < 8
            || offset + core::mem::size_of::<T>() > self.bytes.min(W * 8)
            || offset % core::mem::align_of::<T>() != 0
        {
            return Err(-1);
        }
        // SAFETY: aligned, and within words 1..len (checked above), which `of` copied.
        Ok(unsafe { core::ptr::read_volatile(self.words.cast::<u8>().add(offset).cast::<T>()) })
    }
}

type SetStateRecord = Record<{ words(SET_STATE_RECORD_BYTES) }>;
type ProbeRecord = Record<{ words(PROBE_RECORD_BYTES) }>;
type RetransmitRecord = Record<{ words(RETRANSMIT_RECORD_BYTES) }>;
type RcvSpaceRecord = Record<{ words(RCV_SPACE_RECORD_BYTES) }>;

/// What a new peer entry starts from: in .rodata, not built on the stack (400 bytes of the
/// programs' 512).
static NEW_PEER: PeerStats = PeerStats {
    connect: Log2Hist::ZERO,
    rtt: Log2Hist::ZERO,
};

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

/// This CPU's memo of socket owners (`SockMemos`), by socket address and cookie.
struct Memo(Option<&'static mut SockMemos>);

impl Memo {
    #[inline(always)]
    fn here() -> Self {
        // SAFETY: this CPU's value; classic tracepoint programs do not nest on a CPU.
        Self(SOCK_MEMO.get_ptr_mut(0).map(|p| unsafe { &mut *p }))
    }

    /// The owner of socket `sk` with cookie `cookie` (0: none known) if this CPU looked it up.
    #[inline(always)]
    fn recall(&self, sk: u64, cookie: u64) -> Option<SockOwner> {
        if cookie == 0 {
            return None;
        }
        let memos = self.0.as_ref()?;
        memos
            .entries
            .iter()
            .find(|e| e.sk == sk && e.cookie == cookie)
            .map(|e| SockOwner::new(e.target, e.flags, e.tgid))
    }

    /// Remembers `owner` for the socket, in the next entry (round robin).
    #[inline(always)]
    fn remember(&mut self, sk: u64, cookie: u64, owner: &SockOwner) {
        let Some(memos) = self.0.as_mut().filter(|_| cookie != 0) else {
            return;
        };
        let i = memos.next as usize % memos.entries.len();
        memos.next = memos.next.wrapping_add(1);
        if let Some(e) = memos.entries.get_mut(i) {
            *e = SockMemo {
                sk,
                cookie,
                target: owner.target,
                flags: owner.flags,
                tgid: owner.tgid,
                _pad: 0,
            };
        }
    }
}

/// Whether the per-peer breakdown is on (a loader-set constant: the verifier drops the code of
/// the other case).
#[inline(always)]
fn per_peer() -> bool {
    global(&TCP_PER_PEER) != 0
}

/// The per-peer entry for `key`, created on first use; `None` when the breakdown is off or the
/// map is full (counted).
#[inline(always)]
fn peer(key: &PeerKey) -> Option<*mut PeerStats> {
    if !per_peer() {
        return None;
    }
    if let Some(p) = TCP_PEERS.get_ptr_mut(key) {
        return Some(p);
    }
    // Another CPU may insert the same key first: NOEXIST keeps its counts.
    let _ = TCP_PEERS.insert(key, &NEW_PEER, u64::from(BPF_NOEXIST));
    let p = TCP_PEERS.get_ptr_mut(key);
    if p.is_none() {
        count_lost(lost::TCP_PEERS_FULL);
    }
    p
}

/// The listener key of socket `sk` for local port `port`: its network namespace.
fn listener_key(sk: u64, port: u16) -> ListenerKey {
    let net_off = global(&TCP_SK_NET);
    let mut net = 0;
    if net_off != ABSENT {
        // SAFETY: bpf_probe_read_kernel tolerates any address; a failed read leaves 0.
        net = unsafe {
            bpf_probe_read_kernel((sk as *const u8).wrapping_add(net_off as usize) as *const u64)
        }
        .unwrap_or(0);
    }
    ListenerKey {
        net,
        port,
        _pad0: 0,
        _pad1: 0,
    }
}

/// Makes `key` a key of `target`'s peer with its address zeroed, written field by field where
/// it lies: the literal `addr: [0; 16]`, or zeros written next to each other, or a zeroed key
/// moved, become a call to `memset`, a loop of byte stores (`ebpf::tests` in the agent looks for
/// such calls).
#[inline(always)]
fn peer_key(key: &mut MaybeUninit<PeerKey>, target: u32, port: u16, family: u16) -> &mut PeerKey {
    let k = key.as_mut_ptr();
    // SAFETY: writes to fields of a local value, each aligned for its type (`addr` is at offset
    // 8 of a 4-aligned struct), which together cover all its bytes.
    unsafe {
        write_volatile(&raw mut (*k).target, target);
        write_volatile(&raw mut (*k).port, port);
        write_volatile(&raw mut (*k).family, family);
        let addr = (&raw mut (*k).addr).cast::<u32>();
        for i in 0..4 {
            write_volatile(addr.add(i), 0);
        }
        key.assume_init_mut()
    }
}

/// The remote end of an inet_sock_set_state event.
fn state_peer<'k>(
    rec: &SetStateRecord,
    target: u32,
    key: &'k mut MaybeUninit<PeerKey>,
) -> Result<&'k PeerKey, i32> {
    let family: u16 = rec.field(&TCP_STATE_FAMILY)?;
    let key = peer_key(key, target, rec.field(&TCP_STATE_DPORT)?, family);
    if family == AF_INET6 {
        key.addr = rec.field(&TCP_STATE_DADDR_V6)?;
    } else {
        let v4: [u8; 4] = rec.field(&TCP_STATE_DADDR)?;
        key.addr[..4].copy_from_slice(&v4);
    }
    Ok(key)
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_set_state(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    let rec = SetStateRecord::of(ctx, &TCP_STATE_WORDS).ok_or(-1)?;
    if rec.field::<u16>(&TCP_STATE_PROTOCOL)? != IPPROTO_TCP {
        return Ok(());
    }
    let sk: u64 = rec.field(&TCP_STATE_SKADDR)?;
    let old: i32 = rec.field(&TCP_STATE_OLDSTATE)?;
    let new: i32 = rec.field(&TCP_STATE_NEWSTATE)?;
    // Only a connect's two ends read the clock (a clock helper costs about an empty program's run).
    let mut now = Now::default();
    match (old, new) {
        // connect() and listen() run in the owner's context: the one place `current` is right.
        (TCP_CLOSE, TCP_SYN_SENT) => {
            let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            if let Some(target) = target_of(tgid) {
                let owner = SockOwner {
                    connect_ts_ns: now.get(),
                    ..SockOwner::new(target, OWNER_CLIENT, tgid)
                };
                owners::set(sk, &owner);
            }
        }
        (TCP_CLOSE, TCP_LISTEN) => {
            let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            if let Some(target) = target_of(tgid) {
                owners::set(sk, &SockOwner::new(target, 0, tgid));
                let key = listener_key(sk, rec.field(&TCP_STATE_SPORT)?);
                let l = Listener { sk, target, tgid };
                if LISTENERS.insert(&key, &l, 0).is_err() {
                    count_lost(lost::TCP_CONNECTS_FULL);
                }
            }
        }
        (TCP_SYN_SENT, TCP_ESTABLISHED) => {
            // SAFETY: a live map value; one socket's state changes are serialised.
            if let Some(o) = owners::get_ptr_mut(sk).map(|p| unsafe { &mut *p })
                && o.connect_ts_ns != 0
            {
                let ns = now.get().saturating_sub(o.connect_ts_ns);
                o.connect_ts_ns = 0;
                let target = o.target;
                if let Some(s) = stats(target) {
                    record(&mut s.connect, ns);
                }
                // The peer's fields are read only where the breakdown is on.
                if per_peer() {
                    let mut key = MaybeUninit::uninit();
                    if let Some(p) = peer(state_peer(&rec, target, &mut key)?) {
                        // SAFETY: p points into a live map value.
                        unsafe { aggregate::record(&mut (*p).connect, ns) };
                    }
                }
            }
        }
        // An accepted connection, created in softirq: it belongs to the owner of its listener.
        (TCP_SYN_RECV, TCP_ESTABLISHED) => {
            let key = listener_key(sk, rec.field(&TCP_STATE_SPORT)?);
            // SAFETY: copied out.
            if let Some(l) = unsafe { LISTENERS.get(&key).copied() } {
                owners::set(sk, &SockOwner::new(l.target, 0, l.tgid));
            }
        }
        _ => {}
    }
    if new == TCP_CLOSE {
        if old == TCP_LISTEN {
            let key = listener_key(sk, rec.field(&TCP_STATE_SPORT)?);
            // SAFETY: copied out.
            if unsafe { LISTENERS.get(&key) }.is_some_and(|l| l.sk == sk) {
                let _ = LISTENERS.remove(&key);
            }
        }
        let Some(o) = owners::take(sk) else {
            return Ok(());
        };
        if old == TCP_SYN_SENT
            && o.connect_ts_ns != 0
            && let Some(s) = stats(o.target)
        {
            s.connect_failures += 1;
        }
    }
    Ok(())
}

/// recvmsg() on a TCP socket, in the reading process's context: claims sockets that were
/// opened before the process was tracked (a service started before the agent, or connecting
/// in the milliseconds between its exec and its match).
#[tracepoint(category = "tcp", name = "tcp_rcv_space_adjust")]
pub fn tcp_rcv_space_adjust(ctx: TracePointContext) -> u32 {
    let Some(rec) = RcvSpaceRecord::of(&ctx, &TCP_RCV_WORDS) else {
        return 0;
    };
    let Ok(sk) = rec.field::<u64>(&TCP_RCV_SKADDR) else {
        return 0;
    };
    // A socket this CPU saw owned, as every read of a request/response loop finds it: nothing
    // to claim, and no lookup of the reader's target.
    let cookie = rec.field::<u64>(&TCP_RCV_COOKIE).unwrap_or(0);
    let mut memo = Memo::here();
    if memo.recall(sk, cookie).is_some() {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(target) = target_of(tgid) else {
        return 0;
    };
    let owner = match owners::get(sk) {
        Some(o) => o,
        None => {
            // Who connected is unknown here: the peer is recorded without its port.
            let o = SockOwner::new(target, 0, tgid);
            owners::set(sk, &o);
            o
        }
    };
    memo.remember(sk, cookie, &owner);
    0
}

#[tracepoint(category = "tcp", name = "tcp_probe")]
pub fn tcp_probe(ctx: TracePointContext) -> u32 {
    match try_tcp_probe(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_tcp_probe(ctx: &TracePointContext) -> Result<(), i32> {
    let rec = ProbeRecord::of(ctx, &TCP_PROBE_WORDS).ok_or(-1)?;
    let sk: u64 = rec.field(&TCP_PROBE_SKADDR)?;
    let cookie = rec.field::<u64>(&TCP_PROBE_COOKIE).unwrap_or(0);
    let mut memo = Memo::here();
    let owner = match memo.recall(sk, cookie) {
        Some(o) => o,
        None => {
            let Some(o) = owners::get(sk) else {
                return Ok(());
            };
            memo.remember(sk, cookie, &o);
            o
        }
    };
    // srtt in microseconds (the kernel's srtt_us >> 3).
    let srtt_us: u32 = rec.field(&TCP_PROBE_SRTT)?;
    if srtt_us == 0 {
        return Ok(());
    }
    let ns = u64::from(srtt_us) * 1000;
    if let Some(s) = stats(owner.target) {
        record(&mut s.rtt, ns);
    }
    if per_peer() {
        // daddr is a sockaddr_in or sockaddr_in6: port at +2, IPv4 at +4, IPv6 at +8.
        let family: u16 = rec.field(&TCP_PROBE_FAMILY)?;
        let base = global(&TCP_PROBE_DADDR) as usize;
        let port: u16 = rec.at(base + 2)?;
        let mut key = MaybeUninit::uninit();
        let key = peer_key(&mut key, owner.target, 0, family);
        if owner.flags & OWNER_CLIENT != 0 {
            key.port = u16::from_be(port);
        }
        if family == AF_INET {
            let v4: [u8; 4] = rec.at(base + 4)?;
            key.addr[..4].copy_from_slice(&v4);
        } else {
            key.addr = rec.at(base + 8)?;
        }
        if let Some(p) = peer(key) {
            // SAFETY: p points into a live map value.
            unsafe { aggregate::record(&mut (*p).rtt, ns) };
        }
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
    let rec = RetransmitRecord::of(ctx, &TCP_RETRANS_WORDS).ok_or(-1)?;
    let sk: u64 = rec.field(&TCP_RETRANS_SKADDR)?;
    let Some(owner) = owners::get(sk) else {
        return Ok(());
    };
    // Every attempt counts, as in the kernel's total_retrans (ss, nstat TcpRetransSegs); one
    // skb can carry several segments (GSO): count segments.
    let gso_off = global(&TCP_SKB_GSO_SEGS);
    let segs = if gso_off == ABSENT {
        1
    } else {
        let skb: u64 = rec.field(&TCP_RETRANS_SKBADDR)?;
        // SAFETY: bpf_probe_read_kernel tolerates any address.
        let segs = unsafe {
            bpf_probe_read_kernel((skb as *const u8).wrapping_add(gso_off as usize) as *const u16)
        }
        .map_err(|e| e as i32)?;
        u64::from(segs.max(1))
    };
    if let Some(s) = stats(owner.target) {
        s.retransmits += segs;
    }
    match PROC_RETRANS.get_ptr_mut(&owner.tgid) {
        // SAFETY: a live map value; other CPUs may add to it at the same time.
        Some(p) => unsafe { aggregate::atomic_add(p, segs) },
        None => {
            // A race with another CPU's first insert loses at most that CPU's count once.
            let _ = PROC_RETRANS.insert(&owner.tgid, &segs, 0);
        }
    }
    Ok(())
}
