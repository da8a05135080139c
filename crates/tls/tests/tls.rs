//! Identity end to end over real loopback TLS: CA, CSRs, mutual TLS by SPIFFE id,
//! rotation of certificates and roots.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use sinew_tls::{Ca, CertStore, MESH_ALPN, SpiffeId, new_key_and_csr, peer_identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const DAY: Duration = Duration::from_secs(86_400);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::workload("cluster.local", "shop", sa)
}

/// A store holding a certificate for `sa` from `ca`, trusting `bundle_pem`.
fn store(ca: &Ca, sa: &str, bundle_pem: &str) -> Arc<CertStore> {
    let (key, csr) = new_key_and_csr().unwrap();
    let issued = ca.sign_csr(&csr, &id(sa), DAY).unwrap();
    let s = CertStore::new();
    assert_eq!(s.install(&key, &issued.chain_pem).unwrap(), id(sa));
    s.set_trust_bundle(bundle_pem).unwrap();
    assert!(s.is_ready());
    s
}

/// Serves one echo connection; returns the listener address and the client identity
/// the server saw.
async fn server(
    s: Arc<CertStore>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<Option<SpiffeId>, String>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(s.server_config());
    let h = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates());
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(MESH_ALPN));
        let mut buf = [0u8; 5];
        while tls.read_exact(&mut buf).await.is_ok() {
            if tls.write_all(&buf).await.is_err() {
                break;
            }
        }
        Ok(peer)
    });
    (addr, h)
}

