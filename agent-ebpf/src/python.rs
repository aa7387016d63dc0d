//! CPython stacks: the sampled thread's Python frames, walked from the interpreter's own
//! structures (as py-spy and the OpenTelemetry eBPF profiler do), so Python function names
//! appear without `-X perf` and without frame pointers in the interpreter.
//!
//! The walk only reads: `_PyRuntime` -> main interpreter -> its thread list, matched against
//! the sampled thread -> frame chain. Each step is one `bpf_probe_read_user`, so a frame being
//! torn down under us gives a short or odd stack, never a fault. Stacks are deduplicated by a
//! hash of their code-object addresses into `PY_STACKS`, whose key goes into the sample key:
//! identical Python stacks cost one entry however often they are sampled.
use agent_common::{
    lost,
    python::{
        ABSENT, PY_FRAMES_MAX, PY_LINE_STACKS_MAX, PY_PROCS_MAX, PY_STACK_LINES, PY_STACKS_MAX,
        PY_THREADS_MAX, PyProc, PyStack,
    },
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};

use crate::{aggregate::atomic_add, lost::count as count_lost, task};

/// Python processes of the running capture, by tgid (filled by user space at capture start).
#[map]
static PY_PROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(PY_PROCS_MAX, 0);

/// Walked stacks by the hash of their frames.
#[map]
static PY_STACKS: HashMap<u64, PyStack> = HashMap::with_max_entries(PY_STACKS_MAX, 0);

/// Per-CPU room to build a stack in: a `PyStack` does not fit on the 512-byte BPF stack.
#[map]
static PY_SCRATCH: PerCpuArray<PyStack> = PerCpuArray::with_max_entries(1, 0);

/// Stacks with lines stored in `PY_STACKS` (user space zeroes it with the map).
#[map]
static PY_LINE_STACKS: Array<u64> = Array::with_max_entries(1, 0);

/// The same three for the continuous span sampler, which runs all the time beside captures
/// (a capture resets its own maps) and may interrupt one on the same CPU (its own scratch).
#[map]
static SPAN_PY_PROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(PY_PROCS_MAX, 0);
#[map]
static SPAN_PY_STACKS: HashMap<u64, PyStack> = HashMap::with_max_entries(PY_STACKS_MAX, 0);
#[map]
static SPAN_PY_SCRATCH: PerCpuArray<PyStack> = PerCpuArray::with_max_entries(1, 0);
#[map]
static SPAN_PY_LINE_STACKS: Array<u64> = Array::with_max_entries(1, 0);

/// Reads a user-space word; 0 when unreadable (the helper zeroes its destination on failure).
/// No branch on the result: each branch in the frame loop would multiply the states the
/// verifier walks through its iterations.
#[inline(always)]
fn read_ptr(addr: u64) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: writes 8 bytes into `v`; bpf_probe_read_user tolerates any source address.
    unsafe {
        generated::bpf_probe_read_user((&raw mut v).cast(), 8, addr as *const core::ffi::c_void)
    };
    v
}

#[inline(always)]
fn read_u32(addr: u64) -> u32 {
    let mut v: u32 = 0;
    // SAFETY: as in read_ptr, four bytes.
    unsafe {
        generated::bpf_probe_read_user((&raw mut v).cast(), 4, addr as *const core::ffi::c_void)
    };
    v
}

#[inline(always)]
fn read_byte(addr: u64) -> u64 {
    let mut v: u8 = 0;
    // SAFETY: as in read_ptr, one byte.
    unsafe {
        generated::bpf_probe_read_user((&raw mut v).cast(), 1, addr as *const core::ffi::c_void)
    };
    u64::from(v)
}

/// The identity CPython's thread list holds for the current thread.
#[inline(always)]
fn current_thread_id(p: &PyProc, tid: u32) -> u64 {
    if p.offsets.thread_is_pthread == 0 {
        return u64::from(tid);
    }
    task::fsbase().unwrap_or(0)
}

/// The current thread's `PyThreadState`, or 0.
#[inline(always)]
fn thread_state(p: &PyProc, tid: u32) -> u64 {
    let want = current_thread_id(p, tid);
    if want == 0 {
        return 0;
    }
    let o = &p.offsets;
    let interp = read_ptr(p.runtime + u64::from(o.runtime_interp_head));
    if interp == 0 {
        return 0;
    }
    let mut ts = read_ptr(interp + u64::from(o.interp_threads_head));
    for _ in 0..PY_THREADS_MAX {
        if ts == 0 {
            return 0;
        }
        if read_ptr(ts + u64::from(o.tstate_thread)) == want {
            return ts;
        }
        ts = read_ptr(ts + u64::from(o.tstate_next));
    }
    0
}

