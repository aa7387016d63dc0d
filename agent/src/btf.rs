//! Struct member offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! aya's Rust eBPF programs have no CO-RE field relocations, so the offsets of the few
//! `task_struct` fields the programs read are looked up here and handed to them as load-time
//! globals. This reads only what that needs: the type section's records, by id, and struct and
//! union members (following anonymous members, which the kernel uses for unions in
//! `task_struct`). aya parses BTF too but keeps its type lookups private; btf-rs is LGPL.
use std::{borrow::Cow, path::Path};

use thiserror::Error;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error(
        "cannot read kernel BTF {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF=y, and a \
         container must see the host's /sys/kernel/btf through a hostPath mount)"
    )]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "malformed BTF in {path}: {reason} (it should be the kernel's own type information: a \
         container must see the host's /sys/kernel/btf, e.g. through a hostPath mount)"
    )]
    Malformed { path: String, reason: &'static str },
    #[error("struct {name} not found in kernel BTF")]
    NoStruct { name: String },
    #[error("struct {strukt} has none of the fields {fields:?} in kernel BTF")]
    NoMember {
        strukt: String,
        fields: Vec<&'static str>,
    },
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// Kernel BTF, indexed by type id.
pub struct KernelBtf {
    path: String,
    data: Vec<u8>,
    types_start: usize,
    strings: std::ops::Range<usize>,
    /// Byte offset of each type record in `data`; index = type id (0 is `void`).
    offsets: Vec<usize>,
}

struct TypeRecord {
    name_off: u32,
    kind: u32,
    kflag: bool,
    vlen: usize,
    size_or_type: u32,
    body: usize,
}

impl KernelBtf {
    pub fn load(path: impl AsRef<Path>) -> Result<Self, BtfError> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(path.display().to_string(), data)
    }

    fn parse(path: String, data: Vec<u8>) -> Result<Self, BtfError> {
        let bad = |reason| BtfError::Malformed {
            path: path.clone(),
            reason,
        };
        if data.len() < 24 {
            return Err(bad("shorter than its header"));
        }
        if u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(bad("bad magic (not little-endian BTF)"));
        }
        let word = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
        let hdr_len = word(4) as usize;
        let (type_off, type_len) = (word(8) as usize, word(12) as usize);
        let (str_off, str_len) = (word(16) as usize, word(20) as usize);
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if types_end > data.len() || strings.end > data.len() {
            return Err(bad("section runs past the end of the file"));
        }

        let mut offsets = vec![0usize];
        let mut at = types_start;
        while at < types_end {
            if at + 12 > types_end {
                return Err(bad("truncated type record"));
            }
            offsets.push(at);
            let info = word(at + 4);
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(bad("unknown type kind")),
            };
            at += 12 + extra;
        }
        Ok(Self {
            path,
            data,
            types_start,
            strings,
            offsets,
        })
    }

    fn word(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.data[at..at + 4].try_into().expect("4 bytes"))
    }

    fn record(&self, id: u32) -> Option<TypeRecord> {
        let at = *self.offsets.get(id as usize)?;
        if id == 0 || at < self.types_start {
            return None;
        }
        let info = self.word(at + 4);
        Some(TypeRecord {
            name_off: self.word(at),
            kind: (info >> 24) & 0x1f,
            kflag: info >> 31 == 1,
            vlen: (info & 0xffff) as usize,
            size_or_type: self.word(at + 8),
            body: at + 12,
        })
    }

    fn name(&self, off: u32) -> Cow<'_, str> {
        let start = self.strings.start + off as usize;
        if start >= self.strings.end {
            return Cow::Borrowed("");
        }
        let bytes = &self.data[start..self.strings.end];
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end])
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.record(id) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type;
                }
                _ => break,
            }
        }
        id
    }

    fn struct_id(&self, name: &str) -> Option<u32> {
        (1..self.offsets.len() as u32).find(|&id| {
            self.record(id).is_some_and(|t| {
                t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off) == name
            })
        })
    }

    /// Byte offset of `member` in the struct or union `id`, looking inside anonymous members.
    fn member_in(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        let t = self.record(id)?;
        if depth > 8 || !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for i in 0..t.vlen {
            let at = t.body + i * 12;
            let (name_off, type_id, raw) = (self.word(at), self.word(at + 4), self.word(at + 8));
            let bits = if t.kflag { raw & 0x00ff_ffff } else { raw };
            if name_off == 0 {
                if let Some(inner) = self.member_in(self.resolve(type_id), member, depth + 1) {
                    return Some(bits / 8 + inner);
                }
            } else if self.name(name_off) == member {
                return Some(bits / 8);
            }
        }
        None
    }

    /// Byte offset of the first of `fields` that `strukt` has (fields renamed across kernel
    /// versions are given newest first).
    pub fn member_offset(&self, strukt: &str, fields: &[&'static str]) -> Result<u32, BtfError> {
        let id = self.struct_id(strukt).ok_or_else(|| BtfError::NoStruct {
            name: strukt.to_owned(),
        })?;
        fields
            .iter()
            .find_map(|f| self.member_in(id, f, 0))
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.to_owned(),
                fields: fields.to_vec(),
            })
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

