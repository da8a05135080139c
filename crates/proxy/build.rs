//! Release builds link `sinew-proxy` with the functions it runs placed together, in
//! the order of `symbol-order.txt` (made by `scripts/gen-symbol-order`): code is held
//! in memory a page at a time, in 64 KiB blocks around each fault, so the ~1.4 MB a
//! sidecar runs costs about that much resident instead of most of its ~8 MB of code.
//!
//! Only where Rust links with LLD by default (x86_64 Linux, GNU): the option is
//! LLD's. Symbols the list names but the build lacks are skipped silently, and
//! functions it does not name follow in the usual order, so a stale list costs
//! memory, never correctness. `SINEW_NO_SYMBOL_ORDER=1` turns it off.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=symbol-order.txt");
    println!("cargo:rerun-if-env-changed=SINEW_NO_SYMBOL_ORDER");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let lld_target = std::env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    if !release || !lld_target || std::env::var_os("SINEW_NO_SYMBOL_ORDER").is_some() {
        return;
    }
    let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") else {
        return;
    };
    let list = Path::new(&dir).join("symbol-order.txt");
    if list.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=sinew-proxy=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        println!("cargo:rustc-link-arg-bin=sinew-proxy=-Wl,--no-warn-symbol-ordering");
    }
}
