//! CPU stack sampling for flamegraphs: the user-space half of `agent-ebpf/src/stacks.rs`.
//!
//! The program is loaded at start (so `check` and `probe_attached` tell whether it can run) but
//! attached to the cpu-clock perf events of every CPU only while a capture runs: between
//! captures it costs nothing. At the end of a capture the counted (process, user stack, kernel
//! stack) keys are read once, symbolized with blazesym (ELF and DWARF symbols through
//! /proc/PID/map_files, so binaries of containers and deleted files work; perf maps for JIT
//! frames such as CPython's `-X perf`; /proc/kallsyms for the kernel), folded and cleared.
//!
//! CPU samples' user stacks are not walked in the kernel but copied to user space and unwound
//! with the modules' unwind tables (`unwind.rs`), through code built without frame pointers;
//! the kernel cannot aggregate those, so they are counted here, drained every 20 ms. The other
//! modes walk frame pointers in the kernel.
//!
//! Python processes of the subject also get their Python frames, walked in the kernel on each
//! sample (`python.rs`). They replace the interpreter's native frames: the stack reads root,
//! Python frames, then the native frames the innermost Python function runs (the interpreter
//! function executing it, C extensions, their libraries), then the kernel's.
use std::{collections::HashMap, sync::Arc, time::Duration};

use agent_common::{
    python::{PyProc, PyStack},
    stacks::{
        Blocked, CaptureConfig, KernelStack, MODE_CPU, MODE_OFFCPU, STACK_COPY_DRAIN_MS, StackCopy,
        StackKey,
    },
};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, StackTraceMap},
    programs::{
        BtfTracePoint, PerfEvent,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        tp_btf::BtfTracePointLinkId,
    },
};
use blazesym::{
    Pid,
    symbolize::{
        Input, Symbolized, Symbolizer,
        source::{Kernel as KernelSource, Process, Source},
    },
};
use thiserror::Error;

use crate::{
    ebpf::{Kernel, ring_record},
    probes::{Family, Hook, ProgramSpec},
    python::{CodeReader, Finder, Interpreter},
    targets::TargetSet,
    tracker::SharedTracked,
    unwind::Unwinders,
};

pub const FAMILY: Family = Family {
    name: "profile",
    requires: "perf_event programs on the software cpu-clock and tp_btf/sched_switch, with bpf_get_stackid",
    needs: None,
    programs: &[
        ProgramSpec {
            program: CPU_PROGRAM,
            hook: Hook::PerfEvent,
            done_by: None,
        },
        ProgramSpec {
            program: OFFCPU_PROGRAM,
            hook: Hook::BtfTracepointOnDemand("sched_switch"),
            done_by: None,
        },
        ProgramSpec {
            program: SYSCALL_ENTER_PROGRAM,
            hook: Hook::BtfTracepointOnDemand("sys_enter"),
            done_by: None,
        },
        ProgramSpec {
            program: SYSCALL_EXIT_PROGRAM,
            hook: Hook::BtfTracepointOnDemand("sys_exit"),
            done_by: None,
        },
    ],
};

const CPU_PROGRAM: &str = "cpu_sample";
const OFFCPU_PROGRAM: &str = "offcpu_switch";
const SYSCALL_ENTER_PROGRAM: &str = "syscall_enter_stack";
const SYSCALL_EXIT_PROGRAM: &str = "syscall_exit_stack";

const SPAN_PROGRAM: &str = "span_sample";
const SPAN_OFFCPU_PROGRAM: &str = "span_offcpu";

/// The continuous sampler behind span flamegraphs: its samples and their stacks.
pub struct SpanSampler {
    pub ring: aya::maps::RingBuf<MapData>,
    /// On-CPU samples of span senders with their user stacks to unwind (`unwind.rs`). Mapped
    /// (`map_ring`) once `senders_marked`: a node where no process sends spans never pays its
    /// RSS.
    pub copies: MapData,
    pub senders_marked: Arc<std::sync::atomic::AtomicBool>,
    /// `span_offcpu`, loaded, attached when `senders_marked` (None: it did not load).
    pub offcpu: Option<crate::ebpf::DeferredTracepoint>,
    pub stacks: StackTraceMap<MapData>,
    /// Python processes whose frames the sampler walks, and the walked stacks.
    pub py_procs: aya::maps::HashMap<MapData, u32, PyProc>,
    pub py_stacks: aya::maps::HashMap<MapData, u64, PyStack>,
    /// How many of `py_stacks` have lines: zeroed with it.
    pub py_line_stacks: Array<MapData, u64>,
    /// Kernel stacks of off-CPU episodes (`SpanSample::kernel_frames`).
    pub kstacks: aya::maps::HashMap<MapData, u64, KernelStack>,
    /// The processes whose off-CPU stacks are taken (`spans::flamegraphs::Senders`).
    pub senders: Option<crate::spans::flamegraphs::Senders>,
}

