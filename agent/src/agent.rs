//! `pipeprobe agent`: wires configuration, process tracking, probes and the metrics endpoint.
use std::sync::Arc;

use agent_common::{syscalls::SyscallOnCpu, targets::GENERATION_MAP};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use prometheus_client::collector::Collector;
use thiserror::Error;

use crate::{
    bpfstats,
    caps::{self, PrivilegeError},
    cli::AgentArgs,
    clock,
    config::{Config, ConfigError},
    control,
    ebpf::{self, Kernel, LoadOptions},
    gpu, http,
    lost::{LostCollector, UserLost},
    metrics::{AgentMetrics, Metrics, ProbeLabels},
    probes::{self, ProbeError, ProbeStatus},
    reload, sched, spans, stacks,
    syscalls::{self, Selection},
    targets::TargetSet,
    tcp, tracefs,
    tracker::{self, KernelTracked, Tracker},
};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(
        "cannot listen on {addr}: {source}; pick another address with --listen or `listen` in the config"
    )]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

impl AgentError {
    /// 2 for bad input, 3 for missing privileges, 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) => 2,
            AgentError::Privilege(_) => 3,
            _ => 1,
        }
    }
}

pub fn run(args: &AgentArgs) -> Result<(), AgentError> {
    let mut config = Config::load(args.config.as_deref(), &args.targets, args.listen)?;
    if let Some(path) = &args.control_socket {
        config.control_socket = path.clone();
    }
    if let Some(path) = &args.nvml_library {
        config.nvml_library = path.clone();
    }
    caps::require()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?
        .block_on(serve(
            config,
            ReloadSource {
                config: args.config.clone(),
                cli_targets: args.targets.clone(),
            },
        ))
}

/// Where a reload reads the targets from: the same file and `--target`s as at start.
struct ReloadSource {
    config: Option<std::path::PathBuf>,
    cli_targets: Vec<String>,
}

/// The kernel half: the loaded object, the maps user space drives, and one collector per
/// attached family. Empty when eBPF did not load at all.
#[derive(Default)]
struct Started {
    kernel: Option<Kernel>,
    tracked: Option<KernelTracked>,
    events: Option<RingBuf<MapData>>,
    lost: Option<PerCpuArray<MapData, u64>>,
    /// Task storage of per-thread state (aya has no wrapper for it).
    threads: Option<aya::maps::Map>,
    /// Retransmitted segments per owning process, for span breakdowns.
    proc_retrans: Option<BpfHashMap<MapData, u32, u64>>,
    /// The scheduler's clock, which the per-thread state's scheduler times are in.
    sched_clock: Option<clock::SchedClock>,
    /// Per CPU, the syscall totals of the thread there that the task storage does not hold yet.
    syscalls_on_cpu: Option<PerCpuArray<MapData, SyscallOnCpu>>,
    sched_on_cpu: Option<PerCpuArray<MapData, agent_common::sched::SchedOnCpu>>,
    span_sampler: Option<stacks::SpanSampler>,
    collectors: Vec<Box<dyn Collector>>,
    statuses: Vec<ProbeStatus>,
}

/// Where a map is missing, its consumer goes without; the error is logged.
fn optional<T>(map: Result<T, ebpf::LoadError>) -> Option<T> {
    map.map_err(|e| tracing::error!(error = %e, "eBPF map unavailable"))
        .ok()
}

