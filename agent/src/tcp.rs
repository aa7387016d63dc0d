//! TCP connect latency, failed connects, RTT and retransmits per target: the user-space half of
//! `agent-ebpf/src/tcp.rs`.
//!
//! Two families so each degrades alone: `tcp` (sock/inet_sock_set_state, which also records
//! which target owns each socket, and tcp/tcp_retransmit_skb) and `tcp_rtt` (tcp/tcp_probe,
//! whose `skaddr` field recent kernels only have). Field offsets come from the tracefs format
//! files of the running kernel.
use std::sync::{Arc, Mutex};

use agent_common::{
    hist::Log2Hist,
    tcp::{
        AF_INET6, PROBE_RECORD_BYTES, PeerKey, PeerStats, RCV_SPACE_RECORD_BYTES,
        RETRANSMIT_RECORD_BYTES, SET_STATE_RECORD_BYTES, TcpStats, globals,
    },
};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
};

use crate::{
    btf::KernelBtf,
    instances::{CLEAR_PEERS, CLEAR_TCP},
    metrics::{
        TargetLabels, encode_counters, encode_log2_histograms, remove_retired, zero_per_cpu,
    },
    probes::{Family, Hook, ProgramSpec},
    targets::TargetSet,
    tracefs::{Format, TracefsError},
};

pub const FAMILY: Family = Family {
    name: "tcp",
    requires: "tracepoints sock/inet_sock_set_state, tcp/tcp_retransmit_skb, tcp/tcp_rcv_space_adjust (tracefs)",
    needs: None,
    programs: &[
        ProgramSpec {
            program: "tcp_rcv_space_adjust",
            hook: Hook::Tracepoint {
                category: "tcp",
                name: "tcp_rcv_space_adjust",
            },
            done_by: None,
        },
        ProgramSpec {
            program: "inet_sock_set_state",
            hook: Hook::Tracepoint {
                category: "sock",
                name: "inet_sock_set_state",
            },
            done_by: None,
        },
        ProgramSpec {
            program: "tcp_retransmit_skb",
            hook: Hook::Tracepoint {
                category: "tcp",
                name: "tcp_retransmit_skb",
            },
            done_by: None,
        },
    ],
};

pub const RTT_FAMILY: Family = Family {
    name: "tcp_rtt",
    requires: "tracepoint tcp/tcp_probe with an skaddr field (Linux 6.x)",
    // Socket ownership comes from the tcp family.
    needs: Some("tcp"),
    programs: &[ProgramSpec {
        program: "tcp_probe",
        hook: Hook::Tracepoint {
            category: "tcp",
            name: "tcp_probe",
        },
        done_by: None,
    }],
};

pub const STATS_MAP: &str = "TCP_STATS";
pub const PEERS_MAP: &str = "TCP_PEERS";
/// The socket owner table and its spill map, sized by `[tcp] max_sockets` (`SockTable`).
pub const OWNERS_MAP: &str = "SOCK_OWNERS";
pub const SPILL_MAP: &str = "SOCK_SPILL";
/// Owning process -> retransmitted segments, sampled into the span history.
pub const PROC_RETRANS_MAP: &str = "PROC_RETRANS";