async fn connect(
    s: &Arc<CertStore>,
    expected: SpiffeId,
    addr: std::net::SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let c = TlsConnector::from(s.client_config(expected));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = c
        .connect(CertStore::server_name(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3: the server checks the client certificate after the client finishes;
    // a round trip proves both sides accepted.
    tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    assert_eq!(&buf, b"hello");
    Ok(tls)
}

#[tokio::test]
async fn mutual_tls_by_spiffe_id() {
    let ca = Ca::generate("cluster.local", 365 * DAY).unwrap();
    let roots = ca.roots_pem();
    let (web, catalog) = (store(&ca, "web", &roots), store(&ca, "catalog", &roots));
    let (addr, srv) = server(catalog.clone()).await;
    let tls = connect(&web, id("catalog"), addr).await.unwrap();
    assert_eq!(
        peer_identity(tls.get_ref().1.peer_certificates()),
        Some(id("catalog"))
    );
    drop(tls);
    assert_eq!(
        srv.await.unwrap().unwrap(),
        Some(id("web")),
        "the server learns the caller"
    );
}

#[tokio::test]
async fn the_wrong_spiffe_id_is_refused_by_the_client() {
    let ca = Ca::generate("cluster.local", 365 * DAY).unwrap();
    let roots = ca.roots_pem();
    let (web, imposter) = (store(&ca, "web", &roots), store(&ca, "billing", &roots));
    let (addr, _srv) = server(imposter).await;
    let err = connect(&web, id("catalog"), addr).await.unwrap_err();
    assert!(
        err.contains("WrongIdentity") && err.contains("/sa/billing") && err.contains("/sa/catalog"),
        "{err}"
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_both_ways() {
    let ca = Ca::generate("cluster.local", 365 * DAY).unwrap();
    let other = Ca::generate("cluster.local", 365 * DAY).unwrap();
    let good = store(&ca, "catalog", &ca.roots_pem());
    let rogue = store(&other, "web", &ca.roots_pem()); // trusts ca, but its cert is from other
    let (addr, srv) = server(good.clone()).await;
    assert!(connect(&rogue, id("catalog"), addr).await.is_err());
    let err = srv.await.unwrap().unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("BadSignature"),
        "{err}"
    );
    let rogue_server = store(&other, "catalog", &other.roots_pem());
    let (addr, _srv) = server(rogue_server).await;
    let client = store(&ca, "web", &ca.roots_pem());
    let err = connect(&client, id("catalog"), addr).await.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("BadSignature"),
        "{err}"
    );
}

#[tokio::test]
async fn rotation_keeps_established_connections_and_new_ones_use_the_new_certificate() {
    let ca = Ca::generate("cluster.local", 365 * DAY).unwrap();
    let roots = ca.roots_pem();
    let (web, catalog) = (store(&ca, "web", &roots), store(&ca, "catalog", &roots));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cat = catalog.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let acceptor = TlsAcceptor::from(cat.server_config());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 5];
                while tls.read_exact(&mut buf).await.is_ok() {
                    if tls.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut old = connect(&web, id("catalog"), addr).await.unwrap();
    let serial = |t: &tokio_rustls::client::TlsStream<TcpStream>| {
        t.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let before = serial(&old);
    // Rotate the server's certificate.
    let (key, csr) = new_key_and_csr().unwrap();
    catalog
        .install(
            &key,
            &ca.sign_csr(&csr, &id("catalog"), DAY).unwrap().chain_pem,
        )
        .unwrap();
    let fresh = connect(&web, id("catalog"), addr).await.unwrap();
    assert_ne!(
        serial(&fresh),
        before,
        "new handshakes present the new certificate"
    );
    old.write_all(b"still").await.unwrap();
    let mut buf = [0u8; 5];
    old.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still", "the established connection is untouched");
}

#[tokio::test]
async fn root_rotation_trusts_both_roots_during_the_overlap() {
    let old_ca = Ca::generate("cluster.local", 365 * DAY).unwrap();
    let new_ca = Ca::generate("cluster.local", 365 * DAY).unwrap();
    let both = format!("{}{}", old_ca.roots_pem(), new_ca.roots_pem());
    // Mid-rotation: web still has an old-root certificate, catalog already a new one.
    let web = store(&old_ca, "web", &both);
    let catalog = store(&new_ca, "catalog", &both);
    let (addr, srv) = server(catalog.clone()).await;
    connect(&web, id("catalog"), addr).await.unwrap();
    drop(srv);
    // The old root retired: old-root certificates are no longer trusted.
    catalog.set_trust_bundle(&new_ca.roots_pem()).unwrap();
    let (addr, srv) = server(catalog).await;
    assert!(connect(&web, id("catalog"), addr).await.is_err());
    assert!(srv.await.unwrap().is_err());
}

#[tokio::test]
async fn an_operator_intermediate_signs_and_chains_to_its_root() {
    // An operator's root and an intermediate signed by it.
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut rp = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    rp.distinguished_name
        .push(rcgen::DnType::CommonName, "operator root");
    let root = rp.self_signed(&root_key).unwrap();
    let int_key = rcgen::KeyPair::generate().unwrap();
    let mut ip = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "sinew intermediate");
    ip.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let root_issuer = rcgen::Issuer::from_ca_cert_der(root.der(), &root_key).unwrap();
    let int = ip.signed_by(&int_key, &root_issuer).unwrap();
    let ca = Ca::from_pem(
        &format!("{}{}", int.pem(), root.pem()),
        &int_key.serialize_pem(),
    )
    .unwrap();
    assert_eq!(ca.roots().len(), 1);
    let roots = ca.roots_pem();
    let (web, catalog) = (store(&ca, "web", &roots), store(&ca, "catalog", &roots));
    let (addr, srv) = server(catalog).await;
    connect(&web, id("catalog"), addr).await.unwrap();
    assert_eq!(srv.await.unwrap().unwrap(), Some(id("web")));
    // A key that is not the intermediate's is refused.
    let err = Ca::from_pem(
        &format!("{}{}", int.pem(), root.pem()),
        &root_key.serialize_pem(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
    // An intermediate without its root is refused.
    assert!(Ca::from_pem(&int.pem(), &int_key.serialize_pem()).is_err());
}

#[test]
fn the_ca_directory_is_private_and_the_key_never_printed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("sinew-tls-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = Ca::load_or_generate(&dir, "cluster.local").unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    let key = std::fs::read_to_string(dir.join("ca-key.pem")).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!format!("{ca:?}").contains(&body[..20]));
    // Loading again gives the same root.
    let again = Ca::load_or_generate(&dir, "cluster.local").unwrap();
    assert_eq!(again.roots_pem(), ca.roots_pem());
    // A key readable by others is refused with what to do.
    std::fs::set_permissions(
        dir.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let err = Ca::load_or_generate(&dir, "cluster.local")
        .unwrap_err()
        .to_string();
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_tampered_csr_is_refused_and_the_ca_decides_the_identity() {
    let ca = Ca::generate("cluster.local", DAY).unwrap();
    let (_key, mut csr) = new_key_and_csr().unwrap();
    let n = csr.len();
    csr[n - 5] ^= 0xff; // breaks the signature
    assert!(ca.sign_csr(&csr, &id("web"), DAY).is_err());
    // A CSR asking for another identity gets the one the CA was told.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    )];
    let csr = p.serialize_request(&key).unwrap();
    let issued = ca.sign_csr(csr.der(), &id("web"), DAY).unwrap();
    let s = CertStore::new();
    assert_eq!(
        s.install(&key.serialize_pem(), &issued.chain_pem).unwrap(),
        id("web")
    );
    let left = s
        .not_after()
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left <= DAY && left > DAY - Duration::from_secs(120));
}

/// The control plane's TLS with a chain from `signing` (plus `extra` PEM after the
/// leaf); a client trusting `trust` connects; returns whether it accepted.
async fn control_handshake(
    signing: &Ca,
    extra: &str,
    trust: sinew_tls::api::ControlTrust,
) -> Result<(), String> {
    let (key, csr) = new_key_and_csr().unwrap();
    let profile = sinew_tls::Profile {
        server: true,
        client: true,
        dns_names: vec!["localhost".into()],
        ips: vec![],
    };
    let control = SpiffeId::workload("cluster.local", "sinew-system", "sinew-control");
    let issued = signing.sign_csr_as(&csr, &control, DAY, &profile).unwrap();
    let s = CertStore::new();
    s.install(
        &key,
        &format!("{}{extra}{}", issued.chain_pem, signing.roots_pem()),
    )
    .unwrap();
    s.set_trust_bundle(&signing.roots_pem()).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(sinew_tls::api::control_server_config(&s).unwrap());
    tokio::spawn(async move {
        if let Ok((tcp, _)) = l.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let cfg =
        sinew_tls::api::control_client_config(trust, sinew_tls::api::ClientAuth::None).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(cfg)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_root_rotation_keeps_old_clients_verifying_the_control_plane_by_a_cross_certificate() {
    let old = Ca::generate("cluster.local", DAY).unwrap();
    let new = Ca::generate("cluster.local", DAY).unwrap();
    let old_roots = || sinew_tls::api::ControlTrust::from_pem("old", &old.roots_pem()).unwrap();
    // The new root signs; a client holding only the old root refuses it alone...
    let e = control_handshake(&new, "", old_roots()).await.unwrap_err();
    assert!(e.contains("UnknownIssuer") || e.contains("issuer"), "{e}");
    // ...and accepts it with the cross-certificate (the new CA issued by the old).
    let cross = old.cross_sign(&new, DAY).unwrap();
    control_handshake(&new, &cross, old_roots()).await.unwrap();
    // A client holding the new root needs no cross-certificate.
    let new_roots = sinew_tls::api::ControlTrust::from_pem("new", &new.roots_pem()).unwrap();
    control_handshake(&new, &cross, new_roots).await.unwrap();
    // A join token's root hash pins the root: the right one is in the chain...
    let pin = sinew_tls::api::cert_hash(&new.roots()[0]);
    control_handshake(&new, "", sinew_tls::api::ControlTrust::Pinned(pin))
        .await
        .unwrap();
    // ...another mesh's is not.
    let stranger = Ca::generate("cluster.local", DAY).unwrap();
    let e = control_handshake(
        &new,
        "",
        sinew_tls::api::ControlTrust::Pinned(sinew_tls::api::cert_hash(&stranger.roots()[0])),
    )
    .await
    .unwrap_err();
    assert!(e.contains("join token's hash"), "{e}");
}

#[tokio::test]
async fn only_the_control_plane_s_identity_is_the_control_plane() {
    // A workload certificate from the same CA is not the control plane.
    let ca = Ca::generate("cluster.local", DAY).unwrap();
    let s = store(&ca, "web", &ca.roots_pem());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(sinew_tls::api::control_server_config(&s).unwrap());
    tokio::spawn(async move {
        if let Ok((tcp, _)) = l.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let cfg = sinew_tls::api::control_client_config(
        sinew_tls::api::ControlTrust::from_pem("roots", &ca.roots_pem()).unwrap(),
        sinew_tls::api::ClientAuth::None,
    )
    .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let e = TlsConnector::from(cfg)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("spiffe://cluster.local/ns/shop/sa/web, not the control plane"),
        "{e}"
    );
}

#[tokio::test]
async fn an_identity_issued_in_process_makes_a_ready_store_that_speaks_mtls() {
    let ca = Ca::generate("cluster.local", DAY).unwrap();
    let given = |sa: &str| {
        let (key, issued) = ca.issue(&id(sa), DAY).unwrap();
        assert!(issued.not_after > std::time::SystemTime::now());
        CertStore::with_identity(&key, &issued.chain_pem, &ca.roots_pem()).unwrap()
    };
    let (web, catalog) = (given("web"), given("catalog"));
    assert!(web.is_ready() && catalog.is_ready());
    assert_eq!(web.identity(), Some(id("web")));
    let (addr, seen) = server(catalog).await;
    let tls = connect(&web, id("catalog"), addr).await.unwrap();
    drop(tls);
    assert_eq!(seen.await.unwrap().unwrap(), Some(id("web")));

    // A key that is not the certificate's is refused, and the error says so.
    let (other_key, _) = new_key_and_csr().unwrap();
    let (_, issued) = ca.issue(&id("web"), DAY).unwrap();
    let err = CertStore::with_identity(&other_key, &issued.chain_pem, &ca.roots_pem())
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not match the key"), "{err}");
}
