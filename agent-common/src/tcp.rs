//! TCP probe types.
//!
//! TCP tracepoints fire in softirq context, where the current task is not the socket's owner,
//! so every event is attributed through the socket owner table (socket address -> target), filled where the
//! owner is current: connect() for client sockets, listen() for listeners, whose accepted
//! children are matched by local port, and every recvmsg() (tcp_rcv_space_adjust), which
//! claims sockets opened before their process was tracked.

/// The socket owner table (`SOCK_OWNERS`, an array indexed by a hash of the socket's address):
/// buckets of `SOCK_WAYS` slots, so that a look-up is a few loads and a claim or a release one
/// compare-and-swap, where a hash map takes a bucket lock and a free list at each insert and
/// delete (about 200-300 ns apiece on the machines of docs/benchmarks.md). Sockets whose bucket
/// is full go to a hash map (`SOCK_SPILL`).
pub const SOCK_WAYS: usize = 2;
/// Sockets of tracked processes followed at once by default (`[tcp] max_sockets`).
pub const SOCKETS_DEFAULT: u32 = 65_536;
/// The range `[tcp] max_sockets` may take.
pub const SOCKETS_MIN: u32 = 4;
pub const SOCKETS_MAX: u32 = 1 << 20;

/// The sizes of the owner table for `max_sockets` sockets.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SockTable {
    /// log2 of the bucket count (at least 1).
    pub bucket_bits: u32,
    /// Entries of the spill map: a quarter of `max_sockets`, at least 16.
    pub spill: u32,
}

impl SockTable {
    /// Slots for `max_sockets` (clamped to `SOCKETS_MIN..=SOCKETS_MAX`) rounded up to a power of
    /// two: with a few thousand live sockets few buckets ever fill.
    pub const fn for_sockets(max_sockets: u32) -> Self {
        let n = if max_sockets < SOCKETS_MIN {
            SOCKETS_MIN
        } else if max_sockets > SOCKETS_MAX {
            SOCKETS_MAX
        } else {
            max_sockets
        };
        let buckets = n.div_ceil(SOCK_WAYS as u32).next_power_of_two();
        let spill = n / 4;
        Self {
            bucket_bits: buckets.trailing_zeros(),
            spill: if spill < 16 { 16 } else { spill },
        }
    }

    pub const fn buckets(&self) -> u32 {
        1 << self.bucket_bits
    }
}

/// Listening ports of tracked processes.
pub const LISTENERS_MAX: u32 = 4096;

/// Per-target TCP aggregates (per-CPU array indexed by target id).
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct TcpStats {
    /// SYN_SENT -> ESTABLISHED.
    pub connect: crate::hist::Log2Hist,
    /// Smoothed RTT at each tcp_probe event.
    pub rtt: crate::hist::Log2Hist,
    /// SYN_SENT -> CLOSE.
    pub connect_failures: u64,
    pub retransmits: u64,
}

/// Owner of a socket.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct SockOwner {
    pub target: u32,
    /// `OWNER_CLIENT` when the target connected it (its remote port is a service's port).
    pub flags: u32,
    /// The owning process, for per-process counts (span breakdowns).
    pub tgid: u32,
    pub _pad: u32,
    /// While the socket is in SYN_SENT, when its connect started; 0 otherwise. Kept here, not in a
    /// map of its own: a connect then costs one map insert and one delete, not two of each.
    pub connect_ts_ns: u64,
}

impl SockOwner {
    /// An owner with no connect in flight.
    pub const fn new(target: u32, flags: u32, tgid: u32) -> Self {
        Self {
            target,
            flags,
            tgid,
            _pad: 0,
            connect_ts_ns: 0,
        }
    }
}

pub const OWNER_CLIENT: u32 = 1;

/// One socket's place in the owner table: `sk` 0 is free. A slot is claimed by a
/// compare-and-swap of `sk` from 0 and released by one back to 0, by the socket's own state
/// changes, which the kernel serialises under the socket's lock; so only the socket that holds a
/// slot writes its owner, and any reader that finds its own address there reads its own owner.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct SockSlot {
    pub sk: u64,
    pub owner: SockOwner,
}

/// A bucket of the owner table: one cache line.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct SockBucket {
    pub slots: [SockSlot; SOCK_WAYS],
}