/// Load-time globals for one family, or why the family cannot run on this kernel.
pub type Globals = Result<Vec<(&'static str, u32)>, TracefsError>;

/// Field offsets for the `tcp` family (tracefs formats, and kernel BTF for the skb's segment
/// count).
pub fn state_globals(btf: &KernelBtf) -> Globals {
    let f = Format::read("sock", "inet_sock_set_state", SET_STATE_RECORD_BYTES)?;
    let mut out = vec![
        (globals::STATE_WORDS, f.copied_words()),
        (globals::STATE_SKADDR, f.offset("skaddr")?),
        (globals::STATE_OLDSTATE, f.offset("oldstate")?),
        (globals::STATE_NEWSTATE, f.offset("newstate")?),
        (globals::STATE_SPORT, f.offset("sport")?),
        (globals::STATE_PROTOCOL, f.offset("protocol")?),
        (globals::STATE_DPORT, f.offset("dport")?),
        (globals::STATE_FAMILY, f.offset("family")?),
        (globals::STATE_DADDR, f.offset("daddr")?),
        (globals::STATE_DADDR_V6, f.offset("daddr_v6")?),
    ];
    let f = Format::read("tcp", "tcp_retransmit_skb", RETRANSMIT_RECORD_BYTES)?;
    out.extend([
        (globals::RETRANS_WORDS, f.copied_words()),
        (globals::RETRANS_SKADDR, f.offset("skaddr")?),
        (globals::RETRANS_SKBADDR, f.offset("skbaddr")?),
    ]);
    let f = Format::read("tcp", "tcp_rcv_space_adjust", RCV_SPACE_RECORD_BYTES)?;
    out.extend([
        (globals::RCV_WORDS, f.copied_words()),
        (globals::RCV_SKADDR, f.offset("skaddr")?),
        (globals::RCV_COOKIE, cookie_offset(&f)),
    ]);
    let gso_segs = btf
        .member_offset("sk_buff", &["cb"])
        .and_then(|cb| Ok(cb + btf.member_offset("tcp_skb_cb", &["tcp_gso_segs"])?));
    match gso_segs {
        Ok(off) => out.push((globals::SKB_GSO_SEGS, off)),
        Err(e) => tracing::warn!(error = %e, "retransmits will count skbs, not segments"),
    }
    // struct sock starts with its sock_common; possible_net_t holds the net pointer first.
    match btf.member_offset("sock_common", &["skc_net"]) {
        Ok(net) => out.push((globals::SK_NET, net)),
        Err(e) => tracing::warn!(
            error = %e,
            "listeners are matched by port alone: pods listening on the same port may be confused"
        ),
    }
    Ok(out)
}

/// Field offsets for the `tcp_rtt` family.
pub fn probe_globals() -> Globals {
    let f = Format::read("tcp", "tcp_probe", PROBE_RECORD_BYTES)?;
    Ok(vec![
        (globals::PROBE_WORDS, f.copied_words()),
        (globals::PROBE_SKADDR, f.offset("skaddr")?),
        (globals::PROBE_SRTT, f.offset("srtt")?),
        (globals::PROBE_FAMILY, f.offset("family")?),
        (globals::PROBE_DADDR, f.offset("daddr")?),
        (globals::PROBE_COOKIE, cookie_offset(&f)),
    ])
}

/// Where the record carries the socket's cookie, or `ABSENT`: the programs' memo of socket
/// owners (agent_common::tcp::SockMemos) needs it, and stays off without it.
fn cookie_offset(f: &Format) -> u32 {
    f.offset("sock_cookie").unwrap_or_else(|e| {
        tracing::debug!(error = %e, "no socket cookie: every event looks its socket's owner up");
        globals::ABSENT
    })
}

pub struct TcpLatency {
    /// Locked to zero retired pod ids.
    stats: Mutex<PerCpuArray<MapData, TcpStats>>,
    targets: Arc<TargetSet>,
    connect: bool,
    rtt: bool,
}

impl std::fmt::Debug for TcpLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLatency")
            .field("connect", &self.connect)
            .field("rtt", &self.rtt)
            .finish_non_exhaustive()
    }
}

impl TcpLatency {
    /// `connect`/`rtt`: which families are attached (a detached one exports nothing).
    pub fn new(
        stats: PerCpuArray<MapData, TcpStats>,
        targets: Arc<TargetSet>,
        connect: bool,
        rtt: bool,
    ) -> Self {
        targets.instances().add_collector(CLEAR_TCP);
        Self {
            stats: Mutex::new(stats),
            targets,
            connect,
            rtt,
        }
    }

    fn read(&self, id: u32) -> TcpStats {
        let mut total = TcpStats {
            connect: Log2Hist::ZERO,
            rtt: Log2Hist::ZERO,
            connect_failures: 0,
            retransmits: 0,
        };
        let stats = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match stats.get(&id, 0) {
            Ok(per_cpu) => {
                for s in per_cpu.iter() {
                    total.connect.merge(&s.connect);
                    total.rtt.merge(&s.rtt);
                    total.connect_failures += s.connect_failures;
                    total.retransmits += s.retransmits;
                }
            }
            Err(e) => tracing::debug!(target_id = id, error = %e, "reading {STATS_MAP} failed"),
        }
        total
    }
}

