//! Transparent capture rules for a workload's network namespace (`sinew init`).
//!
//! Installs, in the `nat` table of the current network namespace (IPv4 with
//! `iptables-restore`, IPv6 with `ip6tables-restore`, one atomic transaction each):
//! - `SINEW_INBOUND` (from `PREROUTING`): inbound TCP → the inbound capture port,
//!   except loopback and excluded ports;
//! - `SINEW_OUTPUT` (from `OUTPUT`): outbound TCP → the outbound capture port,
//!   except the proxy's own traffic (by uid), loopback, excluded ports and CIDRs;
//!   and, with a DNS port, UDP to port 53 → the sidecar's DNS responder.
//!
//! Uninstalling removes exactly that: the jumps to `SINEW_*` chains, then the chains.
//! Both the legacy and the nft backends of iptables work (`Backend`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use sinew_model::vip::Cidr;

/// The chains this crate owns; nothing else is ever touched.
pub const CHAINS: [&str; 3] = ["SINEW_INBOUND", "SINEW_OUTPUT", "SINEW_DNS"];

/// The default uid of the proxy (its traffic is never captured).
pub const DEFAULT_PROXY_UID: u32 = 1337;

/// Which iptables programs to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `iptables-restore`: whatever the system's alternative points to.
    #[default]
    Auto,
    /// `iptables-legacy-restore` (x_tables).
    Legacy,
    /// `iptables-nft-restore` (nf_tables).
    Nft,
}

impl Backend {
    /// The program for `tool` (`restore` or `save`) of a family (`ip` or `ip6`).
    pub fn program(self, v6: bool, tool: &str) -> String {
        let base = if v6 { "ip6tables" } else { "iptables" };
        match self {
            Backend::Auto => format!("{base}-{tool}"),
            Backend::Legacy => format!("{base}-legacy-{tool}"),
            Backend::Nft => format!("{base}-nft-{tool}"),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "legacy" => Ok(Backend::Legacy),
            "nft" => Ok(Backend::Nft),
            _ => Err(format!("{s:?}: expected auto, legacy or nft")),
        }
    }
}

/// A port or a port range (`8000:8100`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange(pub u16, pub u16);

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == self.1 {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{}:{}", self.0, self.1)
        }
    }
}

/// Parses a comma-separated list of ports and ranges (`22,8000:8100`); empty is none.
pub fn parse_ports(list: &str) -> Result<Vec<PortRange>, String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once([':', '-']) {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(format!("{item:?}: the range is backwards"));
                }
                Ok(PortRange(a, b))
            }
            None => port(item).map(|p| PortRange(p, p)),
        })
        .collect()
}

/// Parses a comma-separated list of CIDRs (`10.0.0.0/8,fd00::/8`); empty is none.
pub fn parse_cidrs(list: &str) -> Result<Vec<Cidr>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Cidr::parse)
        .collect()
}

/// What to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The proxy's uid: its traffic is never captured.
    pub proxy_uid: u32,
    /// Where inbound TCP is redirected.
    pub inbound_port: u16,
    /// Where outbound TCP is redirected.
    pub outbound_port: u16,
    /// Where outbound DNS (UDP 53) is redirected; `None`: DNS is not captured.
    pub dns_port: Option<u16>,
    /// Inbound destination ports left alone.
    pub exclude_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<PortRange>,
    /// Outbound destinations left alone.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Also capture IPv6 (with ip6tables).
    pub ipv6: bool,
    /// Which iptables programs to run.
    pub backend: Backend,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            proxy_uid: DEFAULT_PROXY_UID,
            inbound_port: 15006,
            outbound_port: 15001,
            dns_port: None,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            ipv6: true,
            backend: Backend::Auto,
        }
    }
}

/// Why capture could not be installed or removed. Nothing is half-applied: each
/// family's rules go in one transaction, and IPv4's are removed again when IPv6's
/// fail.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A program could not be run at all.
    #[error("cannot run {command}: {reason}")]
    Spawn {
        /// The command.
        command: String,
        /// Why.
        reason: std::io::Error,
    },
    /// A program ran and refused.
    #[error("{command} failed{}: {reason}", rule.as_ref().map(|r| format!(" on rule {r:?}")).unwrap_or_default())]
    Refused {
        /// The command.
        command: String,
        /// The rule it refused, when it says which.
        rule: Option<String>,
        /// Its error output.
        reason: String,
    },
    /// Capture is installed already.
    #[error(
        "capture rules are already installed ({family} chain {chain} exists): run `sinew init --uninstall` first"
    )]
    AlreadyInstalled {
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// The chain found.
        chain: String,
    },
    /// Bad options.
    #[error("{0}")]
    Invalid(String),
}

