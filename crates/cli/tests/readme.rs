//! The README (and docs/*.md) checked against the code, so they cannot drift: the
//! kinds `sinew get` accepts, the resource kinds, the demo's counts, every `sinew`
//! command they show, every relative link and repository path they name, and the
//! README's commands finding the binaries wherever `CARGO_TARGET_DIR` puts them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    std::fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")).unwrap()
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).unwrap()
}

/// README.md and every docs/*.md, with their paths.
fn documents() -> Vec<(PathBuf, String)> {
    let mut out = vec![(root().join("README.md"), readme())];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ has no .md file");
    for p in docs {
        let text = std::fs::read_to_string(&p).unwrap();
        out.push((p, text));
    }
    out
}

/// `sinew` with no credential or server from the environment, in a scratch directory
/// (so no `sinew-data/admin.credentials` is found by accident).
fn sinew(args: &[&str]) -> std::process::Output {
    let scratch = std::env::temp_dir().join(format!("sinew-readme-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args(args)
        .current_dir(&scratch)
        .env_remove("SINEW_SERVER")
        .env_remove("SINEW_CREDENTIALS")
        .env_remove("SINEW_NAMESPACE")
        .env("HOME", &scratch)
        .env("XDG_CONFIG_HOME", &scratch)
        .output()
        .unwrap()
}

/// The words in backquotes in `text`.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The fenced code blocks of a Markdown text: (info string, lines).
fn fenced_blocks(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            match current.take() {
                Some(block) => out.push(block),
                None => current = Some((info.trim().to_owned(), Vec::new())),
            }
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line.to_owned());
        }
    }
    assert!(current.is_none(), "an unclosed code block");
    out
}

/// Markdown outside its fenced code blocks.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The kinds `sinew get` lists when given one it does not know.
fn kinds_sinew_get_names() -> BTreeSet<String> {
    let out = sinew(&["get", "nosuchkind"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let list = err
        .split_once("use ")
        .unwrap_or_else(|| panic!("`sinew get nosuchkind` lists no kinds: {err}"))
        .1
        .trim();
    list.replace(" or ", ", ")
        .split(',')
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect()
}

/// The README's list of `sinew get`'s kinds equals what the binary accepts: the
/// kinds its "unknown kind" error names, each of which it takes (it gets as far as
/// looking for a credential, never refusing the kind).
#[test]
fn the_readmes_get_kinds_are_what_sinew_get_accepts() {
    let named = kinds_sinew_get_names();
    for k in [
        "authorizationpolicy",
        "requestauthentication",
        "trafficpolicy",
        "routepolicy",
        "all",
    ] {
        assert!(
            named.contains(k),
            "`sinew get` does not name {k}: {named:?}"
        );
    }
    let text = readme();
    let row = text
        .lines()
        .find(|l| l.contains("`sinew get KIND") && l.contains("kinds:"))
        .expect("the README's CLI table has a `sinew get KIND` row listing its kinds");
    let listed: BTreeSet<String> = code_spans(row.split_once("kinds:").unwrap().1)
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        listed, named,
        "the README's `sinew get` kinds (left) against the binary's (right)"
    );
    for kind in &listed {
        let out = sinew(&["--server", "https://127.0.0.1:1", "get", kind]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("unknown kind"),
            "`sinew get {kind}` refuses the kind: {err}"
        );
    }
}

/// The README's table of resource kinds lists exactly the kinds a document may have.
#[test]
fn the_readmes_resource_kinds_are_the_models() {
    let text = readme();
    let section = text
        .split_once("### Resource kinds")
        .expect("a Resource kinds section")
        .1;
    let section = section.split("\n### ").next().unwrap();
    let listed: BTreeSet<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(kind, _)| kind))
        .collect();
    let model: BTreeSet<&str> = sinew_model::resource::KINDS.into_iter().collect();
    assert_eq!(
        listed, model,
        "the README's kinds (left) against the model's"
    );
}

const NUMBER_WORDS: [&str; 13] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
];

/// Every "N sidecars" / "N services" (digits or words) the README says.
fn claims(text: &str, noun: &str) -> Vec<usize> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    words
        .windows(2)
        .filter(|w| w[1] == noun)
        .filter_map(|w| {
            w[0].parse()
                .ok()
                .or_else(|| NUMBER_WORDS.iter().position(|n| *n == w[0]))
        })
        .collect()
}

