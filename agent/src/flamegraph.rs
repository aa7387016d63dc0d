//! `pipeprobe flamegraph`: asks the running agent for a capture over the control socket and
//! writes it as SVG (inferno) or folded stacks. Everything checkable is checked before the
//! capture starts, so a bad argument never costs the operator the capture's duration.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use clap::{Args, ValueEnum};
use thiserror::Error;

use crate::control::{self, FlamegraphRequest, Mode, Request, Response};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Svg,
    Folded,
    /// Gzipped pprof protobuf, for `go tool pprof`, Pyroscope, Parca.
    Pprof,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ModeArg {
    /// On-CPU time, sampled at --hz on every CPU.
    Cpu,
    /// Time blocked off CPU (switch-out to switch-in), weighted by duration, stack taken at
    /// switch-out; only episodes of at least --min-duration (default 1ms).
    Offcpu,
    /// Time in syscalls that took at least --min-duration (default 1ms), weighted by their
    /// duration; the syscall is the leaf frame.
    Syscall,
}

#[derive(Debug, Args)]
pub struct FlamegraphArgs {
    /// Target (as configured in the agent) to profile.
    #[arg(long, conflicts_with = "pid", required_unless_present = "pid")]
    pub target: Option<String>,
    /// Process to profile.
    #[arg(long)]
    pub pid: Option<u32>,
    /// How long to capture: 500ms, 10s, 2m (at most 10m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long, value_enum, default_value_t = ModeArg::Cpu)]
    pub mode: ModeArg,
    /// Only count episodes at least this long (for the blocking modes).
    #[arg(long, value_parser = parse_duration)]
    pub min_duration: Option<Duration>,
    /// Samples per second per CPU (cpu mode).
    #[arg(long, default_value_t = 99)]
    pub hz: u64,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
    /// Output format [default: from the file extension: .svg, .folded or .txt, .pb.gz or .pprof].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// The agent's control socket.
    #[arg(long, default_value = control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
}

#[derive(Debug, Error)]
pub enum FlamegraphError {
    #[error("{0}")]
    BadInput(String),
    #[error("cannot write {path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot reach the agent at {path}: {source}; is `pipeprobe agent` running on this node (and are you root)?"
    )]
    NoAgent {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent refused the capture: {0}")]
    Refused(String),
    #[error("lost the connection to the agent during the capture: {0}")]
    Connection(#[source] std::io::Error),
}

impl FlamegraphError {
    /// 2 for bad input, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            FlamegraphError::BadInput(_) | FlamegraphError::Output { .. } => 2,
            _ => 1,
        }
    }
}

/// `500ms`, `10s`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 10s or 2m"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{s}` is not a duration like 500ms, 10s or 2m"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

fn format_of(args: &FlamegraphArgs) -> Result<Format, FlamegraphError> {
    if let Some(f) = args.format {
        return Ok(f);
    }
    match args.out.extension().and_then(|e| e.to_str()) {
        Some("svg") => Ok(Format::Svg),
        Some("folded" | "txt") => Ok(Format::Folded),
        Some("pb" | "pprof") => Ok(Format::Pprof),
        Some("gz") if args.out.to_string_lossy().ends_with(".pb.gz") => Ok(Format::Pprof),
        _ => Err(FlamegraphError::BadInput(format!(
            "cannot tell the format of {} from its extension: use .svg, .folded or .pb.gz, or pass --format",
            args.out.display()
        ))),
    }
}

/// Checks the arguments; returns the request and the output format.
pub fn validate(args: &FlamegraphArgs) -> Result<(FlamegraphRequest, Format), FlamegraphError> {
    let bad = |m: String| Err(FlamegraphError::BadInput(m));
    if args.duration.is_zero() || args.duration > control::MAX_DURATION {
        return bad(format!(
            "--duration must be more than 0 and at most {}s, got {:?}",
            control::MAX_DURATION.as_secs(),
            args.duration
        ));
    }
    if args.min_duration.is_some() && args.mode == ModeArg::Cpu {
        return bad(
            "--min-duration applies to blocking modes; --mode cpu samples at --hz instead".into(),
        );
    }
    if !(1..=1000).contains(&args.hz) {
        return bad(format!("--hz must be between 1 and 1000, got {}", args.hz));
    }
    let format = format_of(args)?;
    let request = FlamegraphRequest {
        target: args.target.clone(),
        pid: args.pid,
        duration_ms: args.duration.as_millis().max(1) as u64,
        mode: match args.mode {
            ModeArg::Cpu => Mode::Cpu,
            ModeArg::Offcpu => Mode::Offcpu,
            ModeArg::Syscall => Mode::Syscall,
        },
        hz: args.hz,
        min_duration_us: args
            .min_duration
            .unwrap_or(Duration::from_millis(1))
            .as_micros() as u64,
    };
    Ok((request, format))
}

