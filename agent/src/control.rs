//! The control API: a Unix socket (mode 0600 in a 0700 directory, peers checked to be root or
//! the agent's own user), never the metrics port. One JSON request line per connection, then
//! JSON response lines: `queued` while another capture runs, then `done` or `error`.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::stacks::{self, Profiler, Subject};

pub const DEFAULT_SOCKET: &str = "/run/pipeprobe/pipeprobe.sock";
/// Requests are a few hundred bytes; anything larger is refused unread.
const MAX_REQUEST: u64 = 64 * 1024;
/// Longest capture accepted.
pub const MAX_DURATION: Duration = Duration::from_secs(600);

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("cannot create the control socket directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the control socket directory {path} is {why}: another user could replace the socket; \
         use a directory owned by root with mode 0700 (the default {DEFAULT_SOCKET}'s), or pass \
         --control-socket"
    )]
    UnsafeDir { path: PathBuf, why: String },
    #[error("another agent is serving the control socket {path}; stop it or pass --control-socket")]
    InUse { path: PathBuf },
    #[error("cannot listen on the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Cpu,
    Offcpu,
    Syscall,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlamegraphRequest {
    pub target: Option<String>,
    pub pid: Option<u32>,
    pub duration_ms: u64,
    pub mode: Mode,
    pub hz: u64,
    /// Off-CPU episodes shorter than this are not counted.
    #[serde(default)]
    pub min_duration_us: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Request {
    Flamegraph(FlamegraphRequest),
    /// The stored span flamegraphs.
    Flamegraphs,
    /// One stored span flamegraph by id.
    Get {
        id: String,
    },
    /// Read the configuration again and apply its targets.
    Reload,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    /// Another capture runs; this one starts after it.
    Queued {
        ahead: usize,
    },
    Done {
        folded: String,
        samples: u64,
        notes: Vec<String>,
    },
    Error(String),
    List {
        entries: Vec<crate::spans::flamegraphs::Entry>,
    },
    File {
        id: String,
        svg: String,
    },
    Reloaded(crate::targets::Reloaded),
}

/// Binds the socket with root-only permissions, replacing a stale socket file.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(dir) = path.parent() {
        // Only a directory made here is tightened: an existing one is checked, never changed
        // (a socket pointed into /tmp once turned /tmp itself into 0700).
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|source| ControlError::Dir {
                path: dir.to_owned(),
                source,
            })?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| ControlError::Dir {
                    path: dir.to_owned(),
                    source,
                },
            )?;
        }
        check_dir(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse {
                path: path.to_owned(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Bind {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Whoever can write the socket's directory can put their own socket in its place: the
/// directory must be ours and writable by nobody else (root can chmod it, not own it).
fn check_dir(dir: &Path) -> Result<(), ControlError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(dir).map_err(|source| ControlError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let why = if meta.uid() != me {
        format!("owned by uid {}, not by the agent's uid {me}", meta.uid())
    } else if meta.mode() & 0o022 != 0 {
        format!("writable by others (mode {:o})", meta.mode() & 0o7777)
    } else {
        return Ok(());
    };
    Err(ControlError::UnsafeDir {
        path: dir.to_owned(),
        why,
    })
}

/// Captures run one at a time; later requests wait in order and are told so.
struct Captures {
    profiler: Option<tokio::sync::Mutex<Profiler>>,
    unavailable: String,
    running: tokio::sync::Mutex<()>,
    waiting: std::sync::atomic::AtomicUsize,
    /// Span flamegraphs, when the span intake stores them.
    store: Option<crate::spans::flamegraphs::Store>,
    reloader: Arc<crate::reload::Reloader>,
}

pub async fn serve(
    listener: UnixListener,
    profiler: Result<Profiler, String>,
    store: Option<crate::spans::flamegraphs::Store>,
    reloader: Arc<crate::reload::Reloader>,
) {
    let (profiler, unavailable) = match profiler {
        Ok(p) => (Some(tokio::sync::Mutex::new(p)), String::new()),
        Err(e) => (None, e),
    };
    let captures = Arc::new(Captures {
        profiler,
        unavailable,
        running: tokio::sync::Mutex::new(()),
        waiting: Default::default(),
        store,
        reloader,
    });
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let allowed = stream
            .peer_cred()
            .is_ok_and(|c| c.uid() == 0 || c.uid() == own_uid);
        let captures = captures.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, allowed, &captures).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn send(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

async fn handle(mut stream: UnixStream, allowed: bool, captures: &Captures) -> std::io::Result<()> {
    if !allowed {
        return send(
            &mut stream,
            &Response::Error("permission denied: the control API is for root".into()),
        )
        .await;
    }
    let mut line = String::new();
    let (read, _) = stream.split();
    let n = BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    if n as u64 >= MAX_REQUEST && !line.ends_with('\n') {
        return send(
            &mut stream,
            &Response::Error(format!("request larger than {MAX_REQUEST} bytes")),
        )
        .await;
    }
    let request = match parse_request(&line) {
        Ok(r) => r,
        Err(e) => return send(&mut stream, &Response::Error(e)).await,
    };
    let response = match request {
        Request::Flamegraph(req) => flamegraph(&mut stream, req, captures).await?,
        Request::Flamegraphs => match &captures.store {
            Some(s) => Response::List { entries: s.list() },
            None => Response::Error(NO_SPAN_FLAMEGRAPHS.into()),
        },
        Request::Get { id } => match &captures.store {
            Some(s) => match s.get(&id) {
                Some(svg) => Response::File { id, svg },
                None => Response::Error(format!(
                    "no span flamegraph `{id}`; `pipeprobe flamegraphs list` shows the stored ones"
                )),
            },
            None => Response::Error(NO_SPAN_FLAMEGRAPHS.into()),
        },
        Request::Reload => match captures.reloader.reload().await {
            Ok(r) => Response::Reloaded(r),
            Err(e) => Response::Error(e.to_string()),
        },
    };
    let sent = send(&mut stream, &response).await;
    if matches!(response, Response::Done { .. }) {
        // A capture ran: its stacks, symbols and folded text are freed once this is.
        drop(response);
        crate::heap::release_free();
    }
    sent
}

/// For `crate::fuzzing`: a request line through the parser and the capture checks.
#[doc(hidden)]
pub fn fuzz_request(line: &str) {
    match parse_request(line) {
        Ok(Request::Flamegraph(req)) => {
            let _ = check(&req);
        }
        Ok(_) => {}
        Err(e) => assert!(e.starts_with("malformed request: "), "{e}"),
    }
}

/// One request line, or what is wrong with it.
fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))
}

/// What a capture request asks for, or which of its fields is out of range.
fn check(req: &FlamegraphRequest) -> Result<(Subject, Duration), String> {
    let subject = match (&req.target, req.pid) {
        (Some(t), None) => Subject::Target(t.clone()),
        (None, Some(p)) => Subject::Pid(p),
        _ => return Err("give exactly one of target and pid".into()),
    };
    let duration = Duration::from_millis(req.duration_ms);
    if duration.is_zero() || duration > MAX_DURATION {
        return Err(format!(
            "duration must be between 1 ms and {} s",
            MAX_DURATION.as_secs()
        ));
    }
    if !(1..=1000).contains(&req.hz) {
        return Err("hz must be between 1 and 1000".into());
    }
    Ok((subject, duration))
}

const NO_SPAN_FLAMEGRAPHS: &str = "span flamegraphs are off on this node (otlp.enabled, \
     otlp.sample_hz and the profile probe must be on; the agent log says which is not)";

async fn flamegraph(
    stream: &mut UnixStream,
    req: FlamegraphRequest,
    captures: &Captures,
) -> std::io::Result<Response> {
    let Some(profiler) = captures.profiler.as_ref() else {
        return Ok(Response::Error(format!(
            "profiling is unavailable on this node: {}",
            captures.unavailable
        )));
    };
    let (subject, duration) = match check(&req) {
        Ok(v) => v,
        Err(e) => return Ok(Response::Error(e)),
    };
    let mut cfg = match profiler.lock().await.resolve(&subject) {
        Ok(c) => c,
        Err(e) => return Ok(Response::Error(e.to_string())),
    };
    cfg.mode = match req.mode {
        Mode::Cpu => agent_common::stacks::MODE_CPU,
        Mode::Offcpu => agent_common::stacks::MODE_OFFCPU,
        Mode::Syscall => agent_common::stacks::MODE_SYSCALL,
    };
    cfg.min_ns = req.min_duration_us.saturating_mul(1000);
    use std::sync::atomic::Ordering;
    let ahead = captures.waiting.fetch_add(1, Ordering::SeqCst);
    let guard = match captures.running.try_lock() {
        Ok(g) => g,
        Err(_) => {
            send(
                stream,
                &Response::Queued {
                    ahead: ahead.max(1),
                },
            )
            .await?;
            captures.running.lock().await
        }
    };
    let result = stacks::run(profiler, cfg, req.hz, duration).await;
    drop(guard);
    captures.waiting.fetch_sub(1, Ordering::SeqCst);
    Ok(match result {
        Ok(c) => Response::Done {
            folded: c.folded(),
            samples: c.samples,
            notes: c.notes,
        },
        Err(e) => Response::Error(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A flamegraph request with any field values, as JSON the way a client could send it.
    fn any_flamegraph() -> impl Strategy<Value = (String, FlamegraphRequest)> {
        (
            proptest::option::of("\\PC{0,40}"),
            proptest::option::of(any::<u32>()),
            prop_oneof![0u64..=700_000, any::<u64>()],
            prop_oneof![0u64..=1100, any::<u64>()],
            prop_oneof![Just(Mode::Cpu), Just(Mode::Offcpu), Just(Mode::Syscall)],
            any::<u64>(),
        )
            .prop_map(|(target, pid, duration_ms, hz, mode, min)| {
                let req = FlamegraphRequest {
                    target,
                    pid,
                    duration_ms,
                    mode,
                    hz,
                    min_duration_us: min,
                };
                let line = serde_json::to_string(&Request::Flamegraph(req.clone())).unwrap();
                (line, req)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Any line, however long or odd, is a request or a "malformed request" answer.
        #[test]
        fn any_line_is_a_request_or_refused(line in "\\PC{0,300}") {
            if let Err(e) = parse_request(&line) {
                prop_assert!(e.starts_with("malformed request: "), "{e}");
            }
        }

        /// JSON with any structure in the right places is parsed or refused, never more.
        #[test]
        fn any_json_value_is_a_request_or_refused(
            key in prop_oneof![
                Just("flamegraph".to_owned()),
                Just("get".to_owned()),
                Just("reload".to_owned()),
                Just("flamegraphs".to_owned()),
                "[a-z]{0,12}",
            ],
            value in prop_oneof![Just("null".to_owned()), Just("{}".to_owned()), "\\PC{0,60}", any::<i64>().prop_map(|n| n.to_string())],
        ) {
            for line in [format!("{{\"{key}\": {value}}}"), format!("\"{key}\""), format!("[\"{key}\", {value}]")] {
                let _ = parse_request(&line);
            }
        }

        /// A capture request round-trips, and is taken exactly when every field is in range;
        /// otherwise the answer names the field.
        #[test]
        fn capture_requests_are_taken_exactly_when_in_range((line, req) in any_flamegraph()) {
            let Ok(Request::Flamegraph(parsed)) = parse_request(&line) else {
                return Err(TestCaseError::fail(format!("{line} did not parse")));
            };
            let one_subject = parsed.target.is_some() != parsed.pid.is_some();
            let duration_ok = (1..=MAX_DURATION.as_millis() as u64).contains(&req.duration_ms);
            let hz_ok = (1..=1000).contains(&req.hz);
            match check(&parsed) {
                Ok((subject, d)) => {
                    prop_assert!(one_subject && duration_ok && hz_ok);
                    prop_assert_eq!(d.as_millis() as u64, req.duration_ms);
                    match subject {
                        Subject::Target(t) => prop_assert_eq!(Some(t), req.target),
                        Subject::Pid(p) => prop_assert_eq!(Some(p), req.pid),
                    }
                }
                Err(e) if !one_subject => prop_assert!(e.contains("target and pid"), "{e}"),
                Err(e) if !duration_ok => prop_assert!(e.contains("duration"), "{e}"),
                Err(e) => prop_assert!(!hz_ok && e.contains("hz"), "{e}"),
            }
        }
    }
}