/// Loads `span_sample` and attaches it to every CPU's cpu-clock at `hz` for the agent's
/// lifetime (the links live with the program, inside `kernel`).
pub fn start_span_sampler(
    kernel: &mut Kernel,
    btf: &aya::Btf,
    hz: u64,
) -> Result<SpanSampler, String> {
    let prog: &mut PerfEvent = kernel
        .bpf
        .program_mut(SPAN_PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or("span_sample is missing from the eBPF object")?;
    prog.load()
        .map_err(|e| format!("cannot load span_sample: {e}"))?;
    let cpus = aya::util::online_cpus().map_err(|(_, e)| format!("cannot list CPUs: {e}"))?;
    for cpu in cpus {
        prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Frequency(hz),
            false,
        )
        .map_err(|e| format!("cannot attach span_sample to CPU {cpu}: {e}"))?;
    }
    // Off-CPU time of span flamegraphs; without it they show on-CPU samples only. Attached only
    // once a process sends a span (`collect`): it runs at every context switch of the node.
    let offcpu = kernel
        .bpf
        .program_mut(SPAN_OFFCPU_PROGRAM)
        .and_then(|p| <&mut BtfTracePoint>::try_from(p).ok())
        .ok_or_else(|| "span_offcpu is missing from the eBPF object".to_owned())
        .and_then(|p| {
            p.load("sched_switch", btf)
                .map_err(|e| format!("cannot load span_offcpu: {e}"))?;
            crate::ebpf::DeferredTracepoint::new(SPAN_OFFCPU_PROGRAM, p).map_err(|e| e.to_string())
        });
    let offcpu = offcpu
        .inspect_err(|e| tracing::warn!("{e}; span flamegraphs show on-CPU samples only"))
        .ok();
    let senders_marked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    Ok(SpanSampler {
        ring: kernel.take_map("SPAN_SAMPLES").map_err(|e| e.to_string())?,
        copies: kernel
            .take_ring("SPAN_STACK_COPIES")
            .map_err(|e| e.to_string())?,
        senders_marked: senders_marked.clone(),
        offcpu,
        stacks: kernel.take_map("SPAN_STACKS").map_err(|e| e.to_string())?,
        py_procs: kernel
            .take_map("SPAN_PY_PROCS")
            .map_err(|e| e.to_string())?,
        py_stacks: kernel
            .take_map("SPAN_PY_STACKS")
            .map_err(|e| e.to_string())?,
        py_line_stacks: kernel
            .take_map("SPAN_PY_LINE_STACKS")
            .map_err(|e| e.to_string())?,
        kstacks: kernel.take_map("SPAN_KSTACKS").map_err(|e| e.to_string())?,
        senders: Some(crate::spans::flamegraphs::Senders::new(
            kernel.take_map("SPAN_SENDERS").map_err(|e| e.to_string())?,
            senders_marked,
        )),
    })
}

