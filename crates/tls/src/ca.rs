//! The certificate authority that issues workload certificates.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use crate::{SpiffeId, TlsError};

/// A signing CA: its key, its certificate and chain, and the roots to trust.
pub struct Ca {
    key: KeyPair,
    /// The signing certificate.
    cert: CertificateDer<'static>,
    /// Certificates between the signing certificate and a root (excluding roots).
    intermediates: Vec<CertificateDer<'static>>,
    /// Trust anchors.
    roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Ca")
            .field("intermediates", &self.intermediates.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// A certificate issued for a CSR.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf followed by the intermediates, PEM.
    pub chain_pem: String,
    /// When it expires.
    pub not_after: SystemTime,
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// A CA certificate's parameters: `dn`, any path length, signing usages, valid from
/// a minute ago (clock slack) for `validity`.
fn ca_params(dn: DistinguishedName, validity: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = offset(now - Duration::from_secs(60));
    params.not_after = offset(now + validity);
    params
}

fn is_self_signed(der: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.subject() == c.issuer())
        .unwrap_or(false)
}

/// PEM text of one certificate, with `\n` line ends (the `pem` crate's default is `\r\n`).
fn pem_of(der: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.as_ref()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Parses every certificate in a PEM text.
pub fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::invalid(what, e))?;
    if certs.is_empty() {
        return Err(TlsError::invalid(what, "no certificate in the PEM"));
    }
    Ok(certs)
}

