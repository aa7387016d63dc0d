//! Syscall latency and errors per target and syscall: the user-space half of
//! `agent-ebpf/src/syscalls.rs`.
//!
//! The kernel aggregates per (target, syscall number) in arrays (`agent_common::syscalls::
//! SyscallSlot` has the layout). Here numbers become names (a table per
//! architecture) and series are bounded: each target gets its own series for at most
//! `max_series_per_target` syscalls, chosen the first time they are seen (busiest first) and
//! kept for the agent's lifetime so every counter stays monotonic; later syscalls are summed
//! into `syscall="other"`.
use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use agent_common::{
    MAX_TARGETS,
    hist::Log2Hist,
    syscalls::{MAX_NR, SYSCALLS_PER_TARGET, SyscallSlot, SyscallStats},
};
use aya::maps::{Array, MapData};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
};

use crate::{
    instances::CLEAR_SYSCALLS,
    metrics::{TargetLabels, encode_counters, encode_log2_histograms},
    probes::{Family, Hook, ProgramSpec},
    targets::TargetSet,
};

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "aarch64")]
use aarch64::NAMES;
#[cfg(target_arch = "x86_64")]
use x86_64::NAMES;

pub const FAMILY: Family = Family {
    name: "syscalls",
    requires: "BTF tracepoints (tp_btf) sys_enter, sys_exit, sched_switch",
    needs: None,
    // The switch program first: a thread must not enter a syscall where its leaving the CPU
    // would go unseen (agent-ebpf/src/syscalls.rs).
    programs: &[
        ProgramSpec {
            program: "syscall_switch",
            hook: Hook::BtfTracepoint("sched_switch"),
            done_by: Some("sched"),
        },
        ProgramSpec {
            program: "sys_enter",
            hook: Hook::BtfTracepoint("sys_enter"),
            done_by: None,
        },
        ProgramSpec {
            program: "sys_exit",
            hook: Hook::BtfTracepoint("sys_exit"),
            done_by: None,
        },
    ],
};

pub const STATS_MAP: &str = "SYSCALL_STATS";
pub const SLOT_MAP: &str = "SYSCALL_SLOT";
pub const USED_MAP: &str = "SYSCALL_USED";
pub const FILTER_MAP: &str = "SYSCALL_FILTER";
pub const ON_CPU_MAP: &str = "SYSCALL_ON_CPU";
pub const DEFAULT_MAX_SERIES: usize = 32;

/// The name of syscall `nr` on this architecture.
pub fn name(nr: u32) -> Cow<'static, str> {
    match NAMES.get(nr as usize).copied().flatten() {
        Some(n) => Cow::Borrowed(n),
        None => Cow::Owned(format!("sys_{nr}")),
    }
}

/// The number of syscall `name` on this architecture.
pub fn number(name: &str) -> Option<u32> {
    NAMES
        .iter()
        .position(|n| *n == Some(name))
        .map(|i| i as u32)
}

/// Every syscall name of this architecture.
pub fn names() -> impl Iterator<Item = &'static str> {
    NAMES.iter().flatten().copied()
}

/// Which syscalls are traced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Selection {
    #[default]
    All,
    Only(BTreeSet<u32>),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyscallName {
    syscall: String,
}

type SyscallLabels = (TargetLabels, SyscallName);

/// Syscalls that have their own series, per target id.
#[derive(Debug, Default)]
struct SeriesBudget {
    named: BTreeMap<u32, BTreeSet<u32>>,
}

impl SeriesBudget {
    /// Splits one target's per-syscall stats into named series and the folded rest.
    fn split(
        &mut self,
        target: u32,
        cap: usize,
        mut stats: Vec<(u32, SyscallStats)>,
    ) -> (Vec<(u32, SyscallStats)>, Option<SyscallStats>) {
        let named = self.named.entry(target).or_default();
        // Newcomers in the busiest-first order, so a full budget keeps the hot syscalls named.
        stats.sort_by_key(|(nr, s)| (std::cmp::Reverse(s.hist.count()), *nr));
        for (nr, _) in &stats {
            if named.len() < cap {
                named.insert(*nr);
            }
        }
        let mut own = Vec::new();
        let mut other: Option<SyscallStats> = None;
        for (nr, s) in stats {
            if named.contains(&nr) {
                own.push((nr, s));
            } else {
                let o = other.get_or_insert(SyscallStats {
                    hist: Log2Hist::ZERO,
                    errors: 0,
                });
                o.hist.merge(&s.hist);
                o.errors += s.errors;
            }
        }
        own.sort_by_key(|(nr, _)| *nr);
        (own, other)
    }
}

/// The kernel's aggregation arrays (`agent-ebpf/src/syscalls.rs`).
pub struct StatsMaps {
    pub stats: Array<MapData, SyscallSlot>,
    pub slot: Array<MapData, u64>,
    pub used: Array<MapData, u64>,
}

impl StatsMaps {
    /// Slots of `id`'s block handed out (the kernel's counter runs on past a full block).
    fn used(&self, id: u32) -> u32 {
        let used = self.used.get(&id, 0).unwrap_or(0);
        u32::try_from(used)
            .unwrap_or(u32::MAX)
            .min(SYSCALLS_PER_TARGET)
    }

