//! Listeners: bound from the configuration, reconciled on every reload (new bindings
//! start, removed ones stop accepting; open connections are left alone), and stopped
//! when draining. Each accepted connection runs in its own task.
//!
//! Each kind of listener owns its accept loop, next to its connection handler;
//! they share only [`crate::accept::Acceptor`] (accept with backoff, the connection
//! cap, stop and drain):
//!
//! | kind                                   | accept loop                          |
//! |----------------------------------------|--------------------------------------|
//! | outbound HTTP binding                  | [`crate::bindings::http_binding`]    |
//! | outbound TCP (opaque) binding          | [`crate::bindings::tcp_binding`]     |
//! | HTTP forward-proxy port                | [`crate::bindings::http_proxy`]      |
//! | inbound mesh (mTLS) listener           | [`crate::mesh_listener::accept_loop`]|
//! | capture, outbound and inbound          | [`crate::capture::accept_outbound`], [`crate::capture::accept_inbound`] |
//! | admin (its own thread and runtime)     | [`crate::admin::serve`]              |

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sinew_model::ProxyConfig;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::accept::Acceptor;
use crate::state::Shared;
use crate::types::Role;

/// The desired listeners of a configuration: address → role (and for upstream
/// bindings, whether the binding is opaque TCP).
pub fn desired(cfg: &ProxyConfig) -> HashMap<SocketAddr, (Role, bool)> {
    let mut out = HashMap::new();
    // Where capture's inbound port is the sidecar's own (one port for the mesh and
    // for redirected traffic, as an injected Kubernetes pod has it), the capture
    // listener, bound to every address, serves both: binding the inbound's address
    // on that port as well would fail.
    let captured = cfg.capture.as_ref().map(|c| c.inbound_port);
    if let Some(inb) = &cfg.inbound
        && captured != Some(inb.bind.port())
    {
        out.insert(inb.bind, (Role::Inbound, false));
    }
    if let Some(hp) = cfg.http_proxy {
        out.insert(hp, (Role::HttpProxy, false));
    }
    for u in &cfg.upstreams {
        out.insert(u.bind, (Role::Upstream, !u.protocol.is_http()));
    }
    if let Some(c) = &cfg.capture {
        for addr in crate::capture::listen_addrs(c.outbound_port, true) {
            out.insert(addr, (Role::OutboundCapture, false));
        }
        for addr in crate::capture::listen_addrs(c.inbound_port, false) {
            out.insert(addr, (Role::InboundCapture, false));
        }
    }
    out
}

/// A bind failure that is not an error: the IPv6 side of a capture listener on a
/// host without IPv6 (there is then no IPv6 traffic to capture either).
fn optional(addr: &SocketAddr, role: Role, e: &std::io::Error) -> bool {
    addr.is_ipv6()
        && matches!(role, Role::OutboundCapture | Role::InboundCapture)
        && matches!(
            e.kind(),
            std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::Unsupported
        ) | (e.raw_os_error() == Some(97)) // EAFNOSUPPORT
}

/// The running listeners. Owned by the configuration task (one writer).
#[derive(Debug, Default)]
pub struct Listeners {
    active: HashMap<SocketAddr, ((Role, bool), oneshot::Sender<()>)>,
    /// The DNS responder: its port and tasks.
    dns: Option<(u16, Vec<tokio::task::AbortHandle>)>,
}

/// Listeners bound for a configuration that is not applied yet.
#[derive(Debug)]
pub struct Prepared {
    want: HashMap<SocketAddr, (Role, bool)>,
    bound: Vec<(SocketAddr, (Role, bool), std::net::TcpListener)>,
    /// The DNS port wanted, and its sockets when newly bound.
    dns: (Option<u16>, Vec<std::net::UdpSocket>),
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    if addr.is_ipv6() {
        // IPv6 only: an IPv4 listener on the same port may exist beside it (capture
        // binds both, as the original destination is read per address family).
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
        s.set_only_v6(true)?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        s.set_nonblocking(true)?;
        return Ok(s.into());
    }
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

impl Listeners {
    /// Binds every new listener `cfg` needs, before anything is applied; a
    /// configuration whose listeners cannot all be bound is refused whole.
    pub fn prepare(&self, cfg: &ProxyConfig) -> Result<Prepared, Vec<String>> {
        let want = desired(cfg);
        let mut bound = Vec::new();
        let mut failures = Vec::new();
        for (addr, role) in &want {
            match self.active.get(addr) {
                Some((r, _)) if r == role => continue,
                // Same address, new role: the old listener must close first (commit).
                Some(_) => continue,
                None => match bind(*addr) {
                    Ok(l) => bound.push((*addr, *role, l)),
                    Err(e) if optional(addr, role.0, &e) => {
                        tracing::warn!(%addr, error = %e, "IPv6 capture listener not bound");
                    }
                    Err(e) => {
                        failures.push(format!("cannot listen on {addr} ({}): {e}", role.0.label()))
                    }
                },
            }
        }
        let want_dns = cfg.capture.as_ref().and_then(|c| c.dns_port);
        let mut dns_sockets = Vec::new();
        if let Some(port) = want_dns
            && self.dns.as_ref().map(|(p, _)| *p) != Some(port)
        {
            match crate::dns::bind(port) {
                Ok(s) => dns_sockets = s,
                Err(e) => {
                    failures.push(format!("cannot listen on 127.0.0.1:{port}/udp (dns): {e}"))
                }
            }
        }
        if failures.is_empty() {
            Ok(Prepared {
                want,
                bound,
                dns: (want_dns, dns_sockets),
            })
        } else {
            Err(failures)
        }
    }

