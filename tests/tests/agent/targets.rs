//! Live process tracking: a process started after the agent, its children, its exit.
use std::time::Duration;

use pipeprobe_tests::{Agent, Proc, config_file, wait_until};

#[test]
fn late_process_is_matched_within_a_second_with_children_and_removed_on_exit() {
    let marker = format!("late-marker-{}", std::process::id());
    // Rescans every minute only: what this test sees must come from the kernel's events.
    let config = config_file(&format!(
        "rescan_interval_secs = 60\n[targets.late]\ncmdline = \"{marker}\"\n"
    ));
    let agent = Agent::start(&["--config", config.path().to_str().unwrap()]);
    let count = || {
        agent
            .value("pipeprobe_target_processes", "target", "late")
            .unwrap_or(-1.0)
    };
    assert_eq!(count(), 0.0, "nothing matches before the process starts");

    let mut proc = Proc::workload(&[
        "forker",
        "--marker",
        &marker,
        "--delay-ms",
        "1500",
        "--children",
        "2",
        "--child-secs",
        "1.5",
        "--hold-secs",
        "1",
    ]);
    let took = wait_until(Duration::from_secs(1), || count() == 1.0);
    assert!(
        took.is_some(),
        "process not matched within 1 s (count {})\n{}",
        count(),
        agent.log()
    );
    eprintln!("matched {:?} after start", took.unwrap());

    // Its two `sleep` children match no selector: they are counted because they are its children.
    assert!(
        wait_until(Duration::from_secs(3), || count() == 3.0).is_some(),
        "forked children not counted (count {})",
        count()
    );
    assert!(
        wait_until(Duration::from_secs(4), || count() == 1.0).is_some(),
        "exited children not removed (count {})",
        count()
    );
    let status = proc.0.wait().expect("forker exits");
    assert!(status.success());
    assert!(
        wait_until(Duration::from_secs(1), || count() == 0.0).is_some(),
        "exited process not removed (count {})",
        count()
    );
}

