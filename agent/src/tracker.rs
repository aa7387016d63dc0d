//! Process tracking: keeps the kernel's tgid -> target map (`TRACKED`) and its user-space mirror
//! current. The user-space half of `agent-ebpf/src/targets.rs`.
//!
//! - At start and every `rescan_interval`, /proc is scanned: processes matching a selector, and
//!   descendants of tracked processes, are added; dead ones are removed. The rescan also repairs
//!   whatever a lost event or a full map left behind.
//! - Between scans the kernel adds forked children and removes exited processes by itself and
//!   tells us through the `PROC_EVENTS` ring buffer, which also carries every exec so that a new
//!   process is matched against comm/cmdline/cgroup selectors as soon as it starts.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use agent_common::{
    NO_TARGET, lost,
    targets::{EVENT_EXEC, EVENT_EXIT, EVENT_FORK, ProcEvent},
};
use aya::maps::{HashMap as BpfHashMap, MapData, MapError, RingBuf};
use prometheus_client::metrics::{family::Family as MetricFamily, gauge::Gauge};
use tokio::io::unix::AsyncFd;

use crate::{
    lost::UserLost,
    metrics::TargetLabels,
    probes::{Family, Hook, ProgramSpec},
    targets::{ProcessInfo, TargetId, TargetSet, list_pids},
};

pub const FAMILY: Family = Family {
    name: "process_tracking",
    needs: None,
    requires: "BTF tracepoints (tp_btf) sched_process_exec, sched_process_fork, sched_process_exit",
    programs: &[
        ProgramSpec {
            program: "sched_process_exec",
            hook: Hook::BtfTracepoint("sched_process_exec"),
        },
        ProgramSpec {
            program: "sched_process_fork",
            hook: Hook::BtfTracepoint("sched_process_fork"),
        },
        ProgramSpec {
            program: "sched_process_exit",
            hook: Hook::BtfTracepoint("sched_process_exit"),
        },
    ],
};

pub const TRACKED_MAP: &str = "TRACKED";

/// A read-only copy of the tracked processes (tgid -> target) for other samplers (GPU).
pub type SharedTracked = Arc<std::sync::RwLock<HashMap<u32, TargetId>>>;
pub const EVENTS_MAP: &str = "PROC_EVENTS";

/// Deepest ancestry walked when looking for a tracked ancestor.
const MAX_ANCESTRY: usize = 64;

pub struct Tracker {
    targets: Arc<TargetSet>,
    proc_root: PathBuf,
    /// The kernel's map; `None` when eBPF is unavailable (tracking then runs on rescans alone).
    map: Option<BpfHashMap<MapData, u32, u32>>,
    tracked: HashMap<u32, TargetId>,
    counts: Vec<i64>,
    gauge: MetricFamily<TargetLabels, Gauge>,
    lost: Arc<UserLost>,
    own_pid: u32,
    shared: SharedTracked,
}

impl Tracker {
    pub fn new(
        targets: Arc<TargetSet>,
        map: Option<BpfHashMap<MapData, u32, u32>>,
        gauge: MetricFamily<TargetLabels, Gauge>,
        lost: Arc<UserLost>,
    ) -> Self {
        let counts = vec![0; targets.len()];
        let tracker = Self {
            targets,
            proc_root: PathBuf::from("/proc"),
            map,
            tracked: HashMap::new(),
            counts,
            gauge,
            lost,
            own_pid: std::process::id(),
            shared: SharedTracked::default(),
        };
        for id in 0..tracker.counts.len() {
            tracker.publish(id as TargetId);
        }
        tracker
    }

    pub fn tracked(&self) -> &HashMap<u32, TargetId> {
        &self.tracked
    }

    /// A copy of the tracked processes that follows every change.
    pub fn shared(&self) -> SharedTracked {
        self.shared.clone()
    }

    fn publish(&self, id: TargetId) {
        if let Some(name) = self.targets.name(id) {
            self.gauge
                .get_or_create(&TargetLabels {
                    target: name.to_owned(),
                })
                .set(self.counts[id as usize]);
        }
    }