fn start_probes(config: &Config, targets: &Arc<TargetSet>) -> Started {
    let opts = LoadOptions {
        tracked_processes: config.max_tracked_processes,
        all_syscalls: config.syscalls == Selection::All,
        tcp_per_peer: config.tcp_per_peer,
        tcp_max_peers: config.tcp_max_peers,
        tcp_max_sockets: config.tcp_max_sockets,
    };
    // The BTF is dropped with this function: every program is loaded by its end.
    let (mut kernel, btf) = match ebpf::load(opts) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "eBPF unavailable: no probe can run; serving what remains");
            let statuses = probes::FAMILIES
                .iter()
                .map(|f| ProbeStatus {
                    name: f.name,
                    result: Err(ProbeError::NoEbpf(e.to_string())),
                })
                .collect();
            return Started {
                statuses,
                ..Started::default()
            };
        }
    };
    tracing::debug!(offsets = ?kernel.offsets, "task_struct offsets from kernel BTF");
    kernel.spawn_logger();
    let statuses = probes::attach_all(
        &mut kernel.bpf,
        &btf,
        &config.disabled_probes,
        &kernel.unavailable,
    );
    // Only once the programs are loaded: they hold the map then, and dropping our handle to an
    // unloaded program's map would close it under the loader.
    if let Selection::Only(nrs) = &config.syscalls
        && let Some(mut filter) =
            optional(kernel.take_map::<Array<MapData, u8>>(syscalls::FILTER_MAP))
    {
        for nr in nrs {
            if let Err(e) = filter.set(*nr, 1, 0) {
                tracing::error!(nr, error = %e, "cannot select syscall");
            }
        }
    }
    let on = |name: &str| statuses.iter().any(|s| s.name == name && s.result.is_ok());

    // A metric of a probe that is not attached would read as "nothing happened": leave it out.
    let mut collectors: Vec<Box<dyn Collector>> = Vec::new();
    if on(sched::FAMILY.name)
        && let Some(hist) = optional(kernel.take_map(sched::HIST_MAP))
    {
        collectors.push(Box::new(sched::RunqueueDelay::new(hist, targets.clone())));
    }
    if on(syscalls::FAMILY.name)
        && let Some(stats) = optional(kernel.take_map(syscalls::STATS_MAP))
        && let Some(slot) = optional(kernel.take_map(syscalls::SLOT_MAP))
        && let Some(used) = optional(kernel.take_map(syscalls::USED_MAP))
    {
        let stats = syscalls::StatsMaps { stats, slot, used };
        collectors.push(Box::new(syscalls::SyscallLatency::new(
            stats,
            targets.clone(),
            config.max_syscall_series_per_target,
        )));
    }
    let (connect, rtt) = (on(tcp::FAMILY.name), on(tcp::RTT_FAMILY.name));
    if (connect || rtt)
        && let Some(stats) = optional(kernel.take_map(tcp::STATS_MAP))
    {
        collectors.push(Box::new(tcp::TcpLatency::new(
            stats,
            targets.clone(),
            connect,
            rtt,
        )));
    }
    if config.tcp_per_peer
        && (connect || rtt)
        && let Some(peers) = optional(kernel.take_map(tcp::PEERS_MAP))
    {
        collectors.push(Box::new(tcp::PeerLatency::new(peers, targets.clone())));
    }
    collectors.push(Box::new(bpfstats::RecursionMisses::new(
        probes::attached_fds(&kernel.bpf, &statuses),
    )));
    let events = on(tracker::FAMILY.name)
        .then(|| optional(kernel.take_map(tracker::EVENTS_MAP)))
        .flatten();
    // The per-thread state the span history samples: written by the sched and syscalls programs.
    let threads = (on(sched::FAMILY.name) || on(syscalls::FAMILY.name))
        .then(|| kernel.bpf.take_map("THREAD"))
        .flatten();
    let proc_retrans = on(tcp::FAMILY.name)
        .then(|| optional(kernel.take_map(tcp::PROC_RETRANS_MAP)))
        .flatten();
    // Only the span history reads it.
    let sched_clock = (threads.is_some() && config.spans.enabled)
        .then(|| {
            clock::SchedClock::load(&mut kernel.bpf)
                .map_err(|e| tracing::warn!("{e}; {}", clock::WITHOUT_IT))
                .ok()
        })
        .flatten();
    let syscalls_on_cpu = (threads.is_some() && config.spans.enabled && on(syscalls::FAMILY.name))
        .then(|| optional(kernel.take_map(syscalls::ON_CPU_MAP)))
        .flatten();
    let sched_on_cpu = (threads.is_some() && config.spans.enabled && on(sched::FAMILY.name))
        .then(|| optional(kernel.take_map(agent_common::sched::ON_CPU_MAP)))
        .flatten();
    // Continuous low-rate sampling for span flamegraphs, with the profile family's programs.
    let span_sampler =
        (config.spans.enabled && config.spans.sample_hz > 0 && on(stacks::FAMILY.name))
            .then(
                || match stacks::start_span_sampler(&mut kernel, &btf, config.spans.sample_hz) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!("{e}; span flamegraphs are off, everything else runs");
                        None
                    }
                },
            )
            .flatten();
    Started {
        tracked: optional(kernel.take_map(tracker::TRACKED_MAP))
            .zip(optional(kernel.take_map(GENERATION_MAP)))
            .map(|(map, generation)| KernelTracked::new(map, generation)),
        events,
        lost: optional(kernel.take_map("LOST")),
        threads,
        proc_retrans,
        sched_clock,
        syscalls_on_cpu,
        sched_on_cpu,
        span_sampler,
        kernel: Some(kernel),
        collectors,
        statuses,
    }
}

