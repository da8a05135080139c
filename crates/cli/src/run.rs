//! `sinew run`: an unmodified app joins the mesh on a Linux host (a VM, bare metal).
//!
//! In the current network namespace: install the capture rules (`sinew init`),
//! start `sinew-proxy --capture` as the proxy uid and wait until it runs with capture
//! on, start the app; when the app exits (or on
//! SIGINT/SIGTERM, passed on to it) stop the sidecar and remove the rules, whatever
//! happened. Exits with the app's status.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, bail};
use sinew_api::v1::CreateJoinTokenRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::client::{connect, status};

impl RunArgs {
    /// The namespace, once [`run`] has settled it.
    fn namespace(&self) -> String {
        self.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned())
    }
}

/// `sinew run`'s flags.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The service the app is an instance of.
    #[arg(long)]
    service: String,
    /// A port the app serves, `name=number` (repeatable), e.g. `http=8080`.
    #[arg(long = "port", value_parser = parse_port)]
    ports: Vec<(String, u16)>,
    /// Namespace of the service and proxy [env: SINEW_NAMESPACE; default: the
    /// context's, else `default`].
    #[arg(short, long)]
    namespace: Option<String>,
    /// This sidecar's name; default `<service>-<hostname>`.
    #[arg(long)]
    name: Option<String>,
    /// The workload's address; default the address this host reaches the control
    /// plane from.
    #[arg(long)]
    address: Option<IpAddr>,
    /// The workload's service account; default the service's name. Another account
    /// must be listed in the Service's `spec.serviceAccounts`.
    #[arg(long)]
    service_account: Option<String>,
    /// A join token file; default: a single-use token is created with the
    /// credential in use (which needs the admin role).
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// The proxy's uid (its traffic is never captured); it runs as this uid.
    #[arg(long, default_value_t = sinew_capture::DEFAULT_PROXY_UID)]
    proxy_uid: u32,
    /// The sidecar's mesh port (peer sidecars connect to it).
    #[arg(long, default_value_t = 4143)]
    sidecar_port: u16,
    /// Where inbound TCP is redirected.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Where outbound TCP is redirected.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// The sidecar's DNS responder (service names answer with virtual IPs); 0: off.
    #[arg(long, default_value_t = 15053)]
    dns_port: u16,
    /// The sidecar's admin port on 127.0.0.1.
    #[arg(long, default_value_t = 4191)]
    admin_port: u16,
    /// Inbound ports left alone, comma-separated (e.g. 22).
    #[arg(long, default_value = "", value_parser = sinew_capture::parse_ports)]
    exclude_inbound_ports: std::vec::Vec<sinew_capture::PortRange>,
    /// Outbound ports left alone, comma-separated.
    #[arg(long, default_value = "", value_parser = sinew_capture::parse_ports)]
    exclude_outbound_ports: std::vec::Vec<sinew_capture::PortRange>,
    /// Outbound CIDRs left alone, comma-separated.
    #[arg(long, default_value = "", value_parser = sinew_capture::parse_cidrs)]
    exclude_outbound_cidrs: std::vec::Vec<sinew_model::vip::Cidr>,
    /// Which iptables programs: auto, legacy or nft.
    #[arg(long, default_value = "auto")]
    backend: sinew_capture::Backend,
    /// The sinew-proxy executable; default the one next to sinew.
    #[arg(long, env = "SINEW_PROXY_BIN")]
    proxy_bin: Option<PathBuf>,
    /// The app and its arguments (after `--`).
    #[arg(last = true, required = true)]
    app: Vec<String>,
}

fn parse_port(s: &str) -> Result<(String, u16), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected name=number, e.g. http=8080"))?;
    let v = v
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{s:?}: {v:?} is not a port (1-65535)"))?;
    Ok((k.to_owned(), v))
}

