//! A proxy's certificate and trust bundle, swapped atomically on rotation, and the
//! rustls configurations that use them.
//!
//! Mesh TLS is TLS 1.3 only, mutually authenticated, with ALPN [`MESH_ALPN`] (HTTP/2
//! inside, and a marker that tells the inbound this is mesh traffic). Peers are
//! verified by chain (to any root in the current bundle: old and new are both trusted
//! during a root rotation) and by SPIFFE id in the URI SAN, never by DNS name.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
};
use rustls_pki_types::TrustAnchor;
use rustls_pki_types::pem::PemObject;

use crate::ca::certs_from_pem;
use crate::{SpiffeId, TlsError};

/// ALPN protocol of sidecar-to-sidecar traffic: mesh marker, HTTP/2 inside.
pub const MESH_ALPN: &[u8] = b"sinew-h2";

/// The ring provider, shared.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, Default)]
struct Bundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

/// The SPIFFE id in a certificate's URI SAN, if it has exactly one.
pub fn spiffe_of(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = c.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            u.parse::<SpiffeId>().ok()
        }
        _ => None,
    });
    let first = ids.next()?;
    ids.next().is_none().then_some(first)
}

/// The peer's SPIFFE id from a finished handshake's certificates.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs.and_then(|c| c.first()).and_then(spiffe_of)
}

