//! Python frames in flamegraphs, for every CPython 3.10-3.13 installed here (pyenv, and the
//! distribution's own), against workloads whose answer is known (tests/python/work.py) and
//! against py-spy sampling the same process at the same time.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use pipeprobe_tests::{Agent, Proc, py_tool};

fn work_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/work.py")
}

/// `(minor version, interpreter)` of every CPython 3.10-3.13 found: pyenv's builds (libpython
/// shared) and the system's (/usr/bin/python3.N, interpreter linked into the executable).
fn interpreters() -> Vec<(u32, PathBuf)> {
    let pyenv =
        std::env::var_os("PYENV_ROOT").map_or_else(|| PathBuf::from("/root/.pyenv"), PathBuf::from);
    let mut found = Vec::new();
    for minor in 10..=13u32 {
        let mut versions: Vec<PathBuf> = std::fs::read_dir(pyenv.join("versions"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("3.{minor}.")))
            })
            .map(|p| p.join(format!("bin/python3.{minor}")))
            .filter(|p| p.exists())
            .collect();
        versions.sort();
        found.extend(versions.into_iter().map(|p| (minor, p)));
        let system = PathBuf::from(format!("/usr/bin/python3.{minor}"));
        if system.exists() {
            found.push((minor, system));
        }
    }
    assert!(
        !found.is_empty(),
        "no CPython 3.10-3.13 found (pyenv under $PYENV_ROOT or /usr/bin/python3.N)"
    );
    found
}

/// Starts `work.py MODE` under `python` (with `extra` interpreter flags), once it runs.
pub(crate) fn start(python: &Path, extra: &[&str], mode: &str) -> Proc {
    let mut p = Proc::spawn(
        Command::new(python)
            .args(extra)
            .arg(work_py())
            .arg(mode)
            .stdout(Stdio::piped()),
    );
    p.read_line_starting("READY");
    p
}

/// Weight of the stacks holding a Python frame of `function` (frames are `function (file:line)`,
/// as in pipeprobe's and py-spy's output alike).
pub(crate) fn weight(folded: &str, function: &str) -> u64 {
    let prefix = format!("{function} (");
    folded
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(stack, _)| stack.split(';').any(|f| f.starts_with(&prefix)))
        .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
        .sum()
}

fn total(folded: &str) -> u64 {
    folded
        .lines()
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<u64>().ok())
        .sum()
}

