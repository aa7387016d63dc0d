//! CPython frame walking: what user space tells the kernel side about each Python process.
//!
//! User space finds the interpreter of a process (python binary or libpython), its version and
//! the address of `_PyRuntime`, and stores a [`PyProc`] per process. On every sample the kernel
//! side finds the sampled thread's `PyThreadState` in the interpreter's thread list and walks
//! its frame chain, recording code-object addresses; user space names them afterwards.

/// Python processes a capture can unwind at once.
pub const PY_PROCS_MAX: u32 = 1024;
/// Distinct Python stacks per capture.
pub const PY_STACKS_MAX: u32 = 8192;
/// Of those, how many may differ by line: the rest is kept for stacks stored by their
/// functions alone once this many are in (a hot loop's lines multiply its stacks).
pub const PY_LINE_STACKS_MAX: u64 = PY_STACKS_MAX as u64 * 3 / 4;
/// Frames walked per sample, innermost first; deeper stacks are cut at the root side.
pub const PY_FRAMES_MAX: usize = 96;
/// Threads of one interpreter searched for the sampled thread.
pub const PY_THREADS_MAX: u32 = 64;

/// Bits of a [`PyStack`] entry holding the code-object address.
pub const CODE_BITS: u32 = 56;

/// An offset field that does not exist in this Python version.
pub const ABSENT: u32 = u32::MAX;

/// Struct offsets of one CPython minor version (release build, x86_64 and aarch64 alike).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PyOffsets {
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interp_head: u32,
    /// `PyInterpreterState.tstate_head` (3.10) or `.threads.head`.
    pub interp_threads_head: u32,
    /// `PyThreadState.next`.
    pub tstate_next: u32,
    /// `PyThreadState.native_thread_id` (3.11+), else `.thread_id` (a `pthread_t`).
    pub tstate_thread: u32,
    /// 1 when `tstate_thread` holds a `pthread_t`, compared with the thread pointer (fsbase).
    pub thread_is_pthread: u32,
    /// `PyThreadState.frame` (3.10), `.cframe` (3.11, 3.12) or `.current_frame` (3.13+).
    pub tstate_frame: u32,
    /// `_PyCFrame.current_frame` when `tstate_frame` points at a `_PyCFrame`, else [`ABSENT`].
    pub cframe_current: u32,
    /// `f_back` (3.10 `PyFrameObject`) or `_PyInterpreterFrame.previous`.
    pub frame_previous: u32,
    /// `f_code`, or `f_executable` (3.13+).
    pub frame_code: u32,
    /// `_PyInterpreterFrame.owner` (a byte), or [`ABSENT`] before 3.12.
    pub frame_owner: u32,
    /// `owner` value of the C-stack shim frames that hold no Python code (3.12+).
    pub owner_cstack: u32,
    /// Where the frame's position in its bytecode is: `f_lasti` (3.10, an index), or the
    /// `prev_instr` (3.11, 3.12) or `instr_ptr` (3.13) pointer. The low 32 bits of the word
    /// there are kept; user space turns them into a line.
    pub frame_instr: u32,
}

/// What the kernel side needs to walk one process's Python stacks.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct PyProc {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    pub offsets: PyOffsets,
}

/// [`PyStack::flags`]: `instrs` hold each frame's position (else they are not part of the
/// stack: the map was full of stacks that differ by line only, and this one was stored by its
/// functions alone).
pub const PY_STACK_LINES: u32 = 1;

/// One walked stack, innermost frame first. Each entry is the frame's code-object address in
/// the low [`CODE_BITS`] bits and its `owner` byte above them (meaningful from 3.12 on).
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct PyStack {
    pub len: u32,
    pub flags: u32,
    pub frames: [u64; PY_FRAMES_MAX],
    /// Low 32 bits of each frame's `PyOffsets::frame_instr` word.
    pub instrs: [u32; PY_FRAMES_MAX],
}