/// The quick start's counts of the demo's sidecars and services are what `sinew demo`
/// runs: the proxies its `--json` line lists, and the Services its control plane
/// holds (`sinew get services -n demo`).
/// One mesh at a time: the demo picks free loopback ports and releases them for its
/// children to bind, so two demos starting at once (or one beside standalone.sh's
/// fixed ports) could collide.
static ONE_MESH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_mesh() -> std::sync::MutexGuard<'static, ()> {
    ONE_MESH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn the_readmes_demo_counts_are_what_the_demo_runs() {
    let _one = one_mesh();
    // The quick start's claims: the guides describe other meshes (standalone.sh's).
    let text = readme();
    let text = text
        .split_once("## Quick start")
        .and_then(|(_, t)| t.split_once("\n## "))
        .expect("a Quick start section")
        .0;
    let sidecars = claims(text, "sidecars");
    let services = claims(text, "services");
    assert!(
        !sidecars.is_empty() && !services.is_empty(),
        "the README says how many sidecars ({sidecars:?}) and services ({services:?}) the demo runs"
    );

    let help = sinew(&["demo", "--help"]);
    let mut args = vec!["demo", "--duration", "5s", "--json"];
    // The scripted tour, when there is one, changes the mesh while it runs: counted
    // without it.
    if String::from_utf8_lossy(&help.stdout).contains("--no-tour") {
        args.push("--no-tour");
    }
    let mut demo = Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(demo.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let info: serde_json::Value = match serde_json::from_str(&first) {
        Ok(info) => info,
        Err(e) => {
            let out = demo.wait_with_output().unwrap();
            panic!(
                "sinew demo --json: no JSON first line ({e}): {first:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        }
    };
    let proxies = info["proxies"].as_array().expect("proxies").len();
    let get = Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args(["get", "services", "-n", "demo", "-o", "json"])
        .env("SINEW_SERVER", info["control_plane"].as_str().unwrap())
        .env("SINEW_CREDENTIALS", info["credentials"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    let held: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    let held = held.as_array().expect("a JSON list").len();
    // The rest of its output, so the demo never blocks on a full pipe; then its end.
    let rest = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let out = demo.wait_with_output().unwrap();
    let rest = rest.join().unwrap();
    assert!(
        out.status.success(),
        "{rest}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(
        sidecars.iter().all(|&n| n == proxies),
        "the README says {sidecars:?} sidecars; the demo runs {proxies}"
    );
    assert!(
        services.iter().all(|&n| n == held),
        "the README says {services:?} services; the demo's control plane holds {held}"
    );
}

/// The `sinew` commands a line of shell shows: each `sinew` word, its global flags
/// skipped, then the command and (when it is a word) what follows it.
fn sinew_commands(line: &str) -> Vec<(String, Option<String>)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if *w != "sinew" {
            continue;
        }
        let mut rest = words[i + 1..].iter().copied();
        let mut command = None;
        while let Some(w) = rest.next() {
            if w == "--server" || w == "--credentials" {
                rest.next();
            } else if w.starts_with("--server=") || w.starts_with("--credentials=") {
            } else {
                command = Some(w);
                break;
            }
        }
        let Some(command) = command else { continue };
        let next = rest
            .next()
            .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
            .filter(|w| !w.starts_with('-'))
            .map(str::to_owned);
        // `sinew stat/top/tap/edges` names several commands at once.
        for c in command.split('/') {
            let c = c.trim_end_matches([',', '.', ';', ':', ')']);
            if c.is_empty() || !c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '-') {
                continue;
            }
            out.push((c.to_owned(), next.clone()));
        }
    }
    out
}

/// Every `sinew <command>` in the README's and docs' shell blocks and inline code
/// exists (`sinew <command> --help` succeeds), and so does its subcommand when it has
/// subcommands (`sinew token create`).
#[test]
fn every_sinew_command_the_docs_show_exists() {
    let mut shown: BTreeSet<(String, Option<String>, String)> = BTreeSet::new();
    for (path, text) in documents() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for (info, lines) in fenced_blocks(&text) {
            // Shell only: the layout block's prose ("sinew demo and ...") is no command.
            if !matches!(info.as_str(), "sh" | "bash" | "console") {
                continue;
            }
            for line in lines {
                let line = line.split(" # ").next().unwrap();
                for (c, next) in sinew_commands(line) {
                    shown.insert((c, next, name.clone()));
                }
            }
        }
        for span in code_spans(&prose(&text)) {
            if span.starts_with("sinew ") {
                for (c, next) in sinew_commands(span) {
                    shown.insert((c, next, name.clone()));
                }
            }
        }
    }
    let commands: BTreeSet<&str> = shown.iter().map(|(c, _, _)| c.as_str()).collect();
    for c in [
        "demo", "stat", "get", "apply", "run", "init", "install", "control",
    ] {
        assert!(commands.contains(c), "no `sinew {c}` found in the docs");
    }
    let mut missing = Vec::new();
    for (command, next, file) in &shown {
        let help = sinew(&[command, "--help"]);
        if !help.status.success() {
            missing.push(format!("{file}: sinew {command}"));
            continue;
        }
        let text = String::from_utf8_lossy(&help.stdout);
        if let (Some(sub), true) = (next, text.contains("\nCommands:\n"))
            && !sinew(&[command, sub, "--help"]).status.success()
        {
            missing.push(format!("{file}: sinew {command} {sub}"));
        }
    }
    assert!(
        missing.is_empty(),
        "commands that do not exist: {missing:#?}"
    );
}

/// GitHub's anchor for a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    prose(text)
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

/// The repository's top-level entries: a path in backquotes is checked when its first
/// component is one of them (`sinew.dev/v1alpha1` and `/etc/...` are not paths here).
fn top_level() -> BTreeSet<String> {
    std::fs::read_dir(root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "target")
        .collect()
}

/// Every relative link (and its anchor) in the README and docs leads somewhere, and
/// every repository path they name (`demo/capture.sh`, `crates/proxy/src/tap.rs`)
/// exists.
#[test]
fn every_relative_link_and_path_in_the_docs_exists() {
    let top = top_level();
    let mut broken = Vec::new();
    for (path, text) in documents() {
        let dir = path.parent().unwrap();
        let name = path.strip_prefix(root()).unwrap().display().to_string();
        // Links: [text](target).
        for part in prose(&text).split("](").skip(1) {
            let Some(target) = part.split(')').next() else {
                continue;
            };
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target, None),
            };
            let linked = if file.is_empty() {
                path.clone()
            } else {
                dir.join(file)
            };
            if !linked.exists() {
                broken.push(format!("{name}: link {target}"));
                continue;
            }
            if let Some(anchor) = anchor {
                let text = std::fs::read_to_string(&linked).unwrap();
                if !anchors(&text).contains(anchor) {
                    broken.push(format!("{name}: link {target}: no such heading"));
                }
            }
        }
        // Paths: in inline code and in shell blocks, relative to the repository.
        let mut words: Vec<String> = code_spans(&prose(&text))
            .into_iter()
            .flat_map(str::split_whitespace)
            .map(str::to_owned)
            .collect();
        for (info, lines) in fenced_blocks(&text) {
            if matches!(info.as_str(), "sh" | "bash" | "") {
                words.extend(
                    lines
                        .iter()
                        .flat_map(|l| l.split_whitespace())
                        .map(str::to_owned),
                );
            }
        }
        for word in words {
            let word = word
                .trim_start_matches(['"', '\'', '('])
                .trim_start_matches("./")
                .trim_end_matches(['"', '\'', ',', ';', ':', ')', '.']);
            let Some((first, _)) = word.split_once('/') else {
                continue;
            };
            let placeholder = word.contains(['<', '>', '*', '$', '{', '[', '=', ':', '|']);
            if placeholder || !top.contains(first) || word.contains("/.") {
                continue;
            }
            if !root().join(word).exists() {
                broken.push(format!("{name}: path {word}"));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

/// Writes an executable shell script.
fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The README's two commands, and the parts of the second that run what cargo built,
/// find the binaries in a `CARGO_TARGET_DIR` that is not `target/`: `demo/run.sh`
/// (the first command) runs the demo from there, and `scripts/test`'s
/// `demo/standalone.sh --once` and the benchmark harness (`bench/run --smoke`) take
/// theirs from there. What they find there are stand-ins that log their call and run
/// the binaries this test was built with; `cargo build` is logged and skipped (a
/// build into an empty directory would take minutes), everything else goes to the
/// real cargo (`scripts/target-dir` asks `cargo metadata`). Complements
/// `the_demo_scripts_find_binaries_wherever_cargo_builds_them` in cli.rs, which
/// checks `scripts/target-dir` itself.
#[test]
fn the_readmes_commands_run_what_cargo_built_in_another_target_dir() {
    let _one = one_mesh();
    let work = std::env::temp_dir().join(format!("sinew-readme-target-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let (shim, target) = (work.join("bin"), work.join("elsewhere"));
    let debug = target.join("debug");
    std::fs::create_dir_all(&shim).unwrap();
    std::fs::create_dir_all(&debug).unwrap();
    let log = work.join("calls.log");
    let built = Path::new(env!("CARGO_BIN_EXE_sinew")).parent().unwrap();
    script(
        &shim.join("cargo"),
        &format!(
            "if [ \"$1\" = build ]; then echo \"cargo $*\" >> '{log}'; exit 0; fi\nexec '{cargo}' \"$@\"\n",
            log = log.display(),
            cargo = env!("CARGO"),
        ),
    );
    for bin in ["sinew", "sinew-proxy", "bench-backend"] {
        script(
            &debug.join(bin),
            &format!(
                "echo \"{bin} $*\" >> '{log}'\nexec '{real}' \"$@\"\n",
                log = log.display(),
                real = built.join(bin).display(),
            ),
        );
    }
    let path = format!("{}:{}", shim.display(), std::env::var("PATH").unwrap());
    // CARGO_TARGET_DIR, and the same set as cargo's configuration
    // (build.target-dir, here as its environment form): cargo's own knowledge counts.
    for var in ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"] {
        let _ = std::fs::remove_file(&log);
        let run = |cmd: &mut Command| {
            let out = cmd
                .current_dir(root())
                .env("PATH", &path)
                .env_remove("CARGO_TARGET_DIR")
                .env_remove("CARGO_BUILD_TARGET_DIR")
                .env(var, &target)
                .env_remove("SINEW_PROXY_BIN")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };

        // The tour, when there is one, is the demo's own tests' business: here, only where
        // the binaries come from.
        let help = sinew(&["demo", "--help"]);
        let mut demo_args = vec!["--duration", "2s"];
        if String::from_utf8_lossy(&help.stdout).contains("--no-tour") {
            demo_args.push("--no-tour");
        }
        let demo = run(Command::new("demo/run.sh").args(&demo_args));
        assert!(demo.contains("Sinew demo mesh is up"), "{demo}");
        let standalone = run(Command::new("demo/standalone.sh").arg("--once"));
        // The bench harness's lookup, as `bench/run --smoke` makes it (profile dev).
        let bench = run(Command::new("python3").args([
            "-c",
            "import sys; sys.path.insert(0, 'bench')\n\
             from harness.tools import Tools, build_sinew\n\
             t = Tools(); build_sinew(t, False, 'dev')\n\
             print(t.sinew); print(t.sinew_proxy); print(t.backend)",
        ]));

        let calls = std::fs::read_to_string(&log).unwrap();
        let calls: Vec<&str> = calls.lines().collect();
        let called = |prefix: &str| calls.iter().any(|c| c.starts_with(prefix));
        assert!(
            called("cargo build --bins"),
            "demo/run.sh builds: {calls:#?}"
        );
        assert!(
            called("sinew demo --duration 2s"),
            "demo/run.sh runs the sinew in {var}: {calls:#?}\n{demo}"
        );
        assert!(called("cargo build -p sinew-proxy"), "{calls:#?}");
        assert!(
            called("sinew-proxy --config demo/mesh.yaml"),
            "demo/standalone.sh runs the sinew-proxy in {var}: {calls:#?}\n{standalone}"
        );
        assert!(
            called("cargo build --quiet --profile dev --bins"),
            "{calls:#?}"
        );
        for bin in ["sinew", "sinew-proxy", "bench-backend"] {
            let expected = debug.join(bin).display().to_string();
            assert!(
                bench.lines().any(|l| l == expected),
                "with {var}, the bench harness finds {expected}: {bench}"
            );
        }
    }
    std::fs::remove_dir_all(&work).unwrap();
}

/// The words between `open` and the next `close` in `text`, at every `open`.
fn lists_after<'a>(text: &'a str, open: &str, close: char) -> Vec<&'a str> {
    text.split(open)
        .skip(1)
        .filter_map(|rest| rest.split(close).next())
        .flat_map(|list| list.split([' ', ',', '"', '\'']))
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .collect()
}

/// What the README says the test command installs names every package the scripts
/// install: `scripts/test`'s apt and pip lists, `scripts/kube-envtest`'s etcd, and the
/// benchmark harness's apt packages.
#[test]
fn the_readmes_list_of_installs_names_what_the_scripts_install() {
    let text = readme();
    let said = text
        .split_once("What the second command installs")
        .expect("the README says what the test command installs")
        .1
        .split("\n\n")
        .next()
        .unwrap();
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();
    let test = read("scripts/test");
    let mut packages = lists_after(&test, "missing+=(", ')');
    packages.extend(lists_after(&test, "python_packages=(", ')'));
    assert!(packages.len() >= 10, "{packages:?}");
    let envtest = read("scripts/kube-envtest");
    packages.extend(lists_after(&envtest, "apt-get install -y -qq ", '>'));
    let tools = read("bench/harness/tools.py");
    let apt = tools
        .split_once("APT = {")
        .expect("the bench harness's APT table")
        .1
        .split('}')
        .next()
        .unwrap();
    packages.extend(apt.split(',').filter_map(|kv| {
        kv.split_once(':')
            .map(|(_, pkg)| pkg.trim().trim_matches('"'))
    }));
    packages.extend(lists_after(&tools, "_apt_optional(tools, \"", '"'));
    let unsaid: Vec<&str> = packages.into_iter().filter(|p| !said.contains(p)).collect();
    assert!(
        unsaid.is_empty(),
        "the README does not say the test command installs {unsaid:?}:\n{said}"
    );
}
