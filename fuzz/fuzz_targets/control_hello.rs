//! What a proxy sends the control plane: bytes decoded as the protobuf messages of
//! a discovery stream (`ProxyMessage`, and a bare `Hello`), and a Hello run through
//! the control plane's own steps: its name, the claims its identity allows, its
//! capture and registration, the registration entering the index, and the proxy's
//! first view.
//!
//! The first byte picks the caller: a proxy proving `shop/web`, one proving
//! `shop/catalog-v1`, or (the migration window) none. Properties: an accepted
//! registration survives the store's JSON round trip (registrations are persisted
//! and reloaded after a restart); an authenticated proxy registers only its own
//! namespace and service account; a registration reaches the view only under an
//! existing service.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sinew_api::v1::{Hello, ProxyMessage, proxy_message};
use sinew_control::fuzzing::{hello, state};
use sinew_control::index::MeshState;
use sinew_model::resource::Resource;
use sinew_tls::SpiffeId;

/// The demo mesh (demo/mesh.yaml), as the control plane's documents.
static STATE: LazyLock<MeshState> = LazyLock::new(|| {
    let docs =
        sinew_model::parse_documents("mesh.yaml", include_str!("../../demo/mesh.yaml")).unwrap();
    state(
        docs.into_iter().map(|d| d.resource).collect(),
        "cluster.local",
    )
});

static CALLERS: LazyLock<[SpiffeId; 2]> = LazyLock::new(|| {
    [
        SpiffeId::workload("cluster.local", "shop", "web"),
        SpiffeId::workload("cluster.local", "shop", "catalog-v1"),
    ]
});

fn run(caller: Option<&SpiffeId>, h: Hello) {
    let Ok(accepted) = hello(&STATE, caller, h) else {
        return;
    };
    let Some(w) = &accepted.workload else {
        return;
    };
    let json = Resource::Workload(w.clone()).to_json();
    match Resource::from_json("Workload", &json) {
        Ok(Resource::Workload(back)) => assert_eq!(&back, w, "{json}"),
        other => panic!("a registration does not reload: {json}: {other:?}"),
    }
    if let Some(caller) = caller {
        let (ns, sa) = caller.workload_parts().unwrap();
        assert_eq!(w.metadata.namespace.as_deref(), Some(ns));
        assert_eq!(w.spec.service_account.as_deref(), Some(sa));
    }
    let in_docs = accepted.state.docs.values().any(|e| match &e.resource {
        Resource::Workload(d) => d == w,
        _ => false,
    });
    if in_docs && let Some(s) = &w.spec.service {
        let ns = w.metadata.namespace.as_deref().unwrap_or("default");
        assert!(
            STATE
                .docs
                .keys()
                .any(|k| k.kind == "Service" && k.namespace == ns && &k.name == s),
            "a registration under a missing service {s:?} reached the state"
        );
    }
    // What the proxy does with the view it is sent: reload every document.
    for e in &accepted.view.entries {
        if let Err(err) = Resource::from_json(&e.key.kind, &e.json) {
            panic!("a view entry does not reload: {}: {err}", e.json);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&who, bytes)) = data.split_first() else {
        return;
    };
    let caller = match who % 3 {
        0 => None,
        n => Some(&CALLERS[usize::from(n) - 1]),
    };
    if let Ok(m) = ProxyMessage::decode(bytes)
        && let Some(proxy_message::Kind::Hello(h)) = m.kind
    {
        run(caller, h);
    }
    if let Ok(h) = Hello::decode(bytes) {
        run(caller, h);
    }
});
