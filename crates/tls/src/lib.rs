//! Sinew's identity plumbing.
//!
//! - SPIFFE ids come from the model ([`SpiffeId`]).
//! - [`ca`]: the control plane's certificate authority: a generated ECDSA P-256 root, or
//!   an operator-provided root or intermediate; it signs CSRs with the identity the
//!   control plane decided (never the one a CSR asks for).
//! - [`store`]: a proxy's rotating certificate and trust bundle, and rustls configs that
//!   verify peers by SPIFFE id. The verifiers read the current trust bundle at every
//!   handshake, so rotating a certificate or a root needs no new config and drops no
//!   connection.
//!
//! - [`private_file`]: owner-only files (keys, credentials, tokens), written whole.
//!
//! One crypto provider: rustls with ring (rcgen and webpki use ring too).

#![forbid(unsafe_code)]

pub mod api;
pub mod ca;
pub mod private_file;
pub mod store;

pub use ca::{Ca, Issued, Profile, certs_from_pem, new_key_and_csr};
pub use sinew_model::spiffe::SpiffeId;
pub use store::{CertStore, MESH_ALPN, not_after_of, peer_identity, spiffe_of};

/// A TLS or certificate problem, with what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CSR could not be read.
    #[error("{what}: {detail}")]
    Invalid {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        detail: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

impl TlsError {
    pub(crate) fn invalid(what: &'static str, detail: impl std::fmt::Display) -> TlsError {
        TlsError::Invalid {
            what,
            detail: detail.to_string(),
        }
    }
}
