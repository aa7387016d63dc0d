//! `pipeprobe_bpf_recursion_misses_total{program}`: runs of our programs the kernel skipped.
//!
//! The kernel never runs a tracing program re-entrantly on one CPU: when a tracepoint fires
//! while the same program is running there (a softirq interrupting it, say), that run is skipped
//! and only counted in the program's `recursion_misses`. Those are lost events like any other,
//! so they are exported. aya does not expose the counter; `BPF_OBJ_GET_INFO_BY_FD` does.
use std::os::fd::{AsRawFd as _, OwnedFd};

use aya_obj::generated::{bpf_cmd, bpf_prog_info};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
};

use crate::metrics::encode_counters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: &'static str,
}

/// The kernel's `recursion_misses` of the program behind `fd`.
pub fn recursion_misses(fd: &OwnedFd) -> std::io::Result<u64> {
    // SAFETY: a plain C struct for which all-zero is valid.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = crate::ebpf::zeroed_attr();
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
    attr.info.info = (&raw mut info) as u64;
    // SAFETY: the info buffer is info_len bytes and outlives the call.
    unsafe { crate::ebpf::bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info.recursion_misses)
}

/// Reads the counter of every attached program at scrape time.
#[derive(Debug, Default)]
pub struct RecursionMisses {
    programs: Vec<(&'static str, OwnedFd)>,
}

impl RecursionMisses {
    pub fn new(programs: Vec<(&'static str, OwnedFd)>) -> Self {
        Self { programs }
    }
}

impl Collector for RecursionMisses {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        encode_counters(
            &mut encoder,
            "pipeprobe_bpf_recursion_misses",
            "Runs of the program the kernel skipped because it was already running on that CPU (lost events)",
            self.programs.iter().map(|(program, fd)| {
                (ProgramLabels { program }, recursion_misses(fd).unwrap_or(0))
            }),
        )
    }
}
