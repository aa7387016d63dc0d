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
    targets::{EVENT_EXEC, EVENT_EXIT, EVENT_FORK, GEN_USER, ProcEvent},
};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError, RingBuf};
use prometheus_client::metrics::{family::Family as MetricFamily, gauge::Gauge};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{
    instances::PodIdentity,
    kube::{PodLabels, Pods, container_of},
    lost::UserLost,
    metrics::TargetLabels,
    probes::{Family, Hook, ProgramSpec},
    targets::{ProcessInfo, ReloadError, Reloaded, Target, TargetId, TargetSet, list_pids},
};

/// A new target list for the tracker to apply, and where to say how it went.
pub type ReloadRequest = (
    Vec<Target>,
    tokio::sync::oneshot::Sender<Result<Reloaded, ReloadError>>,
);

pub const FAMILY: Family = Family {
    name: "process_tracking",
    needs: None,
    requires: "BTF tracepoints (tp_btf) sched_process_exec, sched_process_fork, sched_process_exit",
    programs: &[
        ProgramSpec {
            program: "sched_process_exec",
            hook: Hook::BtfTracepoint("sched_process_exec"),
            done_by: None,
        },
        ProgramSpec {
            program: "sched_process_fork",
            hook: Hook::BtfTracepoint("sched_process_fork"),
            done_by: None,
        },
        ProgramSpec {
            program: "sched_process_exit",
            hook: Hook::BtfTracepoint("sched_process_exit"),
            done_by: None,
        },
    ],
};

pub const TRACKED_MAP: &str = "TRACKED";

/// The kernel's `TRACKED` map, written only through here so that every change bumps the agent's
/// tracking generation: the syscall probe caches `TRACKED`'s answer per CPU and checks the
/// generation before trusting it (`agent_common::targets::TargetMemo`).
pub struct KernelTracked {
    map: BpfHashMap<MapData, u32, u32>,
    generation: Array<MapData, u64>,
    /// The value last written: the agent is the entry's only writer.
    user_generation: u64,
}

impl KernelTracked {
    pub fn new(map: BpfHashMap<MapData, u32, u32>, generation: Array<MapData, u64>) -> Self {
        let user_generation = generation.get(&GEN_USER, 0).unwrap_or(0);
        Self {
            map,
            generation,
            user_generation,
        }
    }

    fn insert(&mut self, tgid: u32, id: TargetId) -> Result<(), MapError> {
        self.map.insert(tgid, id, 0)?;
        self.bump();
        Ok(())
    }

    fn remove(&mut self, tgid: u32) {
        let _ = self.map.remove(&tgid);
        self.bump();
    }

    /// After the map change, so that a cache filled from the old map sees a new generation.
    fn bump(&mut self) {
        self.user_generation = self.user_generation.wrapping_add(1);
        if let Err(e) = self.generation.set(GEN_USER, self.user_generation, 0) {
            // Cannot happen for an in-range index of a map we hold; were it to, a process
            // added or removed now would be traced by its syscalls' old answer until a thread
            // exits somewhere on the node.
            tracing::warn!(error = %e, "cannot bump the tracking generation");
        }
    }
}

/// A read-only copy of the tracked processes (tgid -> target) for other samplers (GPU).
pub type SharedTracked = Arc<std::sync::RwLock<HashMap<u32, TargetId>>>;
pub const EVENTS_MAP: &str = "PROC_EVENTS";

/// Deepest ancestry walked when looking for a tracked ancestor.
const MAX_ANCESTRY: usize = 64;

pub struct Tracker {
    targets: Arc<TargetSet>,
    proc_root: PathBuf,
    /// The kernel's map; `None` when eBPF is unavailable (tracking then runs on rescans alone).
    map: Option<KernelTracked>,
    tracked: HashMap<u32, TargetId>,
    counts: Vec<i64>,
    gauge: MetricFamily<TargetLabels, Gauge>,
    lost: Arc<UserLost>,
    own_pid: u32,
    shared: SharedTracked,
    kube: Option<Kube>,
}

/// How a process joins a target.
#[derive(Debug, Clone, Copy)]
enum Join {
    /// It matched configured target `.0` (its kernel id is its pod's, when pods are labelled).
    Matched(TargetId),
    /// It inherits kernel id `.0` from its parent.
    Inherited(TargetId),
}

/// Pod resolution and the `pipeprobe_target_pod_info` series, with `[kubernetes]` on.
struct Kube {
    pods: Arc<Pods>,
    /// Woken by the kubelet thread when the pod list changed.
    changed: Arc<tokio::sync::Notify>,
    series: MetricFamily<PodLabels, Gauge>,
    of: HashMap<u32, PodLabels>,
    counts: HashMap<PodLabels, i64>,
    max_series: usize,
    full_logged: bool,
    /// Each pod of a target gets its own kernel id and labelled series (`crate::instances`).
    pod_labels: bool,
}