pub(crate) fn capture(agent: &Agent, pid: u32, extra: &[&str], out: &Path) -> String {
    let pid = pid.to_string();
    let mut args = vec!["--pid", &pid, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = agent.flamegraph(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(out).unwrap_or_default()
}

#[test]
fn python_names_and_weights_agree_with_the_workload_and_py_spy_in_every_cpython() {
    let dir = tempfile::tempdir().unwrap();
    let py_spy = py_tool("py-spy");
    for (minor, python) in interpreters() {
        // 3.12+ also writes perf maps with -X perf: the Python frames must not depend on it
        // either way, so the newer ones run with it, the older ones cannot.
        let extra: &[&str] = if minor >= 12 { &["-X", "perf"] } else { &[] };
        let p = start(&python, extra, "hot");
        let agent = Agent::start(&["--target", &format!("py=pid:{}", p.pid())]);
        let spy_out = dir.path().join(format!("py-spy-{minor}.txt"));
        let spy = Command::new(&py_spy)
            .args([
                "record",
                "--format",
                "raw",
                "--rate",
                "499",
                "--duration",
                "5",
            ])
            .args(["--nonblocking", "--pid", &p.pid().to_string(), "--output"])
            .arg(&spy_out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("py-spy runs");
        let ours = capture(
            &agent,
            p.pid(),
            // Both at 499 Hz: ~2000 samples each keep the sampling noise of the ratio near 5%.
            &["--duration", "4s", "--hz", "499"],
            &dir.path().join(format!("ours-{minor}.folded")),
        );
        let spy = spy.wait_with_output().unwrap();
        assert!(
            spy.status.success(),
            "py-spy failed: {}",
            String::from_utf8_lossy(&spy.stderr)
        );
        let theirs = std::fs::read_to_string(&spy_out).unwrap();
        let ratio = |f: &str| weight(f, "hot_a") as f64 / weight(f, "hot_b").max(1) as f64;
        let (r_ours, r_spy) = (ratio(&ours), ratio(&theirs));
        eprintln!(
            "{}: pipeprobe hot_a/hot_b {r_ours:.2} ({} samples), py-spy {r_spy:.2}",
            python.display(),
            total(&ours)
        );
        // Pure Python: nearly every sample is inside hot_a or hot_b, all under main().
        let both = weight(&ours, "hot_a") + weight(&ours, "hot_b");
        assert!(
            both as f64 >= 0.9 * total(&ours) as f64 && weight(&ours, "main") >= both,
            "{}: Python frames missing from most samples:\n{ours}",
            python.display()
        );
        assert!(
            (2.1..=3.9).contains(&r_ours),
            "{}: hot_a/hot_b {r_ours} is not within 30% of the known 3x:\n{ours}",
            python.display()
        );
        assert!(
            (r_ours / r_spy - 1.0).abs() <= 0.3,
            "{}: pipeprobe {r_ours} vs py-spy {r_spy}",
            python.display()
        );
        // Lines: hot_a only ever runs its one line, the call into spin; spin's samples fall on
        // its loop's two lines, split as py-spy splits them.
        let call = source_line("return spin(30000 * k)");
        let (for_line, add_line) = (source_line("for i in range(n):"), source_line("x += i * i"));
        let hot_a_lines = lines_of(&ours, "hot_a");
        assert!(
            !hot_a_lines.is_empty() && hot_a_lines.keys().all(|l| *l == call),
            "{}: hot_a at lines {hot_a_lines:?}, not only {call}:\n{ours}",
            python.display()
        );
        let share = |f: &str| {
            let spin = lines_of(f, "spin");
            let all: u64 = spin.values().sum();
            let in_loop = spin.get(&for_line).unwrap_or(&0) + spin.get(&add_line).unwrap_or(&0);
            let add = *spin.get(&add_line).unwrap_or(&0);
            (
                in_loop as f64 / all.max(1) as f64,
                add as f64 / all.max(1) as f64,
            )
        };
        let ((loop_ours, add_ours), (_, add_spy)) = (share(&ours), share(&theirs));
        eprintln!(
            "{}: spin's samples on `x += i * i`: pipeprobe {add_ours:.2}, py-spy {add_spy:.2}",
            python.display()
        );
        assert!(
            loop_ours >= 0.95,
            "{}: {loop_ours} of spin's samples on its loop lines {for_line}, {add_line}:\n{ours}",
            python.display()
        );
        // ~1500 samples each put the sampling error of the difference near 0.02, but py-spy's
        // non-blocking reads have drifted by 0.12 on a loaded 2-core CI machine (0.64 against
        // 0.74-0.76 everywhere else, ours 0.76 there too), so the bound leaves room for the
        // reference's drift. A misread line table shows above, as samples off the loop's lines.
        assert!(
            (add_ours - add_spy).abs() <= 0.15,
            "{}: spin's share on line {add_line}: pipeprobe {add_ours}, py-spy {add_spy}",
            python.display()
        );
    }
}

/// The line of work.py holding `text`.
fn source_line(text: &str) -> i64 {
    let src = std::fs::read_to_string(work_py()).unwrap();
    src.lines()
        .position(|l| l.trim() == text)
        .map(|i| i as i64 + 1)
        .unwrap_or_else(|| panic!("`{text}` is not in work.py"))
}

/// Weight per line of the frames of `function` (`function (file:line)`).
fn lines_of(folded: &str, function: &str) -> std::collections::BTreeMap<i64, u64> {
    let prefix = format!("{function} (");
    let mut out = std::collections::BTreeMap::new();
    for (stack, n) in folded.lines().filter_map(|l| l.rsplit_once(' ')) {
        let Ok(n) = n.trim().parse::<u64>() else {
            continue;
        };
        // The innermost frame of the function in the stack: a recursive one counts once.
        if let Some(line) = stack
            .split(';')
            .rev()
            .find(|f| f.starts_with(&prefix))
            .and_then(|f| f.strip_suffix(')')?.rsplit_once(':')?.1.parse().ok())
        {
            *out.entry(line).or_default() += n;
        }
    }
    out
}

/// pipeprobe's line-table decoders and code-object layout, against each interpreter's own
/// `co_lines()` for ~300 standard-library functions and against its live objects (ctypes).
#[test]
fn line_tables_and_layouts_agree_with_every_cpython() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/lines.py");
    for (minor, python) in interpreters() {
        let out = Command::new(&python).arg(&script).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let codes = v["codes"].as_array().unwrap();
        assert!(
            codes.len() > 200,
            "{}: {} code objects",
            python.display(),
            codes.len()
        );
        for c in codes {
            let hex = c["table"].as_str().unwrap();
            let table: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let first = c["first"].as_i64().unwrap() as i32;
            let want: Vec<(u32, u32, Option<i32>)> = c["lines"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r[0].as_u64().unwrap() as u32,
                        r[1].as_u64().unwrap() as u32,
                        r[2].as_i64().map(|l| l as i32),
                    )
                })
                .collect();
            // Interpreters differ in whether co_lines() merges neighbouring ranges of one
            // line: compare the line of every instruction.
            let ours = pipeprobe::python::lines::ranges(minor, &table, first);
            let end = want.iter().map(|r| r.1).max().unwrap_or(0);
            for addr in (0..end + 4).step_by(2) {
                assert_eq!(
                    pipeprobe::python::lines::line_in(&ours, addr),
                    pipeprobe::python::lines::line_in(&want, addr),
                    "{}: byte {addr} of table {hex} from line {first}: ours {ours:?}, co_lines {want:?}",
                    python.display()
                );
            }
        }
        let measured = |key: &str| -> Vec<u64> {
            v["layout"][key]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(serde_json::Value::as_u64)
                .collect()
        };
        let layout = pipeprobe::python::code_layout(minor);
        let offsets = pipeprobe::python::offsets(minor).unwrap();
        for (key, ours) in [
            ("linetable", layout.linetable),
            ("code_adaptive", layout.code_adaptive),
            ("frame_instr", u64::from(offsets.frame_instr)),
        ] {
            assert!(
                measured(key).contains(&ours),
                "{}: {key} at {ours}, measured {:?}",
                python.display(),
                measured(key)
            );
        }
    }
}

