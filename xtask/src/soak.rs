//! `cargo xtask soak`: the agent (release build, every probe, span history, continuous sampling
//! and span intake) under process churn for many minutes, beside the synthetic pipeline sending
//! spans. Samples the agent's memory, descriptors and CPU, the kernel's tracked-process map and
//! the events lost every 10 s, then checks that nothing of the churn is left and reports the
//! slopes in docs/reliability.md. The CI test suite runs a 15 s version (tests/tests/agent/soak.rs).
use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use xtask::{cargo, exec, root};

use crate::{
    bench::tools::{Agent, Tool, bin, metric_sum, usage},
    setup,
};

#[derive(clap::Args)]
pub struct Options {
    /// How long the churn runs.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Short-lived target processes started per second (each with two threads).
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
}

struct Point {
    secs: f64,
    rss_mb: f64,
    fds: f64,
    cpu_s: f64,
    tracked: f64,
}

/// Least-squares slope of `y` over `x`.
fn slope(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

/// The kernel's tracked-process map, by bpftool: its tgids.
fn tracked_in_kernel() -> anyhow::Result<Vec<u32>> {
    let o = Command::new("bpftool")
        .args(["map", "dump", "name", "TRACKED", "-j"])
        .output()
        .context("bpftool (cargo xtask setup installs it)")?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    let b: Vec<u8> = e["key"]
                        .as_array()?
                        .iter()
                        .filter_map(|x| {
                            u8::from_str_radix(x.as_str()?.trim_start_matches("0x"), 16).ok()
                        })
                        .collect();
                    Some(u32::from_le_bytes(b.try_into().ok()?))
                })
                .collect()
        })
        .unwrap_or_default())
}

