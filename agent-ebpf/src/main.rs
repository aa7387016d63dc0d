//! pipeprobe's eBPF programs: one module per probe family, named like its user-space half in
//! `agent/src/`.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// Atomic adds on shared map values: core's atomics have no RMW for bpfel, the intrinsic lowers
// to BPF's `lock xadd` (what `__sync_fetch_and_add` gives C programs).
#![cfg_attr(
    target_arch = "bpf",
    feature(core_intrinsics),
    allow(internal_features)
)]

#[cfg(target_arch = "bpf")]
mod lost;
#[cfg(target_arch = "bpf")]
mod sched;
#[cfg(target_arch = "bpf")]
mod syscalls;
#[cfg(target_arch = "bpf")]
mod targets;
#[cfg(target_arch = "bpf")]
mod task;
#[cfg(target_arch = "bpf")]
mod tcp;

/// Adds `v` to `*dst` atomically across CPUs.
///
/// # Safety
/// `dst` must point into a live map value.
#[cfg(target_arch = "bpf")]
#[inline(always)]
unsafe fn atomic_add(dst: *mut u64, v: u64) {
    // SAFETY: the caller guarantees dst is valid.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            dst, v,
        );
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "pipeprobe-ebpf only builds for bpfel-unknown-none; `cargo build -p pipeprobe` builds it"
    );
}
