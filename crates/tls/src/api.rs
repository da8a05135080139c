//! TLS for the control plane's API (`sinew control`, port 15010).
//!
//! The control plane serves TLS 1.3 only, with a certificate from the mesh CA for
//! `spiffe://<td>/ns/<ns>/sa/sinew-control` (and the DNS names and addresses it is
//! reached by). Client certificates are optional at the handshake, because a proxy's
//! bootstrap has none yet, and verified against the mesh roots when presented; every
//! call then decides from the verified certificate whether it may go on (see the
//! control plane's `auth` module), so an unauthenticated caller gets a gRPC status
//! that says why rather than a bare TLS alert.
//!
//! Clients verify the control plane without trust on first use: against roots they
//! were given (an operator's credential file, a Kubernetes ConfigMap, a proxy's
//! current trust bundle), or, for a proxy's bootstrap, against the root whose SHA-256
//! its join token carries ([`ControlTrust::Pinned`], as kubeadm's discovery hash).

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
};
use rustls_pki_types::TrustAnchor;
use rustls_pki_types::pem::PemObject;

use crate::TlsError;
use crate::ca::certs_from_pem;
use crate::store::{CertStore, not_after_of, provider, spiffe_of};

/// The control plane's service account: its certificate is
/// `spiffe://<td>/ns/<namespace>/sa/sinew-control`. No join token is issued for it.
pub const CONTROL_ACCOUNT: &str = "sinew-control";

/// The ALPN of the API: gRPC over HTTP/2.
pub const API_ALPN: &[u8] = b"h2";

/// SHA-256 of `data`, lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 (hex) of a certificate's DER: how a join token names the root it was
/// issued under, and how operator credentials are recorded.
pub fn cert_hash(der: &CertificateDer<'_>) -> String {
    sha256_hex(der)
}

/// How a client decides that it talks to the real control plane.
#[derive(Clone)]
pub enum ControlTrust {
    /// Roots given to the client (PEM from a credential file or a ConfigMap).
    Roots(Vec<CertificateDer<'static>>),
    /// The root whose SHA-256 (hex) a join token carries: the control plane's chain
    /// must include it, and the leaf must chain to it.
    Pinned(String),
    /// A proxy's current trust bundle (after its bootstrap; follows root rotations).
    Store(Arc<CertStore>),
}

impl std::fmt::Debug for ControlTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlTrust::Roots(r) => write!(f, "Roots({})", r.len()),
            ControlTrust::Pinned(h) => write!(f, "Pinned(sha256:{h})"),
            ControlTrust::Store(_) => write!(f, "Store"),
        }
    }
}

impl ControlTrust {
    /// Roots from PEM text, naming `what` in errors.
    pub fn from_pem(what: &'static str, pem: &str) -> Result<ControlTrust, TlsError> {
        Ok(ControlTrust::Roots(certs_from_pem(what, pem)?))
    }
}

/// The certificate a client presents.
#[derive(Clone)]
pub enum ClientAuth {
    /// None (a proxy's bootstrap).
    None,
    /// A fixed certificate chain and key, PEM (an operator's credential).
    Static {
        /// Leaf first.
        chain_pem: String,
        /// The private key.
        key_pem: String,
    },
    /// A proxy's current workload certificate, rotated in place.
    Store(Arc<CertStore>),
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a key.
        f.write_str(match self {
            ClientAuth::None => "None",
            ClientAuth::Static { .. } => "Static",
            ClientAuth::Store(_) => "Store",
        })
    }
}

fn anchors_of(roots: &[CertificateDer<'_>]) -> Result<Vec<TrustAnchor<'static>>, Error> {
    roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .map(|a| a.to_owned())
                .map_err(|e| other(format!("unusable root: {e:?}")))
        })
        .collect()
}

#[derive(Debug)]
struct Message(String);

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

fn other(msg: impl Into<String>) -> Error {
    Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(Message(msg.into())),
    )))
}

