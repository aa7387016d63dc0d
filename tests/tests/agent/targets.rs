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
