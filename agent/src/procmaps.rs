//! /proc/PID/maps, parsed once for everything that reads a process's mappings (symbolization,
//! finding a Python interpreter).

/// One line of /proc/PID/maps.
pub struct MapLine {
    pub lo: u64,
    pub hi: u64,
    pub perms: String,
    pub offset: u64,
    pub inode: u64,
    /// Empty for anonymous mappings.
    pub path: String,
}

pub fn read(pid: u32) -> Vec<MapLine> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms, offset, _dev, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let path = f.collect::<Vec<_>>().join(" ");
            let (lo, hi) = range.split_once('-')?;
            Some(MapLine {
                lo: u64::from_str_radix(lo, 16).ok()?,
                hi: u64::from_str_radix(hi, 16).ok()?,
                perms: perms.to_owned(),
                offset: u64::from_str_radix(offset, 16).ok()?,
                inode: inode.parse().ok()?,
                path,
            })
        })
        .collect()
}
