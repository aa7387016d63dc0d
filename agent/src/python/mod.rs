//! CPython stacks: the user-space half of `agent-ebpf/src/python.rs`.
//!
//! At capture start each process of the subject is inspected: the interpreter is the mapped
//! `libpython3.N` (or, for a statically linked interpreter, the `python3.N` executable), its
//! version comes from `Py_Version` (3.11+) or the file name, and `_PyRuntime` is found in its
//! ELF symbols (blazesym, through /proc/PID/map_files so container files and deleted files
//! work). The struct offsets of that version go to the kernel side with the address. After the
//! capture the walked code-object addresses are named by reading the code objects from the
//! live process (`co_qualname`, `co_filename`, `co_firstlineno`, and `co_linetable` to turn
//! each frame's bytecode position into its line, see [`lines`]), once per address.
//!
//! The offsets are those of CPython's release builds (the same for every patch release of a
//! minor version, on x86_64 and aarch64); `tests/agent/python.rs` checks the code-object and
//! frame-position offsets against live objects of every installed interpreter, and the rest
//! through the frames the walk finds. Debug and free-threaded builds lay their structs out differently: their
//! `_PyRuntime` is found but the walk yields nothing and their frames stay native.
use std::{collections::HashMap, fs::File, os::unix::fs::FileExt as _};

use agent_common::python::{ABSENT, CODE_BITS, PY_STACK_LINES, PyOffsets, PyProc, PyStack};
use blazesym::inspect::{Inspector, source::Elf, source::Source};
use thiserror::Error;

use crate::procmaps::{MapLine, read as read_maps};

pub mod lines;

/// One walked Python frame: its entry (code object and `owner`, see
/// [`Interpreter::frame_code`]) and the raw bytecode position the kernel side read, when the
/// stack kept positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PyFrame {
    pub entry: u64,
    pub instr: Option<u32>,
}

/// The frames of a walked stack, root first.
pub fn frames_of(s: &PyStack) -> Vec<PyFrame> {
    let n = (s.len as usize).min(s.frames.len());
    let lines = s.flags & PY_STACK_LINES != 0;
    s.frames[..n]
        .iter()
        .zip(&s.instrs)
        .rev()
        .map(|(entry, instr)| PyFrame {
            entry: *entry,
            instr: lines.then_some(*instr),
        })
        .collect()
}

/// Minor versions of CPython 3 whose stacks are walked.
pub const SUPPORTED: std::ops::RangeInclusive<u32> = 10..=13;

#[derive(Debug, Error)]
pub enum PythonError {
    #[error(
        "process {pid} runs Python 3.{minor}, which pipeprobe cannot unwind (it knows 3.10 to 3.13): its frames are native only"
    )]
    Unsupported { pid: u32, minor: u32 },
    #[error(
        "process {pid}: `_PyRuntime` is not in the symbols of {module} (a stripped interpreter?): its frames are native only"
    )]
    NoRuntime { pid: u32, module: String },
    #[error("process {pid}: cannot read the symbols of {module}: {reason}")]
    Symbols {
        pid: u32,
        module: String,
        reason: String,
    },
}

/// A Python process the kernel side can unwind.
#[derive(Debug, Clone)]
pub struct Interpreter {
    pub minor: u32,
    pub proc: PyProc,
    /// Executable mappings of the interpreter: native frames in them are replaced by the Python
    /// frames they run.
    pub ranges: Vec<(u64, u64)>,
}

impl Interpreter {
    /// The code object of a walked stack entry, None for C-stack shim frames (3.12+), which
    /// run no Python code.
    pub fn frame_code(&self, entry: u64) -> Option<u64> {
        let code = entry & ((1 << CODE_BITS) - 1);
        let owner = (entry >> CODE_BITS) as u32;
        let o = &self.proc.offsets;
        (code != 0 && (o.owner_cstack == ABSENT || owner != o.owner_cstack)).then_some(code)
    }

    /// The frames of `walked` that run Python code, as (code object, bytecode position).
    pub fn code_frames(&self, walked: &[PyFrame]) -> Vec<(u64, Option<u32>)> {
        walked
            .iter()
            .filter_map(|f| Some((self.frame_code(f.entry)?, f.instr)))
            .collect()
    }