/// Title naming what was captured.
fn title(args: &FlamegraphArgs, samples: u64) -> String {
    let what = match (&args.target, args.pid) {
        (Some(t), _) => format!("target {t}"),
        (None, Some(p)) => format!("pid {p}"),
        _ => String::new(),
    };
    match args.mode {
        ModeArg::Cpu => format!(
            "pipeprobe cpu flamegraph: {what}, {:?} at {} Hz, {samples} samples",
            args.duration, args.hz
        ),
        ModeArg::Offcpu | ModeArg::Syscall => format!(
            "pipeprobe {} flamegraph: {what}, {:?}, episodes of at least {:?}, {:.3} s in all",
            if args.mode == ModeArg::Offcpu {
                "off-CPU"
            } else {
                "slow-syscall"
            },
            args.duration,
            args.min_duration.unwrap_or(Duration::from_millis(1)),
            samples as f64 / 1e9
        ),
    }
}

/// An inferno SVG of `folded`; a readable placeholder when there is nothing to draw (inferno
/// refuses empty input).
pub fn svg(
    title: &str,
    subtitle: Option<String>,
    count_name: &str,
    folded: &str,
) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if folded.is_empty() {
        writeln!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\"><text y=\"20\">{title}: no samples</text></svg>"
        )?;
        return Ok(out);
    }
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_owned();
    opts.count_name = count_name.to_owned();
    opts.subtitle = subtitle;
    inferno::flamegraph::from_lines(&mut opts, folded.lines(), &mut out)
        .map_err(std::io::Error::other)?;
    Ok(out)
}

fn render(
    args: &FlamegraphArgs,
    format: Format,
    title: &str,
    folded: &str,
    notes: &[String],
) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(&args.out)?);
    match format {
        Format::Folded => file.write_all(folded.as_bytes())?,
        Format::Pprof => {
            let weights = match args.mode {
                ModeArg::Cpu => crate::pprof::Weights::CpuSamples { hz: args.hz },
                ModeArg::Offcpu => crate::pprof::Weights::Nanos("offcpu"),
                ModeArg::Syscall => crate::pprof::Weights::Nanos("syscall"),
            };
            file.write_all(&crate::pprof::from_folded(folded, weights, args.duration)?)?
        }
        Format::Svg => {
            let count = if args.mode == ModeArg::Cpu {
                "samples"
            } else {
                "ns"
            };
            let subtitle = (!notes.is_empty()).then(|| notes.join("; "));
            file.write_all(&svg(title, subtitle, count, folded)?)?
        }
    }
    file.flush()
}

pub fn run(args: &FlamegraphArgs) -> Result<(), FlamegraphError> {
    let (request, format) = validate(args)?;
    // Fail on an unwritable path now, not after the capture.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .map_err(|source| FlamegraphError::Output {
            path: args.out.clone(),
            source,
        })?;
    let mut stream =
        UnixStream::connect(&args.control_socket).map_err(|source| FlamegraphError::NoAgent {
            path: args.control_socket.clone(),
            source,
        })?;
    let mut line = serde_json::to_vec(&Request::Flamegraph(request))
        .map_err(|e| FlamegraphError::Refused(e.to_string()))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(FlamegraphError::Connection)?;
    eprintln!("capturing {:?}...", args.duration);
    for reply in BufReader::new(stream).lines() {
        let reply = reply.map_err(FlamegraphError::Connection)?;
        match serde_json::from_str::<Response>(&reply) {
            Ok(Response::Queued { ahead }) => {
                eprintln!("another capture is running on this node: queued behind {ahead}");
            }
            Ok(Response::Done {
                folded,
                samples,
                notes,
            }) => {
                for n in &notes {
                    eprintln!("note: {n}");
                }
                let title = title(args, samples);
                render(args, format, &title, &folded, &notes).map_err(|source| {
                    FlamegraphError::Output {
                        path: args.out.clone(),
                        source,
                    }
                })?;
                let unit = if args.mode == ModeArg::Cpu {
                    "samples"
                } else {
                    "ns"
                };
                eprintln!("wrote {} ({samples} {unit})", args.out.display());
                return Ok(());
            }
            Ok(Response::Error(e)) => return Err(FlamegraphError::Refused(e)),
            Ok(other) => {
                return Err(FlamegraphError::Refused(format!(
                    "unexpected reply from the agent: {other:?}"
                )));
            }
            Err(e) => {
                return Err(FlamegraphError::Refused(format!(
                    "unreadable reply from the agent: {e}"
                )));
            }
        }
    }
    Err(FlamegraphError::Connection(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the agent closed the connection without a result",
    )))
}

