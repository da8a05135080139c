//! The RFC 6902 JSON Patch injection produces, and applying it to a document.
//!
//! Injection only ever adds (a member to an object, an element to an array), so `add`
//! is the one operation; applying it here is what `sinew inject` does offline, and what
//! the API server does with the webhook's answer.

use serde::Serialize;

/// One `add` operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatchOp {
    /// Always `add`.
    pub op: &'static str,
    /// A JSON Pointer (RFC 6901); `-` appends to an array.
    pub path: String,
    /// The value added.
    pub value: serde_json::Value,
}

impl PatchOp {
    /// An `add` at `path` (built from unescaped segments).
    pub fn add(segments: &[&str], value: serde_json::Value) -> PatchOp {
        PatchOp {
            op: "add",
            path: pointer(segments),
            value,
        }
    }
}

/// A JSON Pointer from unescaped segments (`~` → `~0`, `/` → `~1`).
pub fn pointer(segments: &[&str]) -> String {
    let mut s = String::new();
    for seg in segments {
        s.push('/');
        s.push_str(&seg.replace('~', "~0").replace('/', "~1"));
    }
    s
}

fn unescape(seg: &str) -> String {
    seg.replace("~1", "/").replace("~0", "~")
}

/// Applies `add` operations to a YAML document, keeping its key order. Errors name
/// the path that does not exist.
pub fn apply_yaml(doc: &mut serde_norway::Value, ops: &[PatchOp]) -> Result<(), String> {
    for op in ops {
        let value = serde_norway::to_value(&op.value).map_err(|e| format!("{}: {e}", op.path))?;
        let segments: Vec<String> = op.path.split('/').skip(1).map(unescape).collect();
        let Some((last, parents)) = segments.split_last() else {
            *doc = value;
            continue;
        };
        let mut here = &mut *doc;
        for seg in parents {
            here = match here {
                serde_norway::Value::Mapping(m) => m.get_mut(seg.as_str()),
                serde_norway::Value::Sequence(s) => {
                    seg.parse::<usize>().ok().and_then(|i| s.get_mut(i))
                }
                _ => None,
            }
            .ok_or_else(|| format!("{}: no {seg:?} to add under", op.path))?;
        }
        match here {
            serde_norway::Value::Mapping(m) => {
                m.insert(serde_norway::Value::String(last.clone()), value);
            }
            serde_norway::Value::Sequence(s) => {
                let at = if last == "-" {
                    s.len()
                } else {
                    last.parse::<usize>()
                        .ok()
                        .filter(|i| *i <= s.len())
                        .ok_or_else(|| format!("{}: index out of range", op.path))?
                };
                s.insert(at, value);
            }
            _ => return Err(format!("{}: the parent is not an object or array", op.path)),
        }
    }
    Ok(())
}

/// Applies `add` operations to a JSON document (as the API server does).
pub fn apply_json(doc: &mut serde_json::Value, ops: &[PatchOp]) -> Result<(), String> {
    for op in ops {
        let segments: Vec<String> = op.path.split('/').skip(1).map(unescape).collect();
        let Some((last, parents)) = segments.split_last() else {
            *doc = op.value.clone();
            continue;
        };
        let mut here = &mut *doc;
        for seg in parents {
            here = match here {
                serde_json::Value::Object(m) => m.get_mut(seg.as_str()),
                serde_json::Value::Array(s) => seg.parse::<usize>().ok().and_then(|i| s.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| format!("{}: no {seg:?} to add under", op.path))?;
        }
        match here {
            serde_json::Value::Object(m) => {
                m.insert(last.clone(), op.value.clone());
            }
            serde_json::Value::Array(s) => {
                let at = if last == "-" {
                    s.len()
                } else {
                    last.parse::<usize>()
                        .ok()
                        .filter(|i| *i <= s.len())
                        .ok_or_else(|| format!("{}: index out of range", op.path))?
                };
                s.insert(at, op.value.clone());
            }
            _ => return Err(format!("{}: the parent is not an object or array", op.path)),
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pointers_escape_and_adds_apply() {
        assert_eq!(
            pointer(&["metadata", "annotations", "sinew.dev/injected"]),
            "/metadata/annotations/sinew.dev~1injected"
        );
        let mut doc =
            json!({"metadata": {"annotations": {}}, "spec": {"containers": [{"name": "app"}]}});
        let ops = [
            PatchOp::add(&["metadata", "annotations", "a/b~c"], json!("x")),
            PatchOp::add(&["spec", "containers", "0"], json!({"name": "proxy"})),
            PatchOp::add(&["spec", "volumes"], json!([])),
            PatchOp::add(&["spec", "volumes", "-"], json!({"name": "v"})),
        ];
        apply_json(&mut doc, &ops).unwrap();
        assert_eq!(doc["metadata"]["annotations"]["a/b~c"], "x");
        assert_eq!(doc["spec"]["containers"][0]["name"], "proxy");
        assert_eq!(doc["spec"]["containers"][1]["name"], "app");
        assert_eq!(doc["spec"]["volumes"][0]["name"], "v");

        let mut y: serde_norway::Value =
            serde_norway::from_str("spec: {containers: [{name: app}]}\nkind: Pod\n").unwrap();
        apply_yaml(&mut y, &ops[1..]).unwrap();
        let out = serde_norway::to_string(&y).unwrap();
        // Key order is the user's: spec stays before kind.
        assert!(
            out.find("spec:").unwrap() < out.find("kind:").unwrap(),
            "{out}"
        );
        assert_eq!(y["spec"]["containers"][0]["name"], "proxy");
        let err = apply_yaml(&mut y, &ops[..1]).unwrap_err();
        assert!(err.contains("no \"metadata\""), "{err}");
    }
}
