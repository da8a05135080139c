//! The CA's CSR signing: the DER a proxy sends with a certificate request (at
//! bootstrap, and on every renewal) signed as a workload certificate.
//!
//! Properties: the CA signs exactly the CSRs its own check accepts, and what it
//! issues names the identity the CA decided, never one the CSR asks for.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sinew_tls::{Ca, SpiffeId, certs_from_pem, spiffe_of};

static CA: LazyLock<Ca> =
    LazyLock::new(|| Ca::generate("cluster.local", Duration::from_secs(86_400)).unwrap());
static ID: LazyLock<SpiffeId> =
    LazyLock::new(|| SpiffeId::workload("cluster.local", "shop", "web"));

fuzz_target!(|data: &[u8]| {
    let checked = Ca::check_csr(data).is_ok();
    let issued = CA.sign_csr(data, &ID, Duration::from_secs(3600));
    assert_eq!(
        checked,
        issued.is_ok(),
        "check_csr and sign_csr disagree: {issued:?}"
    );
    let Ok(issued) = issued else {
        return;
    };
    let chain = certs_from_pem("chain", &issued.chain_pem).unwrap();
    assert_eq!(spiffe_of(&chain[0]).as_ref(), Some(&*ID));
});
