//! Route match conditions whose value is a regular expression or not depending on a
//! sibling field (`type`): parsed when the document is read, so a condition holds
//! either its literal or its compiled [`Pattern`], never text still to compile.
//!
//! They serialize as the Gateway API fields (`type`, `name`, `value`) and have the
//! same schema as before; only reading them is hand-written, to compile the pattern
//! while the value is the current node (an error then names `…value` and its line).

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use http::HeaderName;

use crate::parsed::Parsed;
use crate::resource::{PathMatchType, StringMatchType};
use crate::route::Pattern;

/// One line for a regex error (the regex crate's messages span several lines).
pub(crate) fn regex_problem(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().last().unwrap_or("").trim();
    let last = last.strip_prefix("error: ").unwrap_or(last);
    format!("invalid regular expression: {last}")
}

/// Compiles a user's pattern. It is checked as written too: anchoring it could make
/// an unbalanced one (`a)|(b`) compile into something else.
fn pattern(source: &str) -> Result<Pattern, String> {
    regex::Regex::new(source).map_err(|e| regex_problem(&e))?;
    Pattern::new(source).map_err(|e| regex_problem(&e))
}

/// Path condition.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpPathMatch(PathValue);

#[derive(Debug, Clone, PartialEq)]
enum PathValue {
    Exact(String),
    PathPrefix(String),
    RegularExpression(Pattern),
}

impl HttpPathMatch {
    /// A condition of type `kind` on `value`; the reason when `value` is not a
    /// valid regular expression for a `RegularExpression` match, or not a path
    /// (starting with `/`) for an `Exact` or `PathPrefix` one.
    pub fn new(kind: PathMatchType, value: impl Into<String>) -> Result<Self, String> {
        let value = value.into();
        if kind != PathMatchType::RegularExpression && !value.starts_with('/') {
            return Err(format!("{value:?} must start with '/'"));
        }
        Ok(HttpPathMatch(match kind {
            PathMatchType::Exact => PathValue::Exact(value),
            PathMatchType::PathPrefix => PathValue::PathPrefix(value),
            PathMatchType::RegularExpression => PathValue::RegularExpression(pattern(&value)?),
        }))
    }

    /// The match type.
    pub fn kind(&self) -> PathMatchType {
        match self.0 {
            PathValue::Exact(_) => PathMatchType::Exact,
            PathValue::PathPrefix(_) => PathMatchType::PathPrefix,
            PathValue::RegularExpression(_) => PathMatchType::RegularExpression,
        }
    }

    /// The path, prefix or pattern as written.
    pub fn value(&self) -> &str {
        match &self.0 {
            PathValue::Exact(v) | PathValue::PathPrefix(v) => v,
            PathValue::RegularExpression(p) => p.source(),
        }
    }

    /// The compiled pattern of a `RegularExpression` match.
    pub fn pattern(&self) -> Option<&Pattern> {
        match &self.0 {
            PathValue::RegularExpression(p) => Some(p),
            _ => None,
        }
    }
}

/// A condition on a named value: a header ([`HttpHeaderMatch`], the name parsed as
/// a header name) or a query parameter ([`HttpQueryParamMatch`], any name).
#[derive(Debug, Clone, PartialEq)]
pub struct ValueMatch<N> {
    name: N,
    value: StringValue,
}

/// Header condition.
pub type HttpHeaderMatch = ValueMatch<Parsed<HeaderName>>;

/// Query-parameter condition.
pub type HttpQueryParamMatch = ValueMatch<String>;

#[derive(Debug, Clone, PartialEq)]
enum StringValue {
    Exact(String),
    RegularExpression(Pattern),
}

impl StringValue {
    fn new(kind: StringMatchType, value: String) -> Result<Self, String> {
        Ok(match kind {
            StringMatchType::Exact => StringValue::Exact(value),
            StringMatchType::RegularExpression => StringValue::RegularExpression(pattern(&value)?),
        })
    }
}

