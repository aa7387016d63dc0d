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
