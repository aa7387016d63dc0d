//! What a user sees from the binary itself: bad input, missing privileges, missing tracefs,
//! `check`, the endpoints.
use std::{
    path::Path,
    process::{Command, Output},
};

use pipeprobe_tests::{Agent, config_file, pipeprobe_bin};

fn agent(args: &[&str]) -> Output {
    Command::new(pipeprobe_bin())
        .arg("agent")
        .args(args)
        .output()
        .expect("pipeprobe runs")
}

fn assert_config_error(args: &[&str], needles: &[&str]) {
    let out = agent(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit code for {args:?}; stderr:\n{stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "`{n}` missing from the error for {args:?}:\n{stderr}"
        );
    }
}

#[test]
fn bad_config_exits_2_naming_file_and_key() {
    let unknown = config_file("[targets.stt]\ncmdlin = \"stt\"\n");
    let p = unknown.path().to_str().unwrap();
    assert_config_error(&["--config", p], &[p, "cmdlin"]);

    let regex = config_file("[targets.stt]\ncmdline = \"(unclosed\"\n");
    let p = regex.path().to_str().unwrap();
    assert_config_error(
        &["--config", p],
        &[p, "targets.stt.cmdline[0]", "invalid regex"],
    );

    let dup = config_file("[targets.stt]\npid = 1\n[targets.stt]\npid = 2\n");
    let p = dup.path().to_str().unwrap();
    assert_config_error(&["--config", p], &[p, "stt"]);
    let one = config_file("[targets.stt]\npid = 1\n");
    let p = one.path().to_str().unwrap();
    assert_config_error(
        &["--config", p, "--target", "stt=pid:2"],
        &[p, "`stt` is defined twice"],
    );

    let empty = config_file("listen = \"127.0.0.1:9\"\n");
    let p = empty.path().to_str().unwrap();
    assert_config_error(&["--config", p], &[p, "no target configured"]);
    assert_config_error(&[], &["no target configured", "--target"]);

    assert_config_error(
        &["--config", "/nonexistent/pp.toml"],
        &["/nonexistent/pp.toml", "cannot read"],
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_config_error(&["--config", d], &[d, "cannot read"]);

    assert_config_error(
        &["--target", "stt=command:x"],
        &["--target stt=command:x", "unknown selector kind"],
    );
}

/// The agent started with root's uid but without CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN.
fn without_bpf_caps() -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set=-bpf,-perfmon,-sys_admin", "--"])
        .arg(pipeprobe_bin());
    cmd
}

#[test]
fn missing_capabilities_are_named() {
    let out = without_bpf_caps()
        .args(["agent", "--target", "x=pid:1"])
        .output()
        .expect("setpriv (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr:\n{stderr}");
    for n in ["CAP_BPF", "CAP_PERFMON", "Run as root"] {
        assert!(stderr.contains(n), "`{n}` missing:\n{stderr}");
    }

    let out = without_bpf_caps()
        .arg("check")
        .output()
        .expect("setpriv runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "check without capabilities:\n{stdout}"
    );
    assert!(
        stdout.contains("privileges") && stdout.contains("FAIL") && stdout.contains("CAP_BPF"),
        "{stdout}"
    );
}

#[test]
fn check_reports_a_capable_host() {
    let out = Command::new(pipeprobe_bin()).arg("check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for probe in ["probe process_tracking", "probe sched"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(probe))
            .unwrap_or_else(|| panic!("no `{probe}` row:\n{stdout}"));
        assert!(line.contains(" ok "), "{line}");
    }
    assert!(
        stdout.contains("kernel BTF") && stdout.contains("tracefs"),
        "{stdout}"
    );
}

fn tracefs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("tracefs"))
}

/// Unmounts tracefs for a test and leaves it mounted afterwards, as a fresh agent would.
struct TracefsUnmounted;

