//! Kubernetes pod identity for targets, resolved on the node: process -> cgroup path -> (pod
//! uid, container id) -> pod, container and labels from the kubelet's pod list.
//!
//! The list is fetched from the kubelet's read-only API (`GET /pods`, the node's own pods) on a
//! thread of its own every `refresh` and kept in memory: matching a process reads the cache and
//! never queries per event. A kubelet that stops answering keeps the last list (pods do not
//! vanish because the API is down) and shows in `pipeprobe_kubelet_up 0`. With `[kubernetes]`
//! off none of this runs.
use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, LazyLock, RwLock},
    time::Duration,
};

use prometheus_client::{encoding::EncodeLabelSet, metrics::gauge::Gauge};
use regex::Regex;
use serde::Deserialize;
use thiserror::Error;

/// Largest pod list read from the kubelet (110 pods per node by default make a few MB).
const MAX_POD_LIST_BYTES: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum KubeError {
    #[error("cannot reach the kubelet at {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("the kubelet at {url} answered HTTP {status}{hint}")]
    Status {
        url: String,
        status: u16,
        hint: &'static str,
    },
    #[error("unreadable pod list from the kubelet at {url}: {reason}")]
    Decode { url: String, reason: String },
    #[error("cannot read the kubelet {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no PEM certificate in the kubelet CA file {path}")]
    NoCa { path: PathBuf },
}

/// `[kubernetes]`.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// Base URL of the kubelet API, e.g. `https://10.0.0.5:10250`.
    pub kubelet_url: String,
    /// Bearer token file, read at every refresh (projected tokens rotate); none for no token.
    pub token_path: Option<PathBuf>,
    /// CA bundle the kubelet's serving certificate is checked against.
    pub ca_path: Option<PathBuf>,
    /// Kubelets often serve a self-signed certificate (no serverTLSBootstrap): the
    /// metrics-server's `--kubelet-insecure-tls` choice, off by default.
    pub insecure_skip_tls_verify: bool,
    pub refresh: Duration,
    /// Most `pipeprobe_target_pod_info` series.
    pub max_pod_series: usize,
    /// Each pod of a target counted apart, its series labelled with namespace, pod, container.
    pub pod_labels: bool,
}

/// Where a process runs, from its cgroup path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    pub pod_uid: String,
    pub container_id: String,
}

static POD_UID: LazyLock<Regex> = LazyLock::new(|| {
    // The pod component of kubepods cgroups: `pod<uid>` (cgroupfs driver) or
    // `kubepods-<qos>-pod<uid with _>.slice` (systemd driver).
    Regex::new(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
        .expect("static regex")
});
static CONTAINER_ID: LazyLock<Regex> = LazyLock::new(|| {
    // `<id>`, `cri-containerd-<id>.scope`, `docker-<id>.scope`, `crio-<id>.scope`.
    Regex::new(r"(?:^|[-:])([0-9a-f]{64})(?:\.scope)?$").expect("static regex")
});

/// The pod and container of a process from the content of `/proc/PID/cgroup` (any hierarchy:
/// cgroup v1, v2 or hybrid; any driver).
pub fn container_of(cgroup_file: &str) -> Option<ContainerRef> {
    cgroup_file.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        let pod = POD_UID.captures_iter(path).last()?;
        let after = &path[pod.get(0)?.end()..];
        let last = after.rsplit('/').next()?;
        let id = CONTAINER_ID.captures(last)?.get(1)?.as_str();
        Some(ContainerRef {
            pod_uid: pod[1].replace('_', "-"),
            container_id: id.to_owned(),
        })
    })
}

/// The container id of a process from `/proc/PID/cgroup`, in or out of Kubernetes (Docker,
/// containerd and CRI-O name the container's cgroup after it).
pub fn container_id(cgroup_file: &str) -> Option<String> {
    cgroup_file.lines().find_map(|line| {
        let last = line.splitn(3, ':').nth(2)?.rsplit('/').next()?;
        Some(CONTAINER_ID.captures(last)?.get(1)?.as_str().to_owned())
    })
}

/// A pod of the node, as the kubelet lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Container id -> container name.
    pub(crate) containers: HashMap<String, String>,
}

/// A process's pod and container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub pod: Arc<Pod>,
    /// Empty until the kubelet lists the container's id (it has just started).
    pub container: String,
}

/// The series key of `pipeprobe_target_pod_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub target: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl PodRef {
    pub fn labels(&self, target: &str) -> PodLabels {
        PodLabels {
            target: target.to_owned(),
            namespace: self.pod.namespace.clone(),
            pod: self.pod.name.clone(),
            container: self.container.clone(),
        }
    }
}

/// The node's pods by uid, as last listed.
#[derive(Debug, Default)]
pub struct Pods {
    by_uid: RwLock<HashMap<String, Arc<Pod>>>,
}

