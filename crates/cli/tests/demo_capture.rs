//! The demo in transparent-capture mode (`demo/run.sh --capture`, i.e.
//! demo/capture.sh): every demo service on its own namespaced host under `sinew run`,
//! apps calling each other by service name. Needs root, iproute2, iptables, curl and
//! setpriv; fails loudly without them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod netns;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use netns::require;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../demo/run.sh")
}

fn bin_dir() -> PathBuf {
    let sinew = Path::new(env!("CARGO_BIN_EXE_sinew"));
    let dir = sinew.parent().unwrap().to_path_buf();
    assert!(
        dir.join("sinew-proxy").is_file(),
        "\n\nthis test needs the proxy binary next to sinew in {}: `cargo build --bins`\n\n",
        dir.display()
    );
    dir
}

fn demo(prefix: &str, args: &[&str]) -> Command {
    // A test harness may run with SIGINT ignored, which a shell inherits and then
    // cannot trap; a terminal's shell starts the demo with the default disposition.
    let mut cmd = Command::new("env");
    cmd.args(["--default-signal=INT,TERM", "bash"])
        .arg(script())
        .args(args)
        .env("SINEW_BIN_DIR", bin_dir())
        .env("SINEW_DEMO_PREFIX", prefix);
    cmd
}

/// Namespaces (and their `/etc/netns` resolver files) left behind under `prefix`.
fn leftovers(prefix: &str) -> Vec<String> {
    let list = netns::must("ip", &["netns", "list"]);
    let mut left: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect();
    if let Ok(dir) = std::fs::read_dir("/etc/netns") {
        left.extend(
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .map(|n| format!("/etc/netns/{n}")),
        );
    }
    left
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--once`: a request from the client host to `http://frontend/` (by name) crosses
/// frontend, reviews and ratings (and a catalog version); each hop arrives at the
/// callee's sidecar from the caller's mTLS identity; at exit the capture rules,
/// processes and namespaces are gone. Then the interactive mode and Ctrl-C, and the
/// refusal without root (in sequence: concurrent `ip netns add`s can race).
#[test]
fn the_capture_demo_meshes_unmodified_apps_by_name_and_cleans_up() {
    require(&[
        "ip",
        "iptables",
        "iptables-save",
        "curl",
        "env",
        "setpriv",
        "kill",
    ]);
    let prefix = format!("sdc{}", std::process::id());
    let out = demo(&prefix, &["--capture", "--once"]).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "capture demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let body = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no answer from the frontend:\n{stdout}"));
    let answer: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(answer["service"], "frontend", "{body}");
    let downstream = answer["downstream"].as_array().unwrap();
    let services: Vec<&str> = downstream
        .iter()
        .map(|d| d["service"].as_str().unwrap_or(""))
        .collect();
    assert!(
        services.len() == 2
            && (services[0] == "catalog-v1" || services[0] == "catalog-v2")
            && services[1] == "reviews",
        "{body}"
    );
    assert_eq!(
        downstream[1]["downstream"][0]["service"], "ratings",
        "{body}"
    );
    for (callee, caller) in [
        ("frontend", "client"),
        ("reviews", "frontend"),
        ("ratings", "reviews"),
    ] {
        // Startup retries until the whole chain answers, so a hop may count more
        // than one request; at least one it must.
        let head = format!("mtls: {callee}'s sidecar received ");
        let tail = format!(" request(s) from {caller}'s identity");
        let seen: Option<f64> = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&head)?.strip_suffix(&tail)?.parse().ok());
        assert!(
            seen.is_some_and(|n| n >= 1.0),
            "{callee} from {caller}: {seen:?}\n{stdout}"
        );
    }
    assert!(stdout.contains("demo: ok"), "{stdout}");
    assert!(
        stderr.contains("capture rules removed from every host"),
        "{stderr}"
    );
    assert_eq!(leftovers(&prefix), Vec::<String>::new(), "{stderr}");

    stops_cleanly_on_ctrl_c_and_refuses_without_root();
}

/// Without `--once` the mesh stays up and says how to use it; Ctrl-C (SIGINT to the
/// process group, as a terminal sends it) removes rules and namespaces. Not root:
/// refused before anything is created.
fn stops_cleanly_on_ctrl_c_and_refuses_without_root() {
    let prefix = format!("sdi{}", std::process::id());
    let mut cmd = demo(&prefix, &["--capture"]);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pgid = child.id();
    let stderr = child.stderr.take().unwrap();
    let errs = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    // Its output ends the wait: the banner, or EOF when it fails to come up (the
    // demo has its own 60 s startup limit).
    let mut banner = String::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("Logs:") {
            break;
        }
    }
    assert!(
        banner.contains(&format!(
            "ip netns exec {prefix}-client curl http://frontend/"
        )) && banner.contains("stat -n demo")
            && banner.contains("edges -n demo"),
        "the demo says how to reach the frontend and what to try:\n{banner}"
    );
    // The mesh is really there while it runs: the frontend answers by name.
    let out = netns::run(
        "ip",
        &[
            "netns",
            "exec",
            &format!("{prefix}-client"),
            "curl",
            "-fsS",
            "--max-time",
            "10",
            "http://frontend/",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"ratings\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Keep reading its output (a closed pipe would kill it, not Ctrl-C).
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    netns::must("kill", &["-INT", "--", &format!("-{pgid}")]);
    let status = child.wait().unwrap();
    let stderr = errs.join().unwrap();
    let rest = rest.join().unwrap().join("\n");
    assert_eq!(status.code(), Some(130), "{status}\n{rest}\n{stderr}");
    assert_eq!(leftovers(&prefix), Vec::<String>::new(), "{stderr}");
    assert!(
        stderr.contains("capture rules removed from every host"),
        "{stderr}"
    );

    let nobody = format!("sdn{}", std::process::id());
    // The scripts as an installation has them, readable by anyone: the checkout may
    // be private to root (a clone in `mktemp -d` is 0700), and the refusal to check
    // is the script's own, not the file system's.
    let copy = std::env::temp_dir().join(format!("sinew-demo-copy-{}", std::process::id()));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(copy.join("demo")).unwrap();
        for d in [copy.clone(), copy.join("demo")] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for f in ["run.sh", "capture.sh"] {
            let to = copy.join("demo").join(f);
            std::fs::copy(script().with_file_name(f), &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "bash",
        ])
        .arg(copy.join("demo/run.sh"))
        .arg("--capture")
        .env("SINEW_BIN_DIR", bin_dir())
        .env("SINEW_DEMO_PREFIX", &nobody)
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert!(
        !out.status.success() && err.contains("transparent capture needs root"),
        "{err}"
    );
    assert_eq!(leftovers(&nobody), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&copy);
}
