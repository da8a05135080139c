//! Validation of a [`Resources`] set, one module per kind family. Every check says
//! which document, field and why; nothing compiles unless everything passes.

mod mesh;
mod proxy;
mod route;
mod security;
mod service;
mod traffic;

use crate::error::ConfigErrors;
use crate::set::Resources;

pub use route::resolve_port;
pub(crate) use route::{check_filter, check_retry, check_timeouts, core_group};
pub use security::MAX_CLOCK_SKEW;

impl Resources {
    pub(crate) fn validate(&self, errors: &mut ConfigErrors) {
        self.validate_services(errors);
        self.validate_workloads(errors);
        for (k, p) in &self.proxies {
            self.validate_proxy(errors, k, p);
        }
        for (k, r) in &self.routes {
            self.validate_route(errors, k, r);
        }
        self.validate_route_policies(errors);
        self.validate_traffic_policies(errors);
        self.validate_security(errors);
        self.validate_tracing(errors);
    }
}
