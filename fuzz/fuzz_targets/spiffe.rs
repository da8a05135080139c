//! SPIFFE ids, as read from a peer certificate's URI SAN, an `AuthorizationPolicy`
//! principal or a Hello's claims.
//!
//! Properties: an id that parses prints back to exactly its text; the borrowing and
//! the owned parsers agree; a workload id's parts rebuild the same id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sinew_model::spiffe::{SpiffeId, parse_spiffe, valid_segment, valid_trust_domain};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let borrowed = parse_spiffe(text);
    let owned = text.parse::<SpiffeId>();
    assert_eq!(borrowed.is_ok(), owned.is_ok());
    let (Ok(r), Ok(id)) = (borrowed, owned) else {
        return;
    };
    assert_eq!(id.to_string(), text);
    assert_eq!(id.to_string().parse::<SpiffeId>().as_ref(), Ok(&id));
    assert_eq!((r.trust_domain, r.path), (id.trust_domain(), id.path()));
    assert_eq!(r.namespace(), id.namespace());
    assert!(valid_trust_domain(id.trust_domain()));
    if let Some((ns, sa)) = id.workload_parts() {
        assert_eq!(SpiffeId::workload(id.trust_domain(), ns, sa), id);
        assert_eq!(id.namespace(), Some(ns));
        if valid_segment(ns) && valid_segment(sa) {
            let rebuilt = sinew_model::spiffe::spiffe_id(id.trust_domain(), ns, sa);
            assert_eq!(rebuilt, text);
        }
    }
});
