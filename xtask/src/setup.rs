//! Prerequisites, installed idempotently: each step checks first and is skipped in milliseconds
//! when its tool is there. A step that cannot install says what to run instead.
use std::process::Command;

use anyhow::{Context as _, bail};
use xtask::{exec, is_root, output, succeeds};

/// LLVM major version of the nightly rustc that builds the eBPF crate; bpf-linker must match it.
const LLVM: &str = "22";

/// Debian packages the build and the tests use: the eBPF linker's LLVM, the reference tools
/// the tests compare against (runqlat from libbpf-tools, bpftool), and small utilities.
const LLVM_DEV: (&str, &str) = ("llvm-22-dev", "bpf-linker is built against it");

const PACKAGES: &[(&str, &str)] = &[
    LLVM_DEV,
    ("libbpf-tools", "runqlat, the reference for run-queue delay"),
    ("bpftool", "the reference for kernel BTF offsets"),
    ("curl", "content negotiation test"),
    ("util-linux", "setpriv and unshare for privilege tests"),
    (
        "python3-venv",
        "the venv that holds the Python reference tools (py-spy)",
    ),
    (
        "golang-go",
        "`go tool pprof`, the reference reader of pprof output",
    ),
    (
        "prometheus",
        "promtool: lints the agent's /metrics and unit-tests the alert rules",
    ),
    (
        "openssl",
        "certificates for the fake kubelet's HTTPS in the Kubernetes test",
    ),
];

/// Debian's kubectl (kubernetes-client), unless a kubectl is already there (e.g. Google Cloud
/// SDK's package, which owns the same path).
const KUBECTL: (&str, &str) = (
    "kubernetes-client",
    "kubectl kustomize renders deploy/kubernetes offline in the manifest test",
);

pub fn run() -> anyhow::Result<()> {
    rust_src()?;
    apt(PACKAGES)?;
    if output(Command::new("kubectl").args(["version", "--client"])).is_none() {
        apt(&[KUBECTL])?;
    }
    bpf_linker()?;
    python_tools()?;
    cargo_fuzz()?;
    eprintln!("setup: all prerequisites present");
    Ok(())
}

/// What building the agent needs, without the test tools.
pub fn build_only() -> anyhow::Result<()> {
    rust_src()?;
    apt(&[LLVM_DEV])?;
    bpf_linker()?;
    eprintln!("setup: build prerequisites present");
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => Ok(()),
        Some(_) => exec(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("the eBPF crate builds core from source with nightly: rust-src is required"),
        None => exec(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context(
            "the eBPF crate needs a nightly toolchain (with rust-src); install it with rustup",
        ),
    }
}

fn apt(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(p, _)| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (p, why) in packages.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("setup: installing {p} ({why})");
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {0}. Installing them needs root: run `sudo apt-get install -y {0}` \
             or run `sudo -E cargo xtask setup`",
            missing.join(" ")
        );
    }
    exec(Command::new("apt-get").args(["update", "-qq"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("apt-get could not install {}", missing.join(" ")))
}

fn bpf_linker() -> anyhow::Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map_or_else(
            || {
                std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cargo")
            },
            Into::into,
        )
        .join("bin");
    if succeeds(Command::new(cargo_bin.join("bpf-linker")).arg("--version")) {
        bail!(
            "bpf-linker is installed in {} but that is not on PATH: add it to PATH",
            cargo_bin.display()
        );
    }
    // The default features look for the newest LLVM; ours must match nightly rustc's.
    exec(
        xtask::cargo()
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{LLVM}"))
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM}")),
    )
    .context(format!(
        "building bpf-linker against LLVM {LLVM} failed (needs llvm-{LLVM}-dev)"
    ))
}

/// cargo-fuzz, which builds and runs the libFuzzer targets of fuzz/ (`cargo xtask fuzz`).
fn cargo_fuzz() -> anyhow::Result<()> {
    if succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz (runs the parsers' fuzz targets)");
    exec(xtask::cargo().args(["install", "cargo-fuzz", "--locked", "--version", "0.13.2"]))
        .context("cargo install cargo-fuzz failed")
}

/// Python packages the tests run as references, pinned, in a venv under target/ (cached with
/// the build, and never touching the system's Python).
const PY_TOOLS: &[(&str, &str)] = &[
    (
        "py-spy==0.4.3",
        "the reference Python profiler the Python flamegraph tests compare against",
    ),
    (
        "opentelemetry-sdk==1.39.1",
        "the real OpenTelemetry SDK the span tests export with",
    ),
    (
        "opentelemetry-exporter-otlp-proto-http==1.39.1",
        "its OTLP/HTTP exporter",
    ),
    (
        "opentelemetry-exporter-otlp-proto-grpc==1.39.1",
        "its OTLP/gRPC exporter",
    ),
    (
        "kubernetes-validate==1.37.0",
        "validates the rendered manifests against the Kubernetes schemas, offline",
    ),
    (
        "matplotlib==3.10.7",
        "plots of the dashboards' queries from the Prometheus test's real data",
    ),
];

/// Where `python_tools` installs; the tests look for their tools there too.
fn py_tools_dir() -> std::path::PathBuf {
    xtask::root().join("target").join("py-tools")
}

fn python_tools() -> anyhow::Result<()> {
    let venv = py_tools_dir();
    let pip = venv.join("bin").join("pip");
    let stamp = venv.join("installed.txt");
    let wanted: Vec<&str> = PY_TOOLS.iter().map(|(p, _)| *p).collect();
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted.join("\n")) {
        return Ok(());
    }
    if !pip.exists() {
        exec(Command::new("python3").args(["-m", "venv"]).arg(&venv)).context(
            "creating a Python venv for the test tools failed: install python3 with its venv module",
        )?;
    }
    for (p, why) in PY_TOOLS {
        eprintln!("setup: installing {p} ({why})");
    }
    exec(
        Command::new(&pip)
            .args(["install", "-q", "--disable-pip-version-check"])
            .args(&wanted),
    )
    .with_context(|| format!("pip could not install {} from PyPI", wanted.join(" ")))?;
    std::fs::write(&stamp, wanted.join("\n"))?;
    Ok(())
}
