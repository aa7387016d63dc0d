//! Rebuild the eBPF object when bpf-linker changes: cargo cannot see that dependency; and tell
//! the code which architecture's kernel it runs on.
fn main() {
    // `bpf_target_arch`: which pt_regs layout the user registers are read with (unwind.rs).
    aya_build::emit_bpf_target_arch_cfg().expect("bpf_target_arch cfg");
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
