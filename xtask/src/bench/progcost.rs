//! What one run of each BPF program costs, from the kernel's own accounting
//! (`kernel.bpf_stats_enabled`: run time and run count per program). Throughput ratios say what a
//! workload loses; this says where, per hook, without the rounds' noise. The accounting adds its
//! own two clock reads to every run: the floor's empty programs show that share.
use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use anyhow::Context as _;

use super::overhead::{Scenario, Variant, run_during};

/// The cost of one program under one variant of one workload.
pub struct ProgCost {
    pub program: String,
    pub runs_per_sec: f64,
    pub ns_per_run: f64,
}

/// (name, run time in ns, runs) of every loaded program, by id.
fn snapshot() -> anyhow::Result<BTreeMap<u64, (String, u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool prog show")?;
    anyhow::ensure!(out.status.success(), "bpftool prog show failed");
    let progs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(progs
        .iter()
        .filter_map(|p| {
            Some((
                p["id"].as_u64()?,
                (
                    p["name"].as_str()?.to_owned(),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                ),
            ))
        })
        .collect())
}

/// Turns `kernel.bpf_stats_enabled` on while alive, back to what it was after.
struct Stats(String);

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl Stats {
    fn on() -> anyhow::Result<Self> {
        let was = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?;
        std::fs::write(STATS_SYSCTL, "1").with_context(|| format!("writing {STATS_SYSCTL}"))?;
        Ok(Self(was.trim().to_owned()))
    }
}

impl Drop for Stats {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS_SYSCTL, &self.0);
    }
}

/// Each program the variant loaded (those present before it started are left out), with its
/// runs per second and mean run time over `secs` of the workload.
pub fn measure(s: &Scenario, v: &Variant, secs: f64, dir: &Path) -> anyhow::Result<Vec<ProgCost>> {
    let before = snapshot()?;
    let _stats = Stats::on()?;
    let window = (secs - 0.5).max(0.5);
    let (a, b) = run_during(s, v, secs, dir, || {
        let a = snapshot()?;
        std::thread::sleep(Duration::from_secs_f64(window));
        let b = snapshot()?;
        Ok((a, b))
    })?;
    let mut costs: Vec<ProgCost> = b
        .iter()
        .filter(|(id, _)| !before.contains_key(id))
        .filter_map(|(id, (name, t1, c1))| {
            let (_, t0, c0) = a.get(id)?;
            let runs = c1.saturating_sub(*c0);
            // Programs that hardly ran here (exec, fork, TCP hooks on a pipe workload) say
            // nothing about this workload's cost.
            (runs as f64 / window >= 1000.0).then(|| ProgCost {
                program: name.clone(),
                runs_per_sec: runs as f64 / window,
                ns_per_run: t1.saturating_sub(*t0) as f64 / runs as f64,
            })
        })
        .collect();
    costs.sort_by(|x, y| x.program.cmp(&y.program));
    Ok(costs)
}
