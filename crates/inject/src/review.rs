//! AdmissionReview in, AdmissionReview with a JSON Patch out.
//!
//! The webhook answers for Pod creations only; anything else it is sent (another
//! resource, an update, a subresource) is allowed unchanged, so a too-wide webhook
//! configuration refuses nothing. A Pod is refused only for a Sinew annotation that
//! cannot be honoured (the message names it): injecting with settings the user did
//! not ask for would be worse.

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::InjectConfig;
use crate::pod::{Outcome, inject_pod};

/// A request the webhook cannot read (answered with HTTP 400; the API server then
/// applies the configuration's failurePolicy).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad AdmissionReview: {0}")]
pub struct ReviewError(pub String);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: String,
    kind: String,
    request: Option<Request>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    uid: String,
    kind: Option<GroupVersionKind>,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    object: Option<Value>,
}

#[derive(Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// What the webhook decided, for its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not a Pod creation: allowed unchanged.
    NotForUs,
    /// Allowed with a patch of this many operations.
    Injected(usize),
    /// Allowed unchanged, and why.
    Skipped(String),
    /// Refused, and why.
    Refused(String),
}

/// Answers one AdmissionReview (the request body) with the response body.
pub fn review(body: &[u8], config: &InjectConfig) -> Result<(Vec<u8>, Decision), ReviewError> {
    let r: Review = serde_json::from_slice(body)
        .map_err(|e| ReviewError(format!("not JSON of the expected shape: {e}")))?;
    if r.kind != "AdmissionReview" || !r.api_version.starts_with("admission.k8s.io/") {
        return Err(ReviewError(format!(
            "expected an admission.k8s.io AdmissionReview, got {} {}",
            r.api_version, r.kind
        )));
    }
    let req = r.request.ok_or_else(|| ReviewError("no request".into()))?;
    let is_pod = req
        .kind
        .as_ref()
        .is_some_and(|k| k.group.is_empty() && k.kind == "Pod");
    let sub = req.sub_resource.as_deref().unwrap_or("");
    let mut response = json!({"uid": req.uid, "allowed": true});
    let decision = match (
        &req.object,
        is_pod && sub.is_empty() && req.operation == "CREATE",
    ) {
        (Some(_), true)
            if req
                .namespace
                .as_ref()
                .is_some_and(|ns| config.excluded_namespaces.contains(ns)) =>
        {
            Decision::Skipped(format!(
                "namespace {} is never injected",
                req.namespace.as_deref().unwrap_or("")
            ))
        }
        (Some(pod), true) => match inject_pod(pod, &[], config) {
            Ok(Outcome::Injected(ops)) => {
                let patch = serde_json::to_vec(&ops)
                    .map_err(|e| ReviewError(format!("cannot encode the patch: {e}")))?;
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
                Decision::Injected(ops.len())
            }
            Ok(Outcome::Skipped(why)) => Decision::Skipped(why),
            Err(e) => {
                let pod = req
                    .name
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .or_else(|| pod.pointer("/metadata/name").and_then(Value::as_str))
                    .or_else(|| {
                        pod.pointer("/metadata/generateName")
                            .and_then(Value::as_str)
                    })
                    .unwrap_or("(unnamed)");
                let message = format!(
                    "sinew injection: Pod {}/{pod}: {e}",
                    req.namespace.as_deref().unwrap_or("")
                );
                response["allowed"] = json!(false);
                response["status"] =
                    json!({"code": 400, "reason": "BadRequest", "message": message});
                Decision::Refused(message)
            }
        },
        _ => Decision::NotForUs,
    };
    let out = json!({
        "apiVersion": r.api_version,
        "kind": "AdmissionReview",
        "response": response,
    });
    let bytes = serde_json::to_vec(&out)
        .map_err(|e| ReviewError(format!("cannot encode the answer: {e}")))?;
    Ok((bytes, decision))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::patch::{PatchOp, apply_json};

    fn request(object: Value, operation: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": operation, "namespace": "shop", "object": object
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_creation_gets_a_patch_that_applies() {
        let mut pod = json!({"metadata": {"generateName": "web-"}, "spec": {"containers": [{"name": "app", "image": "x"}]}});
        let (out, d) = review(&request(pod.clone(), "CREATE"), &InjectConfig::default()).unwrap();
        assert!(matches!(d, Decision::Injected(n) if n > 0));
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["response"]["uid"], "u-1");
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().unwrap())
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
        let ops: Vec<PatchOp> = ops
            .into_iter()
            .map(|o| PatchOp {
                op: "add",
                path: o["path"].as_str().unwrap().into(),
                value: o["value"].clone(),
            })
            .collect();
        apply_json(&mut pod, &ops).unwrap();
        assert_eq!(pod["spec"]["containers"][0]["name"], "sinew-proxy");
    }

    #[test]
    fn other_requests_pass_and_bad_ones_are_named() {
        let pod = json!({"metadata": {}, "spec": {"containers": [{"name": "app"}]}});
        let (out, d) = review(&request(pod, "UPDATE"), &InjectConfig::default()).unwrap();
        assert_eq!(d, Decision::NotForUs);
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["response"]["allowed"], true);
        assert!(out["response"].get("patch").is_none());

        let bad = json!({"metadata": {"name": "p", "annotations": {"sinew.dev/proxy-uid": "root"}}, "spec": {"containers": [{"name": "app"}]}});
        let (out, d) = review(&request(bad, "CREATE"), &InjectConfig::default()).unwrap();
        assert!(matches!(d, Decision::Refused(_)));
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["response"]["allowed"], false);
        let msg = out["response"]["status"]["message"].as_str().unwrap();
        assert!(
            msg.contains("Pod shop/p: metadata.annotations[\"sinew.dev/proxy-uid\"]"),
            "{msg}"
        );

        // The system's namespaces are refused by the webhook itself (on 1.20 the
        // configuration's selector cannot name them).
        let mut sys = request(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}}),
            "CREATE",
        );
        let mut v: Value = serde_json::from_slice(&sys).unwrap();
        v["request"]["namespace"] = json!("kube-system");
        sys = serde_json::to_vec(&v).unwrap();
        let (out, d) = review(&sys, &InjectConfig::default()).unwrap();
        assert!(
            matches!(d, Decision::Skipped(ref why) if why.contains("kube-system")),
            "{d:?}"
        );
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["response"]["allowed"], true);
        assert!(out["response"].get("patch").is_none());

        assert!(review(b"{", &InjectConfig::default()).is_err());
        assert!(
            review(
                br#"{"apiVersion":"v1","kind":"Pod"}"#,
                &InjectConfig::default()
            )
            .is_err()
        );
    }
}
