//! What the agent itself costs and how fast it answers: footprint with 10 and 100 target
//! processes, BPF map memory, /metrics latency with 2,000 syscall series, flamegraph time from
//! capture end to file, one NVML round over 8 (fake) GPUs, event loss at saturating rates, and
//! the agent's own profile while it serves scrapes.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::tools::{Agent, Tool, bin, bpf_map_bytes, median, metric_sum, percentile, usage};

/// Children killed when dropped.
struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn fleet(n: usize, args: &[&str]) -> anyhow::Result<Fleet> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(
            Command::new(bin("workload"))
                .args(args)
                .stdout(Stdio::null())
                .spawn()
                .context("starting a target process")?,
        );
    }
    Ok(Fleet(v))
}

pub struct Footprint {
    pub targets: usize,
    pub rss_bytes: u64,
    /// CPU of the agent in % of one core, scraped every second.
    pub cpu_percent: f64,
    pub map_bytes: u64,
}

/// The agent tracking `n` processes that wake every 10 ms (syscalls, switches), scraped once a
/// second: RSS and CPU over `secs` after a warm-up.
pub fn footprint(dir: &Path, n: usize, secs: f64) -> anyhow::Result<Footprint> {
    let _fleet = fleet(
        n,
        &["quiet", "--cpu", "0", "--period-ms", "10", "--secs", "600"],
    )?;
    let agent = Agent::start(
        dir,
        "[gpu]\nenabled = false\n[targets.fleet]\ncomm = \"^workload$\"\n",
        &[],
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let tracked = metric_sum(&agent.scrape()?, "pipeprobe_target_processes", &[]);
    if tracked < n as f64 {
        bail!("the agent tracks {tracked} of {n} processes");
    }
    let (_, cpu0) = usage(agent.pid())?;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        agent.scrape()?;
        std::thread::sleep(Duration::from_secs(1));
    }
    let (rss, cpu1) = usage(agent.pid())?;
    Ok(Footprint {
        targets: n,
        rss_bytes: rss,
        cpu_percent: (cpu1 - cpu0) / t0.elapsed().as_secs_f64() * 100.0,
        map_bytes: bpf_map_bytes(agent.pid()),
    })
}