    fn add(&mut self, tgid: u32, target: TargetId, in_kernel_already: bool) {
        // Never the agent itself: a cmdline selector can match the agent's own --target argument.
        if self.tracked.contains_key(&tgid) || tgid == self.own_pid {
            return;
        }
        if !in_kernel_already
            && let Some(map) = self.map.as_mut()
            && let Err(e) = map.insert(tgid, target, 0)
        {
            let full = matches!(&e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG));
            if full {
                if self.lost.count(lost::TRACKED_MAP_FULL) {
                    tracing::warn!(
                        tgid,
                        "tracked-process map full: new processes are not traced (counted in \
                             pipeprobe_events_lost_total{{reason=\"tracked_map_full\"}}); raise \
                             max_tracked_processes"
                    );
                }
            } else {
                tracing::warn!(tgid, error = %e, "cannot add process to the tracked-process map");
            }
            return;
        }
        self.tracked.insert(tgid, target);
        if let Ok(mut m) = self.shared.write() {
            m.insert(tgid, target);
        }
        self.counts[target as usize] += 1;
        self.publish(target);
        tracing::debug!(tgid, target = self.targets.name(target), "tracking process");
    }

    fn remove(&mut self, tgid: u32, in_kernel_already: bool) {
        let Some(target) = self.tracked.remove(&tgid) else {
            return;
        };
        if let Ok(mut m) = self.shared.write() {
            m.remove(&tgid);
        }
        if !in_kernel_already && let Some(map) = self.map.as_mut() {
            let _ = map.remove(&tgid);
        }
        self.counts[target as usize] -= 1;
        self.publish(target);
        tracing::debug!(tgid, target = self.targets.name(target), "process gone");
    }

    /// Full /proc scan: adds matching processes and descendants of tracked ones, drops the dead.
    pub fn scan(&mut self) {
        let pids = match list_pids(&self.proc_root) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, proc = %self.proc_root.display(), "cannot list processes");
                return;
            }
        };
        let live: HashSet<u32> = pids.iter().copied().collect();
        let dead: Vec<u32> = self
            .tracked
            .keys()
            .filter(|p| !live.contains(p))
            .copied()
            .collect();
        for tgid in dead {
            self.remove(tgid, false);
        }

        let infos: HashMap<u32, ProcessInfo> = pids
            .iter()
            .filter(|p| !self.tracked.contains_key(p))
            .filter_map(|&p| ProcessInfo::read(&self.proc_root, p).map(|i| (p, i)))
            .collect();
        let parents: HashMap<u32, u32> = infos.iter().map(|(p, i)| (*p, i.ppid)).collect();
        let mut found = Vec::new();
        for (pid, info) in &infos {
            if let Some(t) = self.targets.match_process(info) {
                found.push((*pid, t));
            }
        }
        let mut direct: HashMap<u32, TargetId> = found.iter().copied().collect();
        // Descendants of tracked or matched processes inherit their target.
        for &pid in infos.keys() {
            if direct.contains_key(&pid) {
                continue;
            }
            let mut cur = pid;
            for _ in 0..MAX_ANCESTRY {
                let Some(&parent) = parents.get(&cur) else {
                    break;
                };
                if parent == 0 {
                    break;
                }
                if let Some(&t) = self.tracked.get(&parent).or_else(|| direct.get(&parent)) {
                    found.push((pid, t));
                    break;
                }
                cur = parent;
            }
        }
        for (pid, t) in found {
            direct.insert(pid, t);
            self.add(pid, t, false);
        }
    }

    /// Applies one kernel event.
    pub fn handle(&mut self, ev: &ProcEvent) {
        match ev.kind {
            EVENT_EXEC if !self.tracked.contains_key(&ev.tgid) => {
                let Some(info) = ProcessInfo::read(&self.proc_root, ev.tgid) else {
                    return;
                };
                if let Some(t) = self.targets.match_process(&info) {
                    self.add(ev.tgid, t, false);
                }
            }
            EVENT_FORK if ev.target != NO_TARGET && (ev.target as usize) < self.counts.len() => {
                self.add(ev.tgid, ev.target, true);
            }
            EVENT_EXIT => self.remove(ev.tgid, true),
            _ => {}
        }
    }

    /// Follows kernel events and rescans periodically, until the task is dropped.
    pub async fn run(mut self, events: Option<RingBuf<MapData>>, rescan: Duration) {
        let mut ticker = tokio::time::interval(rescan);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // SAFETY: the ring buffer owns its fd and moves into the AsyncFd, which it outlives.
        let mut events = match events
            .map(|rb| unsafe { AsyncFd::register(rb) }.map_err(|e| e.into_parts().1))
            .transpose()
        {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "cannot poll process events; tracking relies on rescans");
                None
            }
        };
        loop {
            tokio::select! {
                _ = ticker.tick() => self.scan(),
                ready = async { events.as_mut().expect("guarded").readable_mut().await }, if events.is_some() => {
                    let Ok(mut guard) = ready else { break };
                    let mut batch = Vec::new();
                    {
                        let ring = guard.get_inner_mut();
                        while let Some(item) = ring.next() {
                            if item.len() >= std::mem::size_of::<ProcEvent>() {
                                // SAFETY: the kernel writes whole ProcEvents; read_unaligned copies.
                                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ProcEvent>()) });
                            }
                        }
                    }
                    guard.clear_ready();
                    for ev in &batch {
                        self.handle(ev);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::Target;

    fn tracker(selectors: &[&str]) -> Tracker {
        let set = TargetSet::new(vec![Target {
            name: "t".into(),
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
        }]);
        let mut t = Tracker::new(Arc::new(set), None, MetricFamily::default(), Arc::default());
        // These tests select their own process, which the agent would exclude as itself.
        t.own_pid = 0;
        t
    }

    #[test]
    fn scan_matches_and_inherits_to_children() {
        // This test process is matched by pid; the child it spawns inherits the target.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let mut t = tracker(&[&format!("pid:{}", std::process::id())]);
        t.scan();
        assert_eq!(t.tracked().get(&std::process::id()), Some(&0));
        assert_eq!(
            t.tracked().get(&child.id()),
            Some(&0),
            "child not inherited: {:?}",
            t.tracked()
        );
        child.kill().unwrap();
        child.wait().unwrap();
        t.scan();
        assert!(
            !t.tracked().contains_key(&child.id()),
            "dead child still tracked"
        );
        // Other tests' children may be tracked too (they descend from this process).
        assert_eq!(t.counts[0] as usize, t.tracked().len());
    }

    #[test]
    fn never_tracks_itself() {
        let mut t = tracker(&["pid:1"]);
        t.own_pid = 1;
        t.scan();
        assert!(!t.tracked().contains_key(&1));
    }

    #[test]
    fn events_update_mirror() {
        let mut t = tracker(&["comm:^sleep$"]);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        // Give exec a moment to set comm.
        std::thread::sleep(Duration::from_millis(50));
        t.handle(&ProcEvent {
            kind: EVENT_EXEC,
            tgid: child.id(),
            parent_tgid: 0,
            target: NO_TARGET,
        });
        assert_eq!(t.tracked().get(&child.id()), Some(&0));
        t.handle(&ProcEvent {
            kind: EVENT_FORK,
            tgid: 999_999,
            parent_tgid: child.id(),
            target: 0,
        });
        assert_eq!(t.counts[0], 2);
        t.handle(&ProcEvent {
            kind: EVENT_EXIT,
            tgid: 999_999,
            parent_tgid: 0,
            target: 0,
        });
        assert_eq!(t.counts[0], 1);
        // Out-of-range targets from a confused kernel side are ignored.
        t.handle(&ProcEvent {
            kind: EVENT_FORK,
            tgid: 5,
            parent_tgid: 1,
            target: 9,
        });
        assert_eq!(t.counts[0], 1);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
