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
use aya_obj::generated::bpf_cmd;
use thiserror::Error;

/// What span breakdowns lose without this clock, for the messages that report it missing.
pub const WITHOUT_IT: &str =
    "span breakdowns count a run-queue wait or a blocked episode once it ends";

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
        // A yield has the scheduler update this CPU's run queue clock, which may otherwise be
        // as old as the last tick when this thread has been running for a while.
        // SAFETY: no preconditions.
        unsafe { libc::sched_yield() };
        let mut attr = crate::ebpf::zeroed_attr();
        attr.test.prog_fd = self.prog.as_fd().as_raw_fd() as u32;
        // SAFETY: no data or context buffers: a raw tracepoint program's test run writes only
        // the attr's retval and duration.
        unsafe { crate::ebpf::bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr) }
            .map_err(ClockError::Run)?;
        self.pair.get(&0, 0).map_err(ClockError::Read)
    }

    /// How far the scheduler's clock is ahead of CLOCK_MONOTONIC now (wrapping): add it to a
    /// CLOCK_MONOTONIC time to have the scheduler's.
    pub fn ahead_ns(&self) -> Result<u64, ClockError> {
        let p = self.pair()?;
        Ok(p.sched_ns.wrapping_sub(p.monotonic_ns))
    }
}