impl Tracker {
    pub fn new(
        targets: Arc<TargetSet>,
        map: Option<KernelTracked>,
        gauge: MetricFamily<TargetLabels, Gauge>,
        lost: Arc<UserLost>,
    ) -> Self {
        // By kernel id: a reload may give a new target any free id.
        let counts = vec![0; agent_common::MAX_TARGETS as usize];
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
            kube: None,
        };
        for (id, _) in tracker.targets.list() {
            tracker.publish(id);
        }
        tracker
    }

    /// Resolves processes to pods through `pods` (kept current by the kubelet thread, which
    /// wakes `changed`), and exports which pods each target's processes run in.
    pub fn with_kubernetes(
        mut self,
        pods: Arc<Pods>,
        changed: Arc<tokio::sync::Notify>,
        series: MetricFamily<PodLabels, Gauge>,
        max_series: usize,
        pod_labels: bool,
    ) -> Self {
        self.kube = Some(Kube {
            pods,
            changed,
            series,
            of: HashMap::new(),
            counts: HashMap::new(),
            max_series,
            full_logged: false,
            pod_labels,
        });
        self
    }

    /// Reads a process's facts, with its pod when Kubernetes is on.
    fn read(&self, pid: u32) -> Option<ProcessInfo> {
        let mut info = ProcessInfo::read(&self.proc_root, pid)?;
        if let Some(k) = &self.kube {
            info.pod = container_of(&info.cgroups).and_then(|c| k.pods.resolve(&c));
        }
        Some(info)
    }

    /// Counts `tgid` in its pod's `pipeprobe_target_pod_info` series.
    fn add_pod(&mut self, tgid: u32, target: TargetId, info: Option<&ProcessInfo>) {
        let Some(name) = self.targets.name(target) else {
            return;
        };
        let Some(k) = self.kube.as_mut() else {
            return;
        };
        let Some(labels) = info.and_then(|i| i.pod.as_ref()).map(|r| r.labels(&name)) else {
            return;
        };
        if !k.counts.contains_key(&labels) && k.counts.len() >= k.max_series {
            if !k.full_logged {
                k.full_logged = true;
                tracing::warn!(
                    max = k.max_series,
                    "more pods than kubernetes.max_pod_series: further pods are tracked without \
                     a pipeprobe_target_pod_info series"
                );
            }
            return;
        }
        let n = k.counts.entry(labels.clone()).or_default();
        *n += 1;
        k.series.get_or_create(&labels).set(*n);
        k.of.insert(tgid, labels);
    }

    fn remove_pod(&mut self, tgid: u32) {
        let Some(k) = self.kube.as_mut() else {
            return;
        };
        let Some(labels) = k.of.remove(&tgid) else {
            return;
        };
        let n = k.counts.entry(labels.clone()).or_default();
        *n -= 1;
        if *n <= 0 {
            k.counts.remove(&labels);
            k.series.remove(&labels);
        } else {
            k.series.get_or_create(&labels).set(*n);
        }
    }

    pub fn tracked(&self) -> &HashMap<u32, TargetId> {
        &self.tracked
    }

    /// A copy of the tracked processes that follows every change.
    pub fn shared(&self) -> SharedTracked {
        self.shared.clone()
    }

    /// `target_processes{target}` of configured target `target`.
    fn publish(&self, target: TargetId) {
        if let Some(name) = self.targets.name(target) {
            self.gauge
                .get_or_create(&TargetLabels::of(&name))
                .set(self.counts[target as usize]);
        }
    }

    /// The kernel id for a process that matched `target`: its pod's own when pods are labelled.
    fn kernel_id(&self, target: TargetId, info: Option<&ProcessInfo>) -> TargetId {
        let pod = self
            .kube
            .as_ref()
            .filter(|k| k.pod_labels)
            .and(info)
            .and_then(|i| i.pod.as_ref());
        match pod {
            Some(r) => self.targets.instances().acquire(
                target,
                PodIdentity {
                    namespace: r.pod.namespace.clone(),
                    pod: r.pod.name.clone(),
                    container: r.container.clone(),
                },
            ),
            None => target,
        }
    }

    fn add(&mut self, tgid: u32, join: Join, in_kernel_already: bool, info: Option<&ProcessInfo>) {
        // Never the agent itself: a cmdline selector can match the agent's own --target argument.
        if self.tracked.contains_key(&tgid) || tgid == self.own_pid {
            return;
        }
        let id = match join {
            Join::Matched(target) => self.kernel_id(target, info),
            Join::Inherited(id) => {
                self.targets.instances().hold(id);
                id
            }
        };
        let Some(target) = self.targets.target_of_id(id) else {
            self.targets.instances().release(id);
            return;
        };
        if !in_kernel_already
            && let Some(map) = self.map.as_mut()
            && let Err(e) = map.insert(tgid, id)
        {
            self.targets.instances().release(id);
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
        self.tracked.insert(tgid, id);
        if let Ok(mut m) = self.shared.write() {
            m.insert(tgid, id);
        }
        self.counts[target as usize] += 1;
        self.publish(target);
        self.add_pod(tgid, target, info);
        tracing::debug!(tgid, target = self.targets.name(target), "tracking process");
    }

    fn remove(&mut self, tgid: u32, in_kernel_already: bool) {
        let Some(id) = self.tracked.remove(&tgid) else {
            return;
        };
        // None when a reload removed the target: the process leaves all the same.
        let target = self.targets.target_of_id(id);
        self.targets.instances().release(id);
        if let Ok(mut m) = self.shared.write() {
            m.remove(&tgid);
        }
        if !in_kernel_already && let Some(map) = self.map.as_mut() {
            map.remove(tgid);
        }
        self.remove_pod(tgid);
        let Some(target) = target else {
            tracing::debug!(tgid, "process left with its removed target");
            return;
        };
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
        if self.kube.is_some() {
            self.revalidate_pods();
        }

        let infos: HashMap<u32, ProcessInfo> = pids
            .iter()
            .filter(|p| !self.tracked.contains_key(p))
            .filter_map(|&p| self.read(p).map(|i| (p, i)))
            .collect();
        let parents: HashMap<u32, u32> = infos.iter().map(|(p, i)| (*p, i.ppid)).collect();
        let mut found = Vec::new();
        for (pid, info) in &infos {
            if let Some(t) = self.targets.match_process(info) {
                found.push((*pid, Join::Matched(t)));
            }
        }
        // Matched here (configured targets), for their descendants.
        let mut direct: HashMap<u32, TargetId> = found
            .iter()
            .filter_map(|(p, j)| match j {
                Join::Matched(t) => Some((*p, *t)),
                Join::Inherited(_) => None,
            })
            .collect();
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
                // A tracked parent's kernel id (its pod's), or the target a parent matched.
                if let Some(&id) = self.tracked.get(&parent) {
                    found.push((pid, Join::Inherited(id)));
                    break;
                }
                if let Some(&t) = direct.get(&parent) {
                    found.push((pid, Join::Matched(t)));
                    break;
                }
                cur = parent;
            }
        }
        for (pid, join) in found {
            if let Join::Matched(t) = join {
                direct.insert(pid, t);
            }
            self.add(pid, join, false, infos.get(&pid));
        }
    }

    /// Drops processes of pod-selected targets whose pod left the kubelet's list (or stopped
    /// matching, e.g. a label changed), unless they inherit the target from a tracked parent.
    fn revalidate_pods(&mut self) {
        let targets = self.targets.clone();
        self.drop_unmatched(|t| t.is_some_and(|t| targets.selects_pods(t)));
    }

    /// Drops tracked processes that no longer belong to their target: its selectors no longer
    /// match them, nor do they inherit it from a tracked parent, or the target was removed.
    /// Repeated until nothing changes, so the children of a process that left leave too. Only
    /// processes whose target (None: removed) `check` selects are looked at.
    fn drop_unmatched(&mut self, check: impl Fn(Option<TargetId>) -> bool) {
        loop {
            let candidates: Vec<(u32, TargetId, Option<TargetId>)> = self
                .tracked
                .iter()
                .map(|(p, id)| (*p, *id, self.targets.target_of_id(*id)))
                .filter(|(_, _, t)| check(*t))
                .collect();
            let mut gone = Vec::new();
            for (pid, id, target) in candidates {
                let still = match target {
                    None => false,
                    // A process that died is the next scan's to remove.
                    Some(target) => self.read(pid).is_none_or(|info| {
                        self.targets.matches(target, &info)
                            || self.tracked.get(&info.ppid) == Some(&id)
                    }),
                };
                if !still {
                    gone.push((pid, target));
                }
            }
            if gone.is_empty() {
                return;
            }
            for (pid, target) in gone {
                tracing::info!(
                    pid,
                    target = target.and_then(|t| self.targets.name(t)),
                    "process left its target: it no longer matches (its pod is gone, a label \
                     changed, or the target list was reloaded)"
                );
                self.remove(pid, false);
            }
        }
    }

    /// Applies a new target list: kept targets keep their kernel ids (and numbers), removed
    /// ones lose their processes and series, new ones gain theirs; the probes never stop.
    pub fn reload(&mut self, new: Vec<Target>) -> Result<Reloaded, ReloadError> {
        let before = self.targets.list();
        if self.kube.is_none()
            && new.iter().any(|t| {
                t.selectors
                    .iter()
                    .any(|s| matches!(s, crate::targets::Selector::Pod(_)))
            })
        {
            tracing::warn!(
                "a reloaded target selects pods but [kubernetes] was off at start: it matches \
                 nothing until the agent restarts with kubernetes.enabled"
            );
        }
        let reloaded = self.targets.reload(new)?;
        // The processes of unchanged targets stay as they are (an orphaned child that inherited
        // its target matches no selector, yet belongs to it).
        let changed: Vec<TargetId> = self
            .targets
            .list()
            .into_iter()
            .filter(|(_, t)| reloaded.changed.contains(&t.name))
            .map(|(id, _)| id)
            .collect();
        self.drop_unmatched(|t| t.is_none_or(|t| changed.contains(&t)));
        for (id, t) in before {
            if reloaded.removed.contains(&t.name) {
                self.gauge.remove(&TargetLabels::of(&t.name));
                self.counts[id as usize] = 0;
            }
        }
        for (id, _) in self.targets.list() {
            self.publish(id);
        }
        self.scan();
        Ok(reloaded)
    }

    /// Applies one kernel event.
    pub fn handle(&mut self, ev: &ProcEvent) {
        match ev.kind {
            EVENT_EXEC if !self.tracked.contains_key(&ev.tgid) => {
                let Some(info) = self.read(ev.tgid) else {
                    return;
                };
                if let Some(t) = self.targets.match_process(&info) {
                    self.add(ev.tgid, Join::Matched(t), false, Some(&info));
                }
            }
            EVENT_FORK if ev.target != NO_TARGET && ev.target < agent_common::MAX_TARGETS => {
                // A child runs in its parent's pod: no /proc read unless Kubernetes is on.
                let info = self.kube.as_ref().and_then(|_| self.read(ev.tgid));
                self.add(ev.tgid, Join::Inherited(ev.target), true, info.as_ref());
            }
            EVENT_EXIT => self.remove(ev.tgid, true),
            _ => {}
        }
    }

    /// Follows kernel events and rescans periodically, until the task is dropped.
    pub async fn run(
        mut self,
        events: Option<RingBuf<MapData>>,
        rescan: Duration,
        mut reloads: mpsc::Receiver<ReloadRequest>,
    ) {
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
        let changed = self.kube.as_ref().map(|k| k.changed.clone());
        loop {
            tokio::select! {
                _ = ticker.tick() => self.scan(),
                Some((targets, reply)) = reloads.recv() => {
                    let _ = reply.send(self.reload(targets));
                }
                // A new pod list: pods that started or left are applied now, not at the next tick.
                _ = async { changed.as_ref().expect("guarded").notified().await }, if changed.is_some() => self.scan(),
                ready = async { events.as_mut().expect("guarded").readable_mut().await }, if events.is_some() => {
                    let Ok(mut guard) = ready else { break };
                    let mut batch = Vec::new();
                    {
                        let ring = guard.get_inner_mut();
                        while let Some(item) = ring.next() {
                            batch.extend(crate::ebpf::ring_record::<ProcEvent>(&item));
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
    fn a_reload_keeps_the_orphaned_children_of_unchanged_targets() {
        use std::io::BufRead as _;
        // sh starts a sleep and exits a moment later: the sleep is then an orphan that only
        // belongs to the target by inheritance.
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; sleep 0.5"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(sh.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let orphan: u32 = line.trim().parse().unwrap();
        let me = format!("pid:{}", std::process::id());
        let mut t = tracker(&[&me]);
        t.scan();
        assert!(
            t.tracked().contains_key(&orphan),
            "the sleep is not inherited"
        );
        sh.wait().unwrap();
        let same: Vec<Target> = t
            .targets
            .list()
            .iter()
            .map(|(_, x)| (**x).clone())
            .collect();
        let r = t.reload(same).unwrap();
        assert_eq!(r.unchanged, ["t"]);
        assert!(
            t.tracked().contains_key(&orphan),
            "a no-op reload dropped an orphan"
        );
        // New selectors re-match the target's processes: the orphan matches none of them.
        let r = t
            .reload(vec![Target {
                name: "t".into(),
                selectors: vec![me.parse().unwrap(), "comm:^no-such$".parse().unwrap()],
            }])
            .unwrap();
        assert_eq!(r.changed, ["t"]);
        assert!(!t.tracked().contains_key(&orphan));
        assert!(t.tracked().contains_key(&std::process::id()));
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(orphan as i32, libc::SIGKILL) };
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