impl TracefsUnmounted {
    fn new() -> Self {
        for point in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
            while Command::new("umount")
                .arg(point)
                .output()
                .is_ok_and(|o| o.status.success())
            {}
        }
        assert!(!tracefs_mounted(), "could not unmount tracefs for the test");
        Self
    }
}

impl Drop for TracefsUnmounted {
    fn drop(&mut self) {
        if !tracefs_mounted() {
            let _ = Command::new("mount")
                .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
                .status();
        }
    }
}

#[test]
fn tracefs_is_mounted_when_missing_or_explained() {
    let _guard = TracefsUnmounted::new();
    let agent = Agent::start(&["--target", "x=pid:1"]);
    assert!(
        tracefs_mounted(),
        "agent did not mount tracefs; log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("tracefs was not mounted; mounted it"),
        "{}",
        agent.log()
    );
    drop(agent);

    // Without CAP_SYS_ADMIN it cannot mount: it says how, and the BTF probes still attach.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"umount /sys/kernel/tracing; exec setpriv --bounding-set=-sys_admin -- "$0" "$@""#)
        .arg(pipeprobe_bin());
    let agent = Agent::start_with(cmd, &["--target", "x=pid:1"]);
    let log = agent.log();
    assert!(
        log.contains("mount -t tracefs nodev /sys/kernel/tracing"),
        "{log}"
    );
    assert_eq!(
        agent.value("pipeprobe_probe_attached", "probe", "sched"),
        Some(1.0),
        "{log}"
    );
    // The classic-tracepoint families cannot run without tracefs: they alone are down, with
    // the reason in the log.
    for probe in ["tcp", "tcp_rtt"] {
        assert_eq!(
            agent.value("pipeprobe_probe_attached", "probe", probe),
            Some(0.0),
            "{probe}: {log}"
        );
    }
    assert!(
        log.contains("probe not attached") && log.contains("is tracefs mounted?"),
        "{log}"
    );
    assert!(
        !agent
            .scrape()
            .iter()
            .any(|s| s.name.starts_with("pipeprobe_tcp_")),
        "tcp metrics without the probe"
    );
}

#[test]
fn a_disabled_probe_is_reported_and_exports_nothing() {
    let config =
        pipeprobe_tests::config_file("[probes]\ndisable = [\"sched\"]\n[targets.x]\npid = 1\n");
    let agent = Agent::start(&["--config", config.path().to_str().unwrap()]);
    assert_eq!(
        agent.value("pipeprobe_probe_attached", "probe", "sched"),
        Some(0.0)
    );
    assert_eq!(
        agent.value("pipeprobe_probe_attached", "probe", "syscalls"),
        Some(1.0)
    );
    let samples = agent.scrape();
    // A histogram of a detached probe would read as "no delay": it is left out.
    assert!(
        !samples
            .iter()
            .any(|s| s.name.starts_with("pipeprobe_sched_runqueue")),
        "runqueue metric without the probe"
    );
    assert!(
        agent.log().contains("probe disabled by configuration"),
        "{}",
        agent.log()
    );
}

#[test]
fn endpoints_and_content_negotiation() {
    let agent = Agent::start(&["--target", "x=pid:1"]);
    let base = format!("http://{}", agent.addr);
    assert_eq!(
        pipeprobe::top::fetch(&format!("{base}/healthz")).unwrap(),
        "ok\n"
    );
    assert_eq!(
        pipeprobe::top::fetch(&format!("{base}/readyz")).unwrap(),
        "ready\n"
    );
    let classic = pipeprobe::top::fetch(&format!("{base}/metrics")).unwrap();
    assert!(
        classic.contains("# TYPE pipeprobe_sched_runqueue_delay_seconds histogram"),
        "{classic}"
    );
    assert!(!classic.contains("# EOF"));
    let out = Command::new("curl")
        .args([
            "-sS",
            "-H",
            "Accept: application/openmetrics-text;version=1.0.0",
            "-D",
            "-",
        ])
        .arg(format!("{base}/metrics"))
        .output()
        .expect("curl is needed for this test");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.to_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    for family in [
        "pipeprobe_bpf_recursion_misses_total{program=\"sched_switch\"}",
        "pipeprobe_build_info",
        "pipeprobe_target_processes",
        "pipeprobe_probe_attached",
        "pipeprobe_events_lost_total",
    ] {
        assert!(classic.contains(family), "{family} missing:\n{classic}");
    }
    assert!(Path::new(&pipeprobe_bin()).exists());
}

