//! Contexts, like kubectl's: named sets of {server, credentials, namespace} in one
//! file, one of them current. A client command's target is resolved field by field:
//! its flag, then the environment (`SINEW_SERVER`, `SINEW_CREDENTIALS`,
//! `SINEW_NAMESPACE`), then the context (`--context`, `SINEW_CONTEXT`, else the
//! file's `current-context`), then the built-in default.
//!
//! The file is `$SINEW_CONFIG`, else `$XDG_CONFIG_HOME/sinew/config.yaml`, else
//! `~/.config/sinew/config.yaml`:
//!
//! ```yaml
//! current-context: demo
//! contexts:
//!   demo:
//!     server: https://127.0.0.1:41234
//!     credentials: /tmp/sinew-demo/admin.credentials
//!     namespace: demo
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// One named context; every field optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    /// The control plane's URL.
    pub server: Option<String>,
    /// The operator credential file.
    pub credentials: Option<PathBuf>,
    /// The namespace commands use without `-n`.
    pub namespace: Option<String>,
}

/// The context file's contents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// The context used when neither `--context` nor `SINEW_CONTEXT` names one.
    pub current: Option<String>,
    /// Every context, by name.
    pub contexts: BTreeMap<String, Context>,
}

/// A non-empty environment variable.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Where the context file is (it need not exist).
pub fn path() -> PathBuf {
    if let Some(p) = env("SINEW_CONFIG") {
        return PathBuf::from(p);
    }
    let base = env("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".config")))
        .unwrap_or_else(|| PathBuf::from(".config"));
    base.join("sinew").join("config.yaml")
}

impl Config {
    /// Reads the file at `path`; a missing file is an empty config. A malformed one
    /// is an error naming the file and the field.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => bail!("{}: cannot read: {e}", path.display()),
        };
        Config::parse(&text).with_context(|| format!("{}", path.display()))
    }

    /// Parses the file's text; errors name the field.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let doc: serde_json::Value =
            serde_norway::from_str(text).map_err(|e| anyhow::anyhow!("not YAML: {e}"))?;
        let serde_json::Value::Object(top) = doc else {
            bail!("expected a mapping with current-context and contexts");
        };
        let mut config = Config::default();
        for (key, value) in top {
            match key.as_str() {
                "current-context" => config.current = Some(string(&value, "current-context")?),
                "contexts" => {
                    let serde_json::Value::Object(contexts) = value else {
                        bail!("contexts: expected a mapping of names to contexts");
                    };
                    for (name, c) in contexts {
                        let serde_json::Value::Object(fields) = c else {
                            bail!(
                                "contexts.{name}: expected a mapping (server, credentials, namespace)"
                            );
                        };
                        let mut ctx = Context::default();
                        for (field, v) in fields {
                            let at = format!("contexts.{name}.{field}");
                            match field.as_str() {
                                "server" => ctx.server = Some(string(&v, &at)?),
                                "credentials" => {
                                    ctx.credentials = Some(PathBuf::from(string(&v, &at)?))
                                }
                                "namespace" => ctx.namespace = Some(string(&v, &at)?),
                                _ => bail!("{at}: unknown field (server, credentials, namespace)"),
                            }
                        }
                        config.contexts.insert(name, ctx);
                    }
                }
                other => bail!("{other}: unknown field (current-context, contexts)"),
            }
        }
        if let Some(c) = &config.current
            && !config.contexts.contains_key(c)
        {
            bail!("current-context: no context named {c:?}");
        }
        Ok(config)
    }

    /// The file's text.
    pub fn to_yaml(&self) -> anyhow::Result<String> {
        let mut top = serde_json::Map::new();
        if let Some(c) = &self.current {
            top.insert("current-context".into(), c.clone().into());
        }
        let mut contexts = serde_json::Map::new();
        for (name, c) in &self.contexts {
            let mut m = serde_json::Map::new();
            if let Some(s) = &c.server {
                m.insert("server".into(), s.clone().into());
            }
            if let Some(p) = &c.credentials {
                m.insert("credentials".into(), p.display().to_string().into());
            }
            if let Some(n) = &c.namespace {
                m.insert("namespace".into(), n.clone().into());
            }
            contexts.insert(name.clone(), m.into());
        }
        top.insert("contexts".into(), contexts.into());
        Ok(serde_norway::to_string(&serde_json::Value::Object(top))?)
    }

    /// Writes the file (creating its directory), owner-only: it names credentials.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create", dir.display()))?;
        }
        let text = self.to_yaml()?;
        Ok(sinew_tls::private_file::write(path, text.as_bytes())?)
    }

    /// The context a command uses: `name` (from `--context` or `SINEW_CONTEXT`), which
    /// must exist, else the current one, else none.
    pub fn select(&self, name: Option<&str>, file: &Path) -> anyhow::Result<Option<&Context>> {
        match name.or(self.current.as_deref()) {
            None => Ok(None),
            Some(n) => match self.contexts.get(n) {
                Some(c) => Ok(Some(c)),
                None => bail!(
                    "no context named {n:?} in {} (contexts: {}); `sinew context set {n} --server URL` creates it",
                    file.display(),
                    if self.contexts.is_empty() {
                        "none".to_owned()
                    } else {
                        self.contexts.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            },
        }
    }
}

fn string(v: &serde_json::Value, at: &str) -> anyhow::Result<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Ok(s.clone()),
        serde_json::Value::String(_) => bail!("{at}: empty"),
        other => bail!("{at}: expected a string, found {other}"),
    }
}

