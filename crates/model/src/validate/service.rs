//! `Service` and `Workload` documents.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use crate::error::ConfigErrors;
use crate::set::{Key, Resources, valid_name};

impl Resources {
    pub(super) fn validate_services(&self, errors: &mut ConfigErrors) {
        let mut vips: BTreeMap<IpAddr, &Key> = BTreeMap::new();
        for (k, svc) in &self.services {
            let mut c = self.checker(errors, "Service", k);
            let before = c.errors.0.len();
            let mut claims = Vec::new();
            for (i, v) in svc.spec.virtual_ip_list().enumerate() {
                // `virtualIP` is the first address, `virtualIPs[n]` the others.
                let field = match (&svc.spec.virtual_ip, i) {
                    (Some(_), 0) => "spec.virtualIP".to_owned(),
                    (Some(_), n) => format!("spec.virtualIPs[{}]", n - 1),
                    (None, n) => format!("spec.virtualIPs[{n}]"),
                };
                claims.push((field, v.value()));
            }
            if svc.spec.ports.is_empty() {
                c.fail("spec.ports", "a service needs at least one port");
            }
            for (i, a) in svc.spec.service_accounts.iter().flatten().enumerate() {
                if !valid_name(a) {
                    c.fail(
                        format!("spec.serviceAccounts[{i}]"),
                        format!("{a:?} is not a service account name"),
                    );
                }
            }
            let mut names = HashSet::new();
            let mut numbers = HashSet::new();
            for (i, p) in svc.spec.ports.iter().enumerate() {
                if !valid_name(&p.name) {
                    c.fail(
                        format!("spec.ports[{i}].name"),
                        format!("{:?} is not a valid port name", p.name),
                    );
                }
                if !names.insert(&p.name) {
                    c.fail(
                        format!("spec.ports[{i}].name"),
                        format!("duplicate port name {:?}", p.name),
                    );
                }
                if p.port == 0 {
                    c.fail(format!("spec.ports[{i}].port"), "port must be 1-65535");
                } else if !numbers.insert(p.port) {
                    c.fail(
                        format!("spec.ports[{i}].port"),
                        format!("duplicate port {}", p.port),
                    );
                }
                if p.target_port == Some(0) {
                    c.fail(
                        format!("spec.ports[{i}].targetPort"),
                        "port must be 1-65535",
                    );
                }
            }
            // A virtual IP is the first valid service's that claims it: an invalid
            // one claims nothing, so it never pushes a valid one out. The same address
            // written twice in one service is harmless.
            if c.errors.0.len() == before {
                for (field, ip) in claims {
                    match vips.get(&ip) {
                        Some(prev) if *prev != k => c.fail(
                            field,
                            format!(
                                "{ip} is already the virtual IP of service {}/{}",
                                prev.0, prev.1
                            ),
                        ),
                        _ => {
                            vips.insert(ip, k);
                        }
                    }
                }
            }
        }
    }

    pub(super) fn validate_workloads(&self, errors: &mut ConfigErrors) {
        for (k, w) in &self.workloads {
            let mut c = self.checker(errors, "Workload", k);
            if let Some(s) = &w.spec.service
                && !self.services.contains_key(&(k.0.clone(), s.clone()))
            {
                c.fail(
                    "spec.service",
                    format!("service {:?} does not exist in namespace {:?}", s, k.0),
                );
            }
            for (name, port) in &w.spec.ports {
                if *port == 0 {
                    c.fail(format!("spec.ports.{name}"), "port must be 1-65535");
                }
            }
            if w.spec.sidecar.as_ref().is_some_and(|s| s.port == 0) {
                c.fail("spec.sidecar.port", "port must be 1-65535");
            }
            if let Some(sa) = &w.spec.service_account
                && !crate::authz::valid_segment(sa)
            {
                c.fail(
                    "spec.serviceAccount",
                    format!("{sa:?} is not a valid service account name"),
                );
            }
        }
    }
}