/// A webpki verdict as the rustls error that says it best.
pub(crate) fn webpki_error(e: webpki::Error) -> Error {
    match e {
        webpki::Error::UnknownIssuer => {
            Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        }
        webpki::Error::CertExpired { .. } => {
            Error::InvalidCertificate(rustls::CertificateError::Expired)
        }
        webpki::Error::CertNotValidYet { .. } => {
            Error::InvalidCertificate(rustls::CertificateError::NotValidYet)
        }
        webpki::Error::InvalidSignatureForPublicKey => {
            Error::InvalidCertificate(rustls::CertificateError::BadSignature)
        }
        other => Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(other),
        ))),
    }
}

#[derive(Debug)]
struct ControlVerifier {
    trust: ControlTrust,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ControlVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let anchors = match &self.trust {
            ControlTrust::Roots(r) => anchors_of(r)?,
            ControlTrust::Store(s) => s.anchors().as_ref().clone(),
            ControlTrust::Pinned(hash) => {
                let root = intermediates
                    .iter()
                    .find(|c| cert_hash(c) == *hash)
                    .ok_or_else(|| {
                        other(format!(
                            "the control plane's chain has no root with the join token's hash sha256:{hash}: it is not the control plane that issued the token"
                        ))
                    })?;
                anchors_of(std::slice::from_ref(root))?
            }
        };
        if anchors.is_empty() {
            return Err(other("no roots to verify the control plane with"));
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        match spiffe_of(end_entity) {
            Some(id)
                if id
                    .workload_parts()
                    .is_some_and(|(_, sa)| sa == CONTROL_ACCOUNT) =>
            {
                Ok(ServerCertVerified::assertion())
            }
            Some(id) => Err(other(format!(
                "the server is {id}, not the control plane (…/sa/{CONTROL_ACCOUNT})"
            ))),
            None => Err(other("the server's certificate carries no SPIFFE id")),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client's TLS config for the control plane's API: TLS 1.3, ALPN `h2`, the
/// server verified by `trust` and by its SPIFFE id (`…/sa/sinew-control`), never by
/// the name it was dialled by (an address, a Service name, a tunnel).
pub fn control_client_config(
    trust: ControlTrust,
    auth: ClientAuth,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(ControlVerifier {
        trust,
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::invalid("TLS", e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Store(store) => builder.with_client_cert_resolver(store.client_resolver()),
        ClientAuth::Static { chain_pem, key_pem } => {
            let chain = certs_from_pem("credential certificate", &chain_pem)?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| TlsError::invalid("credential key", e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::invalid("credential", e))?
        }
    };
    cfg.alpn_protocols = vec![API_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// Verifies client certificates (when presented) against the control plane's
/// current roots. Expiry is left to the caller: a chain that is only out of date is
/// accepted here so that the API can refuse it with a status naming the expiry,
/// instead of a TLS alert the user cannot read. Every call checks it.
#[derive(Debug)]
struct OptionalClientVerifier(Arc<CertStore>);

impl ClientCertVerifier for OptionalClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let anchors = self.0.anchors();
        if anchors.is_empty() {
            return Err(other("the control plane has no roots"));
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        let verify = |at: UnixTime| {
            cert.verify_for_usage(
                self.0.algs().all,
                &anchors,
                intermediates,
                at,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map(|_| ())
        };
        match verify(now) {
            Ok(()) => Ok(ClientCertVerified::assertion()),
            Err(webpki::Error::CertExpired { .. }) => {
                // Verified as of its last second of validity: only its age is wrong,
                // and the API refuses it by that (see above).
                let last = not_after_of(end_entity)
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .ok_or_else(|| other("unreadable validity"))?
                    .saturating_sub(Duration::from_secs(1));
                verify(UnixTime::since_unix_epoch(last)).map_err(webpki_error)?;
                Ok(ClientCertVerified::assertion())
            }
            Err(e) => Err(webpki_error(e)),
        }
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

/// The control plane's TLS config: TLS 1.3 only, ALPN `h2`, its certificate from
/// `store` (rotated in place), client certificates optional and verified against
/// `store`'s roots.
pub fn control_server_config(store: &Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(store.crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::invalid("TLS", e))?
        .with_client_cert_verifier(Arc::new(OptionalClientVerifier(store.clone())))
        .with_cert_resolver(store.server_resolver());
    cfg.alpn_protocols = vec![API_ALPN.to_vec()];
    // No session tickets or resumption: every connection proves its certificate
    // afresh, so a revoked or expired credential is never resumed past.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}
