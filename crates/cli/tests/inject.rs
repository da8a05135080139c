//! `sinew inject -f`: offline injection of real multi-document YAML, checked by
//! structure (and by a real kube-apiserver, which validates the injected workloads).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const APP: &str = r#"# A real application: a Deployment, its Service, a nightly CronJob, an opted-out
# Pod and a StatefulSet inside a List.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations:
        sinew.dev/exclude-outbound-ports: "5432"
        sinew.dev/proxy-cpu-limit: "500m"
    spec:
      serviceAccountName: web
      initContainers:
        - name: migrate
          image: example.test/web:1.4
          args: [migrate]
      containers:
        - name: web
          image: example.test/web:1.4
          ports: [{name: http, containerPort: 8080}]
          resources:
            requests: {cpu: 1, memory: 128Mi}
      volumes:
        - name: cache
          emptyDir: {}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, protocol: TCP}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report, namespace: shop}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: example.test/report:2}]
---
apiVersion: v1
kind: Pod
metadata:
  name: debug
  namespace: shop
  annotations: {sinew.dev/inject: disabled}
spec:
  containers: [{name: shell, image: busybox}]
---
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: StatefulSet
    metadata: {name: db, namespace: shop}
    spec:
      serviceName: db
      selector: {matchLabels: {app: db}}
      template:
        metadata: {labels: {app: db}}
        spec:
          hostNetwork: true
          containers: [{name: db, image: example.test/db:16}]
  - apiVersion: apps/v1
    kind: DaemonSet
    metadata: {name: agent, namespace: shop}
    spec:
      selector: {matchLabels: {app: agent}}
      template:
        metadata: {labels: {app: agent}}
        spec:
          containers: [{name: agent, image: example.test/agent:1}]
"#;

fn sinew(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|l| l.iter().map(|c| c["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

fn arg_after<'a>(container: &'a Value, flag: &str) -> Option<&'a str> {
    let args = container["args"].as_array()?;
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1)?.as_str()
}