    pub fn contains(&self, ip: u64) -> bool {
        self.ranges.iter().any(|(lo, hi)| (*lo..*hi).contains(&ip))
    }
}

/// Struct offsets per CPython 3 minor version (release builds).
pub fn offsets(minor: u32) -> Option<PyOffsets> {
    let o = |runtime_interp_head,
             interp_threads_head,
             tstate_thread,
             thread_is_pthread,
             tstate_frame,
             cframe_current,
             frame_previous,
             frame_code,
             frame_owner,
             frame_instr| PyOffsets {
        runtime_interp_head,
        interp_threads_head,
        tstate_next: 8,
        tstate_thread,
        thread_is_pthread,
        tstate_frame,
        cframe_current,
        frame_previous,
        frame_code,
        frame_owner,
        // FRAME_OWNED_BY_CSTACK
        owner_cstack: if frame_owner == ABSENT { ABSENT } else { 3 },
        frame_instr,
    };
    Some(match minor {
        // PyFrameObject chain; threads known by pthread_t only; f_lasti.
        10 => o(32, 8, 176, 1, 24, ABSENT, 24, 32, ABSENT, 96),
        // _PyInterpreterFrame through tstate->cframe; no C-stack shim frames yet; prev_instr.
        11 => o(40, 16, 160, 0, 56, 8, 48, 32, ABSENT, 56),
        12 => o(40, 72, 144, 0, 56, 0, 8, 0, 70, 56),
        // cframe gone: tstate->current_frame; f_executable; instr_ptr.
        13 => o(632, 7344, 160, 0, 72, ABSENT, 8, 0, 70, 56),
        _ => return None,
    })
}

/// Code object layout per version, for naming frames.
#[derive(Debug, Clone, Copy)]
pub struct CodeLayout {
    pub name: u64,
    /// `co_qualname` (3.11+: `Class.method`), else `co_name`.
    pub qualname: u64,
    pub filename: u64,
    pub firstlineno: u64,
    /// `co_linetable`, a bytes object.
    pub linetable: u64,
    /// `co_code_adaptive`, the bytecode inside the code object (3.11+), which frames point
    /// into; 0 for 3.10, whose frames hold an index.
    pub code_adaptive: u64,
    /// sizeof(PyASCIIObject) and sizeof(PyCompactUnicodeObject): where string data starts.
    pub ascii_data: u64,
    pub compact_data: u64,
}

pub fn code_layout(minor: u32) -> CodeLayout {
    match minor {
        10 => CodeLayout {
            name: 112,
            qualname: 112,
            filename: 104,
            firstlineno: 40,
            linetable: 120,
            code_adaptive: 0,
            ascii_data: 48,
            compact_data: 72,
        },
        11 => CodeLayout {
            name: 120,
            qualname: 128,
            filename: 112,
            firstlineno: 72,
            linetable: 136,
            code_adaptive: 184,
            ascii_data: 48,
            compact_data: 72,
        },
        // 3.12 dropped the `wstr` field from the string headers.
        12 => CodeLayout {
            name: 120,
            qualname: 128,
            filename: 112,
            firstlineno: 68,
            linetable: 136,
            code_adaptive: 192,
            ascii_data: 40,
            compact_data: 56,
        },
        // 3.13 added `co_executors` before the bytecode.
        _ => CodeLayout {
            name: 120,
            qualname: 128,
            filename: 112,
            firstlineno: 68,
            linetable: 136,
            code_adaptive: 200,
            ascii_data: 40,
            compact_data: 56,
        },
    }
}

/// The minor version in an interpreter file name: `libpython3.12.so.1.0` and `python3.12` give
/// 12; other names give None.
fn minor_from_name(file: &str) -> Option<u32> {
    let rest = file
        .strip_prefix("libpython3.")
        .or_else(|| file.strip_prefix("python3."))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let tail = &rest[digits.len()..];
    // `python3.12-config` or `python3.12.py` are not interpreters.
    (tail.is_empty() || tail.starts_with(".so") || tail == "d" || tail.starts_with("d.so"))
        .then(|| digits.parse().ok())
        .flatten()
}

