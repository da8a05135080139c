//! The validated set of documents: [`Resources`], built and changed document by
//! document, checked as a whole by [`crate::validate`].

use std::collections::BTreeMap;

use crate::error::{ConfigError, ConfigErrors};
use crate::fields::{DnsLabel, DnsSubdomain};
use crate::load::{Document, Origin};
use crate::parsed::Parse;
use crate::resource::*;

/// `(namespace, name)`.
pub type Key = (String, String);

/// A validated, self-consistent set of resources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// `Proxy` documents.
    pub proxies: BTreeMap<Key, Object<ProxySpec>>,
    /// `Service` documents.
    pub services: BTreeMap<Key, Object<ServiceSpec>>,
    /// `Workload` documents.
    pub workloads: BTreeMap<Key, Object<WorkloadSpec>>,
    /// `HTTPRoute` documents.
    pub routes: BTreeMap<Key, Object<HttpRouteSpec>>,
    /// The `MeshConfig` document, if any.
    pub mesh: Option<Object<MeshConfigSpec>>,
    /// `AuthorizationPolicy` documents.
    pub authorization_policies: BTreeMap<Key, Object<AuthorizationPolicySpec>>,
    /// `RequestAuthentication` documents.
    pub request_authentications: BTreeMap<Key, Object<RequestAuthenticationSpec>>,
    /// `TrafficPolicy` documents.
    pub traffic_policies: BTreeMap<Key, Object<TrafficPolicySpec>>,
    /// `RoutePolicy` documents ([`crate::policy`]).
    pub route_policies: BTreeMap<Key, Object<RoutePolicySpec>>,
    /// Where each `(kind, namespace, name)` came from.
    pub origins: BTreeMap<(String, String, String), Origin>,
}

pub(crate) fn key(m: &Metadata) -> Key {
    (m.ns().to_owned(), m.name.clone())
}

/// A port or service-account name: the same rule as a SPIFFE path segment (lowercase
/// letters, digits, `-` and `.`, alphanumeric at both ends, at most 253).
pub(crate) use crate::spiffe::valid_segment as valid_name;

pub(crate) struct Checker<'a> {
    pub(crate) errors: &'a mut ConfigErrors,
    at: At<'a>,
}

/// Where a document came from and what to call it in an error. A control plane
/// validates every document on every change, so this is worked out only when
/// something fails.
enum At<'a> {
    Known {
        origin: Origin,
        label: String,
    },
    Lookup {
        origins: &'a BTreeMap<(String, String, String), Origin>,
        kind: &'static str,
        key: &'a Key,
    },
}

impl Checker<'_> {
    pub(crate) fn fail(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        let (origin, label) = match &self.at {
            At::Known { origin, label } => (origin.clone(), label.clone()),
            At::Lookup { origins, kind, key } => (
                origins
                    .get(&((*kind).to_owned(), key.0.clone(), key.1.clone()))
                    .cloned()
                    .unwrap_or(Origin {
                        file: String::new(),
                        line: 0,
                    }),
                format!("{kind} {}/{}", key.0, key.1),
            ),
        };
        self.errors.push(
            ConfigError::new(reason)
                .field(field)
                .resource(label)
                .at(origin.file, (origin.line > 0).then_some(origin.line)),
        );
    }
}

impl Resources {
    /// Every document, in a stable order.
    pub fn documents(&self) -> Vec<Resource> {
        let mut out: Vec<Resource> = Vec::new();
        out.extend(self.mesh.iter().cloned().map(Resource::MeshConfig));
        out.extend(self.proxies.values().cloned().map(Resource::Proxy));
        out.extend(self.services.values().cloned().map(Resource::Service));
        out.extend(self.workloads.values().cloned().map(Resource::Workload));
        out.extend(self.routes.values().cloned().map(Resource::HttpRoute));
        out.extend(
            self.authorization_policies
                .values()
                .cloned()
                .map(Resource::AuthorizationPolicy),
        );
        out.extend(
            self.request_authentications
                .values()
                .cloned()
                .map(Resource::RequestAuthentication),
        );
        out.extend(
            self.traffic_policies
                .values()
                .cloned()
                .map(Resource::TrafficPolicy),
        );
        out.extend(
            self.route_policies
                .values()
                .cloned()
                .map(Resource::RoutePolicy),
        );
        out
    }

    /// Validates documents as one set: names, duplicates, every field, and every
    /// reference between them. Nothing is returned unless everything is valid.
    pub fn from_documents(docs: Vec<Document>) -> Result<Resources, ConfigErrors> {
        let mut errors = ConfigErrors::default();
        let mut res = Resources::default();
        for doc in docs {
            if let Err(e) = res.add(doc) {
                errors.push(e);
            }
        }
        res.validate(&mut errors);
        errors.into_result(res)
    }