/// What attaches a running capture, to detach it at the end.
pub enum Links {
    Cpu(Vec<PerfEventLinkId>),
    Offcpu(BtfTracePointLinkId),
    Syscall(BtfTracePointLinkId, BtfTracePointLinkId),
}

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("profiling is unavailable: {0}")]
    Unavailable(String),
    #[error("unknown target `{name}`; configured targets: {known}")]
    UnknownTarget { name: String, known: String },
    #[error("no process {pid} on this node")]
    NoProcess { pid: u32 },
    #[error("cannot attach the sampler to CPU {cpu}: {source}")]
    Attach {
        cpu: u32,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot attach the capture's tp_btf programs: {0}")]
    AttachSwitch(#[source] Box<aya::programs::ProgramError>),
    #[error("cannot read or reset the capture maps: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// What a capture samples.
#[derive(Debug, Clone)]
pub enum Subject {
    Target(String),
    Pid(u32),
}

/// A finished capture: folded stacks (root frame first) with their sample counts.
#[derive(Debug, Default)]
pub struct Capture {
    pub stacks: Vec<(String, u64)>,
    pub samples: u64,
    pub notes: Vec<String>,
}

impl Capture {
    /// Brendan Gregg's folded format, one `frame;frame;... count` line per stack.
    pub fn folded(&self) -> String {
        let mut out = String::new();
        for (stack, count) in &self.stacks {
            out.push_str(stack);
            out.push(' ');
            out.push_str(&count.to_string());
            out.push('\n');
        }
        out
    }
}

/// The maps a capture drives.
pub struct CaptureMaps {
    config: Array<MapData, CaptureConfig>,
    samples: BpfHashMap<MapData, StackKey, u64>,
    stacks: StackTraceMap<MapData>,
    blocked: BpfHashMap<MapData, u32, Blocked>,
    /// Kernel stacks of off-CPU episodes (`StackKey::kernel_frames`).
    kstacks: BpfHashMap<MapData, u64, KernelStack>,
    py_procs: BpfHashMap<MapData, u32, PyProc>,
    py_stacks: BpfHashMap<MapData, u64, PyStack>,
    py_line_stacks: Array<MapData, u64>,
    /// CPU samples' user registers and stack copies, unwound here (`unwind.rs`). Mapped into
    /// the agent only while a capture runs (`Profiler::copies`): its 4 MiB are mapped twice,
    /// and all of it counts in the agent's RSS from the moment it is mapped.
    copies: MapData,
}

impl CaptureMaps {
    pub fn take(kernel: &mut Kernel) -> Result<Self, crate::ebpf::LoadError> {
        Ok(Self {
            config: kernel.take_map("CAPTURE")?,
            samples: kernel.take_map("STACK_WEIGHTS")?,
            stacks: kernel.take_map("STACKS")?,
            blocked: kernel.take_map("BLOCKED")?,
            kstacks: kernel.take_map("KSTACKS")?,
            py_procs: kernel.take_map("PY_PROCS")?,
            py_stacks: kernel.take_map("PY_STACKS")?,
            py_line_stacks: kernel.take_map("PY_LINE_STACKS")?,
            copies: kernel.take_ring("STACK_COPIES")?,
        })
    }
}

pub struct Profiler {
    kernel: Kernel,
    targets: Arc<TargetSet>,
    tracked: SharedTracked,
    maps: CaptureMaps,
    /// Mappings of the profiled process, taken at start, for when it exits mid-capture.
    snapshots: HashMap<u32, Mappings>,
    finder: Finder,
    /// Python processes of the running capture.
    pythons: HashMap<u32, Interpreter>,
    /// Said about the running capture before it ends (Python processes it cannot unwind).
    notes: Vec<String>,
    python_unsupported: prometheus_client::metrics::counter::Counter,
    /// `CaptureConfig::generation` of the latest capture.
    generation: u32,
    /// The running capture's unwinders, and the weights of the stacks they unwound (the
    /// kernel cannot aggregate what only user space unwinds).
    unwinders: Unwinders,
    unwound: HashMap<Unwound, u64>,
    /// The stack copies' ring, mapped while a capture that copies stacks runs.
    copies: Option<aya::maps::RingBuf<MapData>>,
    /// Of the running capture: samples unwound here, their frames, the time it took.
    unwind_stats: (u64, u64, Duration),
}

/// A CPU sample whose user stack was unwound here: what `StackKey` holds with the user
/// stack's frames (outermost first, as folding takes them) in place of its id.
#[derive(PartialEq, Eq, Hash)]
struct Unwound {
    tgid: u32,
    user: Vec<u64>,
    kernel_stack: i32,
    python_stack: u64,
}

impl Profiler {
    /// The kernel object moves in because the program is attached per capture.
    pub fn new(
        kernel: Kernel,
        maps: CaptureMaps,
        targets: Arc<TargetSet>,
        tracked: SharedTracked,
        python_unsupported: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            kernel,
            targets,
            tracked,
            maps,
            snapshots: HashMap::new(),
            finder: Finder::default(),
            pythons: HashMap::new(),
            notes: Vec::new(),
            python_unsupported,
            generation: 0,
            unwinders: Unwinders::default(),
            unwound: HashMap::new(),
            unwind_stats: Default::default(),
            copies: None,
        }
    }

    /// The processes `cfg` selects now.
    fn subject_pids(&self, cfg: &CaptureConfig) -> Vec<u32> {
        if cfg.pid != 0 {
            return vec![cfg.pid];
        }
        let tracked = self.tracked.read().unwrap_or_else(|e| e.into_inner());
        tracked
            .iter()
            .filter(|(_, id)| **id < 64 && cfg.targets & (1u64 << **id) != 0)
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// Finds the Python interpreters of the subject and hands them to the kernel side.
    fn find_pythons(&mut self, cfg: &CaptureConfig) {
        for pid in self.subject_pids(cfg) {
            match self.finder.inspect(pid) {
                Ok(Some(interp)) => {
                    if let Err(e) = self.maps.py_procs.insert(pid, interp.proc, 0) {
                        self.notes.push(format!(
                            "Python frames of process {pid} are not walked: {e}"
                        ));
                        continue;
                    }
                    self.pythons.insert(pid, interp);
                }
                Ok(None) => {}
                Err(e) => {
                    self.python_unsupported.inc();
                    self.notes.push(e.to_string());
                }
            }
        }
    }

    /// Checks what a capture selects, before it starts.
    pub fn resolve(&self, subject: &Subject) -> Result<CaptureConfig, CaptureError> {
        match subject {
            Subject::Target(name) => {
                let configured = self.targets.list();
                let id = configured
                    .iter()
                    .find(|(_, t)| &t.name == name)
                    .map(|(id, _)| *id)
                    .ok_or_else(|| CaptureError::UnknownTarget {
                        name: name.clone(),
                        known: configured
                            .iter()
                            .map(|(_, t)| t.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                // The target's own id and those of its pods now (pods that start during the
                // capture are not in it).
                let targets = self
                    .targets
                    .ids()
                    .iter()
                    .filter(|(k, _)| self.targets.target_of_id(*k) == Some(id))
                    .fold(0u64, |m, (k, _)| m | (1u64 << k));
                Ok(CaptureConfig {
                    active: 1,
                    pid: 0,
                    mode: MODE_CPU,
                    generation: 0,
                    min_ns: 0,
                    targets,
                    ..CaptureConfig::default()
                })
            }
            Subject::Pid(pid) => {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    return Err(CaptureError::NoProcess { pid: *pid });
                }
                Ok(CaptureConfig {
                    active: 1,
                    pid: *pid,
                    mode: MODE_CPU,
                    generation: 0,
                    min_ns: 0,
                    targets: 0,
                    ..CaptureConfig::default()
                })
            }
        }
    }

    fn cpu_program(&mut self) -> &mut PerfEvent {
        self.kernel
            .bpf
            .program_mut(CPU_PROGRAM)
            .and_then(|p| <&mut PerfEvent>::try_from(p).ok())
            .expect("cpu_sample is a perf_event program of the object")
    }

    fn tp_btf(&mut self, name: &str) -> &mut BtfTracePoint {
        self.kernel
            .bpf
            .program_mut(name)
            .and_then(|p| <&mut BtfTracePoint>::try_from(p).ok())
            .expect("the capture programs are tp_btf programs of the object")
    }

    /// Attaches what `cfg.mode` needs (cpu: the sampler on every online CPU at `hz`) and
    /// starts selecting `cfg`.
    pub fn start(&mut self, mut cfg: CaptureConfig, hz: u64) -> Result<Links, CaptureError> {
        self.notes.clear();
        // User space unwinds CPU samples' user stacks from copies (on x86_64, where the kernel
        // side makes them): through code without frame pointers too.
        self.copies = None;
        if cfg.mode == MODE_CPU && cfg!(target_arch = "x86_64") {
            match crate::ebpf::map_ring(&self.maps.copies) {
                Ok(ring) => self.copies = Some(ring),
                Err(e) => self.notes.push(format!(
                    "native frames are walked by frame pointers: cannot map the stack copies' \
                     ring buffer ({e})"
                )),
            }
        }
        // Mapped first, so that this also drains what a capture never collected left there.
        self.reset()?;
        self.generation = self.generation.wrapping_add(1).max(1);
        cfg.generation = self.generation;
        self.snapshots.clear();
        self.pythons.clear();
        if cfg.pid != 0 {
            self.snapshots
                .insert(cfg.pid, Mappings::read(cfg.pid, true));
        }
        self.find_pythons(&cfg);
        cfg.copy_stacks = u32::from(self.copies.is_some());
        cfg.python = u32::from(!self.pythons.is_empty());
        self.maps.config.set(0, cfg, 0)?;
        if cfg.mode != MODE_CPU {
            let attached = if cfg.mode == MODE_OFFCPU {
                self.tp_btf(OFFCPU_PROGRAM).attach().map(Links::Offcpu)
            } else {
                self.tp_btf(SYSCALL_ENTER_PROGRAM)
                    .attach()
                    .and_then(|enter| match self.tp_btf(SYSCALL_EXIT_PROGRAM).attach() {
                        Ok(exit) => Ok(Links::Syscall(enter, exit)),
                        Err(e) => {
                            let _ = self.tp_btf(SYSCALL_ENTER_PROGRAM).detach(enter);
                            Err(e)
                        }
                    })
            };
            return attached.map_err(|source| {
                let _ = self.maps.config.set(0, CaptureConfig::default(), 0);
                CaptureError::AttachSwitch(Box::new(source))
            });
        }
        let cpus = aya::util::online_cpus()
            .map_err(|(_, e)| CaptureError::Unavailable(format!("cannot list CPUs: {e}")))?;
        let mut links = Vec::new();
        for cpu in cpus {
            let link = self.cpu_program().attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(hz),
                false,
            );
            match link {
                Ok(l) => links.push(l),
                Err(source) => {
                    self.stop(Links::Cpu(links));
                    self.copies = None;
                    return Err(CaptureError::Attach {
                        cpu,
                        source: Box::new(source),
                    });
                }
            }
        }
        Ok(Links::Cpu(links))
    }

    /// Detaches the capture's programs and stops selecting.
    pub fn stop(&mut self, links: Links) {
        match links {
            Links::Cpu(links) => {
                for l in links {
                    let _ = self.cpu_program().detach(l);
                }
            }
            Links::Offcpu(link) => {
                let _ = self.tp_btf(OFFCPU_PROGRAM).detach(link);
            }
            Links::Syscall(enter, exit) => {
                let _ = self.tp_btf(SYSCALL_ENTER_PROGRAM).detach(enter);
                let _ = self.tp_btf(SYSCALL_EXIT_PROGRAM).detach(exit);
            }
        }
        let _ = self.maps.config.set(0, CaptureConfig::default(), 0);
    }

    /// Unwinds the stack copies the kernel sent so far. Called every `STACK_COPY_DRAIN_MS`
    /// while a capture runs, so the ring buffer does not fill.
    pub fn drain(&mut self) {
        let Some(copies) = self.copies.as_mut() else {
            return;
        };
        let started = std::time::Instant::now();
        while let Some(item) = copies.next() {
            let Some(copy) = ring_record::<StackCopy>(&item) else {
                continue;
            };
            let mut user = self.unwinders.unwind(&copy);
            self.unwind_stats.0 += 1;
            self.unwind_stats.1 += user.len() as u64;
            user.reverse();
            *self
                .unwound
                .entry(Unwound {
                    tgid: copy.tgid,
                    user,
                    kernel_stack: copy.kernel_stack,
                    python_stack: copy.python_stack,
                })
                .or_default() += 1;
        }
        self.unwind_stats.2 += started.elapsed();
    }

    fn reset(&mut self) -> Result<(), CaptureError> {
        // Copies a capture left behind (its samples are not this capture's).
        self.drain();
        self.unwound.clear();
        self.unwinders = Unwinders::default();
        self.unwind_stats = Default::default();
        let m = &mut self.maps;
        let keys: Vec<StackKey> = m.samples.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = m.samples.remove(&k);
        }
        let ids: Vec<u32> = m.stacks.stack_ids().filter_map(Result::ok).collect();
        for id in ids {
            let _ = m.stacks.remove(&id);
        }
        // Threads still blocked when the last capture ended would otherwise be weighted from
        // their old timestamp.
        let tids: Vec<u32> = m.blocked.keys().filter_map(Result::ok).collect();
        for tid in tids {
            let _ = m.blocked.remove(&tid);
        }
        let keys: Vec<u64> = m.kstacks.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = m.kstacks.remove(&k);
        }
        let pids: Vec<u32> = m.py_procs.keys().filter_map(Result::ok).collect();
        for pid in pids {
            let _ = m.py_procs.remove(&pid);
        }
        let keys: Vec<u64> = m.py_stacks.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = m.py_stacks.remove(&k);
        }
        m.py_line_stacks.set(0, 0, 0)?;
        Ok(())
    }

    /// Reads, symbolizes and folds what the capture counted, then clears the maps.
    pub fn collect(&mut self) -> Result<Capture, CaptureError> {
        self.drain();
        // Unmapped until the next capture: between captures it would only weigh on the RSS.
        self.copies = None;
        let unwound = std::mem::take(&mut self.unwound);
        let (n, frames, took) = self.unwind_stats;
        if n > 0 {
            tracing::info!(
                samples = n,
                frames_per_sample = frames as f64 / n as f64,
                us_per_sample = took.as_secs_f64() * 1e6 / n as f64,
                "user stacks unwound from the kernel's copies"
            );
        }
        let unwind_notes = std::mem::take(&mut self.unwinders.notes);
        let m = &self.maps;
        let counts: Vec<(StackKey, u64)> = m.samples.iter().filter_map(Result::ok).collect();
        let stack = |id: i32| -> Vec<u64> {
            if id < 0 {
                return Vec::new();
            }
            m.stacks
                .get(&(id as u32), 0)
                .map(|t| t.frames().iter().map(|f| f.ip).rev().collect())
                .unwrap_or_default()
        };
        let kernel = |k: &StackKey| -> Vec<u64> {
            if k.kernel_frames == 0 {
                return stack(k.kernel_stack);
            }
            m.kstacks
                .get(&k.kernel_frames, 0)
                .map(|s| kernel_frames(&s))
                .unwrap_or_default()
        };
        // Samples whose Python stack was stored by its functions alone (PY_STACKS was full).
        let without_lines = std::cell::Cell::new(0u64);
        let python = |key: u64, tgid: u32, weight: u64| -> Vec<(u64, Option<u32>)> {
            let Some(interp) = self.pythons.get(&tgid).filter(|_| key != 0) else {
                return Vec::new();
            };
            m.py_stacks
                .get(&key, 0)
                .map(|s| {
                    if s.flags & agent_common::python::PY_STACK_LINES == 0 {
                        without_lines.set(without_lines.get() + weight);
                    }
                    interp.code_frames(&crate::python::frames_of(&s))
                })
                .unwrap_or_default()
        };
        let mut raw: Vec<Raw> = counts
            .iter()
            .map(|(k, c)| Raw {
                tgid: k.tgid,
                user: stack(k.user_stack),
                kernel: kernel(k),
                python: python(k.python_stack, k.tgid, *c),
                syscall: k.syscall,
                off_cpu: false,
                weight: *c,
            })
            .collect();
        raw.extend(unwound.into_iter().map(|(u, c)| Raw {
            kernel: stack(u.kernel_stack),
            python: python(u.python_stack, u.tgid, c),
            tgid: u.tgid,
            user: u.user,
            syscall: 0,
            off_cpu: false,
            weight: c,
        }));
        self.reset()?;
        let snapshots = std::mem::take(&mut self.snapshots);
        let pythons = std::mem::take(&mut self.pythons);
        let mut capture = fold(raw, &snapshots, &pythons);
        capture.notes.splice(0..0, self.notes.drain(..));
        capture.notes.extend(unwind_notes);
        if without_lines.get() > 0 {
            capture.notes.push(format!(
                "{} of {} weight in Python stacks without line numbers: the capture met more \
                 distinct Python stacks with lines than the kernel keeps ({}), so later ones were \
                 kept by function (at the function's first line); a shorter capture keeps them",
                without_lines.get(),
                capture.samples,
                agent_common::python::PY_LINE_STACKS_MAX
            ));
        }
        Ok(capture)
    }
}

