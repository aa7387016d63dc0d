//! Turns received spans into metrics and enriched spans: each span of a sampled process gets
//! what its thread (or its process) went through during the span's window.
use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value::Value},
};
use tokio::sync::mpsc;

use super::{
    SpanMetrics,
    flamegraphs::SpanFlamegraphs,
    history::{Breakdown, SharedHistory, TICK, monotonic_ns, realtime_ns},
};

/// Most distinct span names per service (and services) with their own series.
pub struct Caps {
    pub span_names: usize,
    pub services: usize,
}

/// Keeps the first `cap` names of each service; later ones become `other`.
#[derive(Default)]
struct NameCap {
    services: HashMap<String, HashSet<String>>,
}

impl NameCap {
    fn labels(&mut self, caps: &Caps, service: &str, span: &str) -> (String, String) {
        let service = if self.services.contains_key(service) || self.services.len() < caps.services
        {
            service.to_owned()
        } else {
            "other".to_owned()
        };
        let names = self.services.entry(service.clone()).or_default();
        let span = if names.contains(span) || names.len() < caps.span_names {
            names.insert(span.to_owned());
            span.to_owned()
        } else {
            "other".to_owned()
        };
        (service, span)
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn attr_u32(attrs: &[KeyValue], key: &str) -> Option<u32> {
    match attr(attrs, key)? {
        Value::IntValue(v) => u32::try_from(*v).ok(),
        Value::StringValue(s) => s.parse().ok(),
        _ => None,
    }
}

fn double(key: &str, v: f64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::DoubleValue(v)),
        }),
        ..KeyValue::default()
    }
}

fn int(key: &str, v: u64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(v as i64)),
        }),
        ..KeyValue::default()
    }
}

/// The attributes a breakdown adds to its span.
fn attributes(b: &Breakdown, per_thread: bool) -> Vec<KeyValue> {
    let mut attrs = vec![
        double("pipeprobe.runqueue_delay_ms", b.runq_ns as f64 / 1e6),
        double("pipeprobe.offcpu_ms", b.blocked_ns as f64 / 1e6),
        double("pipeprobe.syscall_ms", b.syscall_ns as f64 / 1e6),
        int("pipeprobe.syscalls", b.syscalls),
        KeyValue {
            key: "pipeprobe.scope".to_owned(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(
                    if per_thread { "thread" } else { "process" }.to_owned(),
                )),
            }),
            ..KeyValue::default()
        },
    ];
    // The process's, whatever the scope: the kernel charges retransmits to the socket's owner.
    if let Some(r) = b.retransmits {
        attrs.push(int("pipeprobe.tcp_retransmits", r));
    }
    attrs
}

/// What processing draws on.
pub struct Sources {
    pub queue: mpsc::Receiver<ExportTraceServiceRequest>,
    /// Host ids of spans from containers.
    pub host_ids: super::pidns::HostIds,
    pub history: Option<SharedHistory>,
    pub gpu: Option<crate::gpu::SharedGpu>,
    pub metrics: SpanMetrics,
    pub caps: Caps,
    pub forward: Option<mpsc::Sender<ExportTraceServiceRequest>>,
    pub flamegraphs: Option<std::sync::Arc<SpanFlamegraphs>>,
}

/// Draws the flamegraph of a span from the continuous samples of its thread (else its
/// process) inside its window; the stored id, or None without samples.
async fn span_flamegraph(
    fg: &SpanFlamegraphs,
    span: &opentelemetry_proto::tonic::trace::v1::Span,
    trace_id: &str,
    service: &str,
    pid: u32,
    tid: Option<u32>,
    (start, end): (u64, u64),
) -> Option<String> {
    let secs = end.saturating_sub(start) as f64 / 1e9;
    let period_us = 1_000_000 / fg.hz.max(1);
    let (samples, pythons) = fg.samples.lock().ok().map(|s| {
        let samples = match tid.map(|t| s.window(pid, Some(t), (start, end), period_us)) {
            Some(v) if !v.is_empty() => v,
            _ => s.window(pid, None, (start, end), period_us),
        };
        let pythons: std::collections::HashMap<_, _> = s
            .pythons
            .get(&pid)
            .map(|i| (pid, i.clone()))
            .into_iter()
            .collect();
        (samples, pythons)
    })?;
    let on_cpu = samples.iter().filter(|s| !s.off_cpu).count();
    let off_ms: u64 = samples
        .iter()
        .filter(|s| s.off_cpu)
        .map(|s| s.weight)
        .sum::<u64>()
        / 1000;
    let span_id: String = span.span_id.iter().map(|x| format!("{x:02x}")).collect();
    let id = format!("{trace_id}-{span_id}");
    let title = format!(
        "pipeprobe span flamegraph: {service} / {} ({:.0} ms), pid {pid}{}: {on_cpu} on-CPU samples at {} Hz, {off_ms} ms off-CPU",
        span.name,
        secs * 1e3,
        tid.map(|t| format!(" tid {t}")).unwrap_or_default(),
        fg.hz
    );
    fg.drawer
        .draw(fg.store.clone(), id, title, samples, pythons)
        .await
}

