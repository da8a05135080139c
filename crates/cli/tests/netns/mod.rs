//! Support for transparent-capture tests: "hosts" as network namespaces joined by
//! veth pairs to a bridge in a hub namespace, processes started inside them, and
//! cleanup on drop (even when a test fails). Needs root: a test that cannot run
//! fails loudly, naming what is missing.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sinew_testkit::wait;

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Fails the test (never skips it) when it cannot run here.
pub fn require(tools: &[&str]) {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "\n\nthis test needs root (network namespaces, iptables): run it as root, as \
         scripts/test does in CI\n\n"
    );
    for tool in tools {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
            || ["/usr/sbin", "/sbin"]
                .iter()
                .any(|d| Path::new(d).join(tool).is_file());
        assert!(
            found,
            "\n\nthis test needs `{tool}`: install it (scripts/test installs iptables, \
             iproute2, tcpdump, curl, python3, util-linux)\n\n"
        );
    }
}

/// Runs a command to completion; panics if it cannot start.
pub fn run(program: &str, args: &[&str]) -> Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} {args:?}: {e}"))
}

/// Runs a command that must succeed.
pub fn must(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Netns {
        // A leftover from an interrupted run of the same pid is gone first.
        let _ = run("ip", &["netns", "del", &name]);
        must("ip", &["netns", "add", &name]);
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's own `/etc/resolv.conf` (`ip netns exec` mounts
    /// `/etc/netns/<name>/resolv.conf` over it); removed with the namespace.
    pub fn resolv_conf(&self, text: &str) {
        let dir = Path::new("/etc/netns").join(&self.0);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
    }

    /// `ip -n <ns> args`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        must("ip", &all)
    }

    /// Runs `args` inside the namespace (as root) to completion.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.0.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Like [`exec`], and it must succeed; returns stdout.
    pub fn must(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in {}: {} failed ({}): {}{}",
            self.0,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.0));
    }
}

/// A process started inside a namespace, killed on drop; its output goes to a log.
pub struct Proc {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl Proc {
    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts `args` in `ns`, as `uid` when given (with setpriv, as `sinew run` does).
pub fn spawn(ns: &Netns, uid: Option<u32>, args: &[&str], log: PathBuf) -> Proc {
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.0]);
    if let Some(uid) = uid {
        let u = uid.to_string();
        cmd.args([
            "setpriv",
            "--reuid",
            &u,
            "--regid",
            &u,
            "--clear-groups",
            "--",
        ]);
    }
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {args:?} in {}: {e}", ns.0));
    Proc { child, log }
}

/// A scratch directory (readable by the proxy's uid), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        use std::os::unix::fs::PermissionsExt;
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "sinew-capture-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(p)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.0.join(name);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("SINEW_KEEP_SCRATCH").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A host: a namespace with `eth0` on the lab's bridge.
pub struct Host {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub ip6: String,
    /// The veth's end in the hub (cut it to partition the host).
    pub hub_if: String,
}

/// Hosts on one bridge, in a hub namespace at 10.77.0.1 / fd77::1. Namespace names
/// carry the pid and a tag, so tests can run in parallel.
pub struct Lab {
    pub hub: Netns,
    pub hosts: Vec<Host>,
}

pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

impl Lab {
    pub fn new(tag: &str, names: &[&str]) -> Lab {
        let pid = std::process::id();
        let hub = Netns::new(format!("sn{pid}-{tag}-hub"));
        hub.ip(&["link", "add", "br0", "type", "bridge"]);
        hub.ip(&["addr", "add", "10.77.0.1/24", "dev", "br0"]);
        hub.ip(&["addr", "add", "fd77::1/64", "dev", "br0", "nodad"]);
        hub.ip(&["link", "set", "br0", "up"]);
        let mut hosts = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let ns = Netns::new(format!("sn{pid}-{tag}-{name}"));
            let n = i + 2;
            let hub_if = format!("v{n}");
            hub.ip(&[
                "link", "add", &hub_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.0,
            ]);
            hub.ip(&["link", "set", &hub_if, "master", "br0", "up"]);
            let ip = Ipv4Addr::new(10, 77, 0, n as u8);
            let ip6 = format!("fd77::{n}");
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "default", "via", "10.77.0.1"]);
            hosts.push(Host {
                ns,
                ip,
                ip6,
                hub_if,
            });
        }
        Lab { hub, hosts }
    }
}

/// Waits until `args` succeeds in `ns`.
pub async fn until_ok(what: &str, ns: &Netns, args: &[&str]) {
    let r = wait::until(what, TIMEOUT, || {
        let ok = ns.exec(args).status.success();
        async move { ok }
    })
    .await;
    if let Err(e) = r {
        let out = ns.exec(args);
        panic!(
            "{e}; last try: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The sum of the samples of `metric` whose labels contain every one of `labels`
/// (e.g. `direction="inbound"`), from a proxy's admin endpoint inside `ns`.
pub fn metric(ns: &Netns, admin_port: u16, metric: &str, labels: &[&str]) -> f64 {
    let text = ns.must(&[
        "curl",
        "-sf",
        &format!("http://127.0.0.1:{admin_port}/metrics"),
    ]);
    sinew_testkit::metrics::sum_labelled(&text, metric, labels)
}

/// `iptables-save` output without its timestamped comments and counters, so two
/// dumps compare equal when the rules are the same.
pub fn rules(ns: &Netns, save: &str) -> String {
    ns.must(&[save])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.split_once(" [") {
            Some((head, _)) if l.starts_with(':') => head.to_owned(),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Like [`rules`], without tables that hold nothing (only built-in chains with
/// ACCEPT policies, no rule): installing capture on a namespace with no nat table
/// creates one, which no backend can take away again (the legacy one cannot unload
/// it per namespace), and an empty table changes nothing.
pub fn effective_rules(ns: &Netns, save: &str) -> String {
    let text = rules(ns, save);
    let mut out = Vec::new();
    let mut table: Vec<&str> = Vec::new();
    for line in text.lines() {
        table.push(line);
        if line == "COMMIT" {
            let empty = table.iter().all(|l| {
                l.starts_with('*')
                    || *l == "COMMIT"
                    || (l.starts_with(':') && l.ends_with(" ACCEPT"))
            });
            if !empty {
                out.append(&mut table);
            }
            table.clear();
        }
    }
    out.extend(table);
    out.join("\n")
}
