//! The short soak that runs in CI (`cargo xtask soak` is the long one): thousands of
//! short-lived target processes per minute, each with threads, while the agent runs with every
//! probe, span history and continuous sampling. Afterwards nothing of them is left in the
//! kernel's tracked-process map or the target's count, and the agent's descriptors and memory
//! did not grow with the churn.
use std::{process::Command, time::Duration};

use pipeprobe_tests::{Agent, Proc, config_file, wait_until};

/// The tgids in the kernel's tracked-process map (bpftool, which CI installs).
pub(crate) fn tracked_in_kernel() -> Vec<u32> {
    let o = Command::new("bpftool")
        .args(["map", "dump", "name", "TRACKED", "-j"])
        .output()
        .expect("bpftool runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let entries: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    entries
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let bytes: Vec<u8> = e["key"]
                .as_array()?
                .iter()
                .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
                .collect();
            Some(u32::from_le_bytes(bytes.try_into().ok()?))
        })
        .collect()
}

pub(crate) fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

pub(crate) fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[test]
fn process_churn_leaves_nothing_behind() {
    let marker = format!("churn-{}", std::process::id());
    let fg = tempfile::tempdir().unwrap();
    let cfg = config_file(&format!(
        "rescan_interval_secs = 1\n[otlp]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         flamegraph_dir = \"{}\"\n[gpu]\nenabled = false\n[targets.churn]\ncmdline = \"{marker}\"\n",
        fg.path().display()
    ));
    let agent = Agent::start(&["--config", cfg.path().to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(1));
    let (fds0, rss0) = (fds(agent.pid()), rss_kb(agent.pid()));

    // 100 processes a second (6,000 a minute), two threads each, for 15 s.
    let mut churn = Proc::workload_piped(
        None,
        &[
            "churn", "--marker", &marker, "--rate", "100", "--secs", "15",
        ],
    );
    let children: u64 = churn.read_line_starting("CHILDREN ").parse().unwrap();
    drop(churn);
    let emptied = wait_until(Duration::from_secs(5), || {
        agent.value("pipeprobe_target_processes", "target", "churn") == Some(0.0)
    });
    let stale: Vec<u32> = tracked_in_kernel()
        .into_iter()
        .filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .collect();
    let (fds1, rss1) = (fds(agent.pid()), rss_kb(agent.pid()));
    let s = agent.scrape();
    let lost =
        |reason: &str| pipeprobe_tests::find(&s, "pipeprobe_events_lost_total", "reason", reason);
    eprintln!(
        "{children} children: agent fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} kB, stale tracked {stale:?}, \
         lost tracked_map_full {:?} proc_events_full {:?}",
        lost("tracked_map_full"),
        lost("proc_events_full")
    );
    assert!(children > 1000, "only {children} children");
    assert!(
        emptied.is_some(),
        "the target still counts processes after the churn"
    );
    assert!(stale.is_empty(), "dead pids in the kernel's map: {stale:?}");
    assert!(
        fds1 <= fds0 + 4,
        "descriptors grew with the churn: {fds0} -> {fds1}"
    );
    assert!(rss1 <= rss0 + 16 * 1024, "RSS grew by {} kB", rss1 - rss0);
    assert_eq!(lost("tracked_map_full"), Some(0.0));
    assert_eq!(lost("proc_events_full"), Some(0.0));
}