/// The agent's peak RSS (VmHWM) after a 10 s capture, at 99 Hz, of `n` Python processes running
/// the hot loop: what naming their frames and holding their stacks costs, and what the agent
/// still holds a second after the flamegraph is written. Returns the RSS in bytes before, at the peak and
/// after, and the samples captured.
pub fn python_targets(dir: &Path, python: &Path, n: usize) -> anyhow::Result<(u64, u64, u64, u64)> {
    let mut procs = Vec::new();
    for _ in 0..n {
        procs.push(
            Command::new(python)
                .arg(xtask::root().join("tests/python/work.py"))
                .arg("hot")
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    let _procs = Fleet(procs);
    let agent = Agent::start(
        dir,
        "[gpu]\nenabled = false\n[targets.py]\ncmdline = \"work.py hot\"\n",
        &[],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let (before, _) = usage(agent.pid())?;
    let out = dir.join("python-targets.folded");
    let o = agent
        .flamegraph(&[
            "--target",
            "py",
            "--duration",
            "10s",
            "--out",
            out.to_str().expect("utf-8 path"),
        ])
        .output()?;
    if !o.status.success() {
        bail!("flamegraph failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))?;
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmHWM")?;
    // The agent gives the capture's memory back after sending the flamegraph
    // (`heap::release_free`): the client can see its answer first.
    std::thread::sleep(Duration::from_secs(1));
    let (after, _) = usage(agent.pid())?;
    let samples = std::fs::read_to_string(&out)?
        .lines()
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    Ok((before, hwm_kb * 1024, after, samples))
}

pub struct Scrape {
    pub series: usize,
    pub bytes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The agent's own hottest frames (leaf functions) while it served the scrapes.
    pub self_profile: Vec<(String, f64)>,
}

/// /metrics latency with 50 targets x 40 syscalls, while the agent profiles itself.
pub fn scrape(dir: &Path, scrapes: usize) -> anyhow::Result<Scrape> {
    let mut config = String::from(
        "syscalls = \"all\"\nmax_syscall_series_per_target = 64\n[gpu]\nenabled = false\n",
    );
    for i in 0..50 {
        config.push_str(&format!(
            "[targets.t{i:02}]\ncmdline = \"--tag t{i:02}$\"\n"
        ));
    }
    let agent = Agent::start(dir, &config, &[])?;
    let mut procs = Vec::new();
    for i in 0..50 {
        procs.push(
            Command::new(bin("workload"))
                .args(["syscall-mix", "--secs", "600", "--tag", &format!("t{i:02}")])
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    let _procs = Fleet(procs);
    let end = Instant::now() + Duration::from_secs(10);
    let series = loop {
        let text = agent.scrape()?;
        let n = text
            .lines()
            .filter(|l| l.starts_with("pipeprobe_syscall_duration_seconds_count{"))
            .count();
        if n >= 2000 || Instant::now() > end {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if series < 2000 {
        bail!("only {series} syscall series after 10 s, 2000 expected");
    }
    let profile_out = dir.join("self.folded");
    let mut profiler = agent
        .flamegraph(&[
            "--pid",
            &agent.pid().to_string(),
            "--duration",
            "10s",
            "--hz",
            "999",
            "--out",
            profile_out.to_str().expect("utf-8 path"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut times = Vec::new();
    let mut bytes = 0;
    let t0 = Instant::now();
    while times.len() < scrapes || t0.elapsed() < Duration::from_secs(11) {
        let t = Instant::now();
        bytes = agent.scrape()?.len();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    profiler.wait()?;
    let folded = std::fs::read_to_string(&profile_out).unwrap_or_default();
    Ok(Scrape {
        series,
        bytes,
        p50_ms: percentile(times.clone(), 50.0),
        p99_ms: percentile(times, 99.0),
        self_profile: top_leaves(&folded, 8),
    })
}

/// The leaf frames holding the most samples, with their share.
fn top_leaves(folded: &str, n: usize) -> Vec<(String, f64)> {
    let mut by: std::collections::HashMap<String, u64> = Default::default();
    let mut total = 0;
    for l in folded.lines() {
        let Some((stack, count)) = l.rsplit_once(' ') else {
            continue;
        };
        let count: u64 = count.parse().unwrap_or(0);
        total += count;
        let leaf = stack.rsplit(';').next().unwrap_or("");
        *by.entry(leaf.to_owned()).or_default() += count;
    }
    let mut v: Vec<(String, f64)> = by
        .into_iter()
        .map(|(k, c)| (k, c as f64 / total.max(1) as f64))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(n);
    v
}

pub struct EndToEnd {
    pub subject: &'static str,
    pub samples: u64,
    /// From the capture's end to the file written, median over runs.
    pub after_end_secs: Vec<f64>,
}

/// `pipeprobe flamegraph --duration 10s` of a native and a Python workload, several SVGs each:
/// the time past the 10 s capture is symbolization, folding and rendering.
pub fn flamegraph_end_to_end(
    dir: &Path,
    runs: usize,
    python: Option<&Path>,
) -> anyhow::Result<Vec<EndToEnd>> {
    let mut out = Vec::new();
    let mut subjects: Vec<(&'static str, Command)> = Vec::new();
    let mut native = Command::new(bin("workload"));
    native.args(["cpu-loop", "--secs", "600"]);
    subjects.push(("native (workload cpu-loop)", native));
    if let Some(py) = python {
        let mut c = Command::new(py);
        c.arg(xtask::root().join("tests/python/work.py")).arg("hot");
        subjects.push(("Python 3.12 (work.py hot)", c));
    }
    for (subject, mut cmd) in subjects {
        let child = Tool(Some(cmd.stdout(Stdio::null()).spawn()?));
        let agent = Agent::start(
            dir,
            &format!(
                "[gpu]\nenabled = false\n[targets.subject]\npid = {}\n",
                child.pid()
            ),
            &[],
        )?;
        let mut after = Vec::new();
        let mut samples = 0;
        for i in 0..runs {
            let svg = dir.join(format!("e2e-{i}.svg"));
            let t = Instant::now();
            let o = agent
                .flamegraph(&[
                    "--target",
                    "subject",
                    "--duration",
                    "10s",
                    "--out",
                    svg.to_str().expect("utf-8 path"),
                ])
                .output()?;
            if !o.status.success() {
                bail!("flamegraph failed: {}", String::from_utf8_lossy(&o.stderr));
            }
            after.push(t.elapsed().as_secs_f64() - 10.0);
            samples = String::from_utf8_lossy(&o.stderr)
                .split('(')
                .nth(1)
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
        }
        out.push(EndToEnd {
            subject,
            samples,
            after_end_secs: after,
        });
    }
    Ok(out)
}

/// One NVML sampling round over 8 fake GPUs with 32 processes on them, as the agent times it
/// (`pipeprobe_gpu_sample_duration_seconds`): median of `rounds` rounds.
pub fn nvml_round(dir: &Path, rounds: usize) -> anyhow::Result<f64> {
    let lib = dir.join("libnvidia-ml-fake.so");
    xtask::exec(
        Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&lib)
            .arg(xtask::root().join("tests/nvml-fake/fake_nvml.c")),
    )?;
    let mut script = String::from("driver 550.54.15\n");
    for g in 0..8 {
        script.push_str(&format!(
            "gpu name=NVIDIA-H100 uuid=GPU-{g} util=50 memutil=30 mem_total=85899345920 \
             mem_used=10737418240 power_mw=300000 power_limit_mw=700000 temp=60 \
             energy_mj=1000 sm_mhz=1755 mem_mhz=2619\n"
        ));
    }
    for p in 0..32 {
        script.push_str(&format!(
            "proc gpu={} pid={} mem=536870912 sm=20\n",
            p % 8,
            100_000 + p
        ));
    }
    let script_path = dir.join("nvml.script");
    std::fs::write(&script_path, script)?;
    // SAFETY: set before the agent (our child) starts; xtask has no other threads here.
    unsafe { std::env::set_var("PIPEPROBE_FAKE_NVML", &script_path) };
    let agent = Agent::start(
        dir,
        &format!(
            "[gpu]\nenabled = true\ninterval_secs = 1\nnvml_library = \"{}\"\n[targets.x]\npid = 1\n",
            lib.display()
        ),
        &[],
    )?;
    let mut v = Vec::new();
    while v.len() < rounds {
        std::thread::sleep(Duration::from_millis(1000));
        let text = agent.scrape()?;
        let secs = metric_sum(&text, "pipeprobe_gpu_sample_duration_seconds", &[]);
        let gpus = metric_sum(&text, "pipeprobe_gpu_up", &["uuid="]);
        if gpus < 8.0 {
            continue;
        }
        v.push(secs);
    }
    Ok(median(v))
}

pub struct Capacity {
    pub what: &'static str,
    pub rate: f64,
    pub counted: f64,
    pub expected: f64,
    pub lost: f64,
}

/// The most syscalls and context switches this machine makes with every probe on (a getppid
/// loop on every CPU, then a pipe ping-pong pinned to every CPU): the agent must count every
/// one and lose nothing.
pub fn capacity(dir: &Path, secs: f64) -> anyhow::Result<Vec<Capacity>> {
    let agent = Agent::start(
        dir,
        "[gpu]\nenabled = false\n[targets.load]\ncmdline = \"syscall-loop\"\n\
         [targets.switch]\ncmdline = \"pingpong\"\n",
        &[],
    )?;
    Ok(vec![
        syscall_capacity(&agent, secs)?,
        switch_capacity(&agent, secs)?,
    ])
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn lost_total(metrics: &str) -> f64 {
    metric_sum(metrics, "pipeprobe_events_lost_total", &[])
}

fn syscall_capacity(agent: &Agent, secs: f64) -> anyhow::Result<Capacity> {
    let mut loops = Vec::new();
    for cpu in 0..cpus() {
        loops.push(
            Command::new("taskset")
                .args(["-c", &cpu.to_string()])
                .arg(bin("workload"))
                .args([
                    "syscall-loop",
                    "--secs",
                    &secs.to_string(),
                    "--delay-ms",
                    "500",
                ])
                .stdout(Stdio::piped())
                .spawn()?,
        );
    }
    let before = agent.scrape()?;
    let mut total_ops = 0.0;
    for c in loops {
        let out = c.wait_with_output()?;
        total_ops += String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("OPS "))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .context("syscall-loop printed no OPS line")?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = agent.scrape()?;
    let name = "pipeprobe_syscall_duration_seconds_count";
    let needles = ["target=\"load\"", "syscall=\"getppid\""];
    Ok(Capacity {
        what: "getppid loops on every CPU, all probes on",
        rate: total_ops / secs,
        counted: metric_sum(&after, name, &needles) - metric_sum(&before, name, &needles),
        expected: total_ops,
        lost: lost_total(&after) - lost_total(&before),
    })
}

/// Switches into each thread of `pids` so far, as the kernel counts them (`pcount`, the third
/// field of /proc/PID/task/TID/schedstat), and whether the thread is asleep: each switch-in
/// ends a wait the run-queue probe must count when the thread next leaves its CPU.
fn switch_ins(pids: &[u32]) -> anyhow::Result<Vec<(f64, bool)>> {
    let mut threads = Vec::new();
    for pid in pids {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let dir = task?.path();
            let text = std::fs::read_to_string(dir.join("schedstat"))
                .with_context(|| format!("reading {}/schedstat", dir.display()))?;
            let count = text
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("{}: no switch count in {text:?}", dir.display()))?;
            let stat = std::fs::read_to_string(dir.join("stat"))?;
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.as_bytes()[0]);
            threads.push((count, state == Some(b'S')));
        }
    }
    Ok(threads)
}

/// The kernel's count of switches into `pids` and the agent's metrics at one point: every thread
/// asleep (its last wait counted when it left its CPU) and no switch-in between the two reads.
/// A thread preempted while it went to sleep would otherwise run between them and be counted
/// by one side only.
fn quiet_point(agent: &Agent, pids: &[u32]) -> anyhow::Result<(f64, String)> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let before = switch_ins(pids)?;
        let metrics = agent.scrape()?;
        let after = switch_ins(pids)?;
        if before == after && after.iter().all(|&(_, asleep)| asleep) {
            return Ok((after.iter().map(|&(n, _)| n).sum(), metrics));
        }
        if Instant::now() > end {
            bail!("the ping-pong threads did not all sleep within 5 s: {after:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A ping-pong pair pinned to every CPU, all probes on: every switch into one of its threads
/// ends a wait the run-queue probe counts. The kernel's count and the agent's are read while
/// every thread is blocked (`workload pingpong --hold`), before and after the run.
fn switch_capacity(agent: &Agent, secs: f64) -> anyhow::Result<Capacity> {
    let mut pairs = Fleet(Vec::new());
    for cpu in 0..cpus() {
        pairs.0.push(
            Command::new(bin("workload"))
                .args(["pingpong", "--hold", "--delay-ms", "1000", "--secs"])
                .arg(secs.to_string())
                .args(["--cpu", &cpu.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting workload pingpong")?,
        );
    }
    let pids: Vec<u32> = pairs.0.iter().map(Child::id).collect();
    let mut outs: Vec<_> = pairs
        .0
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().expect("piped")))
        .collect();
    let mut line = String::new();
    for out in &mut outs {
        line.clear();
        out.read_line(&mut line)?;
        anyhow::ensure!(line.trim() == "READY", "pingpong said {line:?}");
    }
    let (made0, seen0) = quiet_point(agent, &pids)?;
    for c in &mut pairs.0 {
        writeln!(c.stdin.as_mut().expect("piped"))?;
    }
    let mut round_trips = 0.0;
    for out in &mut outs {
        line.clear();
        out.read_line(&mut line)?;
        round_trips += line
            .trim()
            .strip_prefix("OPS_PER_SEC ")
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("pingpong said {line:?}"))?;
    }
    let (made1, seen1) = quiet_point(agent, &pids)?;
    let name = "pipeprobe_sched_runqueue_delay_seconds_count";
    let needles = ["target=\"switch\""];
    Ok(Capacity {
        what: "a ping-pong pair on every CPU, all probes on: waits ended by a switch-in",
        // Two switches per round trip.
        rate: 2.0 * round_trips,
        counted: metric_sum(&seen1, name, &needles) - metric_sum(&seen0, name, &needles),
        expected: made1 - made0,
        lost: lost_total(&seen1) - lost_total(&seen0),
    })
}
