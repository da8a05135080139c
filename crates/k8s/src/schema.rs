//! OpenAPI v3 schemas of Sinew's documents for their CustomResourceDefinitions, generated
//! from the model's types (`schemars`, sinew-model's `schema` feature) and rewritten into
//! the *structural* form the API server requires: every `$ref` inlined, no `$schema` or
//! definitions, `nullable: true` instead of `null` in a type, closed sets of strings as
//! `enum`, a number-or-name as `x-kubernetes-int-or-string`, and nothing the API server
//! does not know (`const`, `default`, `title`, `additionalProperties: false`, unknown
//! formats).
//!
//! Objects list their fields and nothing else: like any CRD with a schema, the API server
//! prunes a field it does not know. `kubectl` refuses such a field before it is sent, from the
//! published schema (which an object marked `x-kubernetes-preserve-unknown-fields` would
//! leave empty for `kubectl explain` too). The control plane still validates every document
//! fully, as it does a file, and reports problems in the `Accepted` status condition.

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

/// How deep `$ref`s are inlined before a schema is cut short (a recursive type).
const MAX_DEPTH: usize = 32;

/// The formats kept; the API server ignores or warns about others (`uint16`...), whose
/// bounds are kept as `minimum`/`maximum` anyway.
const KNOWN_FORMATS: [&str; 6] = ["int32", "int64", "float", "double", "date-time", "byte"];

/// The structural OpenAPI v3 schema of `T` (a document's `spec`), as a CRD's
/// `openAPIV3Schema` needs it.
pub fn spec_schema<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut root = generator.into_root_schema_for::<T>().to_value();
    if let Some(root) = root.as_object_mut() {
        // The root's title is the Rust type's name; the CRD describes the kind itself.
        root.remove("title");
    }
    let defs = root
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    structural(&root, &defs, &mut Vec::new())
}

/// Rewrites one schema node (and everything under it) into structural form.
fn structural(node: &Value, defs: &Map<String, Value>, stack: &mut Vec<String>) -> Value {
    let Some(obj) = node.as_object() else {
        // `true` (anything): free-form.
        return json!({"x-kubernetes-preserve-unknown-fields": true});
    };
    let mut obj = obj.clone();
    if let Some(target) = obj.remove("$ref") {
        return inline(&target, obj, defs, stack);
    }
    let mut nullable = false;
    // `type: [T, "null"]` → `type: T, nullable: true`.
    if let Some(Value::Array(types)) = obj.get("type").cloned() {
        let rest: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
        nullable = rest.len() < types.len();
        match rest.as_slice() {
            [one] => {
                obj.insert("type".into(), (*one).clone());
            }
            _ => {
                obj.remove("type");
            }
        }
    }
    // `anyOf`/`oneOf`: an optional schema, a closed set of strings, or a number or name.
    let mut alternatives = None;
    for key in ["anyOf", "oneOf"] {
        let Some(Value::Array(alts)) = obj.remove(key) else {
            continue;
        };
        let (nulls, alts): (Vec<Value>, Vec<Value>) = alts
            .into_iter()
            .partition(|a| a.get("type").is_some_and(|t| t == "null"));
        nullable |= !nulls.is_empty();
        alternatives = Some(alts.iter().map(|a| structural(a, defs, stack)).collect());
    }
    let mut out = Map::new();
    for (k, v) in obj {
        match k.as_str() {
            "$schema" | "$defs" | "definitions" | "default" | "examples" | "title"
            | "deprecated" | "readOnly" | "writeOnly" => {}
            "const" => {
                out.insert("enum".into(), json!([v]));
            }
            "format" => {
                if v.as_str().is_some_and(|f| KNOWN_FORMATS.contains(&f)) {
                    out.insert(k, v);
                }
            }
            "properties" => {
                let props: Map<String, Value> = v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, s)| (name.clone(), structural(s, defs, stack)))
                    .collect();
                out.insert(k, Value::Object(props));
            }
            "items" | "additionalProperties" => match v {
                // `additionalProperties: false` (deny_unknown_fields): what the API server
                // does anyway (it prunes), and not allowed beside `properties`.
                Value::Bool(false) => {}
                Value::Bool(true) => {
                    out.insert("x-kubernetes-preserve-unknown-fields".into(), json!(true));
                }
                s => {
                    out.insert(k, structural(&s, defs, stack));
                }
            },
            _ => {
                out.insert(k, v);
            }
        }
    }
    if let Some(alts) = alternatives {
        merge_alternatives(&mut out, alts);
    }
    // A title is the first paragraph of a doc comment: keep its text in the description.
    if let Some(Value::String(title)) = node.get("title") {
        let text = match out.get("description").and_then(Value::as_str) {
            Some(d) => format!("{title}\n\n{d}"),
            None => title.clone(),
        };
        out.insert("description".into(), json!(text));
    }
    if nullable {
        out.insert("nullable".into(), json!(true));
    }
    Value::Object(out)
}

