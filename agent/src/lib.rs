//! pipeprobe: a node agent for GPU inference pipelines. One module per probe family (matching
//! `agent-ebpf/src/`), plus the plumbing they share.
pub mod agent;
pub mod bpfstats;
pub mod btf;
pub mod caps;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod ebpf;
pub mod flamegraph;
#[doc(hidden)]
pub mod fuzzing;
pub mod gpu;
pub mod heap;
pub mod http;
pub mod instances;
pub mod kube;
pub mod lost;
pub mod metrics;
pub mod pprof;
pub mod probes;
pub mod procmaps;
pub mod python;
pub mod reload;
pub mod sched;
pub mod spans;
pub mod stacks;
pub mod syscalls;
pub mod targets;
pub mod tcp;
pub mod top;
pub mod tracefs;
pub mod tracker;
pub mod unwind;

use std::process::ExitCode;

use cli::{Cli, Command, LogFormat};

/// Sets up logging on stderr: `RUST_LOG` filters (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Runs a parsed command line; the one place errors become messages and exit codes.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Agent(args) => {
            init_logging(args.log_format);
            match agent::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("pipeprobe: error: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Check(args) => {
            let nvml = args
                .nvml_library
                .unwrap_or_else(|| gpu::DEFAULT_LIBRARY.into());
            let (table, can_run) = check::render(&check::rows(&nvml));
            print!("{table}");
            if can_run {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::Flamegraph(args) => match flamegraph::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pipeprobe: error: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::Flamegraphs(args) => match flamegraph::run_stored(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pipeprobe: error: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::Reload(args) => match reload::run_client(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pipeprobe: error: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::Top(args) => {
            let interval = std::time::Duration::from_secs_f64(args.interval.max(0.1));
            match top::run(&args.url, interval, args.count) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pipeprobe: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