/// The `task_struct` offsets the eBPF programs need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskOffsets {
    pub pid: u32,
    pub tgid: u32,
    pub state: u32,
    /// The thread pointer register saved in the task (`thread.fsbase`, x86_64), or 0 where this
    /// kernel has none: only walking CPython 3.10 stacks needs it.
    pub fsbase: u32,
    /// `se.cfs_rq`, `cfs_rq.rq` and `rq.clock`: the scheduler's own clock of a task's run queue,
    /// read with three loads instead of a clock helper call. All 0 where this kernel lacks one
    /// of them (no `CONFIG_FAIR_GROUP_SCHED`); the programs then read `bpf_ktime_get_ns`.
    pub cfs_rq: u32,
    pub rq: u32,
    pub rq_clock: u32,
    /// `sched_info.run_delay`, `.pcount`, `.last_arrival` and `.last_queued` (CONFIG_SCHED_INFO):
    /// the scheduler's own accounting of a task's run-queue waits, which the scheduler probe
    /// reads instead of timing wakeups itself. None where this kernel has no `sched_info`.
    pub sched_info: Option<SchedInfoOffsets>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedInfoOffsets {
    pub run_delay: u32,
    pub pcount: u32,
    pub last_arrival: u32,
    pub last_queued: u32,
}

impl TaskOffsets {
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, BtfError> {
        Ok(Self {
            pid: btf.member_offset("task_struct", &["pid"])?,
            tgid: btf.member_offset("task_struct", &["tgid"])?,
            // Renamed in 5.14.
            state: btf.member_offset("task_struct", &["__state", "state"])?,
            fsbase: btf
                .member_offset("task_struct", &["thread"])
                .and_then(|t| Ok(t + btf.member_offset("thread_struct", &["fsbase"])?))
                .unwrap_or(0),
            cfs_rq: 0,
            rq: 0,
            rq_clock: 0,
            sched_info: SchedInfoOffsets::from_btf(btf)
                .map_err(|e| tracing::info!("no sched_info in this kernel's tasks ({e})"))
                .ok(),
        }
        .with_rq_clock(btf))
    }

    /// Why the scheduler probe cannot run on this kernel, if it cannot: it reads the scheduler's
    /// per-task wait accounting, on the run queue's clock that this accounting keeps.
    pub fn sched_probe_unavailable(&self) -> Option<&'static str> {
        if self.sched_info.is_none() {
            Some(
                "this kernel's BTF has no task_struct.sched_info (a kernel built without \
                 CONFIG_SCHED_INFO, which CONFIG_SCHEDSTATS and CONFIG_TASK_DELAY_ACCT select): \
                 the run-queue probe reads the scheduler's own per-task wait accounting",
            )
        } else if self.cfs_rq == 0 {
            Some(
                "this kernel's BTF has no way from a task to its run queue's clock (a kernel \
                 built without CONFIG_FAIR_GROUP_SCHED): the run-queue probe times on that clock",
            )
        } else {
            None
        }
    }

    fn with_rq_clock(mut self, btf: &KernelBtf) -> Self {
        let found = (|| -> Result<_, BtfError> {
            let se = btf.member_offset("task_struct", &["se"])?;
            Ok((
                se + btf.member_offset("sched_entity", &["cfs_rq"])?,
                btf.member_offset("cfs_rq", &["rq"])?,
                btf.member_offset("rq", &["clock"])?,
            ))
        })();
        match found {
            Ok((cfs_rq, rq, rq_clock)) => {
                self.cfs_rq = cfs_rq;
                self.rq = rq;
                self.rq_clock = rq_clock;
            }
            Err(e) => tracing::info!(
                "no way from a task to its run queue's clock in this kernel ({e}); the \
                 scheduler programs read bpf_ktime_get_ns instead"
            ),
        }
        self
    }
}

