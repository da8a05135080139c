//! Parse, don't validate: a document field that holds a typed value (a duration, an
//! address, a header name, a CIDR, ...) is parsed once, when the document is read, and
//! keeps the text the user wrote.
//!
//! A [`Parsed<T>`] deserializes from a string and fails with the reason when the text
//! is not a `T`, so a document that was read holds only values the compiler can use:
//! [`crate::compile`] reads [`Parsed::get`] and has nothing left to parse or to drop.
//! It serializes as the text, so a document read and written back is the one the
//! user wrote (`0.5s`-style spellings and all), and errors quote it.
//!
//! Constraints that depend on context (a duration that must be more than zero, a
//! header a forwarded claim may not overwrite) stay in [`crate::validate`]; they read
//! the typed value.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::str::FromStr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::vip::Cidr;

/// A type a document field parses into, with the reason (quoting the text) when the
/// text is not one.
pub trait Parse: Sized {
    /// Parses `text`; the error is a reason for a person, e.g.
    /// `"x" is not a valid header name`.
    fn parse(text: &str) -> Result<Self, String>;
}

/// A value parsed from a document, with the text it was parsed from.
///
/// Equality and serialization use the text: two spellings of the same value (`60s`,
/// `1m`) are different documents, as the user wrote them.
#[derive(Clone)]
pub struct Parsed<T> {
    text: String,
    value: T,
}

impl<T: Parse> Parsed<T> {
    /// Parses `text`, keeping it.
    pub fn new(text: impl Into<String>) -> Result<Self, String> {
        let text = text.into();
        let value = T::parse(&text)?;
        Ok(Parsed { text, value })
    }
}

impl<T> Parsed<T> {
    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed value.
    pub fn get(&self) -> &T {
        &self.value
    }
}

impl<T: Copy> Parsed<T> {
    /// The parsed value, copied.
    pub fn value(&self) -> T {
        self.value
    }
}

impl<T: fmt::Display> From<T> for Parsed<T> {
    /// A value made in code: its text is its display form.
    fn from(value: T) -> Self {
        Parsed {
            text: value.to_string(),
            value,
        }
    }
}

impl<T: Parse> FromStr for Parsed<T> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Parsed::new(s)
    }
}

impl<T> Deref for Parsed<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> AsRef<str> for Parsed<T> {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl<T> fmt::Debug for Parsed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl<T> fmt::Display for Parsed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<T> PartialEq for Parsed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl<T> Eq for Parsed<T> {}

impl<T> PartialEq<str> for Parsed<T> {
    fn eq(&self, other: &str) -> bool {
        self.text == other
    }
}

impl<T> PartialEq<&str> for Parsed<T> {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl<T> Serialize for Parsed<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de, T: Parse> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Parsed inside the visitor, while the scalar is the current node: a YAML
        // error then points at the value's own line, not at its mapping's first.
        struct Text<T>(std::marker::PhantomData<T>);
        impl<T: Parse> serde::de::Visitor<'_> for Text<T> {
            type Value = Parsed<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Parsed<T>, E> {
                Parsed::new(v).map_err(E::custom)
            }
        }
        d.deserialize_str(Text(std::marker::PhantomData))
    }
}

/// In a CRD's schema the field is the string the user writes.
#[cfg(feature = "schema")]
impl<T> schemars::JsonSchema for Parsed<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        String::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }
}

/// A Gateway API duration ([`crate::duration::parse`]).
impl Parse for Duration {
    fn parse(text: &str) -> Result<Self, String> {
        crate::duration::parse(text)
    }
}

impl Parse for SocketAddr {
    fn parse(text: &str) -> Result<Self, String> {
        text.parse()
            .map_err(|_| format!("{text:?} is not an address:port"))
    }
}

impl Parse for IpAddr {
    fn parse(text: &str) -> Result<Self, String> {
        text.parse()
            .map_err(|_| format!("{text:?} is not an IP address"))
    }
}

impl Parse for HeaderName {
    fn parse(text: &str) -> Result<Self, String> {
        HeaderName::from_bytes(text.as_bytes())
            .map_err(|_| format!("{text:?} is not a valid header name"))
    }
}