/// Programs loaded in the kernel, by bpftool.
fn bpf_programs() -> usize {
    let o = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .expect("bpftool runs");
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
}

/// SIGTERM, as the kubelet sends it: out within 5 s, every program and map gone, even with a
/// scraper holding a keep-alive connection and a capture running.
#[test]
fn sigterm_stops_within_5_s_and_leaves_no_program_behind() {
    use std::io::{Read as _, Write as _};
    let before = bpf_programs();
    let mut agent = Agent::start(&["--target", "me=comm:^workload$"]);
    let during = bpf_programs();
    let mut keep_alive = std::net::TcpStream::connect(agent.addr).unwrap();
    write!(keep_alive, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let _ = keep_alive.read(&mut buf).unwrap();
    let _busy = pipeprobe_tests::Proc::workload(&["busy", "--threads", "1", "--secs", "20"]);
    let capture = Command::new(pipeprobe_tests::pipeprobe_bin())
        .args([
            "flamegraph",
            "--target",
            "me",
            "--duration",
            "30s",
            "--out",
            "/dev/null",
        ])
        .arg("--control-socket")
        .arg(agent.control_socket())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (status, took) = agent
        .terminate(std::time::Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM:\n{}", agent.log()));
    let _ = pipeprobe_tests::Proc(capture);
    // The kernel frees programs after an RCU grace period, not at the close of the last fd.
    let mut after = bpf_programs();
    pipeprobe_tests::wait_until(std::time::Duration::from_secs(3), || {
        after = bpf_programs();
        after == before
    });
    eprintln!(
        "exit {status} after {took:?}; BPF programs: {before} before, {during} running, {after} after"
    );
    assert!(status.success(), "{status}\n{}", agent.log());
    assert!(during > before, "the agent loaded no program?");
    assert_eq!(after, before, "programs left behind");
    assert!(agent.log().contains("probes detached"), "{}", agent.log());
}

/// Kernel BTF hidden from the agent (absent, then empty) in a mount namespace of its own: no
/// probe can load, and the agent says why and what to do, serves its metrics with every probe
/// at 0, and keeps what needs no eBPF (span intake) running.
#[test]
fn missing_kernel_btf_is_explained_and_the_rest_runs() {
    for (how, hide) in [
        ("absent", "mount -t tmpfs none /sys/kernel/btf"),
        ("empty", "mount --bind /dev/null /sys/kernel/btf/vmlinux"),
    ] {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!(r#"{hide} && exec "$0" "$@""#))
            .arg(pipeprobe_bin());
        let cfg = config_file(
            "[otlp]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[gpu]\nenabled = false\n\
             [targets.x]\ncomm = \"^workload$\"\n",
        );
        let agent = Agent::start_with(cmd, &["--config", cfg.path().to_str().unwrap()]);
        let log = agent.log();
        assert!(
            log.contains("/sys/kernel/btf/vmlinux")
                && log.contains("no probe can run")
                && log.contains("hostPath"),
            "BTF {how}: {log}"
        );
        for f in [
            "process_tracking",
            "sched",
            "syscalls",
            "tcp",
            "tcp_rtt",
            "profile",
        ] {
            assert_eq!(
                agent.value("pipeprobe_probe_attached", "probe", f),
                Some(0.0),
                "BTF {how}: {f}"
            );
        }
        let (code, _) = pipeprobe_tests::http(
            &agent.otlp_addr("http").to_string(),
            b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(code, 200, "BTF {how}: the span intake is down too");
    }
}
