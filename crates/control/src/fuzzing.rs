//! Entry points for the fuzz targets in `fuzz/`: not an API (hidden from the docs,
//! changed with the targets). They run what a proxy's stream sends through the
//! control plane's own steps, so the targets exercise the code the control plane
//! runs rather than a copy of it.

use std::collections::BTreeMap;
use std::sync::Arc;

use sinew_api::v1 as api;
use sinew_model::resource::{CaptureSpec, Object, Resource, ResourceKey, WorkloadSpec};

use crate::index::{DocEntry, MeshState, Registration};
use crate::view::View;

/// The state of a control plane that holds `resources` (as applied through its API)
/// and no registration.
pub fn state(resources: Vec<Resource>, trust_domain: &str) -> MeshState {
    let docs: BTreeMap<ResourceKey, Arc<DocEntry>> = resources
        .into_iter()
        .map(|r| {
            let e = DocEntry::new(r, "api", 1);
            (e.key.clone(), Arc::new(e))
        })
        .collect();
    crate::index::mesh_state(1, &docs, std::iter::empty(), trust_domain)
}

/// What the control plane made of a Hello it accepted.
#[derive(Debug)]
pub struct Accepted {
    /// The proxy's `namespace/name`.
    pub proxy: String,
    /// The workload it registered, if any.
    pub workload: Option<Object<WorkloadSpec>>,
    /// The capture it asked for, if any.
    pub capture: Option<CaptureSpec>,
    /// The state once its registration is in the index.
    pub state: MeshState,
    /// Its first view, computed from that state.
    pub view: View,
}

/// A stream's opening Hello from a proxy proving `caller` (`None`: the plaintext
/// migration window), as `Discovery.stream` takes it against `state`: the name, the
/// claims the identity allows, the capture and the registration are checked; an
/// accepted registration then enters the index's registry, and the proxy's first
/// view is computed. `Err`: the status the stream is refused with.
pub fn hello(
    state: &MeshState,
    caller: Option<&sinew_tls::SpiffeId>,
    mut hello: api::Hello,
) -> Result<Accepted, tonic::Status> {
    let (ns, proxy) = crate::discovery::proxy_name(&hello.namespace, &hello.name)?;
    let ns = ns.to_owned();
    if let Some(caller) = caller {
        let admits =
            |service: &str, account: &str| crate::discovery::admits(state, &ns, service, account);
        crate::discovery::authorize_hello(
            caller,
            &ns,
            &proxy,
            hello.registration.as_mut(),
            admits,
        )?;
    }
    let capture = hello
        .capture
        .as_ref()
        .map(crate::discovery::capture_spec)
        .transpose()?;
    let workload = hello
        .registration
        .as_ref()
        .map(|r| crate::discovery::workload(&ns, &hello.name, r))
        .transpose()?;
    let registry: Vec<(String, Registration)> = workload
        .iter()
        .map(|w| (proxy.clone(), Registration::new(w.clone())))
        .collect();
    let state = crate::index::mesh_state(
        state.revision + 1,
        &state.docs,
        registry.iter().map(|(p, r)| (p, r)),
        &state.trust_domain,
    );
    let view = crate::view::compute_with(&state, &proxy, capture.as_ref());
    Ok(Accepted {
        proxy,
        workload,
        capture,
        state,
        view,
    })
}
