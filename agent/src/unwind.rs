//! Unwinding of the user stacks the kernel copies on CPU samples (`agent-ebpf/src/unwind.rs`),
//! with each module's `.eh_frame`, through framehop.
//!
//! A frame-pointer walk stops at the first function built without frame pointers, which is
//! most of a Python service's native code: the interpreter itself (see ../shared/PLATFORM.md),
//! C extensions' libraries such as libz, and libtorch's. The compilers' unwind tables cover
//! every instruction of those; framehop reads them in place (using `.eh_frame_hdr` as the
//! index) and falls back to frame pointers only for code no table covers (JIT code).
//!
//! Each sampled process gets an unwinder over its executable mappings, opened
//! through /proc/PID/map_files (so a container's files and deleted files work); a file is
//! mapped once (its pages are the page cache's, not the agent's heap) and shared by every
//! process that maps it, the vDSO's copied from the agent's own (the same image). A capture's
//! unwinders are dropped when it ends; the span sampler keeps its own, listing each process's
//! modules again every 30 s and forgetting processes that are gone.
use std::{
    collections::HashMap,
    fs::File,
    ops::{Deref, Range},
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::stacks::{STACK_COPY_BYTES, StackCopy};
use framehop::{
    CacheNative, ExplicitModuleSectionInfo, FrameAddress, MayAllocateDuringUnwind, Module,
    UnwindRegsNative, Unwinder as _, UnwinderNative,
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};
use thiserror::Error;

/// Frames kept per stack, as many as the kernel's stack map keeps (PERF_MAX_STACK_DEPTH).
pub const MAX_FRAMES: usize = 127;

#[derive(Debug, Error)]
pub enum UnwindError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file framehop can read: {source}")]
    Parse { path: String, source: object::Error },
    #[error("{path} has no .eh_frame or .debug_frame: its frames are unwound by frame pointers")]
    NoUnwindTables { path: String },
}

/// A file's bytes, mapped (the page cache holds them, not the agent's heap), or copied when
/// they are no file (the vDSO).
enum Image {
    Mapped(memmap2::Mmap),
    Copied(Vec<u8>),
}

impl Deref for Image {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Image::Mapped(m) => m,
            Image::Copied(v) => v,
        }
    }
}

/// One section of an image, as framehop reads it.
#[derive(Clone)]
pub struct Section(Arc<Image>, Range<usize>);

/// framehop's section info wants one for the sections it is not given.
impl Default for Section {
    fn default() -> Self {
        Section(Arc::new(Image::Copied(Vec::new())), 0..0)
    }
}

impl Deref for Section {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0[self.1.clone()]
    }
}

/// What framehop needs of one ELF file: its unwind sections, where they are in the file's
/// address space, and the loadable segments that map file offsets to those addresses.
struct FileTables {
    eh_frame: Option<(Range<u64>, Section)>,
    eh_frame_hdr: Option<(Range<u64>, Section)>,
    debug_frame: Option<Section>,
    text: Option<Range<u64>>,
    got: Option<Range<u64>>,
    /// (file offset, virtual address) of each PT_LOAD segment, and its file size.
    segments: Vec<(u64, u64, u64)>,
}

impl FileTables {
    fn read(path: &str, file: &File) -> Result<Self, UnwindError> {
        // SAFETY: a read-only private mapping; libraries are replaced by renaming, not
        // rewritten in place, so its pages do not change under it.
        let map = unsafe { memmap2::Mmap::map(file) }.map_err(|source| UnwindError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, Arc::new(Image::Mapped(map)))
    }

    /// The vDSO's: one image for every 64-bit process of this kernel, so the agent's own. It
    /// is a whole ELF file in memory, laid out as it is linked (at address 0).
    fn vdso() -> Result<Self, UnwindError> {
        let path = "[vdso]";
        let mapping = crate::procmaps::read(std::process::id())
            .into_iter()
            .find(|m| m.path == path)
            .ok_or_else(|| UnwindError::NoUnwindTables {
                path: path.to_owned(),
            })?;
        // SAFETY: the vDSO is mapped readable in this process for its whole life.
        let image = unsafe {
            std::slice::from_raw_parts(mapping.lo as *const u8, (mapping.hi - mapping.lo) as usize)
        };
        Self::parse(path, Arc::new(Image::Copied(image.to_vec())))
    }

