#!/usr/bin/env bash
# Regenerate crates/api/src/gen/*.rs from proto/*.proto.
#
# The generated code is committed so that building sinew-api needs neither
# protoc nor a build script. Run this script after editing a .proto file.
#
# Requirements: cargo, and protoc on PATH (or PROTOC=/path/to/protoc).
# It builds a throwaway generator crate (tonic-prost-build 0.14) in a temp dir.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
crate="$(dirname "$here")"
out="$crate/src/gen"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

export PROTOC="${PROTOC:-$(command -v protoc)}"

mkdir -p "$work/src" "$out"
cat >"$work/Cargo.toml" <<'TOML'
[package]
name = "sinew-api-protogen"
version = "0.0.0"
edition = "2024"
publish = false

[workspace]

[dependencies]
tonic-prost-build = { version = "0.14", default-features = false, features = ["transport"] }
TOML

cat >"$work/src/main.rs" <<'RS'
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let proto_dir = args.next().ok_or("missing proto dir")?;
    let out_dir = args.next().ok_or("missing out dir")?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(&out_dir)
        .compile_protos(&[format!("{proto_dir}/sinew.proto"), format!("{proto_dir}/demo.proto")], &[proto_dir])?;
    Ok(())
}
RS

cargo run --quiet --manifest-path "$work/Cargo.toml" -- "$here" "$out"
rustfmt --edition 2024 "$out"/*.rs
echo "wrote $out"
