//! Syscall latency and errors against workloads whose answer is known.
use std::time::Duration;

use pipeprobe_tests::{Agent, Histogram, Proc, RetargetedAgent, find, wait_until};

const DURATION: &str = "pipeprobe_syscall_duration_seconds";
const ERRORS: &str = "pipeprobe_syscall_errors_total";

fn syscall_series<'a>(
    samples: &'a [pipeprobe_tests::Sample],
    name: &str,
    target: &str,
    syscall: &str,
) -> Option<&'a pipeprobe_tests::Sample> {
    samples.iter().find(|s| {
        s.name == name
            && s.labels.get("target").is_some_and(|t| t == target)
            && s.labels.get("syscall").is_some_and(|c| c == syscall)
    })
}

/// Each sleep leaves the CPU inside the syscall, so its start must move to the thread's task
/// storage at the switch-out and be found there at its exit, wherever the thread then runs.
/// With the scheduler probe on, its `sched_switch` moves it; without, `syscall_switch` does.
#[test]
fn clock_nanosleep_of_5ms_lands_in_the_5ms_bucket() {
    nanosleeps_of_5ms_land_in_the_5ms_bucket(&[]);
}

#[test]
fn clock_nanosleep_of_5ms_lands_in_the_5ms_bucket_without_the_scheduler_probe() {
    let config = pipeprobe_tests::config_file("[probes]\ndisable = [\"sched\"]\n");
    let agent =
        nanosleeps_of_5ms_land_in_the_5ms_bucket(&["--config", config.path().to_str().unwrap()]);
    assert_eq!(
        agent.value("pipeprobe_probe_attached", "probe", "sched"),
        Some(0.0)
    );
}

fn nanosleeps_of_5ms_land_in_the_5ms_bucket(args: &[&str]) -> Agent {
    // Starts sleeping after the agent has matched it; 100 sleeps of 5 ms.
    let sleeper = Proc::workload(&[
        "nanosleep",
        "--ms",
        "5",
        "--count",
        "100",
        "--delay-ms",
        "1500",
    ]);
    let target = format!("sleeper=pid:{}", sleeper.pid());
    let mut all = vec!["--target", &target];
    all.extend_from_slice(args);
    let agent = Agent::start(&all);
    let pid = sleeper.pid();
    let mut sleeper = sleeper;
    sleeper.0.wait().expect("sleeper exits");
    let samples = agent.scrape();
    // Only the series of this syscall for this target.
    let only: Vec<_> = samples
        .iter()
        .filter(|s| {
            s.labels
                .get("syscall")
                .is_some_and(|c| c == "clock_nanosleep")
        })
        .cloned()
        .collect();
    let h = Histogram::find(&only, DURATION, "target", "sleeper")
        .expect("clock_nanosleep series for the sleeper");
    assert!(
        h.count >= 100.0,
        "expected >= 100 clock_nanosleep calls from pid {pid}, got {}",
        h.count
    );
    let p50 = h.buckets[h.bucket_of(0.5).unwrap()].0;
    // 5 ms falls in (4.096 ms, 8.192 ms].
    assert_eq!(
        p50, 0.008192,
        "p50 bucket le={p50}s, expected the bucket holding 5 ms (le=0.008192)"
    );
    let mean = h.sum / h.count;
    assert!(
        (0.005..0.008).contains(&mean),
        "mean clock_nanosleep {mean}s for 5 ms sleeps"
    );
    agent
}

#[test]
fn failing_opens_are_counted_exactly() {
    let opener = Proc::workload(&[
        "failopen",
        "--count",
        "137",
        "--delay-ms",
        "1500",
        "--hold-ms",
        "500",
    ]);
    let agent = Agent::start(&["--target", &format!("opener=pid:{}", opener.pid())]);
    // Everything before the loop (the dynamic loader's own failed opens) is in the baseline.
    let before = agent.scrape();
    let errors = |s: &[pipeprobe_tests::Sample]| {
        syscall_series(s, ERRORS, "opener", "openat").map_or(0.0, |s| s.value)
    };
    let base = errors(&before);
    let mut opener = opener;
    opener.0.wait().expect("opener exits");
    let after = agent.scrape();
    assert_eq!(
        errors(&after) - base,
        137.0,
        "openat errors: {} before, {} after",
        base,
        errors(&after)
    );
    assert!(find(&after, "pipeprobe_probe_attached", "probe", "syscalls") == Some(1.0));
}