    fn parse(path: &str, image: Arc<Image>) -> Result<Self, UnwindError> {
        let elf = object::File::parse(&**image).map_err(|source| UnwindError::Parse {
            path: path.to_owned(),
            source,
        })?;
        // Sections are used in place: stored uncompressed, inside the image.
        let section = |name: &str| {
            let s = elf.section_by_name(name)?;
            let stored = s.compressed_file_range().ok()?;
            if stored.format != object::CompressionFormat::None {
                return None;
            }
            let at = usize::try_from(stored.offset).ok()?;
            let end = at.checked_add(usize::try_from(stored.compressed_size).ok()?)?;
            (end <= image.len()).then(|| {
                (
                    s.address()..s.address() + s.size(),
                    Section(image.clone(), at..end),
                )
            })
        };
        let range = |name: &str| {
            elf.section_by_name(name)
                .map(|s| s.address()..s.address() + s.size())
        };
        let tables = Self {
            eh_frame: section(".eh_frame"),
            eh_frame_hdr: section(".eh_frame_hdr"),
            debug_frame: section(".debug_frame").map(|(_, d)| d),
            text: range(".text"),
            got: range(".got"),
            segments: elf
                .segments()
                .map(|s| {
                    let (offset, size) = s.file_range();
                    (offset, s.address(), size)
                })
                .collect(),
        };
        if tables.eh_frame.is_none() && tables.debug_frame.is_none() {
            return Err(UnwindError::NoUnwindTables {
                path: path.to_owned(),
            });
        }
        Ok(tables)
    }

    /// Where address 0 of the file's address space is in a process that maps file `offset` at
    /// `lo`, if a loadable segment holds that offset. Two segments can share a page (the text
    /// mapping of a file whose segments are not page-aligned in it starts inside the read-only
    /// segment before): the mapping is the later one's.
    fn load_bias(&self, lo: u64, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .filter(|(off, _, size)| (off & !0xfff..off + size).contains(&offset))
            .max_by_key(|(off, _, _)| *off)
            .map(|(off, vaddr, _)| {
                lo.wrapping_sub(offset)
                    .wrapping_add(*off)
                    .wrapping_sub(*vaddr)
            })
    }

    fn module(&self, name: String, avma: Range<u64>, bias: u64) -> Module<Section> {
        Module::new(
            name,
            avma,
            bias,
            ExplicitModuleSectionInfo {
                base_svma: 0,
                text_svma: self.text.clone(),
                got_svma: self.got.clone(),
                eh_frame_svma: self.eh_frame.as_ref().map(|(r, _)| r.clone()),
                eh_frame: self.eh_frame.as_ref().map(|(_, d)| d.clone()),
                eh_frame_hdr_svma: self.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
                eh_frame_hdr: self.eh_frame_hdr.as_ref().map(|(_, d)| d.clone()),
                debug_frame: self.debug_frame.clone(),
                ..Default::default()
            },
        )
    }
}

struct ProcessUnwinder {
    unwinder: UnwinderNative<Section, MayAllocateDuringUnwind>,
    cache: CacheNative<MayAllocateDuringUnwind>,
    built: Instant,
    /// Keys of `Unwinders::files` it uses.
    files: Vec<(u64, String)>,
}

/// A process's modules are listed again after this, so libraries it loaded since (dlopen,
/// extension modules imported late) get their tables. Only the span sampler's unwinders live
/// that long; a capture's are dropped at its end.
const REFRESH: Duration = Duration::from_secs(30);

/// The registers framehop starts from. Only x86_64's kernel side copies stacks (elsewhere the
/// kernel walks frame pointers), so other architectures never get here.
#[cfg(target_arch = "x86_64")]
fn registers(copy: &StackCopy) -> UnwindRegsNative {
    UnwindRegsNative::new(copy.ip, copy.sp, copy.bp)
}

#[cfg(target_arch = "aarch64")]
fn registers(copy: &StackCopy) -> UnwindRegsNative {
    UnwindRegsNative::new(0, copy.sp, copy.bp)
}