impl Ca {
    /// A new self-signed ECDSA P-256 root, valid for `validity`.
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Ca, TlsError> {
        let key = KeyPair::generate().map_err(|e| TlsError::invalid("CA key", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Sinew");
        // A distinct name per root, so two roots (e.g. during a rotation) are told apart.
        let born = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // A random part too: two roots made in the same second (a rotation right
        // after a start, two meshes started together) must still have different
        // names, or a verifier that finds an issuer by name tries the wrong key.
        dn.push(
            DnType::CommonName,
            format!("Sinew root CA {trust_domain} {born}-{}", random_hex(4)?),
        );
        let params = ca_params(dn, validity);
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::invalid("CA certificate", e))?;
        let der = cert.der().clone();
        Ok(Ca {
            key,
            cert: der.clone(),
            intermediates: Vec::new(),
            roots: vec![der],
        })
    }

    /// A CA from an operator's PEM files: `cert_pem` holds the signing certificate
    /// (a root, or an intermediate followed by its chain up to and including the
    /// root); `key_pem` its private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        let certs = certs_from_pem("CA certificate", cert_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::invalid("CA key", e))?;
        let cert = certs[0].clone();
        // The key must belong to the signing certificate.
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| TlsError::invalid("CA certificate", e))?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(TlsError::invalid(
                "CA key",
                "the key does not belong to the first certificate in the CA file",
            ));
        }
        if !parsed.is_ca() {
            return Err(TlsError::invalid(
                "CA certificate",
                "the first certificate is not a CA (basicConstraints CA:TRUE)",
            ));
        }
        let mut roots: Vec<_> = certs
            .iter()
            .filter(|c| is_self_signed(c))
            .cloned()
            .collect();
        let intermediates: Vec<_> = certs
            .iter()
            .skip(1)
            .filter(|c| !is_self_signed(c))
            .cloned()
            .collect();
        if roots.is_empty() {
            return Err(TlsError::invalid(
                "CA certificate",
                "no root: an intermediate must be followed by its chain up to the root",
            ));
        }
        roots.dedup();
        Ok(Ca {
            key,
            cert,
            intermediates,
            roots,
        })
    }

    /// Loads `ca.pem` and `ca-key.pem` from `dir`, or generates a root there on first
    /// start. The directory is owner-only (0700) and the key file 0600.
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<Ca, TlsError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |path: &Path, source| TlsError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io(dir, e))?;
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        if cert_path.exists() || key_path.exists() {
            let cert = std::fs::read_to_string(&cert_path).map_err(|e| io(&cert_path, e))?;
            let key = std::fs::read_to_string(&key_path).map_err(|e| io(&key_path, e))?;
            let mode = std::fs::metadata(&key_path)
                .map_err(|e| io(&key_path, e))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(TlsError::invalid(
                    "CA key",
                    format!(
                        "{} is readable by others (mode {:o}); chmod 600 it",
                        key_path.display(),
                        mode & 0o777
                    ),
                ));
            }
            return Ca::from_pem(&cert, &key);
        }
        let ca = Ca::generate(trust_domain, Duration::from_secs(10 * 365 * 24 * 3600))?;
        crate::private_file::write(&key_path, ca.key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, ca.cert_pem()).map_err(|e| io(&cert_path, e))?;
        tracing::info!(path = %cert_path.display(), "generated a new root CA");
        Ok(ca)
    }

    /// The signing certificate, PEM.
    pub fn cert_pem(&self) -> String {
        pem_of(&self.cert)
    }

    /// The private key, PEM. Only for writing it to an owner-only file.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The intermediates and roots after the signing certificate, PEM.
    pub fn chain_pem(&self) -> String {
        let mut out: String = self.intermediates.iter().map(|c| pem_of(c)).collect();
        if !self.roots.contains(&self.cert) {
            out.push_str(&self.roots_pem());
        }
        out
    }

    /// The trust anchors, PEM.
    pub fn roots_pem(&self) -> String {
        self.roots.iter().map(|r| pem_of(r)).collect()
    }

    /// The trust anchors.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Signs a CSR (DER) for `id`, valid for `ttl`, as a workload certificate (server
    /// and client). The CSR's signature is checked (the requester holds the key);
    /// everything else in it is ignored: the identity, usages and lifetime are the
    /// CA's decision.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<Issued, TlsError> {
        self.sign_csr_as(csr_der, id, ttl, &Profile::workload())
    }

    /// A new key and a workload certificate for `id`, valid for `ttl`: `(key PEM,
    /// certificate)`. For identities made in process (an embedding program, a test
    /// with its own CA) rather than requested over the control plane's API.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<(String, Issued), TlsError> {
        let (key_pem, csr) = new_key_and_csr()?;
        Ok((key_pem, self.sign_csr(&csr, id, ttl)?))
    }

    /// A cross-certificate: `other`'s signing certificate (its name and key)
    /// issued by this CA, PEM. During a root rotation it lets a client that trusts
    /// only this CA's root verify what `other` signs.
    pub fn cross_sign(&self, other: &Ca, validity: Duration) -> Result<String, TlsError> {
        // The subject as `other` carries it: verifiers match an issuer by its name's
        // encoding, and rcgen (which made Sinew's roots) writes these attributes as
        // UTF-8 strings again. An operator's CA with other encodings gets a
        // cross-certificate that matches nothing, and its operators refresh their
        // credentials at the rotation.
        let (_, parsed) = x509_parser::parse_x509_certificate(&other.cert)
            .map_err(|e| TlsError::invalid("CA certificate", e))?;
        let mut dn = DistinguishedName::new();
        for attr in parsed.subject().iter_attributes() {
            let kind = match attr.attr_type().to_id_string().as_str() {
                "2.5.4.3" => DnType::CommonName,
                "2.5.4.10" => DnType::OrganizationName,
                "2.5.4.11" => DnType::OrganizationalUnitName,
                "2.5.4.6" => DnType::CountryName,
                _ => continue,
            };
            if let Ok(v) = attr.as_str() {
                dn.push(kind, v);
            }
        }
        let mut params = ca_params(dn, validity);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()));
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)
            .map_err(|e| TlsError::invalid("CA certificate", e))?;
        let cert = params
            .signed_by(&other.key, &issuer)
            .map_err(|e| TlsError::invalid("cross-signing", e))?;
        Ok(cert.pem())
    }

    /// Checks that `csr_der` is a well-formed CSR whose signature holds (its
    /// requester has the key), without signing anything.
    pub fn check_csr(csr_der: &[u8]) -> Result<(), TlsError> {
        let csr_der = CertificateSigningRequestDer::from(csr_der.to_vec());
        CertificateSigningRequestParams::from_der(&csr_der)
            .map(|_| ())
            .map_err(|e| TlsError::invalid("CSR", e))
    }

    /// Signs a CSR for `id` with the usages and extra names of `profile`.
    pub fn sign_csr_as(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        profile: &Profile,
    ) -> Result<Issued, TlsError> {
        let csr_der = CertificateSigningRequestDer::from(csr_der.to_vec());
        let csr = CertificateSigningRequestParams::from_der(&csr_der)
            .map_err(|e| TlsError::invalid("CSR", e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e| TlsError::invalid("SPIFFE id", e))?,
        )];
        for d in &profile.dns_names {
            params.subject_alt_names.push(SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|e| TlsError::invalid("DNS name", format!("{d:?}: {e}")))?,
            ));
        }
        for ip in &profile.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = Vec::new();
        if profile.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if profile.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let now = SystemTime::now();
        let not_after = now + ttl;
        // A minute of slack for clocks that run a little behind.
        params.not_before = offset(now - Duration::from_secs(60));
        params.not_after = offset(not_after);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()));
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)
            .map_err(|e| TlsError::invalid("CA certificate", e))?;
        let cert = params
            .signed_by(&csr.public_key, &issuer)
            .map_err(|e| TlsError::invalid("signing", e))?;
        let mut chain_pem = cert.pem();
        for i in &self.intermediates {
            chain_pem.push_str(&pem_of(i));
        }
        if !self.roots.contains(&self.cert) {
            chain_pem.push_str(&pem_of(&self.cert));
        }
        Ok(Issued {
            chain_pem,
            not_after,
        })
    }
}

