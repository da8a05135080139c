//! The sidecar's DNS responder (`Proxy.spec.capture.dnsPort`): capture rules send
//! the workload's DNS queries (UDP 53) here. A mesh service's name (`catalog`,
//! `catalog.shop`, `catalog.shop.svc.cluster.local`) is answered with its virtual
//! IP, so an app that only knows names reaches it through capture; every other
//! query is forwarded to the host's resolver (`/etc/resolv.conf`), or refused when
//! there is none.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use sinew_model::ProxyConfig;
use tokio::net::UdpSocket;

use crate::state::Shared;

/// Time-to-live of answers: short, so a changed address is picked up soon.
const TTL: u32 = 30;
/// How long a forwarded query may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest DNS message over UDP accepted.
const MAX_UDP: usize = 4096;

/// Binds the responder's sockets: 127.0.0.1 and ::1 (the IPv6 one is skipped on a
/// host without IPv6).
pub fn bind(port: u16) -> std::io::Result<Vec<std::net::UdpSocket>> {
    let v4 = std::net::UdpSocket::bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))?;
    v4.set_nonblocking(true)?;
    let mut out = vec![v4];
    match std::net::UdpSocket::bind(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)) {
        Ok(v6) => {
            v6.set_nonblocking(true)?;
            out.push(v6);
        }
        Err(e) => tracing::warn!(port, error = %e, "IPv6 DNS responder not bound"),
    }
    Ok(out)
}

/// The first nameserver of `/etc/resolv.conf`-formatted `text`.
pub fn upstream(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

/// Serves queries on `socket` until the task is aborted.
pub async fn serve(socket: std::net::UdpSocket, shared: Arc<Shared>) {
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "DNS responder could not start");
            return;
        }
    };
    let upstream = std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|t| upstream(&t));
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "DNS receive failed");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        match answer(&shared, &query) {
            Answer::Reply(bytes) => {
                let _ = socket.send_to(&bytes, from).await;
            }
            Answer::Forward(id) => {
                let socket = socket.clone();
                tokio::spawn(async move {
                    let reply = match upstream {
                        Some(up) => forward(&query, up).await,
                        None => None,
                    };
                    let bytes = reply.or_else(|| {
                        let code = if upstream.is_some() {
                            ResponseCode::ServFail
                        } else {
                            ResponseCode::Refused
                        };
                        Message::error_msg(id, OpCode::Query, code).to_vec().ok()
                    });
                    if let Some(b) = bytes {
                        let _ = socket.send_to(&b, from).await;
                    }
                });
            }
            Answer::Drop => {}
        }
    }
}

/// What to do with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send this reply.
    Reply(Vec<u8>),
    /// Not a mesh name: forward it (the query's id, for an error reply).
    Forward(u16),
    /// Not a DNS query: ignore it.
    Drop,
}

/// Answers a query about a mesh service from the applied configuration.
pub fn answer(shared: &Shared, query: &[u8]) -> Answer {
    let snap = shared.snapshot.load_full();
    answer_from(snap.as_ref().map(|s| &s.config), query)
}

/// [`answer`] from a configuration (`None`: none applied yet). Separate so that it
/// can be exercised without a running proxy's shared state (fuzz/, tests).
pub fn answer_from(config: Option<&ProxyConfig>, query: &[u8]) -> Answer {
    let Some((metadata, queries)) = read_query(query) else {
        return Answer::Drop;
    };
    if metadata.message_type != MessageType::Query {
        return Answer::Drop;
    }
    let id = metadata.id;
    let [q] = queries.as_slice() else {
        return Answer::Forward(id);
    };
    let Some(config) = config else {
        return Answer::Forward(id);
    };
    let name = q.name().to_ascii();
    let Some(vip) = config.resolve_service(&name).and_then(|svc| svc.virtual_ip) else {
        return Answer::Forward(id);
    };
    let mut reply = Message::response(id, metadata.op_code);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(q.clone());
    let rdata = match (q.query_type(), vip) {
        (RecordType::A, IpAddr::V4(v4)) => Some(RData::A(A(v4))),
        (RecordType::AAAA, IpAddr::V6(v6)) => Some(RData::AAAA(AAAA(v6))),
        // The name exists without an address of this type: an empty answer.
        _ => None,
    };
    if let Some(rdata) = rdata {
        reply.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
    }
    match reply.to_vec() {
        Ok(b) => Answer::Reply(b),
        Err(_) => Answer::Forward(id),
    }
}

