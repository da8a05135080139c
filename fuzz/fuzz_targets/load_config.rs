//! The document loader: YAML text (a file, an apply, a config directory) parsed,
//! validated and compiled for every proxy it declares, as the proxy does in
//! standalone mode and the control plane does on apply.
//!
//! Properties: every accepted document survives the store's JSON round trip (the
//! control plane persists documents as JSON and reloads them after a restart: a
//! document that changed on the way would be a different mesh after a restart), and
//! the reloaded set validates again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sinew_model::load::Document;
use sinew_model::resource::Resource;
use sinew_model::{Resources, compile_proxy, parse_apply};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = parse_apply([("fuzz.yaml", text)]) else {
        return;
    };
    let mut reloaded = Vec::with_capacity(docs.len());
    for d in &docs {
        let json = d.resource.to_json();
        let back = Resource::from_json(d.resource.kind(), &json)
            .unwrap_or_else(|e| panic!("{json} does not reload: {e}"));
        assert_eq!(
            back.to_json(),
            json,
            "the JSON round trip changed a document"
        );
        reloaded.push(Document {
            resource: back,
            file: "reloaded".into(),
            line: 0,
        });
    }
    let Ok(res) = Resources::from_documents(docs) else {
        return;
    };
    if let Err(e) = Resources::from_documents(reloaded) {
        panic!("a valid set no longer validates after the JSON round trip: {e}");
    }
    let _ = compile_proxy(&res, None);
    for (ns, name) in res.proxies.keys() {
        let _ = compile_proxy(&res, Some(&format!("{ns}/{name}")));
    }
});