/// Walks the current thread's Python frames and returns their `PY_STACKS` key, or 0 when the
/// process runs no known Python or the thread runs no Python code.
#[inline(always)]
pub fn stack(tgid: u32, tid: u32) -> u64 {
    stack_in(
        &PY_PROCS,
        &PY_STACKS,
        &PY_SCRATCH,
        &PY_LINE_STACKS,
        tgid,
        tid,
    )
}

/// [`stack`] for the span sampler, into `SPAN_PY_STACKS`.
#[inline(always)]
pub fn span_stack(tgid: u32, tid: u32) -> u64 {
    stack_in(
        &SPAN_PY_PROCS,
        &SPAN_PY_STACKS,
        &SPAN_PY_SCRATCH,
        &SPAN_PY_LINE_STACKS,
        tgid,
        tid,
    )
}

#[inline(always)]
fn stack_in(
    procs: &HashMap<u32, PyProc>,
    stacks: &HashMap<u64, PyStack>,
    scratch: &PerCpuArray<PyStack>,
    line_stacks: &Array<u64>,
    tgid: u32,
    tid: u32,
) -> u64 {
    // SAFETY: copied out of the map value at once.
    let Some(p) = (unsafe { procs.get(&tgid).copied() }) else {
        return 0;
    };
    let ts = thread_state(&p, tid);
    if ts == 0 {
        return 0;
    }
    let o = &p.offsets;
    let mut frame = read_ptr(ts + u64::from(o.tstate_frame));
    if o.cframe_current != ABSENT {
        frame = read_ptr(frame + u64::from(o.cframe_current));
    }
    let Some(out) = scratch.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch value, only this program on this CPU uses it now.
    let out = unsafe { &mut *out };
    // One path per iteration (only the end of the chain branches), or verification time grows
    // with the square of the depth: frames are indexed by the loop counter, and the `owner` byte
    // travels in the top byte of each entry for user space to drop C-stack shim frames (user
    // addresses fit in 56 bits). Versions without `owner` read a byte that user space ignores.
    let mut len = 0usize;
    // FNV-1a over the entries, a word at a time: only deduplicates stacks. One hash with each
    // frame's position, one by functions alone for when the map is full.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut by_function: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..PY_FRAMES_MAX {
        if frame == 0 {
            break;
        }
        let owner = read_byte(frame + u64::from(o.frame_owner));
        let entry = read_ptr(frame + u64::from(o.frame_code)) | (owner << 56);
        let instr = read_u32(frame + u64::from(o.frame_instr));
        if let Some(slot) = out.frames.get_mut(i) {
            *slot = entry;
        }
        if let Some(slot) = out.instrs.get_mut(i) {
            *slot = instr;
        }
        len = i + 1;
        by_function = (by_function ^ entry).wrapping_mul(0x0100_0000_01b3);
        hash = ((hash ^ entry).wrapping_mul(0x0100_0000_01b3) ^ u64::from(instr))
            .wrapping_mul(0x0100_0000_01b3);
        frame = read_ptr(frame + u64::from(o.frame_previous));
    }
    if len == 0 {
        return 0;
    }
    out.len = len as u32;
    out.flags = PY_STACK_LINES;
    // Zero is "no Python stack" in the sample key; the low bit tells the two kinds apart.
    let key = hash | 1;
    if stacks.get_ptr(&key).is_some() {
        return key;
    }
    // Lines multiply the stacks of a hot loop: past PY_LINE_STACKS_MAX of them, new stacks are
    // kept by their functions in the room left, rather than lost.
    if let Some(n) = line_stacks.get_ptr_mut(0)
        // SAFETY: a live map value; read without a lock, so a few more may slip in.
        && unsafe { *n } < PY_LINE_STACKS_MAX
    {
        if stacks.insert(&key, &*out, u64::from(BPF_NOEXIST)).is_ok() {
            // SAFETY: as above; other CPUs add to it too.
            unsafe { atomic_add(n, 1) };
            return key;
        }
        if stacks.get_ptr(&key).is_some() {
            return key;
        }
    }
    out.flags = 0;
    let key = by_function & !1;
    if key != 0 && stored(stacks, key, out) {
        return key;
    }
    count_lost(lost::PYTHON_STACK_MISSING);
    0
}

/// Whether `key` is in `stacks`, inserting `value` if not.
#[inline(always)]
fn stored(stacks: &HashMap<u64, PyStack>, key: u64, value: &PyStack) -> bool {
    stacks.get_ptr(&key).is_some()
        || stacks.insert(&key, value, u64::from(BPF_NOEXIST)).is_ok()
        || stacks.get_ptr(&key).is_some()
}