fn family(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

/// The `iptables-restore` input that installs capture for one family.
pub fn rules(opts: &Options, v6: bool) -> String {
    let mut r = String::from("*nat\n");
    let _ = writeln!(r, ":SINEW_INBOUND - [0:0]");
    let _ = writeln!(r, ":SINEW_OUTPUT - [0:0]");
    if opts.dns_port.is_some() {
        let _ = writeln!(r, ":SINEW_DNS - [0:0]");
    }
    // Inbound: everything but loopback and excluded ports.
    let _ = writeln!(r, "-A PREROUTING -p tcp -j SINEW_INBOUND");
    let _ = writeln!(r, "-A SINEW_INBOUND -i lo -j RETURN");
    // Only connections' first packets are redirected: a connection open before
    // capture was installed (untracked until now, so conntrack first sees it mid-
    // stream) is left alone instead of being redirected and reset.
    let _ = writeln!(r, "-A SINEW_INBOUND -p tcp -m tcp ! --syn -j RETURN");
    for p in &opts.exclude_inbound_ports {
        let _ = writeln!(r, "-A SINEW_INBOUND -p tcp -m tcp --dport {p} -j RETURN");
    }
    let _ = writeln!(
        r,
        "-A SINEW_INBOUND -p tcp -j REDIRECT --to-ports {}",
        opts.inbound_port
    );
    // Outbound: everything but the proxy's own traffic, loopback, excluded ports and
    // CIDRs. The uid rule comes first: the proxy's connections are never redirected,
    // so nothing it forwards can loop back to it.
    let _ = writeln!(r, "-A OUTPUT -p tcp -j SINEW_OUTPUT");
    let _ = writeln!(
        r,
        "-A SINEW_OUTPUT -m owner --uid-owner {} -j RETURN",
        opts.proxy_uid
    );
    let _ = writeln!(r, "-A SINEW_OUTPUT -p tcp -m tcp ! --syn -j RETURN");
    let _ = writeln!(r, "-A SINEW_OUTPUT -o lo -j RETURN");
    let lo = if v6 { "::1/128" } else { "127.0.0.0/8" };
    let _ = writeln!(r, "-A SINEW_OUTPUT -d {lo} -j RETURN");
    for c in opts
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| c.network.is_ipv6() == v6)
    {
        let _ = writeln!(r, "-A SINEW_OUTPUT -d {c} -j RETURN");
    }
    for p in &opts.exclude_outbound_ports {
        let _ = writeln!(r, "-A SINEW_OUTPUT -p tcp -m tcp --dport {p} -j RETURN");
    }
    let _ = writeln!(
        r,
        "-A SINEW_OUTPUT -p tcp -j REDIRECT --to-ports {}",
        opts.outbound_port
    );
    if let Some(dns) = opts.dns_port {
        let _ = writeln!(r, "-A OUTPUT -p udp -m udp --dport 53 -j SINEW_DNS");
        let _ = writeln!(
            r,
            "-A SINEW_DNS -m owner --uid-owner {} -j RETURN",
            opts.proxy_uid
        );
        let _ = writeln!(r, "-A SINEW_DNS -p udp -j REDIRECT --to-ports {dns}");
    }
    r.push_str("COMMIT\n");
    r
}

/// Runs `program args` with `input` on stdin; returns stdout.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, CaptureError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|reason| CaptureError::Spawn {
            command: command.clone(),
            reason,
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|reason| CaptureError::Spawn {
                command: command.clone(),
                reason,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|reason| CaptureError::Spawn {
            command: command.clone(),
            reason,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let reason = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    // "iptables-restore: line 7 failed": name the rule.
    let rule = input.and_then(|text| {
        let n: usize = reason
            .split("line ")
            .nth(1)?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()?;
        text.lines().nth(n.checked_sub(1)?).map(str::to_owned)
    });
    Err(CaptureError::Refused {
        command,
        rule,
        reason: if reason.is_empty() {
            format!("exit status {}", out.status)
        } else {
            reason
        },
    })
}

/// The `nat` table as `iptables-save` prints it.
pub fn save_nat(backend: Backend, v6: bool) -> Result<String, CaptureError> {
    run(&backend.program(v6, "save"), &["-t", "nat"], None)
}

/// Which of this crate's chains exist in a `nat` table dump.
fn our_chains(save: &str) -> Vec<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| CHAINS.contains(c))
        .map(str::to_owned)
        .collect()
}

/// Installs capture in the current network namespace.
pub fn install(opts: &Options) -> Result<(), CaptureError> {
    if opts.inbound_port == 0 || opts.outbound_port == 0 || opts.dns_port == Some(0) {
        return Err(CaptureError::Invalid(
            "capture ports must be 1-65535".into(),
        ));
    }
    let families: &[bool] = if opts.ipv6 { &[false, true] } else { &[false] };
    for &v6 in families {
        let save = save_nat(opts.backend, v6)?;
        if let Some(chain) = our_chains(&save).into_iter().next() {
            return Err(CaptureError::AlreadyInstalled {
                family: family(v6),
                chain,
            });
        }
    }
    let mut done = Vec::new();
    for &v6 in families {
        let text = rules(opts, v6);
        let restore = opts.backend.program(v6, "restore");
        if let Err(e) = run(&restore, &["--noflush"], Some(&text)) {
            // Nothing half-applied: take back the families already installed.
            for &undo in &done {
                let _ = uninstall_family(opts.backend, undo);
            }
            return Err(e);
        }
        done.push(v6);
    }
    Ok(())
}