#[test]
fn each_python_thread_keeps_its_own_stack() {
    let (_, python) = interpreters().pop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(&python, &[], "threads");
    let agent = Agent::start(&["--target", &format!("py=pid:{}", p.pid())]);
    let folded = capture(
        &agent,
        p.pid(),
        &["--duration", "2s"],
        &dir.path().join("threads.folded"),
    );
    let (one, two, all) = (
        weight(&folded, "thread_one"),
        weight(&folded, "thread_two"),
        total(&folded),
    );
    eprintln!("thread_one {one}, thread_two {two}, all {all}");
    // Two spinning threads share the GIL: each gets a fair part of the samples.
    assert!(
        one as f64 > 0.25 * all as f64 && two as f64 > 0.25 * all as f64,
        "{folded}"
    );
    for line in folded.lines() {
        assert!(
            !(line.contains("thread_one (") && line.contains("thread_two (")),
            "two threads' frames in one stack: {line}"
        );
        if line.contains("thread_one (") || line.contains("thread_two (") {
            assert!(
                line.contains("Thread.run (") && !line.contains("main ("),
                "a worker thread's stack under another root: {line}"
            );
        }
    }
}

#[test]
fn native_frames_of_a_c_extension_sit_under_the_python_caller() {
    let (minor, python) = interpreters().pop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(&python, &[], "zlib");
    let agent = Agent::start(&["--target", &format!("py=pid:{}", p.pid())]);
    let folded = capture(
        &agent,
        p.pid(),
        &["--duration", "2s"],
        &dir.path().join("zlib.folded"),
    );
    let compress = weight(&folded, "compress_big");
    // The whole native path: the extension module's function (zlibmodule.c's zlib_compress,
    // built without frame pointers like the interpreter) under the Python caller, then zlib's
    // own frames (its exported functions, or its static ones by module+offset) under it.
    let in_libz: u64 = folded
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(s, _)| {
            let frames: Vec<&str> = s.split(';').collect();
            let caller = frames.iter().position(|f| f.starts_with("compress_big ("));
            let extension = caller.and_then(|i| {
                frames[i + 1..]
                    .iter()
                    .position(|f| f.starts_with("zlib_compress"))
                    .map(|j| i + 1 + j)
            });
            extension.is_some_and(|j| {
                frames[j + 1..].iter().any(|f| {
                    f.contains("libz.so") || f.contains("deflate") || f.contains("adler32")
                })
            })
        })
        .filter_map(|(_, n)| n.parse::<u64>().ok())
        .sum();
    eprintln!(
        "3.{minor}: compress_big {compress}, in libz under zlib_compress under it {in_libz}, \
         all {}",
        total(&folded)
    );
    assert!(compress as f64 > 0.8 * total(&folded) as f64, "{folded}");
    assert!(in_libz as f64 > 0.5 * compress as f64, "{folded}");
}

