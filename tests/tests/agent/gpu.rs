//! GPU sampling through the real nvml-wrapper path, against the fake libnvidia-ml.so of
//! tests/nvml-fake (no GPU exists on CI machines), with values scripted per test.
use std::{path::Path, process::Command, time::Duration};

use pipeprobe_tests::{Agent, Proc, find, find_labels, pipeprobe_bin, wait_until};

/// Builds the fake NVML library into `dir`.
pub(crate) fn fake_nvml(dir: &Path) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("nvml-fake/fake_nvml.c");
    let lib = dir.join("libnvidia-ml-fake.so");
    let o = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .expect("gcc runs");
    assert!(
        o.status.success(),
        "building the fake NVML: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    lib
}

/// An agent loading `lib`, scripted by `script` (which need not exist yet).
fn agent(lib: &Path, script: &Path, args: &[&str]) -> Agent {
    let mut cmd = Command::new(pipeprobe_bin());
    cmd.env("PIPEPROBE_FAKE_NVML", script);
    let mut all = vec!["--nvml-library", lib.to_str().unwrap()];
    all.extend_from_slice(args);
    Agent::start_with(cmd, &all)
}

/// `pipeprobe check --nvml-library LIB` with the fake scripted by `script`: its stdout.
fn check(lib: &Path, script: &Path) -> String {
    let out = Command::new(pipeprobe_bin())
        .args(["check", "--nvml-library", lib.to_str().unwrap()])
        .env("PIPEPROBE_FAKE_NVML", script)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The node-level `pipeprobe_gpu_up` (the series without labels; per-GPU ones carry uuid).
fn node_gpu_up(agent: &Agent) -> Option<f64> {
    agent
        .scrape()
        .iter()
        .find(|x| x.name == "pipeprobe_gpu_up" && x.labels.is_empty())
        .map(|x| x.value)
}

fn gpu_value(s: &[pipeprobe_tests::Sample], name: &str, gpu: &str) -> Option<f64> {
    find(s, name, "gpu", gpu)
}

#[test]
fn gpus_and_their_processes_are_exported_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let lib = fake_nvml(dir.path());
    let worker = Proc::spawn(Command::new("sleep").arg("30"));
    let script = dir.path().join("gpus.txt");
    std::fs::write(
        &script,
        format!(
            "driver 550.54.15\n\
             gpu name=NVIDIA-H100 uuid=GPU-1111 util=37 memutil=20 mem_total=85899345920 mem_used=10737418240 \
             power_mw=250500 power_limit_mw=700000 temp=61 energy_mj=123456789 sm_mhz=1755 mem_mhz=2619 throttle=12\n\
             gpu name=NVIDIA-L4 uuid=GPU-2222 util=90 memutil=55 mem_total=24000000000 mem_used=20000000000 \
             power_mw=70000 power_limit_mw=72000 temp=70 sm_mhz=2040 mem_mhz=6251\n\
             proc gpu=0 pid={} mem=536870912 sm=40\n\
             proc gpu=0 pid=1 mem=1000 sm=7\n\
             proc gpu=1 pid={} mem=2048\n",
            worker.pid(),
            worker.pid()
        ),
    )
    .unwrap();
    let agent = agent(
        &lib,
        &script,
        &["--target", &format!("tts=pid:{}", worker.pid())],
    );
    // The first sampling round follows the agent's start.
    let up = || node_gpu_up(&agent);
    assert!(
        wait_until(Duration::from_secs(5), || up() == Some(1.0)).is_some(),
        "gpu_up; log:\n{}",
        agent.log()
    );
    let s = agent.scrape();
    for (name, gpu, want) in [
        ("pipeprobe_gpu_utilization_ratio", "0", 0.37),
        ("pipeprobe_gpu_utilization_ratio", "1", 0.9),
        ("pipeprobe_gpu_memory_utilization_ratio", "1", 0.55),
        ("pipeprobe_gpu_memory_used_bytes", "0", 10737418240.0),
        ("pipeprobe_gpu_memory_total_bytes", "1", 24000000000.0),
        ("pipeprobe_gpu_power_watts", "0", 250.5),
        ("pipeprobe_gpu_power_limit_watts", "1", 72.0),
        ("pipeprobe_gpu_temperature_celsius", "1", 70.0),
        ("pipeprobe_gpu_sm_clock_hertz", "0", 1.755e9),
        ("pipeprobe_gpu_memory_clock_hertz", "1", 6.251e9),
        ("pipeprobe_gpu_energy_joules_total", "0", 123456.789),
    ] {
        assert_eq!(gpu_value(&s, name, gpu), Some(want), "{name}{{gpu={gpu}}}");
    }
    // The L4 reports no energy counter: skipped for that GPU alone, logged once.
    assert_eq!(
        gpu_value(&s, "pipeprobe_gpu_energy_joules_total", "1"),
        None
    );
    assert_eq!(
        agent.log().matches("\"field\":\"energy\"").count(),
        1,
        "{}",
        agent.log()
    );
    let model = s
        .iter()
        .find(|x| x.name == "pipeprobe_gpu_power_watts" && x.labels["gpu"] == "0")
        .unwrap();
    assert_eq!(
        (
            model.labels["uuid"].as_str(),
            model.labels["model"].as_str()
        ),
        ("GPU-1111", "NVIDIA-H100")
    );
    // Per-process memory, attributed to targets; processes outside any target are "other".
    let procs: Vec<_> = s
        .iter()
        .filter(|x| x.name == "pipeprobe_gpu_process_memory_used_bytes")
        .collect();
    let get = |gpu: &str, target: &str| {
        find_labels(
            &s,
            "pipeprobe_gpu_process_memory_used_bytes",
            &[("gpu", gpu), ("target", target)],
        )
    };
    assert_eq!(get("0", "tts"), Some(536870912.0), "{procs:?}");
    assert_eq!(get("0", "other"), Some(1000.0), "{procs:?}");
    assert_eq!(get("1", "tts"), Some(2048.0), "{procs:?}");
    let util = |gpu: &str, target: &str| {
        find_labels(
            &s,
            "pipeprobe_gpu_process_utilization_ratio",
            &[("gpu", gpu), ("target", target)],
        )
    };
    assert_eq!(
        (util("0", "tts"), util("0", "other")),
        (Some(0.4), Some(0.07))
    );
    // One series per active throttle reason (bits 0x4 and 0x8), none for the unthrottled GPU.
    let mut reasons: Vec<(&str, &str)> = s
        .iter()
        .filter(|x| x.name == "pipeprobe_gpu_throttle_reason")
        .map(|x| (x.labels["gpu"].as_str(), x.labels["reason"].as_str()))
        .collect();
    reasons.sort();
    assert_eq!(reasons, [("0", "hw_slowdown"), ("0", "sw_power_cap")]);

    let out = check(&lib, &script);
    assert!(out.contains("driver 550.54.15, 2 GPU(s)"), "{out}");
}

