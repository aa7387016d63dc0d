//! Types shared by pipeprobe's eBPF programs (`agent-ebpf`) and its user-space agent.
//!
//! Everything here is `#[repr(C)]` and `Copy` because it crosses the kernel boundary as raw bytes
//! in BPF maps and ring buffers. With the `user` feature the types implement `aya::Pod`.
#![no_std]

pub mod hist;
pub mod lost;
pub mod python;
pub mod sched;
pub mod spans;
pub mod stacks;
pub mod syscalls;
pub mod targets;
pub mod task;
pub mod tcp;

/// Most targets an agent can track. Target ids index per-CPU arrays, so this bounds both the map
/// sizes and the `target` label's cardinality.
pub const MAX_TARGETS: u32 = 64;

/// Target id meaning "not tracked".
pub const NO_TARGET: u32 = u32::MAX;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is `#[repr(C)]`, `Copy`, made only of integers and has no padding
    // the kernel could leave uninitialised (explicit `_pad` fields instead).
    unsafe impl aya::Pod for crate::hist::Log2Hist {}
    unsafe impl aya::Pod for crate::targets::ProcEvent {}
    unsafe impl aya::Pod for crate::sched::SchedOnCpu {}
    unsafe impl aya::Pod for crate::sched::ClockPair {}
    unsafe impl aya::Pod for crate::syscalls::SyscallSlot {}
    unsafe impl aya::Pod for crate::syscalls::SyscallStats {}
    unsafe impl aya::Pod for crate::syscalls::SyscallOnCpu {}
    unsafe impl aya::Pod for crate::tcp::TcpStats {}
    unsafe impl aya::Pod for crate::tcp::PeerKey {}
    unsafe impl aya::Pod for crate::stacks::CaptureConfig {}
    unsafe impl aya::Pod for crate::stacks::StackKey {}
    unsafe impl aya::Pod for crate::stacks::Blocked {}
    unsafe impl aya::Pod for crate::stacks::KernelStack {}
    unsafe impl aya::Pod for crate::stacks::SpanSample {}
    unsafe impl aya::Pod for crate::stacks::StackCopy {}
    unsafe impl aya::Pod for crate::stacks::SpanStackCopy {}
    unsafe impl aya::Pod for crate::tcp::PeerStats {}
    unsafe impl aya::Pod for crate::python::PyProc {}
    unsafe impl aya::Pod for crate::python::PyStack {}
    unsafe impl aya::Pod for crate::spans::ThreadState {}
}