/// The address this host reaches `server` from (no packet is sent).
fn local_address(server: &str) -> anyhow::Result<IpAddr> {
    let authority = server
        .split("://")
        .nth(1)
        .unwrap_or(server)
        .split('/')
        .next()
        .unwrap_or("");
    let target: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| format!("cannot resolve the control plane's address {authority:?}"))?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let s = std::net::UdpSocket::bind(bind)?;
    s.connect(target)?;
    Ok(s.local_addr()?.ip())
}

/// Sends SIGTERM to a child (by pid, with `kill`), then waits up to `grace` before
/// killing it.
async fn stop(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(s)) => Some(s),
        _ => {
            let _ = child.kill().await;
            child.wait().await.ok()
        }
    }
}

/// GETs `path` from the admin listener: (status, body).
async fn admin_get(admin: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.take(1 << 22).read_to_end(&mut buf).await.ok()?;
        Some(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .ok()??;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let status = std::str::from_utf8(buf.get(9..12)?).ok()?.parse().ok()?;
    Some((status, buf[split + 4..].to_vec()))
}

/// True when the sidecar is ready with this run's configuration applied: capture
/// on, and the inbound (when the app serves ports) derived from its registration.
async fn ready(admin: SocketAddr, inbound: bool) -> bool {
    if !matches!(admin_get(admin, "/ready").await, Some((200, _))) {
        return false;
    }
    let Some((200, body)) = admin_get(admin, "/config").await else {
        return false;
    };
    let Ok(cfg) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return false;
    };
    cfg.pointer("/config/capture")
        .is_some_and(|c| c.is_object())
        && (!inbound
            || cfg
                .pointer("/config/inbound")
                .is_some_and(|i| i.is_object()))
}

/// `sinew run`.
///
/// `namespace` is the one to use when `-n` is not given (the context's).
pub async fn run(
    server: &crate::client::Server,
    mut args: RunArgs,
    namespace: &str,
) -> anyhow::Result<i32> {
    args.namespace.get_or_insert_with(|| namespace.to_owned());
    let proxy_bin = match &args.proxy_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("cannot find the sinew executable")?
            .with_file_name("sinew-proxy"),
    };
    if !proxy_bin.is_file() {
        bail!(
            "sinew-proxy not found at {} (set --proxy-bin or SINEW_PROXY_BIN)",
            proxy_bin.display()
        );
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{host}", args.service));
    let ns = &args.namespace();
    let address = match args.address {
        Some(a) => a,
        None => local_address(&server.url)?,
    };
    let account = args
        .service_account
        .clone()
        .unwrap_or_else(|| args.service.clone());

    // 1. The sidecar's identity (its capture and inbound come with its Hello and
    //    registration).
    let mut client = connect(server).await?;
    let token_file = match &args.join_token_file {
        Some(f) => f.clone(),
        None => {
            let t = client
                .create_join_token(CreateJoinTokenRequest {
                    namespace: ns.clone(),
                    service_account: account.clone(),
                    // Spent by the sidecar's bootstrap, in a moment.
                    ttl_seconds: 600,
                    uses: 1,
                })
                .await
                .map_err(status)?
                .into_inner();
            let path = std::env::temp_dir().join(format!("sinew-run-{}.token", std::process::id()));
            write_token(&path, &t.token, args.proxy_uid)?;
            path
        }
    };

    // 2. Capture, before anything starts (as an init container would).
    let opts = sinew_capture::Options {
        proxy_uid: args.proxy_uid,
        inbound_port: args.inbound_port,
        outbound_port: args.outbound_port,
        dns_port: (args.dns_port > 0).then_some(args.dns_port),
        exclude_inbound_ports: args.exclude_inbound_ports.clone(),
        exclude_outbound_ports: args.exclude_outbound_ports.clone(),
        exclude_outbound_cidrs: args.exclude_outbound_cidrs.clone(),
        ipv6: true,
        backend: args.backend,
    };
    sinew_capture::install(&opts).context("installing capture rules")?;
    eprintln!("sinew run: capture installed");
    let result = supervise(server, &args, &name, address, &proxy_bin, &token_file).await;
    // 4. Whatever happened: rules out, token file gone.
    if let Err(e) = sinew_capture::uninstall(args.backend, true) {
        eprintln!("sinew run: removing the capture rules failed: {e}");
    } else {
        eprintln!("sinew run: capture removed");
    }
    if args.join_token_file.is_none() {
        let _ = std::fs::remove_file(&token_file);
    }
    result
}

