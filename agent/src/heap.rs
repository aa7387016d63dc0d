//! The agent's heap after its bursts of work.
//!
//! Start-up parses the kernel's BTF twice (5.5 MB raw here: the loader's offsets and aya's
//! program loading), and a capture unwinds, symbolizes and folds thousands of stacks; both free
//! nearly all of it when done. glibc keeps freed heap mapped wherever a live allocation sits
//! above it, so without a trim the agent's RSS stays at its high-water mark: 39 MB after
//! start-up with 10 targets (13 MB trimmed, with the BTF dropped; /proc/PID/status of a release
//! build), and 52 MB after a 10 s capture of 20 Python processes (19 MB trimmed, `cargo xtask
//! bench --only footprint`).

/// Returns the allocator's free pages to the kernel. Cheap next to the work before it (a walk of
/// the free lists); not for hot paths.
pub fn release_free() {
    #[cfg(target_env = "gnu")]
    // SAFETY: no preconditions; it only gives back pages of the allocator's free chunks.
    unsafe {
        libc::malloc_trim(0);
    }
}
