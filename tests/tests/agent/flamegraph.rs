//! On-demand CPU flamegraphs through the control socket, against a program whose answer is known.
use std::{path::Path, process::Command, time::Duration};

use pipeprobe_tests::{Agent, Proc, pipeprobe_bin};

/// hot_a burns ~3x as long as hot_b per loop; built with frame pointers.
const HOT_C: &str = r#"
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
static volatile uint64_t sink;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
__attribute__((noinline)) void burn(double secs) {
    double end = now() + secs; uint64_t x = 1;
    while (now() < end) for (int i = 0; i < 1000; i++) x = x * 6364136223846793005ULL + 1;
    sink = x;
}
__attribute__((noinline)) void hot_a(void) { burn(0.003); }
__attribute__((noinline)) void hot_b(void) { burn(0.001); }
int main(int argc, char **argv) {
    double end = now() + (argc > 1 ? atof(argv[1]) : 10);
    while (now() < end) { hot_a(); hot_b(); }
    return 0;
}
"#;

fn build_hot(dir: &Path) -> std::path::PathBuf {
    build_hot_with(
        dir,
        "hot",
        &["-O1", "-g", "-fno-omit-frame-pointer", "-fno-inline"],
    )
}

/// HOT_C built as `name` with `flags`.
fn build_hot_with(dir: &Path, name: &str, flags: &[&str]) -> std::path::PathBuf {
    let src = dir.join("hot.c");
    let bin = dir.join(name);
    std::fs::write(&src, HOT_C).unwrap();
    let out = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("gcc is needed for the flamegraph tests");
    assert!(
        out.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Samples whose stack has `frame` in it.
fn weight(folded: &str, frame: &str) -> u64 {
    folded
        .lines()
        .filter(|l| {
            l.rsplit_once(' ')
                .is_some_and(|(s, _)| s.split(';').any(|f| f == frame))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// All samples of a folded capture.
fn total(folded: &str) -> u64 {
    folded
        .lines()
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

#[test]
fn cpu_flamegraph_weights_match_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let hot = build_hot(dir.path());
    let p = Proc::spawn(Command::new(&hot).arg("20"));
    let agent = Agent::start(&["--target", &format!("hot=pid:{}", p.pid())]);
    let out = dir.path().join("hot.folded");
    let o = agent.flamegraph(&[
        "--target",
        "hot",
        "--duration",
        "3s",
        "--hz",
        "199",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let folded = std::fs::read_to_string(&out).unwrap();
    let (a, b) = (weight(&folded, "hot_a"), weight(&folded, "hot_b"));
    eprintln!(
        "hot_a {a} samples, hot_b {b} samples, ratio {}",
        a as f64 / b as f64
    );
    assert!(b > 0, "hot_b missing:\n{folded}");
    let ratio = a as f64 / b as f64;
    assert!(
        (2.0..=4.5).contains(&ratio),
        "hot_a/hot_b = {ratio} ({a}/{b})\n{folded}"
    );
    // Root frames: process name, then pid.
    for line in folded.lines() {
        let mut frames = line.split(';');
        assert_eq!(frames.next(), Some("hot"), "{line}");
        assert_eq!(frames.next(), Some(p.pid().to_string().as_str()), "{line}");
    }
    // 3 s at 199 Hz of a single busy thread: about 600 samples.
    let total = total(&folded);
    assert!(
        (400..=700).contains(&total),
        "{total} samples for 3 s at 199 Hz"
    );

    let svg = dir.path().join("hot.svg");
    let o = agent.flamegraph(&[
        "--pid",
        &p.pid().to_string(),
        "--duration",
        "1s",
        "--out",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<?xml") && text.contains("<svg"),
        "not an SVG"
    );
    assert!(
        text.contains("pipeprobe cpu flamegraph: pid") && text.contains("samples"),
        "title missing"
    );
    assert!(text.contains("hot_a"), "frames missing from the SVG");

    // pprof, read by the reference tool.
    let pb = dir.path().join("hot.pb.gz");
    let o = agent.flamegraph(&[
        "--target",
        "hot",
        "--duration",
        "2s",
        "--out",
        pb.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let top = Command::new("go")
        .args(["tool", "pprof", "-top", "-nodecount=20"])
        .arg(&pb)
        .env("HOME", dir.path())
        .output()
        .expect("go (golang-go) is needed: run `cargo xtask setup`");
    let report = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "go tool pprof failed: {}",
        stderr(&top)
    );
    eprintln!("{report}");
    assert!(
        report.contains("hot_a") && report.contains("hot_b"),
        "go tool pprof -top:\n{report}"
    );
}

/// The same program built without frame pointers, as most distribution code is (the
/// CPythons, libz, libstdc++): a frame-pointer walk stops at the leaf, the unwind tables
/// (.eh_frame) still lead from it to main.
#[test]
fn cpu_mode_unwinds_code_built_without_frame_pointers() {
    let dir = tempfile::tempdir().unwrap();
    let hot = build_hot_with(
        dir.path(),
        "hot-nofp",
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fno-inline",
            "-fno-optimize-sibling-calls",
        ],
    );
    let p = Proc::spawn(Command::new(&hot).arg("20"));
    let agent = Agent::start(&["--target", &format!("hot=pid:{}", p.pid())]);
    let folded = crate::python::capture(
        &agent,
        p.pid(),
        &["--duration", "3s", "--hz", "199"],
        &dir.path().join("nofp.folded"),
    );
    // Samples whose stack runs main -> hot_X -> burn, as the program calls them.
    let chain = |hot: &str| -> u64 {
        let calls = format!(";main;{hot};burn");
        folded
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(s, _)| s.contains(&calls))
            .filter_map(|(_, n)| n.parse::<u64>().ok())
            .sum()
    };
    let (a, b) = (chain("hot_a"), chain("hot_b"));
    let total = total(&folded);
    eprintln!("without frame pointers: main;hot_a;burn {a}, main;hot_b;burn {b}, all {total}");
    // Samples in clock_gettime too: the vDSO's tables are the agent's own vDSO's.
    assert!(
        (a + b) as f64 > 0.95 * total as f64,
        "{a} + {b} of {total} samples unwound to main:\n{folded}"
    );
    let ratio = a as f64 / b.max(1) as f64;
    assert!(
        (2.0..=4.5).contains(&ratio),
        "hot_a/hot_b = {ratio} ({a}/{b})\n{folded}"
    );
}

#[test]
fn bad_input_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let hot = build_hot(dir.path());
    let p = Proc::spawn(Command::new(&hot).arg("20"));
    let agent = Agent::start(&["--target", &format!("hot=pid:{}", p.pid())]);
    let out = dir.path().join("x.svg");
    let out = out.to_str().unwrap();
    let check = |args: &[&str], code: i32, needle: &str| {
        let o = agent.flamegraph(args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(needle),
            "{args:?}: `{needle}` missing from: {}",
            stderr(&o)
        );
    };
    check(
        &["--target", "nope", "--duration", "1s", "--out", out],
        1,
        "unknown target `nope`; configured targets: hot",
    );
    check(
        &["--pid", "999999999", "--duration", "1s", "--out", out],
        1,
        "no process 999999999",
    );
    check(
        &["--target", "hot", "--duration", "0s", "--out", out],
        2,
        "--duration",
    );
    check(
        &["--target", "hot", "--duration", "11m", "--out", out],
        2,
        "at most 600s",
    );
    check(
        &["--target", "hot", "--min-duration", "5ms", "--out", out],
        2,
        "--min-duration",
    );
    check(
        &[
            "--target",
            "hot",
            "--duration",
            "1s",
            "--out",
            "/nonexistent-dir/x.svg",
        ],
        2,
        "cannot write /nonexistent-dir/x.svg",
    );
    check(
        &["--target", "hot", "--duration", "1s", "--out", "x.png"],
        2,
        "--format",
    );
    let o = Command::new(pipeprobe_bin())
        .args([
            "flamegraph",
            "--target",
            "hot",
            "--out",
            out,
            "--control-socket",
            "/nonexistent/pp.sock",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is `pipeprobe agent` running"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn control_socket_is_root_only() {
    let agent = Agent::start(&["--target", "x=pid:1"]);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(agent.control_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let dir_mode = std::fs::metadata(agent.control_socket().parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700, "directory mode {dir_mode:o}");
    // An unprivileged user cannot even connect.
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(pipeprobe_bin())
        .args([
            "flamegraph",
            "--target",
            "x",
            "--duration",
            "1s",
            "--out",
            "/tmp/pp-nobody.svg",
            "--control-socket",
        ])
        .arg(agent.control_socket())
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("are you root") || stderr(&o).contains("cannot write"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn concurrent_captures_queue_and_a_dying_process_keeps_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    let hot = build_hot(dir.path());
    // Lives 1.5 s into a 3 s capture.
    let short = Proc::spawn(Command::new(&hot).arg("2"));
    let agent = Agent::start(&["--target", &format!("short=pid:{}", short.pid())]);
    let first_out = dir.path().join("first.folded");
    let second_out = dir.path().join("second.folded");
    let first = Command::new(pipeprobe_bin())
        .args([
            "flamegraph",
            "--pid",
            &short.pid().to_string(),
            "--duration",
            "3s",
            "--out",
        ])
        .arg(&first_out)
        .arg("--control-socket")
        .arg(agent.control_socket())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let second = agent.flamegraph(&[
        "--target",
        "short",
        "--duration",
        "1s",
        "--out",
        second_out.to_str().unwrap(),
    ]);
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("queued"),
        "second capture did not say it waited: {}",
        stderr(&second)
    );
    assert!(
        stderr(&first).contains("exited during the capture"),
        "{}",
        stderr(&first)
    );
    let folded = std::fs::read_to_string(&first_out).unwrap();
    assert!(
        weight(&folded, "hot_a") > 0,
        "what was sampled before the exit is kept:\n{folded}"
    );
}

/// Sleeps 20 ms then 1 ms, forever; the syscall is issued from the named functions themselves
/// (libc's wrapper has no frame pointer, so its caller would be missing from the user stack),
/// built without sibling-call optimisation, which would drop their frames too.
const SLEEPER_C: &str = r#"
#include <time.h>
static inline __attribute__((always_inline)) long nanosleep_here(const struct timespec *ts) {
    long ret;
    register long r10 __asm__("r10") = 0;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(230), "D"(1), "S"(0), "d"(ts), "r"(r10) : "rcx", "r11", "memory");
    return ret;
}
__attribute__((noinline)) void sleep_long(void) { struct timespec t = {0, 20000000}; nanosleep_here(&t); }
__attribute__((noinline)) void sleep_short(void) { struct timespec t = {0, 1000000}; nanosleep_here(&t); }
int main(void) { for (;;) { sleep_long(); sleep_short(); } }
"#;

fn build_sleeper(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("sleeper.c");
    let bin = dir.join("sleeper");
    std::fs::write(&src, SLEEPER_C).unwrap();
    let o = Command::new("gcc")
        .args([
            "-O1",
            "-g",
            "-fno-omit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-o",
        ])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("gcc is needed for the flamegraph tests");
    assert!(o.status.success(), "gcc: {}", stderr(&o));
    bin
}

/// Captures the sleeper in `mode` with `min` as --min-duration for `secs`; returns the folded
/// output and the nanoseconds in sleep_long and in sleep_short.
fn capture_sleeper(
    agent: &Agent,
    pid: u32,
    mode: &str,
    min: &str,
    secs: &str,
    dir: &Path,
) -> (String, u64, u64) {
    let out = dir.join(format!("{mode}-{min}.folded"));
    let o = agent.flamegraph(&[
        "--pid",
        &pid.to_string(),
        "--mode",
        mode,
        "--min-duration",
        min,
        "--duration",
        secs,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let folded = std::fs::read_to_string(&out).unwrap();
    let (long, short) = (
        weight(&folded, "sleep_long"),
        weight(&folded, "sleep_short"),
    );
    eprintln!(
        "{mode} --min-duration {min}: sleep_long {:.3} s, sleep_short {:.3} s",
        long as f64 / 1e9,
        short as f64 / 1e9
    );
    (folded, long, short)
}

/// sleep_short asks for 1 ms, under a 10 ms --min-duration. On a loaded machine one of them
/// now and then really does take longer than 10 ms (CI saw 10.8 ms) and then rightly counts.
/// What the threshold must hold to: whatever counted is whole episodes of at least 10 ms, and
/// far less than the ~150 ms that the ~140 short sleeps of a 3 s capture add up to unfiltered.
fn assert_only_late_short_sleeps(short: u64, folded: &str) {
    assert!(
        short == 0 || short >= 10_000_000,
        "sleep_short counted {short} ns, less than one 10 ms episode:\n{folded}"
    );
    assert!(
        short < 60_000_000,
        "sleep_short counted {short} ns: 1 ms sleeps passed a 10 ms --min-duration:\n{folded}"
    );
}

#[test]
fn offcpu_counts_only_blocking_episodes_above_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(&mut Command::new(build_sleeper(dir.path())));
    let agent = Agent::start(&["--target", &format!("sleeper=pid:{}", p.pid())]);
    let (folded, long, short) =
        capture_sleeper(&agent, p.pid(), "offcpu", "10ms", "3s", dir.path());
    assert_only_late_short_sleeps(short, &folded);
    // Cycles of ~21 ms, 20 of them blocked in sleep_long: about 2.85 s over 3 s.
    let secs = long as f64 / 1e9;
    assert!(
        (2.3..=3.05).contains(&secs),
        "sleep_long blocked {secs} s in a 3 s capture\n{folded}"
    );
    // The kernel stack is the sleeping thread's own, taken when the episode ended: it ends
    // where the thread waited (the kernel leaves the scheduler's frames out), with no tracing
    // machinery in it.
    assert!(
        folded
            .lines()
            .filter(|l| l.contains(";sleep_long;"))
            .all(|l| l.contains("nanosleep_[k] ")),
        "{folded}"
    );
    assert!(!folded.contains("bpf_trace_run"), "{folded}");
    // With a threshold under 1 ms the short sleeps count too.
    let (folded, _, short) = capture_sleeper(&agent, p.pid(), "offcpu", "500us", "1s", dir.path());
    assert!(short > 0, "{folded}");
}

#[test]
fn syscall_mode_weights_slow_syscalls_by_duration() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(&mut Command::new(build_sleeper(dir.path())));
    let agent = Agent::start(&["--target", &format!("sleeper=pid:{}", p.pid())]);
    let (folded, long, short) =
        capture_sleeper(&agent, p.pid(), "syscall", "10ms", "3s", dir.path());
    assert_only_late_short_sleeps(short, &folded);
    let secs = long as f64 / 1e9;
    assert!(
        (2.3..=3.05).contains(&secs),
        "sleep_long spent {secs} s in slow syscalls in a 3 s capture\n{folded}"
    );
    // The syscall is the leaf frame.
    assert!(
        folded.lines().all(|l| l
            .rsplit_once(' ')
            .unwrap()
            .0
            .ends_with(";syscall:clock_nanosleep")),
        "{folded}"
    );
}

/// A control socket directory someone else could write is refused, and left as it was; the
/// agent runs on without the control API. One it creates itself is made 0700.
#[test]
fn an_unsafe_control_socket_directory_is_refused_and_left_alone() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let base = tempfile::tempdir().unwrap();
    let shared = base.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let foreign = base.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).unwrap();
    for (dir, why) in [
        (&shared, "writable by others (mode 1777)"),
        (&foreign, "owned by uid 65534"),
    ] {
        let sock = dir.join("pp.sock");
        let agent = Agent::start(&[
            "--target",
            "x=pid:1",
            "--control-socket",
            sock.to_str().unwrap(),
        ]);
        let log = agent.log();
        assert!(
            log.contains(why) && log.contains("another user could replace the socket"),
            "{}: {log}",
            dir.display()
        );
        assert!(!sock.exists(), "a socket in {}", dir.display());
        assert!(
            agent
                .value("pipeprobe_probe_attached", "probe", "sched")
                .is_some(),
            "the agent stopped serving"
        );
        let meta = std::fs::metadata(dir).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid()),
            if dir == &shared {
                (0o1777, 0)
            } else {
                (0o700, 65534)
            },
            "{} was changed",
            dir.display()
        );
    }
    let made = base.path().join("made").join("pp.sock");
    let _agent = Agent::start(&[
        "--target",
        "x=pid:1",
        "--control-socket",
        made.to_str().unwrap(),
    ]);
    let mode = std::fs::metadata(made.parent().unwrap()).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(made.exists());
}
