//! User stacks to unwind in user space (`agent/src/unwind.rs`): a CPU sample's user registers
//! and a copy of the stack memory above its stack pointer, to a ring buffer.
//!
//! Frame pointers are not enough: the CPythons here and in the official images, and most
//! distribution libraries (libz, libstdc++, libtorch's dependencies), are built without them,
//! so `bpf_get_stackid` stops at the first such frame. Their `.eh_frame` tables say how to
//! unwind every instruction; user space has them and reads them with framehop. Copying the
//! stack instead of unwinding in the kernel keeps the kernel side a bounded copy, with no
//! per-library tables to load into maps, at ~16 KiB to user space per sample: cheap at
//! profiling rates (19-99 Hz a CPU), and only while a capture runs.
use core::ffi::c_void;

use agent_common::{
    lost,
    stacks::{
        SPAN_STACK_COPIES_BYTES, STACK_COPIES_BYTES, STACK_COPY_BYTES, SpanSample, SpanStackCopy,
        StackCopy,
    },
};
use aya_ebpf::{
    bindings::{BPF_RB_NO_WAKEUP, pt_regs},
    helpers::generated::{
        bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
    },
    macros::map,
    maps::RingBuf,
};

use crate::lost::count as count_lost;

#[map]
static STACK_COPIES: RingBuf = RingBuf::with_byte_size(STACK_COPIES_BYTES, 0);

/// The span sampler's, apart: it runs all the time, the captures' only while one runs.
#[map]
static SPAN_STACK_COPIES: RingBuf = RingBuf::with_byte_size(SPAN_STACK_COPIES_BYTES, 0);

const PAGE: u64 = 4096;

/// Elsewhere than x86_64 the kernel walks frame pointers (framehop's aarch64 unwinder would
/// also need the link register, which this does not copy).
#[cfg(not(bpf_target_arch = "x86_64"))]
#[inline(always)]
pub fn send(_tgid: u32, _kernel_stack: i32, _python_stack: u64) -> bool {
    false
}

#[cfg(not(bpf_target_arch = "x86_64"))]
#[inline(always)]
pub fn send_span(_sample: &SpanSample) -> bool {
    false
}

/// Sends a capture's CPU sample: the current thread's user registers and stack with the
/// sample's other keys. False when the ring buffer is full (counted): the caller then walks
/// frame pointers instead.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn send(tgid: u32, kernel_stack: i32, python_stack: u64) -> bool {
    let Some(mut entry) = STACK_COPIES.reserve::<StackCopy>(0) else {
        count_lost(lost::STACK_COPIES_FULL);
        return false;
    };
    let out = entry.as_mut_ptr();
    // SAFETY: `out` is the reserved record, written field by field before submission.
    unsafe {
        (*out).tgid = tgid;
        (*out).kernel_stack = kernel_stack;
        (*out).python_stack = python_stack;
        fill(out);
    }
    // No wakeup: user space drains the ring on a timer while the capture runs.
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    true
}

/// Sends a span sampler's on-CPU sample with the current thread's user registers and stack;
/// false as `send`.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn send_span(sample: &SpanSample) -> bool {
    let Some(mut entry) = SPAN_STACK_COPIES.reserve::<SpanStackCopy>(0) else {
        count_lost(lost::STACK_COPIES_FULL);
        return false;
    };
    let out = entry.as_mut_ptr();
    // SAFETY: as in `send`.
    unsafe {
        (*out).sample = *sample;
        (*out).copy.tgid = sample.tgid;
        (*out).copy.kernel_stack = sample.kernel_stack;
        (*out).copy.python_stack = sample.py_stack;
        fill(&raw mut (*out).copy);
    }
    // No wakeup: user space drains the ring on a timer, as the span samples'.
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    true
}

/// Writes the current thread's user registers and stack into `out`.
///
/// # Safety
/// `out` points to a ring buffer reservation's `StackCopy`.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
unsafe fn fill(out: *mut StackCopy) {
    // The registers the thread returns to user mode with: those of the interrupted user code,
    // or those saved at kernel entry when the sample hit a syscall or fault.
    // Not zeroed first: the read fills it whole, with zeros when it fails, and zeroing it is a
    // `memset` call here, a loop of 168 byte stores.
    let mut regs = core::mem::MaybeUninit::<pt_regs>::uninit();
    // SAFETY: bpf_task_pt_regs takes the trusted current task; the read writes only `regs`.
    unsafe {
        let user = bpf_task_pt_regs(bpf_get_current_task_btf());
        bpf_probe_read_kernel(
            regs.as_mut_ptr().cast(),
            size_of::<pt_regs>() as u32,
            user as *const c_void,
        );
    }
    // SAFETY: the helper writes all of it, the read or zeros.
    let regs = unsafe { regs.assume_init() };
    let sp = regs.rsp;
    // The stack ends at a page boundary somewhere above sp: copy from sp to the end of its
    // page and up to three pages more, fewer when the stack ends sooner (a failed read
    // copies nothing, so the next shorter one is tried).
    let rest_of_page = PAGE - (sp & (PAGE - 1));
    let mut len = 0u64;
    for more in (0..4u64).rev() {
        let want = rest_of_page + more * PAGE;
        if want > STACK_COPY_BYTES as u64 {
            continue;
        }
        // SAFETY: `want` <= STACK_COPY_BYTES, the size of `stack`; the helper tolerates any
        // user address.
        let r = unsafe {
            bpf_probe_read_user(
                (&raw mut (*out).stack).cast(),
                want as u32,
                sp as *const c_void,
            )
        };
        if r == 0 {
            len = want;
            break;
        }
    }
    // SAFETY: the caller's reservation.
    unsafe {
        (*out).ip = regs.rip;
        (*out).sp = sp;
        (*out).bp = regs.rbp;
        (*out).len = len;
    }
}