impl Parse for HeaderValue {
    fn parse(text: &str) -> Result<Self, String> {
        HeaderValue::from_str(text).map_err(|_| "not a valid header value".to_owned())
    }
}

/// An HTTP method in upper case (`GET`): methods are case-sensitive, and a lower-case
/// `get` would be an extension method no client sends.
impl Parse for Method {
    fn parse(text: &str) -> Result<Self, String> {
        match Method::from_bytes(text.as_bytes()) {
            Ok(m) if !text.bytes().any(|b| b.is_ascii_lowercase()) => Ok(m),
            _ => Err(format!(
                "{text:?} is not an HTTP method (use upper case, e.g. GET)"
            )),
        }
    }
}

/// A gRPC status by its canonical name (`UNAVAILABLE`): the status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcCode(pub u8);

impl Parse for GrpcCode {
    fn parse(text: &str) -> Result<Self, String> {
        crate::resource::grpc_code(text)
            .map(GrpcCode)
            .ok_or_else(|| format!("{text:?} is not a gRPC status name (e.g. UNAVAILABLE)"))
    }
}

/// A JWKS document with public keys only ([`crate::authz::public_jwks`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PublicJwks(pub serde_json::Value);

impl Parse for PublicJwks {
    fn parse(text: &str) -> Result<Self, String> {
        crate::authz::public_jwks(text).map(PublicJwks)
    }
}

impl Parse for crate::spiffe::SpiffeId {
    fn parse(text: &str) -> Result<Self, String> {
        text.parse()
    }
}

impl Parse for Cidr {
    fn parse(text: &str) -> Result<Self, String> {
        Cidr::parse(text)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn keeps_the_text_and_serializes_it() {
        let d: Parsed<Duration> = serde_json::from_str("\"1m30s\"").unwrap();
        assert_eq!(d.value(), Duration::from_secs(90));
        assert_eq!(d, "1m30s");
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1m30s\"");
        let h: Parsed<HeaderName> = serde_json::from_str("\"X-User\"").unwrap();
        assert_eq!(h.get(), "x-user");
        assert_eq!(h.as_str(), "X-User", "the user's spelling is kept");
    }

    #[test]
    fn refuses_bad_text_with_the_reason() {
        let cases: [(&str, Result<(), String>); 6] = [
            ("soon", Parsed::<Duration>::new("soon").map(drop)),
            ("1.2.3.4", Parsed::<SocketAddr>::new("1.2.3.4").map(drop)),
            ("ten.0.0.1", Parsed::<IpAddr>::new("ten.0.0.1").map(drop)),
            ("bad name", Parsed::<HeaderName>::new("bad name").map(drop)),
            ("get", Parsed::<Method>::new("get").map(drop)),
            ("10.0.0.0/40", Parsed::<Cidr>::new("10.0.0.0/40").map(drop)),
        ];
        let want = [
            "invalid duration \"soon\"",
            "\"1.2.3.4\" is not an address:port",
            "\"ten.0.0.1\" is not an IP address",
            "\"bad name\" is not a valid header name",
            "\"get\" is not an HTTP method",
            "prefix",
        ];
        for ((text, got), want) in cases.into_iter().zip(want) {
            let e = got.expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}

/// A CRD's schema is unchanged by parsing: a typed field is the string it was.
#[cfg(all(test, feature = "schema"))]
mod schema_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_parsed_field_has_the_schema_of_a_string() {
        let same = |a: schemars::Schema, b: schemars::Schema| {
            assert_eq!(a.to_value(), b.to_value());
        };
        same(
            schemars::schema_for!(Option<Parsed<Duration>>),
            schemars::schema_for!(Option<String>),
        );
        same(
            schemars::schema_for!(Vec<Parsed<HeaderName>>),
            schemars::schema_for!(Vec<String>),
        );
        same(
            schemars::schema_for!(Parsed<SocketAddr>),
            schemars::schema_for!(String),
        );
    }
}