/// A kernel stack taken at the end of an off-CPU episode, root first.
pub fn kernel_frames(s: &KernelStack) -> Vec<u64> {
    let n = (s.len as usize).min(s.ips.len());
    s.ips[..n].iter().rev().copied().collect()
}

/// One counted stack as the kernel gave it; frames root first.
struct Raw {
    tgid: u32,
    user: Vec<u64>,
    kernel: Vec<u64>,
    /// Code-object addresses of the Python frames, with their bytecode positions.
    python: Vec<(u64, Option<u32>)>,
    /// Syscall number + 1 in syscall mode, else 0.
    syscall: u32,
    /// Time blocked (span flamegraphs): an `[off-CPU]` frame between user and kernel frames.
    off_cpu: bool,
    weight: u64,
}

/// A weighted stack of a span flamegraph, root first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanStack {
    pub tgid: u32,
    pub user: Vec<u64>,
    pub kernel: Vec<u64>,
    /// Walked Python frames, root first.
    pub python: Vec<crate::python::PyFrame>,
    /// Blocked there, rather than running.
    pub off_cpu: bool,
    /// Microseconds.
    pub weight: u64,
}

thread_local! {
    /// The span flamegraphs' symbolizer, kept between flamegraphs on the one thread that draws
    /// them (it is not Send): a fresh one re-reads /proc/kallsyms and re-inflates the same
    /// binaries' debug info every time, most of the agent's CPU with a few slow spans a second.
    /// Renewed every 10 minutes, as it caches per process path and processes come and go.
    static SPAN_SYMBOLIZER: std::cell::RefCell<(Symbolizer, std::time::Instant)> =
        std::cell::RefCell::new((Symbolizer::new(), std::time::Instant::now()));
}