async fn serve(config: Config, source: ReloadSource) -> Result<(), AgentError> {
    // Bind first: a taken port should fail before anything is loaded into the kernel.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(AgentError::Serve)?;

    match tracefs::ensure_mounted() {
        Ok(tracefs::Tracefs::MountedNow(p)) => {
            tracing::info!(path = %p.display(), "tracefs was not mounted; mounted it")
        }
        Ok(tracefs::Tracefs::Mounted(_)) => {}
        Err(e) => tracing::warn!("{e}; probes on classic tracepoints will not attach"),
    }

    let targets = Arc::new(config.targets.clone());
    let agent_metrics = AgentMetrics::default();
    let mut metrics = Metrics::new(&agent_metrics);
    let user_lost = Arc::new(UserLost::default());

    let Started {
        kernel,
        tracked,
        events,
        lost,
        threads,
        proc_retrans,
        sched_clock,
        syscalls_on_cpu,
        sched_on_cpu,
        span_sampler,
        collectors,
        statuses,
    } = start_probes(&config, &targets);
    crate::heap::release_free();
    let on_profile = statuses
        .iter()
        .any(|s| s.name == stacks::FAMILY.name && s.result.is_ok());
    for s in &statuses {
        agent_metrics
            .probe_attached
            .get_or_create(&ProbeLabels {
                probe: s.name.to_owned(),
            })
            .set(i64::from(s.result.is_ok()));
    }
    for c in collectors {
        metrics.register_collector(c);
    }
    metrics.register_collector(Box::new(LostCollector::new(lost, user_lost.clone())));

    let mut tracker = Tracker::new(
        targets.clone(),
        tracked,
        agent_metrics.target_processes.clone(),
        user_lost,
    );
    if let Some(kube) = &config.kubernetes {
        tracker = with_kubernetes(tracker, kube, metrics.registry_mut());
    }
    tracker.scan();
    // After the initial scan, so the first GPU sample already knows which process is whose.
    let gpu_state = config.gpu_enabled.then(|| {
        let gpu = gpu::spawn(
            config.nvml_library.clone().into_os_string(),
            config.gpu_interval,
            targets.clone(),
            tracker.shared(),
        );
        metrics.register_collector(Box::new(gpu::GpuCollector::new(gpu.clone())));
        gpu
    });
    tracing::info!(
        targets = targets.len(),
        processes = tracker.tracked().len(),
        "initial scan done"
    );
    let tracked_pids = tracker.shared();
    let (reloads, reload_requests) = tokio::sync::mpsc::channel(1);
    tokio::spawn(tracker.run(events, config.rescan_interval, reload_requests));
    let reloader = Arc::new(reload::Reloader::new(
        source.config,
        source.cli_targets,
        reloads,
        agent_metrics.config_last_reload_successful.clone(),
    ));
    tokio::spawn(reload::on_sighup(reloader.clone()));
    let flamegraph_store = if config.spans.enabled {
        spans::start(
            &config.spans,
            metrics.registry_mut(),
            threads.map(|threads| spans::HistoryMaps {
                threads,
                proc_retrans,
                sched_clock,
                syscalls_on_cpu,
                sched_on_cpu,
            }),
            tracked_pids.clone(),
            span_sampler,
            gpu_state,
        )
        .await
    } else {
        None
    };

    // The control API owns the kernel object from here (the profiler attaches per capture);
    // whichever task holds it keeps every program attached until the agent stops.
    let _kernel = match control::bind(&config.control_socket).await {
        Ok(socket) => {
            let profiler = match kernel {
                Some(mut k) if on_profile => match stacks::CaptureMaps::take(&mut k) {
                    Ok(maps) => Ok(stacks::Profiler::new(
                        k,
                        maps,
                        targets.clone(),
                        tracked_pids,
                        agent_metrics.python_unwind_unsupported.clone(),
                    )),
                    Err(e) => Err((Some(k), e.to_string())),
                },
                Some(k) => Err((Some(k), "the profile probe is not attached".to_owned())),
                None => Err((None, "eBPF did not load".to_owned())),
            };
            let (keep, profiler) = match profiler {
                Ok(p) => (None, Ok(p)),
                Err((k, why)) => (k, Err(why)),
            };
            tracing::info!(path = %config.control_socket.display(), "control API listening");
            tokio::spawn(control::serve(socket, profiler, flamegraph_store, reloader));
            keep
        }
        Err(e) => {
            tracing::warn!("{e}; flamegraphs are unavailable, everything else runs");
            kernel
        }
    };
    let metrics = Arc::new(metrics);
    metrics.set_ready();
    tracing::info!(%addr, "serving metrics on http://{addr}/metrics");
    axum::serve(listener, http::router(metrics))
        .with_graceful_shutdown(shutdown())
        .await
        .map_err(AgentError::Serve)?;
    tracing::info!("stopped; probes detached");
    Ok(())
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Starts pod resolution through the kubelet. A kubelet that cannot be set up (CA file) is
/// logged and leaves pod selectors matching nothing; the rest of the agent runs on.
fn with_kubernetes(
    tracker: Tracker,
    cfg: &crate::kube::KubeConfig,
    registry: &mut prometheus_client::registry::Registry,
) -> Tracker {
    let up = prometheus_client::metrics::gauge::Gauge::default();
    registry.register(
        "pipeprobe_kubelet_up",
        "1 when the last pod list request to the kubelet succeeded",
        up.clone(),
    );
    let series = prometheus_client::metrics::family::Family::default();
    registry.register(
        "pipeprobe_target_pod_info",
        "Processes of each target per Kubernetes namespace, pod and container",
        series.clone(),
    );
    let pods = Arc::new(crate::kube::Pods::default());
    let changed = Arc::new(tokio::sync::Notify::new());
    match crate::kube::start(cfg.clone(), pods.clone(), changed.clone(), up) {
        Ok(()) => tracing::info!(kubelet = %cfg.kubelet_url, "resolving pods through the kubelet"),
        Err(e) => tracing::error!("{e}; Kubernetes pod selectors match nothing"),
    }
    tracker.with_kubernetes(pods, changed, series, cfg.max_pod_series, cfg.pod_labels)
}
