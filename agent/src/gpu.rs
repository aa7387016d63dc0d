//! GPU sampling through NVML (nvml-wrapper), per GPU and per pipeline target.
//!
//! A dedicated thread samples every `interval`, so a slow NVML call never stalls scrapes or
//! probes; scrapes read the last sample. Without a driver (or a GPU) the agent runs on with
//! `pipeprobe_gpu_up 0`, the reason logged once, and retries initialisation with backoff, so a
//! driver installed later is picked up. A field a GPU does not support is skipped for that GPU
//! and logged once.
use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    sync::{Arc, Mutex},
    time::Duration,
};

use nvml_wrapper::{
    EventSet, Nvml,
    bitmasks::{device::ThrottleReasons, event::EventTypes},
    enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor},
    enums::{device::UsedGpuMemory, event::XidError},
    error::NvmlError,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::{targets::TargetSet, tracker::SharedTracked};

pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
    uuid: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EccLabels {
    gpu: String,
    uuid: String,
    model: String,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpLabels {
    gpu: String,
    uuid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ThrottleLabels {
    gpu: String,
    uuid: String,
    model: String,
    reason: &'static str,
}

/// Throttle reasons by NVML bit, as label values.
const THROTTLE_REASONS: [(ThrottleReasons, &str); 9] = [
    (ThrottleReasons::GPU_IDLE, "gpu_idle"),
    (
        ThrottleReasons::APPLICATIONS_CLOCKS_SETTING,
        "applications_clocks_setting",
    ),
    (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
    (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
    (ThrottleReasons::SYNC_BOOST, "sync_boost"),
    (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
    (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
    (
        ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
        "hw_power_brake_slowdown",
    ),
    (
        ThrottleReasons::DISPLAY_CLOCK_SETTING,
        "display_clock_setting",
    ),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    gpu: String,
    uuid: String,
    target: String,
}

/// One GPU's sample; `None` where the GPU does not support the field.
#[derive(Debug, Clone, Default)]
struct GpuSample {
    index: u32,
    uuid: String,
    model: String,
    /// The GPU fell off the bus or stopped answering: only its `gpu_up 0` is exported.
    lost: bool,
    /// Active throttle reasons.
    throttle: Vec<&'static str>,
    utilization: Option<f64>,
    memory_utilization: Option<f64>,
    memory_used: Option<f64>,
    memory_total: Option<f64>,
    power_watts: Option<f64>,
    power_limit_watts: Option<f64>,
    temperature: Option<f64>,
    sm_clock_hertz: Option<f64>,
    memory_clock_hertz: Option<f64>,
    energy_joules: Option<f64>,
    /// Volatile ECC error counts (corrected, uncorrected), where ECC is supported.
    ecc: Option<(u64, u64)>,
    /// Critical Xid events seen for this GPU since the agent started.
    xid_errors: u64,
    /// GPU memory per target name ("other" for processes outside any target).
    process_memory: HashMap<String, f64>,
    /// SM utilisation (0-1) per target name, from NVML's per-process samples.
    process_utilization: HashMap<String, f64>,
    /// Processes running compute work on it.
    pids: Vec<u32>,
}

/// The last sampling round.
#[derive(Debug, Default)]
pub struct GpuState {
    up: bool,
    /// Why NVML is unavailable, when it is.
    pub reason: Option<String>,
    pub driver: Option<String>,
    gpus: Vec<GpuSample>,
    /// How long the last sampling round of every GPU took: a slow driver shows here first.
    round_secs: Option<f64>,
    /// Recent rounds, for the GPU share of spans: (monotonic ns, per GPU (utilisation, pids)).
    history: std::collections::VecDeque<Round>,
}

/// One sampling round: monotonic ns, and per GPU its utilisation and the pids computing on it.
type Round = (u64, Vec<(Option<f64>, Vec<u32>)>);

/// Rounds kept for span windows (2 minutes at the default interval).
const HISTORY_ROUNDS: usize = 120;

/// Mean utilisation, over the monotonic window [start, end], of the GPUs `pid` ran on: the
/// rounds taken during the window (NVML's utilisation covers the period before each round),
/// else the first round after it. None when the process used no GPU then.
pub fn span_utilization(state: &SharedGpu, pid: u32, start: u64, end: u64) -> Option<f64> {
    let s = state.lock().ok()?;
    let mut rounds: Vec<&Round> = s
        .history
        .iter()
        .filter(|(t, _)| *t >= start && *t <= end)
        .collect();
    if rounds.is_empty() {
        rounds.extend(s.history.iter().find(|(t, _)| *t > end));
    }
    let utils: Vec<f64> = rounds
        .iter()
        .flat_map(|(_, gpus)| gpus.iter())
        .filter(|(_, pids)| pids.contains(&pid))
        .filter_map(|(u, _)| *u)
        .collect();
    (!utils.is_empty()).then(|| utils.iter().sum::<f64>() / utils.len() as f64)
}

pub type SharedGpu = Arc<Mutex<GpuState>>;

/// Fields already reported as unsupported, per GPU, so each is logged once.
type Unsupported = HashSet<(u32, &'static str)>;

fn field<T>(
    r: Result<T, NvmlError>,
    gpu: u32,
    name: &'static str,
    unsupported: &mut Unsupported,
) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            if unsupported.insert((gpu, name)) {
                tracing::info!(gpu, field = name, error = %e, "GPU field unavailable; skipped for this GPU");
            }
            None
        }
    }
}

/// Per GPU index: identity as last seen (to name a GPU that stopped answering) and the newest
/// process-utilisation sample timestamp read (NVML returns the samples newer than it).
#[derive(Default)]
struct Known {
    identity: HashMap<u32, (String, String)>,
    last_util_sample: HashMap<u32, u64>,
}

fn sample(
    nvml: &Nvml,
    targets: &TargetSet,
    tracked: &SharedTracked,
    unsupported: &mut Unsupported,
    known: &mut Known,
) -> Result<Vec<GpuSample>, NvmlError> {
    let pids = tracked.read().map(|m| m.clone()).unwrap_or_default();
    let target_of = |pid: u32| {
        pids.get(&pid)
            .and_then(|id| targets.name(*id))
            .unwrap_or_else(|| "other".to_owned())
    };
    let mut out = Vec::new();
    for index in 0..nvml.device_count()? {
        let lost = |known: &Known, unsupported: &mut Unsupported, e: &NvmlError| {
            if unsupported.insert((index, "lost")) {
                tracing::warn!(gpu = index, error = %e, "GPU stopped answering; its series are dropped, the others keep sampling");
            }
            let (uuid, model) = known.identity.get(&index).cloned().unwrap_or_default();
            GpuSample {
                index,
                uuid,
                model,
                lost: true,
                ..GpuSample::default()
            }
        };
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                out.push(lost(known, unsupported, &e));
                continue;
            }
        };
        let identity = device
            .uuid()
            .map(|u| (u, device.name().unwrap_or_default()));
        let (uuid, model) = match identity {
            Ok(id) => id,
            Err(e) => {
                out.push(lost(known, unsupported, &e));
                continue;
            }
        };
        known.identity.insert(index, (uuid.clone(), model.clone()));
        let util = match device.utilization_rates() {
            Err(e @ NvmlError::GpuLost) => {
                out.push(lost(known, unsupported, &e));
                continue;
            }
            r => field(r, index, "utilization", unsupported),
        };
        if unsupported.remove(&(index, "lost")) {
            tracing::info!(gpu = index, "GPU answers again");
        }
        let u = &mut *unsupported;
        let mem = field(device.memory_info(), index, "memory", u);
        let mut s = GpuSample {
            index,
            uuid,
            model,
            lost: false,
            throttle: field(
                device.current_throttle_reasons(),
                index,
                "throttle_reasons",
                u,
            )
            .map(|r| {
                THROTTLE_REASONS
                    .iter()
                    .filter(|(bit, _)| r.contains(*bit))
                    .map(|(_, n)| *n)
                    .collect()
            })
            .unwrap_or_default(),
            utilization: util.as_ref().map(|r| f64::from(r.gpu) / 100.0),
            memory_utilization: util.as_ref().map(|r| f64::from(r.memory) / 100.0),
            memory_used: mem.as_ref().map(|m| m.used as f64),
            memory_total: mem.as_ref().map(|m| m.total as f64),
            power_watts: field(device.power_usage(), index, "power", u)
                .map(|mw| f64::from(mw) / 1e3),
            power_limit_watts: field(device.enforced_power_limit(), index, "power_limit", u)
                .map(|mw| f64::from(mw) / 1e3),
            temperature: field(
                device.temperature(TemperatureSensor::Gpu),
                index,
                "temperature",
                u,
            )
            .map(f64::from),
            sm_clock_hertz: field(device.clock_info(Clock::SM), index, "sm_clock", u)
                .map(|mhz| f64::from(mhz) * 1e6),
            memory_clock_hertz: field(device.clock_info(Clock::Memory), index, "memory_clock", u)
                .map(|mhz| f64::from(mhz) * 1e6),
            energy_joules: field(device.total_energy_consumption(), index, "energy", u)
                .map(|mj| mj as f64 / 1e3),
            ecc: field(
                device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
                index,
                "ecc",
                u,
            )
            .and_then(|corrected| {
                let uncorrected = device
                    .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                    .ok()?;
                Some((corrected, uncorrected))
            }),
            xid_errors: 0,
            process_memory: HashMap::new(),
            process_utilization: HashMap::new(),
            pids: Vec::new(),
        };
        for p in
            field(device.running_compute_processes(), index, "processes", u).unwrap_or_default()
        {
            s.pids.push(p.pid);
            let UsedGpuMemory::Used(bytes) = p.used_gpu_memory else {
                continue;
            };
            *s.process_memory.entry(target_of(p.pid)).or_default() += bytes as f64;
        }
        // NVML keeps several samples per process: the newest per pid is its current use.
        let since = known.last_util_sample.get(&index).copied();
        let samples = field(
            device.process_utilization_stats(since),
            index,
            "process_utilization",
            u,
        )
        .unwrap_or_default();
        let mut newest: HashMap<u32, (u64, u32)> = HashMap::new();
        for p in samples {
            let e = newest.entry(p.pid).or_insert((p.timestamp, p.sm_util));
            if p.timestamp >= e.0 {
                *e = (p.timestamp, p.sm_util);
            }
        }
        if let Some(ts) = newest.values().map(|(ts, _)| *ts).max() {
            known.last_util_sample.insert(index, ts);
        }
        for (pid, (_, sm)) in newest {
            *s.process_utilization.entry(target_of(pid)).or_default() += f64::from(sm) / 100.0;
        }
        out.push(s);
    }
    Ok(out)
}

/// An event set with every GPU that supports critical Xid events registered, if any does.
fn xid_events(nvml: &Nvml) -> Option<EventSet<'_>> {
    let mut set = nvml.create_event_set().ok()?;
    let mut any = false;
    for index in 0..nvml.device_count().unwrap_or(0) {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        if !device
            .supported_event_types()
            .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR))
        {
            tracing::info!(
                gpu = index,
                "GPU reports no Xid events; pipeprobe_gpu_xid_errors_total stays 0 for it"
            );
            continue;
        }
        match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                set = s;
                any = true;
            }
            Err(e) => {
                tracing::warn!(gpu = index, error = %e.error, "cannot register for Xid events");
                // The failed call consumed the set: earlier registrations are lost with it.
                set = nvml.create_event_set().ok()?;
                any = false;
            }
        }
    }
    any.then_some(set)
}

