//! Command-line interface.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "pipeprobe",
    version,
    about = "Node agent for GPU inference pipelines: kernel, GPU and span latency per pipeline stage"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: track the targets, attach the probes, serve /metrics.
    Agent(AgentArgs),
    /// Show what this host supports; exit 0 if the agent can run here.
    Check(CheckArgs),
    /// Live per-target summary from a running agent's /metrics.
    Top(TopArgs),
    /// Capture a flamegraph of a target or process through the running agent.
    Flamegraph(crate::flamegraph::FlamegraphArgs),
    /// List or fetch the flamegraphs the agent drew for slow spans.
    Flamegraphs(crate::flamegraph::FlamegraphsArgs),
    /// Make the running agent read its configuration again and apply the new target list,
    /// without stopping its probes (as SIGHUP does).
    Reload(ReloadArgs),
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// The agent's control socket.
    #[arg(long, default_value = crate::control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML configuration file (see the README for every key).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A target selector, NAME=KIND:VALUE with KIND comm, cmdline (regexes), pid or cgroup
    /// (path prefix). Repeat it; selectors of one NAME are OR-ed.
    #[arg(long = "target", value_name = "NAME=SELECTOR")]
    pub targets: Vec<String>,
    /// Address for /metrics, /healthz and /readyz [default: 127.0.0.1:9477].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Unix socket of the control API (flamegraphs) [default: /run/pipeprobe/pipeprobe.sock].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// NVML library to load [default: libnvidia-ml.so.1 from the loader path].
    #[arg(long, value_name = "PATH")]
    pub nvml_library: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The agent's metrics URL.
    #[arg(long, default_value = "http://127.0.0.1:9477/metrics")]
    pub url: String,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 2.0)]
    pub interval: f64,
    /// Stop after this many refreshes.
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// NVML library to try [default: libnvidia-ml.so.1 from the loader path].
    #[arg(long, value_name = "PATH")]
    pub nvml_library: Option<PathBuf>,
}
