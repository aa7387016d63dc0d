//! Loading the embedded eBPF object for the running kernel.
use agent_common::task;
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Map, MapData},
};
use aya_obj::generated::{bpf_attr, bpf_cmd};
use thiserror::Error;

use crate::{
    btf::{BtfError, KernelBtf, TaskOffsets, VMLINUX},
    tcp,
};

/// The programs of `agent-ebpf`, built by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pipeprobe-ebpf"));

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("cannot parse kernel BTF for aya: {0}")]
    AyaBtf(#[from] aya::BtfError),
    #[error("cannot load the eBPF object (maps): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {name} is missing from the eBPF object (build mismatch)")]
    MissingMap { name: &'static str },
    #[error("map {name} has an unexpected type: {source}")]
    MapType {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

#[derive(Debug, Error)]
#[error("cannot attach {program} to its tracepoint: {source}")]
pub struct AttachError {
    program: &'static str,
    #[source]
    source: std::io::Error,
}

/// A tp_btf program loaded now and attached later, by a task other than the one holding the
/// `Ebpf` object (aya attaches only through the object's owner, here the control API): for
/// hooks on every context switch that only some nodes need, so that the others never run them.
pub struct DeferredTracepoint {
    program: &'static str,
    fd: aya::programs::ProgramFd,
}

impl DeferredTracepoint {
    /// `program` must already be loaded for its tracepoint (`BtfTracePoint::load`).
    pub fn new(
        program: &'static str,
        prog: &aya::programs::BtfTracePoint,
    ) -> Result<Self, AttachError> {
        let fd = prog
            .fd()
            .map_err(std::io::Error::other)
            .and_then(|fd| fd.try_clone())
            .map_err(|source| AttachError { program, source })?;
        Ok(Self { program, fd })
    }

    /// Attaches the program; it runs until the returned link is dropped.
    pub fn attach(&self) -> Result<std::os::fd::OwnedFd, AttachError> {
        use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _};
        // BPF_RAW_TRACEPOINT_OPEN without a name attaches a tracing program to the function
        // it was loaded for, as aya's `BtfTracePoint::attach` does.
        let mut attr = zeroed_attr();
        attr.raw_tracepoint.name = 0;
        attr.raw_tracepoint.prog_fd = self.fd.as_fd().as_raw_fd() as u32;
        // SAFETY: the attr holds no pointer.
        let fd = unsafe { bpf(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &mut attr) }.map_err(|source| {
            AttachError {
                program: self.program,
                source,
            }
        })?;
        // SAFETY: the kernel returned a new descriptor (the link) that nothing else owns.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as std::os::fd::RawFd) })
    }
}

/// An all-zero `bpf_attr`, valid for every command.
pub fn zeroed_attr() -> bpf_attr {
    // SAFETY: a plain C union of integers, for which all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// The bpf(2) calls aya has no API for: `cmd` with `attr`; its non-negative result (a
/// descriptor for some commands), or the error.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` reads or writes through it.
pub unsafe fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<i64> {
    // SAFETY: attr is a whole bpf_attr and outlives the call; the caller vouches for the
    // pointers inside it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The loaded object, before any program is attached.
pub struct Kernel {
    pub bpf: Ebpf,
    pub offsets: TaskOffsets,
    /// Families that cannot run on this kernel, with the reason (found while preparing globals).
    pub unavailable: Vec<(&'static str, String)>,
}

/// What the configuration decides at load time.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub tracked_processes: u32,
    /// Trace every syscall (else only those the agent marks in the filter array).
    pub all_syscalls: bool,
    /// TCP per-peer breakdown, and its series cap (the map's size).
    pub tcp_per_peer: bool,
    pub tcp_max_peers: u32,
    /// Sockets of tracked processes followed at once (the owner table's size).
    pub tcp_max_sockets: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            tracked_processes: agent_common::targets::TRACKED_MAX,
            all_syscalls: true,
            tcp_per_peer: false,
            tcp_max_peers: agent_common::tcp::PEERS_DEFAULT,
            tcp_max_sockets: agent_common::tcp::SOCKETS_DEFAULT,
        }
    }
}

/// Loads the object, and returns it with the kernel's BTF, which loading a tp_btf program
/// needs. Keep the BTF only until the last program is loaded: parsed, it takes about 13 MB of
/// the agent's memory (its RSS after start-up, with and without it).
pub fn load(opts: LoadOptions) -> Result<(Kernel, Btf), LoadError> {
    let kernel_btf = KernelBtf::load(VMLINUX)?;
    let offsets = TaskOffsets::from_btf(&kernel_btf)?;
    let btf = Btf::from_sys_fs()?;
    let mut unavailable = Vec::new();
    let mut tcp_globals = Vec::new();
    for (family, globals) in [
        (tcp::FAMILY.name, tcp::state_globals(&kernel_btf)),
        (tcp::RTT_FAMILY.name, tcp::probe_globals()),
    ] {
        match globals {
            Ok(g) => tcp_globals.extend(g),
            Err(e) => unavailable.push((family, e.to_string())),
        }
    }
    if let Some(why) = offsets.sched_probe_unavailable() {
        unavailable.push((crate::sched::FAMILY.name, why.to_string()));
    }
    let sched_info = offsets.sched_info.unwrap_or(crate::btf::SchedInfoOffsets {
        run_delay: 0,
        pcount: 0,
        last_arrival: 0,
        last_queued: 0,
    });
    let all_syscalls = u32::from(opts.all_syscalls);
    let per_peer = u32::from(opts.tcp_per_peer);
    let sockets = agent_common::tcp::SockTable::for_sockets(opts.tcp_max_sockets);
    let mut loader = EbpfLoader::new();
    loader
        .btf(Some(&btf))
        // Task storage (the sched and syscalls probes' per-thread state) has no aya wrapper;
        // user space never opens it, the kernel creates it all the same.
        .allow_unsupported_maps()
        .override_global(task::GLOBAL_PID_OFFSET, &offsets.pid, true)
        .override_global(task::GLOBAL_TGID_OFFSET, &offsets.tgid, true)
        .override_global(task::GLOBAL_STATE_OFFSET, &offsets.state, true)
        .override_global(task::GLOBAL_FSBASE_OFFSET, &offsets.fsbase, true)
        .override_global(task::GLOBAL_CFS_RQ_OFFSET, &offsets.cfs_rq, true)
        .override_global(task::GLOBAL_RQ_OFFSET, &offsets.rq, true)
        .override_global(task::GLOBAL_RQ_CLOCK_OFFSET, &offsets.rq_clock, true)
        .override_global(task::GLOBAL_RUN_DELAY_OFFSET, &sched_info.run_delay, true)
        .override_global(task::GLOBAL_PCOUNT_OFFSET, &sched_info.pcount, true)
        .override_global(
            task::GLOBAL_LAST_ARRIVAL_OFFSET,
            &sched_info.last_arrival,
            true,
        )
        .override_global(
            task::GLOBAL_LAST_QUEUED_OFFSET,
            &sched_info.last_queued,
            true,
        )
        .override_global(
            agent_common::syscalls::GLOBAL_TRACE_ALL,
            &all_syscalls,
            true,
        )
        .override_global(agent_common::tcp::globals::PER_PEER, &per_peer, true)
        .override_global(
            agent_common::tcp::globals::SOCK_BUCKET_BITS,
            &sockets.bucket_bits,
            true,
        )
        .map_max_entries("TRACKED", opts.tracked_processes)
        .map_max_entries(tcp::PEERS_MAP, opts.tcp_max_peers)
        .map_max_entries(tcp::OWNERS_MAP, sockets.buckets())
        .map_max_entries(tcp::SPILL_MAP, sockets.spill);
    for (name, value) in &tcp_globals {
        loader.override_global(name, value, true);
    }
    let bpf = loader.load(OBJECT)?;
    Ok((
        Kernel {
            bpf,
            offsets,
            unavailable,
        },
        btf,
    ))
}

impl Kernel {
    /// Takes map `name` out of the object as the typed map `T`.
    pub fn take_map<T>(&mut self, name: &'static str) -> Result<T, LoadError>
    where
        T: TryFrom<Map, Error = aya::maps::MapError>,
    {
        let map = self
            .bpf
            .take_map(name)
            .ok_or(LoadError::MissingMap { name })?;
        T::try_from(map).map_err(|source| LoadError::MapType { name, source })
    }

    /// Takes ring buffer `name` out of the object unmapped, for `map_ring` to map when needed.
    pub fn take_ring(&mut self, name: &'static str) -> Result<MapData, LoadError> {
        match self.bpf.take_map(name) {
            Some(Map::RingBuf(data)) => Ok(data),
            _ => Err(LoadError::MissingMap { name }),
        }
    }

    /// Forwards the programs' aya-log records to our log. The returned task owns the logger: it
    /// must live as long as the programs (dropping it closes the log map under them).
    pub fn spawn_logger(&mut self) {
        match aya_log::EbpfLogger::init(&mut self.bpf) {
            // SAFETY: the logger owns its fd and moves into the AsyncFd, which it outlives.
            Ok(logger) => match unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            } {
                Ok(mut fd) => {
                    tokio::spawn(async move {
                        loop {
                            let Ok(mut guard) = fd.readable_mut().await else {
                                break;
                            };
                            guard.get_inner_mut().flush();
                            guard.clear_ready();
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot poll eBPF log records"),
            },
            Err(e) => tracing::debug!(error = %e, "no eBPF log records"),
        }
    }
}

/// A mapping of its own of the ring buffer `data` (through a second descriptor, so that the
/// map stays its owner's): for rings mapped only while they are used, since a ring buffer is
/// mapped twice and all of it counts in the agent's RSS from the mmap on.
pub fn map_ring(data: &MapData) -> Result<aya::maps::RingBuf<MapData>, aya::maps::MapError> {
    use std::os::fd::AsFd as _;
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error,
        })
    })?;
    aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(MapData::from_fd(fd)?))
}

/// A ring buffer record as the plain-data type `T` the kernel wrote, None when it is shorter.
pub fn ring_record<T: aya::Pod>(item: &[u8]) -> Option<T> {
    // SAFETY: `item` holds at least a T's bytes, and a Pod type is valid for any bytes;
    // read_unaligned copies them out of the ring.
    (item.len() >= std::mem::size_of::<T>())
        .then(|| unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use agent_common::targets::ProcEvent;
    use std::collections::HashMap;

    use object::{
        Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex, SectionKind,
    };

    use super::{OBJECT, ring_record};

    /// In this object LLVM zeroes a struct stored whole, an array literal of zeros, or 16 zero
    /// bytes written side by side with a call of `memset`, and the call goes to
    /// compiler_builtins' loop of byte stores: a BPF-to-BPF call and a store and a branch per
    /// byte at every run (a 56-byte one was a third of `sched_switch` with every probe on).
    /// The object defines those functions whether or not anything calls them, so this looks
    /// for the calls.
    #[test]
    fn no_program_calls_a_byte_loop_builtin() {
        const BUILTINS: [&str; 5] = ["memset", "memcpy", "memmove", "memcmp", "bcmp"];
        let file = object::File::parse(OBJECT).expect("the embedded eBPF object is an ELF file");
        let builtins: HashMap<(Option<SectionIndex>, u64), &str> = file
            .symbols()
            .filter_map(|s| {
                let name = s.name().ok().filter(|n| BUILTINS.contains(n))?;
                Some(((s.section_index(), s.address()), name))
            })
            .collect();
        let mut calls = Vec::new();
        let mut checked = 0;
        for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
            let code = section.data().expect("a code section's bytes");
            let relocations: HashMap<u64, _> = section.relocations().collect();
            for (i, insn) in code.chunks_exact(8).enumerate() {
                // BPF_JMP | BPF_CALL with src_reg BPF_PSEUDO_CALL: a call of another function
                // of the object, imm + 1 instructions on from this one or from a symbol.
                if insn[0] != 0x85 || insn[1] >> 4 != 1 {
                    continue;
                }
                checked += 1;
                let offset = (i * 8) as u64;
                let on = (i64::from(i32::from_le_bytes(insn[4..8].try_into().unwrap())) + 1) * 8;
                let (target_section, base) = match relocations.get(&offset).map(|r| r.target()) {
                    Some(RelocationTarget::Symbol(sym)) => {
                        let sym = file.symbol_by_index(sym).expect("a relocation's symbol");
                        (sym.section_index(), sym.address())
                    }
                    _ => (Some(section.index()), offset),
                };
                if let Some(name) = builtins.get(&(target_section, base.wrapping_add_signed(on))) {
                    calls.push(format!(
                        "{} +{offset}: {name}",
                        section.name().unwrap_or("?")
                    ));
                }
            }
        }
        assert!(
            checked > 0,
            "found no BPF-to-BPF calls at all: the decoding is wrong"
        );
        assert!(
            calls.is_empty(),
            "programs call byte-loop builtins: {calls:?}. Write such values field by field \
             (`bpftool prog dump xlated` shows where the call comes from)"
        );
    }

    #[test]
    fn ring_records_shorter_than_their_type_are_refused() {
        let ev = ProcEvent {
            kind: 1,
            tgid: 42,
            parent_tgid: 7,
            target: 3,
        };
        // SAFETY: ProcEvent is plain data; its bytes, at an odd offset as a ring may give them.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const ev).cast::<u8>(),
                std::mem::size_of::<ProcEvent>(),
            )
        };
        let mut item = vec![0u8];
        item.extend_from_slice(bytes);
        let got = ring_record::<ProcEvent>(&item[1..]).expect("a whole record");
        assert_eq!(
            (got.kind, got.tgid, got.parent_tgid, got.target),
            (1, 42, 7, 3)
        );
        assert!(ring_record::<ProcEvent>(&item[1..item.len() - 1]).is_none());
    }
}