/// `pipeprobe flamegraphs`: the span flamegraphs the agent stored.
#[derive(Debug, clap::Args)]
pub struct FlamegraphsArgs {
    #[command(subcommand)]
    pub command: StoredCommand,
    /// The agent's control socket.
    #[arg(long, default_value = crate::control::DEFAULT_SOCKET, global = true)]
    pub control_socket: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
pub enum StoredCommand {
    /// List them, oldest first: id (TRACEID-SPANID), size, when.
    List,
    /// Write one to a file (`--out -`: standard output).
    Get {
        id: String,
        #[arg(long)]
        out: PathBuf,
    },
}

/// One request, one reply.
pub(crate) fn ask(
    socket: &std::path::Path,
    request: &Request,
) -> Result<Response, FlamegraphError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| FlamegraphError::NoAgent {
        path: socket.to_owned(),
        source,
    })?;
    let mut line =
        serde_json::to_vec(request).map_err(|e| FlamegraphError::Refused(e.to_string()))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(FlamegraphError::Connection)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(FlamegraphError::Connection)?;
    match serde_json::from_str::<Response>(&reply) {
        Ok(Response::Error(e)) => Err(FlamegraphError::Refused(e)),
        Ok(r) => Ok(r),
        Err(e) => Err(FlamegraphError::Refused(format!(
            "unreadable reply from the agent: {e}"
        ))),
    }
}

pub fn run_stored(args: &FlamegraphsArgs) -> Result<(), FlamegraphError> {
    match &args.command {
        StoredCommand::List => {
            let Response::List { entries } = ask(&args.control_socket, &Request::Flamegraphs)?
            else {
                return Err(FlamegraphError::Refused("unexpected reply".into()));
            };
            println!("{:<50} {:>9} {:>12}", "ID", "BYTES", "CREATED");
            for e in entries {
                println!("{:<50} {:>9} {:>12}", e.id, e.bytes, e.created);
            }
            Ok(())
        }
        StoredCommand::Get { id, out } => {
            let Response::File { svg, .. } =
                ask(&args.control_socket, &Request::Get { id: id.clone() })?
            else {
                return Err(FlamegraphError::Refused("unexpected reply".into()));
            };
            let output = |source| FlamegraphError::Output {
                path: out.clone(),
                source,
            };
            // `-` is standard output, for `kubectl exec ... > span.svg` from outside the pod.
            if out.as_os_str() == "-" {
                std::io::stdout()
                    .write_all(svg.as_bytes())
                    .map_err(output)?;
            } else {
                std::fs::write(out, svg).map_err(output)?;
                eprintln!("wrote {}", out.display());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> FlamegraphArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            a: FlamegraphArgs,
        }
        let mut argv = vec!["x"];
        argv.extend_from_slice(extra);
        W::try_parse_from(argv).map(|w| w.a).unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("ten").unwrap_err().contains("500ms"));
    }

    #[test]
    fn validation() {
        let e = |a: &[&str]| validate(&args(a)).unwrap_err().to_string();
        assert!(
            e(&["--target", "stt", "--out", "x.svg", "--duration", "0s"]).contains("--duration")
        );
        assert!(
            e(&["--target", "stt", "--out", "x.svg", "--duration", "11m"]).contains("at most 600s")
        );
        assert!(
            e(&["--target", "stt", "--out", "x.svg", "--min-duration", "5ms"])
                .contains("--min-duration")
        );
        assert!(e(&["--target", "stt", "--out", "x.png"]).contains("--format"));
        assert!(e(&["--target", "stt", "--out", "x.svg", "--hz", "0"]).contains("--hz"));
        let (req, fmt) = validate(&args(&[
            "--pid",
            "7",
            "--out",
            "x.folded",
            "--duration",
            "2s",
        ]))
        .unwrap();
        assert_eq!(
            (req.pid, req.duration_ms, fmt),
            (Some(7), 2000, Format::Folded)
        );
    }
}
