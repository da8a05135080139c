//! The sidecar's DNS responder (`Proxy.spec.capture.dnsPort`): capture rules send
//! the workload's DNS queries (UDP 53) here. A mesh service's name (`catalog`,
//! `catalog.shop`, `catalog.shop.svc.cluster.local`) is answered with its virtual
//! IP, so an app that only knows names reaches it through capture; every other
//! query is forwarded to the host's resolver (`/etc/resolv.conf`), or refused when
//! there is none.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
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
    let Ok(msg) = Message::from_vec(query) else {
        return Answer::Drop;
    };
    if msg.metadata.message_type != MessageType::Query {
        return Answer::Drop;
    }
    let id = msg.metadata.id;
    let [q] = msg.queries.as_slice() else {
        return Answer::Forward(id);
    };
    let Some(config) = config else {
        return Answer::Forward(id);
    };
    let name = q.name().to_ascii();
    let Some(vip) = config.resolve_service(&name).and_then(|svc| svc.virtual_ip) else {
        return Answer::Forward(id);
    };
    let mut reply = Message::response(id, msg.metadata.op_code);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = msg.metadata.recursion_desired;
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

    #[test]
    fn the_upstream_is_the_first_nameserver() {
        let conf = "# comment\nsearch example\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(upstream(conf), "10.0.0.2:53".parse().ok());
        assert_eq!(upstream("search x\n"), None);
    }
}