fn fds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0.0, |d| d.count() as f64)
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run()?;
    if !xtask::is_root() {
        bail!("the soak loads eBPF programs: run it as root (sudo -E cargo xtask soak)");
    }
    exec(cargo().args(["build", "--release", "--bins"]))?;
    let dir = root().join("target/soak");
    std::fs::create_dir_all(&dir)?;
    let marker = format!("soak-churn-{}", std::process::id());
    let agent = Agent::start(
        &dir,
        &format!(
            "[gpu]\nenabled = false\n[otlp]\nflamegraph_dir = \"{}\"\n\
             [targets.churn]\ncmdline = \"{marker}\"\n\
             [targets.stt]\ncmdline = \"workload stage stt\"\n[targets.mt]\ncmdline = \"workload stage mt\"\n\
             [targets.tts]\ncmdline = \"workload stage tts\"\n",
            dir.join("flamegraphs").display()
        ),
        &[],
    )?;
    let _pipeline = Tool::spawn(
        Command::new(bin("workload"))
            .args(["pipeline", "--rate", "20"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
            .env("OTEL_BSP_SCHEDULE_DELAY", "500")
            .stdout(Stdio::null()),
    )?;
    let secs = opts.minutes * 60.0;
    let churn = Command::new(bin("workload"))
        .args([
            "churn",
            "--marker",
            &marker,
            "--rate",
            &opts.rate.to_string(),
        ])
        .args(["--secs", &secs.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the churn")?;
    eprintln!(
        "soak: {} processes/s for {:.1} min, the pipeline at 20 requests/s with spans; sampling every 10 s",
        opts.rate, opts.minutes
    );
    let start = Instant::now();
    let mut points = Vec::new();
    while start.elapsed().as_secs_f64() < secs {
        std::thread::sleep(Duration::from_secs(10).min(Duration::from_secs_f64(
            (secs - start.elapsed().as_secs_f64()).max(0.1),
        )));
        let (rss, cpu) = usage(agent.pid())?;
        let p = Point {
            secs: start.elapsed().as_secs_f64(),
            rss_mb: rss as f64 / 1e6,
            fds: fds(agent.pid()),
            cpu_s: cpu,
            tracked: tracked_in_kernel()?.len() as f64,
        };
        eprintln!(
            "soak: {:>5.0} s  RSS {:.1} MB  fds {}  CPU {:.1} s  tracked {}",
            p.secs, p.rss_mb, p.fds, p.cpu_s, p.tracked
        );
        points.push(p);
    }
    let out = churn.wait_with_output()?;
    let children: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("CHILDREN "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    std::thread::sleep(Duration::from_secs(3));
    let stale: Vec<u32> = tracked_in_kernel()?
        .into_iter()
        .filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .collect();
    let metrics = agent.scrape()?;
    let left = metric_sum(
        &metrics,
        "pipeprobe_target_processes",
        &["target=\"churn\""],
    );
    let lost = metric_sum(&metrics, "pipeprobe_events_lost_total", &[]);
    let spans = metric_sum(&metrics, "pipeprobe_spans_received_total", &[]);

    // Slopes after the first fifth (allocator and caches warming up).
    let warm: Vec<&Point> = points.iter().filter(|p| p.secs >= secs / 5.0).collect();
    let x: Vec<f64> = warm.iter().map(|p| p.secs / 60.0).collect();
    let col = |f: fn(&Point) -> f64| warm.iter().map(|p| f(p)).collect::<Vec<f64>>();
    let rss_slope = slope(&x, &col(|p| p.rss_mb));
    let fd_slope = slope(&x, &col(|p| p.fds));
    let tracked_slope = slope(&x, &col(|p| p.tracked));
    let cpu = match (points.first(), points.last()) {
        (Some(a), Some(b)) if b.secs > a.secs => (b.cpu_s - a.cpu_s) / (b.secs - a.secs) * 100.0,
        _ => 0.0,
    };
    let (first, last) = (points.first(), points.last());
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Soak: process churn\n\n{children} short-lived target processes ({:.0} a minute, two \
         threads each) over {:.1} minutes, beside the synthetic pipeline sending spans ({spans:.0} \
         received), every probe, span history and continuous sampling on (release build).\n",
        opts.rate * 60.0,
        opts.minutes
    );
    let _ = writeln!(
        md,
        "| measure | start | end | slope after warm-up |\n| --- | --- | --- | --- |"
    );
    if let (Some(a), Some(b)) = (first, last) {
        let _ = writeln!(
            md,
            "| agent RSS | {:.1} MB | {:.1} MB | {rss_slope:+.3} MB/min |",
            a.rss_mb, b.rss_mb
        );
        let _ = writeln!(
            md,
            "| agent open descriptors | {} | {} | {fd_slope:+.3} /min |",
            a.fds, b.fds
        );
        let _ = writeln!(
            md,
            "| kernel tracked-process map entries | {} | {} | {tracked_slope:+.3} /min |",
            a.tracked, b.tracked
        );
    }
    let _ = writeln!(
        md,
        "\nAgent CPU {cpu:.1} % of a core. After the churn: {} dead pids in the kernel's map, \
         target `churn` counts {left} processes, {lost} events lost in all.\n\n\
         Reproduce: `sudo -E cargo xtask soak --minutes {} --rate {}`\n",
        stale.len(),
        opts.minutes,
        opts.rate
    );
    print!("{md}");
    let doc = root().join("docs/reliability.md");
    let old = std::fs::read_to_string(&doc).unwrap_or_default();
    let kept = old
        .split("## Soak: process churn")
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_owned();
    let head = if kept.is_empty() {
        "# Reliability\n\nWhat the agent survives, each with the figure measured and the command that reproduces it.".to_owned()
    } else {
        kept
    };
    std::fs::write(&doc, format!("{head}\n\n{md}"))?;
    eprintln!("soak: wrote {}", doc.display());
    if !stale.is_empty() || left != 0.0 {
        bail!(
            "the churn left {} stale pids and a count of {left}",
            stale.len()
        );
    }
    Ok(())
}