impl Collector for TcpLatency {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for id in self.targets.instances().take_retired(CLEAR_TCP) {
            let mut stats = self
                .stats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let zero = TcpStats {
                connect: Log2Hist::ZERO,
                rtt: Log2Hist::ZERO,
                connect_failures: 0,
                retransmits: 0,
            };
            zero_per_cpu(&mut stats, id, zero);
        }
        let all: Vec<(TargetLabels, TcpStats)> = self
            .targets
            .ids()
            .into_iter()
            .map(|(id, labels)| (labels, self.read(id)))
            .collect();
        if self.connect {
            encode_log2_histograms(
                &mut encoder,
                "pipeprobe_tcp_connect_duration",
                "TCP connect latency (SYN_SENT to ESTABLISHED) of the target's client sockets",
                all.iter().map(|(l, s)| (l.clone(), s.connect)),
            )?;
            encode_counters(
                &mut encoder,
                "pipeprobe_tcp_connect_failures",
                "TCP connects of the target that failed (SYN_SENT to CLOSE: refused, timed out)",
                all.iter().map(|(l, s)| (l.clone(), s.connect_failures)),
            )?;
            encode_counters(
                &mut encoder,
                "pipeprobe_tcp_retransmits",
                "TCP segments retransmitted on the target's sockets",
                all.iter().map(|(l, s)| (l.clone(), s.retransmits)),
            )?;
        }
        if self.rtt {
            encode_log2_histograms(
                &mut encoder,
                "pipeprobe_tcp_rtt",
                "Smoothed TCP round-trip time of the target's sockets, sampled at each received segment",
                all.iter().map(|(l, s)| (l.clone(), s.rtt)),
            )?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

/// `addr:port` (IPv6 in brackets), or the address alone for port 0.
fn peer_name(key: &PeerKey) -> String {
    let addr = if key.family == AF_INET6 {
        std::net::IpAddr::from(key.addr)
    } else {
        std::net::IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    };
    match (addr, key.port) {
        (a, 0) => a.to_string(),
        (std::net::IpAddr::V6(a), p) => format!("[{a}]:{p}"),
        (a, p) => format!("{a}:{p}"),
    }
}

/// The optional per-peer breakdown (`[tcp] per_peer = true`), bounded by the kernel map's size.
pub struct PeerLatency {
    /// Locked to remove retired pod ids' peers.
    peers: Mutex<BpfHashMap<MapData, PeerKey, PeerStats>>,
    targets: Arc<TargetSet>,
}

impl std::fmt::Debug for PeerLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLatency").finish_non_exhaustive()
    }
}

impl PeerLatency {
    pub fn new(peers: BpfHashMap<MapData, PeerKey, PeerStats>, targets: Arc<TargetSet>) -> Self {
        targets.instances().add_collector(CLEAR_PEERS);
        Self {
            peers: Mutex::new(peers),
            targets,
        }
    }
}

impl Collector for PeerLatency {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let retired = self.targets.instances().take_retired(CLEAR_PEERS);
        remove_retired(&mut peers, &retired, |k: &PeerKey| k.target);
        let mut series: Vec<((TargetLabels, PeerLabels), PeerStats)> = peers
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| {
                let target = self.targets.labels(k.target)?;
                Some((
                    (
                        target,
                        PeerLabels {
                            peer: peer_name(&k),
                        },
                    ),
                    v,
                ))
            })
            .collect();
        drop(peers);
        series.sort_by(|a, b| {
            (
                &a.0.0.target,
                &a.0.1.peer,
                a.0.0.pod.as_ref().map(|p| &p.pod),
            )
                .cmp(&(
                    &b.0.0.target,
                    &b.0.1.peer,
                    b.0.0.pod.as_ref().map(|p| &p.pod),
                ))
        });
        encode_log2_histograms(
            &mut encoder,
            "pipeprobe_tcp_peer_connect_duration",
            "TCP connect latency of the target's client sockets per remote address:port",
            series.iter().map(|(l, s)| (l.clone(), s.connect)),
        )?;
        encode_log2_histograms(
            &mut encoder,
            "pipeprobe_tcp_peer_rtt",
            "Smoothed TCP RTT of the target's sockets per remote peer (address:port for connections it made, address for accepted ones)",
            series.iter().map(|(l, s)| (l.clone(), s.rtt)),
        )
    }
}

#[cfg(test)]
mod tests {
    use agent_common::tcp::AF_INET;

    use super::*;

    /// The owner memo needs the record's socket cookie: where a kernel's record lacks it, or
    /// holds it past what the program copies, the offset is `ABSENT` (memo off), not an error.
    #[test]
    fn the_socket_cookie_is_found_or_absent() {
        let format = |cookie: &str| {
            format!(
                "format:\n\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n{cookie}\n"
            )
        };
        let with = format("\tfield:__u64 sock_cookie;\toffset:64;\tsize:8;\tsigned:0;");
        assert_eq!(cookie_offset(&Format::parse("x".into(), &with, 72)), 64);
        assert_eq!(
            cookie_offset(&Format::parse("x".into(), &with, 64)),
            globals::ABSENT
        );
        let without = format("");
        assert_eq!(
            cookie_offset(&Format::parse("x".into(), &without, 72)),
            globals::ABSENT
        );
    }

    #[test]
    fn peer_names() {
        let mut k = PeerKey {
            target: 0,
            port: 8080,
            family: AF_INET,
            addr: [0; 16],
        };
        k.addr[..4].copy_from_slice(&[10, 0, 0, 7]);
        assert_eq!(peer_name(&k), "10.0.0.7:8080");
        k.port = 0;
        assert_eq!(peer_name(&k), "10.0.0.7");
        let v6 = PeerKey {
            target: 0,
            port: 443,
            family: AF_INET6,
            addr: std::net::Ipv6Addr::LOCALHOST.octets(),
        };
        assert_eq!(peer_name(&v6), "[::1]:443");
    }
}
