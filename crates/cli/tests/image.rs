//! The container image (image/Containerfile, built by scripts/image): built with
//! buildah from the binaries this test run already has (`sinew` and `sinew-proxy` of
//! the suite's build, no release build), mounted, and run from its root filesystem
//! with `chroot` as a container runtime would run it. It has no shell and a non-root
//! user; every container that `sinew install` and `sinew inject` define starts from it
//! as its securityContext has it (user, read-only root); the control plane serves
//! (writing its data as the image's user) and a sidecar joins it and becomes ready;
//! the init container, as root in a network namespace of its own, installs the
//! capture rules with both iptables backends. Needs root, buildah, iptables, curl and
//! util-linux (chroot, unshare); fails loudly without them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use netns::{Netns, Scratch, require};
use serde_json::Value;
use sinew_testkit::free_addr;

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The image's user (image/Containerfile's `USER`).
const USER: &str = "65532:65532";

fn bin_dir() -> PathBuf {
    let sinew = Path::new(env!("CARGO_BIN_EXE_sinew"));
    let dir = sinew.parent().unwrap().to_path_buf();
    assert!(
        dir.join("sinew-proxy").is_file(),
        "\n\nthis test builds the image from the proxy binary next to sinew in {}: \
         `cargo build --bins` (a workspace-wide `cargo test` builds it)\n\n",
        dir.display()
    );
    dir
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/image")
}

/// A program of this machine by absolute path (the commands run in the image get
/// the image's environment, whose PATH is not this machine's).
fn host_tool(name: &str) -> PathBuf {
    let dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.into_iter()
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// buildah on a storage of the test's own (vfs, under its scratch directory), and
/// what it made there, removed on drop (even when the test fails).
struct Buildah {
    storage: PathBuf,
    images: Vec<String>,
    containers: Vec<String>,
}

impl Buildah {
    fn command(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(self.storage.join("root"))
            .arg("--runroot")
            .arg(self.storage.join("run"))
            .args(["--storage-driver", "vfs"]);
        c
    }

    fn must(&self, args: &[&str]) -> String {
        let out = self
            .command()
            .args(args)
            .output()
            .expect("cannot run buildah");
        check(&format!("buildah {}", args.join(" ")), &out);
        stdout(&out).trim().to_owned()
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.command().args(["rm", c]).output();
        }
        for i in &self.images {
            let _ = self.command().args(["rmi", "--force", i]).output();
        }
    }
}