#[test]
fn inject_adds_the_sidecar_to_every_workload_and_nothing_else() {
    let out = sinew(&["inject", "-f", "-"], Some(APP));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let d = docs(&stdout);
    let original = docs(APP);
    assert_eq!(d.len(), 5);

    // The Deployment: sidecar first, capture step first, the user's things kept.
    let tpl = &d[0]["spec"]["template"];
    assert_eq!(names(&tpl["spec"]["containers"]), ["sinew-proxy", "web"]);
    assert_eq!(
        names(&tpl["spec"]["initContainers"]),
        ["sinew-init", "migrate"]
    );
    assert_eq!(
        names(&tpl["spec"]["volumes"]),
        ["cache", "sinew-identity-token", "sinew-xtables-lock"]
    );
    assert_eq!(tpl["spec"]["serviceAccountName"], "web");
    assert_eq!(tpl["metadata"]["annotations"]["sinew.dev/injected"], "true");
    assert_eq!(
        tpl["spec"]["containers"][1], original[0]["spec"]["template"]["spec"]["containers"][0],
        "the app container is changed"
    );
    let proxy = &tpl["spec"]["containers"][0];
    assert_eq!(proxy["resources"]["limits"]["cpu"], "500m");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    let init = &tpl["spec"]["initContainers"][0];
    assert_eq!(arg_after(init, "--exclude-outbound-ports"), Some("5432"));
    assert_eq!(arg_after(init, "--proxy-uid"), Some("1337"));
    // Everything outside the template is as it was.
    let mut rest = d[0].clone();
    let mut orig = original[0].clone();
    rest["spec"]["template"] = Value::Null;
    orig["spec"]["template"] = Value::Null;
    assert_eq!(rest, orig);
    // Key order is the user's.
    assert!(stdout.find("apiVersion: apps/v1").unwrap() < stdout.find("kind: Deployment").unwrap());

    // The Service: untouched.
    assert_eq!(d[1], original[1]);
    // The CronJob's pod template is injected.
    let cron = &d[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(names(&cron["containers"]), ["sinew-proxy", "report"]);
    // The opted-out Pod: untouched.
    assert_eq!(d[3], original[3]);
    // In the List: the host-network StatefulSet untouched, the DaemonSet injected.
    assert_eq!(d[4]["items"][0], original[4]["items"][0]);
    assert_eq!(
        names(&d[4]["items"][1]["spec"]["template"]["spec"]["containers"]),
        ["sinew-proxy", "agent"]
    );

    for line in [
        "-: document 1 (Deployment shop/web): injected",
        "-: document 2 (Service shop/web): unchanged (not a workload)",
        "-: document 4 (Pod shop/debug): skipped: sinew.dev/inject is disabled",
        "-: document 5 (List (no name)): skipped: the pod uses the host's network",
    ] {
        assert!(stderr.contains(line), "{line:?} not in:\n{stderr}");
    }

    // Injecting the injected output again changes nothing.
    let again = sinew(&["inject", "-f", "-"], Some(&stdout));
    assert!(again.status.success());
    assert_eq!(String::from_utf8(again.stdout).unwrap(), stdout);

    // For a 1.29 cluster: the proxy is a native sidecar, so the CronJob's Jobs
    // complete when their container does.
    let native = sinew(
        &["inject", "-f", "-", "--kubernetes-version", "v1.29.1"],
        Some(APP),
    );
    assert!(native.status.success());
    let n = docs(&String::from_utf8(native.stdout).unwrap());
    let cron = &n[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(names(&cron["containers"]), ["report"]);
    assert_eq!(
        names(&cron["initContainers"]),
        ["sinew-init", "sinew-proxy"]
    );
    assert_eq!(cron["initContainers"][1]["restartPolicy"], "Always");
    let tpl = &n[0]["spec"]["template"]["spec"];
    assert_eq!(
        names(&tpl["initContainers"]),
        ["sinew-init", "sinew-proxy", "migrate"]
    );
    let bad = sinew(
        &["inject", "-f", "-", "--kubernetes-version", "new"],
        Some(APP),
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--kubernetes-version"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn inject_names_the_file_document_and_field_and_prints_nothing_on_bad_input() {
    let dir = std::env::temp_dir().join(format!("sinew-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.yaml");
    let bad_annotation = APP.replace(
        r#"sinew.dev/proxy-cpu-limit: "500m""#,
        r#"sinew.dev/proxy-cpu-limit: "lots""#,
    );
    std::fs::write(&file, &bad_annotation).unwrap();
    let out = sinew(&["inject", "-f", file.to_str().unwrap()], None);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "printed despite an error");
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}: document 1 (Deployment shop/web): spec.template.metadata.annotations[\"sinew.dev/proxy-cpu-limit\"]: \"lots\" is not a Kubernetes quantity",
        file.display()
    );
    assert!(err.contains(&want), "{err}");

    // A container without a name, in the third document.
    std::fs::write(
        &file,
        APP.replace("containers: [{name: report, image:", "containers: [{image:"),
    )
    .unwrap();
    let out = sinew(&["inject", "-f", file.to_str().unwrap()], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("document 3 (CronJob shop/report): spec.jobTemplate.spec.template.spec.containers[0].name: missing"),
        "{err}"
    );

    // Not YAML; a missing file.
    std::fs::write(&file, "kind: ConfigMap\n---\nspec: [unclosed\n").unwrap();
    let out = sinew(&["inject", "-f", file.to_str().unwrap()], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("document 2: not valid YAML"), "{err}");
    let out = sinew(
        &["inject", "-f", dir.join("nope.yaml").to_str().unwrap()],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.yaml: cannot read"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_api_server_accepts_the_injected_workloads() {
    use kube::api::{Api, DynamicObject, PostParams};
    let server = sinew_testkit::kube::ApiServer::start()
        .await
        .expect("a real kube-apiserver");
    let client = server.client().await.unwrap();
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "shop"}})).unwrap();
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let out = sinew(&["inject", "-f", "-"], Some(APP));
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut objects = Vec::new();
    for d in docs(&stdout) {
        match d["items"].as_array() {
            Some(items) => objects.extend(items.iter().cloned()),
            None => objects.push(d),
        }
    }
    for d in &objects {
        let s = |p: &str| d.pointer(p).and_then(Value::as_str).unwrap();
        let (group, version) = s("/apiVersion")
            .split_once('/')
            .unwrap_or(("", s("/apiVersion")));
        // batch/v1 CronJob is 1.21+; 1.20 serves batch/v1beta1 with the same shape.
        let version = if s("/kind") == "CronJob" {
            "v1beta1"
        } else {
            version
        };
        let gvk = kube::core::GroupVersionKind::gvk(group, version, s("/kind"));
        let (ar, _) = kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
        let mut d = d.clone();
        d["apiVersion"] = Value::String(ar.api_version.clone());
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "shop", &ar);
        let obj: DynamicObject = serde_json::from_value(d.clone()).unwrap();
        api.create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("{} {} refused: {e}", s("/kind"), s("/metadata/name")));
    }
    let web = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), "shop")
        .get("web")
        .await
        .unwrap();
    let containers = web.spec.unwrap().template.spec.unwrap().containers;
    assert_eq!(containers[0].name, "sinew-proxy");
}