impl<N: AsRef<str>> ValueMatch<N> {
    /// A condition on `name` of type `kind`; the reason when `value` is not a valid
    /// regular expression for a `RegularExpression` match.
    pub fn new(kind: StringMatchType, name: N, value: impl Into<String>) -> Result<Self, String> {
        Ok(ValueMatch {
            name,
            value: StringValue::new(kind, value.into())?,
        })
    }

    /// The match type.
    pub fn kind(&self) -> StringMatchType {
        match self.value {
            StringValue::Exact(_) => StringMatchType::Exact,
            StringValue::RegularExpression(_) => StringMatchType::RegularExpression,
        }
    }

    /// Header (case-insensitive) or parameter (case-sensitive) name, as written.
    pub fn name(&self) -> &str {
        self.name.as_ref()
    }

    /// Value or pattern as written.
    pub fn value(&self) -> &str {
        match &self.value {
            StringValue::Exact(v) => v,
            StringValue::RegularExpression(p) => p.source(),
        }
    }

    /// The compiled pattern of a `RegularExpression` match.
    pub fn pattern(&self) -> Option<&Pattern> {
        match &self.value {
            StringValue::RegularExpression(p) => Some(p),
            StringValue::Exact(_) => None,
        }
    }
}

impl Serialize for HttpPathMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("HttpPathMatch", 2)?;
        st.serialize_field("type", &self.kind())?;
        st.serialize_field("value", self.value())?;
        st.end()
    }
}

impl HttpHeaderMatch {
    /// The header's name, parsed.
    pub fn header(&self) -> &HeaderName {
        self.name.get()
    }
}

impl<N: AsRef<str>> Serialize for ValueMatch<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("HttpHeaderMatch", 3)?;
        st.serialize_field("type", &self.kind())?;
        st.serialize_field("name", self.name())?;
        st.serialize_field("value", self.value())?;
        st.end()
    }
}

/// A `value` read once its `type` is known, compiled while it is the current node.
struct Typed<F>(F);

impl<'de, T, F: FnOnce(String) -> Result<T, String>> DeserializeSeed<'de> for Typed<F> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

impl<T, F: FnOnce(String) -> Result<T, String>> Visitor<'_> for Typed<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v.to_owned()).map_err(E::custom)
    }
}

/// A `value` as it came: parsed at once when `type` came first, else kept until the
/// map ends (the error then names the condition rather than its value).
enum Pending<T> {
    Parsed(T),
    Text(String),
}

const PATH_FIELDS: &[&str] = &["type", "value"];
const HEADER_FIELDS: &[&str] = &["type", "name", "value"];

impl<'de> Deserialize<'de> for HttpPathMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HttpPathMatch;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("struct HttpPathMatch")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HttpPathMatch, A::Error> {
                let mut kind: Option<PathMatchType> = None;
                let mut value: Option<Pending<HttpPathMatch>> = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "type" if kind.is_some() => return Err(de::Error::duplicate_field("type")),
                        "type" => kind = Some(map.next_value()?),
                        "value" if value.is_some() => {
                            return Err(de::Error::duplicate_field("value"));
                        }
                        "value" => {
                            value = Some(match kind {
                                Some(k) => Pending::Parsed(
                                    map.next_value_seed(Typed(|v| HttpPathMatch::new(k, v)))?,
                                ),
                                None => Pending::Text(map.next_value()?),
                            });
                        }
                        other => return Err(de::Error::unknown_field(other, PATH_FIELDS)),
                    }
                }
                let kind = kind.unwrap_or_default();
                match value {
                    Some(Pending::Parsed(m)) => Ok(m),
                    Some(Pending::Text(v)) => {
                        HttpPathMatch::new(kind, v).map_err(de::Error::custom)
                    }
                    None => HttpPathMatch::new(kind, "/").map_err(de::Error::custom),
                }
            }
        }
        d.deserialize_struct("HttpPathMatch", PATH_FIELDS, V)
    }
}