/// The `iptables-restore` input that removes capture from a `nat` table dump: the
/// rules jumping to this crate's chains, then the chains. Empty when there is
/// nothing to remove.
pub fn removal(save: &str) -> String {
    let chains = our_chains(save);
    if chains.is_empty() {
        return String::new();
    }
    let mut r = String::from("*nat\n");
    for line in save.lines() {
        let Some(rule) = line.strip_prefix("-A ") else {
            continue;
        };
        let chain = rule.split_whitespace().next().unwrap_or("");
        let target = rule
            .split_whitespace()
            .skip_while(|w| *w != "-j")
            .nth(1)
            .unwrap_or("");
        if !CHAINS.contains(&chain) && CHAINS.contains(&target) {
            let _ = writeln!(r, "-D {rule}");
        }
    }
    for c in &chains {
        let _ = writeln!(r, "-F {c}");
    }
    for c in &chains {
        let _ = writeln!(r, "-X {c}");
    }
    r.push_str("COMMIT\n");
    r
}

fn uninstall_family(backend: Backend, v6: bool) -> Result<bool, CaptureError> {
    let save = save_nat(backend, v6)?;
    let text = removal(&save);
    if text.is_empty() {
        return Ok(false);
    }
    run(&backend.program(v6, "restore"), &["--noflush"], Some(&text))?;
    Ok(true)
}

/// Removes capture from the current network namespace: exactly the rules and
/// chains [`install`] added. Returns whether there was anything to remove.
pub fn uninstall(backend: Backend, ipv6: bool) -> Result<bool, CaptureError> {
    let mut any = uninstall_family(backend, false)?;
    if ipv6 {
        any |= uninstall_family(backend, true)?;
    }
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_with_clear_errors() {
        assert_eq!(
            parse_ports("22, 8000:8100").unwrap(),
            vec![PortRange(22, 22), PortRange(8000, 8100)]
        );
        assert!(parse_ports("").unwrap().is_empty());
        let e = parse_ports("22,http").err().unwrap_or_default();
        assert!(e.contains("\"http\""), "{e}");
        assert!(parse_ports("9:8").is_err());
        assert!(parse_ports("0").is_err());
        assert_eq!(parse_cidrs("10.0.0.0/8,fd00::/8").unwrap().len(), 2);
        assert!(parse_cidrs("10.0.0.0/40").is_err());
    }

    #[test]
    fn rules_exclude_the_proxy_before_redirecting() {
        let opts = Options {
            exclude_outbound_cidrs: parse_cidrs("10.1.0.0/16,fd00::/8").unwrap(),
            exclude_inbound_ports: parse_ports("22").unwrap(),
            ..Options::default()
        };
        let v4 = rules(&opts, false);
        let uid = v4
            .find("--uid-owner 1337 -j RETURN")
            .unwrap_or_else(|| panic!("{v4}"));
        let redirect = v4
            .find("-A SINEW_OUTPUT -p tcp -j REDIRECT --to-ports 15001")
            .unwrap_or_else(|| panic!("{v4}"));
        assert!(uid < redirect);
        assert!(v4.contains("-d 10.1.0.0/16 -j RETURN"));
        assert!(
            !v4.contains("fd00::/8"),
            "IPv6 CIDRs stay out of IPv4 rules"
        );
        assert!(v4.contains("--dport 22 -j RETURN"));
        let v6 = rules(&opts, true);
        assert!(v6.contains("-d fd00::/8 -j RETURN") && v6.contains("-d ::1/128"));
    }

    #[test]
    fn removal_takes_only_our_rules() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:SINEW_INBOUND - [0:0]\n:SINEW_OUTPUT - [0:0]\n:MINE - [0:0]\n-A PREROUTING -p tcp -j SINEW_INBOUND\n-A PREROUTING -d 192.0.2.1/32 -j MINE\n-A OUTPUT -p tcp -j SINEW_OUTPUT\n-A SINEW_OUTPUT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";
        let r = removal(save);
        assert!(r.contains("-D PREROUTING -p tcp -j SINEW_INBOUND\n"));
        assert!(r.contains("-D OUTPUT -p tcp -j SINEW_OUTPUT\n"));
        assert!(!r.contains("MINE"), "{r}");
        assert!(r.contains("-X SINEW_INBOUND") && r.contains("-F SINEW_OUTPUT"));
        assert_eq!(removal("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"), "");
    }
}