/// `sinew context`'s subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ContextCommand {
    /// List the contexts; `*` marks the current one.
    List,
    /// Print the current context's name.
    Current,
    /// Make NAME the current context.
    Use {
        /// The context's name.
        name: String,
    },
    /// Create or update a context (only the fields given change).
    Set {
        /// The context's name.
        name: String,
        /// The control plane's URL (https://host:port).
        #[arg(long)]
        server: Option<String>,
        /// The operator credential file (stored as an absolute path).
        #[arg(long)]
        credentials: Option<PathBuf>,
        /// The namespace commands use without -n.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Also make it the current context.
        #[arg(long = "use")]
        make_current: bool,
    },
    /// Delete a context.
    Delete {
        /// The context's name.
        name: String,
    },
}

/// Runs `sinew context ...`.
pub fn run(command: ContextCommand) -> anyhow::Result<i32> {
    let file = path();
    let mut config = Config::load(&file)?;
    match command {
        ContextCommand::List => {
            let rows: Vec<[String; 5]> = config
                .contexts
                .iter()
                .map(|(name, c)| {
                    let dash = |s: Option<String>| s.unwrap_or_else(|| "-".into());
                    [
                        if config.current.as_deref() == Some(name) {
                            "*".into()
                        } else {
                            String::new()
                        },
                        name.clone(),
                        dash(c.server.clone()),
                        dash(c.namespace.clone()),
                        dash(c.credentials.as_ref().map(|p| p.display().to_string())),
                    ]
                })
                .collect();
            crate::client::print_table(
                &["CURRENT", "NAME", "SERVER", "NAMESPACE", "CREDENTIALS"],
                &rows,
            )?;
            if rows.is_empty() {
                eprintln!(
                    "no contexts in {}; `sinew context set NAME --server URL --credentials FILE --namespace NS --use` creates one",
                    file.display()
                );
            }
        }
        ContextCommand::Current => match &config.current {
            Some(c) => outln!("{c}")?,
            None => bail!("no current context in {}", file.display()),
        },
        ContextCommand::Use { name } => {
            if !config.contexts.contains_key(&name) {
                config.select(Some(&name), &file)?;
            }
            config.current = Some(name.clone());
            config.save(&file)?;
            eprintln!("switched to context {name} ({})", file.display());
        }
        ContextCommand::Set {
            name,
            server,
            credentials,
            namespace,
            make_current,
        } => {
            let credentials = credentials
                .map(|p| std::path::absolute(&p).with_context(|| format!("{}", p.display())))
                .transpose()?;
            let created = !config.contexts.contains_key(&name);
            let c = config.contexts.entry(name.clone()).or_default();
            if let Some(s) = server {
                c.server = Some(s);
            }
            if let Some(p) = credentials {
                c.credentials = Some(p);
            }
            if let Some(n) = namespace {
                c.namespace = Some(n);
            }
            if make_current {
                config.current = Some(name.clone());
            }
            config.save(&file)?;
            eprintln!(
                "context {name} {} in {}{}",
                if created { "created" } else { "updated" },
                file.display(),
                if make_current {
                    "; it is the current context".to_owned()
                } else {
                    format!("; `sinew context use {name}` to use it")
                }
            );
        }
        ContextCommand::Delete { name } => {
            if config.contexts.remove(&name).is_none() {
                config.select(Some(&name), &file)?;
            }
            if config.current.as_deref() == Some(name.as_str()) {
                config.current = None;
            }
            config.save(&file)?;
            eprintln!("context {name} deleted");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_bad_fields() {
        let text = "current-context: demo\ncontexts:\n  demo:\n    server: https://h:1\n    namespace: demo\n";
        let c = match Config::parse(text) {
            Ok(c) => c,
            Err(e) => panic!("{e:#}"),
        };
        assert_eq!(c.current.as_deref(), Some("demo"));
        assert_eq!(c.contexts["demo"].namespace.as_deref(), Some("demo"));
        let again = c
            .to_yaml()
            .map(|y| Config::parse(&y).map_err(|e| e.to_string()));
        assert_eq!(again.ok().and_then(Result::ok), Some(c));
        for (bad, why) in [
            (
                "contexts:\n  demo:\n    namespace: 3\n",
                "contexts.demo.namespace",
            ),
            ("contexts:\n  demo:\n    sever: x\n", "contexts.demo.sever"),
            ("current-context: x\ncontexts: {}\n", "current-context"),
            ("contexts: [a]\n", "contexts"),
            ("colour: red\n", "colour"),
        ] {
            match Config::parse(bad) {
                Ok(c) => panic!("{bad:?} parsed as {c:?}"),
                Err(e) => assert!(e.to_string().starts_with(why), "{bad:?}: {e}"),
            }
        }
    }
}
