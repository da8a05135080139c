//! Release builds made by `scripts/release-build` link `sinew-proxy` with the
//! functions it runs placed together: that script profiles a first build
//! (`scripts/gen-symbol-order`) and builds again with `SINEW_SYMBOL_ORDER` naming the
//! list. Code is held in memory a page at a time, in 64 KiB blocks around each
//! fault, so the ~1.4 MB a sidecar runs costs about that much resident instead of
//! being spread over most of its ~8 MB of code. Measured on 2026-12-05 (fat LTO,
//! standalone sidecar after HTTP/1.1 and HTTP/2 traffic): idle RSS 10.0 -> 7.9 MB,
//! resident code 5.6 -> 3.4 MB.
//!
//! Why the list is made for each build and not kept in the repository: its names
//! carry hashes that change with the code, the dependencies and the toolchain. A list
//! 13 days old matched 290 of its 2,241 functions and saved nothing (9.9 MB).
//!
//! Only where Rust links with LLD by default (x86_64 Linux, GNU): the option is
//! LLD's. Without `SINEW_SYMBOL_ORDER` (a plain `cargo build --release`) functions
//! are laid out in the usual order: more memory, same behaviour.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=SINEW_SYMBOL_ORDER");
    let Some(list) = std::env::var_os("SINEW_SYMBOL_ORDER").filter(|v| !v.is_empty()) else {
        return;
    };
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let lld_target = std::env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    if !release || !lld_target {
        return;
    }
    let list = Path::new(&list);
    if !list.is_file() {
        // A release build asked for an order it cannot have: say so rather than ship
        // a binary that silently holds 2 MB more.
        println!(
            "cargo::error=SINEW_SYMBOL_ORDER={}: not a file (make it with scripts/gen-symbol-order, or use scripts/release-build)",
            list.display()
        );
        return;
    }
    println!("cargo:rerun-if-changed={}", list.display());
    println!(
        "cargo:rustc-link-arg-bin=sinew-proxy=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    // Names the list has but this build lacks (none, when the list was made from this
    // build) would each print a warning.
    println!("cargo:rustc-link-arg-bin=sinew-proxy=-Wl,--no-warn-symbol-ordering");
}