impl SchedInfoOffsets {
    fn from_btf(btf: &KernelBtf) -> Result<Self, BtfError> {
        let base = btf.member_offset("task_struct", &["sched_info"])?;
        let at = |name: &'static str| {
            Ok::<_, BtfError>(base + btf.member_offset("sched_info", &[name])?)
        };
        Ok(Self {
            run_delay: at("run_delay")?,
            pcount: at("pcount")?,
            last_arrival: at("last_arrival")?,
            last_queued: at("last_queued")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made BTF blob: int, struct inner { u32 a; u32 b; }, struct outer { u64 x;
    /// union/anon { struct inner; } ; u32 tail; } with a typedef in between.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0outer\0x\0tail\0inner_t\0";
        let s = |name: &str| -> u32 {
            let pos = strings
                .windows(name.len() + 2)
                .position(|w| {
                    w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0
                })
                .unwrap();
            (pos + 1) as u32
        };
        let mut types: Vec<u32> = Vec::new();
        // 1: int, size 4
        types.extend([s("int"), 1 << 24, 4, 32]);
        // 2: struct inner { a @0, b @32 bits }
        types.extend([s("inner"), (4 << 24) | 2, 8]);
        types.extend([s("a"), 1, 0, s("b"), 1, 32]);
        // 3: typedef inner_t -> 2
        types.extend([s("inner_t"), 8 << 24, 2]);
        // 4: struct outer { x @0, anon(inner_t) @64, tail @128 } with kflag (bitfield encoding)
        types.extend([s("outer"), (1 << 31) | (4 << 24) | 3, 20]);
        types.extend([s("x"), 1, 0, 0, 3, 64, s("tail"), 1, 128]);
        let type_bytes: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for w in [
            24u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(w.to_le_bytes());
        }
        out.extend(type_bytes);
        out.extend(strings);
        out
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = KernelBtf::parse("blob".into(), blob()).unwrap();
        assert_eq!(btf.member_offset("outer", &["x"]).unwrap(), 0);
        assert_eq!(btf.member_offset("outer", &["a"]).unwrap(), 8);
        assert_eq!(btf.member_offset("outer", &["b"]).unwrap(), 12);
        assert_eq!(btf.member_offset("outer", &["nope", "tail"]).unwrap(), 16);
    }

    #[test]
    fn errors_name_what_is_missing() {
        let btf = KernelBtf::parse("blob".into(), blob()).unwrap();
        let err = btf
            .member_offset("outer", &["missing"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("outer") && err.contains("missing"), "{err}");
        let err = btf
            .member_offset("nostruct", &["x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nostruct"), "{err}");
        let err = KernelBtf::parse("f".into(), vec![0; 30])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("bad magic"), "{err}");
    }

    /// The offsets from the running kernel agree with bpftool's dump of the same BTF.
    #[test]
    fn task_offsets_match_bpftool() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("SKIP: {VMLINUX} absent (kernel without CONFIG_DEBUG_INFO_BTF)");
            return;
        }
        let ours = TaskOffsets::from_btf(&KernelBtf::load(VMLINUX).unwrap()).unwrap();
        let out = std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", VMLINUX, "format", "raw"])
            .output()
            .expect("bpftool not found: run `cargo xtask setup`");
        let text = String::from_utf8_lossy(&out.stdout);
        let (mut in_task, mut in_sched_info) = (false, false);
        let mut found = std::collections::HashMap::new();
        let mut sched_info = std::collections::HashMap::new();
        for line in text.lines() {
            if line.starts_with('[') {
                in_task = line.contains(" STRUCT 'task_struct' ") && !line.contains("vlen=0");
                in_sched_info = line.contains(" STRUCT 'sched_info' ") && !line.contains("vlen=0");
                continue;
            }
            let (fields, into): (&[&'static str], _) = if in_task {
                (&["pid", "tgid", "__state", "sched_info"], &mut found)
            } else if in_sched_info {
                (
                    &["run_delay", "pcount", "last_arrival", "last_queued"],
                    &mut sched_info,
                )
            } else {
                continue;
            };
            for field in fields {
                if line.trim_start().starts_with(&format!("'{field}' ")) {
                    let bits: u32 = line
                        .split("bits_offset=")
                        .nth(1)
                        .unwrap()
                        .trim()
                        .parse()
                        .unwrap();
                    into.insert(*field, bits / 8);
                }
            }
        }
        let base = found["sched_info"];
        assert_eq!(
            ours.sched_info,
            Some(SchedInfoOffsets {
                run_delay: base + sched_info["run_delay"],
                pcount: base + sched_info["pcount"],
                last_arrival: base + sched_info["last_arrival"],
                last_queued: base + sched_info["last_queued"],
            }),
            "sched_info: bpftool {found:?} {sched_info:?}"
        );
        assert_eq!(ours.sched_probe_unavailable(), None);
        assert_eq!(
            found.get("pid"),
            Some(&ours.pid),
            "pid: bpftool {found:?} vs ours {ours:?}"
        );
        assert_eq!(
            found.get("tgid"),
            Some(&ours.tgid),
            "tgid: bpftool {found:?} vs ours {ours:?}"
        );
        assert_eq!(
            found.get("__state"),
            Some(&ours.state),
            "state: bpftool {found:?} vs ours {ours:?}"
        );
    }

    /// Without the scheduler's wait accounting, or without the way to the run queue's clock it
    /// is kept in, the scheduler probe is left out, saying which kernel option it needs.
    #[test]
    fn the_scheduler_probe_names_the_kernel_option_it_misses() {
        let mut offsets = TaskOffsets {
            pid: 1,
            tgid: 2,
            state: 3,
            fsbase: 0,
            cfs_rq: 8,
            rq: 16,
            rq_clock: 24,
            sched_info: Some(SchedInfoOffsets {
                run_delay: 32,
                pcount: 40,
                last_arrival: 48,
                last_queued: 56,
            }),
        };
        assert_eq!(offsets.sched_probe_unavailable(), None);
        offsets.cfs_rq = 0;
        assert!(
            offsets
                .sched_probe_unavailable()
                .is_some_and(|why| why.contains("CONFIG_FAIR_GROUP_SCHED"))
        );
        offsets.sched_info = None;
        assert!(
            offsets
                .sched_probe_unavailable()
                .is_some_and(|why| why.contains("CONFIG_SCHED_INFO"))
        );
    }
}