/// Lines multiply the distinct Python stacks of a capture; past what the kernel keeps, a
/// stack is kept by its functions alone. Nothing is lost, and the capture says so.
#[test]
fn more_python_stacks_than_the_kernel_keeps_lose_their_lines_not_their_samples() {
    let (_, python) = interpreters().pop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(&python, &[], "many");
    let agent = Agent::start(&["--target", &format!("py=pid:{}", p.pid())]);
    let out = dir.path().join("many.folded");
    let pid = p.pid().to_string();
    let o = agent.flamegraph(&[
        "--pid",
        &pid,
        "--duration",
        "10s",
        "--hz",
        "1000",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let folded = std::fs::read_to_string(&out).unwrap();
    let (all, in_python) = (total(&folded), weight(&folded, "main"));
    let generated: u64 = folded
        .lines()
        .filter(|l| l.contains("(many.py:"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    eprintln!(
        "{all} samples, {in_python} with Python frames, {generated} in generated functions; {}",
        stderr.trim()
    );
    assert!(
        stderr.contains("without line numbers"),
        "no note on the stacks kept by function: {stderr}"
    );
    assert!(all > 5000, "{all} samples in 10 s at 1000 Hz");
    assert!(
        in_python as f64 >= 0.97 * all as f64 && generated as f64 >= 0.9 * all as f64,
        "samples lost their Python frames: {in_python} / {generated} of {all}"
    );
    let lost = agent
        .scrape()
        .iter()
        .filter(|s| {
            s.name == "pipeprobe_events_lost_total"
                && s.labels.get("reason").map(String::as_str) == Some("python_stack_missing")
        })
        .map(|s| s.value)
        .sum::<f64>();
    assert!(lost < 0.01 * all as f64, "{lost} Python stacks lost");
}

/// The agent's anonymous memory (kB): its heap, where what it freed but kept would show.
fn rss_anon_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("RssAnon in /proc/PID/status")
}

/// Start-up (the kernel's BTF parsed twice) and a capture of Python processes (stacks unwound,
/// frames named and folded) free nearly all they allocate; the agent gives it back to the
/// kernel (`heap::release_free`) and keeps no parsed BTF. Without either, its anonymous memory
/// stays at their high-water marks: about 20 MB after start-up, and 34-41 MB after the capture
/// (a debug build, 2026-12-05), against 3 MB and 5-20 MB: what stays live after a capture (the
/// interpreters' caches among it) varies from run to run.
#[test]
fn start_up_and_captures_give_their_memory_back() {
    let (_, python) = interpreters().pop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&["--target", "py=cmdline:work\\.py hot$"]);
    let after_start = rss_anon_kb(agent.pid());
    let procs: Vec<Proc> = (0..4).map(|_| start(&python, &[], "hot")).collect();
    assert!(
        pipeprobe_tests::wait_until(std::time::Duration::from_secs(10), || {
            agent.value("pipeprobe_target_processes", "target", "py") == Some(4.0)
        })
        .is_some(),
        "the agent does not track the 4 Python processes"
    );
    let out = dir.path().join("py.folded");
    let o = agent.flamegraph(&[
        "--target",
        "py",
        "--duration",
        "3s",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        total(&std::fs::read_to_string(&out).unwrap()) > 100,
        "too few samples"
    );
    // The agent gives the memory back after it has sent the flamegraph: the lowest reading
    // within five seconds.
    let limit_kb = 25 * 1024;
    let mut after_capture = u64::MAX;
    let _ = pipeprobe_tests::wait_until(std::time::Duration::from_secs(5), || {
        after_capture = after_capture.min(rss_anon_kb(agent.pid()));
        after_capture < limit_kb
    });
    drop(procs);
    eprintln!(
        "agent RssAnon: {after_start} kB after start-up, {after_capture} kB after the capture"
    );
    assert!(
        after_start < 10 * 1024,
        "{after_start} kB of anonymous memory after start-up"
    );
    assert!(
        after_capture < limit_kb,
        "{after_capture} kB of anonymous memory after a capture"
    );
}

#[test]
fn offcpu_python_sleeps_are_weighted_by_their_time() {
    let (_, python) = interpreters().pop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(&python, &[], "sleep");
    let agent = Agent::start(&["--target", &format!("py=pid:{}", p.pid())]);
    let folded = capture(
        &agent,
        p.pid(),
        &[
            "--duration",
            "3s",
            "--mode",
            "offcpu",
            "--min-duration",
            "10ms",
        ],
        &dir.path().join("sleep.folded"),
    );
    let (nap, twitch) = (weight(&folded, "nap"), weight(&folded, "twitch"));
    eprintln!(
        "nap {} ms, twitch {} ms",
        nap / 1_000_000,
        twitch / 1_000_000
    );
    // Each loop naps 200 ms then twitches 20 x 1 ms: ~90% of 3 s is in naps, counted only
    // when a nap ended inside the capture.
    assert!(
        (2_200_000_000..=3_000_000_000).contains(&nap),
        "nap weighted {nap} ns:\n{folded}"
    );
    assert_eq!(twitch, 0, "1 ms sleeps are under --min-duration:\n{folded}");
    assert!(
        folded
            .lines()
            .any(|l| l.contains("nap (") && l.contains("_[k]")),
        "kernel frames under the Python frame:\n{folded}"
    );
}

#[test]
fn pprof_output_names_python_functions_for_go_tool_pprof() {
    let (_, python) = interpreters().pop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(&python, &[], "hot");
    let agent = Agent::start(&["--target", &format!("py=pid:{}", p.pid())]);
    let pb = dir.path().join("hot.pb.gz");
    capture(&agent, p.pid(), &["--duration", "2s"], &pb);
    let top = Command::new("go")
        .args(["tool", "pprof", "-top", "-cum", "-nodecount=30"])
        .arg(&pb)
        .env("HOME", dir.path())
        .output()
        .expect("go (golang-go) is needed: run `cargo xtask setup`");
    let report = String::from_utf8_lossy(&top.stdout);
    eprintln!("{report}");
    // Function names alone, each once (its lines are one function): the file and line are in
    // the Function and Line records.
    for f in ["hot_a", "hot_b", "spin", "main"] {
        assert_eq!(
            report
                .lines()
                .filter(|l| l.trim_end().ends_with(&format!(" {f}")))
                .count(),
            1,
            "{f} not once in go tool pprof -top:\n{report}"
        );
    }
    // `-lines` splits them by line: spin's loop body is there, at its line in work.py. Every
    // node is listed: spin's lines have no flat time of their own, and interpreter and kernel
    // leaves (a timer interrupt, say) can outnumber any cut-off.
    let by_line = Command::new("go")
        .args(["tool", "pprof", "-top", "-lines", "-nodecount=1000"])
        .arg(&pb)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let by_line = String::from_utf8_lossy(&by_line.stdout);
    let add = format!("work.py:{}", source_line("x += i * i"));
    assert!(
        by_line
            .lines()
            .any(|l| l.contains(" spin ") && l.trim_end().ends_with(&add)),
        "no `spin ... {add}` in go tool pprof -top -lines:\n{by_line}"
    );
    // ... and `-list` finds their source lines by file and line.
    let list = Command::new("go")
        .args(["tool", "pprof", "-traces"])
        .arg(&pb)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let traces = String::from_utf8_lossy(&list.stdout);
    assert!(traces.contains("hot_a"), "{traces}");
}

#[test]
fn an_unsupported_python_falls_back_to_native_frames_and_says_so() {
    let pyenv =
        std::env::var_os("PYENV_ROOT").map_or_else(|| PathBuf::from("/root/.pyenv"), PathBuf::from);
    let Some(old) = std::fs::read_dir(pyenv.join("versions"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("3.9."))
        })
        .map(|p| p.join("bin/python3.9"))
    else {
        panic!("the unsupported-version test needs a CPython 3.9 (pyenv install 3.9)");
    };
    let dir = tempfile::tempdir().unwrap();
    let p = start(&old, &[], "hot");
    let agent = Agent::start(&["--target", &format!("py=pid:{}", p.pid())]);
    let out = dir.path().join("old.folded");
    let o = agent.flamegraph(&[
        "--pid",
        &p.pid().to_string(),
        "--duration",
        "1s",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("runs Python 3.9, which pipeprobe cannot unwind"),
        "{stderr}"
    );
    let folded = std::fs::read_to_string(&out).unwrap();
    assert!(
        total(&folded) > 50 && folded.contains("python3.9"),
        "{folded}"
    );
    let counted = agent
        .scrape()
        .iter()
        .find(|s| s.name == "pipeprobe_python_unwind_unsupported_total")
        .map(|s| s.value);
    assert_eq!(counted, Some(1.0));
}

/// A hostile but valid perf map: CPython 3.12 with `-X perf` writes its own, and 1,000,000
/// lines more (entries over nothing, junk, 1 KiB names) are appended to it. The capture still
/// finishes promptly, with its Python frames named, and the agent's memory stays bounded.
#[test]
fn a_perf_map_of_a_million_lines_costs_a_bounded_capture() {
    let Some((_, python)) = interpreters().into_iter().find(|(m, _)| *m >= 12) else {
        eprintln!("SKIPPED: no CPython 3.12+ for -X perf here");
        return;
    };
    let p = start(&python, &["-X", "perf"], "hot");
    let map = PathBuf::from(format!("/tmp/perf-{}.map", p.pid()));
    assert!(map.exists(), "-X perf wrote no {}", map.display());
    {
        use std::io::Write as _;
        let mut f =
            std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(&map).unwrap());
        let long = "x".repeat(1024);
        for i in 0u64..1_000_000 {
            match i % 10 {
                // Not a perf map line at all.
                7 => writeln!(f, "garbage line {i} ;;; \u{fffd}"),
                8 => writeln!(f, "{:x} zz not_hex_size", 0x7f00_0000_0000u64 + i * 64),
                9 => writeln!(f, "{:x} 40 {long}{i}", 0x7e00_0000_0000u64 + i * 64),
                _ => writeln!(
                    f,
                    "{:x} 40 py::junk_{i}:/nowhere.py",
                    0x7d00_0000_0000u64 + i * 64
                ),
            }
            .unwrap();
        }
    }
    let bytes = std::fs::metadata(&map).unwrap().len();
    let agent = Agent::start(&["--target", &format!("py=pid:{}", p.pid())]);
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let folded = capture(
        &agent,
        p.pid(),
        &["--duration", "2s", "--hz", "99"],
        &dir.path().join("hostile.folded"),
    );
    let took = started.elapsed();
    let hwm_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    let (a, b) = (weight(&folded, "hot_a"), weight(&folded, "hot_b"));
    eprintln!(
        "perf map of {bytes} bytes: 2 s capture written after {took:?}, hot_a {a} hot_b {b}, \
         agent peak RSS {} MB",
        hwm_kb / 1024
    );
    let _ = std::fs::remove_file(&map);
    assert!(a > 0 && b > 0, "Python frames lost:\n{folded}");
    assert!(
        took < std::time::Duration::from_secs(12),
        "a 2 s capture took {took:?} with the hostile perf map"
    );
    assert!(
        hwm_kb < 512 * 1024,
        "the agent peaked at {} MB reading a {} MB perf map",
        hwm_kb / 1024,
        bytes >> 20
    );
}
