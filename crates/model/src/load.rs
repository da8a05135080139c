//! Reading documents: YAML streams split into documents, each parsed into its typed
//! kind with the file, line and field path of any problem. Validating them as a set
//! is [`crate::set::Resources`]' job (the checks are in [`crate::validate`]).

use serde::Deserialize;

use crate::error::{ConfigError, ConfigErrors};
use crate::resource::*;

// The validated set and its helpers lived here; their paths stay for callers.
pub use crate::set::{Key, Resources};
pub use crate::validate::{MAX_CLOCK_SKEW, resolve_port};

/// A parsed document and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The typed resource.
    pub resource: Resource,
    /// Source label (usually a file path).
    pub file: String,
    /// 1-based line where the document starts; 0 when unknown (e.g. from a store).
    pub line: usize,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
}

/// Splits a YAML stream into `(first line, text)` documents at `---` lines.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs
}

/// Turns a serde_norway error into (line within the document, reason without location).
fn yaml_problem(e: &serde_norway::Error) -> (Option<usize>, String) {
    let line = e.location().map(|l| l.line());
    let mut msg = e.to_string();
    if let Some(idx) = msg.find(" at line ") {
        msg.truncate(idx);
    }
    (line, msg)
}

fn parse_typed<S: serde::de::DeserializeOwned>(
    file: &str,
    start: usize,
    text: &str,
) -> Result<Object<S>, ConfigError> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let (line, reason) = yaml_problem(e.inner());
        // serde_norway sometimes prefixes its own path; keep the message readable.
        let reason = match reason.split_once(": ") {
            Some((pre, rest)) if path.starts_with(pre) => rest.to_owned(),
            _ => reason,
        };
        let mut err = ConfigError::new(reason).at(file, line.map(|l| start + l - 1));
        if path != "." {
            err = err.field(path);
        }
        err
    })
}

/// Parses a YAML stream of documents. Empty documents are skipped. All problems are
/// reported, each with file, line and field path.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Document>, ConfigErrors> {
    let mut out = Vec::new();
    let mut errors = ConfigErrors::default();
    for (start, doc) in split_documents(text) {
        let value: serde_norway::Value = match serde_norway::from_str(&doc) {
            Ok(v) => v,
            Err(e) => {
                let (line, reason) = yaml_problem(&e);
                errors.push(
                    ConfigError::new(format!("invalid YAML: {reason}"))
                        .at(file, Some(start + line.unwrap_or(1) - 1)),
                );
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        let header: Header = match serde_norway::from_value(value) {
            Ok(h) => h,
            Err(_) => {
                errors.push(
                    ConfigError::new("a document must be a mapping with apiVersion and kind")
                        .at(file, Some(start)),
                );
                continue;
            }
        };
        let Some(kind) = header.kind else {
            errors.push(
                ConfigError::new("missing field `kind`")
                    .field("kind")
                    .at(file, Some(start)),
            );
            continue;
        };
        let api = header.api_version.unwrap_or_default();
        let api_ok = match kind.as_str() {
            "HTTPRoute" => {
                api == format!("{GATEWAY_GROUP}/v1") || api == format!("{GATEWAY_GROUP}/v1beta1")
            }
            _ => api == SINEW_API_VERSION,
        };
        let known = KINDS;
        if !known.contains(&kind.as_str()) {
            errors.push(
                ConfigError::new(format!(
                    "unknown kind {kind:?}; expected one of {}",
                    known.join(", ")
                ))
                .field("kind")
                .at(file, Some(start)),
            );
            continue;
        }
        if !api_ok {
            let want = if kind == "HTTPRoute" {
                format!("{GATEWAY_GROUP}/v1")
            } else {
                SINEW_API_VERSION.to_owned()
            };
            errors.push(
                ConfigError::new(format!(
                    "apiVersion {api:?} is not served for kind {kind}; use {want:?}"
                ))
                .field("apiVersion")
                .at(file, Some(start)),
            );
            continue;
        }
        let parsed = match kind.as_str() {
            "Proxy" => parse_typed(file, start, &doc).map(Resource::Proxy),
            "Service" => parse_typed(file, start, &doc).map(Resource::Service),
            "Workload" => parse_typed(file, start, &doc).map(Resource::Workload),
            "MeshConfig" => parse_typed(file, start, &doc).map(Resource::MeshConfig),
            "AuthorizationPolicy" => {
                parse_typed(file, start, &doc).map(Resource::AuthorizationPolicy)
            }
            "RequestAuthentication" => {
                parse_typed(file, start, &doc).map(Resource::RequestAuthentication)
            }
            "TrafficPolicy" => parse_typed(file, start, &doc).map(Resource::TrafficPolicy),
            "RoutePolicy" => parse_typed(file, start, &doc).map(Resource::RoutePolicy),
            _ => parse_typed(file, start, &doc).map(Resource::HttpRoute),
        };
        match parsed {
            Ok(resource) => out.push(Document {
                resource,
                file: file.to_owned(),
                line: start,
            }),
            Err(e) => errors.push(e),
        }
    }
    errors.into_result(out)
}

/// Parses several `(label, text)` sources; every problem of every source is reported.
pub fn parse_sources<'a>(
    sources: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<Document>, ConfigErrors> {
    let mut docs = Vec::new();
    let mut errors = ConfigErrors::default();
    for (label, text) in sources {
        match parse_documents(label, text) {
            Ok(d) => docs.extend(d),
            Err(e) => errors.0.extend(e.0),
        }
    }
    errors.into_result(docs)
}

/// Parses the sources of an apply: as [`parse_sources`], and a source with no
/// documents (empty, or only comments) is an error naming it, as is an apply with
/// no source at all: an apply that would change nothing is a mistake (a wrong
/// file, a truncated one), not a success to report.
pub fn parse_apply<'a>(
    sources: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<Document>, ConfigErrors> {
    let mut docs = Vec::new();
    let mut errors = ConfigErrors::default();
    let mut any = false;
    for (label, text) in sources {
        any = true;
        match parse_documents(label, text) {
            Ok(d) if d.is_empty() => errors.push(
                ConfigError::new(
                    "no documents: the file is empty or holds only comments; nothing to apply",
                )
                .at(label, None),
            ),
            Ok(d) => docs.extend(d),
            Err(e) => errors.0.extend(e.0),
        }
    }
    if !any {
        errors.push(ConfigError::new("nothing to apply: no files were sent"));
    }
    errors.into_result(docs)
}

/// Where a document came from, for messages about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Source label.
    pub file: String,
    /// First line of the document.
    pub line: usize,
}
