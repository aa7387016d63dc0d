//! OpenTelemetry spans of the pipeline, tied to what the kernel saw while each one ran.
//!
//! # Design
//! Services export spans to the node's agent with their standard OTLP exporter (`otlp.rs`:
//! gRPC on 4317, HTTP/protobuf on 4318, loopback by default). A span names its process by the
//! `process.pid` resource attribute (the SDKs' process detector) and, optionally, its thread by
//! `thread.id` (the OS thread id: `threading.get_native_id()` in Python).
//!
//! Spans arrive in batches, seconds after they end, so the breakdown of a span's window has to
//! be read from history. The kernel keeps per-thread running totals (run-queue time, blocked
//! time, syscall time and count) in each thread's task storage, updated by the sched and
//! syscalls programs on the events they already handle: no extra map lookup, nothing per event
//! to user space. `history.rs` samples those totals every 20 ms for the tracked threads and keeps
//! their change points for a bounded window (default 15 s); the share of any window is the
//! difference of the totals at its two ends, each known to within one sampling tick. Cost: one
//! map lookup per tracked thread per tick, and memory proportional to how often totals change,
//! capped by the window and `history::MAX_THREADS`.
//!
//! `enrich.rs` turns each span into `pipeprobe_span_*` histograms per (service, span) (span
//! names capped, the rest folded into `other`; durations carry the trace id as an exemplar)
//! and adds `pipeprobe.*` attributes; `forward.rs` sends the enriched spans on to a backend.
//! Every queue is bounded and every drop counted in `pipeprobe_spans_dropped_total{reason}`:
//! the intake never waits on processing, processing never waits on the backend.
pub mod enrich;
pub mod flamegraphs;
pub mod forward;
pub mod history;
pub mod otlp;
pub mod pidns;

use std::{net::SocketAddr, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        exemplar::HistogramWithExemplars,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::tracker::SharedTracked;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpanLabels {
    pub service: String,
    pub span: String,
}

/// Exemplar labels: `trace_id`, and `flamegraph` when the span has one.
type ExemplarLabels = Vec<(String, String)>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: String,
}

type Hist = Family<SpanLabels, Histogram, fn() -> Histogram>;

fn buckets() -> Histogram {
    // 100 us to ~52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

fn exemplar_buckets() -> HistogramWithExemplars<ExemplarLabels> {
    HistogramWithExemplars::new(exponential_buckets(0.0001, 2.0, 20))
}

/// The span metrics, shared by intake, processing and forwarding.
#[derive(Clone)]
pub struct SpanMetrics {
    duration: Family<
        SpanLabels,
        HistogramWithExemplars<ExemplarLabels>,
        fn() -> HistogramWithExemplars<ExemplarLabels>,
    >,
    runq: Hist,
    offcpu: Hist,
    syscall: Hist,
    pub received: Counter,
    pub forwarded: Counter,
    dropped: Family<ReasonLabels, Counter>,
    rejected: Family<ProtocolLabels, Counter>,
}

impl SpanMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            duration: Family::new_with_constructor(exemplar_buckets),
            runq: Family::new_with_constructor(buckets),
            offcpu: Family::new_with_constructor(buckets),
            syscall: Family::new_with_constructor(buckets),
            received: Counter::default(),
            forwarded: Counter::default(),
            dropped: Family::default(),
            rejected: Family::default(),
        };
        registry.register(
            "pipeprobe_span_duration_seconds",
            "Duration of the pipeline's spans received over OTLP, per service and span name; exemplars carry the trace id",
            m.duration.clone(),
        );
        registry.register(
            "pipeprobe_span_runqueue_delay_seconds",
            "Run-queue delay of the span's thread (or process) during the span",
            m.runq.clone(),
        );
        registry.register(
            "pipeprobe_span_offcpu_seconds",
            "Time the span's thread (or process) was blocked off CPU during the span",
            m.offcpu.clone(),
        );
        registry.register(
            "pipeprobe_span_syscall_seconds",
            "Time the span's thread (or process) spent in syscalls during the span",
            m.syscall.clone(),
        );
        registry.register(
            "pipeprobe_spans_received",
            "Spans received over OTLP",
            m.received.clone(),
        );
        registry.register(
            "pipeprobe_spans_forwarded",
            "Enriched spans accepted by the configured backend",
            m.forwarded.clone(),
        );
        registry.register(
            "pipeprobe_spans_dropped",
            "Spans dropped: intake_queue_full, forward_queue_full, backend_unreachable, backend_error",
            m.dropped.clone(),
        );
        registry.register(
            "pipeprobe_otlp_rejected_requests",
            "OTLP requests refused as malformed or oversize, per protocol (http, grpc)",
            m.rejected.clone(),
        );
        // Every reason and protocol exists from the start at 0, so that `rate()` and alerts
        // see a first drop as an increase rather than a series appearing.
        for reason in [
            "intake_queue_full",
            "forward_queue_full",
            "backend_unreachable",
            "backend_error",
        ] {
            m.dropped_n(reason, 0);
        }
        for protocol in ["http", "grpc"] {
            m.rejected
                .get_or_create(&ProtocolLabels {
                    protocol: protocol.to_owned(),
                })
                .inc_by(0);
        }
        m
    }

    /// `exemplar` None keeps the bucket's last one.
    fn observe_duration(
        &self,
        service: &str,
        span: &str,
        secs: f64,
        exemplar: Option<ExemplarLabels>,
    ) {
        self.duration
            .get_or_create(&SpanLabels {
                service: service.to_owned(),
                span: span.to_owned(),
            })
            .observe(secs, exemplar, None);
    }

    fn observe_breakdown(&self, service: &str, span: &str, b: &history::Breakdown) {
        let l = SpanLabels {
            service: service.to_owned(),
            span: span.to_owned(),
        };
        self.runq.get_or_create(&l).observe(b.runq_ns as f64 / 1e9);
        self.offcpu
            .get_or_create(&l)
            .observe(b.blocked_ns as f64 / 1e9);
        self.syscall
            .get_or_create(&l)
            .observe(b.syscall_ns as f64 / 1e9);
    }

    fn dropped_n(&self, reason: &str, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc_by(n);
    }

    fn rejected(&self, protocol: &str) {
        self.rejected
            .get_or_create(&ProtocolLabels {
                protocol: protocol.to_owned(),
            })
            .inc();
    }
}

