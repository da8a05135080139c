//! `Proxy` documents: listeners, capture, limits and upstreams.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::resolve_port;
use crate::error::ConfigErrors;
use crate::resource::*;
use crate::set::{Checker, Key, Resources};
impl Resources {
    pub(super) fn validate_proxy(&self, errors: &mut ConfigErrors, k: &Key, p: &Object<ProxySpec>) {
        let mut c = self.checker(errors, "Proxy", k);
        if let Some(w) = &p.spec.workload
            && !self.workloads.contains_key(&(k.0.clone(), w.clone()))
        {
            c.fail(
                "spec.workload",
                format!("workload {w:?} does not exist in namespace {:?}", k.0),
            );
        }
        let mut binds: BTreeMap<SocketAddr, String> = BTreeMap::new();
        let mut bind = |c: &mut Checker<'_>, field: String, a: SocketAddr| {
            if let Some(prev) = binds.insert(a, field.clone()) {
                c.fail(field, format!("address {a} is already used by {prev}"));
            }
        };
        if let Some(inb) = &p.spec.inbound {
            bind(&mut c, "spec.inbound.bind".into(), inb.bind.value());
            if inb.ports.is_empty() {
                c.fail(
                    "spec.inbound.ports",
                    "list the application ports mesh traffic may reach",
                );
            }
            if inb.ports.contains(&0) {
                c.fail("spec.inbound.ports", "port must be 1-65535");
            }
        }
        if let Some(hp) = &p.spec.outbound.http_proxy {
            bind(
                &mut c,
                "spec.outbound.httpProxy.bind".into(),
                hp.bind.value(),
            );
        }
        if let Some(cap) = &p.spec.capture {
            for (field, port) in [
                ("outboundPort", Some(cap.outbound_port)),
                ("inboundPort", Some(cap.inbound_port)),
                ("dnsPort", cap.dns_port),
            ] {
                if port == Some(0) {
                    c.fail(format!("spec.capture.{field}"), "port must be 1-65535");
                }
            }
            bind(
                &mut c,
                "spec.capture.outboundPort".into(),
                SocketAddr::from(([127, 0, 0, 1], cap.outbound_port)),
            );
            if cap.outbound_port == cap.inbound_port {
                c.fail(
                    "spec.capture.inboundPort",
                    format!(
                        "port {} is also the outboundPort: the two captures need their own ports",
                        cap.inbound_port
                    ),
                );
            }
            if cap.opaque_ports.contains(&0) {
                c.fail("spec.capture.opaquePorts", "port must be 1-65535");
            }
            if cap.detect_timeout.as_ref().is_some_and(|d| d.is_zero()) {
                c.fail("spec.capture.detectTimeout", "must be more than zero");
            }
        }
        let limits = |c: &mut Checker<'_>, field: &str, l: &Option<LimitsSpec>| {
            let Some(l) = l else { return };
            if l.max_request_headers_kb
                .is_some_and(|v| !(1..=8192).contains(&v))
            {
                c.fail(format!("{field}.maxRequestHeadersKb"), "must be 1-8192");
            }
            if l.max_request_headers
                .is_some_and(|v| !(1..=10_000).contains(&v))
            {
                c.fail(format!("{field}.maxRequestHeaders"), "must be 1-10000");
            }
        };
        limits(&mut c, "spec.limits", &p.spec.limits);
        if let Some(inb) = &p.spec.inbound {
            limits(&mut c, "spec.inbound.limits", &inb.limits);
        }
        for (i, u) in p.spec.outbound.upstreams.iter().enumerate() {
            let f = format!("spec.outbound.upstreams[{i}]");
            limits(&mut c, &format!("{f}.limits"), &u.limits);
            bind(&mut c, format!("{f}.bind"), u.bind.value());
            let Some(svc) = self.find_service(k.0.as_str(), &u.service) else {
                c.fail(
                    format!("{f}.service"),
                    format!("service {:?} does not exist", u.service),
                );
                continue;
            };
            if let Err(reason) = resolve_port(svc, u.port.as_ref()) {
                c.fail(format!("{f}.port"), reason);
            }
        }
    }
}
