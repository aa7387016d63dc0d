//! The attach table: every probe family, its programs and hooks, attached one family at a time.
//!
//! A family that fails to load or attach is unloaded whole and reported with its reason
//! (`pipeprobe_probe_attached{probe} 0`, the log, `pipeprobe check`); the others keep running.
use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, PerfEvent, TracePoint},
};
use thiserror::Error;

use crate::{sched, stacks, syscalls, tcp, tracker};

/// Every family, in attach order (a family's `needs` comes before it).
pub const FAMILIES: &[&Family] = &[
    &tracker::FAMILY,
    &sched::FAMILY,
    &syscalls::FAMILY,
    &tcp::FAMILY,
    &tcp::RTT_FAMILY,
    &stacks::FAMILY,
];

/// Names accepted in `probes.disable`.
pub const NAMES: &[&str] = &[
    tracker::FAMILY.name,
    sched::FAMILY.name,
    syscalls::FAMILY.name,
    tcp::FAMILY.name,
    tcp::RTT_FAMILY.name,
    stacks::FAMILY.name,
];

/// Where a program attaches.
#[derive(Debug, Clone, Copy)]
pub enum Hook {
    /// A BTF-enabled tracepoint (`tp_btf/<event>`): typed arguments, no tracefs needed.
    BtfTracepoint(&'static str),
    /// A perf_event program: loaded at start, attached to the CPUs' perf events only while a
    /// capture runs.
    PerfEvent,
    /// A BTF tracepoint loaded at start but attached only while a capture runs.
    BtfTracepointOnDemand(&'static str),
    /// A classic tracepoint (attached through tracefs; fields at offsets from its format file).
    Tracepoint {
        category: &'static str,
        name: &'static str,
    },
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hook::BtfTracepoint(event) => write!(f, "tp_btf/{event}"),
            Hook::Tracepoint { category, name } => write!(f, "tracepoint/{category}/{name}"),
            Hook::PerfEvent => write!(f, "perf_event (software cpu-clock)"),
            Hook::BtfTracepointOnDemand(event) => write!(f, "tp_btf/{event} (during captures)"),
        }
    }
}

#[derive(Debug)]
pub struct ProgramSpec {
    /// Function name of the program in the eBPF object.
    pub program: &'static str,
    pub hook: Hook,
    /// A family, attached before this one, whose program on the same hook does this program's
    /// work as well: this one is then not loaded, which saves a program run (and whatever both
    /// would look up) per event.
    pub done_by: Option<&'static str>,
}

