//! `cargo xtask demo`: builds everything, starts the agent as root with a config for the bundled
//! synthetic pipeline, starts the pipeline (stt -> mt -> tts over loopback TCP), and prints a
//! live per-target summary with `pipeprobe top` until Ctrl-C or `--duration`.
use std::{
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use xtask::{cargo, exec, is_root, root};

use crate::setup;

#[derive(clap::Args)]
pub struct Options {
    /// Stop by itself after this many seconds.
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// Where the agent serves /metrics.
    #[arg(long, default_value = "127.0.0.1:9477")]
    listen: SocketAddr,
    /// Requests per second through the pipeline.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
}

/// Kills the child when the demo ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child; SIGTERM lets the agent detach cleanly.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.0.try_wait().is_ok_and(|s| s.is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run()?;
    exec(cargo().args(["build", "--bins"]))?;
    let bin = root().join("target/debug");
    let dir = root().join("target/demo");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("pipeprobe.toml");
    std::fs::write(
        &config,
        format!(
            "# Written by `cargo xtask demo`: one target per stage of the synthetic pipeline,\n\
             # selected by command line as a Python service (`python stt_service.py`) would be.\n\
             listen = \"{}\"\n\n\
             [targets.stt]\ncmdline = \"workload stage stt\"\n\n\
             [targets.mt]\ncmdline = \"workload stage mt\"\n\n\
             [targets.tts]\ncmdline = \"workload stage tts\"\n\n\
             # The stages export spans with the OpenTelemetry SDK to the OTLP/HTTP receiver; the\n\
             # slow ones (one tts request in ten) get a flamegraph.\n\
             [otlp]\nhttp_listen = \"127.0.0.1:4318\"\nflamegraph_dir = \"{}\"\n",
            opts.listen,
            dir.join("flamegraphs").display()
        ),
    )?;
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path)?;

    let mut agent = if is_root() {
        Command::new(bin.join("pipeprobe"))
    } else {
        eprintln!("the agent needs root: starting it with sudo");
        let mut c = Command::new("sudo");
        c.arg(bin.join("pipeprobe"));
        c
    };
    agent
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .arg("--control-socket")
        .arg(dir.join("control.sock"))
        .stdout(Stdio::null())
        .stderr(log);
    let mut agent = Guard(agent.spawn().context("cannot start the agent")?);
    let start = Instant::now();
    while TcpStream::connect_timeout(&opts.listen, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = agent.0.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the agent exited ({status}) before serving:\n{log}");
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "the agent is not serving on {} after 30 s; see {}",
                opts.listen,
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut pipeline = Command::new(bin.join("workload"));
    pipeline
        .args(["pipeline", "--rate", &opts.rate.to_string()])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        // The SDK batches every 5 s by default, more than the table's 2 s refresh: rows would
        // alternate between a burst and nothing.
        .env("OTEL_BSP_SCHEDULE_DELAY", "500");
    if let Some(d) = opts.duration {
        pipeline.args(["--secs", &(d + 5).to_string()]);
    }
    let _pipeline = Guard(
        pipeline
            .spawn()
            .context("cannot start the synthetic pipeline")?,
    );

    println!("pipeprobe agent running (log: {})", log_path.display());
    println!("metrics: http://{}/metrics", opts.listen);
    println!("config:  {}", config.display());
    println!(
        "pipeline: stt -> mt -> tts at {} requests/s; Ctrl-C to stop\n",
        opts.rate
    );
    // Let the first requests flow, then show a flamegraph capture through the control socket.
    std::thread::sleep(Duration::from_secs(1));
    let svg = dir.join("tts-cpu.svg");
    exec(
        Command::new(bin.join("pipeprobe"))
            .args(["flamegraph", "--target", "tts", "--duration", "2s", "--out"])
            .arg(&svg)
            .arg("--control-socket")
            .arg(dir.join("control.sock")),
    )?;
    println!("flamegraph of tts: {}\n", svg.display());
    let mut top = Command::new(bin.join("pipeprobe"));
    top.args([
        "top",
        "--url",
        &format!("http://{}/metrics", opts.listen),
        "--interval",
        "2",
    ]);
    if let Some(d) = opts.duration {
        top.args(["--count", &(d / 2).max(1).to_string()]);
    }
    exec(&mut top)?;
    println!("\nflamegraphs of slow spans (pipeprobe flamegraphs get ID --out x.svg):");
    exec(
        Command::new(bin.join("pipeprobe"))
            .args(["flamegraphs", "list", "--control-socket"])
            .arg(dir.join("control.sock")),
    )?;
    drop(agent);
    Ok(())
}
