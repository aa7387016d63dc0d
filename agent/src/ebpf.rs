//! Loading the embedded eBPF object for the running kernel.
use agent_common::task;
use aya::{Btf, Ebpf, EbpfLoader, maps::Map};
use thiserror::Error;

use crate::btf::{BtfError, KernelBtf, TaskOffsets, VMLINUX};

/// The programs of `agent-ebpf`, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pipeprobe-ebpf"));

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

/// The loaded object, before any program is attached.
pub struct Kernel {
    pub bpf: Ebpf,
    pub btf: Btf,
    pub offsets: TaskOffsets,
}

/// Sizes of maps that the configuration chooses.
#[derive(Debug, Clone, Copy)]
pub struct MapSizes {
    pub tracked_processes: u32,
}

pub fn load(sizes: MapSizes) -> Result<Kernel, LoadError> {
    let offsets = TaskOffsets::from_btf(&KernelBtf::load(VMLINUX)?)?;
    let btf = Btf::from_sys_fs()?;
    let bpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global(task::GLOBAL_PID_OFFSET, &offsets.pid, true)
        .override_global(task::GLOBAL_TGID_OFFSET, &offsets.tgid, true)
        .override_global(task::GLOBAL_STATE_OFFSET, &offsets.state, true)
        .map_max_entries("TRACKED", sizes.tracked_processes)
        .load(OBJECT)?;
    Ok(Kernel { bpf, btf, offsets })
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