/// `[otlp]` settings.
#[derive(Debug, Clone)]
pub struct SpansConfig {
    pub enabled: bool,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// `http://HOST:PORT[/PATH]` of an OTLP/HTTP backend for the enriched spans.
    pub forward_to: Option<String>,
    pub max_request_bytes: usize,
    /// Requests taken but not yet enriched; past it the receivers answer "retry later".
    pub intake_queue: usize,
    pub max_span_names: usize,
    pub history: Duration,
    /// Continuous sampling rate of tracked threads for span flamegraphs (0: off).
    pub sample_hz: u64,
    /// Spans at least this long get a flamegraph...
    pub flamegraph_threshold: Duration,
    /// ...or this long, for these span names.
    pub flamegraph_thresholds: std::collections::HashMap<String, Duration>,
    pub flamegraph_dir: std::path::PathBuf,
    pub flamegraph_max_files: usize,
    pub flamegraph_max_bytes: u64,
}

impl Default for SpansConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 4317)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 4318)),
            forward_to: None,
            max_request_bytes: 4 << 20,
            intake_queue: 256,
            max_span_names: 100,
            history: Duration::from_secs(15),
            sample_hz: 49,
            flamegraph_threshold: Duration::from_millis(100),
            flamegraph_thresholds: std::collections::HashMap::new(),
            flamegraph_dir: "/var/lib/pipeprobe/flamegraphs".into(),
            flamegraph_max_files: 200,
            flamegraph_max_bytes: 64 << 20,
        }
    }
}

/// The spans a request carries (drop and forward counters count spans, not requests).
pub(crate) fn span_count(
    req: &opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) -> u64 {
    req.resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len() as u64)
        .sum()
}

/// Enriched requests waiting to be forwarded.
const FORWARD_QUEUE: usize = 256;

/// Binds the receivers and starts processing. A receiver whose port cannot be bound is logged
/// and left out: the rest of the agent runs. `thread_map` is the kernel's per-thread state (None
/// when the sched and syscalls probes did not load: spans are then counted and forwarded, not
/// enriched).
/// The kernel maps the span history samples.
pub struct HistoryMaps {
    /// Task storage of per-thread totals (THREAD; aya has no wrapper for it).
    pub threads: aya::maps::Map,
    /// Retransmitted segments per owning process (PROC_RETRANS), when the TCP probes run.
    pub proc_retrans: Option<aya::maps::HashMap<aya::maps::MapData, u32, u64>>,
    /// The clock of the threads' scheduler times (None: episodes in progress are not counted).
    pub sched_clock: Option<crate::clock::SchedClock>,
    /// Per CPU, the syscalls of the thread running there not yet in its task storage (None when
    /// the syscalls probe does not run).
    pub syscalls_on_cpu:
        Option<aya::maps::PerCpuArray<aya::maps::MapData, agent_common::syscalls::SyscallOnCpu>>,
    /// Per CPU, the tracked thread running there and since when (None when the sched probe does
    /// not run).
    pub sched_on_cpu:
        Option<aya::maps::PerCpuArray<aya::maps::MapData, agent_common::sched::SchedOnCpu>>,
}

