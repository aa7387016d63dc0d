//! Agent configuration: a TOML file plus command-line overrides, validated up front so that bad
//! input stops the agent with a message naming the file, the key and what to do (exit code 2).
//!
//! ```toml
//! listen = "127.0.0.1:9477"
//! rescan_interval_secs = 5
//! max_tracked_processes = 16384
//!
//! [probes]
//! disable = []            # probe names, e.g. ["sched"]
//!
//! [targets.stt]           # one table per target; selectors are OR-ed
//! cmdline = "stt_service" # each selector kind takes one value or a list
//! comm = ["^stt$"]
//! pid = [1234]
//! cgroup = "/kubepods.slice/kubepods-pod1234.slice"
//! ```
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use thiserror::Error;

use crate::{
    probes,
    syscalls::{self, Selection},
    targets::{Selector, SelectorError, Target, TargetSet, did_you_mean},
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid selector at {origin}: {source}")]
    Selector {
        origin: String,
        #[source]
        source: SelectorError,
    },
    #[error("invalid --target `{arg}`: expected NAME=KIND:VALUE, e.g. stt=cmdline:stt_service")]
    CliTarget { arg: String },
    #[error("invalid target name `{name}` at {origin}: use 1-64 letters, digits, `_`, `-` or `.`")]
    TargetName { origin: String, name: String },
    #[error(
        "target `{name}` has no selector at {origin}: add comm, cmdline, pid, cgroup or kubernetes"
    )]
    EmptyTarget { origin: String, name: String },
    #[error(
        "target `{name}` is defined twice: in {path} and by --target; give one of them another name"
    )]
    DuplicateTarget { name: String, path: PathBuf },
    #[error(
        "no target configured: add a [targets.NAME] table to {where_} or pass --target NAME=KIND:VALUE"
    )]
    NoTargets { where_: String },
    #[error("{count} targets configured; at most {max} are supported")]
    TooManyTargets { count: usize, max: u32 },
    #[error("unknown probe `{name}` in {path}: probes.disable{hint}; known probes: {known}")]
    UnknownProbe {
        path: String,
        name: String,
        hint: String,
        known: String,
    },
    #[error(
        "unknown syscall `{name}` in {path}: syscalls{hint}; use \"all\" or names such as read, openat, clock_nanosleep"
    )]
    UnknownSyscall {
        path: String,
        name: String,
        hint: String,
    },
    #[error(
        "target `{name}` selects Kubernetes pods but [kubernetes] is off in {path}: set [kubernetes] enabled = true (the kubelet's pod list is needed to resolve pods)"
    )]
    KubernetesOff { name: String, path: String },
    #[error(
        "kubernetes.kubelet_url in {path} uses ${{{var}}}, which is not set in the environment: set it (the DaemonSet sets NODE_IP from status.hostIP) or write the URL"
    )]
    UnsetVariable { path: String, var: String },
    #[error("invalid {key} in {path}: {value} is not between {min} and {max}")]
    Value {
        path: String,
        key: &'static str,
        value: String,
        min: String,
        max: String,
    },
}

/// One value or a list of them, so `comm = "x"` and `comm = ["x", "y"]` both work.
#[derive(Debug, Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
    #[default]
    #[serde(skip)]
    None,
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v,
            OneOrMany::None => Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTarget {
    #[serde(default)]
    comm: OneOrMany<String>,
    #[serde(default)]
    cmdline: OneOrMany<String>,
    #[serde(default)]
    pid: OneOrMany<u32>,
    #[serde(default)]
    cgroup: OneOrMany<String>,
    kubernetes: Option<FilePodSelector>,
}

