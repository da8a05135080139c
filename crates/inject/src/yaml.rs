//! `sinew inject -f`: injection over multi-document YAML, offline.
//!
//! Pods and the pod templates of Deployments, StatefulSets, DaemonSets, ReplicaSets,
//! ReplicationControllers, Jobs and CronJobs (also inside a `kind: List`) are injected;
//! every other document passes through unchanged. Key order is kept; comments are not
//! (YAML comments do not survive parsing). All or nothing: one bad document and
//! nothing is printed.

use serde::Deserialize;

use crate::InjectConfig;
use crate::patch::apply_yaml;
use crate::pod::{Outcome, inject_pod};

/// A document `sinew inject` could not handle: the file, the document (1-based), its
/// kind and name when known, the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: document {document}{what}: {message}")]
pub struct YamlError {
    /// The file (or `-` for standard input).
    pub file: String,
    /// The document's number in the file, from 1.
    pub document: usize,
    /// ` (Kind namespace/name)` when known, else empty.
    pub what: String,
    /// `field: reason`, or the YAML parser's message.
    pub message: String,
}

/// What happened to one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocReport {
    /// The document's number in the file, from 1.
    pub document: usize,
    /// `Kind namespace/name`.
    pub what: String,
    /// `injected`, `skipped: <why>` or `unchanged (not a workload)`.
    pub result: String,
}

/// The injected text and what happened to each document.
#[derive(Debug, Clone)]
pub struct Injected {
    /// The documents, separated by `---`.
    pub output: String,
    /// One entry per document.
    pub reports: Vec<DocReport>,
}

/// Where the pod template lies in a document of this kind, if it has one.
pub fn template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    match (group, kind) {
        ("", "Pod") => Some(&[]),
        ("", "ReplicationController")
        | ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job") => Some(&["spec", "template"]),
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

fn describe(doc: &serde_json::Value) -> String {
    let kind = doc
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or("(no kind)");
    let meta = doc.get("metadata");
    let name = meta
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(|v| v.as_str())
        .unwrap_or("(no name)");
    match meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
    {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Injects every workload in `text` (the contents of `file`).
pub fn inject_yaml(file: &str, text: &str, config: &InjectConfig) -> Result<Injected, YamlError> {
    let mut docs = Vec::new();
    let mut reports = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let err = |what: String, message: String| YamlError {
            file: file.to_owned(),
            document: n,
            what,
            message,
        };
        let mut doc = serde_norway::Value::deserialize(de)
            .map_err(|e| err(String::new(), format!("not valid YAML: {e}")))?;
        if doc.is_null() {
            continue; // an empty document (`---` at the end)
        }
        let json = serde_json::to_value(&doc).map_err(|e| {
            err(
                String::new(),
                format!("cannot be read as a Kubernetes object: {e}"),
            )
        })?;
        if !json.is_object() {
            return Err(err(
                String::new(),
                "must be a Kubernetes object (a map)".into(),
            ));
        }
        let what = describe(&json);
        let mut ops = Vec::new();
        let mut results = Vec::new();
        let mut visit = |obj: &serde_json::Value, at: Vec<String>| -> Result<(), YamlError> {
            let s = |k: &str| obj.get(k).and_then(|v| v.as_str()).unwrap_or("");
            let Some(tpath) = template_path(s("apiVersion"), s("kind")) else {
                return Ok(());
            };
            let mut full = at.clone();
            full.extend(tpath.iter().map(|s| (*s).to_owned()));
            let mut pod = obj;
            for seg in tpath {
                pod = pod.get(seg).ok_or_else(|| {
                    let mut f = at.clone();
                    f.extend(tpath.iter().map(|s| (*s).to_owned()));
                    err(
                        format!(" ({what})"),
                        format!("{}: missing (a workload needs a pod template)", f.join(".")),
                    )
                })?;
            }
            let segs: Vec<&str> = full.iter().map(String::as_str).collect();
            match inject_pod(pod, &segs, config) {
                Ok(Outcome::Injected(o)) => {
                    ops.extend(o);
                    results.push("injected".to_owned());
                }
                Ok(Outcome::Skipped(why)) => results.push(format!("skipped: {why}")),
                Err(e) => return Err(err(format!(" ({what})"), e.to_string())),
            }
            Ok(())
        };
        if json.get("kind").and_then(|v| v.as_str()) == Some("List") {
            let items = json
                .get("items")
                .and_then(|v| v.as_array())
                .ok_or_else(|| err(format!(" ({what})"), "items: must be a list".into()))?;
            for (j, item) in items.iter().enumerate() {
                visit(item, vec!["items".into(), j.to_string()])?;
            }
        } else {
            visit(&json, Vec::new())?;
        }
        apply_yaml(&mut doc, &ops).map_err(|e| err(format!(" ({what})"), e))?;
        reports.push(DocReport {
            document: n,
            what,
            result: if results.is_empty() {
                "unchanged (not a workload)".into()
            } else {
                results.join(", ")
            },
        });
        docs.push((n, doc));
    }
    let mut output = String::new();
    for (i, (n, doc)) in docs.iter().enumerate() {
        if i > 0 {
            output.push_str("---\n");
        }
        let text = serde_norway::to_string(doc).map_err(|e| YamlError {
            file: file.to_owned(),
            document: *n,
            what: String::new(),
            message: format!("cannot be written: {e}"),
        })?;
        output.push_str(&text);
    }
    Ok(Injected { output, reports })
}
