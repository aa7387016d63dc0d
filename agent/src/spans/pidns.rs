//! Spans from containers. Inside a container the SDK's `process.pid` and a span's `thread.id`
//! are ids in the container's PID namespace, not the host's: 1 is the container's first
//! process, not init. When the resource says which container (`container.id`, from the SDKs'
//! container detectors) or pod (`k8s.pod.uid`, e.g. from the downward API through
//! OTEL_RESOURCE_ATTRIBUTES) the span comes from, its process is the tracked process in that
//! container or pod whose innermost namespace pid (`NSpid` in /proc/PID/status) is
//! `process.pid`. The map is rebuilt from /proc at most once a second, on a miss.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::tracker::SharedTracked;

/// Which container or pod a span's resource names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    Container(String),
    Pod(String),
}

/// The innermost (own namespace's) pid from the content of /proc/PID/status.
fn ns_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// (container or pod, pid in its namespace) -> host pid, for tracked processes.
pub struct HostIds {
    tracked: SharedTracked,
    map: HashMap<(Owner, u32), u32>,
    rebuilt: Option<Instant>,
}

const REBUILD_AT_MOST_EVERY: Duration = Duration::from_secs(1);

impl HostIds {
    pub fn new(tracked: SharedTracked) -> Self {
        Self {
            tracked,
            map: HashMap::new(),
            rebuilt: None,
        }
    }

    /// The host pid of the process `pid` (in its namespace) of `owner`, if tracked.
    pub fn host_pid(&mut self, owner: &Owner, pid: u32) -> Option<u32> {
        let key = (owner.clone(), pid);
        if let Some(&host) = self.map.get(&key) {
            return Some(host);
        }
        if self
            .rebuilt
            .is_some_and(|t| t.elapsed() < REBUILD_AT_MOST_EVERY)
        {
            return None;
        }
        self.rebuild();
        self.map.get(&key).copied()
    }

    fn rebuild(&mut self) {
        self.rebuilt = Some(Instant::now());
        self.map.clear();
        let pids: Vec<u32> = self
            .tracked
            .read()
            .map(|t| t.keys().copied().collect())
            .unwrap_or_default();
        for host in pids {
            let (Ok(cgroups), Ok(status)) = (
                std::fs::read_to_string(format!("/proc/{host}/cgroup")),
                std::fs::read_to_string(format!("/proc/{host}/status")),
            ) else {
                continue;
            };
            let Some(inner) = ns_pid(&status) else {
                continue;
            };
            if let Some(id) = crate::kube::container_id(&cgroups) {
                self.map.insert((Owner::Container(id), inner), host);
            }
            if let Some(c) = crate::kube::container_of(&cgroups) {
                self.map.insert((Owner::Pod(c.pod_uid), inner), host);
            }
        }
    }
}

/// The host tid of thread `tid` (in its namespace) of host process `host_pid`.
pub fn host_tid(host_pid: u32, tid: u32) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{host_pid}/task"))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|t| {
            std::fs::read_to_string(format!("/proc/{host_pid}/task/{t}/status"))
                .ok()
                .and_then(|s| ns_pid(&s))
                == Some(tid)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_namespace_pid() {
        assert_eq!(ns_pid("Name:\tpython3\nNSpid:\t48213\t1\n"), Some(1));
        assert_eq!(ns_pid("NSpid:\t777\n"), Some(777));
        assert_eq!(ns_pid("Name:\tx\n"), None);
        // This process, in the host's namespace: its own pid.
        let me = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(ns_pid(&me), Some(std::process::id()));
    }
}
