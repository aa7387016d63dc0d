//! Targets: named sets of processes, chosen by selectors, and the process facts they match on.
//!
//! A process matches a target when any of the target's selectors matches it (OR). Targets are
//! tried in configuration order and the first match wins, so a process is in at most one target.
//! Children of a matched process belong to its target whatever they run; that inheritance is
//! applied by the tracker, not here.
use std::{fmt, path::Path, str::FromStr};

use regex::Regex;
use thiserror::Error;

use std::sync::Arc;

use crate::{instances::Instances, kube::PodRef, metrics::TargetLabels};

/// Index of a target in the configuration; the id the kernel side stores per tracked process.
pub type TargetId = u32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error(
        "selector `{input}` has no kind: write KIND:VALUE with KIND one of comm, cmdline, pid, cgroup, k8s"
    )]
    NoKind { input: String },
    #[error(
        "unknown selector kind `{kind}` in `{input}`{hint}: expected comm, cmdline, pid, cgroup or k8s"
    )]
    UnknownKind {
        kind: String,
        input: String,
        hint: String,
    },
    #[error("invalid regex in selector `{input}`: {reason}")]
    BadRegex { input: String, reason: String },
    #[error("invalid pid in selector `{input}`: expected a positive integer")]
    BadPid { input: String },
    #[error(
        "invalid cgroup selector `{input}`: the prefix must be an absolute cgroup path like /kubepods.slice"
    )]
    BadCgroup { input: String },
    #[error(
        "invalid Kubernetes selector `{input}`: {reason}; write k8s:namespace=NS,pod=REGEX,label.KEY=VALUE,container=NAME (any of them, all must match)"
    )]
    BadPod { input: String, reason: String },
}

/// Pods of the node by Kubernetes identity; every given field must match.
#[derive(Clone, Default)]
pub struct PodSelector {
    pub namespace: Option<String>,
    /// Regex searched in the pod name.
    pub pod: Option<Regex>,
    pub labels: Vec<(String, String)>,
    pub container: Option<String>,
}

