//! Reads of `struct task_struct` fields at offsets user space found in the kernel's BTF.
use aya_ebpf::helpers::bpf_probe_read_kernel;

// Set by the loader (`agent_common::task::GLOBAL_*`); read volatile so the compiler does not fold
// the zero initialisers into the code.
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TASK_STATE_OFFSET: u32 = 0;
/// `thread.fsbase` (the saved thread pointer), 0 where this kernel has none.
#[unsafe(no_mangle)]
static TASK_FSBASE_OFFSET: u32 = 0;

/// A `u32` field of `task`, which must be a pointer the verifier knows as a `task_struct` (a
/// tp_btf argument or `bpf_get_current_task_btf()`): a plain load, which the verifier checks
/// against the kernel's BTF (the offset is a known constant, read from frozen .rodata) and the
/// JIT guards with an exception entry. `bpf_probe_read_kernel` would be a helper call, tens of
/// nanoseconds on a CPU with retpolines and return thunks, on hooks that run at every switch.
#[inline(always)]
fn load_u32_at(task: *const u8, offset: &'static u32) -> u32 {
    // SAFETY: volatile read of a global the loader initialised.
    let offset = unsafe { core::ptr::read_volatile(offset) };
    // SAFETY: `task` is a BTF-typed task_struct and `offset` one of its u32 fields, found in
    // that same BTF by the loader; the verifier rejects the program otherwise.
    unsafe { core::ptr::read_volatile(task.wrapping_add(offset as usize).cast::<u32>()) }
}

/// Thread id (`task->pid`).
#[inline(always)]
pub fn pid(task: *const u8) -> u32 {
    load_u32_at(task, &TASK_PID_OFFSET)
}

/// Process id (`task->tgid`).
#[inline(always)]
pub fn tgid(task: *const u8) -> u32 {
    load_u32_at(task, &TASK_TGID_OFFSET)
}

/// Scheduler state (`task->__state`).
#[inline(always)]
pub fn state(task: *const u8) -> u32 {
    load_u32_at(task, &TASK_STATE_OFFSET)
}

/// The current task's thread pointer (what `pthread_self()` returns on x86_64), or None where
/// the loader found no `thread.fsbase` in this kernel.
#[inline(always)]
pub fn fsbase() -> Option<u64> {
    // SAFETY: volatile read of a global the loader initialised.
    let off = unsafe { core::ptr::read_volatile(&TASK_FSBASE_OFFSET) };
    if off == 0 {
        return None;
    }
    // SAFETY: the current task pointer is valid; the read is checked.
    unsafe {
        let task = aya_ebpf::helpers::bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel(task.wrapping_add(off as usize) as *const u64).ok()
    }
}