/// What the symbols of one interpreter file say, cached by inode across captures.
#[derive(Debug, Clone, Copy)]
struct FileFacts {
    /// Virtual address of `_PyRuntime` in the file; it may live in .bss, which has no file
    /// offset, so it is placed through `anchor`.
    runtime_vaddr: u64,
    /// A code symbol's (virtual address, file offset): where its mapping lies in the process
    /// gives the load bias of the whole file.
    anchor: (u64, u64),
    /// From `Py_Version` (3.11+), the authority over the file name.
    minor: Option<u32>,
}

/// Finds Python interpreters in processes; keeps what it learnt of each interpreter file.
#[derive(Default)]
pub struct Finder {
    files: HashMap<(u64, String), FileFacts>,
}

impl Finder {
    /// The interpreter of `pid`, None when it runs none.
    pub fn inspect(&mut self, pid: u32) -> Result<Option<Interpreter>, PythonError> {
        let maps = read_maps(pid);
        let module_of = |m: &MapLine| m.path.rsplit('/').next().unwrap_or("").to_owned();
        // A libpython wins over the executable: with one, the executable is only a stub.
        let chosen = maps
            .iter()
            .filter(|m| m.path.starts_with('/'))
            .filter_map(|m| minor_from_name(&module_of(m)).map(|v| (m, v)))
            .max_by_key(|(m, _)| module_of(m).starts_with("lib"));
        let Some((first, name_minor)) = chosen else {
            return Ok(None);
        };
        let module = module_of(first);
        // Py_Version, which could overrule the name, only exists from 3.11 on.
        if name_minor < 11 && !SUPPORTED.contains(&name_minor) {
            return Err(PythonError::Unsupported {
                pid,
                minor: name_minor,
            });
        }
        let of_file: Vec<&MapLine> = maps
            .iter()
            .filter(|m| m.path == first.path && m.inode == first.inode)
            .collect();
        let key = (first.inode, first.path.clone());
        let facts = match self.files.get(&key) {
            Some(f) => *f,
            None => {
                let f = file_facts(pid, first, &module)?;
                self.files.insert(key, f);
                f
            }
        };
        let minor = facts.minor.unwrap_or(name_minor);
        let offsets = offsets(minor).ok_or(PythonError::Unsupported { pid, minor })?;
        let (anchor_vaddr, anchor_offset) = facts.anchor;
        let runtime = of_file
            .iter()
            .find(|m| (m.offset..m.offset + (m.hi - m.lo)).contains(&anchor_offset))
            .map(|m| (m.lo + anchor_offset - m.offset).wrapping_sub(anchor_vaddr))
            .map(|bias| bias.wrapping_add(facts.runtime_vaddr))
            .ok_or_else(|| PythonError::NoRuntime {
                pid,
                module: module.clone(),
            })?;
        Ok(Some(Interpreter {
            minor,
            proc: PyProc { runtime, offsets },
            ranges: of_file
                .iter()
                .filter(|m| m.perms.contains('x'))
                .map(|m| (m.lo, m.hi))
                .collect(),
        }))
    }
}

fn file_facts(pid: u32, m: &MapLine, module: &str) -> Result<FileFacts, PythonError> {
    // map_files reaches the file as the process sees it: inside its container, even deleted.
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.lo, m.hi);
    let inspector = Inspector::new();
    let found = inspector
        .lookup(
            &Source::Elf(Elf::new(&path)),
            &["_PyRuntime", "Py_Version", "Py_Initialize"],
        )
        .map_err(|e| PythonError::Symbols {
            pid,
            module: module.to_owned(),
            reason: e.to_string(),
        })?;
    let no_runtime = || PythonError::NoRuntime {
        pid,
        module: module.to_owned(),
    };
    let runtime_vaddr = found
        .first()
        .and_then(|syms| syms.first())
        .map(|s| s.addr)
        .ok_or_else(no_runtime)?;
    let anchor = found
        .get(2)
        .and_then(|syms| syms.iter().find_map(|s| Some((s.addr, s.file_offset?))))
        .ok_or_else(no_runtime)?;
    // Py_Version is PY_VERSION_HEX in read-only data: 0x030C01F0 is 3.12.1 final.
    let minor = found
        .get(1)
        .and_then(|syms| syms.iter().find_map(|s| s.file_offset))
        .and_then(|off| {
            let file = File::open(&path).ok()?;
            let mut b = [0u8; 4];
            file.read_exact_at(&mut b, off).ok()?;
            let hex = u32::from_le_bytes(b);
            (hex >> 24 == 3).then_some((hex >> 16) & 0xff)
        });
    Ok(FileFacts {
        runtime_vaddr,
        anchor,
        minor,
    })
}