    /// Each syscall `id` has counted, summed over its slots.
    fn read(&self, id: u32) -> BTreeMap<u32, SyscallStats> {
        let mut out = BTreeMap::new();
        let used = self.used(id);
        for i in 0..used {
            let slot = match self.stats.get(&(id * SYSCALLS_PER_TARGET + i), 0) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "reading {STATS_MAP} failed");
                    continue;
                }
            };
            // 0: still being claimed.
            let Some(nr) = slot.syscall.checked_sub(1) else {
                continue;
            };
            let s = out.entry(nr).or_insert(SyscallStats {
                hist: Log2Hist::ZERO,
                errors: 0,
            });
            s.hist.merge(&slot.stats.hist);
            s.errors += slot.stats.errors;
        }
        out
    }

    /// Forgets retired kernel id `id`'s syscalls, so that the id starts afresh when reused.
    fn clear(&mut self, id: u32) {
        let used = self.used(id);
        let empty = SyscallSlot {
            syscall: 0,
            _pad: 0,
            stats: SyscallStats {
                hist: Log2Hist::ZERO,
                errors: 0,
            },
        };
        for i in 0..used {
            let index = id * SYSCALLS_PER_TARGET + i;
            if let Ok(slot) = self.stats.get(&index, 0)
                && let Some(nr) = slot.syscall.checked_sub(1)
                && nr < MAX_NR
            {
                let _ = self.slot.set(id * MAX_NR + nr, 0, 0);
            }
            let _ = self.stats.set(index, empty, 0);
        }
        let _ = self.used.set(id, 0, 0);
    }
}

pub struct SyscallLatency {
    /// Locked to clear retired pod ids' slots.
    stats: Mutex<StatsMaps>,
    targets: Arc<TargetSet>,
    max_series: usize,
    budget: Mutex<SeriesBudget>,
}

impl std::fmt::Debug for SyscallLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyscallLatency")
            .field("max_series", &self.max_series)
            .finish_non_exhaustive()
    }
}

impl SyscallLatency {
    pub fn new(stats: StatsMaps, targets: Arc<TargetSet>, max_series: usize) -> Self {
        targets.instances().add_collector(CLEAR_SYSCALLS);
        Self {
            stats: Mutex::new(stats),
            targets,
            max_series,
            budget: Mutex::default(),
        }
    }

    /// Everything the kernel aggregated, per kernel id; retired pod ids' slots are cleared
    /// first.
    fn read(&self) -> BTreeMap<u32, Vec<(u32, SyscallStats)>> {
        let mut stats = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let retired = self.targets.instances().take_retired(CLEAR_SYSCALLS);
        for &id in &retired {
            stats.clear(id);
        }
        if !retired.is_empty() {
            let mut budget = self
                .budget
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for id in &retired {
                budget.named.remove(id);
            }
        }
        (0..MAX_TARGETS)
            .map(|id| (id, stats.read(id).into_iter().collect::<Vec<_>>()))
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }

    /// (labels, stats) for every exported series.
    fn series(&self) -> Vec<(SyscallLabels, SyscallStats)> {
        let per_target = self.read();
        let mut budget = self
            .budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = Vec::new();
        for (target, stats) in per_target {
            let Some(labels) = self.targets.labels(target) else {
                continue;
            };
            let (own, other) = budget.split(target, self.max_series, stats);
            for (nr, s) in own {
                let syscall = name(nr).into_owned();
                out.push(((labels.clone(), SyscallName { syscall }), s));
            }
            if let Some(s) = other {
                let syscall = "other".to_owned();
                out.push(((labels.clone(), SyscallName { syscall }), s));
            }
        }
        out
    }
}

impl Collector for SyscallLatency {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let series = self.series();
        encode_log2_histograms(
            &mut encoder,
            "pipeprobe_syscall_duration",
            "Time from syscall entry to return, per target and syscall",
            series.iter().map(|(l, s)| (l.clone(), s.hist)),
        )?;
        encode_counters(
            &mut encoder,
            "pipeprobe_syscall_errors",
            "Syscalls that returned an error (negative return value), per target and syscall",
            series.iter().map(|(l, s)| (l.clone(), s.errors)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(count: u64, errors: u64) -> SyscallStats {
        let mut hist = Log2Hist::ZERO;
        hist.slots[2] = count;
        SyscallStats { hist, errors }
    }

    #[test]
    fn names_round_trip() {
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(name(0), "read");
            assert_eq!(name(230), "clock_nanosleep");
            assert_eq!(number("openat"), Some(257));
        }
        assert_eq!(name(100_000), "sys_100000");
        assert_eq!(number("no_such_syscall"), None);
        assert!(names().count() > 300);
    }

    #[test]
    fn folding_is_bounded_and_stable() {
        let mut b = SeriesBudget::default();
        // Cap 2: the two busiest get names.
        let (own, other) = b.split(
            0,
            2,
            vec![(1, stats(5, 0)), (2, stats(50, 1)), (3, stats(10, 2))],
        );
        assert_eq!(own.iter().map(|(nr, _)| *nr).collect::<Vec<_>>(), [2, 3]);
        let other = other.unwrap();
        assert_eq!((other.hist.count(), other.errors), (5, 0));
        // Later syscall 1 gets busy: it stays in "other" so no series changes meaning.
        let (own, other) = b.split(
            0,
            2,
            vec![
                (1, stats(500, 7)),
                (2, stats(50, 1)),
                (3, stats(10, 2)),
                (4, stats(1, 0)),
            ],
        );
        assert_eq!(own.iter().map(|(nr, _)| *nr).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(other.unwrap().hist.count(), 501);
        // Budgets are per target.
        let (own, other) = b.split(1, 2, vec![(1, stats(1, 0))]);
        assert_eq!(own.len(), 1);
        assert!(other.is_none());
    }
}