#[derive(Debug)]
pub struct Family {
    /// The `probe` label value and the name in `probes.disable`.
    pub name: &'static str,
    /// What the family needs from the kernel, shown when it fails.
    pub requires: &'static str,
    /// Another family this one cannot work without.
    pub needs: Option<&'static str>,
    pub programs: &'static [ProgramSpec],
}

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("program {program} is missing from the eBPF object (build mismatch)")]
    Missing { program: &'static str },
    #[error("program {program} has the wrong type for {hook}: {source}")]
    WrongType {
        program: &'static str,
        hook: Hook,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("failed to load {program} for {hook} (needs {requires}): {source}")]
    Load {
        program: &'static str,
        hook: Hook,
        requires: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("failed to attach {program} to {hook} (needs {requires}): {source}")]
    Attach {
        program: &'static str,
        hook: Hook,
        requires: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("disabled in the configuration (probes.disable)")]
    Disabled,
    #[error("not available on this kernel: {0}")]
    Unavailable(String),
    #[error("needs the {0} probe, which is not attached")]
    Needs(&'static str),
    #[error("the eBPF programs could not be loaded: {0}")]
    NoEbpf(String),
}

impl ProbeError {
    /// One line for tables and logs; the whole verifier log stays in the debug log.
    pub fn short(&self) -> String {
        one_line(&self.to_string())
    }
}

/// Text after which aya's load error gives the verifier's log.
const VERIFIER_OUTPUT: &str = "Verifier output:";

/// The first line of an error, with a refused program's reason in place of the verifier's log:
/// the verifier says why at the end of its log, after every instruction it walked, and the
/// log's first line is only the first of those (`0: R1=ctx() R10=fp0`).
fn one_line(full: &str) -> String {
    let first = full.lines().next().unwrap_or_default();
    let line = match (first.split_once(VERIFIER_OUTPUT), verifier_reason(full)) {
        (Some((head, _)), Some(why)) => format!("{head}The verifier says: {why}"),
        _ => first.to_owned(),
    };
    const MAX: usize = 300;
    match line.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

/// The verifier's reason for refusing a program: the last line of its log that is neither an
/// instruction (`18: (79) r2 = ...`), a source line (`; ...`) nor a closing statistic.
fn verifier_reason(full: &str) -> Option<&str> {
    let log = full.split_once(VERIFIER_OUTPUT)?.1;
    let statistic = |l: &str| {
        [
            "verification time",
            "stack depth",
            "processed ",
            "max_states_per_insn",
        ]
        .iter()
        .any(|p| l.starts_with(p))
    };
    let instruction = |l: &str| {
        l.split_once(':')
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    log.lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty() && !l.starts_with(';') && !statistic(l) && !instruction(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program left out for another family's must find that family attached already, on the
    /// same hook: otherwise its events would go unseen until that family came up, or for good.
    #[test]
    fn a_program_done_by_another_family_names_an_earlier_one_on_its_hook() {
        let mut done_by = 0;
        for (i, family) in FAMILIES.iter().enumerate() {
            for spec in family.programs {
                let Some(other) = spec.done_by else { continue };
                done_by += 1;
                let earlier = FAMILIES[..i]
                    .iter()
                    .find(|f| f.name == other)
                    .unwrap_or_else(|| {
                        panic!("{}: {other} is not attached before it", spec.program)
                    });
                assert!(
                    earlier
                        .programs
                        .iter()
                        .any(|p| p.done_by.is_none() && p.hook.to_string() == spec.hook.to_string()),
                    "{}: {other} has no program of its own on {}",
                    spec.program,
                    spec.hook
                );
            }
        }
        assert_eq!(
            done_by, 1,
            "syscall_switch is the one program done by another's"
        );
    }

    /// aya's text for a program the verifier refused (tcp_rcv_space_adjust reading its record
    /// through a moving pointer, as an early build of 2026-12-04 did).
    const REFUSED: &str =
        "failed to load tcp_rcv_space_adjust for tracepoint/tcp/tcp_rcv_space_adjust \
(needs tracepoints (tracefs)): the BPF_PROG_LOAD syscall returned Permission denied (os error 13). \
Verifier output: 0: R1=ctx() R10=fp0
; let len = global(len) as usize; @ tcp.rs:130
9: (67) r7 <<= 32                     ; R7=0x400000000
12: (2d) if r2 > r7 goto pc+13        ; R2=2 R7=4
18: (79) r2 = *(u64 *)(r6 +0)
dereference of modified ctx ptr R6 off=8 disallowed
verification time 669 usec
stack depth 40+0
processed 181 insns (limit 1000000) max_states_per_insn 2 total_states 5 peak_states 5 mark_read 0
";

    #[test]
    fn a_refused_program_is_summed_up_by_the_verifier_s_reason() {
        let line = one_line(REFUSED);
        assert_eq!(
            line,
            "failed to load tcp_rcv_space_adjust for tracepoint/tcp/tcp_rcv_space_adjust \
(needs tracepoints (tracefs)): the BPF_PROG_LOAD syscall returned Permission denied (os error 13). \
The verifier says: dereference of modified ctx ptr R6 off=8 disallowed"
        );
    }

    #[test]
    fn other_errors_keep_their_first_line_cut_on_a_character() {
        assert_eq!(one_line("no tracefs\nmore"), "no tracefs");
        let long = "é".repeat(400);
        let line = one_line(&long);
        assert_eq!(line.chars().count(), 303);
        assert!(line.ends_with("..."));
    }
}

/// Outcome of one family.
#[derive(Debug)]
pub struct ProbeStatus {
    pub name: &'static str,
    pub result: Result<(), ProbeError>,
}

impl Family {
    /// Loads and attaches every program of the family, or none of them; a program whose work a
    /// family in `attached` does is left out.
    pub fn attach(
        &self,
        bpf: &mut Ebpf,
        btf: &Btf,
        attached: impl Fn(&str) -> bool,
    ) -> Result<(), ProbeError> {
        for (i, spec) in self.programs.iter().enumerate() {
            if spec.done_by.is_some_and(&attached) {
                tracing::debug!(
                    probe = self.name,
                    program = spec.program,
                    "not loaded: another probe's program does its work"
                );
                continue;
            }
            if let Err(e) = attach_one(bpf, btf, spec, self.requires) {
                // Its attached programs too: a half-attached family would report wrong numbers.
                for done in &self.programs[..=i] {
                    unload(bpf, done);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Duplicated fds of the attached programs, by program name (for their kernel statistics).
pub fn attached_fds(
    bpf: &Ebpf,
    statuses: &[ProbeStatus],
) -> Vec<(&'static str, std::os::fd::OwnedFd)> {
    FAMILIES
        .iter()
        .filter(|f| {
            statuses
                .iter()
                .any(|s| s.name == f.name && s.result.is_ok())
        })
        .flat_map(|f| f.programs.iter())
        .filter_map(|spec| {
            let fd = bpf.program(spec.program)?.fd().ok()?;
            Some((
                spec.program,
                std::os::fd::AsFd::as_fd(fd).try_clone_to_owned().ok()?,
            ))
        })
        .collect()
}

fn unload(bpf: &mut Ebpf, spec: &ProgramSpec) {
    let Some(prog) = bpf.program_mut(spec.program) else {
        return;
    };
    let _ = match spec.hook {
        Hook::BtfTracepoint(_) | Hook::BtfTracepointOnDemand(_) => {
            <&mut BtfTracePoint>::try_from(prog).map(|p| p.unload())
        }
        Hook::Tracepoint { .. } => <&mut TracePoint>::try_from(prog).map(|p| p.unload()),
        Hook::PerfEvent => <&mut PerfEvent>::try_from(prog).map(|p| p.unload()),
    };
}

fn attach_one(
    bpf: &mut Ebpf,
    btf: &Btf,
    spec: &ProgramSpec,
    requires: &'static str,
) -> Result<(), ProbeError> {
    let ProgramSpec { program, hook, .. } = *spec;
    let prog = bpf
        .program_mut(program)
        .ok_or(ProbeError::Missing { program })?;
    let wrong_type = |source| ProbeError::WrongType {
        program,
        hook,
        source: Box::new(source),
    };
    let load = |source| ProbeError::Load {
        program,
        hook,
        requires,
        source: Box::new(source),
    };
    let attach = |source| ProbeError::Attach {
        program,
        hook,
        requires,
        source: Box::new(source),
    };
    match hook {
        Hook::BtfTracepoint(event) | Hook::BtfTracepointOnDemand(event) => {
            let tp: &mut BtfTracePoint = prog.try_into().map_err(wrong_type)?;
            tp.load(event, btf).map_err(load)?;
            // On-demand programs are attached by the capture that needs them.
            if matches!(hook, Hook::BtfTracepoint(_)) {
                tp.attach().map_err(attach)?;
            }
        }
        Hook::PerfEvent => {
            let pe: &mut PerfEvent = prog.try_into().map_err(wrong_type)?;
            pe.load().map_err(load)?;
        }
        Hook::Tracepoint { category, name } => {
            let tp: &mut TracePoint = prog.try_into().map_err(wrong_type)?;
            tp.load().map_err(load)?;
            tp.attach(category, name).map_err(attach)?;
        }
    }
    Ok(())
}

/// Attaches every family not disabled, unavailable, or missing what it needs; failures are
/// logged with their reason and returned.
pub fn attach_all(
    bpf: &mut Ebpf,
    btf: &Btf,
    disabled: &[String],
    unavailable: &[(&'static str, String)],
) -> Vec<ProbeStatus> {
    let mut statuses: Vec<ProbeStatus> = Vec::new();
    for family in FAMILIES {
        let attached = |name: &str| statuses.iter().any(|s| s.name == name && s.result.is_ok());
        let result = if disabled.iter().any(|d| d == family.name) {
            Err(ProbeError::Disabled)
        } else if let Some((_, why)) = unavailable.iter().find(|(n, _)| *n == family.name) {
            Err(ProbeError::Unavailable(why.clone()))
        } else if let Some(need) = family.needs.filter(|n| !attached(n)) {
            Err(ProbeError::Needs(need))
        } else {
            family.attach(bpf, btf, attached)
        };
        match &result {
            Ok(()) => tracing::info!(probe = family.name, "probe attached"),
            Err(ProbeError::Disabled) => {
                tracing::info!(probe = family.name, "probe disabled by configuration")
            }
            Err(e) => {
                tracing::warn!(probe = family.name, reason = %e.short(), "probe not attached; the others keep running");
                tracing::debug!(probe = family.name, error = ?e, "full error");
            }
        }
        statuses.push(ProbeStatus {
            name: family.name,
            result,
        });
    }
    statuses
}