impl<'de, N: Deserialize<'de>> Deserialize<'de> for ValueMatch<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<N>(std::marker::PhantomData<N>);
        impl<'de, N: Deserialize<'de>> Visitor<'de> for V<N> {
            type Value = ValueMatch<N>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("struct HttpHeaderMatch")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ValueMatch<N>, A::Error> {
                let mut kind: Option<StringMatchType> = None;
                let mut name: Option<N> = None;
                let mut value: Option<Pending<StringValue>> = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "type" if kind.is_some() => return Err(de::Error::duplicate_field("type")),
                        "type" => kind = Some(map.next_value()?),
                        "name" if name.is_some() => return Err(de::Error::duplicate_field("name")),
                        "name" => name = Some(map.next_value()?),
                        "value" if value.is_some() => {
                            return Err(de::Error::duplicate_field("value"));
                        }
                        "value" => {
                            value = Some(match kind {
                                Some(k) => Pending::Parsed(
                                    map.next_value_seed(Typed(|v| StringValue::new(k, v)))?,
                                ),
                                None => Pending::Text(map.next_value()?),
                            });
                        }
                        other => return Err(de::Error::unknown_field(other, HEADER_FIELDS)),
                    }
                }
                let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
                let value = match value.ok_or_else(|| de::Error::missing_field("value"))? {
                    Pending::Parsed(v) => v,
                    Pending::Text(v) => {
                        StringValue::new(kind.unwrap_or_default(), v).map_err(de::Error::custom)?
                    }
                };
                Ok(ValueMatch { name, value })
            }
        }
        d.deserialize_struct(
            "HttpHeaderMatch",
            HEADER_FIELDS,
            V(std::marker::PhantomData),
        )
    }
}

/// The CRD schema: the fields as the user writes them (the same shapes as before the
/// types were parsed).
#[cfg(feature = "schema")]
mod schema {
    #![allow(dead_code)]

    use crate::resource::{PathMatchType, StringMatchType};

    fn slash() -> String {
        "/".to_owned()
    }

    /// Path condition.
    #[derive(schemars::JsonSchema)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct HttpPathMatch {
        /// Match type; default `PathPrefix`.
        #[serde(rename = "type", default)]
        pub kind: PathMatchType,
        /// The path, prefix or pattern; default `/`.
        #[serde(default = "slash")]
        pub value: String,
    }

    /// Header (or query-parameter) condition.
    #[derive(schemars::JsonSchema)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct HttpHeaderMatch {
        /// Match type; default `Exact`.
        #[serde(rename = "type", default)]
        pub kind: StringMatchType,
        /// Header (case-insensitive) or parameter (case-sensitive) name.
        pub name: String,
        /// Value or pattern.
        pub value: String,
    }

    macro_rules! same_schema {
        ($t:ident) => {
            impl schemars::JsonSchema for super::$t {
                fn schema_name() -> std::borrow::Cow<'static, str> {
                    $t::schema_name()
                }

                fn schema_id() -> std::borrow::Cow<'static, str> {
                    $t::schema_id()
                }

                fn inline_schema() -> bool {
                    $t::inline_schema()
                }

                fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
                    $t::json_schema(g)
                }
            }
        };
    }
    same_schema!(HttpPathMatch);

    /// A header and a query-parameter condition have one shape in the schema.
    impl<N> schemars::JsonSchema for super::ValueMatch<N> {
        fn schema_name() -> std::borrow::Cow<'static, str> {
            HttpHeaderMatch::schema_name()
        }

        fn schema_id() -> std::borrow::Cow<'static, str> {
            HttpHeaderMatch::schema_id()
        }

        fn inline_schema() -> bool {
            HttpHeaderMatch::inline_schema()
        }

        fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
            HttpHeaderMatch::json_schema(g)
        }
    }
}
