//! Sinew's model: the resources users write, their validation, and the compiled
//! configuration a proxy runs from.
//!
//! Everything here is pure: no I/O, no async runtime. The proxy and the control plane
//! both read documents through [`load::parse_documents`], validate them into a
//! [`set::Resources`] set (the checks, one module per kind family, are in
//! [`validate`]), and compile that into a [`compile::ProxyConfig`] for one proxy.
//!
//! Parse, don't validate: a field holding a typed value (a duration, an address, a
//! header name, a CIDR, a SPIFFE id, a pattern, a URL, a namespace) is parsed when its
//! document is read ([`parsed::Parsed`], [`fields`], [`matching`]), keeping the user's
//! text; validation checks only what needs context (references, duplicates, ranges),
//! and compiling reads the values, with nothing left to parse or to drop.
//!
//! Route matching ([`route`]) lives here too, so precedence rules are tested without
//! a network, and so does the authorization engine ([`authz`]).

pub mod authz;
pub mod compile;
pub mod duration;
pub mod error;
pub mod fields;
pub mod load;
pub mod matching;
pub mod parsed;
pub mod policy;
pub mod resource;
pub mod route;
pub mod set;
pub mod spiffe;
pub mod validate;
pub mod vip;

pub use compile::{ProxyConfig, compile_proxy};
pub use error::{ConfigError, ConfigErrors};
pub use load::{Document, Origin, parse_apply, parse_documents, parse_sources};
pub use resource::Resources;