/// What a certificate is for: its extended key usages and names beside its SPIFFE id.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// TLS server authentication.
    pub server: bool,
    /// TLS client authentication.
    pub client: bool,
    /// DNS names (the control plane's, for clients that verify by name).
    pub dns_names: Vec<String>,
    /// IP addresses.
    pub ips: Vec<std::net::IpAddr>,
}

impl Profile {
    /// A workload's: server and client, the SPIFFE id alone.
    pub fn workload() -> Profile {
        Profile {
            server: true,
            client: true,
            ..Profile::default()
        }
    }

    /// An operator's credential: client only.
    pub fn operator() -> Profile {
        Profile {
            client: true,
            ..Profile::default()
        }
    }
}

/// `n` random bytes from the system's source, hex.
fn random_hex(n: usize) -> Result<String, TlsError> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| TlsError::invalid("CA name", "the system random source failed"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn random_serial() -> [u8; 16] {
    let mut b = [0u8; 16];
    // Serial numbers need uniqueness, not secrecy: time and a counter suffice, and the
    // top bit is cleared so the DER integer stays positive.
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    b[..8].copy_from_slice(&t.to_be_bytes());
    b[8..].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    b[0] &= 0x7f;
    b
}

/// A new ECDSA P-256 key and a CSR for it: `(key PEM, CSR DER)`. The key never
/// leaves the process that calls this.
pub fn new_key_and_csr() -> Result<(String, Vec<u8>), TlsError> {
    let key = KeyPair::generate().map_err(|e| TlsError::invalid("key", e))?;
    let params = CertificateParams::default();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| TlsError::invalid("CSR", e))?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CA's PEM is what openssl and every PEM reader expect: `\n` line ends, 64
    /// base64 characters a line, and it parses back to the same DER.
    #[test]
    fn pem_text_has_lf_lines_of_64_and_round_trips() -> Result<(), TlsError> {
        let ca = Ca::generate("pem.test", Duration::from_secs(3600))?;
        let pem = ca.cert_pem();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"), "{pem}");
        assert!(pem.ends_with("-----END CERTIFICATE-----\n"), "{pem}");
        assert!(!pem.contains('\r'), "{pem:?}");
        let body: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let (last, full) = body
            .split_last()
            .ok_or_else(|| TlsError::invalid("test", "empty PEM"))?;
        assert!(full.iter().all(|l| l.len() == 64), "{pem}");
        assert!(!last.is_empty() && last.len() <= 64, "{pem}");
        let back = certs_from_pem("test PEM", &pem)?;
        assert_eq!(back, vec![ca.cert.clone()]);
        Ok(())
    }
}