/// Counts the Xid events NVML queued since the last round, without waiting.
fn drain_xids(set: &EventSet<'_>, xids: &mut HashMap<String, u64>) {
    // Bounded: a burst beyond this waits for the next round.
    for _ in 0..1024 {
        let Ok(event) = set.wait(0) else { return };
        let uuid = event.device.uuid().unwrap_or_default();
        let code = match event.event_data {
            Some(XidError::Value(v)) => v.to_string(),
            _ => "unknown".into(),
        };
        tracing::warn!(uuid = %uuid, xid = %code, "GPU Xid error");
        *xids.entry(uuid).or_default() += 1;
    }
}

/// Driver version and GPU count, or why NVML is unavailable (for `pipeprobe check`).
pub fn probe(library: &std::ffi::OsStr) -> Result<(String, u32), String> {
    let nvml = Nvml::builder().lib_path(library).init().map_err(|e| {
        format!(
            "NVML unavailable ({}): {e}; GPU metrics will be off",
            library.to_string_lossy()
        )
    })?;
    let driver = nvml.sys_driver_version().unwrap_or_else(|_| "?".into());
    let count = nvml
        .device_count()
        .map_err(|e| format!("NVML answers but cannot count GPUs: {e}"))?;
    Ok((driver, count))
}

/// Starts the sampling thread. It never ends the agent: NVML errors become state.
pub fn spawn(
    library: OsString,
    interval: Duration,
    targets: Arc<TargetSet>,
    tracked: SharedTracked,
) -> SharedGpu {
    let state = SharedGpu::default();
    let shared = state.clone();
    let spawned = std::thread::Builder::new().name("pipeprobe-nvml".into()).spawn(move || {
        let mut backoff = Duration::from_secs(1);
        let mut logged = None::<String>;
        // Per GPU uuid; kept across reinitialisations so the counter only grows.
        let mut xids: HashMap<String, u64> = HashMap::new();
        loop {
            let nvml = match Nvml::builder().lib_path(library.as_os_str()).init() {
                Ok(n) => n,
                Err(e) => {
                    let reason = format!("NVML unavailable ({}): {e}", library.to_string_lossy());
                    if logged.as_deref() != Some(reason.as_str()) {
                        tracing::warn!("{reason}; GPU metrics off, everything else runs; retrying with backoff");
                        logged = Some(reason.clone());
                    }
                    if let Ok(mut s) = shared.lock() {
                        s.up = false;
                        s.reason = Some(reason);
                        s.gpus.clear();
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    continue;
                }
            };
            backoff = Duration::from_secs(1);
            let driver = nvml.sys_driver_version().ok();
            tracing::info!(driver = driver.as_deref().unwrap_or("?"), gpus = nvml.device_count().unwrap_or(0), "NVML initialised");
            let mut unsupported = Unsupported::new();
            let mut known = Known::default();
            let events = xid_events(&nvml);
            loop {
                if let Some(set) = &events {
                    drain_xids(set, &mut xids);
                }
                let started = std::time::Instant::now();
                let sampled = sample(&nvml, &targets, &tracked, &mut unsupported, &mut known);
                let round_secs = Some(started.elapsed().as_secs_f64());
                match sampled {
                    Ok(mut gpus) => {
                        for g in &mut gpus {
                            g.xid_errors = xids.get(&g.uuid).copied().unwrap_or(0);
                        }
                        if gpus.is_empty() {
                            if logged.as_deref() != Some("no GPU") {
                                tracing::warn!("NVML answers but reports no GPU on this node; GPU metrics off");
                                logged = Some("no GPU".into());
                            }
                            if let Ok(mut s) = shared.lock() {
                                *s = GpuState {
                                    up: false,
                                    reason: Some("the driver reports no GPU".into()),
                                    driver: driver.clone(),
                                    gpus,
                                    round_secs,
                                    history: std::mem::take(&mut s.history),
                                };
                            }
                            std::thread::sleep(interval);
                            continue;
                        }
                        if let Ok(mut s) = shared.lock() {
                            let mut history = std::mem::take(&mut s.history);
                            history.push_back((
                                crate::spans::history::monotonic_ns(),
                                gpus.iter().map(|g| (g.utilization, g.pids.clone())).collect(),
                            ));
                            while history.len() > HISTORY_ROUNDS {
                                history.pop_front();
                            }
                            *s = GpuState { up: true, reason: None, driver: driver.clone(), gpus, round_secs, history };
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "NVML sampling failed; reinitialising");
                        if let Ok(mut s) = shared.lock() {
                            s.up = false;
                            s.reason = Some(format!("NVML sampling failed: {e}"));
                        }
                        break;
                    }
                }
                std::thread::sleep(interval);
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the GPU sampling thread");
    }
    state
}

#[derive(Debug)]
pub struct GpuCollector {
    state: SharedGpu,
}

impl GpuCollector {
    pub fn new(state: SharedGpu) -> Self {
        Self { state }
    }
}

fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    gpus: &[GpuSample],
    value: impl Fn(&GpuSample) -> Option<f64>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for g in gpus {
        if let Some(v) = value(g) {
            let labels = GpuLabels {
                gpu: g.index.to_string(),
                uuid: g.uuid.clone(),
                model: g.model.clone(),
            };
            ConstGauge::new(v).encode(metric.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Collector for GpuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Ok(state) = self.state.lock() else {
            return Ok(());
        };
        let up = encoder.encode_descriptor(
            "pipeprobe_gpu_up",
            "1 when NVML answers on this node, 0 without a driver or GPU (reason in the log and in `pipeprobe check`)",
            None,
            MetricType::Gauge,
        )?;
        let mut up = up;
        ConstGauge::new(i64::from(state.up))
            .encode(up.encode_family(&Vec::<(String, String)>::new())?)?;
        for s in &state.gpus {
            let labels = UpLabels {
                gpu: s.index.to_string(),
                uuid: s.uuid.clone(),
            };
            ConstGauge::new(i64::from(!s.lost)).encode(up.encode_family(&labels)?)?;
        }
        if let Some(secs) = state.round_secs {
            let mut m = encoder.encode_descriptor(
                "pipeprobe_gpu_sample_duration_seconds",
                "How long the last NVML sampling round of all GPUs took",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(secs).encode(m.encode_family(&Vec::<(String, String)>::new())?)?;
        }
        // A lost GPU keeps only its gpu_up 0: its other series go stale.
        let g: Vec<GpuSample> = state.gpus.iter().filter(|s| !s.lost).cloned().collect();
        let g = &g;
        gauges(
            &mut encoder,
            "pipeprobe_gpu_utilization_ratio",
            "Fraction of time a kernel ran on the GPU",
            g,
            |s| s.utilization,
        )?;
        gauges(
            &mut encoder,
            "pipeprobe_gpu_memory_utilization_ratio",
            "Fraction of time device memory was read or written",
            g,
            |s| s.memory_utilization,
        )?;
        gauges(
            &mut encoder,
            "pipeprobe_gpu_memory_used_bytes",
            "Device memory in use",
            g,
            |s| s.memory_used,
        )?;
        gauges(
            &mut encoder,
            "pipeprobe_gpu_memory_total_bytes",
            "Device memory in all",
            g,
            |s| s.memory_total,
        )?;
        gauges(
            &mut encoder,
            "pipeprobe_gpu_power_watts",
            "Power draw",
            g,
            |s| s.power_watts,
        )?;
        gauges(
            &mut encoder,
            "pipeprobe_gpu_power_limit_watts",
            "Enforced power limit",
            g,
            |s| s.power_limit_watts,
        )?;
        gauges(
            &mut encoder,
            "pipeprobe_gpu_temperature_celsius",
            "GPU die temperature",
            g,
            |s| s.temperature,
        )?;
        gauges(
            &mut encoder,
            "pipeprobe_gpu_sm_clock_hertz",
            "Streaming multiprocessor clock",
            g,
            |s| s.sm_clock_hertz,
        )?;
        gauges(
            &mut encoder,
            "pipeprobe_gpu_memory_clock_hertz",
            "Memory clock",
            g,
            |s| s.memory_clock_hertz,
        )?;
        let mut energy = encoder.encode_descriptor(
            "pipeprobe_gpu_energy_joules",
            "Energy used since the driver was loaded",
            None,
            MetricType::Counter,
        )?;
        for s in g {
            if let Some(j) = s.energy_joules {
                let labels = GpuLabels {
                    gpu: s.index.to_string(),
                    uuid: s.uuid.clone(),
                    model: s.model.clone(),
                };
                ConstCounter::new(j).encode(energy.encode_family(&labels)?)?;
            }
        }
        let mut ecc = encoder.encode_descriptor(
            "pipeprobe_gpu_ecc_errors",
            "Volatile ECC memory errors since the driver loaded, by type (GPUs with ECC only)",
            None,
            MetricType::Counter,
        )?;
        for s in g {
            let Some((corrected, uncorrected)) = s.ecc else {
                continue;
            };
            for (r#type, n) in [("corrected", corrected), ("uncorrected", uncorrected)] {
                let labels = EccLabels {
                    gpu: s.index.to_string(),
                    uuid: s.uuid.clone(),
                    model: s.model.clone(),
                    r#type,
                };
                ConstCounter::new(n).encode(ecc.encode_family(&labels)?)?;
            }
        }
        let mut xid = encoder.encode_descriptor(
            "pipeprobe_gpu_xid_errors",
            "Critical Xid errors reported through NVML events since the agent started (codes in the log)",
            None,
            MetricType::Counter,
        )?;
        for s in g {
            let labels = GpuLabels {
                gpu: s.index.to_string(),
                uuid: s.uuid.clone(),
                model: s.model.clone(),
            };
            ConstCounter::new(s.xid_errors).encode(xid.encode_family(&labels)?)?;
        }
        let mut throttle = encoder.encode_descriptor(
            "pipeprobe_gpu_throttle_reason",
            "1 for each reason the GPU's clocks are held back right now",
            None,
            MetricType::Gauge,
        )?;
        for s in g {
            for reason in &s.throttle {
                let labels = ThrottleLabels {
                    gpu: s.index.to_string(),
                    uuid: s.uuid.clone(),
                    model: s.model.clone(),
                    reason,
                };
                ConstGauge::new(1).encode(throttle.encode_family(&labels)?)?;
            }
        }
        let mut util = encoder.encode_descriptor(
            "pipeprobe_gpu_process_utilization_ratio",
            "SM utilisation of the target's processes on the GPU, 0-1 (other: processes outside any target)",
            None,
            MetricType::Gauge,
        )?;
        for s in g {
            let mut targets: Vec<_> = s.process_utilization.iter().collect();
            targets.sort_by(|a, b| a.0.cmp(b.0));
            for (target, ratio) in targets {
                let labels = ProcessLabels {
                    gpu: s.index.to_string(),
                    uuid: s.uuid.clone(),
                    target: target.clone(),
                };
                ConstGauge::new(*ratio).encode(util.encode_family(&labels)?)?;
            }
        }
        let mut procs = encoder.encode_descriptor(
            "pipeprobe_gpu_process_memory_used_bytes",
            "GPU memory of the target's processes (other: processes outside any target)",
            None,
            MetricType::Gauge,
        )?;
        for s in g {
            let mut targets: Vec<_> = s.process_memory.iter().collect();
            targets.sort_by(|a, b| a.0.cmp(b.0));
            for (target, bytes) in targets {
                let labels = ProcessLabels {
                    gpu: s.index.to_string(),
                    uuid: s.uuid.clone(),
                    target: target.clone(),
                };
                ConstGauge::new(*bytes).encode(procs.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