#[test]
fn no_driver_keeps_the_agent_running_and_a_later_driver_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let lib = fake_nvml(dir.path());
    let script = dir.path().join("later.txt");
    // No script yet: the fake answers like a node without a loaded driver.
    let agent = agent(&lib, &script, &["--target", "x=pid:1"]);
    let up = || node_gpu_up(&agent);
    assert!(
        wait_until(Duration::from_secs(3), || up() == Some(0.0)).is_some(),
        "gpu_up {:?}",
        up()
    );
    assert_eq!(
        agent.value("pipeprobe_probe_attached", "probe", "sched"),
        Some(1.0)
    );
    assert!(
        agent.log().contains("NVML unavailable") && agent.log().contains("driver is not loaded"),
        "{}",
        agent.log()
    );
    // The driver "arrives": the retry with backoff (1 s, 2 s, ...) picks it up.
    std::fs::write(
        &script,
        "driver 1.0\ngpu name=G uuid=GPU-9 util=5 mem_total=100 mem_used=1\n",
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(8), || up() == Some(1.0)).is_some(),
        "driver not picked up: {}",
        agent.log()
    );
    assert_eq!(
        agent.value("pipeprobe_gpu_utilization_ratio", "gpu", "0"),
        Some(0.05)
    );
    // Logged once, not at every retry.
    assert_eq!(
        agent.log().matches("NVML unavailable").count(),
        1,
        "{}",
        agent.log()
    );
}

