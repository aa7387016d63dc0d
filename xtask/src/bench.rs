//! `cargo xtask bench`: what the probes cost the workloads they watch, measured in alternating
//! runs (A B C A B C ...) in one invocation so machine noise falls on every variant alike;
//! medians and per-round ratios to the untraced baseline of the same round.
//!
//! Covered so far: the syscall-heavy workload (a tight getppid loop on one CPU, ~5 M/s) with no
//! tracing, with pipeprobe's syscalls probe alone, with every pipeprobe probe, and with
//! libbpf-tools `syscount -L`, the reference tool for syscall latency, on the same process.
use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use xtask::{cargo, exec, root};

use crate::setup;

#[derive(clap::Args)]
pub struct Options {
    /// Alternating rounds (each runs every variant once).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds each workload run lasts.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    None,
    SyscallsProbe,
    AllProbes,
    Syscount,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::None,
        Variant::SyscallsProbe,
        Variant::AllProbes,
        Variant::Syscount,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::None => "no tracing",
            Variant::SyscallsProbe => "pipeprobe, syscalls probe alone",
            Variant::AllProbes => "pipeprobe, all probes",
            Variant::Syscount => "libbpf-tools syscount -L -p PID",
        }
    }
}

/// A tool process, stopped (SIGINT, then kill) when dropped.
struct Tool(Option<Child>);

impl Drop for Tool {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            std::thread::sleep(Duration::from_millis(200));
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_tool(variant: Variant, pid: u32, dir: &std::path::Path) -> anyhow::Result<Tool> {
    let bin = root().join("target/debug/pipeprobe");
    let agent = |disable: &str| -> anyhow::Result<Tool> {
        let config = dir.join("bench.toml");
        std::fs::write(
            &config,
            format!(
                "[probes]\ndisable = [{disable}]\n[gpu]\nenabled = false\n[targets.bench]\npid = {pid}\n"
            ),
        )?;
        let child = Command::new(&bin)
            .args(["agent", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--control-socket")
            .arg(dir.join("bench.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the agent")?;
        Ok(Tool(Some(child)))
    };
    Ok(match variant {
        Variant::None => Tool(None),
        Variant::SyscallsProbe => agent("\"sched\", \"tcp\", \"tcp_rtt\", \"profile\"")?,
        Variant::AllProbes => agent("")?,
        Variant::Syscount => Tool(Some(
            Command::new("syscount")
                .args(["-L", "-p", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting syscount (libbpf-tools)")?,
        )),
    })
}

/// One workload run under `variant`: syscalls per second.
fn run_once(variant: Variant, secs: f64, dir: &std::path::Path) -> anyhow::Result<f64> {
    let workload = root().join("target/debug/workload");
    // Pinned to CPU 1; the tool gets 1.5 s to attach before the loop starts.
    let mut child = Command::new("taskset")
        .args(["-c", "1"])
        .arg(&workload)
        .args([
            "syscall-loop",
            "--secs",
            &secs.to_string(),
            "--delay-ms",
            "1500",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the workload")?;
    let _tool = start_tool(variant, child.id(), dir)?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    child.wait()?;
    line.trim()
        .strip_prefix("OPS_PER_SEC ")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unexpected workload output {line:?}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run()?;
    if !xtask::is_root() {
        bail!("the benchmarks load eBPF programs: run them as root (sudo -E cargo xtask bench)");
    }
    exec(cargo().args(["build", "--bins"]))?;
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); Variant::ALL.len()];
    for round in 1..=opts.rounds {
        for (i, v) in Variant::ALL.iter().enumerate() {
            let ops = run_once(*v, opts.secs, &dir)?;
            eprintln!(
                "round {round}/{}: {:<34} {ops:>12.0} syscalls/s",
                opts.rounds,
                v.name()
            );
            results[i].push(ops);
        }
    }
    let base = &results[0];
    let mut md = String::from(
        "# Benchmarks\n\nWritten by `cargo xtask bench` (run as root). Alternating rounds in one invocation; \
         each figure is the median over rounds, with min and max; overhead is the median of each \
         round's ratio to that round's untraced run.\n\n\
         ## Syscall-heavy workload\n\n\
         A tight `getppid` loop pinned to one CPU (`workload syscall-loop`), the process being the \
         only target (pipeprobe) or the `-p` filter (syscount). Debug build of the agent; the eBPF \
         programs are always release builds.\n\n\
         | variant | syscalls/s median (min–max) | overhead vs no tracing |\n| --- | --- | --- |\n",
    );
    let mut json = String::from("{\"syscall_loop\": [");
    for (i, v) in Variant::ALL.iter().enumerate() {
        let r = &results[i];
        let (min, max) = (
            r.iter().copied().fold(f64::MAX, f64::min),
            r.iter().copied().fold(0.0, f64::max),
        );
        let overhead = median(r.iter().zip(base).map(|(x, b)| 1.0 - x / b).collect());
        let _ = writeln!(
            md,
            "| {} | {:.2} M ({:.2}–{:.2} M) | {} |",
            v.name(),
            median(r.clone()) / 1e6,
            min / 1e6,
            max / 1e6,
            if *v == Variant::None {
                "—".to_owned()
            } else {
                format!("{:.1} %", overhead * 100.0)
            }
        );
        let _ = write!(
            json,
            "{}{{\"variant\": \"{}\", \"median\": {:.0}, \"min\": {min:.0}, \"max\": {max:.0}, \"overhead\": {overhead:.4}}}",
            if i > 0 { ", " } else { "" },
            v.name(),
            median(r.clone())
        );
    }
    let _ = write!(
        md,
        "\nReproduce: `sudo -E cargo xtask bench --rounds {} --secs {}`. Not measured yet: the \
         empty-program floor, the other workloads, footprint, capacity, scrape latency (issue 6).\n",
        opts.rounds, opts.secs
    );
    json.push_str("]}\n");
    std::fs::create_dir_all(root().join("docs"))?;
    std::fs::write(root().join("docs/benchmarks.md"), &md)?;
    std::fs::write(root().join("docs/benchmarks.json"), &json)?;
    println!("{md}");
    Ok(())
}