impl Pods {
    pub fn resolve(&self, c: &ContainerRef) -> Option<PodRef> {
        let pods = self.by_uid.read().ok()?;
        let pod = pods.get(&c.pod_uid)?.clone();
        let container = pod
            .containers
            .get(&c.container_id)
            .cloned()
            .unwrap_or_default();
        Some(PodRef { pod, container })
    }

    /// Replaces the list; true if it changed.
    fn replace(&self, new: HashMap<String, Arc<Pod>>) -> bool {
        let Ok(mut pods) = self.by_uid.write() else {
            return false;
        };
        if *pods == new {
            return false;
        }
        *pods = new;
        true
    }
}

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<ApiPod>,
}

#[derive(Deserialize)]
struct ApiPod {
    metadata: ApiMeta,
    #[serde(default)]
    status: ApiStatus,
}

#[derive(Deserialize)]
struct ApiMeta {
    name: String,
    namespace: String,
    uid: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ApiStatus {
    #[serde(default)]
    container_statuses: Vec<ApiContainer>,
    #[serde(default)]
    init_container_statuses: Vec<ApiContainer>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ApiContainer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiContainer {
    name: String,
    #[serde(rename = "containerID", default)]
    container_id: Option<String>,
}

/// Parses the kubelet's `/pods` answer (a core/v1 PodList).
pub fn parse_pod_list(body: &[u8]) -> Result<HashMap<String, Arc<Pod>>, serde_json::Error> {
    let list: PodList = serde_json::from_slice(body)?;
    Ok(list
        .items
        .into_iter()
        .map(|p| {
            let s = p.status;
            let containers = s
                .container_statuses
                .into_iter()
                .chain(s.init_container_statuses)
                .chain(s.ephemeral_container_statuses)
                .filter_map(|c| {
                    // `containerd://<id>`, `docker://<id>`, `cri-o://<id>`.
                    let id = c.container_id?;
                    let id = id.rsplit_once("://").map_or(id.as_str(), |(_, id)| id);
                    Some((id.to_owned(), c.name))
                })
                .collect();
            let pod = Pod {
                namespace: p.metadata.namespace,
                name: p.metadata.name,
                labels: p.metadata.labels,
                containers,
            };
            (p.metadata.uid, Arc::new(pod))
        })
        .collect())
}

/// The kubelet client: one agent (connection pool, TLS settings) for every refresh.
struct Kubelet {
    cfg: KubeConfig,
    agent: ureq::Agent,
    url: String,
}

impl Kubelet {
    fn new(cfg: KubeConfig) -> Result<Self, KubeError> {
        let mut tls = ureq::tls::TlsConfig::builder()
            .disable_verification(cfg.insecure_skip_tls_verify)
            // Kubelets are addressed by IP; their certificates name the node.
            .use_sni(false);
        if let Some(path) = cfg
            .ca_path
            .as_ref()
            .filter(|_| cfg.kubelet_url.starts_with("https://"))
        {
            let pem = std::fs::read(path).map_err(|source| KubeError::File {
                what: "CA file",
                path: path.clone(),
                source,
            })?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(KubeError::NoCa { path: path.clone() });
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .new_agent();
        let url = format!("{}/pods", cfg.kubelet_url.trim_end_matches('/'));
        Ok(Self { cfg, agent, url })
    }

    fn fetch(&self) -> Result<HashMap<String, Arc<Pod>>, KubeError> {
        let mut req = self.agent.get(&self.url);
        if let Some(path) = &self.cfg.token_path {
            let token = std::fs::read_to_string(path).map_err(|source| KubeError::File {
                what: "token",
                path: path.clone(),
                source,
            })?;
            req = req.header("Authorization", format!("Bearer {}", token.trim()));
        }
        let fetch = |reason: String| KubeError::Fetch {
            url: self.url.clone(),
            reason,
        };
        let mut resp = req.call().map_err(|e| fetch(e.to_string()))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(KubeError::Status {
                url: self.url.clone(),
                status,
                hint: match status {
                    401 => ": the token was refused (kubernetes.token_path)",
                    403 => {
                        ": the service account needs `get` on `nodes/proxy` (deploy/kubernetes has the ClusterRole)"
                    }
                    _ => "",
                },
            });
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_POD_LIST_BYTES)
            .read_to_vec()
            .map_err(|e| fetch(e.to_string()))?;
        parse_pod_list(&body).map_err(|e| KubeError::Decode {
            url: self.url.clone(),
            reason: e.to_string(),
        })
    }
}

/// Starts the refresh thread: fills `pods`, sets `up`, and wakes `changed` when the list
/// changed (the tracker then rescans). An error in the settings (CA file) is returned at once.
pub fn start(
    cfg: KubeConfig,
    pods: Arc<Pods>,
    changed: Arc<tokio::sync::Notify>,
    up: Gauge,
) -> Result<(), KubeError> {
    let kubelet = Kubelet::new(cfg)?;
    std::thread::Builder::new()
        .name("kubelet".into())
        .spawn(move || {
            let mut last_error: Option<String> = None;
            loop {
                match kubelet.fetch() {
                    Ok(list) => {
                        if last_error.take().is_some() {
                            tracing::info!(url = %kubelet.url, "the kubelet answers again");
                        }
                        tracing::debug!(pods = list.len(), "kubelet pod list");
                        up.set(1);
                        if pods.replace(list) {
                            changed.notify_one();
                        }
                    }
                    Err(e) => {
                        up.set(0);
                        // Once per distinct error: a kubelet down for hours logs one line.
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(&msg) {
                            tracing::warn!(
                                "{msg}; pod selectors use the last pod list (pipeprobe_kubelet_up 0)"
                            );
                            last_error = Some(msg);
                        }
                    }
                }
                std::thread::sleep(kubelet.cfg.refresh);
            }
        })
        .map_err(|e| KubeError::Fetch {
            url: String::new(),
            reason: format!("cannot start the kubelet thread: {e}"),
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b8c4e1a-3f2d-4c5b-9a7e-1d2c3b4a5f60";
    const ID: &str = "4f1c2b3a4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

    #[test]
    fn container_from_every_cgroup_layout() {
        let uid_ = UID.replace('-', "_");
        let layouts = [
            // systemd driver, cgroup v2, containerd.
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
            ),
            // Guaranteed QoS, CRI-O.
            format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope\n"),
            // cgroupfs driver, cgroup v1 (hybrid), docker.
            format!(
                "12:pids:/kubepods/besteffort/pod{UID}/{ID}\n1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n"
            ),
            // kind: kubelet inside a container.
            format!(
                "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
            ),
        ];
        for l in &layouts {
            assert_eq!(
                container_of(l),
                Some(ContainerRef {
                    pod_uid: UID.into(),
                    container_id: ID.into()
                }),
                "{l}"
            );
        }
        // Not in a pod; the pod's own cgroup (the pause process's parent) has no container.
        for l in [
            "0::/user.slice/user-0.slice/session-1.scope\n".to_owned(),
            format!("0::/kubepods.slice/kubepods-pod{uid_}.slice\n"),
        ] {
            assert_eq!(container_of(&l), None, "{l}");
        }
    }

    #[test]
    fn pod_list_in_the_kubelet_shape() {
        let body = format!(
            r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{}},"items":[
              {{"metadata":{{"name":"stt-0","namespace":"speech","uid":"{UID}","labels":{{"app":"stt"}}}},
                "spec":{{"containers":[{{"name":"server"}}]}},
                "status":{{"phase":"Running","containerStatuses":[{{"name":"server","containerID":"containerd://{ID}","ready":true}}],
                           "initContainerStatuses":[{{"name":"fetch-model","containerID":"containerd://{}"}}]}}}},
              {{"metadata":{{"name":"pending","namespace":"speech","uid":"u2"}},"status":{{"phase":"Pending"}}}}]}}"#,
            "a".repeat(64)
        );
        let pods = Pods::default();
        assert!(pods.replace(parse_pod_list(body.as_bytes()).unwrap()));
        assert!(
            !pods.replace(parse_pod_list(body.as_bytes()).unwrap()),
            "same list: no change"
        );
        let r = pods
            .resolve(&ContainerRef {
                pod_uid: UID.into(),
                container_id: ID.into(),
            })
            .unwrap();
        assert_eq!(
            (
                r.pod.namespace.as_str(),
                r.pod.name.as_str(),
                r.container.as_str()
            ),
            ("speech", "stt-0", "server")
        );
        assert_eq!(r.pod.labels["app"], "stt");
        let init = pods.resolve(&ContainerRef {
            pod_uid: UID.into(),
            container_id: "a".repeat(64),
        });
        assert_eq!(init.unwrap().container, "fetch-model");
        assert!(parse_pod_list(b"{\"items\": 3}").is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever a kubelet (or something posing as one) answers, and whatever a cgroup file
        /// holds, parsing returns; a pod list is a list or an error.
        #[test]
        fn any_kubelet_answer_and_cgroup_file_parse_without_panic(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            json in "\\{\"items\":\\[\\{\"metadata\":\\{[ -~]{0,80}\\}[ -~]{0,80}",
            cgroup in "([0-9]{1,2}:[a-z=,]{0,12}:(/[a-z0-9_.:-]{0,70}){0,6}\n){0,4}",
        ) {
            let _ = parse_pod_list(&body);
            let _ = parse_pod_list(json.as_bytes());
            let _ = container_of(&cgroup);
            let _ = container_id(&cgroup);
        }
    }
}