/// Unwinders of the sampled processes: a capture's (dropped with it) or the span sampler's
/// (kept, see `retain` and `REFRESH`).
#[derive(Default)]
pub struct Unwinders {
    /// By (inode, path): `None` for a file that cannot be used (said once in `notes`).
    files: HashMap<(u64, String), Option<Arc<FileTables>>>,
    procs: HashMap<u32, ProcessUnwinder>,
    /// Files whose frames fall back to frame pointers, and why.
    pub notes: Vec<String>,
}

impl Unwinders {
    /// Forgets the processes `keep` refuses, and the files no remaining process maps.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.procs.retain(|pid, _| keep(*pid));
        let used: std::collections::HashSet<&(u64, String)> =
            self.procs.values().flat_map(|p| &p.files).collect();
        self.files.retain(|k, _| used.contains(k));
    }

    fn process(&mut self, pid: u32) -> &mut ProcessUnwinder {
        if self
            .procs
            .get(&pid)
            .is_some_and(|p| p.built.elapsed() > REFRESH)
        {
            self.procs.remove(&pid);
        }
        if !self.procs.contains_key(&pid) {
            let mut unwinder = UnwinderNative::new();
            let mut files = Vec::new();
            for m in crate::procmaps::read(pid) {
                let vdso = m.path == "[vdso]";
                if !m.perms.contains('x') || !(m.path.starts_with('/') || vdso) {
                    continue;
                }
                let key = (m.inode, m.path.clone());
                files.push(key.clone());
                let tables = self
                    .files
                    .entry(key)
                    .or_insert_with(|| {
                        if vdso {
                            return FileTables::vdso().ok().map(Arc::new);
                        }
                        let map_file = format!("/proc/{pid}/map_files/{:x}-{:x}", m.lo, m.hi);
                        let opened = File::open(&map_file).map_err(|source| UnwindError::Open {
                            path: m.path.clone(),
                            source,
                        });
                        match opened.and_then(|f| FileTables::read(&m.path, &f)) {
                            Ok(t) => Some(Arc::new(t)),
                            Err(e) => {
                                self.notes.push(e.to_string());
                                None
                            }
                        }
                    })
                    .clone();
                let Some(tables) = tables else { continue };
                if let Some(bias) = tables.load_bias(m.lo, m.offset) {
                    unwinder.add_module(tables.module(m.path.clone(), m.lo..m.hi, bias));
                }
            }
            self.procs.insert(
                pid,
                ProcessUnwinder {
                    unwinder,
                    cache: CacheNative::new(),
                    built: Instant::now(),
                    files,
                },
            );
        }
        self.procs.get_mut(&pid).expect("inserted above")
    }

    /// The return addresses of `copy`'s user stack, innermost first, starting with the
    /// interrupted instruction; empty when the kernel had no user registers for it.
    pub fn unwind(&mut self, copy: &StackCopy) -> Vec<u64> {
        if copy.ip == 0 {
            return Vec::new();
        }
        let p = self.process(copy.tgid);
        let stack = &copy.stack[..(copy.len as usize).min(STACK_COPY_BYTES)];
        let base = copy.sp;
        // What was not copied ends the walk: the outer frames of a deep stack are cut.
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let at = usize::try_from(addr.checked_sub(base).ok_or(())?).map_err(|_| ())?;
            let word = stack.get(at..at + 8).ok_or(())?;
            Ok(u64::from_le_bytes(word.try_into().map_err(|_| ())?))
        };
        let mut frames = Vec::new();
        let mut it =
            p.unwinder
                .iter_frames(copy.ip, registers(copy), &mut p.cache, &mut read_stack);
        while frames.len() < MAX_FRAMES {
            match it.next() {
                Ok(Some(FrameAddress::InstructionPointer(ip))) => frames.push(ip),
                // Return addresses as the kernel's stack map has them, for one symbolization.
                Ok(Some(FrameAddress::ReturnAddress(ra))) => frames.push(ra.get()),
                Ok(None) | Err(_) => break,
            }
        }
        frames
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// What the kernel side sends, made of this thread's registers and stack where it is
    /// called. Never inlined: the caller's return address must follow.
    #[inline(never)]
    fn copy_of_this_stack() -> Box<StackCopy> {
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads registers only.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]",
                "mov {sp}, rsp",
                "mov {bp}, rbp",
                ip = out(reg) ip,
                sp = out(reg) sp,
                bp = out(reg) bp,
            );
        }
        // Up to the end of the stack's mapping, as the kernel side copies.
        let end = crate::procmaps::read(std::process::id())
            .into_iter()
            .find(|m| (m.lo..m.hi).contains(&sp))
            .map_or(sp, |m| m.hi);
        let len = ((end - sp) as usize).min(STACK_COPY_BYTES);
        // Straight on the heap: a StackCopy built on the stack would be most of this frame,
        // and put the return address past what is copied.
        // SAFETY: StackCopy is plain data; all zeroes is a valid value.
        let mut copy: Box<StackCopy> = unsafe { Box::new_zeroed().assume_init() };
        copy.tgid = std::process::id();
        copy.kernel_stack = -1;
        (copy.ip, copy.sp, copy.bp, copy.len) = (ip, sp, bp, len as u64);
        // SAFETY: sp..sp + len is this thread's mapped stack, above this frame; the copy is
        // on the heap.
        unsafe { std::ptr::copy_nonoverlapping(sp as *const u8, copy.stack.as_mut_ptr(), len) };
        copy
    }

    #[inline(never)]
    fn caller() -> Box<StackCopy> {
        let copy = copy_of_this_stack();
        std::hint::black_box(copy)
    }

    #[test]
    fn unwinds_this_process_from_a_copy_of_its_stack() {
        let copy = caller();
        let mut unwinders = Unwinders::default();
        let frames = unwinders.unwind(&copy);
        assert!(unwinders.notes.is_empty(), "{:?}", unwinders.notes);
        // The interrupted instruction, then the return address into `caller`, then into this
        // test: the unwind tables of the test binary, at the address it is loaded at.
        let within = |ip: u64, f: usize| (f as u64..f as u64 + 0x400).contains(&ip);
        assert!(frames.len() > 3, "{frames:x?}");
        assert!(
            within(frames[0], copy_of_this_stack as *const () as usize),
            "{frames:x?}"
        );
        assert!(
            within(frames[1], caller as *const () as usize),
            "{frames:x?}"
        );
        assert!(
            within(
                frames[2],
                unwinds_this_process_from_a_copy_of_its_stack as *const () as usize
            ),
            "{frames:x?}"
        );
    }

    /// rustc's binaries: the text segment starts mid-page in the file, right after the
    /// read-only one, so the text mapping's first page holds the end of both.
    #[test]
    fn the_bias_of_a_text_mapping_comes_from_the_text_segment() {
        let tables = FileTables {
            eh_frame: None,
            eh_frame_hdr: None,
            debug_frame: None,
            text: None,
            got: None,
            segments: vec![(0, 0, 0x47_8310), (0x47_8310, 0x47_9310, 0xc2_a2f0)],
        };
        let lo = 0x5565_1327_4000;
        assert_eq!(tables.load_bias(lo, 0x47_8000), Some(lo - 0x47_9000));
        assert_eq!(tables.load_bias(lo, 0x200_0000), None);
    }

    #[test]
    fn the_vdso_has_unwind_tables() {
        let vdso = FileTables::vdso().expect("the vDSO parses");
        assert!(vdso.eh_frame.as_ref().is_some_and(|(_, d)| !d.is_empty()));
        assert_eq!(vdso.load_bias(0x7fff_0000_0000, 0), Some(0x7fff_0000_0000));
    }

    #[test]
    fn a_file_that_is_not_elf_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-elf.so");
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        let path = path.to_str().unwrap();
        let Err(e) = FileTables::read(path, &File::open(path).unwrap()) else {
            panic!("a shell script parsed as ELF");
        };
        let e = e.to_string();
        assert!(e.contains(path) && e.contains("not an ELF file"), "{e}");
    }

    #[test]
    fn a_copy_without_registers_has_no_frames() {
        let mut copy = caller();
        copy.ip = 0;
        assert!(Unwinders::default().unwind(&copy).is_empty());
    }
}