/// The header and the questions of a message: all an answer needs. The records that
/// may follow (EDNS, TSIG, ...) are not read: an answer uses none of them, a
/// forwarded query goes upstream as it came, and hickory-proto 0.26.1's TSIG reader
/// subtracts past a short record's end (an overflow panic wherever overflow checks
/// are on; found by fuzzing, fuzz/corpus/dns/crash-*).
fn read_query(bytes: &[u8]) -> Option<(Metadata, Vec<Query>)> {
    let mut decoder = BinDecoder::new(bytes);
    let Header { metadata, counts } = Header::read(&mut decoder).ok()?;
    let mut queries = Vec::new();
    for _ in 0..counts.queries {
        queries.push(Query::read(&mut decoder).ok()?);
    }
    Some((metadata, queries))
}

/// Sends `query` to `upstream` from a fresh socket and waits for its reply.
async fn forward(query: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await.ok()?;
    sock.connect(upstream).await.ok()?;
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; MAX_UDP];
    let n = tokio::time::timeout(FORWARD_TIMEOUT, sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog, namespace: shop}
spec: {virtualIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: client, namespace: shop}
spec: {capture: {dnsPort: 15053}}
";

    /// A query for `name` (type A), with `extra` after the question section.
    fn query(id: u16, name: &str, additionals: u16, extra: &[u8]) -> Vec<u8> {
        let mut q = Vec::new();
        for n in [id, 0x0100, 1, 0, 0, additionals] {
            q.extend_from_slice(&n.to_be_bytes());
        }
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q.extend_from_slice(extra);
        q
    }

    #[test]
    fn mesh_names_are_answered_and_others_forwarded() {
        let config = sinew_model::compile::compile_text("m.yaml", MESH, Some("shop/client"))
            .unwrap_or_else(|e| panic!("{e}"));
        let Answer::Reply(reply) = answer_from(Some(&config), &query(7, "catalog.shop", 0, &[]))
        else {
            panic!("not answered");
        };
        let reply = Message::from_vec(&reply).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reply.metadata.id, 7);
        assert_eq!(
            reply.answers[0].data,
            RData::A(A("10.96.0.10".parse().unwrap_or_else(|e| panic!("{e}"))))
        );
        let q = query(8, "example.com", 0, &[]);
        assert_eq!(answer_from(Some(&config), &q), Answer::Forward(8));
        assert_eq!(answer_from(None, &q), Answer::Forward(8));
        assert_eq!(answer_from(Some(&config), b"\x12"), Answer::Drop);
    }

    #[test]
    fn records_after_the_question_are_not_read() {
        // Found by fuzzing (fuzz/corpus/dns/crash-*): a message whose records
        // include a short TSIG made hickory-proto's reader overflow, a panic with
        // overflow checks on. Only the header and the question are read now.
        let crash: Vec<u8> = concat!(
            "12c901000000230a00000a060000fafffffff1fff7000a05de0000de00000000000001e1e1e1e1e1",
            "e1e1e1e1e1d7e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1",
            "e1e1e1e1e1e1e1e1e1e1e1e1e137010000200100",
        )
        .as_bytes()
        .chunks(2)
        .map(|h| u8::from_str_radix(std::str::from_utf8(h).unwrap_or_default(), 16).unwrap_or(0))
        .collect();
        assert_eq!(answer_from(None, &crash), Answer::Forward(0x12c9));
        // A TSIG-like additional record too short for what it claims, after a
        // question for a mesh name: the question is answered all the same.
        let config = sinew_model::compile::compile_text("m.yaml", MESH, Some("shop/client"))
            .unwrap_or_else(|e| panic!("{e}"));
        let tsig = [0, 0, 250, 0, 255, 0, 0, 0, 0, 0, 2, 0, 0];
        let q = query(9, "catalog", 1, &tsig);
        assert!(matches!(answer_from(Some(&config), &q), Answer::Reply(_)));
    }

    #[test]
    fn the_upstream_is_the_first_nameserver() {
        let conf = "# comment\nsearch example\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(upstream(conf), "10.0.0.2:53".parse().ok());
        assert_eq!(upstream("search x\n"), None);
    }
}
