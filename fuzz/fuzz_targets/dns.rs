//! The sidecar's DNS responder: a UDP datagram from the workload (anything at all)
//! answered from a configuration whose services have virtual IPs. Also the
//! `/etc/resolv.conf` reader that finds where other queries are forwarded.
//!
//! Properties: a reply is a well-formed DNS response to the same id and question,
//! whose answers (if any) carry the service's virtual IP.
#![no_main]

use std::net::IpAddr;
use std::sync::LazyLock;

use hickory_proto::op::{Header, Message, MessageType, Query};
use hickory_proto::rr::RData;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use libfuzzer_sys::fuzz_target;
use sinew_model::ProxyConfig;
use sinew_proxy::dns::{Answer, answer_from, upstream};

const MESH: &str = r#"
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog, namespace: shop}
spec:
  virtualIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: kv, namespace: shop}
spec:
  virtualIP: "fd00::10"
  ports: [{name: redis, port: 6379}]
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: client, namespace: shop}
spec:
  capture: {dnsPort: 15053}
"#;

static CONFIG: LazyLock<ProxyConfig> = LazyLock::new(|| {
    sinew_model::compile::compile_text("mesh.yaml", MESH, Some("shop/client")).unwrap()
});

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = upstream(text);
    }
    let _ = answer_from(None, data);
    let Answer::Reply(bytes) = answer_from(Some(&CONFIG), data) else {
        return;
    };
    // The query's header and question, read as the responder reads them (not with
    // Message::from_vec, whose record readers can overflow: see dns::read_query).
    let mut decoder = BinDecoder::new(data);
    let header = Header::read(&mut decoder).unwrap();
    let question = Query::read(&mut decoder).unwrap();
    let reply = Message::from_vec(&bytes).unwrap_or_else(|e| panic!("unreadable reply: {e}"));
    assert_eq!(reply.metadata.id, header.metadata.id);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    assert_eq!(reply.queries, [question]);
    for a in &reply.answers {
        let ip = match a.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            ref other => panic!("unexpected answer {other:?}"),
        };
        assert!(
            ["10.96.0.10", "fd00::10"].contains(&ip.to_string().as_str()),
            "answered {ip}"
        );
    }
});