    /// Starts the prepared listeners and stops those no longer wanted (their open
    /// connections finish on their own). Returns listeners that failed to rebind
    /// after a role change.
    pub fn commit(&mut self, prepared: Prepared, shared: &Arc<Shared>, rt: &Handle) -> Vec<String> {
        let Prepared {
            want,
            mut bound,
            dns,
        } = prepared;
        self.commit_dns(dns, shared, rt);
        self.active
            .retain(|addr, (role, _)| want.get(addr) == Some(role));
        let mut failures = Vec::new();
        for (addr, role) in &want {
            if self.active.contains_key(addr) || bound.iter().any(|(a, _, _)| a == addr) {
                continue;
            }
            match bind(*addr) {
                Ok(l) => bound.push((*addr, *role, l)),
                Err(e) if optional(addr, role.0, &e) => {}
                Err(e) => {
                    failures.push(format!("cannot listen on {addr} ({}): {e}", role.0.label()))
                }
            }
        }
        let mut map = shared.bound.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|addr, _| want.contains_key(addr));
        for (addr, role, std) in bound {
            if let Ok(local) = std.local_addr() {
                map.insert(addr, local);
            }
            let (stop_tx, stop_rx) = oneshot::channel();
            rt.spawn(accept_loop(std, addr, role, shared.clone(), stop_rx));
            self.active.insert(addr, (role, stop_tx));
        }
        drop(map);
        shared
            .listeners_ok
            .store(failures.is_empty(), Ordering::Relaxed);
        failures
    }
}

impl Listeners {
    /// Starts, moves or stops the DNS responder.
    fn commit_dns(
        &mut self,
        (want, sockets): (Option<u16>, Vec<std::net::UdpSocket>),
        shared: &Arc<Shared>,
        rt: &Handle,
    ) {
        if self.dns.as_ref().map(|(p, _)| *p) == want {
            return;
        }
        if let Some((_, tasks)) = self.dns.take() {
            for t in tasks {
                t.abort();
            }
        }
        if let Some(port) = want {
            let tasks = sockets
                .into_iter()
                .map(|s| {
                    rt.spawn(crate::dns::serve(s, shared.clone()))
                        .abort_handle()
                })
                .collect();
            tracing::info!(port, "DNS responder listening");
            self.dns = Some((port, tasks));
        }
    }
}

