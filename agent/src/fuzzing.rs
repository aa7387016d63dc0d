//! Entry points for the cargo-fuzz targets in fuzz/ (and nothing else): each feeds arbitrary
//! bytes to a parser the agent exposes to the outside, the way the agent itself calls it. A
//! panic, an abort or a sanitizer report is a bug; refusals are the expected answer.
use std::path::Path;

/// The config file parser and every check after it.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    if let Err(e) = crate::config::Config::from_text(Some(text), Some(path), &[], None) {
        let msg = e.to_string();
        assert!(
            msg.contains("fuzz.toml") || msg.contains("selector") || msg.contains("target"),
            "a config error that names nothing: {msg}"
        );
    }
}

/// `--target` selectors (`comm:`, `cmdline:`, `pid:`, `cgroup:`, `k8s:`).
pub fn selector(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<crate::targets::Selector>();
    }
}

/// An OTLP/HTTP body; the first byte says whether it claims gzip.
pub fn otlp(data: &[u8]) {
    if let Some((flag, body)) = data.split_first() {
        crate::spans::otlp::Intake::fuzz_take(body, flag & 1 == 1);
    }
}

/// A control-socket request line.
pub fn control(data: &[u8]) {
    if let Ok(line) = std::str::from_utf8(data) {
        crate::control::fuzz_request(line);
    }
}
