//! `pipeprobe check`: what this host supports, as a table, by trying the real thing (loading the
//! agent's own programs and attaching each probe family, then detaching).
use std::fmt::Write as _;

use aya::{maps::MapType, programs::ProgramType};

use crate::{
    btf::{KernelBtf, TaskOffsets, VMLINUX},
    caps, ebpf, gpu, probes, tracefs,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The agent runs without it, with less.
    Warn,
    /// The agent cannot run.
    Fail,
}

#[derive(Debug)]
pub struct Row {
    pub what: String,
    pub status: Status,
    pub detail: String,
}

fn row(what: impl Into<String>, status: Status, detail: impl Into<String>) -> Row {
    Row {
        what: what.into(),
        status,
        detail: detail.into(),
    }
}

/// Runs every check; `nvml` is the NVML library to try.
pub fn rows(nvml: &std::path::Path) -> Vec<Row> {
    let mut rows = Vec::new();
    let privileged = match caps::require() {
        Ok(()) => {
            rows.push(row(
                "privileges",
                Status::Ok,
                "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)",
            ));
            true
        }
        Err(e) => {
            rows.push(row("privileges", Status::Fail, e.to_string()));
            false
        }
    };
    if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        rows.push(row("kernel", Status::Ok, release.trim()));
    }
    match KernelBtf::load(VMLINUX).and_then(|b| TaskOffsets::from_btf(&b)) {
        Ok(o) => rows.push(row(
            "kernel BTF",
            Status::Ok,
            format!(
                "{VMLINUX}: task_struct pid@{} tgid@{} state@{}",
                o.pid, o.tgid, o.state
            ),
        )),
        Err(e) => rows.push(row("kernel BTF", Status::Fail, e.to_string())),
    }
    match tracefs::find() {
        Some(p) => rows.push(row(
            "tracefs",
            Status::Ok,
            format!("mounted at {}", p.display()),
        )),
        None => rows.push(row(
            "tracefs",
            Status::Warn,
            format!(
                "not mounted; `pipeprobe agent` mounts it at {}",
                tracefs::TRACEFS
            ),
        )),
    }
    rows.push(match gpu::probe(nvml.as_os_str()) {
        Ok((driver, 0)) => row(
            "GPU (NVML)",
            Status::Warn,
            format!("driver {driver} answers but reports no GPU"),
        ),
        Ok((driver, count)) => row(
            "GPU (NVML)",
            Status::Ok,
            format!("driver {driver}, {count} GPU(s)"),
        ),
        // No GPU on this node: everything else still runs.
        Err(reason) => row("GPU (NVML)", Status::Warn, reason),
    });
    if !privileged {
        return rows;
    }
    for (name, ty) in [
        ("tracing (fentry/fexit)", ProgramType::Tracing),
        ("tracepoint", ProgramType::TracePoint),
        ("raw tracepoint", ProgramType::RawTracePoint),
        ("perf_event", ProgramType::PerfEvent),
    ] {
        rows.push(match aya::sys::is_program_supported(ty) {
            Ok(true) => row(format!("program type {name}"), Status::Ok, "supported"),
            Ok(false) => row(
                format!("program type {name}"),
                Status::Warn,
                "not supported by this kernel",
            ),
            Err(e) => row(
                format!("program type {name}"),
                Status::Warn,
                format!("probe failed: {e}"),
            ),
        });
    }
    for (name, ty) in [
        ("hash", MapType::Hash),
        ("per-CPU array", MapType::PerCpuArray),
        ("ring buffer", MapType::RingBuf),
    ] {
        rows.push(match aya::sys::is_map_supported(ty) {
            Ok(true) => row(format!("map type {name}"), Status::Ok, "supported"),
            Ok(false) => row(
                format!("map type {name}"),
                Status::Fail,
                "not supported by this kernel",
            ),
            Err(e) => row(
                format!("map type {name}"),
                Status::Fail,
                format!("probe failed: {e}"),
            ),
        });
    }
    match ebpf::load(ebpf::LoadOptions::default()) {
        Ok((mut kernel, btf)) => {
            rows.push(row("eBPF object", Status::Ok, "maps created"));
            rows.push(sched_clock(&mut kernel));
            for s in probes::attach_all(&mut kernel.bpf, &btf, &[], &kernel.unavailable) {
                rows.push(match s.result {
                    Ok(()) => row(
                        format!("probe {}", s.name),
                        Status::Ok,
                        "loads and attaches",
                    ),
                    Err(e) => row(format!("probe {}", s.name), Status::Warn, e.short()),
                });
            }
            // Dropping `kernel` detaches everything.
        }
        Err(e) => rows.push(row("eBPF object", Status::Fail, e.to_string())),
    }
    rows
}

/// Which clock the scheduler programs read, and how far it is from CLOCK_MONOTONIC.
fn sched_clock(kernel: &mut ebpf::Kernel) -> Row {
    const WHAT: &str = "scheduler clock";
    if kernel.offsets.cfs_rq == 0 {
        return row(
            WHAT,
            Status::Warn,
            "no way from a task to its run queue in this kernel's BTF (CONFIG_FAIR_GROUP_SCHED \
             off): bpf_ktime_get_ns, a helper call per scheduler event",
        );
    }
    match crate::clock::SchedClock::load(&mut kernel.bpf).and_then(|c| c.ahead_ns()) {
        Ok(ahead) => row(
            WHAT,
            Status::Ok,
            format!(
                "run queue clock, {:+.3} ms from CLOCK_MONOTONIC",
                ahead as i64 as f64 / 1e6
            ),
        ),
        Err(e) => row(
            WHAT,
            Status::Warn,
            format!("{e}: {}", crate::clock::WITHOUT_IT),
        ),
    }
}

/// The table, and whether the agent can run here.
pub fn render(rows: &[Row]) -> (String, bool) {
    let width = rows.iter().map(|r| r.what.len()).max().unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(out, "{:width$}  STATUS  DETAIL", "CHECK");
    for r in rows {
        let status = match r.status {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        let _ = writeln!(out, "{:width$}  {status:6}  {}", r.what, r.detail);
    }
    let any_probe = rows
        .iter()
        .any(|r| r.what.starts_with("probe ") && r.status == Status::Ok);
    let can_run = !rows.iter().any(|r| r.status == Status::Fail) && any_probe;
    let verdict = if can_run {
        "pipeprobe can run on this host"
    } else if !any_probe && !rows.iter().any(|r| r.status == Status::Fail) {
        "pipeprobe cannot run on this host: no probe family attaches"
    } else {
        "pipeprobe cannot run on this host: see the FAIL rows"
    };
    let _ = writeln!(out, "\n{verdict}");
    (out, can_run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict() {
        let ok = vec![
            row("privileges", Status::Ok, ""),
            row("probe sched", Status::Ok, ""),
        ];
        assert!(render(&ok).1);
        let degraded = vec![
            row("probe a", Status::Ok, ""),
            row("probe b", Status::Warn, "x"),
        ];
        assert!(render(&degraded).1);
        let failed = vec![row("privileges", Status::Fail, "missing CAP_BPF")];
        let (text, can_run) = render(&failed);
        assert!(
            !can_run && text.contains("FAIL") && text.contains("missing CAP_BPF"),
            "{text}"
        );
    }
}