/// `[targets.NAME.kubernetes]`: every given field must match.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FilePodSelector {
    namespace: Option<String>,
    pod: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    container: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileKubernetes {
    enabled: Option<bool>,
    kubelet_url: Option<String>,
    token_path: Option<PathBuf>,
    ca_path: Option<PathBuf>,
    insecure_skip_tls_verify: Option<bool>,
    refresh_secs: Option<f64>,
    max_pod_series: Option<usize>,
    pod_labels: Option<bool>,
}

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Replaces `${VAR}` with the environment's value.
fn expand_env(path: &str, value: &str) -> Result<String, ConfigError> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let var = &rest[start + 2..start + len];
        out.push_str(&rest[..start]);
        out.push_str(&std::env::var(var).map_err(|_| ConfigError::UnsetVariable {
            path: path.to_owned(),
            var: var.to_owned(),
        })?);
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl FileKubernetes {
    fn build(self, path: &str) -> Result<Option<crate::kube::KubeConfig>, ConfigError> {
        if !self.enabled.unwrap_or(false) {
            return Ok(None);
        }
        let refresh = self.refresh_secs.unwrap_or(10.0);
        in_range(path, "kubernetes.refresh_secs", refresh, 0.1, 3600.0)?;
        let max_pod_series = self.max_pod_series.unwrap_or(256);
        in_range(path, "kubernetes.max_pod_series", max_pod_series, 1, 65_536)?;
        let url = expand_env(
            path,
            self.kubelet_url
                .as_deref()
                .unwrap_or("https://${NODE_IP}:10250"),
        )?;
        if !url.starts_with("https://") && !url.starts_with("http://") {
            return Err(ConfigError::Parse {
                path: path.into(),
                message: format!(
                    "kubernetes.kubelet_url = {url:?}: expected https://HOST:PORT (the kubelet API) or http://HOST:PORT (its read-only port)"
                ),
            });
        }
        // An empty path turns the token (or the CA) off.
        let file = |v: Option<PathBuf>, default: &str| {
            let p = v.unwrap_or_else(|| Path::new(SERVICE_ACCOUNT).join(default));
            (!p.as_os_str().is_empty()).then_some(p)
        };
        Ok(Some(crate::kube::KubeConfig {
            kubelet_url: url,
            token_path: file(self.token_path, "token"),
            ca_path: file(self.ca_path, "ca.crt"),
            insecure_skip_tls_verify: self.insecure_skip_tls_verify.unwrap_or(false),
            refresh: Duration::from_secs_f64(refresh),
            max_pod_series,
            pod_labels: self.pod_labels.unwrap_or(true),
        }))
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileProbes {
    #[serde(default)]
    disable: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileGpu {
    enabled: Option<bool>,
    nvml_library: Option<PathBuf>,
    interval_secs: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileOtlp {
    enabled: Option<bool>,
    grpc_listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    forward_to: Option<String>,
    max_request_bytes: Option<usize>,
    intake_queue: Option<usize>,
    max_span_names: Option<usize>,
    history_secs: Option<f64>,
    sample_hz: Option<u64>,
    flamegraph_threshold_ms: Option<f64>,
    #[serde(default)]
    flamegraph_thresholds_ms: BTreeMap<String, f64>,
    flamegraph_dir: Option<PathBuf>,
    flamegraph_max_files: Option<usize>,
    flamegraph_max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTcp {
    #[serde(default)]
    per_peer: bool,
    max_peers: Option<u32>,
    max_sockets: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    control_socket: Option<PathBuf>,
    /// "all" or a list of syscall names.
    syscalls: Option<OneOrMany<String>>,
    max_syscall_series_per_target: Option<usize>,
    rescan_interval_secs: Option<f64>,
    max_tracked_processes: Option<u32>,
    #[serde(default)]
    probes: FileProbes,
    #[serde(default)]
    tcp: FileTcp,
    #[serde(default)]
    gpu: FileGpu,
    #[serde(default)]
    otlp: FileOtlp,
    #[serde(default)]
    kubernetes: FileKubernetes,
    #[serde(default)]
    targets: BTreeMap<String, FileTarget>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Unix socket of the control API.
    pub control_socket: PathBuf,
    pub targets: TargetSet,
    /// How often /proc is rescanned to catch what events cannot (renames, cgroup moves, lost
    /// events).
    pub rescan_interval: Duration,
    pub max_tracked_processes: u32,
    pub disabled_probes: Vec<String>,
    pub syscalls: Selection,
    /// Syscalls with their own series per target; the rest is summed into `syscall="other"`.
    pub max_syscall_series_per_target: usize,
    /// TCP latency per remote peer, off by default.
    pub tcp_per_peer: bool,
    /// Most (target, peer) series; further peers are counted as lost.
    pub tcp_max_peers: u32,
    /// Sockets of tracked processes followed at once; further ones are counted as lost.
    pub tcp_max_sockets: u32,
    /// GPU sampling through NVML (on by default; without a driver it reports gpu_up 0).
    pub gpu_enabled: bool,
    pub nvml_library: PathBuf,
    pub gpu_interval: Duration,
    /// OTLP span intake, enrichment and forwarding (`[otlp]`).
    pub spans: crate::spans::SpansConfig,
    /// Pod resolution through the kubelet (`[kubernetes]`), off by default.
    pub kubernetes: Option<crate::kube::KubeConfig>,
}

/// Checks that `key`'s `value` lies in `min..=max`.
fn in_range<T: PartialOrd + std::fmt::Display>(
    path: &str,
    key: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value >= min && value <= max {
        return Ok(());
    }
    Err(ConfigError::Value {
        path: path.to_owned(),
        key,
        value: value.to_string(),
        min: min.to_string(),
        max: max.to_string(),
    })
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl Config {
    /// Builds the configuration from an optional file, `--target` arguments and `--listen`.
    pub fn load(
        path: Option<&Path>,
        cli_targets: &[String],
        cli_listen: Option<SocketAddr>,
    ) -> Result<Self, ConfigError> {
        let text = path
            .map(|path| {
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            })
            .transpose()?;
        Self::from_text(text.as_deref(), path, cli_targets, cli_listen)
    }

    /// The configuration in `text` (the file's content; None: no file), errors naming `path`.
    pub fn from_text(
        text: Option<&str>,
        path: Option<&Path>,
        cli_targets: &[String],
        cli_listen: Option<SocketAddr>,
    ) -> Result<Self, ConfigError> {
        let file = match text {
            Some(text) => toml::from_str::<FileConfig>(text).map_err(|e| ConfigError::Parse {
                path: path.map_or_else(|| "the config file".into(), Path::to_owned),
                message: e.to_string().trim_end().to_owned(),
            })?,
            None => FileConfig::default(),
        };
        let where_ = path.map_or_else(|| "the config file".to_owned(), |p| p.display().to_string());

        let mut targets: Vec<Target> = Vec::new();
        for (name, t) in file.targets {
            let origin = format!("{where_}: targets.{name}");
            if !valid_name(&name) {
                return Err(ConfigError::TargetName { origin, name });
            }
            let mut selectors = Vec::new();
            let mut add = |kind: &str, values: Vec<String>| -> Result<(), ConfigError> {
                for (i, v) in values.into_iter().enumerate() {
                    let sel = Selector::new(kind, &v).map_err(|source| ConfigError::Selector {
                        origin: format!("{origin}.{kind}[{i}]"),
                        source,
                    })?;
                    selectors.push(sel);
                }
                Ok(())
            };
            add("comm", t.comm.into_vec())?;
            add("cmdline", t.cmdline.into_vec())?;
            add("pid", t.pid.into_vec().iter().map(u32::to_string).collect())?;
            add("cgroup", t.cgroup.into_vec())?;
            if let Some(k) = t.kubernetes {
                let origin = format!("{origin}.kubernetes");
                let sel = crate::targets::PodSelector::new(
                    &origin,
                    k.namespace,
                    k.pod.as_deref(),
                    k.labels.into_iter().collect(),
                    k.container,
                )
                .map_err(|source| ConfigError::Selector {
                    origin: origin.clone(),
                    source,
                })?;
                selectors.push(Selector::Pod(sel));
            }
            if selectors.is_empty() {
                return Err(ConfigError::EmptyTarget { origin, name });
            }
            targets.push(Target { name, selectors });
        }
        let from_file = targets.len();

        for arg in cli_targets {
            let (name, sel) = arg
                .split_once('=')
                .ok_or_else(|| ConfigError::CliTarget { arg: arg.clone() })?;
            let origin = format!("--target {arg}");
            if !valid_name(name) {
                return Err(ConfigError::TargetName {
                    origin,
                    name: name.to_owned(),
                });
            }
            let selector = sel
                .parse::<Selector>()
                .map_err(|source| ConfigError::Selector { origin, source })?;
            if let Some(pos) = targets.iter().position(|t| t.name == name) {
                if pos < from_file {
                    return Err(ConfigError::DuplicateTarget {
                        name: name.to_owned(),
                        path: path.map(Path::to_owned).unwrap_or_default(),
                    });
                }
                targets[pos].selectors.push(selector);
            } else {
                targets.push(Target {
                    name: name.to_owned(),
                    selectors: vec![selector],
                });
            }
        }

        if targets.is_empty() {
            return Err(ConfigError::NoTargets { where_ });
        }
        if targets.len() > agent_common::MAX_TARGETS as usize {
            return Err(ConfigError::TooManyTargets {
                count: targets.len(),
                max: agent_common::MAX_TARGETS,
            });
        }
        for name in &file.probes.disable {
            if !probes::NAMES.contains(&name.as_str()) {
                return Err(ConfigError::UnknownProbe {
                    path: where_,
                    hint: did_you_mean(name, probes::NAMES),
                    name: name.clone(),
                    known: probes::NAMES.join(", "),
                });
            }
        }
        let kubernetes = file.kubernetes.build(&where_)?;
        if kubernetes.is_none()
            && let Some(t) = targets
                .iter()
                .find(|t| t.selectors.iter().any(|s| matches!(s, Selector::Pod(_))))
        {
            return Err(ConfigError::KubernetesOff {
                name: t.name.clone(),
                path: where_,
            });
        }
        let rescan = file.rescan_interval_secs.unwrap_or(5.0);
        in_range(&where_, "rescan_interval_secs", rescan, 0.1, 3600.0)?;
        let max_tracked = file
            .max_tracked_processes
            .unwrap_or(agent_common::targets::TRACKED_MAX);
        in_range(&where_, "max_tracked_processes", max_tracked, 16, 1 << 20)?;

        let syscalls = match file.syscalls {
            None => Selection::All,
            Some(OneOrMany::One(s)) if s == "all" => Selection::All,
            Some(v) => {
                let known: Vec<&str> = syscalls::names().collect();
                let mut nrs = std::collections::BTreeSet::new();
                for name in v.into_vec() {
                    match syscalls::number(&name) {
                        Some(nr) => {
                            nrs.insert(nr);
                        }
                        None => {
                            return Err(ConfigError::UnknownSyscall {
                                path: where_,
                                hint: did_you_mean(&name, &known),
                                name,
                            });
                        }
                    }
                }
                Selection::Only(nrs)
            }
        };
        let max_series = file
            .max_syscall_series_per_target
            .unwrap_or(syscalls::DEFAULT_MAX_SERIES);
        in_range(&where_, "max_syscall_series_per_target", max_series, 1, 512)?;

        let max_peers = file
            .tcp
            .max_peers
            .unwrap_or(agent_common::tcp::PEERS_DEFAULT);
        in_range(&where_, "tcp.max_peers", max_peers, 1, 65_536)?;
        let max_sockets = file
            .tcp
            .max_sockets
            .unwrap_or(agent_common::tcp::SOCKETS_DEFAULT);
        in_range(
            &where_,
            "tcp.max_sockets",
            max_sockets,
            agent_common::tcp::SOCKETS_MIN,
            agent_common::tcp::SOCKETS_MAX,
        )?;

        let gpu_interval = file.gpu.interval_secs.unwrap_or(1.0);
        in_range(&where_, "gpu.interval_secs", gpu_interval, 0.05, 3600.0)?;

        let defaults = crate::spans::SpansConfig::default();
        let max_request_bytes = file
            .otlp
            .max_request_bytes
            .unwrap_or(defaults.max_request_bytes);
        in_range(
            &where_,
            "otlp.max_request_bytes",
            max_request_bytes,
            1024,
            64 << 20,
        )?;
        let intake_queue = file.otlp.intake_queue.unwrap_or(defaults.intake_queue);
        in_range(&where_, "otlp.intake_queue", intake_queue, 1, 65_536)?;
        let max_span_names = file.otlp.max_span_names.unwrap_or(defaults.max_span_names);
        in_range(&where_, "otlp.max_span_names", max_span_names, 1, 10_000)?;
        let history = file
            .otlp
            .history_secs
            .unwrap_or(defaults.history.as_secs_f64());
        in_range(&where_, "otlp.history_secs", history, 1.0, 600.0)?;
        if let Some(url) = &file.otlp.forward_to
            && crate::spans::forward::parse_endpoint(url).is_none()
        {
            return Err(ConfigError::Parse {
                path: where_.clone().into(),
                message: format!(
                    "otlp.forward_to = {url:?}: expected http://HOST:PORT[/PATH] of an OTLP/HTTP backend"
                ),
            });
        }
        let sample_hz = file.otlp.sample_hz.unwrap_or(defaults.sample_hz);
        in_range(&where_, "otlp.sample_hz", sample_hz, 0, 1000)?;
        let threshold = file
            .otlp
            .flamegraph_threshold_ms
            .unwrap_or(defaults.flamegraph_threshold.as_secs_f64() * 1e3);
        in_range(
            &where_,
            "otlp.flamegraph_threshold_ms",
            threshold,
            1.0,
            3_600_000.0,
        )?;
        for ms in file.otlp.flamegraph_thresholds_ms.values() {
            in_range(
                &where_,
                "otlp.flamegraph_thresholds_ms",
                *ms,
                1.0,
                3_600_000.0,
            )?;
        }
        let max_files = file
            .otlp
            .flamegraph_max_files
            .unwrap_or(defaults.flamegraph_max_files);
        in_range(&where_, "otlp.flamegraph_max_files", max_files, 1, 100_000)?;
        let max_bytes = file
            .otlp
            .flamegraph_max_bytes
            .unwrap_or(defaults.flamegraph_max_bytes);
        in_range(
            &where_,
            "otlp.flamegraph_max_bytes",
            max_bytes,
            1 << 16,
            1 << 40,
        )?;
        let spans = crate::spans::SpansConfig {
            sample_hz,
            flamegraph_threshold: Duration::from_secs_f64(threshold / 1e3),
            flamegraph_thresholds: file
                .otlp
                .flamegraph_thresholds_ms
                .iter()
                .map(|(k, ms)| (k.clone(), Duration::from_secs_f64(ms / 1e3)))
                .collect(),
            flamegraph_dir: file.otlp.flamegraph_dir.unwrap_or(defaults.flamegraph_dir),
            flamegraph_max_files: max_files,
            flamegraph_max_bytes: max_bytes,
            enabled: file.otlp.enabled.unwrap_or(true),
            grpc_listen: file.otlp.grpc_listen.unwrap_or(defaults.grpc_listen),
            http_listen: file.otlp.http_listen.unwrap_or(defaults.http_listen),
            forward_to: file.otlp.forward_to,
            max_request_bytes,
            intake_queue,
            max_span_names,
            history: Duration::from_secs_f64(history),
        };

        Ok(Config {
            control_socket: file
                .control_socket
                .unwrap_or_else(|| crate::control::DEFAULT_SOCKET.into()),
            listen: cli_listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            targets: TargetSet::new(targets),
            rescan_interval: Duration::from_secs_f64(rescan),
            max_tracked_processes: max_tracked,
            disabled_probes: file.probes.disable,
            syscalls,
            max_syscall_series_per_target: max_series,
            tcp_per_peer: file.tcp.per_peer,
            tcp_max_peers: max_peers,
            tcp_max_sockets: max_sockets,
            gpu_enabled: file.gpu.enabled.unwrap_or(true),
            nvml_library: file
                .gpu
                .nvml_library
                .unwrap_or_else(|| crate::gpu::DEFAULT_LIBRARY.into()),
            gpu_interval: Duration::from_secs_f64(gpu_interval),
            spans,
            kubernetes,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn file(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f
    }

    fn err(content: &str, cli: &[&str]) -> String {
        let f = file(content);
        let cli: Vec<String> = cli.iter().map(|s| s.to_string()).collect();
        let e = Config::load(Some(f.path()), &cli, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&f.path().display().to_string()) || e.contains("--target"),
            "no origin in: {e}"
        );
        e
    }

    #[test]
    fn full_config() {
        let f = file(
            r#"
listen = "0.0.0.0:9999"
rescan_interval_secs = 1.5
[probes]
disable = ["sched"]
[targets.stt]
cmdline = "stt_service"
comm = ["^stt$", "^whisper"]
[targets.mt]
pid = 1
cgroup = "/system.slice"
"#,
        );
        let c = Config::load(
            Some(f.path()),
            &["tts=comm:tts".into(), "tts=pid:7".into()],
            None,
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:9999".parse().unwrap());
        assert_eq!(c.rescan_interval, Duration::from_millis(1500));
        assert_eq!(c.disabled_probes, ["sched"]);
        let names: Vec<_> = c
            .targets
            .list()
            .iter()
            .map(|(_, t)| (t.name.clone(), t.selectors.len()))
            .collect();
        assert_eq!(
            names,
            [("mt".into(), 2), ("stt".into(), 3), ("tts".into(), 2)]
        );
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pipeprobe.example.toml");
        let c = Config::load(Some(&path), &[], None).unwrap();
        assert_eq!(c.targets.len(), 3);
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
    }

    #[test]
    fn cli_only_and_listen_override() {
        let c = Config::load(
            None,
            &["a=pid:1".into()],
            Some("127.0.0.1:1".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.targets.len(), 1);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err("[targets.stt]\ncmdlin = \"x\"\n", &[]);
        assert!(e.contains("cmdlin"), "{e}");
        let e = err("lisen = \"x\"\n[targets.a]\npid = 1\n", &[]);
        assert!(e.contains("lisen"), "{e}");
    }

    #[test]
    fn bad_otlp_settings_are_named() {
        let t = "[targets.a]\npid = 1\n";
        let e = err(
            &format!("[otlp]\nforward_to = \"https://tempo:4318\"\n{t}"),
            &[],
        );
        assert!(
            e.contains("otlp.forward_to") && e.contains("http://HOST:PORT"),
            "{e}"
        );
        let e = err(&format!("[otlp]\nsample_hz = 5000\n{t}"), &[]);
        assert!(e.contains("otlp.sample_hz") && e.contains("5000"), "{e}");
        let e = err(&format!("[otlp]\nmax_request_bytes = 10\n{t}"), &[]);
        assert!(e.contains("otlp.max_request_bytes"), "{e}");
        let e = err(&format!("[otlp]\nintake_queue = 0\n{t}"), &[]);
        assert!(e.contains("otlp.intake_queue"), "{e}");
        let e = err(
            &format!("[otlp.flamegraph_thresholds_ms]\ntts = 0\n{t}"),
            &[],
        );
        assert!(e.contains("otlp.flamegraph_thresholds_ms"), "{e}");
        let e = err(&format!("[otlp]\nhistory_secs = 0.1\n{t}"), &[]);
        assert!(e.contains("otlp.history_secs"), "{e}");
    }

    #[test]
    fn invalid_regex_is_named() {
        let e = err("[targets.stt]\ncmdline = [\"ok\", \"(unclosed\"]\n", &[]);
        assert!(
            e.contains("targets.stt.cmdline[1]") && e.contains("(unclosed"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_target() {
        let e = err("[targets.stt]\npid = 1\n[targets.stt]\npid = 2\n", &[]);
        assert!(
            e.contains("stt") && e.to_lowercase().contains("duplicate"),
            "{e}"
        );
        let e = err("[targets.stt]\npid = 1\n", &["stt=pid:2"]);
        assert!(e.contains("`stt` is defined twice"), "{e}");
    }

    #[test]
    fn no_targets() {
        let e = err("listen = \"127.0.0.1:1\"\n", &[]);
        assert!(e.contains("no target configured"), "{e}");
        let e = Config::load(None, &[], None).unwrap_err().to_string();
        assert!(e.contains("--target"), "{e}");
    }

    #[test]
    fn syscall_selection() {
        let f = file(
            "syscalls = [\"read\", \"clock_nanosleep\"]\nmax_syscall_series_per_target = 4\n[targets.a]\npid = 1\n",
        );
        let c = Config::load(Some(f.path()), &[], None).unwrap();
        let Selection::Only(nrs) = c.syscalls else {
            panic!("expected a list")
        };
        assert_eq!(nrs.len(), 2);
        assert_eq!(c.max_syscall_series_per_target, 4);
        let f = file("syscalls = \"all\"\n[targets.a]\npid = 1\n");
        assert_eq!(
            Config::load(Some(f.path()), &[], None).unwrap().syscalls,
            Selection::All
        );
        let e = err("syscalls = [\"opnat\"]\n[targets.a]\npid = 1\n", &[]);
        assert!(
            e.contains("unknown syscall `opnat`") && e.contains("did you mean `openat`"),
            "{e}"
        );
        let e = err("syscalls = \"some\"\n[targets.a]\npid = 1\n", &[]);
        assert!(e.contains("unknown syscall `some`"), "{e}");
        assert!(
            err(
                "max_syscall_series_per_target = 0\n[targets.a]\npid = 1\n",
                &[]
            )
            .contains("max_syscall_series")
        );
    }

    #[test]
    fn tcp_table() {
        let f = file("[tcp]\nper_peer = true\nmax_peers = 8\n[targets.a]\npid = 1\n");
        let c = Config::load(Some(f.path()), &[], None).unwrap();
        assert!(c.tcp_per_peer);
        assert_eq!(c.tcp_max_peers, 8);
        assert!(
            !Config::load(None, &["a=pid:1".into()], None)
                .unwrap()
                .tcp_per_peer
        );
        assert!(err("[tcp]\nper_peers = true\n[targets.a]\npid = 1\n", &[]).contains("per_peers"));
        assert!(err("[tcp]\nmax_peers = 0\n[targets.a]\npid = 1\n", &[]).contains("tcp.max_peers"));
        assert_eq!(c.tcp_max_sockets, agent_common::tcp::SOCKETS_DEFAULT);
        let f = file("[tcp]\nmax_sockets = 1000\n[targets.a]\npid = 1\n");
        let c = Config::load(Some(f.path()), &[], None).unwrap();
        assert_eq!(c.tcp_max_sockets, 1000);
        assert!(
            err("[tcp]\nmax_sockets = 2\n[targets.a]\npid = 1\n", &[]).contains("tcp.max_sockets")
        );
    }

    #[test]
    fn unreadable_file() {
        let e =
            Config::load(Some(Path::new("/nonexistent/pipeprobe.toml")), &[], None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/pipeprobe.toml"), "{e}");
    }

    #[test]
    fn other_bad_values() {
        assert!(err("[targets.a]\n", &[]).contains("has no selector"));
        assert!(err("[targets.\"a b\"]\npid = 1\n", &[]).contains("invalid target name"));
        let e = err(
            "[probes]\ndisable = [\"shced\"]\n[targets.a]\npid = 1\n",
            &[],
        );
        assert!(e.contains("did you mean `sched`"), "{e}");
        assert!(
            err("rescan_interval_secs = 0\n[targets.a]\npid = 1\n", &[])
                .contains("rescan_interval_secs")
        );
        let f = file("");
        let e = Config::load(Some(f.path()), &["nameonly".into()], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("NAME=KIND:VALUE"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Any text, and the example config with bytes changed, loads or is refused with the
        /// file's name; never a panic.
        #[test]
        fn any_config_text_is_loaded_or_refused_naming_the_file(
            text in "\\PC{0,400}",
            cut in 0usize..4000,
            junk in "\\PC{0,12}",
        ) {
            let example = std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pipeprobe.example.toml"),
            )
            .unwrap();
            let at = example.char_indices().map(|(i, _)| i).find(|i| *i >= cut.min(example.len())).unwrap_or(example.len());
            let mutated = format!("{}{junk}{}", &example[..at], &example[at..]);
            for content in [text, mutated] {
                let f = tempfile::NamedTempFile::new().unwrap();
                std::fs::write(f.path(), &content).unwrap();
                if let Err(e) = Config::load(Some(f.path()), &[], None) {
                    let msg = e.to_string();
                    proptest::prop_assert!(
                        msg.contains(&f.path().display().to_string()) || msg.contains("selector") || msg.contains("target"),
                        "{msg}"
                    );
                }
            }
        }
    }
}
