//! Run-queue delay per target: the user-space half of `agent-ebpf/src/sched.rs`.
//!
//! The kernel keeps per-CPU log2 histograms per target; this reads and sums them on scrape into
//! `pipeprobe_sched_runqueue_delay_seconds{target}`. A wait is counted when its thread next
//! leaves the CPU (agent-ebpf/src/sched.rs says why), one slice after it ends.
use std::sync::{Arc, Mutex};

use agent_common::hist::Log2Hist;
use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use crate::{
    instances::CLEAR_SCHED,
    metrics::{encode_log2_histograms, zero_per_cpu},
    probes::{Family, Hook, ProgramSpec},
    targets::TargetSet,
};

pub const FAMILY: Family = Family {
    name: "sched",
    needs: None,
    requires: "BTF tracepoint (tp_btf) sched_switch, and the scheduler's per-task wait accounting \
               (CONFIG_SCHED_INFO) on the run queue's clock (CONFIG_FAIR_GROUP_SCHED)",
    programs: &[ProgramSpec {
        program: "sched_switch",
        hook: Hook::BtfTracepoint("sched_switch"),
        done_by: None,
    }],
};

/// Name of the per-target histogram map in the eBPF object.
pub const HIST_MAP: &str = "RUNQ_HIST";

pub struct RunqueueDelay {
    /// Locked to zero retired pod ids.
    hist: Mutex<PerCpuArray<MapData, Log2Hist>>,
    targets: Arc<TargetSet>,
}

impl std::fmt::Debug for RunqueueDelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunqueueDelay")
            .field("targets", &self.targets.len())
            .finish_non_exhaustive()
    }
}

impl RunqueueDelay {
    pub fn new(hist: PerCpuArray<MapData, Log2Hist>, targets: Arc<TargetSet>) -> Self {
        targets.instances().add_collector(CLEAR_SCHED);
        Self {
            hist: Mutex::new(hist),
            targets,
        }
    }

    /// The histogram of kernel id `id`, summed over CPUs.
    pub fn read(&self, id: u32) -> Log2Hist {
        let mut total = Log2Hist::ZERO;
        let hist = self
            .hist
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match hist.get(&id, 0) {
            Ok(per_cpu) => per_cpu.iter().for_each(|h| total.merge(h)),
            Err(e) => tracing::debug!(target_id = id, error = %e, "reading {HIST_MAP} failed"),
        }
        total
    }
}

impl Collector for RunqueueDelay {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for id in self.targets.instances().take_retired(CLEAR_SCHED) {
            let mut hist = self
                .hist
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            zero_per_cpu(&mut hist, id, Log2Hist::ZERO);
        }
        encode_log2_histograms(
            &mut encoder,
            "pipeprobe_sched_runqueue_delay",
            "Time threads of the target spent runnable, waiting for a CPU (wakeup or preemption to switch-in)",
            self.targets
                .ids()
                .into_iter()
                .map(|(id, labels)| (labels, self.read(id))),
        )
    }
}
