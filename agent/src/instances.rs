//! Kernel target ids of pods. With `[kubernetes] pod_labels` on, each (target, namespace, pod,
//! container) gets a kernel id of its own, so the kernel keeps each pod's numbers apart and its
//! series carry `namespace`, `pod` and `container` labels. The kernel's per-target arrays have
//! `MAX_TARGETS` ids: the configured targets take the first ones, pods the rest; when none is
//! free, a pod's processes count under their target's own id (no pod labels), logged once.
//!
//! An id whose last process left is retired, not freed at once: the kernel still holds its
//! numbers. Each collector that keeps numbers per id (run-queue histograms, syscall stats, TCP
//! stats) zeroes a retired id's entries at its next scrape and says so; once all have, the id
//! is free for another pod, which then starts from zero. Nothing about a gone pod is exported
//! after it retires.
use std::sync::{Arc, Mutex};

use agent_common::MAX_TARGETS;

use crate::targets::TargetId;

/// Namespace, pod and container of a pod's kernel id.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// The collectors that keep numbers per kernel id: each zeroes retired ids.
pub const CLEAR_SCHED: u8 = 1;
pub const CLEAR_SYSCALLS: u8 = 2;
pub const CLEAR_TCP: u8 = 4;
pub const CLEAR_PEERS: u8 = 8;

#[derive(Debug, Clone)]
enum Slot {
    Free,
    /// A configured target's own id.
    Target,
    Live {
        target: TargetId,
        pod: Arc<PodIdentity>,
        procs: u32,
    },
    /// Waiting for these collectors to zero its numbers.
    Retired {
        pending: u8,
    },
}

#[derive(Debug)]
struct Inner {
    /// Indexed by kernel id; at start the first ones are the configured targets.
    slots: Vec<Slot>,
    /// Collectors running (they must clear retired ids).
    collectors: u8,
    full_logged: bool,
}

#[derive(Debug)]
pub struct Instances {
    inner: Mutex<Inner>,
}

impl Default for Instances {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Instances {
    /// `base` configured targets, on the first ids.
    pub fn new(base: u32) -> Self {
        let mut slots = vec![Slot::Free; MAX_TARGETS as usize];
        for s in slots.iter_mut().take(base as usize) {
            *s = Slot::Target;
        }
        Self {
            inner: Mutex::new(Inner {
                slots,
                collectors: 0,
                full_logged: false,
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A collector that keeps numbers per id runs: it must clear retired ids.
    pub fn add_collector(&self, bit: u8) {
        self.inner().collectors |= bit;
    }

    /// The configured target of a pod's id, and its pod; None for other ids.
    pub fn pod(&self, id: TargetId) -> Option<(TargetId, Arc<PodIdentity>)> {
        match self.inner().slots.get(id as usize)? {
            Slot::Live { target, pod, .. } => Some((*target, pod.clone())),
            _ => None,
        }
    }

    /// Ids of live pods.
    pub fn live(&self) -> Vec<TargetId> {
        self.inner()
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Live { .. }))
            .map(|(i, _)| i as TargetId)
            .collect()
    }

    /// The id for one more process of `target` in `pod`: the pod's, or a new one, or (none
    /// free) `target`'s own.
    pub fn acquire(&self, target: TargetId, pod: PodIdentity) -> TargetId {
        let mut inner = self.inner();
        let existing = inner.slots.iter().position(
            |s| matches!(s, Slot::Live { target: t, pod: p, .. } if *t == target && **p == pod),
        );
        let free = || {
            inner
                .slots
                .iter()
                .enumerate()
                .find(|(_, s)| matches!(s, Slot::Free))
                .map(|(i, _)| i)
        };
        let Some(i) = existing.or_else(free) else {
            if !inner.full_logged {
                inner.full_logged = true;
                tracing::warn!(
                    max = MAX_TARGETS,
                    "more pods than free target ids: further pods count under their target \
                     without pod labels"
                );
            }
            return target;
        };
        match &mut inner.slots[i] {
            Slot::Live { procs, .. } => *procs += 1,
            slot => {
                *slot = Slot::Live {
                    target,
                    pod: Arc::new(pod),
                    procs: 1,
                }
            }
        }
        i as TargetId
    }

    /// Ids free now (neither a target's, a live pod's nor retired).
    pub fn free(&self) -> usize {
        self.inner()
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Free))
            .count()
    }