impl PodSelector {
    fn matches(&self, r: &PodRef) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|n| *n == r.pod.namespace)
            && self.pod.as_ref().is_none_or(|re| re.is_match(&r.pod.name))
            && self.container.as_ref().is_none_or(|c| *c == r.container)
            && self
                .labels
                .iter()
                .all(|(k, v)| r.pod.labels.get(k) == Some(v))
    }

    /// From its fields; `input` names the selector in errors.
    pub fn new(
        input: &str,
        namespace: Option<String>,
        pod: Option<&str>,
        labels: Vec<(String, String)>,
        container: Option<String>,
    ) -> Result<Self, SelectorError> {
        let bad = |reason: String| SelectorError::BadPod {
            input: input.to_owned(),
            reason,
        };
        if namespace.is_none() && pod.is_none() && container.is_none() && labels.is_empty() {
            return Err(bad("it selects nothing".into()));
        }
        let pod = pod
            .map(|p| {
                Regex::new(p).map_err(|e| {
                    bad(format!(
                        "invalid pod regex: {}",
                        e.to_string().lines().last().unwrap_or_default().trim()
                    ))
                })
            })
            .transpose()?;
        Ok(Self {
            namespace,
            pod,
            labels,
            container,
        })
    }

    /// From `namespace=NS,pod=REGEX,label.KEY=VALUE,container=NAME`.
    fn parse(input: &str, value: &str) -> Result<Self, SelectorError> {
        let bad = |reason: String| SelectorError::BadPod {
            input: input.to_owned(),
            reason,
        };
        let (mut namespace, mut pod, mut labels, mut container) = (None, None, Vec::new(), None);
        for part in value.split(',').filter(|p| !p.is_empty()) {
            let (key, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}` is not KEY=VALUE")))?;
            match key {
                "namespace" => namespace = Some(v.to_owned()),
                "pod" => pod = Some(v),
                "container" => container = Some(v.to_owned()),
                _ => match key.strip_prefix("label.") {
                    Some(k) if !k.is_empty() => labels.push((k.to_owned(), v.to_owned())),
                    _ => {
                        return Err(bad(format!(
                            "unknown key `{key}`{}",
                            did_you_mean(key, &["namespace", "pod", "container", "label.KEY"])
                        )));
                    }
                },
            }
        }
        Self::new(input, namespace, pod, labels, container)
    }
}

impl fmt::Display for PodSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = &self.namespace {
            parts.push(format!("namespace={n}"));
        }
        if let Some(p) = &self.pod {
            parts.push(format!("pod={}", p.as_str()));
        }
        for (k, v) in &self.labels {
            parts.push(format!("label.{k}={v}"));
        }
        if let Some(c) = &self.container {
            parts.push(format!("container={c}"));
        }
        f.write_str(&parts.join(","))
    }
}

#[derive(Clone)]
pub enum Selector {
    /// Regex searched in `/proc/PID/comm` (the 15-character task name).
    Comm(Regex),
    /// Regex searched in the command line, arguments joined with single spaces.
    Cmdline(Regex),
    Pid(u32),
    /// Cgroup v2 path prefix, matched on whole path components.
    Cgroup(String),
    /// Kubernetes pod identity (needs `[kubernetes]`).
    Pod(PodSelector),
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Comm(r) => write!(f, "comm:{}", r.as_str()),
            Selector::Cmdline(r) => write!(f, "cmdline:{}", r.as_str()),
            Selector::Pid(p) => write!(f, "pid:{p}"),
            Selector::Cgroup(c) => write!(f, "cgroup:{c}"),
            Selector::Pod(p) => write!(f, "k8s:{p}"),
        }
    }
}

const KINDS: [&str; 5] = ["comm", "cmdline", "pid", "cgroup", "k8s"];

/// " (did you mean `x`?)" when `word` is close to one of `known`, else "".
pub fn did_you_mean(word: &str, known: &[&str]) -> String {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(word, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}

impl Selector {
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        let input = format!("{kind}:{value}");
        let regex = |v: &str| {
            Regex::new(v).map_err(|e| SelectorError::BadRegex {
                input: input.clone(),
                reason: e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            })
        };
        match kind {
            "comm" => Ok(Selector::Comm(regex(value)?)),
            "cmdline" => Ok(Selector::Cmdline(regex(value)?)),
            "pid" => match value.trim().parse::<u32>() {
                Ok(pid) if pid > 0 => Ok(Selector::Pid(pid)),
                _ => Err(SelectorError::BadPid { input }),
            },
            "cgroup" => {
                if !value.starts_with('/') {
                    return Err(SelectorError::BadCgroup { input });
                }
                let trimmed = value.trim_end_matches('/');
                Ok(Selector::Cgroup(if trimmed.is_empty() {
                    "/".into()
                } else {
                    trimmed.into()
                }))
            }
            "k8s" => Ok(Selector::Pod(PodSelector::parse(&input, value)?)),
            other => Err(SelectorError::UnknownKind {
                kind: other.to_owned(),
                hint: did_you_mean(other, &KINDS),
                input,
            }),
        }
    }

    pub fn matches(&self, p: &ProcessInfo) -> bool {
        match self {
            Selector::Comm(r) => r.is_match(&p.comm),
            Selector::Cmdline(r) => r.is_match(&p.cmdline),
            Selector::Pid(pid) => *pid == p.pid,
            Selector::Cgroup(prefix) => {
                prefix == "/"
                    || p.cgroup
                        .strip_prefix(prefix.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Selector::Pod(sel) => p.pod.as_ref().is_some_and(|r| sel.matches(r)),
        }
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s.split_once(':').ok_or_else(|| SelectorError::NoKind {
            input: s.to_owned(),
        })?;
        Selector::new(kind, value)
    }
}

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub selectors: Vec<Selector>,
}

/// The configured targets. Each has a kernel id ([`TargetId`]) for as long as it is configured:
/// at start the targets take ids in configuration order, pods the ids after them
/// (`crate::instances`). A reload ([`TargetSet::reload`]) keeps the id of every target it keeps
/// (matched by name), gives a new target a free id, and retires a removed target's id the way
/// a gone pod's is retired, so a target that later takes it starts from zero.
#[derive(Debug, Default)]
pub struct TargetSet {
    table: std::sync::RwLock<Table>,
    instances: Arc<Instances>,
}

#[derive(Debug, Default, Clone)]
struct Table {
    /// Indexed by kernel id; None where no configured target has that id.
    by_id: Vec<Option<Arc<Target>>>,
    /// Ids in configuration order: the order processes are matched in.
    order: Vec<TargetId>,
}

/// What a reload changed, by target name.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Kept, with other selectors.
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReloadError {
    #[error(
        "no free target id for {wanted} new targets ({free} free of {max}, the others held by \
         targets and pods); remove targets or restart the agent"
    )]
    NoFreeIds {
        wanted: usize,
        free: usize,
        max: u32,
    },
}

impl Clone for TargetSet {
    fn clone(&self) -> Self {
        Self {
            table: std::sync::RwLock::new(self.table().clone()),
            instances: self.instances.clone(),
        }
    }
}

impl TargetSet {
    pub fn new(targets: Vec<Target>) -> Self {
        let instances = Arc::new(Instances::new(targets.len() as u32));
        let order = (0..targets.len() as TargetId).collect();
        let by_id = targets.into_iter().map(|t| Some(Arc::new(t))).collect();
        Self {
            table: std::sync::RwLock::new(Table { by_id, order }),
            instances,
        }
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn target(&self, id: TargetId) -> Option<Arc<Target>> {
        self.table().by_id.get(id as usize).cloned().flatten()
    }

    /// Replaces the configured targets with `new`, keeping the id of each target whose name
    /// stays. Nothing changes when the new targets cannot all have an id.
    pub fn reload(&self, new: Vec<Target>) -> Result<Reloaded, ReloadError> {
        let mut table = self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let id_of = |t: &Table, name: &str| {
            t.order.iter().copied().find(|id| {
                t.by_id[*id as usize]
                    .as_ref()
                    .is_some_and(|x| x.name == name)
            })
        };
        let wanted = new
            .iter()
            .filter(|t| id_of(&table, &t.name).is_none())
            .count();
        let free = self.instances.free();
        if wanted > free {
            return Err(ReloadError::NoFreeIds {
                wanted,
                free,
                max: agent_common::MAX_TARGETS,
            });
        }
        let mut out = Reloaded::default();
        let mut order = Vec::with_capacity(new.len());
        for t in new {
            let id = match id_of(&table, &t.name) {
                Some(id) => {
                    let old = table.by_id[id as usize].as_ref().expect("found by name");
                    let same = old
                        .selectors
                        .iter()
                        .map(ToString::to_string)
                        .eq(t.selectors.iter().map(ToString::to_string));
                    if same {
                        &mut out.unchanged
                    } else {
                        &mut out.changed
                    }
                    .push(t.name.clone());
                    id
                }
                None => {
                    let id = self.instances.acquire_target().expect("counted free above");
                    out.added.push(t.name.clone());
                    id
                }
            };
            if table.by_id.len() <= id as usize {
                table.by_id.resize(id as usize + 1, None);
            }
            table.by_id[id as usize] = Some(Arc::new(t));
            order.push(id);
        }
        for id in std::mem::replace(&mut table.order, order.clone()) {
            if !order.contains(&id)
                && let Some(t) = table.by_id[id as usize].take()
            {
                self.instances.retire_target(id);
                out.removed.push(t.name.clone());
            }
        }
        Ok(out)
    }

    /// The kernel ids of pods.
    pub fn instances(&self) -> &Instances {
        &self.instances
    }

    /// The configured target of kernel id `id` (a target's own, or a pod's).
    pub fn target_of_id(&self, id: TargetId) -> Option<TargetId> {
        if self.target(id).is_some() {
            return Some(id);
        }
        self.instances
            .pod(id)
            .map(|(t, _)| t)
            .filter(|t| self.target(*t).is_some())
    }

    /// The labels of kernel id `id`: its target's name, and a pod's identity.
    pub fn labels(&self, id: TargetId) -> Option<TargetLabels> {
        if let Some(t) = self.target(id) {
            return Some(TargetLabels::of(&t.name));
        }
        let (t, pod) = self.instances.pod(id)?;
        Some(TargetLabels {
            target: self.target(t)?.name.clone(),
            pod: Some(pod),
        })
    }

    /// Every kernel id with numbers to export now: the targets' own, then live pods'.
    pub fn ids(&self) -> Vec<(TargetId, TargetLabels)> {
        let own = self.table().order.clone();
        own.into_iter()
            .chain(self.instances.live())
            .filter_map(|id| Some((id, self.labels(id)?)))
            .collect()
    }

    /// How many targets are configured.
    pub fn len(&self) -> usize {
        self.table().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured targets with their ids, in configuration order.
    pub fn list(&self) -> Vec<(TargetId, Arc<Target>)> {
        let t = self.table();
        t.order
            .iter()
            .filter_map(|id| Some((*id, t.by_id.get(*id as usize)?.clone()?)))
            .collect()
    }

    /// The name of kernel id `id`'s target.
    pub fn name(&self, id: TargetId) -> Option<String> {
        let t = self.target_of_id(id)?;
        self.target(t).map(|t| t.name.clone())
    }

    /// Whether target `id` has a Kubernetes pod selector.
    pub fn selects_pods(&self, id: TargetId) -> bool {
        self.target(id)
            .is_some_and(|t| t.selectors.iter().any(|s| matches!(s, Selector::Pod(_))))
    }

    /// Whether a selector of target `id` matches `p`.
    pub fn matches(&self, id: TargetId, p: &ProcessInfo) -> bool {
        self.target(id)
            .is_some_and(|t| t.selectors.iter().any(|s| s.matches(p)))
    }

    /// The first target with a selector matching `p`.
    pub fn match_process(&self, p: &ProcessInfo) -> Option<TargetId> {
        self.list()
            .into_iter()
            .find(|(_, t)| t.selectors.iter().any(|s| s.matches(p)))
            .map(|(id, _)| id)
    }
}

/// What selectors match on, read from `/proc/PID`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub cmdline: String,
    pub cgroup: String,
    /// `/proc/PID/cgroup` as read (every hierarchy), for the pod lookup.
    pub cgroups: String,
    /// The process's pod, filled in by the tracker when `[kubernetes]` is on.
    pub pod: Option<PodRef>,
}

impl ProcessInfo {
    /// Reads the process's facts; `None` if it exited meanwhile (or is a kernel thread).
    pub fn read(proc_root: &Path, pid: u32) -> Option<Self> {
        let dir = proc_root.join(pid.to_string());
        // A task name is any bytes (prctl PR_SET_NAME): read both files as bytes.
        let stat = String::from_utf8_lossy(&std::fs::read(dir.join("stat")).ok()?).into_owned();
        // comm may contain spaces and parentheses: the fields after it follow the last ')'.
        let after = &stat[stat.rfind(')')? + 2..];
        let ppid = after.split(' ').nth(1)?.parse().ok()?;
        let comm = String::from_utf8_lossy(&std::fs::read(dir.join("comm")).ok()?)
            .trim_end_matches('\n')
            .to_owned();
        let raw = std::fs::read(dir.join("cmdline")).ok()?;
        let cmdline = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" ");
        let cgroups = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        Some(Self {
            pid,
            ppid,
            comm,
            cmdline,
            cgroup: parse_cgroup(&cgroups),
            cgroups,
            pod: None,
        })
    }
}

/// The cgroup v2 path from `/proc/PID/cgroup` (the `0::` line), else the first hierarchy's path.
fn parse_cgroup(content: &str) -> String {
    let path_of = |line: &str| line.splitn(3, ':').nth(2).map(str::to_owned);
    content
        .lines()
        .find(|l| l.starts_with("0::"))
        .and_then(path_of)
        .or_else(|| content.lines().next().and_then(path_of))
        .unwrap_or_default()
}

/// Pids of all processes under `proc_root`.
pub fn list_pids(proc_root: &Path) -> std::io::Result<Vec<u32>> {
    Ok(std::fs::read_dir(proc_root)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(pid: u32, comm: &str, cmdline: &str, cgroup: &str) -> ProcessInfo {
        ProcessInfo {
            pid,
            ppid: 1,
            comm: comm.into(),
            cmdline: cmdline.into(),
            cgroup: cgroup.into(),
            ..Default::default()
        }
    }

    #[test]
    fn selectors_parse_and_match() {
        let p = proc(
            42,
            "python3",
            "python3 -m stt_service --port 9000",
            "/kubepods.slice/pod-a/cri-x",
        );
        assert!("comm:^python".parse::<Selector>().unwrap().matches(&p));
        assert!(
            "cmdline:stt_service"
                .parse::<Selector>()
                .unwrap()
                .matches(&p)
        );
        assert!(
            !"cmdline:tts_service"
                .parse::<Selector>()
                .unwrap()
                .matches(&p)
        );
        assert!("pid:42".parse::<Selector>().unwrap().matches(&p));
        assert!(
            "cgroup:/kubepods.slice/pod-a"
                .parse::<Selector>()
                .unwrap()
                .matches(&p)
        );
        assert!(
            "cgroup:/kubepods.slice/pod-a/"
                .parse::<Selector>()
                .unwrap()
                .matches(&p)
        );
        // Whole components only.
        assert!(
            !"cgroup:/kubepods.slice/pod"
                .parse::<Selector>()
                .unwrap()
                .matches(&p)
        );
        assert!("cgroup:/".parse::<Selector>().unwrap().matches(&p));
    }

    #[test]
    fn selector_errors_say_what_is_wrong() {
        assert!(matches!(
            "python".parse::<Selector>(),
            Err(SelectorError::NoKind { .. })
        ));
        let err = "comand:x".parse::<Selector>().unwrap_err().to_string();
        assert!(
            err.contains("`comand`") && err.contains("did you mean `comm`"),
            "{err}"
        );
        let err = "comm:(".parse::<Selector>().unwrap_err().to_string();
        assert!(
            err.contains("invalid regex") && err.contains("comm:("),
            "{err}"
        );
        assert!(matches!(
            "pid:0".parse::<Selector>(),
            Err(SelectorError::BadPid { .. })
        ));
        assert!(matches!(
            "pid:abc".parse::<Selector>(),
            Err(SelectorError::BadPid { .. })
        ));
        assert!(matches!(
            "cgroup:kubepods".parse::<Selector>(),
            Err(SelectorError::BadCgroup { .. })
        ));
    }

    #[test]
    fn pod_selectors_match_every_field_and_refuse_bad_input() {
        let pod = |ns: &str, name: &str, app: &str, container: &str| ProcessInfo {
            pod: Some(PodRef {
                pod: std::sync::Arc::new(crate::kube::Pod {
                    namespace: ns.into(),
                    name: name.into(),
                    labels: [("app".to_owned(), app.to_owned())].into(),
                    ..Default::default()
                }),
                container: container.into(),
            }),
            ..Default::default()
        };
        let sel: Selector = "k8s:namespace=speech,pod=^stt-,label.app=stt,container=server"
            .parse()
            .unwrap();
        assert!(sel.matches(&pod("speech", "stt-7d9f", "stt", "server")));
        assert!(!sel.matches(&pod("other", "stt-7d9f", "stt", "server")));
        assert!(!sel.matches(&pod("speech", "tts-1", "stt", "server")));
        assert!(!sel.matches(&pod("speech", "stt-7d9f", "tts", "server")));
        assert!(!sel.matches(&pod("speech", "stt-7d9f", "stt", "sidecar")));
        assert!(!sel.matches(&ProcessInfo::default()), "not in a pod");
        assert_eq!(
            sel.to_string(),
            "k8s:namespace=speech,pod=^stt-,label.app=stt,container=server"
        );
        for (bad, says) in [
            ("k8s:", "selects nothing"),
            ("k8s:namespace", "not KEY=VALUE"),
            ("k8s:namesapce=x", "did you mean `namespace`"),
            ("k8s:pod=(", "invalid pod regex"),
            ("k8s:label.=x", "unknown key `label.`"),
        ] {
            let e = bad.parse::<Selector>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn first_matching_target_wins() {
        let set = TargetSet::new(vec![
            Target {
                name: "stt".into(),
                selectors: vec!["cmdline:stt".parse().unwrap()],
            },
            Target {
                name: "py".into(),
                selectors: vec!["comm:x".parse().unwrap(), "comm:python".parse().unwrap()],
            },
        ]);
        assert_eq!(
            set.match_process(&proc(1, "python3", "python3 stt.py", "/")),
            Some(0)
        );
        assert_eq!(
            set.match_process(&proc(1, "python3", "python3 mt.py", "/")),
            Some(1)
        );
        assert_eq!(set.match_process(&proc(1, "bash", "bash", "/")), None);
        assert_eq!(set.name(1).as_deref(), Some("py"));
    }

    fn target(name: &str, sel: &str) -> Target {
        Target {
            name: name.into(),
            selectors: vec![sel.parse().unwrap()],
        }
    }

    #[test]
    fn a_reload_keeps_ids_by_name_and_retires_removed_ones() {
        let set = TargetSet::new(vec![target("stt", "comm:stt"), target("mt", "comm:mt")]);
        set.instances().add_collector(crate::instances::CLEAR_SCHED);
        let r = set
            .reload(vec![target("mt", "comm:mt2"), target("tts", "comm:tts")])
            .unwrap();
        assert_eq!(r.added, ["tts"]);
        assert_eq!(r.removed, ["stt"]);
        assert_eq!(r.changed, ["mt"]);
        let ids: Vec<(TargetId, String)> = set
            .list()
            .into_iter()
            .map(|(id, t)| (id, t.name.clone()))
            .collect();
        // mt keeps 1; stt's 0 is retired, not reused: tts takes the first free id.
        assert_eq!(ids, [(1, "mt".into()), (2, "tts".into())]);
        assert_eq!(set.name(0), None);
        assert_eq!(set.target_of_id(0), None);
        assert!(set.ids().iter().all(|(id, _)| *id != 0));
        // Configuration order decides matching: mt2 now matches mt.
        assert_eq!(set.match_process(&proc(5, "mt2", "mt2", "/")), Some(1));
        assert_eq!(set.match_process(&proc(5, "stt", "stt", "/")), None);
        // Once the collector zeroed it, id 0 is free for the next new target.
        assert_eq!(
            set.instances().take_retired(crate::instances::CLEAR_SCHED),
            [0]
        );
        let r = set
            .reload(vec![target("stt", "comm:stt"), target("mt", "comm:mt2")])
            .unwrap();
        assert_eq!(
            (r.added.as_slice(), r.unchanged.as_slice()),
            (&["stt".to_owned()][..], &["mt".to_owned()][..])
        );
        assert_eq!(set.list()[0].0, 0, "stt is back on the zeroed id");
    }

    #[test]
    fn a_reload_without_free_ids_changes_nothing() {
        let set = TargetSet::new(vec![target("a", "comm:a")]);
        let many: Vec<Target> = (0..agent_common::MAX_TARGETS + 1)
            .map(|i| target(&format!("t{i}"), "comm:x"))
            .collect();
        let e = set.reload(many).unwrap_err();
        assert!(e.to_string().contains("no free target id"), "{e}");
        assert_eq!(set.list().len(), 1);
        assert_eq!(set.name(0).as_deref(), Some("a"));
    }

    #[test]
    fn cgroup_file_parsing() {
        assert_eq!(
            parse_cgroup("0::/system.slice/x.service\n"),
            "/system.slice/x.service"
        );
        assert_eq!(parse_cgroup("12:cpu,cpuacct:/kubepods/pod1\n0::/\n"), "/");
        assert_eq!(
            parse_cgroup("12:cpu,cpuacct:/kubepods/pod1\n"),
            "/kubepods/pod1"
        );
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let info = ProcessInfo::read(Path::new("/proc"), me).expect("own /proc entry");
        assert_eq!(info.pid, me);
        assert_eq!(info.ppid, std::os::unix::process::parent_id());
        assert!(!info.comm.is_empty() && !info.cmdline.is_empty());
        assert!(list_pids(Path::new("/proc")).unwrap().contains(&me));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any `--target` selector text parses or is refused saying what was given.
        #[test]
        fn any_selector_text_parses_or_names_itself(text in "\\PC{0,80}") {
            if let Err(e) = text.parse::<Selector>() {
                let msg = e.to_string();
                proptest::prop_assert!(msg.contains(&format!("`{text}`")) || msg.contains("k8s:"), "{msg}");
            }
        }

        /// Kubernetes selectors of any shape, too.
        #[test]
        fn any_k8s_selector_parses_or_is_refused(text in "k8s:[a-z.=,^$()*-]{0,40}") {
            let _ = text.parse::<Selector>();
        }
    }
}