fn write_token(path: &std::path::Path, token: &str, uid: u32) -> anyhow::Result<()> {
    sinew_tls::private_file::write(path, token.as_bytes())?;
    // Readable by the proxy's uid only.
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .with_context(|| format!("cannot give {} to uid {uid}", path.display()))?;
    Ok(())
}

/// 3. The sidecar, then the app; both stopped when either ends or on a signal.
async fn supervise(
    server: &crate::client::Server,
    args: &RunArgs,
    name: &str,
    address: IpAddr,
    proxy_bin: &std::path::Path,
    token_file: &std::path::Path,
) -> anyhow::Result<i32> {
    use tokio::signal::unix::{SignalKind, signal};
    let admin = SocketAddr::from(([127, 0, 0, 1], args.admin_port));
    let mut proxy_cmd = Command::new(proxy_bin);
    proxy_cmd
        .arg("--control-plane")
        .arg(&server.url)
        .arg("--name")
        .arg(format!("{}/{name}", args.namespace()))
        .arg("--service")
        .arg(&args.service)
        .arg("--address")
        .arg(address.to_string())
        .arg("--service-account")
        .arg(args.service_account.as_deref().unwrap_or(&args.service))
        .arg("--join-token-file")
        .arg(token_file)
        .arg("--admin")
        .arg(admin.to_string())
        .arg("--capture")
        .arg("--capture-outbound-port")
        .arg(args.outbound_port.to_string())
        .arg("--capture-inbound-port")
        .arg(args.inbound_port.to_string())
        .uid(args.proxy_uid)
        .gid(args.proxy_uid)
        .kill_on_drop(true);
    if args.dns_port > 0 {
        proxy_cmd
            .arg("--capture-dns-port")
            .arg(args.dns_port.to_string());
    }
    // An app that serves no port (a client) gets no inbound.
    if !args.ports.is_empty() {
        proxy_cmd
            .arg("--inbound")
            .arg(SocketAddr::new(address, args.sidecar_port).to_string());
    }
    for (k, v) in &args.ports {
        proxy_cmd.arg("--port").arg(format!("{k}={v}"));
    }
    let mut proxy = proxy_cmd
        .spawn()
        .with_context(|| format!("cannot start {}", proxy_bin.display()))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !ready(admin, !args.ports.is_empty()).await {
        if let Ok(Some(s)) = proxy.try_wait() {
            bail!("the sidecar exited before it was ready ({s})");
        }
        if tokio::time::Instant::now() > deadline {
            stop(&mut proxy, Duration::from_secs(5)).await;
            bail!(
                "the sidecar was not ready within 60 s (see its log above; is the control plane at {server} reachable?)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("sinew run: sidecar ready; starting {}", args.app.join(" "));
    let (program, rest) = args
        .app
        .split_first()
        .context("no app to run: give it after --")?;
    let mut app = match Command::new(program).args(rest).kill_on_drop(true).spawn() {
        Ok(a) => a,
        Err(e) => {
            stop(&mut proxy, Duration::from_secs(5)).await;
            bail!("cannot start {program}: {e}");
        }
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let code = tokio::select! {
        s = app.wait() => s.ok().and_then(|s| s.code()).unwrap_or(1),
        s = proxy.wait() => {
            eprintln!("sinew run: the sidecar exited ({}); stopping the app", s.map(|s| s.to_string()).unwrap_or_default());
            stop(&mut app, Duration::from_secs(10)).await;
            1
        }
        _ = term.recv() => stop(&mut app, Duration::from_secs(10)).await.and_then(|s| s.code()).unwrap_or(143),
        _ = int.recv() => stop(&mut app, Duration::from_secs(10)).await.and_then(|s| s.code()).unwrap_or(130),
    };
    stop(&mut proxy, Duration::from_secs(10)).await;
    Ok(code)
}
