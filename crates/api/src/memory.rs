//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps what a burst freed (the garbage of parsing a large
//! configuration, a thousand pushes) in its arenas, so a process's RSS would stay at
//! the burst's peak. The control plane and the proxy call [`trim`] once a burst is
//! over. Shared here, the one crate both depend on, so the workspace's single
//! `unsafe` block lives in one place.

/// Returns free heap pages to the system (glibc's `malloc_trim`). Takes a few
/// milliseconds: call it on a blocking thread, never on the request path.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only walks the allocator's own free lists under its locks;
    // it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}