pub async fn start(
    cfg: &SpansConfig,
    registry: &mut Registry,
    maps: Option<HistoryMaps>,
    tracked: SharedTracked,
    sampler: Option<crate::stacks::SpanSampler>,
    gpu: Option<crate::gpu::SharedGpu>,
) -> Option<flamegraphs::Store> {
    let metrics = SpanMetrics::new(registry);
    let tracked_for_spans = tracked.clone();
    let history = maps.and_then(|m| match history::spawn(m, tracked, cfg.history) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("cannot start the span history sampler: {e}; spans are not enriched");
            None
        }
    });
    let (tx, rx) = tokio::sync::mpsc::channel(cfg.intake_queue);
    let forward = cfg.forward_to.as_deref().and_then(|url| {
        let Some((addr, path)) = forward::parse_endpoint(url) else {
            tracing::warn!(
                url,
                "otlp.forward_to must be http://HOST:PORT[/PATH]; not forwarding"
            );
            return None;
        };
        let (ftx, frx) = tokio::sync::mpsc::channel(FORWARD_QUEUE);
        tokio::spawn(forward::run(frx, addr, path, metrics.clone()));
        Some(ftx)
    });
    let caps = enrich::Caps {
        span_names: cfg.max_span_names,
        services: 64,
    };
    let store = flamegraphs::Store {
        dir: cfg.flamegraph_dir.clone(),
        max_files: cfg.flamegraph_max_files,
        max_bytes: cfg.flamegraph_max_bytes,
    };
    let drawer = flamegraphs::Drawer::start()
        .map_err(|e| {
            tracing::warn!("cannot start the span flamegraph thread: {e}; span flamegraphs are off")
        })
        .ok();
    let fg = match (sampler, drawer) {
        (Some(mut s), Some(drawer)) if flamegraphs::usable(&store.dir) => {
            let samples = flamegraphs::SharedSamples::default();
            let senders = s.senders.take().map(std::sync::Mutex::new);
            tokio::spawn(flamegraphs::collect(
                s,
                tracked_for_spans.clone(),
                cfg.history,
                samples.clone(),
            ));
            Some(std::sync::Arc::new(flamegraphs::SpanFlamegraphs {
                samples,
                store: store.clone(),
                threshold: cfg.flamegraph_threshold,
                thresholds: cfg.flamegraph_thresholds.clone(),
                hz: cfg.sample_hz,
                drawer,
                last: std::sync::Mutex::default(),
                senders,
            }))
        }
        (Some(_), Some(_)) => {
            tracing::warn!(dir = %store.dir.display(), "cannot create the span flamegraph directory; span flamegraphs are off");
            None
        }
        _ => None,
    };
    let stored = fg.as_ref().map(|f| f.store.clone());
    tokio::spawn(enrich::run(enrich::Sources {
        queue: rx,
        host_ids: pidns::HostIds::new(tracked_for_spans),
        history,
        gpu,
        metrics: metrics.clone(),
        caps,
        forward,
        flamegraphs: fg,
    }));
    let intake = otlp::Intake {
        queue: tx,
        max_bytes: cfg.max_request_bytes,
        metrics,
    };
    for (proto, addr, router) in [
        ("grpc", cfg.grpc_listen, otlp::grpc_router(intake.clone())),
        ("http", cfg.http_listen, otlp::http_router(intake.clone())),
    ] {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let bound = l.local_addr().unwrap_or(addr);
                tracing::info!(protocol = proto, addr = %bound, "OTLP receiver listening");
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(l, router).await {
                        tracing::warn!(protocol = proto, "OTLP receiver stopped: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!(
                protocol = proto,
                %addr,
                "cannot listen for OTLP: {e}; spans over {proto} are off, everything else runs"
            ),
        }
    }
    stored
}
