//! The scheduler's clock as user space sees it. The sched programs time run-queue waits and
//! blocked episodes with the run queue's own clock (three loads, where `bpf_ktime_get_ns` is a
//! helper call that costs more than an empty program on retpoline CPUs), which is not
//! CLOCK_MONOTONIC: it is not slewed by NTP, so the two drift apart. User space, which must tell
//! how long a thread has been waiting so far, reads both clocks together in the kernel
//! (`clock_pair`, run with `BPF_PROG_TEST_RUN`) each time it needs the scheduler's "now".
use std::os::fd::{AsFd as _, AsRawFd as _};

use agent_common::sched::{CLOCK_PAIR_MAP, CLOCK_PAIR_PROGRAM, ClockPair};
use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{ProgramFd, RawTracePoint},
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClockError {
    #[error("the scheduler clock program {CLOCK_PAIR_PROGRAM}: {0}")]
    Program(String),
    #[error("the scheduler clock map {CLOCK_PAIR_MAP}: {0}")]
    Map(String),
    #[error("running {CLOCK_PAIR_PROGRAM} (BPF_PROG_TEST_RUN): {0}")]
    Run(std::io::Error),
    #[error("reading {CLOCK_PAIR_MAP}: {0}")]
    Read(aya::maps::MapError),
}

/// Loaded `clock_pair` and its map.
pub struct SchedClock {
    prog: ProgramFd,
    pair: Array<MapData, ClockPair>,
}

impl SchedClock {
    /// Loads the program (never attached) and takes its map out of `bpf`.
    pub fn load(bpf: &mut Ebpf) -> Result<Self, ClockError> {
        let prog: &mut RawTracePoint = bpf
            .program_mut(CLOCK_PAIR_PROGRAM)
            .ok_or_else(|| ClockError::Program("not in the eBPF object".into()))?
            .try_into()
            .map_err(|e| ClockError::Program(format!("{e}")))?;
        prog.load()
            .map_err(|e| ClockError::Program(format!("{e}")))?;
        let prog = prog
            .fd()
            .and_then(|fd| fd.try_clone().map_err(Into::into))
            .map_err(|e| ClockError::Program(format!("{e}")))?;
        let map = bpf
            .take_map(CLOCK_PAIR_MAP)
            .ok_or_else(|| ClockError::Map("not in the eBPF object".into()))?;
        let pair = Array::try_from(map).map_err(|e| ClockError::Map(e.to_string()))?;
        Ok(Self { prog, pair })
    }

    /// Both clocks, read together on this CPU.
    pub fn pair(&self) -> Result<ClockPair, ClockError> {
        // The `test` member of union bpf_attr for BPF_PROG_TEST_RUN.
        #[repr(C)]
        #[derive(Default)]
        struct TestRun {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        // A yield has the scheduler update this CPU's run queue clock, which may otherwise be
        // as old as the last tick when this thread has been running for a while.
        // SAFETY: no preconditions.
        unsafe { libc::sched_yield() };
        let attr = TestRun {
            prog_fd: self.prog.as_fd().as_raw_fd() as u32,
            ..TestRun::default()
        };
        // SAFETY: BPF_PROG_TEST_RUN of a raw tracepoint program with no context reads the attr
        // and writes its retval and duration fields only.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                10, // BPF_PROG_TEST_RUN
                &raw const attr,
                std::mem::size_of::<TestRun>(),
            )
        };
        if r < 0 {
            return Err(ClockError::Run(std::io::Error::last_os_error()));
        }
        self.pair.get(&0, 0).map_err(ClockError::Read)
    }

    /// How far the scheduler's clock is ahead of CLOCK_MONOTONIC now (wrapping): add it to a
    /// CLOCK_MONOTONIC time to have the scheduler's.
    pub fn ahead_ns(&self) -> Result<u64, ClockError> {
        let p = self.pair()?;
        Ok(p.sched_ns.wrapping_sub(p.monotonic_ns))
    }
}