/// Symbolizes and folds weighted stacks, with the Python frames of `pythons`' processes. The
/// span flamegraphs' entry point.
pub fn fold_samples(samples: Vec<SpanStack>, pythons: &HashMap<u32, Interpreter>) -> Capture {
    let raw = samples
        .into_iter()
        .map(|s| Raw {
            python: pythons
                .get(&s.tgid)
                .map(|i| i.code_frames(&s.python))
                .unwrap_or_default(),
            tgid: s.tgid,
            user: s.user,
            kernel: s.kernel,
            syscall: 0,
            off_cpu: s.off_cpu,
            weight: s.weight,
        })
        .collect();
    SPAN_SYMBOLIZER.with_borrow_mut(|cached| {
        if cached.1.elapsed() > Duration::from_secs(600) {
            *cached = (Symbolizer::new(), std::time::Instant::now());
        }
        fold_with(&cached.0, raw, &HashMap::new(), pythons)
    })
}

/// Where the native frames worth keeping start when Python frames stand for the interpreter:
/// at the innermost interpreter frame (the C function running the innermost Python code),
/// or at the root when the walk never reached the interpreter.
fn native_start(user: &[u64], interp: &Interpreter) -> usize {
    user.iter()
        .rposition(|ip| interp.contains(*ip))
        .unwrap_or(0)
}

