//! tracefs: classic tracepoints attach through it (and reference tools need it), but a fresh
//! machine or a container may not have it mounted. The agent mounts it when it can and says how
//! otherwise; its own BTF tracepoints do not need it.
use std::path::{Path, PathBuf};

use thiserror::Error;

pub const TRACEFS: &str = "/sys/kernel/tracing";
const LEGACY: &str = "/sys/kernel/debug/tracing";

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "cannot read the format of tracepoint {event} at {path}: {source} (is tracefs mounted?)"
    )]
    Format {
        event: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint {event} has no field `{field}` on this kernel")]
    NoField { event: String, field: &'static str },
    #[error(
        "field `{field}` of tracepoint {event} ends at byte {end}, past the {limit} bytes its \
         program copies on this kernel (the record's length in 8-byte words, at most \
         agent_common::tcp::*_RECORD_BYTES): this kernel's layout is not supported"
    )]
    BeyondRecord {
        event: String,
        field: &'static str,
        end: u32,
        limit: u32,
    },
    #[error(
        "tracefs is not mounted and mounting it at {path} failed: {source}. Mount it on the host \
         (`mount -t tracefs nodev {path}`) or mount the host's {path} into the agent's container"
    )]
    Mount {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// How tracefs was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracefs {
    Mounted(PathBuf),
    /// It was not mounted; the agent mounted it.
    MountedNow(PathBuf),
}

/// Where tracefs is mounted, from a /proc/mounts-formatted text.
fn find_in(mounts: &str) -> Option<PathBuf> {
    let points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "tracefs").then_some(point)
        })
        .collect();
    [TRACEFS, LEGACY]
        .into_iter()
        .find(|p| points.contains(p))
        .map(PathBuf::from)
}

pub fn find() -> Option<PathBuf> {
    find_in(&std::fs::read_to_string("/proc/mounts").unwrap_or_default())
}

pub fn ensure_mounted() -> Result<Tracefs, TracefsError> {
    if let Some(p) = find() {
        return Ok(Tracefs::Mounted(p));
    }
    mount(Path::new(TRACEFS)).map_err(|source| TracefsError::Mount {
        path: TRACEFS,
        source,
    })?;
    Ok(Tracefs::MountedNow(PathBuf::from(TRACEFS)))
}

fn mount(path: &Path) -> std::io::Result<()> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _};
    let target = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A field of a tracepoint's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Field {
    offset: u32,
    size: u32,
}

/// A tracepoint's record layout (its tracefs format file), and how much of the record its
/// program copies: the record's length in 8-byte words, at most what the program holds (the
/// kernel refuses to attach a tracepoint program that may read past its record).
#[derive(Debug)]
pub struct Format {
    event: String,
    fields: std::collections::HashMap<String, Field>,
    copied: u32,
}

impl Format {
    /// The format of tracepoint `category/name`, whose program copies at most `max_copied` bytes.
    pub fn read(category: &str, name: &str, max_copied: u32) -> Result<Self, TracefsError> {
        let root = find().unwrap_or_else(|| PathBuf::from(TRACEFS));
        let path = root.join("events").join(category).join(name).join("format");
        let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::Format {
            event: format!("{category}/{name}"),
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::parse(format!("{category}/{name}"), &text, max_copied))
    }

    /// Parses `field:TYPE NAME[N];\toffset:O;\tsize:S;...` lines.
    pub(crate) fn parse(event: String, text: &str, max_copied: u32) -> Self {
        let fields: std::collections::HashMap<String, Field> = text
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                let decl = l.strip_prefix("field:")?.split(';').next()?;
                let name = decl
                    .split_whitespace()
                    .last()?
                    .split('[')
                    .next()?
                    .trim_start_matches('*');
                let number = |key: &str| l.split(key).nth(1)?.split(';').next()?.parse().ok();
                let field = Field {
                    offset: number("offset:")?,
                    size: number("size:")?,
                };
                Some((name.to_owned(), field))
            })
            .collect();
        let end = fields
            .values()
            .map(|f| f.offset.saturating_add(f.size))
            .max()
            .unwrap_or(0);
        Self {
            event,
            fields,
            copied: end.min(max_copied) / 8 * 8,
        }
    }

    /// 8-byte words of the record its program copies.
    pub fn copied_words(&self) -> u32 {
        self.copied / 8
    }

    /// Offset of `field`, which must end within the part of the record its program copies.
    pub fn offset(&self, field: &'static str) -> Result<u32, TracefsError> {
        let f = self
            .fields
            .get(field)
            .ok_or_else(|| TracefsError::NoField {
                event: self.event.clone(),
                field,
            })?;
        let end = f.offset.saturating_add(f.size);
        if end > self.copied {
            return Err(TracefsError::BeyondRecord {
                event: self.event.clone(),
                field,
                end,
                limit: self.copied,
            });
        }
        Ok(f.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_format_files() {
        let f = "name: tcp_probe\nID: 1\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                 \tfield:__u8 saddr[28];\toffset:8;\tsize:28;\tsigned:0;\n\
                 \tfield:const void * skaddr;\toffset:128;\tsize:8;\tsigned:0;\n\nprint fmt: \"x\"\n";
        let m = Format::parse("tcp/tcp_probe".into(), f, 192);
        assert_eq!(m.fields["common_type"], Field { offset: 0, size: 2 });
        assert_eq!(
            m.fields["saddr"],
            Field {
                offset: 8,
                size: 28
            }
        );
        assert_eq!(m.fields["skaddr"].offset, 128);
        let e = m.offset("srtt").unwrap_err().to_string();
        assert!(e.contains("tcp/tcp_probe") && e.contains("srtt"), "{e}");
        assert_eq!(m.offset("skaddr").unwrap(), 128);
        // The record ends at 136: no more is copied, whatever the program could hold.
        assert_eq!(Format::parse("x".into(), f, 160).copied_words(), 17);
        assert_eq!(Format::parse("x".into(), f, 100).copied_words(), 12);
        // A field its program would not copy is a load error, not a silent zero.
        let e = Format::parse("tcp/tcp_probe".into(), f, 132)
            .offset("skaddr")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("skaddr") && e.contains("byte 136") && e.contains("128"),
            "{e}"
        );
    }

    #[test]
    fn finds_mount_points() {
        let m = "proc /proc proc rw 0 0\nnodev /sys/kernel/tracing tracefs rw 0 0\n";
        assert_eq!(find_in(m), Some(PathBuf::from(TRACEFS)));
        let m = "debugfs /sys/kernel/debug debugfs rw 0 0\ntracefs /sys/kernel/debug/tracing tracefs rw 0 0\n";
        assert_eq!(find_in(m), Some(PathBuf::from(LEGACY)));
        assert_eq!(find_in("proc /proc proc rw 0 0\n"), None);
    }
}
