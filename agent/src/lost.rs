//! `pipeprobe_events_lost_total{reason}`: everything dropped, in the kernel or in user space.
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use agent_common::lost::{COUNT, NAMES};
use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
};

use crate::metrics::encode_counters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Losses counted in user space, by the same reasons as the kernel's.
#[derive(Debug, Default)]
pub struct UserLost([AtomicU64; COUNT as usize]);

impl UserLost {
    /// Counts one loss; returns true the first time for this reason (to log it once).
    pub fn count(&self, reason: u32) -> bool {
        self.0
            .get(reason as usize)
            .is_some_and(|c| c.fetch_add(1, Ordering::Relaxed) == 0)
    }
}

pub struct LostCollector {
    kernel: Option<PerCpuArray<MapData, u64>>,
    user: Arc<UserLost>,
}

impl std::fmt::Debug for LostCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LostCollector")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl LostCollector {
    pub fn new(kernel: Option<PerCpuArray<MapData, u64>>, user: Arc<UserLost>) -> Self {
        Self { kernel, user }
    }

    /// Kernel plus user-space count per reason.
    pub fn totals(&self) -> [u64; COUNT as usize] {
        let mut totals = [0u64; COUNT as usize];
        for (i, total) in totals.iter_mut().enumerate() {
            let kernel: u64 = self
                .kernel
                .as_ref()
                .and_then(|m| m.get(&(i as u32), 0).ok())
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            *total = kernel + self.user.0[i].load(Ordering::Relaxed);
        }
        totals
    }
}

impl Collector for LostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let totals = self.totals();
        encode_counters(
            &mut encoder,
            "pipeprobe_events_lost",
            "Events, samples or entries dropped, by reason (a full map or buffer)",
            NAMES
                .iter()
                .zip(totals)
                .map(|(reason, v)| (ReasonLabels { reason }, v)),
        )
    }
}
