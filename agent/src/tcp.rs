//! TCP connect latency, failed connects, RTT and retransmits per target: the user-space half of
//! `agent-ebpf/src/tcp.rs`.
//!
//! Two families so each degrades alone: `tcp` (sock/inet_sock_set_state, which also records
//! which target owns each socket, and tcp/tcp_retransmit_skb) and `tcp_rtt` (tcp/tcp_probe,
//! whose `skaddr` field recent kernels only have). Field offsets come from the tracefs format
//! files of the running kernel.
use std::sync::Arc;

use agent_common::{
    hist::Log2Hist,
    tcp::{TcpStats, globals},
};
use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use crate::{
    btf::KernelBtf,
    metrics::{TargetLabels, encode_counters, encode_log2_histograms},
    probes::{Family, Hook, ProgramSpec},
    targets::TargetSet,
    tracefs::{self, TracefsError},
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
        },
        ProgramSpec {
            program: "inet_sock_set_state",
            hook: Hook::Tracepoint {
                category: "sock",
                name: "inet_sock_set_state",
            },
        },
        ProgramSpec {
            program: "tcp_retransmit_skb",
            hook: Hook::Tracepoint {
                category: "tcp",
                name: "tcp_retransmit_skb",
            },
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
    }],
};

pub const STATS_MAP: &str = "TCP_STATS";

/// Load-time globals for one family, or why the family cannot run on this kernel.
pub type Globals = Result<Vec<(&'static str, u32)>, TracefsError>;

/// Field offsets for the `tcp` family (tracefs formats, and kernel BTF for the skb's segment
/// count).
pub fn state_globals(btf: &KernelBtf) -> Globals {
    let ev = "sock/inet_sock_set_state";
    let f = tracefs::field_offsets("sock", "inet_sock_set_state")?;
    let mut out = vec![
        (
            globals::STATE_SKADDR,
            tracefs::field_offset(&f, ev, "skaddr")?,
        ),
        (
            globals::STATE_OLDSTATE,
            tracefs::field_offset(&f, ev, "oldstate")?,
        ),
        (
            globals::STATE_NEWSTATE,
            tracefs::field_offset(&f, ev, "newstate")?,
        ),
        (
            globals::STATE_SPORT,
            tracefs::field_offset(&f, ev, "sport")?,
        ),
        (
            globals::STATE_PROTOCOL,
            tracefs::field_offset(&f, ev, "protocol")?,
        ),
    ];
    let ev = "tcp/tcp_retransmit_skb";
    let f = tracefs::field_offsets("tcp", "tcp_retransmit_skb")?;
    out.push((
        globals::RETRANS_SKADDR,
        tracefs::field_offset(&f, ev, "skaddr")?,
    ));
    out.push((
        globals::RETRANS_SKBADDR,
        tracefs::field_offset(&f, ev, "skbaddr")?,
    ));
    let ev = "tcp/tcp_rcv_space_adjust";
    let f = tracefs::field_offsets("tcp", "tcp_rcv_space_adjust")?;
    out.push((
        globals::RCV_SKADDR,
        tracefs::field_offset(&f, ev, "skaddr")?,
    ));
    let gso_segs = btf
        .member_offset("sk_buff", &["cb"])
        .and_then(|cb| Ok(cb + btf.member_offset("tcp_skb_cb", &["tcp_gso_segs"])?));
    match gso_segs {
        Ok(off) => out.push((globals::SKB_GSO_SEGS, off)),
        Err(e) => tracing::warn!(error = %e, "retransmits will count skbs, not segments"),
    }
    Ok(out)
}

/// Field offsets for the `tcp_rtt` family.
pub fn probe_globals() -> Globals {
    let ev = "tcp/tcp_probe";
    let f = tracefs::field_offsets("tcp", "tcp_probe")?;
    Ok(vec![
        (
            globals::PROBE_SKADDR,
            tracefs::field_offset(&f, ev, "skaddr")?,
        ),
        (globals::PROBE_SRTT, tracefs::field_offset(&f, ev, "srtt")?),
    ])
}

pub struct TcpLatency {
    stats: PerCpuArray<MapData, TcpStats>,
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
        Self {
            stats,
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
        match self.stats.get(&id, 0) {
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
        let all: Vec<(TargetLabels, TcpStats)> = self
            .targets
            .iter()
            .map(|(id, t)| {
                (
                    TargetLabels {
                        target: t.name.clone(),
                    },
                    self.read(id),
                )
            })
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
