//! The control plane as an attacker on the same network meets it: a real `sinew
//! control` process, the real CLI and proxies, raw gRPC clients, curl and openssl.
//! Each refusal is checked with the status and the reason it names, next to the
//! positive path it guards.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod mesh;

use std::time::Duration;

use mesh::*;
use sinew_api::v1::{self as api, control_message, proxy_message};
use sinew_testkit::wait;
use tonic::Code;

fn hello(ns: &str, name: &str, registration: Option<api::Registration>) -> api::Hello {
    api::Hello {
        namespace: ns.into(),
        name: name.into(),
        registration,
        ..Default::default()
    }
}

fn reg(service: &str, account: &str) -> api::Registration {
    api::Registration {
        service: service.into(),
        address: "127.0.0.1".into(),
        ports: [("http".to_owned(), 8080)].into_iter().collect(),
        service_account: account.into(),
        ..Default::default()
    }
}

/// Every Admin RPC, called with `c`; each result's status (OK as `Code::Ok`).
async fn every_admin_call(
    c: &mut sinew_api::v1::admin_client::AdminClient<tonic::transport::Channel>,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    fn ok<T>(r: Result<T, tonic::Status>) -> Result<(), tonic::Status> {
        r.map(|_| ())
    }
    vec![
        ("apply", ok(c.apply(api::ApplyRequest::default()).await)),
        ("get", ok(c.get(api::GetRequest::default()).await)),
        ("delete", ok(c.delete(api::DeleteRequest::default()).await)),
        (
            "proxy-status",
            ok(c.proxy_status(api::ProxyStatusRequest {}).await),
        ),
        ("health", ok(c.health(api::HealthRequest {}).await)),
        (
            "token create",
            ok(c.create_join_token(api::CreateJoinTokenRequest {
                namespace: "shop".into(),
                service_account: "web".into(),
                ..Default::default()
            })
            .await),
        ),
        (
            "token list",
            ok(c.list_join_tokens(api::ListJoinTokensRequest {}).await),
        ),
        (
            "token revoke",
            ok(
                c.revoke_join_token(api::RevokeJoinTokenRequest { id: "x".into() })
                    .await,
            ),
        ),
        (
            "credentials create",
            ok(c.create_credential(api::CreateCredentialRequest {
                name: "eve".into(),
                role: "admin".into(),
                ..Default::default()
            })
            .await),
        ),
        (
            "credentials list",
            ok(c.list_credentials(api::ListCredentialsRequest {}).await),
        ),
        (
            "credentials revoke",
            ok(c.revoke_credential(api::RevokeCredentialRequest {
                name: "admin".into(),
            })
            .await),
        ),
        (
            "ca rotate",
            ok(c.rotate_ca(api::RotateCaRequest {
                phase: "start".into(),
                ..Default::default()
            })
            .await),
        ),
        ("stat", ok(c.stat(api::StatRequest::default()).await)),
        ("top", ok(c.top(api::TopRequest::default()).await)),
        ("tap", ok(c.tap(api::TapRequest::default()).await)),
        ("edges", ok(c.edges(api::EdgesRequest::default()).await)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_call_needs_a_credential_with_the_role_for_it() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;

    // No certificate at all: every call, Unauthenticated, saying what is missing.
    let mut anon = anonymous_admin(&cp).await;
    let calls = every_admin_call(&mut anon).await;
    assert_eq!(calls.len(), 16);
    for (what, r) in calls {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        assert!(
            e.message().contains("no client certificate"),
            "{what}: {e:?}"
        );
    }

    // A proxy's workload certificate is no operator credential.
    let w = Workload::new(&cp, "shop", "web-1", "web").await;
    let tls = sinew_tls::api::control_client_config(
        sinew_tls::api::ControlTrust::Store(w.certs.clone()),
        sinew_tls::api::ClientAuth::Store(w.certs.clone()),
    )
    .unwrap();
    let mut as_proxy = sinew_api::v1::admin_client::AdminClient::new(
        sinew_api::channel::connect(sinew_api::channel::endpoint(&cp.url).unwrap(), tls)
            .await
            .unwrap(),
    );
    let e = as_proxy.get(api::GetRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message()
            .contains("spiffe://cluster.local/ns/shop/sa/web is not an operator credential"),
        "{e:?}"
    );

    // Roles: a viewer reads, and is refused the rest naming the role needed; an
    // operator also changes configuration and taps, but issues no identity.
    let viewer = scratch.0.join("viewer.credentials");
    let operator = scratch.0.join("operator.credentials");
    for (name, role, path) in [("vera", "viewer", &viewer), ("otto", "operator", &operator)] {
        let out = cp
            .sinew(&[
                "credentials",
                "create",
                name,
                "--role",
                role,
                "-o",
                path.to_str().unwrap(),
            ])
            .await;
        assert!(out.status.success(), "{:?}", text(&out));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let expect =
        |who: &str, role_needed: Option<&str>, what: &str, r: &Result<(), tonic::Status>| {
            match role_needed {
                None => {
                    if let Err(e) = r {
                        // Allowed: refused only for what the request itself lacks.
                        assert!(
                            !matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied),
                            "{who} {what}: {e:?}"
                        );
                    }
                }
                Some(role) => {
                    let e = r.as_ref().expect_err(what);
                    assert_eq!(e.code(), Code::PermissionDenied, "{who} {what}: {e:?}");
                    assert!(
                        e.message()
                            .contains(&format!("{what} needs the {role} role")),
                        "{who} {what}: {e:?}"
                    );
                }
            }
        };
    let viewer_allowed = ["get", "proxy-status", "health", "stat", "top", "edges"];
    let operator_allowed = ["apply", "delete", "tap"];
    let mut v = admin_client(&cp.url, &viewer).await.unwrap();
    for (what, r) in every_admin_call(&mut v).await {
        let need = if viewer_allowed.contains(&what) {
            None
        } else if operator_allowed.contains(&what) {
            Some("operator")
        } else {
            Some("admin")
        };
        expect("viewer", need, what, &r);
    }
    let mut o = admin_client(&cp.url, &operator).await.unwrap();
    for (what, r) in every_admin_call(&mut o).await {
        let need = (!viewer_allowed.contains(&what) && !operator_allowed.contains(&what))
            .then_some("admin");
        expect("operator", need, what, &r);
    }
    // The CLI says it in one sentence.
    let out = sinew_as(
        &cp.url,
        Some(&viewer),
        &["token", "create", "-n", "shop", "--service-account", "x"],
    )
    .await;
    assert!(!out.status.success());
    assert_eq!(
        text(&out).1.trim(),
        "error: permission denied: token create needs the admin role; the credential \"vera\" is viewer"
    );

    // Revoked: refused from then on, by name; another credential is untouched.
    let out = cp.sinew(&["credentials", "revoke", "vera"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let e = admin_client(&cp.url, &viewer)
        .await
        .unwrap()
        .get(api::GetRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("\"vera\" was revoked"), "{e:?}");
    assert!(
        admin_client(&cp.url, &operator)
            .await
            .unwrap()
            .get(api::GetRequest::default())
            .await
            .is_ok()
    );
    let out = cp.sinew(&["credentials", "list"]).await;
    let (list, _) = text(&out);
    assert!(
        list.lines()
            .any(|l| l.starts_with("vera ") && l.contains("revoked"))
            && list
                .lines()
                .any(|l| l.starts_with("otto ") && l.contains("valid")),
        "{list}"
    );

    // Expired: refused with the time it expired.
    let short = scratch.0.join("short.credentials");
    let out = cp
        .sinew(&[
            "credentials",
            "create",
            "brief",
            "--role",
            "admin",
            "--ttl",
            "1s",
            "-o",
            short.to_str().unwrap(),
        ])
        .await;
    assert!(out.status.success(), "{:?}", text(&out));
    let short_c = short.clone();
    let url = cp.url.clone();
    wait::until("the short credential expires", TIMEOUT, || {
        let (short_c, url) = (short_c.clone(), url.clone());
        async move {
            match admin_client(&url, &short_c).await {
                Ok(mut c) => c.get(api::GetRequest::default()).await.is_err_and(|e| {
                    e.code() == Code::Unauthenticated
                        && e.message().contains("the client certificate expired at")
                }),
                Err(_) => false,
            }
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_strangers_get_nothing() {
    let scratch = Scratch::new();
    let cp = Control::start(
        &scratch.0.join("data"),
        free_addr(),
        &["--trust-domain", "a.test"],
    )
    .await;
    let other = Control::start(
        &scratch.0.join("other"),
        free_addr(),
        &["--trust-domain", "b.test"],
    )
    .await;

    // A plaintext gRPC client: no answer at all.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => sinew_api::v1::admin_client::AdminClient::new(ch)
            .health(api::HealthRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext client got an answer");
    // curl, plaintext HTTP/2 with prior knowledge: the connection is closed on it.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "3", "--http2-prior-knowledge"])
        .arg(format!("http://{}/sinew.api.v1.Admin/Health", cp.addr))
        .output()
        .await
        .expect("curl is required for these tests (scripts/test installs it)");
    assert!(!out.status.success(), "curl got: {out:?}");
    // openssl: TLS 1.2 is refused; TLS 1.3 shows the control plane's certificate,
    // with its SPIFFE id and the names it is reached by.
    let (ok, log) = s_client_api(cp.addr, &["-tls1_2"]).await;
    assert!(!ok, "TLS 1.2 was accepted: {log}");
    let (ok, log) = s_client_api(cp.addr, &["-tls1_3", "-showcerts"]).await;
    assert!(ok, "{log}");
    let pem: String = log
        .split_inclusive('\n')
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .take_while(|l| !l.starts_with("-----END CERTIFICATE-----"))
        .chain(std::iter::once("-----END CERTIFICATE-----\n"))
        .collect();
    let text_out = tokio::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = text_out;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(pem.as_bytes()).await.unwrap();
    }
    let sans = String::from_utf8(child.wait_with_output().await.unwrap().stdout).unwrap();
    assert!(
        sans.contains("URI:spiffe://a.test/ns/sinew-system/sa/sinew-control")
            && sans.contains("DNS:localhost")
            && sans.contains("IP Address:127.0.0.1"),
        "{sans}"
    );

    // A client that trusts another mesh's root refuses this control plane.
    let e = admin_client(&cp.url, &other.credentials)
        .await
        .map(|_| ())
        .unwrap_err();
    let why = error_chain(e.as_ref());
    assert!(
        why.contains("UnknownIssuer") || why.contains("unknown issuer"),
        "{why}"
    );
    // A join token of the other mesh names its root: the proxy refuses to bootstrap
    // against this one, before it shows the token.
    let foreign = other.join_token("shop", "web").await;
    let e = bootstrap(&cp, "shop", "web-1", &foreign).await.unwrap_err();
    assert!(
        e.message().contains("no root with the join token's hash"),
        "{e:?}"
    );
    // A credential of the other mesh, shown to this one (trusting this one's root):
    // its chain does not verify, so it is no credential.
    let mixed = scratch.0.join("mixed.credentials");
    let mut c = sinew_control::credentials::CredentialFile::read(&other.credentials).unwrap();
    c.roots = sinew_control::credentials::CredentialFile::read(&cp.credentials)
        .unwrap()
        .roots;
    c.write(&mixed).unwrap();
    let refused = match admin_client(&cp.url, &mixed).await {
        Err(_) => true,
        Ok(mut a) => a.get(api::GetRequest::default()).await.is_err(),
    };
    assert!(refused, "a foreign certificate was accepted");
}

/// `openssl s_client` against the API (ALPN h2).
async fn s_client_api(addr: std::net::SocketAddr, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(["-alpn", "h2"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("openssl is required for these tests (scripts/test installs it)");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success() && all.contains("BEGIN CERTIFICATE"),
        all,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_are_single_use_short_lived_revocable_and_bound_to_a_namespace() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;

    // Single use by default: the second bootstrap with it is refused.
    let t = cp.join_token("shop", "web").await;
    let (_, c) = bootstrap(&cp, "shop", "web-1", &t).await.unwrap();
    assert!(c.chain_pem.contains("BEGIN CERTIFICATE"));
    let e = bootstrap(&cp, "shop", "web-2", &t).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("unknown join token"), "{e:?}");

    // --uses 2: two proxies, not three.
    let out = cp
        .sinew(&[
            "token",
            "create",
            "-n",
            "shop",
            "--service-account",
            "web",
            "--uses",
            "2",
        ])
        .await;
    let t2 = text(&out).0.trim().to_owned();
    assert!(bootstrap(&cp, "shop", "a", &t2).await.is_ok());
    assert!(bootstrap(&cp, "shop", "b", &t2).await.is_ok());
    assert!(bootstrap(&cp, "shop", "c", &t2).await.is_err());

    // For another namespace: refused, and not spent by the attempt.
    let t3 = cp.join_token("shop", "web").await;
    let e = bootstrap(&cp, "payments", "web-1", &t3).await.unwrap_err();
    assert!(
        e.message()
            .contains("the join token is for namespace \"shop\", the proxy is in \"payments\""),
        "{e:?}"
    );
    assert!(bootstrap(&cp, "shop", "web-3", &t3).await.is_ok());

    // Listed (by id, never the secret), and revoked by id.
    let t4 = cp.join_token("shop", "cart").await;
    let (list, _) = text(&cp.sinew(&["token", "list"]).await);
    let line = list
        .lines()
        .find(|l| l.contains("spiffe://cluster.local/ns/shop/sa/cart"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(
        !list.contains(t4.rsplit('.').next().unwrap()),
        "a token secret in the list"
    );
    let id = line.split_whitespace().next().unwrap();
    let out = cp.sinew(&["token", "revoke", id]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let e = bootstrap(&cp, "shop", "cart-1", &t4).await.unwrap_err();
    assert!(e.message().contains("unknown join token"), "{e:?}");

    // Expired: once the clock has passed its second, refused as such.
    let created = std::time::SystemTime::now();
    let out = cp
        .sinew(&[
            "token",
            "create",
            "-n",
            "shop",
            "--service-account",
            "web",
            "--ttl",
            "1s",
        ])
        .await;
    let t5 = text(&out).0.trim().to_owned();
    wait::until("the clock passes the token's expiry", TIMEOUT, || async {
        created.elapsed().is_ok_and(|d| d > Duration::from_secs(3))
    })
    .await
    .unwrap();
    let e = bootstrap(&cp, "shop", "late", &t5).await.unwrap_err();
    assert!(e.message().contains("the join token has expired"), "{e:?}");

    // The TTL is capped; the control plane's own account is never a proxy's.
    let out = cp
        .sinew(&[
            "token",
            "create",
            "-n",
            "shop",
            "--service-account",
            "web",
            "--ttl",
            "200h",
        ])
        .await;
    assert!(text(&out).1.contains("at most 7 days"), "{:?}", text(&out));
    let out = cp
        .sinew(&[
            "token",
            "create",
            "-n",
            "sinew-system",
            "--service-account",
            "sinew-control",
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out)
            .1
            .contains("the control plane's own service account"),
        "{:?}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_is_only_what_its_certificate_says() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let f = scratch.write(
        "m.yaml",
        &format!(
            "{}{}{}",
            service("shop", "catalog"),
            service("payments", "billing"),
            proxy_doc("shop", "web", &[(free_addr(), "catalog")])
        ),
    );
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );

    // A stream without a certificate: refused before its Hello is read.
    let e = anonymous_discovery(&cp)
        .await
        .stream(tokio_stream::iter(vec![api::ProxyMessage {
            kind: Some(proxy_message::Kind::Hello(hello("shop", "web", None))),
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    let catalog = Workload::new(&cp, "shop", "catalog-1", "catalog").await;
    // Its own name, service and account: served.
    let (first, _keep, _rx) = catalog
        .hello(hello("shop", "catalog-1", Some(reg("catalog", ""))))
        .await
        .unwrap();
    assert!(matches!(
        first.kind,
        Some(control_message::Kind::TrustBundle(_))
    ));

    // Another namespace.
    let e = catalog
        .hello(hello("payments", "billing-1", Some(reg("billing", ""))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("a proxy's namespace is its identity's (shop)"),
        "{e:?}"
    );
    // Another service in its own namespace (a hijack of its traffic).
    let e = catalog
        .hello(hello("shop", "catalog-2", Some(reg("web", ""))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("cannot register under the service \"web\""),
        "{e:?}"
    );
    // A Service may name the other accounts that serve it.
    let f2 = scratch.write(
        "shared.yaml",
        "---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: search, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}]\n  serviceAccounts: [catalog]\n",
    );
    assert!(
        cp.sinew(&["apply", "-f", f2.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let (_, _search_keep, _search_rx) = catalog
        .hello(hello("shop", "search-1", Some(reg("search", ""))))
        .await
        .unwrap();
    // Another service account.
    let e = catalog
        .hello(hello("shop", "catalog-2", Some(reg("catalog", "web"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("service account \"web\""), "{e:?}");

    // Another proxy's name (and so its view): the web proxy streams as shop/web;
    // catalog's identity cannot take the name, even without a registration.
    let web = Workload::new(&cp, "shop", "web", "web").await;
    let (_, _web_keep, _web_rx) = web.hello(hello("shop", "web", None)).await.unwrap();
    let e = catalog.hello(hello("shop", "web", None)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("the proxy name shop/web belongs to spiffe://cluster.local/ns/shop/sa/web"),
        "{e:?}"
    );
    // Its reports are its own too.
    let e = catalog
        .discovery
        .clone()
        .report(api::ReportRequest {
            namespace: "shop".into(),
            name: "web".into(),
            stats: Some(api::StatsReport::default()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The registered workload carries the certificate's account.
    let (get, _) = text(
        &cp.sinew(&["get", "workload", "catalog-1", "-n", "shop", "-o", "json"])
            .await,
    );
    assert!(get.contains("\"serviceAccount\": \"catalog\""), "{get}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cannot_starve_a_mesh_wide_limit_with_a_huge_demand() {
    const RATE: f64 = 60.0;
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let f = scratch.write(
        "m.yaml",
        &format!(
            "{}---\napiVersion: sinew.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: api, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: api}}\n  rateLimits:\n    - {{name: all, requestsPerSecond: {RATE}, burst: 10, global: true}}\n",
            service("shop", "api")
        ),
    );
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let demand = |rate: f64| api::ProxyMessage {
        kind: Some(proxy_message::Kind::Demand(api::Demand {
            limits: vec![api::LimitDemand {
                limit: "shop/api/all".into(),
                keys: [(String::new(), rate)].into_iter().collect(),
            }],
        })),
    };
    let greedy = Workload::new(&cp, "shop", "api-0", "api").await;
    let honest = Workload::new(&cp, "shop", "api-1", "api").await;
    let (_, g_tx, mut g_rx) = greedy
        .hello(hello("shop", "api-0", Some(reg("api", ""))))
        .await
        .unwrap();
    let (_, h_tx, mut h_rx) = honest
        .hello(hello("shop", "api-1", Some(reg("api", ""))))
        .await
        .unwrap();
    /// The next lease for the unkeyed limit on a stream.
    async fn lease(rx: &mut tonic::Streaming<api::ControlMessage>) -> Option<(u32, f64)> {
        loop {
            let m = tokio::time::timeout(TIMEOUT, rx.message())
                .await
                .ok()?
                .ok()??;
            if let Some(control_message::Kind::Leases(l)) = m.kind
                && let Some(limit) = l.limits.iter().find(|l| l.limit == "shop/api/all")
            {
                let share = limit
                    .keys
                    .get("")
                    .map(|k| k.requests_per_second)
                    .unwrap_or(RATE / f64::from(limit.proxies.max(1)));
                return Some((limit.proxies, share));
            }
        }
    }
    // The greedy proxy says 1e300 requests a second; the honest one 30. Taken at
    // its word, the greedy one would get all of it (30/1e300 of 60 for the other).
    // Bounded by the limit's own rate, the honest proxy keeps 60 * 30 / 90 = 20.
    let mut share = 0.0;
    for _ in 0..40 {
        g_tx.send(demand(1e300)).await.unwrap();
        let _ = lease(&mut g_rx).await;
        h_tx.send(demand(30.0)).await.unwrap();
        if let Some((2, s)) = lease(&mut h_rx).await {
            share = s;
            break;
        }
    }
    assert!(
        (share - 20.0).abs() < 1.0,
        "the honest proxy's share is {share}, not 20"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_storm_does_not_cut_off_real_proxies() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let bind = free_addr();
    let f = scratch.write(
        "m.yaml",
        &format!(
            "{}{}",
            service("shop", "catalog"),
            proxy_doc("shop", "web", &[(bind, "catalog")])
        ),
    );
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let web = proxy(&cp, "shop/web", None, Duration::from_millis(50)).await;
    listening(bind).await;

    // 2,000 connections from another loopback address that start no handshake
    // (slowloris) and 200 that send garbage. The address's handshakes queue behind
    // its own few slots, so the shared ones stay free for everyone else.
    let storm_started = tokio::time::Instant::now();
    let mut storm = Vec::new();
    for i in 0..2_200 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        match s.connect(cp.addr).await {
            Ok(mut c) => {
                if i >= 2_000 {
                    use tokio::io::AsyncWriteExt;
                    let _ = c.write_all(b"\x16\x03\x01\x7f\xffGARBAGE").await;
                }
                storm.push(c);
            }
            Err(e) => panic!("connect {i}: {e}"),
        }
    }

    // Meanwhile: the operator's change reaches the real proxy.
    let bind2 = free_addr();
    let f2 = scratch.write(
        "m2.yaml",
        &proxy_doc("shop", "web", &[(bind, "catalog"), (bind2, "catalog")]),
    );
    let out = cp.sinew(&["apply", "-f", f2.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    listening(bind2).await;
    wait::until("the proxy is in sync", TIMEOUT, || async {
        cp.all_in_sync(1).await
    })
    .await
    .unwrap();
    // A new client is served meanwhile too: a proxy bootstraps and streams.
    let late = proxy(&cp, "shop/late", None, Duration::from_millis(50)).await;
    assert!(
        storm_started.elapsed() < Duration::from_secs(10),
        "the storm's deadline passed before the real clients were served"
    );
    // And the storm holds nothing past its handshake deadline (10 s): every one of
    // its connections is closed by the control plane.
    for c in &mut storm {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        match tokio::time::timeout(Duration::from_secs(15), c.read_to_end(&mut got)).await {
            // Closed: silently, or after a TLS alert record (0x15) for the garbage.
            Ok(_) => assert!(got.is_empty() || got[0] == 0x15, "{got:?}"),
            Err(_) => panic!("a storm connection is still open past its deadline"),
        }
    }
    late.shutdown().await;
    web.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plaintext_window_serves_only_old_proxies_and_only_when_asked() {
    let scratch = Scratch::new();
    let cp = Control::start(
        &scratch.0.join("data"),
        free_addr(),
        &["--plaintext-window"],
    )
    .await;
    let plain = format!("http://{}", cp.addr);
    // An operator call over plaintext: refused, saying what the window is for.
    let e = sinew_api::v1::admin_client::AdminClient::connect(plain.clone())
        .await
        .unwrap()
        .get(api::GetRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("migration window"), "{e:?}");

    // A proxy of the earlier release: plaintext stream, Hello, then a CSR with its
    // join token: served as before, and its certificate is the token's identity.
    let token = cp.join_token("shop", "web").await;
    let (_key, csr_der) = sinew_tls::new_key_and_csr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(api::ProxyMessage {
        kind: Some(proxy_message::Kind::Hello(hello("shop", "old-web", None))),
    })
    .await
    .unwrap();
    tx.send(api::ProxyMessage {
        kind: Some(proxy_message::Kind::Csr(api::CertificateRequest {
            csr_der,
            join_token: token,
        })),
    })
    .await
    .unwrap();
    let mut old = sinew_api::v1::discovery_client::DiscoveryClient::connect(plain.clone())
        .await
        .unwrap();
    let mut answers = old
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let cert = loop {
        let m = tokio::time::timeout(TIMEOUT, answers.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(control_message::Kind::Certificate(c)) = m.kind {
            break c;
        }
    };
    assert!(cert.error.is_empty(), "{}", cert.error);
    let leaf = sinew_tls::certs_from_pem("chain", &cert.chain_pem).unwrap();
    assert_eq!(
        sinew_tls::spiffe_of(&leaf[0]).unwrap().to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );

    // It cannot take a name an authenticated proxy holds.
    let w = Workload::new(&cp, "shop", "catalog-1", "catalog").await;
    let (_, _keep, _rx) = w.hello(hello("shop", "catalog-1", None)).await.unwrap();
    let e = old
        .stream(tokio_stream::iter(vec![api::ProxyMessage {
            kind: Some(proxy_message::Kind::Hello(hello("shop", "catalog-1", None))),
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // TLS clients are served beside it.
    assert!(cp.sinew(&["get", "svc"]).await.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_goes_on_with_its_kept_identity_not_a_new_token() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let dir = scratch.0.join("identity");
    let token = cp.join_token("shop", "web").await;
    let settings = || {
        let mut s = sinew_proxy::control::ControlSettings::new(&cp.url, "shop/web");
        s.join_token = Some(token.clone());
        s.identity_dir = Some(dir.clone());
        s.min_backoff = Duration::from_millis(50);
        s
    };
    let first = start_proxy(settings()).await;
    let id = first.shared().certs.identity().unwrap();
    first.shutdown().await;
    assert_eq!(
        std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // The token is spent: only the kept identity can make the restart ready.
    let e = bootstrap(&cp, "shop", "probe", &token).await.unwrap_err();
    assert!(e.message().contains("unknown join token"), "{e:?}");
    let again = start_proxy(settings()).await;
    assert_eq!(again.shared().certs.identity(), Some(id));
    wait::until("the restarted proxy is in sync", TIMEOUT, || async {
        cp.all_in_sync(1).await
    })
    .await
    .unwrap();
    again.shutdown().await;
    // Without the kept identity, the same restart has nothing to bootstrap with.
    std::fs::remove_dir_all(&dir).unwrap();
    let mut s = settings();
    s.max_backoff = Duration::from_millis(100);
    let mut opts = sinew_proxy::ProxyOptions::control_plane(s);
    opts.admin = "127.0.0.1:0".parse().unwrap();
    let p = sinew_proxy::Proxy::start(opts).unwrap();
    let admin = p.admin_addr();
    wait::until(
        "the proxy says why it is not ready",
        TIMEOUT,
        || async move {
            sinew_testkit::client::get(admin, "admin", "/ready")
                .await
                .is_ok_and(|r| r.status == 503 && r.text().contains("unknown join token"))
        },
    )
    .await
    .unwrap();
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_and_the_api_goes_on() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let mut admin = cp.admin().await;
    // 5 MiB of documents: past the 4 MiB cap, refused before it is parsed.
    let text = "# padding\n".repeat(512 * 1024);
    let e = admin
        .apply(api::ApplyRequest {
            sources: vec![api::Source {
                label: "big.yaml".into(),
                text,
            }],
            dry_run: true,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    // An unauthenticated caller cannot make the server read one either.
    let e = anonymous_admin(&cp)
        .await
        .apply(api::ApplyRequest {
            sources: vec![api::Source {
                label: "big.yaml".into(),
                text: "# padding\n".repeat(512 * 1024),
            }],
            dry_run: true,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::Unauthenticated
        ),
        "{e:?}"
    );
    // The same connection and others go on.
    assert!(admin.get(api::GetRequest::default()).await.is_ok());
    assert!(cp.sinew(&["get", "svc"]).await.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_credential_file_is_named_with_what_is_wrong() {
    let scratch = Scratch::new();
    let bad = scratch.write(
        "bad.credentials",
        "server: https://127.0.0.1:9\nname: [unclosed\n",
    );
    let out = sinew_as("https://127.0.0.1:9", Some(&bad), &["get", "svc"]).await;
    assert!(!out.status.success());
    let err = text(&out).1;
    assert!(
        err.contains(&format!("{}: not a Sinew credential file", bad.display())),
        "{err}"
    );
    let no_pem = scratch.write(
        "nopem.credentials",
        "server: https://127.0.0.1:9\nname: x\nrole: admin\ntrustDomain: t\nexpires: e\ncertificate: c\nkey: k\nroots: r\n",
    );
    let out = sinew_as("https://127.0.0.1:9", Some(&no_pem), &["get", "svc"]).await;
    assert!(
        text(&out).1.contains("certificate: no PEM block"),
        "{:?}",
        text(&out)
    );
}
