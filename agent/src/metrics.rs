//! The metric registry and the agent's own metrics. Probe families register collectors that read
//! their BPF maps at scrape time, so nothing is polled between scrapes.
use std::sync::atomic::{AtomicBool, Ordering};

use agent_common::hist::{Log2Hist, SLOTS, slot_upper_us};
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, NoLabelSet},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

/// Zeroes slot `id` of a per-CPU array on every CPU (a retired pod id, before its reuse).
pub fn zero_per_cpu<T: aya::Pod>(
    map: &mut aya::maps::PerCpuArray<aya::maps::MapData, T>,
    id: u32,
    zero: T,
) {
    let zeroed = aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .and_then(|n| aya::maps::PerCpuValues::try_from(vec![zero; n]));
    let result = match zeroed {
        Ok(v) => map.set(id, v, 0).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = result {
        tracing::warn!(id, "cannot zero a retired pod's numbers: {e}");
    }
}

/// Removes the entries of retired pod ids from a hash map whose keys carry a kernel id.
pub fn remove_retired<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    retired: &[u32],
    id_of: impl Fn(&K) -> u32,
) {
    if retired.is_empty() {
        return;
    }
    let gone: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| retired.contains(&id_of(k)))
        .collect();
    for k in gone {
        let _ = map.remove(&k);
    }
}

/// A target's labels: its name, and for a pod's own kernel id (`[kubernetes] pod_labels`) the
/// pod's namespace, name and container.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TargetLabels {
    pub target: String,
    pub pod: Option<std::sync::Arc<crate::instances::PodIdentity>>,
}

impl TargetLabels {
    pub fn of(target: &str) -> Self {
        Self {
            target: target.to_owned(),
            pod: None,
        }
    }
}

impl EncodeLabelSet for TargetLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        let mut labels = vec![("target", self.target.as_str())];
        if let Some(p) = &self.pod {
            labels.extend([
                ("namespace", p.namespace.as_str()),
                ("pod", p.pod.as_str()),
                ("container", p.container.as_str()),
            ]);
        }
        labels.encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// The agent's own metrics, shared by the parts that update them.
#[derive(Debug, Clone, Default)]
pub struct AgentMetrics {
    pub target_processes: Family<TargetLabels, Gauge>,
    pub probe_attached: Family<ProbeLabels, Gauge>,
    /// Python processes whose stacks a capture could not walk (version, stripped interpreter).
    pub python_unwind_unsupported: Counter,
    /// 1 while the last configuration (start or reload) was applied, 0 after a refused reload.
    pub config_last_reload_successful: Gauge,
}

/// Everything `/metrics` serves.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    ready: AtomicBool,
}

impl Metrics {
    pub fn new(agent: &AgentMetrics) -> Self {
        let mut registry = Registry::default();
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register(
            "pipeprobe_build_info",
            "pipeprobe build; the value is always 1",
            build,
        );
        registry.register(
            "pipeprobe_target_processes",
            "Processes currently tracked per target",
            agent.target_processes.clone(),
        );
        registry.register(
            "pipeprobe_probe_attached",
            "1 if the probe family is attached, 0 if not (reason in the log and in `pipeprobe check`)",
            agent.probe_attached.clone(),
        );
        registry.register(
            "pipeprobe_python_unwind_unsupported",
            "Python processes of flamegraph captures whose Python frames could not be walked (unsupported version or stripped interpreter); their frames are native only",
            agent.python_unwind_unsupported.clone(),
        );
        agent.config_last_reload_successful.set(1);
        registry.register(
            "pipeprobe_config_last_reload_successful",
            "1 if the last configuration (at start, or reloaded by SIGHUP or `pipeprobe reload`) was applied, 0 if the last reload was refused (reason in the log); a refused reload keeps the previous targets",
            agent.config_last_reload_successful.clone(),
        );
        Self {
            registry,
            ready: AtomicBool::new(false),
        }
    }

    /// For parts that register their own metric families (spans).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn register_collector(&mut self, c: Box<dyn prometheus_client::collector::Collector>) {
        self.registry.register_collector(c);
    }

    /// Text exposition: OpenMetrics 1.0 when `openmetrics`, else the classic 0.0.4 format.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let res = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        if let Err(e) = res {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// Encodes one log2 histogram per label set under one descriptor (`{name}_seconds`).
pub fn encode_log2_histograms<'a, L: EncodeLabelSet + 'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, Log2Hist)>,
) -> std::fmt::Result {
    let mut metric =
        encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (labels, hist) in series {
        let buckets: Vec<(f64, u64)> = (0..SLOTS)
            .map(|k| {
                let le = slot_upper_us(k).map_or(f64::INFINITY, |us| us as f64 / 1e6);
                (le, hist.slots[k])
            })
            .collect();
        metric
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(
                hist.sum_ns as f64 / 1e9,
                hist.count(),
                &buckets,
                None,
            )?;
    }
    Ok(())
}

/// Encodes a counter family from `(labels, value)` pairs under one descriptor.
pub fn encode_counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        let counter = prometheus_client::metrics::counter::ConstCounter::new(value);
        counter.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(Log2Hist);
    impl prometheus_client::collector::Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
            encode_log2_histograms(
                &mut encoder,
                "pipeprobe_test_delay",
                "test",
                [(TargetLabels::of("stt"), self.0)],
            )?;
            encode_counters(
                &mut encoder,
                "pipeprobe_test_lost",
                "test",
                [(ProbeLabels { probe: "x".into() }, 7)],
            )
        }
    }

    fn metrics() -> (Metrics, AgentMetrics) {
        let agent = AgentMetrics::default();
        let mut m = Metrics::new(&agent);
        let mut h = Log2Hist::ZERO;
        h.slots[0] = 2; // <= 1 us
        h.slots[3] = 5; // <= 8 us
        h.slots[SLOTS - 1] = 1; // overflow
        h.sum_ns = 5_000_000_000;
        m.register_collector(Box::new(Fixed(h)));
        (m, agent)
    }

    #[test]
    fn histograms_are_cumulative_with_base_units() {
        let (m, agent) = metrics();
        agent
            .target_processes
            .get_or_create(&TargetLabels::of("stt"))
            .set(3);
        let text = m.encode(false);
        for line in [
            "# TYPE pipeprobe_test_delay_seconds histogram",
            r#"pipeprobe_test_delay_seconds_bucket{target="stt",le="1e-06"} 2"#,
            r#"pipeprobe_test_delay_seconds_bucket{target="stt",le="4e-06"} 2"#,
            r#"pipeprobe_test_delay_seconds_bucket{target="stt",le="8e-06"} 7"#,
            r#"pipeprobe_test_delay_seconds_bucket{target="stt",le="4.194304"} 7"#,
            r#"pipeprobe_test_delay_seconds_bucket{target="stt",le="+Inf"} 8"#,
            r#"pipeprobe_test_delay_seconds_count{target="stt"} 8"#,
            r#"pipeprobe_test_delay_seconds_sum{target="stt"} 5.0"#,
            r#"pipeprobe_test_lost_total{probe="x"} 7"#,
            r#"pipeprobe_target_processes{target="stt"} 3"#,
            r#"pipeprobe_build_info{version=""#,
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        assert!(!text.contains("# EOF"), "classic format has no EOF marker");
    }

    #[test]
    fn openmetrics_has_units_and_eof() {
        let (m, _) = metrics();
        let text = m.encode(true);
        assert!(
            text.contains("# UNIT pipeprobe_test_delay_seconds seconds"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