#[test]
fn syscall_list_and_series_cap_are_applied() {
    let talker = Proc::workload(&[
        "failopen",
        "--count",
        "300",
        "--delay-ms",
        "1200",
        "--hold-ms",
        "300",
    ]);
    let config = pipeprobe_tests::config_file(&format!(
        "syscalls = [\"openat\", \"clock_nanosleep\", \"read\", \"mmap\"]\nmax_syscall_series_per_target = 1\n[targets.t]\npid = {}\n",
        talker.pid()
    ));
    let agent = Agent::start(&["--config", config.path().to_str().unwrap()]);
    let mut talker = talker;
    talker.0.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || syscall_series(
            &agent.scrape(),
            ERRORS,
            "t",
            "openat"
        )
        .is_some())
        .is_some()
    );
    let samples = agent.scrape();
    let names: std::collections::BTreeSet<&str> = samples
        .iter()
        .filter(|s| s.name == ERRORS && s.labels.get("target").is_some_and(|t| t == "t"))
        .filter_map(|s| s.labels.get("syscall").map(String::as_str))
        .collect();
    // One named series (the busiest, openat) and the rest of the listed ones folded.
    assert!(
        names.len() <= 2 && names.contains("openat"),
        "series: {names:?}"
    );
    for s in &names {
        assert!(
            ["openat", "other"].contains(s),
            "unlisted or over-cap syscall {s} exported: {names:?}"
        );
    }
}

/// The kernel keeps, per CPU, whether the last thread to enter a syscall there is traced. A loop
/// that ran untraced before a reload made it a target has that "no" cached on its CPU: the
/// reload must invalidate it, and the loop's syscalls are counted from then on.
#[test]
fn a_loop_running_before_its_target_exists_is_traced_from_the_reload() {
    let agent = RetargetedAgent::start(&["syscalls"], "[targets.other]\ncomm = \"^no-such$\"\n");
    let looper = Proc::workload(&["syscall-loop", "--secs", "30"]);
    // The loop's getppid calls enter untraced for a second first, on whichever CPUs it runs.
    agent.counted_only_after_retarget(
        &format!("[targets.looper]\npid = {}\n", looper.pid()),
        100_000.0,
        "the loop's getppid calls",
        |a| {
            syscall_series(
                &a.scrape(),
                &format!("{DURATION}_count"),
                "looper",
                "getppid",
            )
            .map_or(0.0, |s| s.value)
        },
    );
}

/// A target's distinct syscalls are bounded in the kernel (`SYSCALLS_PER_TARGET` slots, claimed
/// at first use): a process making more keeps exactly that many series, and every call of the
/// ones left out is counted as lost (`syscall_stats_full`), not dropped silently. The process
/// calls 129 numbers this kernel does not assign (337-423 and 470-511: ENOSYS; 335 is
/// uretprobe, which kills a caller outside a uretprobe) and nine harmless getters, three times
/// each, after the agent has matched it.
#[test]
#[cfg(target_arch = "x86_64")]
fn a_target_s_129th_distinct_syscall_is_counted_as_lost() {
    const REPS: usize = 3;
    // getpid, getppid, getuid, getgid, geteuid, getegid, gettid, sched_yield, getpgrp.
    const GETTERS: [u32; 9] = [39, 110, 102, 104, 107, 108, 186, 24, 111];
    let script = format!(
        "import ctypes, time\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         time.sleep(1.5)\n\
         for _ in range({REPS}):\n\
         \x20   for nr in list(range(337, 424)) + list(range(470, 512)) + {GETTERS:?}:\n\
         \x20       libc.syscall(nr)\n"
    );
    let spreader = Proc::spawn(std::process::Command::new("python3").args(["-c", &script]));
    let config = pipeprobe_tests::config_file(&format!(
        "syscalls = \"all\"\nmax_syscall_series_per_target = 512\n[targets.spread]\npid = {}\n",
        spreader.pid()
    ));
    let agent = Agent::start(&["--config", config.path().to_str().unwrap()]);
    let mut spreader = spreader;
    assert!(
        spreader.0.wait().unwrap().success(),
        "the python3 caller failed"
    );
    let lost = |samples: &[pipeprobe_tests::Sample]| {
        samples
            .iter()
            .find(|s| {
                s.name == "pipeprobe_events_lost_total"
                    && s.labels
                        .get("reason")
                        .is_some_and(|r| r == "syscall_stats_full")
            })
            .map_or(0.0, |s| s.value)
    };
    // At least 129 + 9 - 128 numbers have no slot, each called REPS times.
    let floor = (10 * REPS) as f64;
    wait_until(Duration::from_secs(3), || lost(&agent.scrape()) >= floor);
    let samples = agent.scrape();
    let series: std::collections::BTreeSet<&str> = samples
        .iter()
        .filter(|s| {
            s.name == format!("{DURATION}_count")
                && s.labels.get("target").is_some_and(|t| t == "spread")
        })
        .filter_map(|s| s.labels.get("syscall").map(String::as_str))
        .collect();
    assert_eq!(
        series.len(),
        agent_common::syscalls::SYSCALLS_PER_TARGET as usize,
        "distinct syscalls of the target: {series:?}"
    );
    assert!(
        series.iter().any(|s| s.starts_with("sys_")),
        "the unassigned numbers are among them: {series:?}"
    );
    let lost = lost(&samples);
    eprintln!(
        "{} distinct syscalls kept, {lost} calls counted as syscall_stats_full",
        series.len()
    );
    assert!(
        lost >= floor,
        "syscall_stats_full {lost}, expected at least {floor}"
    );
}