/// Inlines the definition `target` points at; the referring node's own keys (a field's
/// description, `nullable`) win over the definition's.
fn inline(
    target: &Value,
    siblings: Map<String, Value>,
    defs: &Map<String, Value>,
    stack: &mut Vec<String>,
) -> Value {
    let name = target
        .as_str()
        .and_then(|t| t.rsplit('/').next())
        .unwrap_or_default()
        .to_owned();
    let def = match defs.get(&name) {
        Some(def) if !stack.contains(&name) && stack.len() < MAX_DEPTH => def.clone(),
        // A recursive type (or a dangling reference): structural schemas cannot recurse,
        // so below this point the field is free-form and the control plane checks it.
        _ => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
    };
    stack.push(name);
    let mut out = structural(&def, defs, stack);
    stack.pop();
    let siblings = structural(&Value::Object(siblings), defs, stack);
    if let (Value::Object(out), Value::Object(siblings)) = (&mut out, siblings) {
        for (k, v) in siblings {
            out.insert(k, v);
        }
    }
    out
}

/// Folds `anyOf`/`oneOf` alternatives (already structural, `null` removed) into `obj`.
fn merge_alternatives(obj: &mut Map<String, Value>, alts: Vec<Value>) {
    let type_of = |a: &Value| a.get("type").and_then(Value::as_str).map(str::to_owned);
    let types: Vec<Option<String>> = alts.iter().map(type_of).collect();
    match alts.as_slice() {
        [] => {}
        // `Option<T>`: T itself.
        [one] => {
            if let Value::Object(one) = one {
                for (k, v) in one {
                    if k == "description" && obj.contains_key(k) {
                        continue;
                    }
                    obj.insert(k.clone(), v.clone());
                }
            }
        }
        // Unit variants, each with its own doc: one `enum`, the docs in the description.
        _ if types.iter().all(|t| t.as_deref() == Some("string"))
            && alts.iter().all(|a| a.get("enum").is_some()) =>
        {
            let mut values = Vec::new();
            let mut docs = Vec::new();
            for a in &alts {
                let vs = a
                    .get("enum")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                if let Some(d) = a.get("description").and_then(Value::as_str) {
                    let names: Vec<String> =
                        vs.iter().map(|v| format!("`{}`", str_of(v))).collect();
                    docs.push(format!("{}: {d}", names.join(", ")));
                }
                values.extend(vs);
            }
            obj.insert("type".into(), json!("string"));
            obj.insert("enum".into(), Value::Array(values));
            if !docs.is_empty() {
                let text = match obj.get("description").and_then(Value::as_str) {
                    Some(d) => format!("{d}\n\n{}", docs.join("\n")),
                    None => docs.join("\n"),
                };
                obj.insert("description".into(), json!(text));
            }
        }
        // A number or a name (e.g. a port).
        _ if types
            .iter()
            .all(|t| matches!(t.as_deref(), Some("integer" | "string")))
            && types.iter().any(|t| t.as_deref() == Some("integer"))
            && types.iter().any(|t| t.as_deref() == Some("string")) =>
        {
            obj.remove("type");
            obj.insert("x-kubernetes-int-or-string".into(), json!(true));
        }
        // Anything else has no structural form: free-form, checked by the control plane.
        _ => {
            obj.remove("type");
            obj.insert("x-kubernetes-preserve-unknown-fields".into(), json!(true));
        }
    }
}

fn str_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sinew_model::resource::{ProxySpec, ServiceSpec, TrafficPolicySpec};

    #[test]
    fn options_are_nullable_and_enums_closed() {
        let s = spec_schema::<ServiceSpec>();
        let lb = &s["properties"]["loadBalancer"];
        assert_eq!(lb["type"], "string", "{lb}");
        assert_eq!(lb["nullable"], true, "{lb}");
        assert_eq!(lb["enum"], json!(["PeakEWMA", "RoundRobin"]), "{lb}");
        let port = &s["properties"]["ports"]["items"]["properties"]["port"];
        assert_eq!(port["type"], "integer", "{port}");
        assert_eq!(port["maximum"], 65535, "{port}");
        assert_eq!(s["required"], json!(["ports"]));
        let selector = &s["properties"]["selector"];
        assert_eq!(
            selector["additionalProperties"]["type"], "string",
            "{selector}"
        );
    }

    #[test]
    fn a_port_by_number_or_name_is_int_or_string() {
        let s = spec_schema::<ProxySpec>();
        let port =
            &s["properties"]["outbound"]["properties"]["upstreams"]["items"]["properties"]["port"];
        assert_eq!(port["x-kubernetes-int-or-string"], true, "{port}");
        assert!(port.get("type").is_none(), "{port}");
    }

    #[test]
    fn descriptions_come_from_the_doc_comments() {
        let s = spec_schema::<TrafficPolicySpec>();
        let d = s["properties"]["circuitBreaker"]["properties"]["maxRequests"]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(d.contains("Requests in flight"), "{d}");
    }
}
