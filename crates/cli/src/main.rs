//! `sinew`: the operator CLI (and, from the control-plane work on, the control plane).
//!
//! Today it validates configuration documents with the same model the proxy and the
//! control plane use, so a file checked here is a file the mesh accepts.

use std::io::Read;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sinew_model::{ConfigErrors, Resources, parse_documents};

/// Sinew service mesh.
#[derive(Debug, Parser)]
#[command(name = "sinew", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate documents (Service, Workload, HTTPRoute, Proxy) without applying them.
    Validate {
        /// Files or directories of .yaml/.yml files; `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
}

fn yaml_files(path: &PathBuf, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() || matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            {
                yaml_files(&p, out)?;
            }
        }
    } else {
        out.push(path.clone());
    }
    Ok(())
}

fn validate(paths: &[PathBuf]) -> Result<usize, ConfigErrors> {
    let mut files = Vec::new();
    let mut errors = ConfigErrors::default();
    for p in paths {
        if let Err(e) = yaml_files(p, &mut files) {
            errors.push(sinew_model::ConfigError::new(format!(
                "{}: {e}",
                p.display()
            )));
        }
    }
    let mut docs = Vec::new();
    for f in &files {
        let (label, text) = if f.as_os_str() == "-" {
            let mut s = String::new();
            match std::io::stdin().read_to_string(&mut s) {
                Ok(_) => ("<stdin>".to_owned(), s),
                Err(e) => {
                    errors.push(sinew_model::ConfigError::new(format!("<stdin>: {e}")));
                    continue;
                }
            }
        } else {
            let label = f.display().to_string();
            match std::fs::read_to_string(f) {
                Ok(s) => (label, s),
                Err(e) => {
                    errors.push(sinew_model::ConfigError::new(format!(
                        "{label}: cannot read: {e}"
                    )));
                    continue;
                }
            }
        };
        match parse_documents(&label, &text) {
            Ok(d) => docs.extend(d),
            Err(e) => errors.0.extend(e.0),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let n = docs.len();
    Resources::from_documents(docs).map(|_| n)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => match validate(&files) {
            Ok(n) => {
                println!("{n} documents valid");
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
    }
}