/// Starts the listener `std` (configured as `bind`) on this runtime and runs its
/// kind's accept loop until it is removed or the proxy drains.
async fn accept_loop(
    std: std::net::TcpListener,
    bind: SocketAddr,
    (role, opaque): (Role, bool),
    shared: Arc<Shared>,
    stop: oneshot::Receiver<()>,
) {
    let Some(listener) = Acceptor::start(std, bind, role, &shared, stop) else {
        return;
    };
    match role {
        Role::Upstream if opaque => crate::bindings::tcp_binding(listener).await,
        Role::Upstream => crate::bindings::http_binding(listener).await,
        Role::HttpProxy => crate::bindings::http_proxy(listener).await,
        Role::Inbound => crate::mesh_listener::accept_loop(listener).await,
        Role::OutboundCapture => crate::capture::accept_outbound(listener).await,
        Role::InboundCapture => crate::capture::accept_inbound(listener).await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::serve::{H2_PREFACE, Prefixed, http_version};
    use crate::types::ConnCtx;
    use crate::{inbound, outbound};
    use std::mem::size_of_val;
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_version_is_read_ahead_and_the_head_comes_back_in_one_read() {
        // HTTP/1.1: the first byte rules HTTP/2 out; hyper's first read then gets
        // the whole head (prefix and the rest), not the prefix alone.
        let (mut client, mut server) = tokio::io::duplex(1024);
        let head = b"GET /items HTTP/1.1\r\nhost: catalog\r\nuser-agent: test\r\n\r\n";
        client.write_all(head).await.unwrap();
        let (prefix, h2) = http_version(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!h2);
        assert!(prefix.end > 0 && prefix.end <= 24, "{}", prefix.end);
        let mut io = Prefixed::new(prefix, server);
        let mut buf = vec![0u8; 8192];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &head[..], "one read, the whole head");
        // Afterwards, reads go to the stream.
        client.write_all(b"more").await.unwrap();
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"more");

        // HTTP/2 prior knowledge, its preface split across writes.
        let (mut client, mut server) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            for part in H2_PREFACE.chunks(5) {
                client.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.write_all(b"\x00\x00\x00\x04").await.unwrap();
            client
        });
        let (prefix, h2) = http_version(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(h2);
        let _client = writer.await.unwrap();
        let mut io = Prefixed::new(prefix, server);
        let mut got = Vec::new();
        while got.len() < 28 {
            let n = io.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&got[..24], &H2_PREFACE[..]);
        assert_eq!(&got[24..], b"\x00\x00\x00\x04");

        // "PRI" then something else: HTTP/1.1 (hyper will refuse it), bytes kept.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"PRIX").await.unwrap();
        let (prefix, h2) = http_version(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!h2);
        assert_eq!(&prefix.buf[..prefix.end], b"PRIX");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_says_nothing_or_closes_is_dropped() {
        let (_client, mut server) = tokio::io::duplex(64);
        assert!(
            http_version(&mut server, Duration::from_secs(10))
                .await
                .is_none()
        );
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert!(
            http_version(&mut server, Duration::from_secs(10))
                .await
                .is_none()
        );
    }
    use std::time::Duration;

    fn config(inbound: u16, capture: u16) -> ProxyConfig {
        let yaml = format!(
            r#"
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {{name: web-0, namespace: shop}}
spec:
  inbound: {{bind: "127.0.0.1:{inbound}", ports: [8080]}}
  capture: {{inboundPort: {capture}, outboundPort: 15001}}
"#
        );
        sinew_model::compile::compile_text("t.yaml", &yaml, None).unwrap()
    }

    #[test]
    fn a_capture_on_the_sidecar_port_serves_the_inbound() {
        let roles = |cfg: &ProxyConfig, role: Role| {
            let mut ports: Vec<SocketAddr> = desired(cfg)
                .into_iter()
                .filter(|(_, (r, _))| *r == role)
                .map(|(a, _)| a)
                .collect();
            ports.sort();
            ports
        };
        let shared = config(15006, 15006);
        assert!(roles(&shared, Role::Inbound).is_empty(), "no second bind");
        assert!(
            roles(&shared, Role::InboundCapture)
                .iter()
                .all(|a| a.port() == 15006 && a.ip().is_unspecified())
        );
        let apart = config(4143, 15006);
        assert_eq!(
            roles(&apart, Role::Inbound),
            ["127.0.0.1:4143".parse::<SocketAddr>().unwrap()]
        );
    }

    fn returned<F, Fut>(_: F) -> usize
    where
        F: Fn(Arc<ConnCtx>, http::Request<hyper::body::Incoming>) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every open connection holds its task's future, and hyper keeps a slot the size
    /// of the request handler's future for the connection's life. Keep both small
    /// (ztunnel found 22 KB futures per connection and halved memory by boxing rare
    /// branches).
    #[tokio::test]
    async fn connection_and_request_futures_stay_small() {
        let shared = Arc::new(Shared::new(crate::state::Settings::for_tests()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let ctx = Arc::new(ConnCtx::new(shared, Role::Upstream, addr, peer));
        let std = stream.into_std().unwrap();
        let conn = |f: fn(&Arc<ConnCtx>, tokio::net::TcpStream) -> usize| {
            let s = std.try_clone().unwrap();
            f(&ctx, tokio::net::TcpStream::from_std(s).unwrap())
        };
        // Each listener kind's connection task (see the table in this module's doc).
        let http_binding =
            conn(|c, s| size_of_val(&crate::bindings::http_connection(c.clone(), s)));
        let tcp_binding = conn(|c, s| size_of_val(&outbound::tcp(c.clone(), s)));
        let http_proxy = conn(|c, s| size_of_val(&crate::serve::serve_http(c.clone(), s)));
        let mesh = conn(|c, s| size_of_val(&crate::mesh_listener::connection(c.clone(), s)));
        let capture_out = conn(|c, s| size_of_val(&crate::capture::outbound(c.clone(), s)));
        let capture_in = conn(|c, s| size_of_val(&crate::capture::inbound(c.clone(), s)));
        // The handlers are boxed per request (see serve_http); they only need to stay
        // reasonable, while the connection task is paid for by every open connection.
        let sizes = [
            ("http binding connection task", http_binding, 2560),
            ("tcp binding connection task", tcp_binding, 2560),
            ("http proxy connection task", http_proxy, 2560),
            ("inbound mesh connection task", mesh, 2560),
            ("outbound capture connection task", capture_out, 2560),
            ("inbound capture connection task", capture_in, 2560),
            ("outbound::handle", returned(outbound::handle), 8192),
            ("inbound::handle", returned(inbound::handle), 8192),
        ];
        for (name, size, _) in sizes {
            eprintln!("{name} future: {size} bytes");
        }
        for (name, size, limit) in sizes {
            assert!(
                size <= limit,
                "{name} future is {size} bytes (limit {limit}); box a rare branch"
            );
        }
    }
}