/// What a code object says of itself: its name, file, first line and line table.
struct Code {
    name: String,
    file: String,
    first_line: i32,
    /// `(start, end, line)` byte ranges of its bytecode.
    lines: Vec<(u32, u32, Option<i32>)>,
}

/// Names the frames of a live process: `qualname (file:line)`, the line the frame is at (as
/// py-spy shows), else the function's first line.
pub struct CodeReader {
    mem: Option<File>,
    minor: u32,
    layout: CodeLayout,
    codes: HashMap<u64, Option<Code>>,
    names: HashMap<(u64, Option<u32>), String>,
}

impl CodeReader {
    pub fn new(pid: u32, minor: u32) -> Self {
        Self {
            mem: File::open(format!("/proc/{pid}/mem")).ok(),
            minor,
            layout: code_layout(minor),
            codes: HashMap::new(),
            names: HashMap::new(),
        }
    }

    fn read<const N: usize>(&self, addr: u64) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        self.mem.as_ref()?.read_exact_at(&mut b, addr).ok()?;
        Some(b)
    }

    fn ptr(&self, addr: u64) -> Option<u64> {
        self.read::<8>(addr).map(u64::from_le_bytes)
    }

    /// A `str` object's text (compact strings, which all code-object strings are).
    fn string(&self, obj: u64) -> Option<String> {
        let len = self.ptr(obj + 16)? as usize;
        let state = u32::from_le_bytes(self.read::<4>(obj + 32)?);
        let (kind, compact, ascii) = ((state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1);
        if compact == 0 || len > 4096 {
            return None;
        }
        let data = obj
            + if ascii == 1 {
                self.layout.ascii_data
            } else {
                self.layout.compact_data
            };
        let mut buf = vec![0u8; len * kind.max(1) as usize];
        self.mem.as_ref()?.read_exact_at(&mut buf, data).ok()?;
        Some(match kind {
            2 => char::decode_utf16(
                buf.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]])),
            )
            .map(|c| c.unwrap_or('?'))
            .collect(),
            4 => buf
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])).unwrap_or('?')
                })
                .collect(),
            // Latin-1 (ASCII included): each byte is its code point.
            _ => buf.iter().map(|b| char::from(*b)).collect(),
        })
    }

    /// Whether `obj` is a code object (its type is named `code`): a stale address is not
    /// named after whatever lives there now.
    fn is_code(&self, obj: u64) -> bool {
        self.ptr(obj + 8)
            .and_then(|ty| self.ptr(ty + 24))
            .and_then(|name| self.read::<5>(name))
            .is_some_and(|n| &n == b"code\0")
    }

    /// A `bytes` object's contents (ob_size at 16, data at 32), bounded.
    fn bytes(&self, obj: u64) -> Option<Vec<u8>> {
        let len = self.ptr(obj + 16)? as usize;
        if len > 1 << 20 {
            return None;
        }
        let mut buf = vec![0u8; len];
        self.mem.as_ref()?.read_exact_at(&mut buf, obj + 32).ok()?;
        Some(buf)
    }

    fn read_code(&self, code: u64) -> Option<Code> {
        if !self.is_code(code) {
            return None;
        }
        let l = &self.layout;
        let name = self
            .ptr(code + l.qualname)
            .and_then(|s| self.string(s))
            .or_else(|| self.ptr(code + l.name).and_then(|s| self.string(s)))?;
        let file = self
            .ptr(code + l.filename)
            .and_then(|s| self.string(s))
            .unwrap_or_default();
        let first_line = self
            .read::<4>(code + l.firstlineno)
            .map_or(0, i32::from_le_bytes);
        let lines = self
            .ptr(code + l.linetable)
            .and_then(|t| self.bytes(t))
            .map(|t| lines::ranges(self.minor, &t, first_line))
            .unwrap_or_default();
        Some(Code {
            name,
            file: short_path(&file).to_owned(),
            first_line,
            lines,
        })
    }

    /// The byte offset in `code`'s bytecode of a raw position read from its frame.
    fn addr(&self, code: u64, instr: u32) -> Option<u32> {
        if self.layout.code_adaptive == 0 {
            // 3.10: f_lasti, an index of code units; -1 before the first instruction.
            let lasti = instr as i32;
            return (lasti >= 0).then(|| (lasti as u32).wrapping_mul(2));
        }
        // The low 32 bits of a pointer into the bytecode: the difference is exact as long as
        // the bytecode is under 4 GiB. A frame that has not started points before it.
        let start = code.wrapping_add(self.layout.code_adaptive) as u32;
        Some(instr.wrapping_sub(start)).filter(|a| *a < 1 << 30)
    }

    /// The frame name of `code` at bytecode position `instr`; `[python] 0xADDR` when it
    /// cannot be read (process gone).
    pub fn name(&mut self, code: u64, instr: Option<u32>) -> String {
        if let Some(n) = self.names.get(&(code, instr)) {
            return n.clone();
        }
        if !self.codes.contains_key(&code) {
            let c = self.read_code(code);
            self.codes.insert(code, c);
        }
        let addr = instr.and_then(|i| self.addr(code, i));
        let n = match &self.codes[&code] {
            Some(c) => {
                let line = addr
                    .and_then(|a| lines::line_in(&c.lines, a))
                    .unwrap_or(c.first_line);
                format!("{} ({}:{line})", c.name, c.file)
            }
            None => format!("[python] {code:#x}"),
        };
        self.names.insert((code, instr), n.clone());
        n
    }
}