/// The documents of a multi-document YAML text.
fn docs(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// Every container (and init container) of every pod and pod template in `docs`.
fn containers(docs: &[Value]) -> Vec<Value> {
    let mut found = Vec::new();
    for d in docs {
        for spec in [&d["spec"], &d["spec"]["template"]["spec"]] {
            for list in ["initContainers", "containers"] {
                if let Some(cs) = spec[list].as_array() {
                    found.extend(cs.iter().cloned());
                }
            }
        }
    }
    found
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// How a container of the manifests runs: as its `runAsUser` (the group of that
/// name in the image's /etc/group has the same id), else the image's user; on a
/// read-only root when it says so; with these volumes (this machine's directory,
/// where it is mounted) and in this network namespace (a pod's; default: this
/// machine's).
struct Run {
    user: String,
    read_only: bool,
    volumes: Vec<(PathBuf, String)>,
    netns: Option<String>,
}

impl Run {
    fn of(c: &Value) -> Run {
        let security = &c["securityContext"];
        Run {
            user: match security["runAsUser"].as_u64() {
                Some(uid) => format!("{uid}:{uid}"),
                None => USER.to_owned(),
            },
            read_only: security["readOnlyRootFilesystem"].as_bool() == Some(true),
            volumes: Vec::new(),
            netns: None,
        }
    }
}

/// Quoted for the shell.
fn quote(s: &std::ffi::OsStr) -> String {
    format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"))
}

/// A process of the image, run as a container runtime runs one: in a mount namespace
/// of its own with /dev, /proc and the volumes mounted, the root read-only if asked,
/// `chroot` into the image's root filesystem as the user, with the image's
/// environment and nothing of this machine's.
fn container(rootfs: &Path, env: &[String], run: &Run, argv: &[&str]) -> Command {
    let mount = quote(host_tool("mount").as_os_str());
    let r = |d: &str| quote(rootfs.join(d.trim_start_matches('/')).as_os_str());
    // The mount points, made here as a runtime makes them.
    let mut script = vec![format!("{mount} --bind {root} {root}", root = r(""))];
    for d in ["dev", "proc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    script.push(format!("{mount} --rbind /dev {}", r("dev")));
    script.push(format!("{mount} -t proc proc {}", r("proc")));
    for (host, dest) in &run.volumes {
        std::fs::create_dir_all(rootfs.join(dest.trim_start_matches('/'))).unwrap();
        script.push(format!(
            "{mount} --bind {} {}",
            quote(host.as_os_str()),
            r(dest)
        ));
    }
    if run.read_only {
        // Only the root: the mounts on it stay writable.
        script.push(format!("{mount} -o remount,bind,ro {}", r("")));
    }
    script.push(format!(
        "exec {} --userspec={} {} \"$@\"",
        quote(host_tool("chroot").as_os_str()),
        run.user,
        r("")
    ));
    let mut c = match &run.netns {
        Some(ns) => {
            let mut c = Command::new(host_tool("ip"));
            c.args(["netns", "exec", ns]).arg(host_tool("unshare"));
            c
        }
        None => Command::new(host_tool("unshare")),
    };
    // `--propagation private`: the mounts vanish with the namespace, never seen here.
    c.env_clear()
        .envs(env.iter().filter_map(|kv| kv.split_once('=')))
        .args(["--mount", "--propagation", "private", "/bin/sh", "-ec"])
        .arg(script.join("\n"))
        .arg("sh")
        .args(argv)
        .stdin(Stdio::null());
    c
}

/// A long-running process, killed on drop (even when the test fails).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `ready` until it holds; panics, with the process's `log`, when the process
/// exits first or after [`netns::TIMEOUT`].
fn until(what: &str, process: &mut Running, log: &Path, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + netns::TIMEOUT;
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    while !ready() {
        if let Ok(Some(status)) = process.0.try_wait() {
            panic!("{what}: exited ({status}); its log:\n{}", log());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; its log:\n{}",
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The `nat` table of a namespace as this machine's iptables of one backend prints it.
fn nat(ns: &Netns, program: &str) -> String {
    let out = ns.exec(&[program, "-t", "nat"]);
    check(program, &out);
    stdout(&out)
}

/// The image builds from the suite's binaries, has no shell and a non-root user, and
/// every container Sinew's manifests and injector define starts from it.
#[test]
fn the_image_builds_from_the_suites_binaries_and_runs_every_container_sinew_defines() {
    require(&[
        "buildah",
        "curl",
        "chroot",
        "unshare",
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
    ]);
    let scratch = Scratch::new("image");
    let mut buildah = Buildah {
        storage: scratch.path("storage"),
        images: Vec::new(),
        containers: Vec::new(),
    };

    // The containers Sinew puts in a cluster: the control plane and webhook of
    // `sinew install`, the sidecar and init container of `sinew inject`. All name the
    // image of this release; `--image` overrides it.
    let sinew = env!("CARGO_BIN_EXE_sinew");
    let out = Command::new(sinew)
        .args(["install", "--kubernetes"])
        .output()
        .unwrap();
    check("sinew install --kubernetes", &out);
    let installed = containers(&docs(&stdout(&out)));
    let out = Command::new(sinew)
        .args([
            "install",
            "--kubernetes",
            "--image",
            "registry.example/sinew:test",
        ])
        .output()
        .unwrap();
    check("sinew install --kubernetes --image", &out);
    let overridden = containers(&docs(&stdout(&out)));
    assert!(!overridden.is_empty());
    for c in &overridden {
        assert_eq!(c["image"], "registry.example/sinew:test", "{c}");
    }
    let mut child = Command::new(sinew)
        .args(["inject", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        b"apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n\
          spec: {containers: [{name: app, image: nginx}]}\n",
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    check("sinew inject", &out);
    let injected: Vec<Value> = containers(&docs(&stdout(&out)))
        .into_iter()
        .filter(|c| c["name"] != "app")
        .collect();
    let release = format!("ghcr.io/sinew-mesh/sinew:{VERSION}");
    let ours: Vec<&Value> = installed.iter().chain(&injected).collect();
    for c in &ours {
        assert_eq!(c["image"], release.as_str(), "{c}");
    }
    let init: Vec<&&Value> = ours
        .iter()
        .filter(|c| strings(&c["args"]).first().map(String::as_str) == Some("init"))
        .collect();
    assert_eq!(
        init.len(),
        1,
        "one init container runs `sinew init`: {ours:?}"
    );
    assert!(
        ours.iter()
            .any(|c| strings(&c["command"]) == ["sinew-proxy"]),
        "{ours:?}"
    );

    // Build it (its default name: this release's) and open it as a container would.
    let out = Command::new(script())
        .arg("--binaries")
        .arg(bin_dir())
        .arg("--storage")
        .arg(&buildah.storage)
        .output()
        .expect("cannot run scripts/image");
    check("scripts/image", &out);
    assert!(
        stdout(&out).contains(&format!("built {release} ")),
        "{}",
        stdout(&out)
    );
    buildah.images.push(release.clone());
    let inspect: Value =
        serde_json::from_str(&buildah.must(&["inspect", "--type", "image", &release])).unwrap();
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["User"], USER, "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/sinew"])
    );
    assert_eq!(
        config["Labels"]["org.opencontainers.image.version"],
        VERSION
    );
    let env = strings(&config["Env"]);
    let path: Vec<String> = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .expect("the image sets PATH")
        .split(':')
        .map(str::to_owned)
        .collect();
    let working = buildah.must(&["from", &release]);
    buildah.containers.push(working.clone());
    let rootfs = PathBuf::from(buildah.must(&["mount", &working]));

    // No shell, no package manager: nothing to exec into.
    assert!(!rootfs.join("bin/sh").exists());
    let mut stack = vec![rootfs.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !["sh", "bash", "dash", "ash", "busybox", "apt", "dpkg"].contains(&name.as_str()),
                "the image holds {}",
                e.path().display()
            );
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }

    // Both binaries start as the image's user (a runtime's defaults), the version this
    // release's; the image's data directory is that user's.
    let run = |how: &Run, argv: &[&str]| {
        let out = container(&rootfs, &env, how, argv).output().unwrap();
        check(
            &format!("{} in the image as {}", argv.join(" "), how.user),
            &out,
        );
        stdout(&out)
    };
    let plain = Run::of(&Value::Null);
    assert_eq!(
        run(&plain, &["sinew", "--version"]).trim(),
        format!("sinew {VERSION}")
    );
    assert!(run(&plain, &["sinew-proxy", "--help"]).contains("Usage: sinew-proxy"));
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(rootfs.join("var/lib/sinew")).unwrap()
        ),
        65532
    );

    // Every container's command is on the image's PATH and starts (as `--help` of its
    // subcommand) as its securityContext has it (user, read-only root).
    for c in &ours {
        let command = strings(&c["command"]);
        assert_eq!(command.len(), 1, "{c}");
        assert!(
            path.iter().any(|d| rootfs
                .join(d.trim_start_matches('/'))
                .join(&command[0])
                .is_file()),
            "{} is not on the image's PATH {path:?}",
            command[0]
        );
        let mut argv = command.clone();
        argv.extend(
            strings(&c["args"])
                .into_iter()
                .take_while(|a| !a.starts_with('-')),
        );
        argv.push("--help".into());
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        run(&Run::of(c), &argv);
    }

    // The control plane as the manifests run it (its user, its root, its data
    // directory an emptyDir: a directory of this machine, mode 0777 as the kubelet
    // makes one), and a sidecar as the injector runs it (its uid, its root, the token
    // in its projected volume) joining it with a token: both serve from the image.
    let arg_after = |c: &Value, flag: &str| {
        let args = strings(&c["args"]);
        let i = args.iter().position(|a| a == flag);
        i.and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| panic!("no {flag} in {c}"))
    };
    let control_container = installed
        .iter()
        .find(|c| strings(&c["args"]).first().map(String::as_str) == Some("control"))
        .expect("a container runs `sinew control`");
    // Its data directory: the manifests', else the image's.
    let data_dir = strings(&control_container["args"])
        .iter()
        .position(|a| a == "--data-dir")
        .map_or("/var/lib/sinew".to_owned(), |_| {
            arg_after(control_container, "--data-dir")
        });
    let data = scratch.path("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let mut how = Run::of(control_container);
    how.volumes.push((data.clone(), data_dir.clone()));
    let control = free_addr().to_string();
    let url = format!("https://{control}");
    let log = scratch.path("control.log");
    let mut control_plane = Running(
        container(
            &rootfs,
            &env,
            &how,
            &[
                "sinew",
                "control",
                "--listen",
                &control,
                "--data-dir",
                &data_dir,
            ],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    let credentials = data.join("admin.credentials");
    let sinew_cli = |args: &[&str]| {
        Command::new(sinew)
            .args(args)
            .env("SINEW_SERVER", &url)
            .env("SINEW_CREDENTIALS", &credentials)
            .env("HOME", "/nonexistent")
            .output()
            .unwrap()
    };
    until(
        "the control plane in the image",
        &mut control_plane,
        &log,
        || credentials.exists() && sinew_cli(&["check", "--wait", "0"]).status.success(),
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&credentials).unwrap()),
        65532,
        "the control plane wrote its data as the image's user"
    );
    let out = sinew_cli(&["token", "create", "-n", "shop", "--service-account", "web"]);
    check("sinew token create", &out);
    let sidecar = injected
        .iter()
        .find(|c| strings(&c["command"]) == ["sinew-proxy"])
        .unwrap();
    let token_file = PathBuf::from(arg_after(sidecar, "--join-token-file"));
    let identity = scratch.path("identity");
    std::fs::create_dir(&identity).unwrap();
    let token = identity.join(token_file.file_name().unwrap());
    std::fs::write(&token, stdout(&out).trim()).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    let mut how = Run::of(sidecar);
    how.volumes.push((
        identity,
        token_file.parent().unwrap().to_string_lossy().into_owned(),
    ));
    let proxy_uid = sidecar["securityContext"]["runAsUser"]
        .as_u64()
        .expect("the sidecar's runAsUser");
    let admin = free_addr().to_string();
    let log = scratch.path("proxy.log");
    let mut proxy = Running(
        container(
            &rootfs,
            &env,
            &how,
            &[
                "sinew-proxy",
                "--control-plane",
                &url,
                "--name",
                "shop/web",
                "--join-token-file",
                &token_file.to_string_lossy(),
                "--admin",
                &admin,
            ],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    until("the sidecar in the image", &mut proxy, &log, || {
        Command::new("curl")
            .args(["-fsS", "-o", "/dev/null", &format!("http://{admin}/ready")])
            .output()
            .is_ok_and(|o| o.status.success())
    });

    // The init container, as its securityContext has it (root) in a network namespace
    // of its own (a pod's), installs the capture rules with the image's iptables: the
    // default (nft) and the legacy backend.
    let mut init_args = strings(&init[0]["args"]);
    for (backend, save) in [
        (None, ["iptables-nft-save", "ip6tables-nft-save"]),
        (
            Some("legacy"),
            ["iptables-legacy-save", "ip6tables-legacy-save"],
        ),
    ] {
        let ns = Netns::new(format!(
            "sinew-image-{}-{}",
            backend.unwrap_or("auto"),
            std::process::id()
        ));
        if let Some(b) = backend {
            init_args.extend(["--backend".into(), b.into()]);
        }
        let argv = [strings(&init[0]["command"]), init_args.clone()].concat();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut how = Run::of(init[0]);
        how.netns = Some(ns.0.clone());
        // Its volumes (an emptyDir for the iptables lock under a read-only root): a
        // fresh directory of this machine each, as the kubelet makes them.
        for m in init[0]["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().unwrap();
            let dir = scratch.path(&format!("{name}-{}", backend.unwrap_or("auto")));
            std::fs::create_dir(&dir).unwrap();
            how.volumes
                .push((dir, m["mountPath"].as_str().unwrap().to_owned()));
        }
        run(&how, &argv);
        for program in save {
            let rules = nat(&ns, program);
            assert!(
                rules.contains(&format!(
                    "-A SINEW_OUTPUT -m owner --uid-owner {proxy_uid} -j RETURN"
                )) && rules.contains("-j REDIRECT --to-ports 15001"),
                "{program} after `sinew init` from the image:\n{rules}"
            );
        }
    }
}