    /// A free id for a target added by a reload.
    pub fn acquire_target(&self) -> Option<TargetId> {
        let mut inner = self.inner();
        let i = inner.slots.iter().position(|s| matches!(s, Slot::Free))?;
        inner.slots[i] = Slot::Target;
        Some(i as TargetId)
    }

    /// A target removed by a reload: its id retires like a gone pod's (each collector zeroes
    /// its numbers before another target or pod may take it).
    pub fn retire_target(&self, id: TargetId) {
        let mut inner = self.inner();
        let pending = inner.collectors;
        if let Some(slot @ Slot::Target) = inner.slots.get_mut(id as usize) {
            *slot = if pending == 0 {
                Slot::Free
            } else {
                Slot::Retired { pending }
            };
        }
    }

    /// One more process (a fork) under `id`.
    pub fn hold(&self, id: TargetId) {
        if let Some(Slot::Live { procs, .. }) = self.inner().slots.get_mut(id as usize) {
            *procs += 1;
        }
    }

    /// One process fewer under `id`; the last one retires a pod's id.
    pub fn release(&self, id: TargetId) {
        let mut inner = self.inner();
        let pending = inner.collectors;
        let Some(slot) = inner.slots.get_mut(id as usize) else {
            return;
        };
        if let Slot::Live { procs, .. } = slot {
            *procs = procs.saturating_sub(1);
            if *procs == 0 {
                *slot = if pending == 0 {
                    Slot::Free
                } else {
                    Slot::Retired { pending }
                };
            }
        }
    }

    /// The retired ids collector `bit` must zero now; they count as zeroed by it (a zeroing
    /// that fails is only logged: the next pod on the id would start from the old numbers).
    pub fn take_retired(&self, bit: u8) -> Vec<TargetId> {
        let mut out = Vec::new();
        for (i, slot) in self.inner().slots.iter_mut().enumerate() {
            if let Slot::Retired { pending } = slot
                && *pending & bit != 0
            {
                *pending &= !bit;
                out.push(i as TargetId);
                if *pending == 0 {
                    *slot = Slot::Free;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodIdentity {
        PodIdentity {
            namespace: "speech".into(),
            pod: name.into(),
            container: "server".into(),
        }
    }

    #[test]
    fn pods_get_ids_that_are_reused_only_once_every_collector_cleared_them() {
        let ins = Instances::new(2);
        ins.add_collector(CLEAR_SCHED | CLEAR_TCP);
        let a = ins.acquire(0, pod("stt-0"));
        assert_eq!(a, 2, "after the two configured targets");
        assert_eq!(ins.acquire(0, pod("stt-0")), a, "same pod, same id");
        let b = ins.acquire(0, pod("stt-1"));
        assert_eq!(b, 3);
        assert_eq!(
            ins.acquire(1, pod("stt-0")),
            4,
            "another target, another id"
        );
        ins.hold(a);
        for _ in 0..3 {
            ins.release(a);
        }
        assert!(ins.pod(a).is_none(), "retired");
        assert_eq!(
            ins.acquire(0, pod("stt-2")),
            5,
            "a retired id is not free yet"
        );
        assert_eq!(ins.take_retired(CLEAR_SCHED), vec![a]);
        assert!(ins.take_retired(CLEAR_SCHED).is_empty());
        assert_eq!(ins.acquire(0, pod("stt-3")), 6, "TCP has not cleared it");
        assert_eq!(ins.take_retired(CLEAR_TCP), vec![a]);
        assert_eq!(ins.acquire(0, pod("stt-4")), a, "free again");
        assert_eq!(ins.live().len(), 5);
        // Full: a pod counts under its target's own id.
        for i in 0..MAX_TARGETS {
            ins.acquire(1, pod(&format!("mt-{i}")));
        }
        assert_eq!(ins.acquire(1, pod("mt-x")), 1);
    }
}