/// The bucket of socket address `sk` in a table of `1 << bits` buckets (`bits` in 1..=63): the
/// top bits of a multiplicative hash, since slab addresses share their low bits.
pub const fn sock_bucket(sk: u64, bits: u32) -> u32 {
    (sk.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as u32
}

/// Processes with per-process retransmit counts (an LRU map: the least recently counted go
/// first, and only when this many processes have retransmitted).
pub const PROC_RETRANS_MAX: u32 = crate::targets::TRACKED_MAX;

/// Default cap of (target, peer) series when the per-peer breakdown is on.
pub const PEERS_DEFAULT: u32 = 256;

/// A remote endpoint of a target's sockets. `port` is 0 for sockets the target did not
/// connect itself (an accepted connection's remote port is ephemeral).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub target: u32,
    pub port: u16,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct PeerStats {
    pub connect: crate::hist::Log2Hist,
    pub rtt: crate::hist::Log2Hist,
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// A listening port in one network namespace: every pod has its own, and two pods commonly
/// listen on the same port.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// The socket's network namespace (its `struct net`), 0 if unknown: one pointer read, where
    /// the namespace's inode number takes two, at every accepted connection of the node. A
    /// socket holds a reference on its namespace, so no other namespace gets that address while
    /// the listener lives, and its entry goes when it closes.
    pub net: u64,
    pub port: u16,
    /// Scalars, not an array: the BPF side zeroes an array with a `memset` call, a byte loop.
    pub _pad0: u16,
    pub _pad1: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct Listener {
    pub sk: u64,
    pub target: u32,
    /// The listening process: accepted sockets are its.
    pub tgid: u32,
}

/// A socket a TCP program on this CPU found in the owner table lately, and its owner then.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SockMemo {
    pub sk: u64,
    /// The socket's cookie (`sock_cookie` of the tracepoint record), which no other socket ever
    /// has: a closed socket's address may be a new socket's, its cookie not. An entry holds
    /// while the socket lives, since a live socket's owner is not replaced.
    pub cookie: u64,
    pub target: u32,
    pub flags: u32,
    pub tgid: u32,
    pub _pad: u32,
}

/// Entries per CPU: the sockets of a request/response pair and their neighbours in time.
pub const SOCK_MEMO_ENTRIES: usize = 4;

/// The sockets each CPU's TCP programs looked up last (per-CPU map value). A `tcp_probe` per
/// segment and a `tcp_rcv_space_adjust` per recvmsg() on the same few sockets then find their
/// owner without a hash lookup (both records carry the socket's cookie; `tcp_retransmit_skb`'s
/// does not, and it looks up). Classic tracepoint programs never nest on a CPU (the kernel
/// skips a program that fires while another runs there), so no two of them share it at once.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SockMemos {
    pub entries: [SockMemo; SOCK_MEMO_ENTRIES],
    /// The entry the next new socket replaces (round robin).
    pub next: u32,
    pub _pad: u32,
}

/// The most bytes at the start of each TCP tracepoint's record that its program copies with
/// plain loads and reads its fields from. It copies no more than the record holds on the running
/// kernel (the kernel refuses to attach a program that may read past it): the loader sets how
/// many 8-byte words (`globals::*_WORDS`) and checks that every field read ends within them.
/// Linux 6.18's records are 72, 136, 80 and 72 bytes.
pub const SET_STATE_RECORD_BYTES: u32 = 96;
pub const PROBE_RECORD_BYTES: u32 = 160;
pub const RETRANSMIT_RECORD_BYTES: u32 = 48;
pub const RCV_SPACE_RECORD_BYTES: u32 = 72;

