//! The privileges the agent needs, checked before anything is loaded so that a missing one is
//! named instead of surfacing as an EPERM from deep inside a BPF syscall.
use thiserror::Error;

pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error(
        "missing capabilities {missing}: loading eBPF tracing programs needs CAP_BPF and CAP_PERFMON \
         (or CAP_SYS_ADMIN on kernels before 5.8). Run as root (sudo pipeprobe ...), or grant them: \
         `setcap cap_bpf,cap_perfmon,cap_sys_admin+ep pipeprobe`, or in Kubernetes \
         securityContext.capabilities.add: [BPF, PERFMON, SYS_ADMIN]"
    )]
    Missing { missing: String },
    #[error("cannot read the agent's capabilities from /proc/self/status: {0}")]
    Read(#[source] std::io::Error),
}

/// Effective capability bits of this process.
pub fn effective() -> Result<u64, PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(PrivilegeError::Read)?;
    parse_cap_eff(&status).ok_or_else(|| {
        PrivilegeError::Read(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no CapEff line",
        ))
    })
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The capabilities among those needed that `caps` lacks (empty when the agent can load probes).
pub fn missing(caps: u64) -> Vec<&'static str> {
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    if has(CAP_BPF) && has(CAP_PERFMON) {
        return Vec::new();
    }
    if has(CAP_SYS_ADMIN) {
        // Kernels before 5.8 have no CAP_BPF/CAP_PERFMON: CAP_SYS_ADMIN covers both.
        return Vec::new();
    }
    let mut out = Vec::new();
    if !has(CAP_BPF) {
        out.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        out.push("CAP_PERFMON");
    }
    out
}

/// Ok when this process may load and attach the probes.
pub fn require() -> Result<(), PrivilegeError> {
    let missing = missing(effective()?);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing {
            missing: missing.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn names_what_is_missing() {
        assert!(missing(u64::MAX).is_empty());
        assert!(missing(1 << CAP_SYS_ADMIN).is_empty());
        assert!(missing((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_empty());
        assert_eq!(missing(0), ["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing(1 << CAP_BPF), ["CAP_PERFMON"]);
    }
}