#[test]
fn a_lost_gpu_goes_stale_alone() {
    let dir = tempfile::tempdir().unwrap();
    let lib = fake_nvml(dir.path());
    let script = dir.path().join("lost.txt");
    std::fs::write(
        &script,
        "driver 550\n\
         gpu name=A uuid=GPU-LOST util=10 mem_total=100 mem_used=10 lost_after=3\n\
         gpu name=B uuid=GPU-FINE util=20 mem_total=100 mem_used=20\n",
    )
    .unwrap();
    let config = pipeprobe_tests::config_file("[gpu]\ninterval_secs = 0.1\n[targets.x]\npid = 1\n");
    let agent = agent(
        &lib,
        &script,
        &["--config", config.path().to_str().unwrap()],
    );
    let up = |uuid: &str| find(&agent.scrape(), "pipeprobe_gpu_up", "uuid", uuid);
    assert!(
        wait_until(Duration::from_secs(5), || up("GPU-LOST") == Some(0.0)).is_some(),
        "GPU-LOST still up: {:?}\n{}",
        up("GPU-LOST"),
        agent.log()
    );
    let s = agent.scrape();
    assert_eq!(find(&s, "pipeprobe_gpu_up", "uuid", "GPU-FINE"), Some(1.0));
    // The node's NVML is still up; the lost GPU's other series are gone, the other GPU's stay.
    assert!(
        s.iter()
            .any(|x| x.name == "pipeprobe_gpu_up" && x.labels.is_empty() && x.value == 1.0)
    );
    assert_eq!(
        find(&s, "pipeprobe_gpu_utilization_ratio", "uuid", "GPU-LOST"),
        None
    );
    assert_eq!(
        find(&s, "pipeprobe_gpu_utilization_ratio", "uuid", "GPU-FINE"),
        Some(0.2)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        agent.log().matches("GPU stopped answering").count(),
        1,
        "{}",
        agent.log()
    );
    assert_eq!(
        find(
            &agent.scrape(),
            "pipeprobe_gpu_utilization_ratio",
            "uuid",
            "GPU-FINE"
        ),
        Some(0.2)
    );
}

#[test]
fn ecc_and_xid_errors_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let lib = fake_nvml(dir.path());
    let script = dir.path().join("xid.txt");
    std::fs::write(
        &script,
        "driver 550\n\
         gpu name=A uuid=GPU-ECC util=10 mem_total=100 mem_used=10 ecc_corrected=5 ecc_uncorrected=1\n\
         gpu name=B uuid=GPU-NOECC util=20 mem_total=100 mem_used=20\n\
         xid gpu=0 code=79 after=2\n\
         xid gpu=0 code=48 after=3\n",
    )
    .unwrap();
    let config = pipeprobe_tests::config_file("[gpu]\ninterval_secs = 0.1\n[targets.x]\npid = 1\n");
    let agent = agent(
        &lib,
        &script,
        &["--config", config.path().to_str().unwrap()],
    );
    let xid = |uuid: &str| {
        find(
            &agent.scrape(),
            "pipeprobe_gpu_xid_errors_total",
            "uuid",
            uuid,
        )
    };
    assert!(
        wait_until(Duration::from_secs(5), || xid("GPU-ECC") == Some(2.0)).is_some(),
        "xid {:?}\n{}",
        xid("GPU-ECC"),
        agent.log()
    );
    assert_eq!(xid("GPU-NOECC"), Some(0.0));
    assert!(
        agent.log().contains("\"xid\":\"79\"") && agent.log().contains("\"xid\":\"48\""),
        "{}",
        agent.log()
    );
    let s = agent.scrape();
    let ecc = |uuid: &str, t: &str| {
        find_labels(
            &s,
            "pipeprobe_gpu_ecc_errors_total",
            &[("uuid", uuid), ("type", t)],
        )
    };
    assert_eq!(
        (ecc("GPU-ECC", "corrected"), ecc("GPU-ECC", "uncorrected")),
        (Some(5.0), Some(1.0))
    );
    // Without ECC support: no series, not zeros.
    assert_eq!(ecc("GPU-NOECC", "corrected"), None);
}

#[test]
fn a_driver_without_gpus_is_gpu_up_0() {
    let dir = tempfile::tempdir().unwrap();
    let lib = fake_nvml(dir.path());
    let script = dir.path().join("none.txt");
    std::fs::write(&script, "driver 550\n").unwrap();
    let agent = agent(&lib, &script, &["--target", "x=pid:1"]);
    let up = || node_gpu_up(&agent);
    assert!(
        wait_until(Duration::from_secs(3), || agent
            .log()
            .contains("reports no GPU"))
        .is_some(),
        "{}",
        agent.log()
    );
    assert_eq!(up(), Some(0.0));
    let out = check(&lib, &script);
    assert!(
        out.contains("driver 550 answers but reports no GPU"),
        "{out}"
    );
}
