//! `cargo xtask bench`: what pipeprobe costs and how it holds up, written to
//! docs/benchmarks.md and docs/benchmarks.json.
//!
//! Overheads come from alternating runs (variant A B C, A B C, ...) in one invocation so machine
//! noise falls on every variant alike; each figure is the median over rounds, and each overhead
//! the median of the per-round ratios to that round's untraced run, with its standard error. The
//! floor is the agent object's own empty programs on the same hooks (`tests/src/bin/floor.rs`).
mod footprint;
mod overhead;
mod progcost;
pub mod tools;

use std::fmt::Write as _;

use anyhow::bail;
use xtask::{cargo, exec, root};

use crate::setup;
use overhead::{Results, Variant};

#[derive(clap::Args)]
pub struct Options {
    /// Alternating rounds (each runs every variant of a workload once, starting one variant
    /// later than the round before).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds each workload run measures.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Only these parts (workload keys: syscall, ctxswitch, tcp, cpu, python, pipeline; or
    /// progcost, footprint, scrape, flamegraph, nvml, capacity). Partial runs print their tables
    /// and leave docs/ alone.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.1}")
    }
}

/// A target of the benchmark issue, checked.
struct Check {
    what: String,
    ok: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run()?;
    if !xtask::is_root() {
        bail!("the benchmarks load eBPF programs: run them as root (sudo -E cargo xtask bench)");
    }
    exec(cargo().args(["build", "--release", "--bins"]))?;
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let wanted = |k: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == k);
    let mut md = String::new();
    let mut json = serde_json::Map::new();
    let mut checks: Vec<Check> = Vec::new();

    for s in overhead::scenarios().into_iter().filter(|s| wanted(s.key)) {
        if s.python && overhead::python().is_none() {
            eprintln!("bench: no CPython 3.12 under pyenv; skipping the Python workload");
            continue;
        }
        let mut rates = vec![Vec::new(); s.variants.len()];
        let n = s.variants.len();
        for round in 1..=opts.rounds {
            // Each round starts one variant later: a variant that always ran right after the
            // same other one (whose agent is still being torn down, say) would carry that
            // position's effect in every round, which alternation alone does not cancel.
            for i in (0..n).map(|k| (k + round - 1) % n) {
                let v = &s.variants[i];
                let r = overhead::run_once(&s, v, opts.secs, &dir)?;
                eprintln!(
                    "{} round {round}/{}: {:<60} {r:>12.1} {}",
                    s.key,
                    opts.rounds,
                    v.name(),
                    s.unit
                );
                rates[i].push(r);
            }
        }
        let res = Results { rates };
        let _ = writeln!(
            md,
            "## {}\n\n{}\n\n| variant | {} median (min–max) | overhead vs no tracing | vs floor |\n| --- | --- | --- | --- |",
            s.title, s.about, s.unit
        );
        let first_floor = s.variants.iter().position(Variant::is_empty_floor);
        // A floor whose cost is not told apart from nothing cannot be a divisor; the most it
        // could cost bounds what the probes may cost.
        let (floor, floor_bound) = match first_floor {
            Some(f) if res.resolved(f) => (Some(f), None),
            Some(f) => (None, Some(res.upper_bound(f))),
            None => (None, None),
        };
        let mut rows = Vec::new();
        for (i, v) in s.variants.iter().enumerate() {
            let r = &res.rates[i];
            let (min, max) = (
                r.iter().copied().fold(f64::MAX, f64::min),
                r.iter().copied().fold(0.0, f64::max),
            );
            let over = res.overhead(i);
            // A variant measured cheaper than nothing costs 0x the floor, not a negative ratio.
            let vs_floor = floor
                .filter(|f| *f != i && i != 0)
                .map(|f| over.max(0.0) / res.overhead(f).max(1e-9));
            let _ = writeln!(
                md,
                "| {} | {} ({}–{}) | {} | {} |",
                v.name(),
                si(tools::median(r.clone())),
                si(min),
                si(max),
                if i == 0 {
                    "—".into()
                } else {
                    format!("{} ± {}", pct(over), pct(res.overhead_se(i)))
                },
                match vs_floor {
                    Some(x) => format!("{x:.2}x"),
                    None if floor_bound.is_some() && i != 0 => "floor not resolved".into(),
                    None => "—".into(),
                },
            );
            rows.push(serde_json::json!({
                "variant": v.name(), "median": tools::median(r.clone()), "min": min, "max": max,
                "overhead": if i == 0 { 0.0 } else { over },
                "overhead_se": if i == 0 { 0.0 } else { res.overhead_se(i) },
                "vs_floor": vs_floor,
            }));
            // Each single-purpose pipeprobe variant against the next reference tool listed.
            let single = matches!(v, Variant::Agent(f) if !f.is_empty())
                || matches!(v, Variant::Capture { .. });
            let against_floor = |x: f64| Check {
                what: format!(
                    "{}: {} at {x:.2}x the floor's cost (≤ 1.5x)",
                    s.title,
                    v.name()
                ),
                ok: x <= 1.5,
            };
            // A floor not told apart from nothing bounds the probe instead of dividing it.
            let within_bound = |floor_name: &str, bound: f64| Check {
                what: format!(
                    "{}: {floor_name} is not told apart from nothing (at most {}); {} costs \
                     {}, at most 1.5x that bound",
                    s.title,
                    pct(bound),
                    v.name(),
                    pct(over)
                ),
                ok: over <= 1.5 * bound,
            };
            // Against the first floor: its ratio, or its bound where it is not resolved.
            let vs_first_floor = vs_floor
                .map(against_floor)
                .or_else(|| floor_bound.map(|b| within_bound("the floor's cost", b)));
            if matches!(v, Variant::Untracked(_)) {
                checks.extend(vs_first_floor);
            } else if single {
                if let Some(j) = (i + 1..s.variants.len())
                    .find(|j| matches!(s.variants[*j], Variant::Reference(..)))
                {
                    let (reference, se, se_ref) =
                        (res.overhead(j), res.overhead_se(i), res.overhead_se(j));
                    let tied = res.not_told_apart(i, j);
                    checks.push(Check {
                        what: format!(
                            "{}: {} costs {} ± {} ≤ {} ± {} for {}{}",
                            s.title,
                            v.name(),
                            pct(over),
                            pct(se),
                            pct(reference),
                            pct(se_ref),
                            s.variants[j].name(),
                            if tied {
                                " (not told apart: within two standard errors)"
                            } else {
                                ""
                            }
                        ),
                        ok: over <= reference || tied,
                    });
                }
                checks.extend(vs_first_floor);
                // Further floors of empty programs (a probe on fewer hooks than the first
                // floor's), each checked the same way, resolved or not.
                for f in (0..s.variants.len())
                    .filter(|f| Some(*f) != first_floor && s.variants[*f].is_empty_floor())
                {
                    let name = format!("the {}", s.variants[f].name());
                    checks.push(if res.resolved(f) {
                        let x = over.max(0.0) / res.overhead(f);
                        Check {
                            what: format!(
                                "{}: {} at {x:.2}x the cost of {name} (≤ 1.5x)",
                                s.title,
                                v.name(),
                            ),
                            ok: x <= 1.5,
                        }
                    } else {
                        within_bound(&name, res.upper_bound(f))
                    });
                }
            }
            if s.key == "pipeline" && matches!(v, Variant::Agent([])) {
                checks.push(Check {
                    what: format!(
                        "synthetic pipeline loses {} with all probes on and its spans enriched (≤ 1 %)",
                        pct(over)
                    ),
                    ok: over <= 0.01,
                });
            }
        }
        let _ = writeln!(
            md,
            "\nReproduce: `sudo -E cargo xtask bench --only {} --rounds {} --secs {}`\n",
            s.key, opts.rounds, opts.secs
        );
        json.insert(s.key.into(), rows.into());
    }

    if wanted("progcost") {
        let _ = writeln!(
            md,
            "## Cost per program run\n\nThe kernel's own accounting (`kernel.bpf_stats_enabled`) \
             of each BPF program a variant loaded, over {} s of the workload: runs per second and \
             mean time per run. The accounting's two clock reads are part of every run: the \
             floor's empty programs show that share, so differences between rows are what the \
             programs do.\n\n| workload | variant | program | runs/s | ns per run |\n\
             | --- | --- | --- | --- | --- |",
            opts.secs
        );
        let mut rows = Vec::new();
        for s in overhead::scenarios()
            .into_iter()
            .filter(|s| ["syscall", "ctxswitch", "tcp"].contains(&s.key))
        {
            for v in s.variants.iter().filter(|v| !matches!(v, Variant::None)) {
                for c in progcost::measure(&s, v, opts.secs, &dir)? {
                    let _ = writeln!(
                        md,
                        "| {} | {} | `{}` | {} | {:.0} |",
                        s.title,
                        v.name(),
                        c.program,
                        si(c.runs_per_sec),
                        c.ns_per_run
                    );
                    rows.push(serde_json::json!({
                        "workload": s.key, "variant": v.name(), "program": c.program,
                        "runs_per_sec": c.runs_per_sec, "ns_per_run": c.ns_per_run,
                    }));
                }
            }
        }
        let _ = writeln!(
            md,
            "\nReproduce: `sudo -E cargo xtask bench --only progcost --secs {}`\n",
            opts.secs
        );
        json.insert("progcost".into(), rows.into());
    }

    if wanted("footprint") {
        let _ = writeln!(
            md,
            "## Agent footprint\n\nTargets are processes waking every 10 ms (`workload quiet`), one target \
             matching them all; every probe on; /metrics scraped once a second; CPU over 20 s after \
             a 3 s warm-up. BPF map memory is the `memlock` the kernel charges for the agent's maps.\n\n\
             | target processes | RSS | CPU (% of one core) | BPF map memory |\n| --- | --- | --- | --- |"
        );
        let mut rows = Vec::new();
        for n in [10, 100] {
            let f = footprint::footprint(&dir, n, 20.0)?;
            let _ = writeln!(
                md,
                "| {} | {:.1} MB | {:.2} % | {:.1} MB |",
                f.targets,
                f.rss_bytes as f64 / 1e6,
                f.cpu_percent,
                f.map_bytes as f64 / 1e6
            );
            rows.push(serde_json::json!({"targets": n, "rss_bytes": f.rss_bytes,
                "cpu_percent": f.cpu_percent, "bpf_map_bytes": f.map_bytes}));
            if n == 100 {
                checks.push(Check {
                    what: format!(
                        "agent RSS {:.1} MB with 100 targets (≤ 50 MB)",
                        f.rss_bytes as f64 / 1e6
                    ),
                    ok: f.rss_bytes <= 50_000_000,
                });
            }
        }
        if let Some(py) = overhead::python() {
            let (before, peak, after, samples) = footprint::python_targets(&dir, &py, 20)?;
            let _ = writeln!(
                md,
                "\nWith 20 Python 3.12 targets (`work.py hot`) and a 10 s capture of all of them at \
                 99 Hz ({samples} samples, Python frames walked and named): RSS {:.1} MB before, \
                 peak {:.1} MB, {:.1} MB a second after the flamegraph is written.",
                before as f64 / 1e6,
                peak as f64 / 1e6,
                after as f64 / 1e6
            );
            rows.push(
                serde_json::json!({"python_targets": 20, "rss_before_bytes": before,
                "rss_peak_bytes": peak, "rss_after_bytes": after, "samples": samples}),
            );
        }
        let _ = writeln!(
            md,
            "\nReproduce: `sudo -E cargo xtask bench --only footprint`\n"
        );
        json.insert("footprint".into(), rows.into());
    }

    if wanted("scrape") {
        let s = footprint::scrape(&dir, 500)?;
        let _ = writeln!(
            md,
            "## /metrics latency\n\n50 targets, each a process making the same 40 distinct \
             syscalls every half second (`workload syscall-mix`), `syscalls = \"all\"`: {} \
             syscall series, {:.0} kB per scrape. \
             Back-to-back scrapes for 11 s while the agent profiles itself at 999 Hz.\n\n\
             | p50 | p99 |\n| --- | --- |\n| {:.2} ms | {:.2} ms |\n\n\
             The agent's own hottest leaf frames meanwhile (`pipeprobe flamegraph --pid AGENT`):\n",
            s.series,
            s.bytes as f64 / 1e3,
            s.p50_ms,
            s.p99_ms
        );
        for (frame, share) in &s.self_profile {
            let _ = writeln!(md, "- {:.1} % `{frame}`", share * 100.0);
        }
        let _ = writeln!(
            md,
            "\nReproduce: `sudo -E cargo xtask bench --only scrape`\n"
        );
        checks.push(Check {
            what: format!(
                "scrape p99 {:.2} ms with {} series (< 50 ms)",
                s.p99_ms, s.series
            ),
            ok: s.p99_ms < 50.0,
        });
        json.insert(
            "scrape".into(),
            serde_json::json!({"series": s.series, "bytes": s.bytes, "p50_ms": s.p50_ms,
                "p99_ms": s.p99_ms, "self_profile": s.self_profile}),
        );
    }

    if wanted("flamegraph") {
        let py = overhead::python();
        let runs = footprint::flamegraph_end_to_end(&dir, 3, py.as_deref())?;
        let _ = writeln!(
            md,
            "## Flamegraph end to end\n\n`pipeprobe flamegraph --duration 10s --out x.svg` (99 Hz, SVG): \
             time from the capture's end to the file written (reading the maps, symbolizing, \
             naming Python frames, rendering), 3 runs.\n\n\
             | subject | samples | after the capture, median (min–max) |\n| --- | --- | --- |"
        );
        let mut rows = Vec::new();
        for e in &runs {
            let med = tools::median(e.after_end_secs.clone());
            let (min, max) = (
                e.after_end_secs.iter().copied().fold(f64::MAX, f64::min),
                e.after_end_secs.iter().copied().fold(0.0, f64::max),
            );
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} s ({:.2}–{:.2} s) |",
                e.subject, e.samples, med, min, max
            );
            checks.push(Check {
                what: format!(
                    "10 s capture of {} written {:.2} s after it ended (< 2 s)",
                    e.subject, max
                ),
                ok: max < 2.0,
            });
            rows.push(serde_json::json!({"subject": e.subject, "samples": e.samples, "after_end_secs": e.after_end_secs}));
        }
        let _ = writeln!(
            md,
            "\nReproduce: `sudo -E cargo xtask bench --only flamegraph`\n"
        );
        json.insert("flamegraph".into(), rows.into());
    }

    if wanted("nvml") {
        let secs = footprint::nvml_round(&dir, 10)?;
        let _ = writeln!(
            md,
            "## NVML round\n\nOne sampling round of 8 GPUs with 32 GPU processes through nvml-wrapper, \
             against the fake libnvidia-ml of tests/nvml-fake (no GPU here: this times the agent's \
             side, not a driver's), as `pipeprobe_gpu_sample_duration_seconds` reports it, median \
             of 10 rounds: **{:.3} ms**.\n\nReproduce: `sudo -E cargo xtask bench --only nvml`\n",
            secs * 1e3
        );
        checks.push(Check {
            what: format!("NVML round over 8 fake GPUs {:.3} ms (< 50 ms)", secs * 1e3),
            ok: secs < 0.05,
        });
        json.insert("nvml_round_secs".into(), secs.into());
    }

    if wanted("capacity") {
        let caps = footprint::capacity(&dir, 5.0)?;
        let _ = writeln!(
            md,
            "## Capacity\n\nThe highest rates this machine generates, with every probe on: the agent \
             must count every event and lose none (`pipeprobe_events_lost_total`). Syscalls are \
             counted against the loops' own counts; switches against the kernel's \
             (`pcount` in /proc/PID/task/TID/schedstat), read while every thread is blocked \
             before and after the run.\n\n\
             | load | rate | counted by pipeprobe | made | lost |\n| --- | --- | --- | --- | --- |"
        );
        let mut rows = Vec::new();
        for c in &caps {
            let _ = writeln!(
                md,
                "| {} | {}/s | {:.0} | {:.0} | {:.0} |",
                c.what,
                si(c.rate),
                c.counted,
                c.expected,
                c.lost
            );
            checks.push(Check {
                what: format!(
                    "{}: {:.0} of {:.0} counted, {} lost",
                    c.what, c.counted, c.expected, c.lost
                ),
                ok: c.lost == 0.0 && c.counted == c.expected,
            });
            rows.push(
                serde_json::json!({"load": c.what, "rate": c.rate, "counted": c.counted,
                "expected": c.expected, "lost": c.lost}),
            );
        }
        let _ = writeln!(
            md,
            "\nReproduce: `sudo -E cargo xtask bench --only capacity`\n"
        );
        json.insert("capacity".into(), rows.into());
    }

    let mut head = String::from(
        "# Benchmarks\n\nWritten by `cargo xtask bench` (root). Overheads: alternating rounds in one \
         invocation, each figure the median over rounds with min and max, each overhead the median \
         of the per-round losses against that round's untraced run, with its standard error \
         (± , from the rounds' median absolute deviation); \"vs floor\" divides a variant's \
         overhead by the floor's (empty BPF programs of the agent's own object on the same \
         hooks) where the floor's is more than two standard errors above zero; otherwise the \
         floor is \"not resolved\" and the probes are held to 1.5x its upper bound (median + 2 \
         standard errors). A probe and its reference tool closer than two standard errors of \
         their difference are not told apart, and the check says so. Release builds of the \
         agent and the workloads.\n\n",
    );
    let _ = writeln!(head, "## Targets\n");
    for c in &checks {
        let _ = writeln!(
            head,
            "- {} {}",
            if c.ok { "met:" } else { "MISSED:" },
            c.what
        );
    }
    head.push('\n');
    let mut md = head + &md;
    // What the tables cannot say (why a figure is what it is, what a profile changed) is kept by
    // hand beside them, so a full run rewrites the figures without losing it.
    let notes = root().join("docs/benchmarks-notes.md");
    match std::fs::read_to_string(&notes) {
        Ok(text) => {
            md.push_str(&text);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot read {}: {e}", notes.display()),
    }
    println!("{md}");
    if opts.only.is_empty() {
        std::fs::create_dir_all(root().join("docs"))?;
        std::fs::write(root().join("docs/benchmarks.md"), &md)?;
        std::fs::write(
            root().join("docs/benchmarks.json"),
            serde_json::to_string_pretty(&serde_json::Value::Object(json))? + "\n",
        )?;
    }
    Ok(())
}
