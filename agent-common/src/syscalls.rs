//! Syscall latency probe types.

/// Syscall numbers at or above this are ignored (x86_64 and aarch64 are below 470).
pub const MAX_NR: u32 = 512;
/// (target, syscall) pairs the kernel aggregates; beyond, new pairs are counted as lost.
pub const STATS_MAX: u32 = 8192;

/// Global: 1 to trace every syscall, 0 to trace only those set in the `SYSCALL_FILTER` array.
pub const GLOBAL_TRACE_ALL: &str = "SYSCALLS_TRACE_ALL";

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct SyscallKey {
    pub target: u32,
    pub nr: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct SyscallStats {
    pub hist: crate::hist::Log2Hist,
    /// Returns with a negative value (-errno).
    pub errors: u64,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SyscallStart {
    pub ts_ns: u64,
    pub nr: u32,
    pub target: u32,
}