/// Processes queued requests until the queue closes.
pub async fn run(sources: Sources) {
    let Sources {
        mut queue,
        mut host_ids,
        history,
        gpu,
        metrics,
        caps,
        forward,
        flamegraphs,
    } = sources;
    let mut names = NameCap::default();
    while let Some(mut req) = queue.recv().await {
        // Both clocks read together: spans carry wall-clock times, the history monotonic ones.
        let offset = realtime_ns().saturating_sub(monotonic_ns());
        let to_mono = |unix: u64| unix.saturating_sub(offset);
        // A window is complete once the sampler has passed its end by a tick; a span that
        // ended "just now" waits that long (bounded: late spans are taken as they are).
        let latest = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|s| to_mono(s.end_time_unix_nano))
            .max()
            .unwrap_or(0);
        if let Some(h) = &history {
            for _ in 0..20 {
                let done = h.lock().map(|h| h.sampled_to).unwrap_or(u64::MAX);
                if done >= latest + TICK.as_nanos() as u64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for rs in &mut req.resource_spans {
            let res = rs
                .resource
                .as_ref()
                .map(|r| &r.attributes[..])
                .unwrap_or(&[]);
            let service = match attr(res, "service.name") {
                Some(Value::StringValue(s)) => s.clone(),
                _ => "unknown_service".to_owned(),
            };
            // In a container the SDK's ids are its PID namespace's: resolve them through the
            // container or pod the resource names; unresolved, the span goes unenriched rather
            // than to whatever host process has that number.
            let owner = match (attr(res, "container.id"), attr(res, "k8s.pod.uid")) {
                (Some(Value::StringValue(c)), _) => Some(super::pidns::Owner::Container(c.clone())),
                (_, Some(Value::StringValue(p))) => Some(super::pidns::Owner::Pod(p.clone())),
                _ => None,
            };
            let ns_pid = attr_u32(res, "process.pid");
            let pid = match &owner {
                Some(o) => ns_pid.and_then(|p| host_ids.host_pid(o, p)),
                None => ns_pid,
            };
            for ss in &mut rs.scope_spans {
                for span in &mut ss.spans {
                    metrics.received.inc();
                    let (service_l, span_l) = names.labels(&caps, &service, &span.name);
                    let secs = span
                        .end_time_unix_nano
                        .saturating_sub(span.start_time_unix_nano)
                        as f64
                        / 1e9;
                    let trace_id: String =
                        span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    let tid = attr_u32(&span.attributes, "thread.id").and_then(|t| match owner {
                        Some(_) => super::pidns::host_tid(pid?, t),
                        None => Some(t),
                    });
                    let (start, end) = (
                        to_mono(span.start_time_unix_nano),
                        to_mono(span.end_time_unix_nano),
                    );
                    // Its process's next blocking switches take off-CPU stacks, for its next spans.
                    if let (Some(fg), Some(pid)) = (&flamegraphs, pid)
                        && let Some(senders) = &fg.senders
                        && let Ok(mut senders) = senders.lock()
                    {
                        senders.mark(pid);
                    }
                    let slow = flamegraphs
                        .as_ref()
                        .is_some_and(|fg| secs >= fg.threshold(&span.name).as_secs_f64());
                    let drawn = match (&flamegraphs, pid) {
                        (Some(fg), Some(pid))
                            if secs >= fg.threshold(&span.name).as_secs_f64()
                                && fg.due(&service_l, &span_l) =>
                        {
                            span_flamegraph(fg, span, &trace_id, &service, pid, tid, (start, end))
                                .await
                        }
                        _ => None,
                    };
                    // The exemplar links the slow span's trace and, when drawn, its flamegraph.
                    let mut exemplar = vec![("trace_id".to_owned(), trace_id)];
                    if let Some(id) = &drawn {
                        exemplar.push(("flamegraph".to_owned(), id.clone()));
                        span.attributes.push(KeyValue {
                            key: "pipeprobe.flamegraph".to_owned(),
                            value: Some(AnyValue {
                                value: Some(Value::StringValue(id.clone())),
                            }),
                            ..KeyValue::default()
                        });
                    }
                    // A slow span the rate limit left without a flamegraph does not replace the
                    // exemplar of one that has it (its trace id still goes to the backend).
                    let exemplar = (!slow || drawn.is_some()).then_some(exemplar);
                    metrics.observe_duration(&service_l, &span_l, secs, exemplar);
                    let Some(pid) = pid else { continue };
                    if let Some(util) = gpu
                        .as_ref()
                        .and_then(|g| crate::gpu::span_utilization(g, pid, start, end))
                    {
                        span.attributes
                            .push(double("pipeprobe.gpu_utilization", util));
                    }
                    let Some(h) = &history else { continue };
                    let b = h.lock().ok().and_then(|h| {
                        let per_thread = tid.and_then(|t| {
                            h.window(pid, Some(t), start, end)
                                .filter(|b| b.threads == 1)
                        });
                        match per_thread {
                            Some(b) => Some((b, true)),
                            None => h.window(pid, None, start, end).map(|b| (b, false)),
                        }
                    });
                    let Some((b, per_thread)) = b else { continue };
                    metrics.observe_breakdown(&service_l, &span_l, &b);
                    span.attributes.extend(attributes(&b, per_thread));
                }
            }
        }
        if let Some(f) = &forward {
            let n = super::span_count(&req);
            if f.try_send(req).is_err() {
                metrics.dropped_n("forward_queue_full", n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_names_past_the_cap_fold_into_other() {
        let caps = Caps {
            span_names: 2,
            services: 1,
        };
        let mut c = NameCap::default();
        assert_eq!(c.labels(&caps, "tts", "a"), ("tts".into(), "a".into()));
        assert_eq!(c.labels(&caps, "tts", "b"), ("tts".into(), "b".into()));
        assert_eq!(c.labels(&caps, "tts", "c"), ("tts".into(), "other".into()));
        assert_eq!(c.labels(&caps, "tts", "a"), ("tts".into(), "a".into()));
        assert_eq!(c.labels(&caps, "stt", "x").0, "other");
    }
}