/// Globals holding tracepoint field offsets, read from tracefs format files at load time
/// (layouts differ across kernel versions).
pub mod globals {
    pub const STATE_SKADDR: &str = "TCP_STATE_SKADDR";
    pub const STATE_OLDSTATE: &str = "TCP_STATE_OLDSTATE";
    pub const STATE_NEWSTATE: &str = "TCP_STATE_NEWSTATE";
    pub const STATE_SPORT: &str = "TCP_STATE_SPORT";
    pub const STATE_PROTOCOL: &str = "TCP_STATE_PROTOCOL";
    pub const PROBE_SKADDR: &str = "TCP_PROBE_SKADDR";
    pub const PROBE_SRTT: &str = "TCP_PROBE_SRTT";
    pub const RETRANS_SKADDR: &str = "TCP_RETRANS_SKADDR";
    pub const RETRANS_SKBADDR: &str = "TCP_RETRANS_SKBADDR";
    pub const RCV_SKADDR: &str = "TCP_RCV_SKADDR";
    pub const STATE_DPORT: &str = "TCP_STATE_DPORT";
    pub const STATE_FAMILY: &str = "TCP_STATE_FAMILY";
    pub const STATE_DADDR: &str = "TCP_STATE_DADDR";
    pub const STATE_DADDR_V6: &str = "TCP_STATE_DADDR_V6";
    pub const PROBE_FAMILY: &str = "TCP_PROBE_FAMILY";
    /// Offset of the `daddr` sockaddr (sockaddr_in or sockaddr_in6) in tcp_probe.
    pub const PROBE_DADDR: &str = "TCP_PROBE_DADDR";
    /// Offsets of `sock_cookie` in tcp_probe and tcp_rcv_space_adjust, or `ABSENT` (the owner
    /// memo is then off).
    pub const PROBE_COOKIE: &str = "TCP_PROBE_COOKIE";
    pub const RCV_COOKIE: &str = "TCP_RCV_COOKIE";
    /// `offsetof(struct sock, __sk_common.skc_net)`, from BTF, or `ABSENT`.
    pub const SK_NET: &str = "TCP_SK_NET";
    /// 1 when the per-peer breakdown is on.
    pub const PER_PEER: &str = "TCP_PER_PEER";
    /// `SockTable::bucket_bits` of the owner table the loader sized.
    pub const SOCK_BUCKET_BITS: &str = "TCP_SOCK_BUCKET_BITS";
    /// `offsetof(struct sk_buff, cb) + offsetof(struct tcp_skb_cb, tcp_gso_segs)` from BTF, or
    /// `ABSENT`: the segments in a retransmitted skb, as the kernel's `total_retrans` counts.
    pub const SKB_GSO_SEGS: &str = "TCP_SKB_GSO_SEGS";
    pub const ABSENT: u32 = u32::MAX;
    /// Words of each record its program copies (see `SET_STATE_RECORD_BYTES`).
    pub const STATE_WORDS: &str = "TCP_STATE_WORDS";
    pub const PROBE_WORDS: &str = "TCP_PROBE_WORDS";
    pub const RETRANS_WORDS: &str = "TCP_RETRANS_WORDS";
    pub const RCV_WORDS: &str = "TCP_RCV_WORDS";
}

// TCP states (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_SYN_SENT: i32 = 2;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_CLOSE: i32 = 7;
pub const TCP_LISTEN: i32 = 10;
pub const IPPROTO_TCP: u16 = 6;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_is_one_cache_line() {
        assert_eq!(core::mem::size_of::<SockBucket>(), 64);
    }

    #[test]
    fn the_table_holds_what_it_is_sized_for() {
        let d = SockTable::for_sockets(SOCKETS_DEFAULT);
        assert_eq!((d.buckets(), d.spill), (32_768, 16_384));
        let small = SockTable::for_sockets(SOCKETS_MIN);
        assert_eq!((small.buckets(), small.spill), (2, 16));
        // Rounded up, clamped.
        assert_eq!(SockTable::for_sockets(5).buckets(), 4);
        assert_eq!(SockTable::for_sockets(0), small);
        assert_eq!(
            SockTable::for_sockets(u32::MAX).buckets() as usize * SOCK_WAYS,
            SOCKETS_MAX as usize
        );
        for bits in 1..=21 {
            assert!(sock_bucket(u64::MAX, bits) < 1 << bits);
        }
    }

    /// Sockets are slab objects: a few thousand of them, a dozen to each 32 KiB slab, must spread
    /// over the buckets so that almost none spill into the hash map.
    #[test]
    fn slab_laid_sockets_rarely_spill() {
        let table = SockTable::for_sockets(SOCKETS_DEFAULT);
        let mut load = [0u8; 32_768];
        let (mut sockets, mut spilled) = (0, 0);
        // Slabs scattered over the direct map, as a busy node's are.
        for slab in 0..400u64 {
            let base = 0xffff_8881_0000_0000 + slab.wrapping_mul(0x9_a000) % (1 << 32);
            for i in 0..13 {
                let n = &mut load[sock_bucket(base + i * 2432, table.bucket_bits) as usize];
                *n += 1;
                sockets += 1;
                if *n as usize > SOCK_WAYS {
                    spilled += 1;
                }
            }
        }
        assert_eq!(sockets, 5200);
        // Uniform hashing spills about 5 of 5,200 into 32,768 two-way buckets.
        assert!(spilled <= 20, "{spilled} of {sockets} sockets spilled");
    }
}