    /// Adds one document, refusing a bad name or namespace, a document already in
    /// the set and a second MeshConfig. The set is not checked as a whole:
    /// [`Resources::check`] does that. A control plane keeps its set and changes it
    /// document by document, so an apply costs what it changes plus one check,
    /// not a rebuild of the whole set.
    pub fn add(&mut self, doc: Document) -> Result<(), ConfigError> {
        let m = doc.resource.metadata();
        let origin = Origin {
            file: doc.file,
            line: doc.line,
        };
        // Names as Kubernetes has them: an object's name is a DNS-1123 subdomain, a
        // namespace a DNS-1123 label (it is one label of `name.namespace.svc`).
        let problem = if let Err(e) = <DnsSubdomain as Parse>::parse(&m.name) {
            Some(("metadata.name", e))
        } else if let Err(e) = <DnsLabel as Parse>::parse(m.ns()) {
            Some(("metadata.namespace", e))
        } else {
            None
        };
        let okey = (
            doc.resource.kind().to_owned(),
            m.ns().to_owned(),
            m.name.clone(),
        );
        let problem = problem
            .or_else(|| {
                self.origins.get(&okey).map(|prev| {
                    (
                        "metadata.name",
                        format!(
                            "duplicate {} {}/{}: already defined at {}:{}",
                            okey.0, okey.1, okey.2, prev.file, prev.line
                        ),
                    )
                })
            })
            .or_else(|| {
                let prev = self.mesh.as_ref().filter(|_| okey.0 == "MeshConfig")?;
                Some((
                    "metadata.name",
                    format!(
                        "only one MeshConfig is allowed; {}/{} is already defined",
                        prev.metadata.ns(),
                        prev.metadata.name
                    ),
                ))
            });
        if let Some((field, reason)) = problem {
            let mut errors = ConfigErrors::default();
            Checker {
                errors: &mut errors,
                at: At::Known {
                    origin,
                    label: doc.resource.label(),
                },
            }
            .fail(field, reason);
            return Err(errors.0.remove(0));
        }
        self.origins.insert(okey, origin);
        match doc.resource {
            Resource::Proxy(o) => {
                self.proxies.insert(key(&o.metadata), o);
            }
            Resource::Service(o) => {
                self.services.insert(key(&o.metadata), o);
            }
            Resource::Workload(o) => {
                self.workloads.insert(key(&o.metadata), o);
            }
            Resource::HttpRoute(o) => {
                self.routes.insert(key(&o.metadata), o);
            }
            Resource::AuthorizationPolicy(o) => {
                self.authorization_policies.insert(key(&o.metadata), o);
            }
            Resource::RequestAuthentication(o) => {
                self.request_authentications.insert(key(&o.metadata), o);
            }
            Resource::TrafficPolicy(o) => {
                self.traffic_policies.insert(key(&o.metadata), o);
            }
            Resource::RoutePolicy(o) => {
                self.route_policies.insert(key(&o.metadata), o);
            }
            Resource::MeshConfig(o) => {
                self.mesh = Some(o);
            }
        }
        Ok(())
    }

    /// Removes the document `kind namespace/name`, if the set has it: the document
    /// and where it came from, as [`Resources::add`] takes it back.
    pub fn remove(&mut self, kind: &str, namespace: &str, name: &str) -> Option<Document> {
        let okey = (kind.to_owned(), namespace.to_owned(), name.to_owned());
        let origin = self.origins.get(&okey)?;
        let k = (okey.1.clone(), okey.2.clone());
        let resource = match kind {
            "Proxy" => self.proxies.remove(&k).map(Resource::Proxy),
            "Service" => self.services.remove(&k).map(Resource::Service),
            "Workload" => self.workloads.remove(&k).map(Resource::Workload),
            "HTTPRoute" => self.routes.remove(&k).map(Resource::HttpRoute),
            "AuthorizationPolicy" => self
                .authorization_policies
                .remove(&k)
                .map(Resource::AuthorizationPolicy),
            "RequestAuthentication" => self
                .request_authentications
                .remove(&k)
                .map(Resource::RequestAuthentication),
            "TrafficPolicy" => self
                .traffic_policies
                .remove(&k)
                .map(Resource::TrafficPolicy),
            "RoutePolicy" => self.route_policies.remove(&k).map(Resource::RoutePolicy),
            "MeshConfig" => self
                .mesh
                .take_if(|m| m.metadata.ns() == k.0 && m.metadata.name == k.1)
                .map(Resource::MeshConfig),
            _ => None,
        }?;
        let origin = origin.clone();
        self.origins.remove(&okey);
        Some(Document {
            resource,
            file: origin.file,
            line: origin.line,
        })
    }

    /// Says where the document `kind namespace/name` came from, for errors that
    /// name it (a control plane's stored documents, once an apply is through).
    pub fn set_origin(&mut self, kind: &str, namespace: &str, name: &str, origin: Origin) {
        if let Some(o) =
            self.origins
                .get_mut(&(kind.to_owned(), namespace.to_owned(), name.to_owned()))
        {
            *o = origin;
        }
    }

    /// Checks the set as a whole: every field, and every reference between
    /// documents.
    pub fn check(&self) -> Result<(), ConfigErrors> {
        let mut errors = ConfigErrors::default();
        self.validate(&mut errors);
        errors.into_result(())
    }

    pub(crate) fn checker<'a>(
        &'a self,
        errors: &'a mut ConfigErrors,
        kind: &'static str,
        key: &'a Key,
    ) -> Checker<'a> {
        Checker {
            errors,
            at: At::Lookup {
                origins: &self.origins,
                kind,
                key,
            },
        }
    }

    /// Looks up a service by a logical name (`catalog`, `catalog.shop`) relative to `ns`.
    pub fn find_service(&self, ns: &str, name: &str) -> Option<&Object<ServiceSpec>> {
        let (n, namespace) = match name.split_once('.') {
            Some((n, rest)) => (n, rest.split('.').next().unwrap_or(ns)),
            None => (name, ns),
        };
        self.services.get(&(namespace.to_owned(), n.to_owned()))
    }
}