/// When a certificate expires, if its validity is readable.
pub fn not_after_of(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let secs = u64::try_from(c.validity().not_after.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// A proxy's identity material, rotated in place.
pub struct CertStore {
    provider: Arc<CryptoProvider>,
    certified: ArcSwapOption<CertifiedKey>,
    identity: ArcSwapOption<SpiffeId>,
    bundle: ArcSwap<Bundle>,
    not_after: AtomicU64,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("identity", &self.identity())
            .field("roots", &self.bundle.load().roots.len())
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// An empty store: no certificate, no trust.
    pub fn new() -> Arc<CertStore> {
        Arc::new(CertStore {
            provider: provider(),
            certified: ArcSwapOption::empty(),
            identity: ArcSwapOption::empty(),
            bundle: ArcSwap::from_pointee(Bundle::default()),
            not_after: AtomicU64::new(0),
        })
    }

    /// A store holding an identity from the start: trust `roots_pem`, present
    /// `chain_pem` (leaf first) with `key_pem`.
    pub fn with_identity(
        key_pem: &str,
        chain_pem: &str,
        roots_pem: &str,
    ) -> Result<Arc<CertStore>, TlsError> {
        let store = CertStore::new();
        store.set_trust_bundle(roots_pem)?;
        store.install(key_pem, chain_pem)?;
        Ok(store)
    }

    /// Installs a key (PEM) and its certificate chain (leaf first, PEM). New
    /// handshakes use it; established connections keep theirs.
    pub fn install(&self, key_pem: &str, chain_pem: &str) -> Result<SpiffeId, TlsError> {
        let chain = certs_from_pem("certificate chain", chain_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::invalid("private key", e))?;
        let signer = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::invalid("private key", e))?;
        let id = spiffe_of(&chain[0])
            .ok_or_else(|| TlsError::invalid("certificate", "no SPIFFE id in its URI SAN"))?;
        let not_after = not_after_of(&chain[0])
            .ok_or_else(|| TlsError::invalid("certificate", "unreadable validity"))?;
        let ck = CertifiedKey::new(chain, signer);
        ck.keys_match().map_err(|e| {
            TlsError::invalid("certificate", format!("does not match the key: {e}"))
        })?;
        self.certified.store(Some(Arc::new(ck)));
        self.identity.store(Some(Arc::new(id.clone())));
        self.not_after.store(
            not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            Ordering::Relaxed,
        );
        Ok(id)
    }

    /// Replaces the trust bundle (every root to trust, PEM). Returns how many roots.
    pub fn set_trust_bundle(&self, roots_pem: &str) -> Result<usize, TlsError> {
        let roots = certs_from_pem("trust bundle", roots_pem)?;
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::invalid("trust bundle", format!("{e:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let n = roots.len();
        self.bundle.store(Arc::new(Bundle { roots, anchors }));
        Ok(n)
    }

    /// The roots currently trusted, PEM-free (DER).
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.bundle.load().roots.clone()
    }

    /// The installed identity.
    pub fn identity(&self) -> Option<SpiffeId> {
        self.identity.load_full().map(|i| (*i).clone())
    }

    /// When the installed certificate expires.
    pub fn not_after(&self) -> Option<SystemTime> {
        match self.not_after.load(Ordering::Relaxed) {
            0 => None,
            s => Some(UNIX_EPOCH + Duration::from_secs(s)),
        }
    }

    /// A certificate and a trust bundle are installed.
    pub fn is_ready(&self) -> bool {
        self.certified.load().is_some() && !self.bundle.load().anchors.is_empty()
    }

    pub(crate) fn algs(&self) -> WebPkiSupportedAlgorithms {
        self.provider.signature_verification_algorithms
    }

    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        server: bool,
    ) -> Result<SpiffeId, Error> {
        let bundle = self.bundle.load();
        if bundle.anchors.is_empty() {
            return Err(Error::General("no trust bundle installed".into()));
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        let usage = if server {
            webpki::KeyUsage::server_auth()
        } else {
            webpki::KeyUsage::client_auth()
        };
        cert.verify_for_usage(
            self.algs().all,
            &bundle.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(crate::api::webpki_error)?;
        // Only a workload's id (`/ns/<ns>/sa/<sa>`) speaks for a workload: an
        // operator's credential, issued by the same CA, is no mesh identity.
        spiffe_of(end_entity)
            .filter(|id| id.workload_parts().is_some())
            .ok_or_else(|| {
                Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                    Arc::new(NoSpiffe),
                )))
            })
    }

    /// The trust anchors of the current bundle.
    pub(crate) fn anchors(&self) -> Arc<Vec<TrustAnchor<'static>>> {
        Arc::new(self.bundle.load().anchors.clone())
    }

    /// The crypto provider.
    pub(crate) fn crypto(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    /// Presents this store's current certificate (as a TLS client), rotated in place.
    pub fn client_resolver(self: &Arc<Self>) -> Arc<dyn rustls::client::ResolvesClientCert> {
        Arc::new(Resolver(self.clone()))
    }

    /// Presents this store's current certificate (as a TLS server), rotated in place.
    pub fn server_resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(Resolver(self.clone()))
    }

    /// The inbound's TLS config: client certificates required, verified against the
    /// current bundle; ALPN [`MESH_ALPN`].
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let verifier = Arc::new(ClientVerifier(self.clone()));
        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13]);
        let mut cfg = match builder {
            Ok(b) => b
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(Arc::new(Resolver(self.clone()))),
            // TLS 1.3 with the ring provider is always available; keep a safe default.
            Err(_) => ServerConfig::builder()
                .with_client_cert_verifier(Arc::new(ClientVerifier(self.clone())))
                .with_cert_resolver(Arc::new(Resolver(self.clone()))),
        };
        cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
        Arc::new(cfg)
    }

    /// The outbound's TLS config toward one peer: the server must present a
    /// certificate chaining to the bundle with exactly the SPIFFE id `expected`.
    pub fn client_config(self: &Arc<Self>, expected: SpiffeId) -> Arc<ClientConfig> {
        let verifier = Arc::new(ServerVerifier {
            store: self.clone(),
            expected,
        });
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13]);
        let mut cfg = match builder {
            Ok(b) => b
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_cert_resolver(Arc::new(Resolver(self.clone()))),
            Err(_) => ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_cert_resolver(Arc::new(Resolver(self.clone()))),
        };
        cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
        Arc::new(cfg)
    }

    /// The server name to present: peers are verified by SPIFFE id, not by name.
    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from("sinew.mesh")
            .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
    }
}

#[derive(Debug)]
struct NoSpiffe;

impl std::fmt::Display for NoSpiffe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the certificate carries no single workload SPIFFE id")
    }
}

impl std::error::Error for NoSpiffe {}

#[derive(Debug)]
struct WrongIdentity {
    expected: SpiffeId,
    got: SpiffeId,
}

impl std::fmt::Display for WrongIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer is {}, expected {}", self.got, self.expected)
    }
}

impl std::error::Error for WrongIdentity {}

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified.load_full()
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.certified.load_full()
    }

    fn has_certs(&self) -> bool {
        self.0.certified.load().is_some()
    }
}

#[derive(Debug)]
struct ClientVerifier(Arc<CertStore>);

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.0.verify_chain(end_entity, intermediates, now, false)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.algs())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algs().supported_schemes()
    }
}

#[derive(Debug)]
struct ServerVerifier {
    store: Arc<CertStore>,
    expected: SpiffeId,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let got = self
            .store
            .verify_chain(end_entity, intermediates, now, true)?;
        if got != self.expected {
            return Err(Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(Arc::new(WrongIdentity {
                    expected: self.expected.clone(),
                    got,
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.store.algs())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.store.algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.store.algs().supported_schemes()
    }
}
