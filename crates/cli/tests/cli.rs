//! The `sinew` binary as a user runs it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

fn sinew(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn validate_accepts_a_good_directory_and_names_what_is_wrong() {
    let dir = std::env::temp_dir().join(format!("sinew-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("svc.yaml"),
        "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: catalog}\nspec:\n  ports: [{name: http, port: 80}]\n",
    )
    .unwrap();
    let ok = sinew(&["validate", "-f", "."], &dir);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "1 documents valid"
    );

    std::fs::write(
        dir.join("route.yaml"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: catalog}]\n  rules:\n    - backendRefs: [{name: catalog, weight: 0}]\n",
    )
    .unwrap();
    let bad = sinew(&["validate", "-f", "."], &dir);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("./route.yaml:1: HTTPRoute default/r: spec.rules[0].backendRefs: all backend weights are zero"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