/// Module paths as Python users read them: from the package root, not the venv's prefix.
fn short_path(file: &str) -> &str {
    for marker in ["site-packages/", "dist-packages/"] {
        if let Some((_, rest)) = file.rsplit_once(marker) {
            return rest;
        }
    }
    // The standard library: /usr/lib/python3.12/json/decoder.py -> json/decoder.py.
    if let Some(i) = file.find("/lib/python3.") {
        let after = &file[i + "/lib/python3.".len()..];
        if let Some((_, rest)) = after.split_once('/') {
            return rest;
        }
    }
    file
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_file_names() {
        assert_eq!(minor_from_name("libpython3.12.so.1.0"), Some(12));
        assert_eq!(minor_from_name("libpython3.10.so"), Some(10));
        assert_eq!(minor_from_name("python3.11"), Some(11));
        assert_eq!(minor_from_name("libpython3.13d.so.1.0"), Some(13));
        assert_eq!(minor_from_name("python3.12-config"), None);
        assert_eq!(minor_from_name("python3"), None);
        assert_eq!(minor_from_name("libpython3.so"), None);
    }

    #[test]
    fn every_supported_version_has_offsets() {
        for minor in SUPPORTED {
            let o = offsets(minor).unwrap();
            assert_eq!(o.tstate_next, 8, "3.{minor}");
            assert_eq!(o.thread_is_pthread == 1, minor == 10, "3.{minor}");
        }
        assert!(offsets(9).is_none() && offsets(14).is_none());
    }

    #[test]
    fn paths_are_shortened_to_the_package() {
        assert_eq!(
            short_path("/venv/lib/python3.12/site-packages/torch/nn/modules/module.py"),
            "torch/nn/modules/module.py"
        );
        assert_eq!(
            short_path("/usr/lib/python3.11/json/decoder.py"),
            "json/decoder.py"
        );
        assert_eq!(short_path("/app/tts.py"), "/app/tts.py");
    }
}
