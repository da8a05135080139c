//! The webhook's serving certificate: a small CA of its own (its certificate is the
//! `caBundle` the API server trusts) and a leaf for the webhook's names.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A generated CA and the serving certificate it signed, all PEM.
#[derive(Debug, Clone)]
pub struct WebhookCerts {
    /// The CA certificate: the webhook configuration's `caBundle`.
    pub ca_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// The serving certificate's private key.
    pub key_pem: String,
}

/// Generates a CA and a serving certificate for `names` (DNS names or IP addresses),
/// valid for `validity`.
pub fn generate(names: &[String], validity: Duration) -> Result<WebhookCerts, String> {
    let first = names
        .first()
        .ok_or_else(|| "the webhook certificate needs at least one name".to_owned())?;
    let now = SystemTime::now();
    let ca_key = KeyPair::generate().map_err(|e| format!("webhook CA key: {e}"))?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Sinew");
    dn.push(DnType::CommonName, "Sinew webhook CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = (now - Duration::from_secs(300)).into();
    ca.not_after = (now + validity).into();
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|e| format!("webhook CA certificate: {e}"))?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().map_err(|e| format!("webhook key: {e}"))?;
    let mut leaf = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, first.as_str());
    leaf.distinguished_name = dn;
    leaf.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| format!("webhook certificate name {n:?}: {e}")),
        })
        .collect::<Result<_, _>>()?;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = (now - Duration::from_secs(300)).into();
    leaf.not_after = (now + validity).into();
    let cert = leaf
        .signed_by(&key, &issuer)
        .map_err(|e| format!("webhook certificate: {e}"))?;
    Ok(WebhookCerts {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