#[test]
fn existing_processes_and_their_children_are_found_at_start() {
    let marker = format!("early-marker-{}", std::process::id());
    let proc = Proc::workload(&[
        "forker",
        "--marker",
        &marker,
        "--delay-ms",
        "0",
        "--children",
        "1",
        "--child-secs",
        "20",
        "--hold-secs",
        "0",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let agent = Agent::start(&["--target", &format!("early=cmdline:{marker}")]);
    assert_eq!(
        agent.value("pipeprobe_target_processes", "target", "early"),
        Some(2.0),
        "parent and its pre-existing child (pid {})",
        proc.pid()
    );
}

/// Hostile but valid processes: a 1 MB command line, and a task name with a parenthesis, a
/// space, a newline and a byte that is not UTF-8 (what /proc/PID/stat parsers trip on).
#[test]
fn hostile_processes_are_matched_and_cost_nothing_else() {
    let marker = format!("hostile-{}", std::process::id());
    let config = config_file(&format!(
        "[targets.big]\ncmdline = \"{marker}\"\n[targets.odd]\ncomm = \"^x\\\\) y\"\n"
    ));
    let agent = Agent::start(&["--config", config.path().to_str().unwrap()]);
    // 10 arguments of 100 KiB (one argument may not exceed 128 KiB), carried by a shell.
    let chunk = "a".repeat(100 << 10);
    let _big = Proc::spawn(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("sleep 30 # {marker}"))
            .arg("sh")
            .args(std::iter::repeat_n(&chunk, 10)),
    );
    let _odd = Proc::spawn(std::process::Command::new("python3").arg("-c").arg(
        "import ctypes, time\n\
         ctypes.CDLL(None).prctl(15, b'x) y\\n(\\xff', 0, 0, 0)\n\
         time.sleep(30)\n",
    ));
    let ok = wait_until(Duration::from_secs(8), || {
        agent
            .value("pipeprobe_target_processes", "target", "big")
            .is_some_and(|n| n >= 1.0)
            && agent.value("pipeprobe_target_processes", "target", "odd") == Some(1.0)
    });
    assert!(
        ok.is_some(),
        "big {:?}, odd {:?}\n{}",
        agent.value("pipeprobe_target_processes", "target", "big"),
        agent.value("pipeprobe_target_processes", "target", "odd"),
        agent.log()
    );
    let text = pipeprobe::top::fetch(&format!("http://{}/metrics", agent.addr)).unwrap();
    assert!(
        !text.contains(&chunk[..64]),
        "command lines are never exported"
    );
}

/// Ids of the BPF programs loaded (the tests run one at a time, so the agent's): a reload must
/// not replace a single one. (Debian's bpftool does not say which process holds a program.)
fn program_ids() -> Vec<u64> {
    let out =
        pipeprobe_tests::run(std::process::Command::new("bpftool").args(["prog", "show", "-j"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool prints JSON");
    let mut ids: Vec<u64> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
fn a_reload_applies_a_new_target_list_while_the_probes_keep_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeprobe.toml");
    let write = |targets: &str| {
        std::fs::write(
            &path,
            format!("rescan_interval_secs = 60\n[gpu]\nenabled = false\n[otlp]\nenabled = false\n{targets}"),
        )
        .unwrap();
    };
    write("[targets.one]\ncmdline = \"nanosleep --ms 7 \"\n");
    let agent = Agent::start(&["--config", path.to_str().unwrap()]);
    let _seven = Proc::workload(&["nanosleep", "--ms", "7", "--count", "100000"]);
    let _nine = Proc::workload(&["nanosleep", "--ms", "9", "--count", "100000"]);
    // Rescans are a minute apart: what follows a reload comes from the reload itself.
    let procs = |t: &str| agent.value("pipeprobe_target_processes", "target", t);
    let sleeps = |t: &str| {
        pipeprobe_tests::find_labels(
            &agent.scrape(),
            "pipeprobe_syscall_duration_seconds_count",
            &[("target", t), ("syscall", "clock_nanosleep")],
        )
        .unwrap_or(0.0)
    };
    let reload_ok = || {
        agent
            .scrape()
            .iter()
            .find(|x| x.name == "pipeprobe_config_last_reload_successful")
            .map(|x| x.value)
    };
    // The 7 ms process started after the agent: matched from its exec event.
    wait_until(Duration::from_secs(5), || {
        procs("one") == Some(1.0) && sleeps("one") > 20.0
    })
    .unwrap_or_else(|| panic!("one never tracked the 7 ms process\n{}", agent.log()));
    let programs = program_ids();
    assert!(!programs.is_empty(), "no BPF program of the agent seen");

    // SIGHUP: `one` now selects the 9 ms process, the new `two` the 7 ms one.
    write(
        "[targets.one]\ncmdline = \"nanosleep --ms 9 \"\n[targets.two]\ncmdline = \"nanosleep --ms 7 \"\n",
    );
    let one_before = sleeps("one");
    // SAFETY: kill has no memory preconditions.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) }, 0);
    wait_until(Duration::from_secs(5), || {
        procs("one") == Some(1.0) && procs("two") == Some(1.0) && sleeps("two") > 20.0
    })
    .unwrap_or_else(|| {
        panic!(
            "after SIGHUP: one {:?}, two {:?} processes\n{}",
            procs("one"),
            procs("two"),
            agent.log()
        )
    });
    // `one` counts the 9 ms process now (about 110 a second), `two` the 7 ms one.
    let (one_a, two_a) = (sleeps("one"), sleeps("two"));
    std::thread::sleep(Duration::from_secs(1));
    let (one_b, two_b) = (sleeps("one"), sleeps("two"));
    eprintln!(
        "after SIGHUP, one second: one {one_a} -> {one_b} (9 ms sleeps), two {two_a} -> {two_b} (7 ms sleeps)"
    );
    assert!(
        one_b - one_a > 60.0 && one_b > one_before,
        "one stopped counting"
    );
    assert!(two_b - two_a > 80.0, "two does not count the 7 ms process");
    assert!(agent.log().contains("targets reloaded"), "{}", agent.log());
    assert_eq!(program_ids(), programs, "a reload replaced BPF programs");

    // A configuration that does not load changes nothing and says why, through the CLI.
    write("[targets.one]\ncmdline = \"(unclosed\"\n");
    let reload = || {
        std::process::Command::new(pipeprobe_tests::pipeprobe_bin())
            .args(["reload", "--control-socket"])
            .arg(agent.control_socket())
            .output()
            .unwrap()
    };
    let o = reload();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a bad config reloaded");
    assert!(
        err.contains("not applied") && err.contains("pipeprobe.toml") && err.contains("(unclosed"),
        "{err}"
    );
    assert_eq!(reload_ok(), Some(0.0));
    assert_eq!(
        (procs("one"), procs("two")),
        (Some(1.0), Some(1.0)),
        "a refused reload changed targets"
    );

    // Removing `two` removes its series; what is kept keeps counting from where it was.
    write("[targets.one]\ncmdline = \"nanosleep --ms 9 \"\n");
    let o = reload();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("removed:   two") && out.contains("unchanged: one"),
        "{out}"
    );
    assert_eq!(reload_ok(), Some(1.0));
    let s = agent.scrape();
    assert!(
        !s.iter()
            .any(|x| x.labels.get("target").map(String::as_str) == Some("two")),
        "series of the removed target remain"
    );
    assert!(sleeps("one") >= one_b, "one restarted from zero");
    assert_eq!(program_ids(), programs);
}