/// Symbolizes and folds raw stacks; `snapshots` hold the mappings of processes taken at
/// capture start, `pythons` the Python processes whose Python frames were walked.
fn fold(
    raw: Vec<Raw>,
    snapshots: &HashMap<u32, Mappings>,
    pythons: &HashMap<u32, Interpreter>,
) -> Capture {
    fold_with(&Symbolizer::new(), raw, snapshots, pythons)
}

fn fold_with(
    symbolizer: &Symbolizer,
    raw: Vec<Raw>,
    snapshots: &HashMap<u32, Mappings>,
    pythons: &HashMap<u32, Interpreter>,
) -> Capture {
    let mut names: HashMap<(u32, u64), String> = HashMap::new();
    let mut by_pid: HashMap<u32, Vec<u64>> = HashMap::new();
    let mut kernel_ips: Vec<u64> = Vec::new();
    for r in &raw {
        by_pid.entry(r.tgid).or_default().extend(&r.user);
        kernel_ips.extend(&r.kernel);
    }
    let mut notes = Vec::new();
    for (pid, mut ips) in by_pid {
        ips.sort_unstable();
        ips.dedup();
        if !alive(pid) {
            notes.push(format!(
                "process {pid} exited during the capture: this is what was sampled before"
            ));
            let empty = Mappings::default();
            let snap = snapshots.get(&pid).unwrap_or(&empty);
            let found = snap.symbolize(symbolizer, &ips);
            for ip in &ips {
                names.insert(
                    (pid, *ip),
                    found.get(ip).cloned().unwrap_or_else(|| snap.unknown(*ip)),
                );
            }
            continue;
        }
        let maps = Mappings::read(pid, false);
        let src = Source::Process(Process::new(Pid::from(pid)));
        let syms = match symbolizer.symbolize(&src, Input::AbsAddr(&ips)) {
            Ok(s) => s,
            Err(e) => {
                notes.push(format!(
                    "frames of process {pid} could not be symbolized: {e}"
                ));
                Vec::new()
            }
        };
        for (i, ip) in ips.iter().enumerate() {
            let name = match syms.get(i) {
                Some(Symbolized::Sym(s)) => s.name.to_string(),
                _ => maps.unknown(*ip),
            };
            names.insert((pid, *ip), name);
        }
    }
    kernel_ips.sort_unstable();
    kernel_ips.dedup();
    let ksyms = symbolizer
        .symbolize(
            &Source::Kernel(KernelSource::default()),
            Input::AbsAddr(&kernel_ips),
        )
        .unwrap_or_default();
    for (i, ip) in kernel_ips.iter().enumerate() {
        let name = match ksyms.get(i) {
            Some(Symbolized::Sym(s)) => s.name.to_string(),
            _ => format!("[unknown] [kernel]+{ip:#x}"),
        };
        names.insert((0, *ip), format!("{name}_[k]"));
    }

    let mut code_readers: HashMap<u32, CodeReader> = HashMap::new();
    let mut folded: HashMap<String, u64> = HashMap::new();
    let mut samples = 0;
    for r in raw {
        let tgid = r.tgid;
        let comm = std::fs::read_to_string(format!("/proc/{tgid}/comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_else(|_| "[exited]".into());
        let mut frames = vec![sanitize(&comm), tgid.to_string()];
        let mut native = &r.user[..];
        if let (false, Some(interp)) = (r.python.is_empty(), pythons.get(&tgid)) {
            let reader = code_readers
                .entry(tgid)
                .or_insert_with(|| CodeReader::new(tgid, interp.minor));
            frames.extend(
                r.python
                    .iter()
                    .map(|(code, instr)| sanitize(&reader.name(*code, *instr))),
            );
            native = &native[native_start(native, interp)..];
        }
        frames.extend(native.iter().map(|ip| sanitize(&names[&(tgid, *ip)])));
        if r.syscall != 0 {
            frames.push(format!("syscall:{}", crate::syscalls::name(r.syscall - 1)));
        }
        if r.off_cpu {
            frames.push("[off-CPU]".to_owned());
        }
        frames.extend(r.kernel.iter().map(|ip| sanitize(&names[&(0, *ip)])));
        // Neither stack could be read (counted in events_lost{stack_missing}) or its id was
        // evicted: the time stays in the graph, named, not as the pid's own time.
        if frames.len() == 2 {
            frames.push(NO_STACK.to_owned());
        }
        *folded.entry(frames.join(";")).or_default() += r.weight;
        samples += r.weight;
    }
    let mut stacks: Vec<(String, u64)> = folded.into_iter().collect();
    stacks.sort();
    Capture {
        stacks,
        samples,
        notes,
    }
}

/// The frame of a sample whose stacks are all missing.
pub const NO_STACK: &str = "[no stack]";

/// Folded format separators cannot appear inside a frame.
fn sanitize(frame: &str) -> String {
    frame.replace([';', '\n'], "_")
}

/// One executable mapping of a process.
struct Mapping {
    lo: u64,
    hi: u64,
    offset: u64,
    module: String,
    /// The mapped file, held open (through /proc/PID/map_files) so that it can still be read
    /// after the process exits or the file is deleted.
    file: Option<std::fs::File>,
}

/// A process's executable mappings: to name frames no symbol covers, and to symbolize the
/// frames of a process that exited before the capture ended.
#[derive(Default)]
struct Mappings(Vec<Mapping>);

impl Mappings {
    /// `open`: also hold the mapped files open (a snapshot taken at capture start).
    fn read(pid: u32, open: bool) -> Self {
        Self(
            crate::procmaps::read(pid)
                .into_iter()
                .filter(|m| m.perms.contains('x'))
                .map(|m| {
                    // A deleted file's path ends in " (deleted)": the module is the file name.
                    let path = m.path.split_whitespace().next().unwrap_or("[anon]");
                    let file = (open && path.starts_with('/'))
                        .then(|| {
                            let range = format!("{:x}-{:x}", m.lo, m.hi);
                            std::fs::File::open(format!("/proc/{pid}/map_files/{range}")).ok()
                        })
                        .flatten();
                    Mapping {
                        lo: m.lo,
                        hi: m.hi,
                        offset: m.offset,
                        module: path.rsplit('/').next().unwrap_or(path).to_owned(),
                        file,
                    }
                })
                .collect(),
        )
    }

    fn find(&self, ip: u64) -> Option<(usize, &Mapping)> {
        self.0
            .iter()
            .enumerate()
            .find(|(_, m)| (m.lo..m.hi).contains(&ip))
    }

    /// `[unknown] module+0xOFFSET` (file offset), or the raw address outside any mapping.
    fn unknown(&self, ip: u64) -> String {
        match self.find(ip) {
            Some((_, m)) => format!("[unknown] {}+{:#x}", m.module, ip - m.lo + m.offset),
            None => format!("[unknown] {ip:#x}"),
        }
    }

    /// Symbolizes `ips` from the held files, by file offset, for a process that is gone.
    fn symbolize(&self, symbolizer: &Symbolizer, ips: &[u64]) -> HashMap<u64, String> {
        let mut by_mapping: HashMap<usize, Vec<u64>> = HashMap::new();
        for ip in ips {
            if let Some((i, _)) = self.find(*ip) {
                by_mapping.entry(i).or_default().push(*ip);
            }
        }
        let mut out = HashMap::new();
        for (i, ips) in by_mapping {
            let m = &self.0[i];
            let Some(file) = &m.file else { continue };
            let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
            let offsets: Vec<u64> = ips.iter().map(|ip| ip - m.lo + m.offset).collect();
            let src = Source::Elf(blazesym::symbolize::source::Elf::new(path));
            if let Ok(syms) = symbolizer.symbolize(&src, Input::FileOffset(&offsets)) {
                for (ip, sym) in ips.iter().zip(syms) {
                    if let Symbolized::Sym(s) = sym {
                        out.insert(*ip, s.name.to_string());
                    }
                }
            }
        }
        out
    }
}

/// Whether `pid` still runs (a zombie has no address space left to symbolize).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        })
        .is_some_and(|state| !matches!(state, 'Z' | 'X'))
}

/// Runs a whole capture: start, wait, collect. `profiler` is only locked while touching maps.
pub async fn run(
    profiler: &tokio::sync::Mutex<Profiler>,
    cfg: CaptureConfig,
    hz: u64,
    duration: Duration,
) -> Result<Capture, CaptureError> {
    let links = profiler.lock().await.start(cfg, hz)?;
    let end = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < end {
        let next = tokio::time::Instant::now() + Duration::from_millis(STACK_COPY_DRAIN_MS);
        tokio::time::sleep_until(next.min(end)).await;
        let mut p = profiler.lock().await;
        tokio::task::block_in_place(|| p.drain());
    }
    let mut p = profiler.lock().await;
    p.stop(links);
    let subject_alive =
        cfg.pid == 0 || std::path::Path::new(&format!("/proc/{}", cfg.pid)).exists();
    let mut capture = tokio::task::block_in_place(|| p.collect())?;
    if !subject_alive {
        capture.notes.push(format!(
            "process {} exited during the capture: this is what was sampled before",
            cfg.pid
        ));
    }
    Ok(capture)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_frames_name_module_and_offset() {
        let m = Mappings(vec![Mapping {
            lo: 0x1000,
            hi: 0x2000,
            offset: 0x400,
            module: "libfoo.so".into(),
            file: None,
        }]);
        assert_eq!(m.unknown(0x1010), "[unknown] libfoo.so+0x410");
        assert_eq!(m.unknown(0x9000), "[unknown] 0x9000");
    }

    #[test]
    fn folds_own_process_stacks() {
        // A stack made of this test's own code address symbolizes to a real name.
        let ip = folds_own_process_stacks as *const () as usize as u64;
        let me = std::process::id();
        let raw = |weight| Raw {
            tgid: me,
            user: vec![ip],
            kernel: vec![],
            python: vec![],
            syscall: 0,
            off_cpu: false,
            weight,
        };
        let c = fold(vec![raw(3), raw(2)], &HashMap::new(), &HashMap::new());
        assert_eq!(c.samples, 5);
        assert_eq!(c.stacks.len(), 1);
        let (stack, count) = &c.stacks[0];
        assert_eq!(*count, 5);
        assert!(
            stack.contains(&me.to_string()) && stack.contains("folds_own_process_stacks"),
            "{stack}"
        );
        assert!(c.folded().ends_with(" 5\n"));

        // A sample without any stack is named, not drawn as the pid's own time.
        let empty = Raw {
            user: vec![],
            ..raw(4)
        };
        let c = fold(vec![empty], &HashMap::new(), &HashMap::new());
        assert_eq!(
            c.stacks[0].0,
            format!(
                "{};{me};{NO_STACK}",
                c.stacks[0].0.split(';').next().unwrap()
            )
        );
    }

    #[test]
    fn a_gone_process_is_symbolized_from_its_snapshot() {
        // Our own mappings, held open, resolve our own code by file offset.
        let me = std::process::id();
        let snap = Mappings::read(me, true);
        let ip = a_gone_process_is_symbolized_from_its_snapshot as *const () as usize as u64;
        let names = snap.symbolize(&Symbolizer::new(), &[ip]);
        assert!(
            names
                .get(&ip)
                .is_some_and(|n| n.contains("a_gone_process_is_symbolized_from_its_snapshot")),
            "{names:?}"
        );
        assert!(alive(me));
        assert!(!alive(u32::MAX));
    }
}
