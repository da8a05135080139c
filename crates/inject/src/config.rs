//! What gets injected: the installation's defaults and the per-pod annotations that
//! override them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::InjectError;

/// `sinew.dev/inject`: `enabled` or `disabled` on a Pod (or pod template); the label
/// `sinew.dev/inject=enabled` on a Namespace opts every Pod in it in (the webhook's
/// namespace selector).
pub const ANNOTATION_INJECT: &str = "sinew.dev/inject";
/// `sinew.dev/capture: disabled` on a Pod: no `sinew-init` (no iptables, no root, no
/// NET_ADMIN, so the pod passes Pod Security `baseline` and `restricted`). The sidecar
/// still serves the pod's inbound mesh traffic (mTLS, authorization) on its inbound
/// port, which discovery sends peers to; the app's own outbound calls are not
/// captured.
pub const ANNOTATION_CAPTURE: &str = "sinew.dev/capture";
/// Set on every injected Pod, so injection is recognised and never repeated.
pub const ANNOTATION_INJECTED: &str = "sinew.dev/injected";
/// Overrides the proxy (and init) image.
pub const ANNOTATION_IMAGE: &str = "sinew.dev/proxy-image";
/// The proxy's CPU request, a Kubernetes quantity (`100m`).
pub const ANNOTATION_CPU_REQUEST: &str = "sinew.dev/proxy-cpu-request";
/// The proxy's CPU limit (`1`).
pub const ANNOTATION_CPU_LIMIT: &str = "sinew.dev/proxy-cpu-limit";
/// The proxy's memory request (`64Mi`).
pub const ANNOTATION_MEMORY_REQUEST: &str = "sinew.dev/proxy-memory-request";
/// The proxy's memory limit (`256Mi`).
pub const ANNOTATION_MEMORY_LIMIT: &str = "sinew.dev/proxy-memory-limit";
/// The proxy's log filter (`info`, `debug`, `sinew_proxy=debug`).
pub const ANNOTATION_LOG_LEVEL: &str = "sinew.dev/proxy-log-level";
/// The port captured inbound traffic is redirected to: the sidecar's inbound listener.
/// Set on every injected pod; Kubernetes discovery (sinew-k8s) reads it to send mesh
/// traffic there.
pub const ANNOTATION_INBOUND_PORT: &str = "sinew.dev/inbound-port";
/// The port captured outbound traffic is redirected to.
pub const ANNOTATION_OUTBOUND_PORT: &str = "sinew.dev/outbound-port";
/// The proxy's admin port (probes, metrics); never captured.
pub const ANNOTATION_ADMIN_PORT: &str = "sinew.dev/admin-port";
/// The uid the proxy runs as; its own traffic is not captured.
pub const ANNOTATION_PROXY_UID: &str = "sinew.dev/proxy-uid";
/// Inbound ports not sent through the proxy (`8081,9000-9010`).
pub const ANNOTATION_EXCLUDE_INBOUND_PORTS: &str = "sinew.dev/exclude-inbound-ports";
/// Outbound destination ports not sent through the proxy (`5432`).
pub const ANNOTATION_EXCLUDE_OUTBOUND_PORTS: &str = "sinew.dev/exclude-outbound-ports";
/// Outbound destination networks not sent through the proxy (`10.0.0.0/8,169.254.169.254/32`).
pub const ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: &str = "sinew.dev/exclude-outbound-cidrs";

/// The name of the injected proxy container.
pub const PROXY_CONTAINER: &str = "sinew-proxy";
/// The name of the injected capture init container.
pub const INIT_CONTAINER: &str = "sinew-init";
/// The name of the `emptyDir` mounted at `/run` in the init container: iptables
/// takes its lock (`/run/xtables.lock`) there while the root filesystem is read-only.
pub const XTABLES_VOLUME: &str = "sinew-xtables-lock";
/// The first Kubernetes minor version (1.x) whose API server keeps native sidecars
/// (`initContainers[].restartPolicy: Always`) by default. 1.28 has the field behind the
/// alpha `SidecarContainers` gate, off by default: there the API server drops it, and
/// the proxy would be an init container that never ends, so the pod would never start.
/// 1.29 turned the gate on (beta).
pub const NATIVE_SIDECAR_MINOR: u32 = 29;
/// Namespaces never injected, whatever their labels say: the system's own. The
/// webhook configuration's selector leaves them out too, but by the label
/// `kubernetes.io/metadata.name`, which exists only from Kubernetes 1.21.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// The name of the projected token volume.
pub const TOKEN_VOLUME: &str = "sinew-identity-token";
/// Where the proxy finds its service-account token.
pub const TOKEN_DIR: &str = "/var/run/secrets/sinew.dev/identity";
/// The token's file name inside [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "token";

/// The default image: `sinew` and `sinew-proxy` of this version.
pub fn default_image() -> String {
    format!("ghcr.io/sinew-mesh/sinew:{}", env!("CARGO_PKG_VERSION"))
}

/// The proxy's resource requests and limits (Kubernetes quantities).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    /// CPU request (`100m`).
    pub cpu_request: Option<String>,
    /// CPU limit (none by default: throttling a proxy adds latency to every request).
    pub cpu_limit: Option<String>,
    /// Memory request (`64Mi`).
    pub memory_request: Option<String>,
    /// Memory limit (`256Mi`).
    pub memory_limit: Option<String>,
}

/// The installation-wide injection settings (the webhook's flags); pods override
/// some of them with annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The image holding `sinew` (for `sinew init`) and `sinew-proxy`.
    pub image: String,
    /// `imagePullPolicy` of both containers (none: Kubernetes' default).
    pub image_pull_policy: Option<String>,
    /// The control plane's gRPC address as proxies reach it.
    pub control_plane: String,
    /// The audience of the projected service-account token: the control plane accepts
    /// only tokens minted for it (a token for the API server cannot be replayed).
    pub token_audience: String,
    /// Seconds the projected token is valid (the kubelet refreshes it; at least 600).
    pub token_expiration_seconds: i64,
    /// The proxy's uid (its own traffic is not captured).
    pub proxy_uid: i64,
    /// The proxy's inbound capture port: `sinew init` redirects inbound TCP there, and
    /// the proxy terminates mesh mTLS on it (`sinew.dev/inbound-port` tells discovery).
    pub inbound_port: u16,
    /// The proxy's outbound capture port (`sinew init` redirects outbound TCP there).
    pub outbound_port: u16,
    /// The proxy's admin port (`/ready`, `/live`, `/metrics`).
    pub admin_port: u16,
    /// The proxy's log filter.
    pub log_level: String,
    /// The proxy's resources.
    pub resources: Resources,
    /// Inbound ports never captured, for every pod.
    pub exclude_inbound_ports: Vec<String>,
    /// Outbound ports never captured, for every pod.
    pub exclude_outbound_ports: Vec<String>,
    /// Outbound networks never captured, for every pod.
    pub exclude_outbound_cidrs: Vec<String>,
    /// The proxy is a native sidecar (an init container with `restartPolicy: Always`,
    /// Kubernetes >= 1.29): it starts, and is ready, before the init containers after
    /// it and the app, and Jobs complete when their containers do. Off: the proxy is
    /// the first regular container, and a Job ends it with `POST /shutdown` on the
    /// admin port (loopback). Chosen from the API server's version
    /// ([`native_sidecars`]).
    pub native_sidecar: bool,
    /// Namespaces whose pods the webhook never injects (the system's, the control
    /// plane's), whatever their labels and the pods' annotations say.
    pub excluded_namespaces: Vec<String>,
    /// Transparent capture (`sinew-init`); off with `sinew.dev/capture: disabled`.
    pub capture: bool,
}

/// Whether a cluster of this version (`/version`'s `gitVersion`, e.g. `v1.29.3`,
/// `v1.30.1-eks-1234`, or `major.minor` such as `1.28`, `1.29+`) keeps native sidecars;
/// an unreadable version is an error naming it.
pub fn native_sidecars(version: &str) -> Result<bool, String> {
    let v = version.trim().trim_start_matches('v');
    let mut parts = v.splitn(3, '.');
    let number = |p: Option<&str>| -> Option<u32> {
        let p = p?;
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    match (number(parts.next()), number(parts.next())) {
        (Some(1), Some(minor)) => Ok(minor >= NATIVE_SIDECAR_MINOR),
        (Some(major), Some(_)) if major > 1 => Ok(true),
        _ => Err(format!(
            "{version:?} is not a Kubernetes version (expected e.g. v1.29.3 or 1.29)"
        )),
    }
}

impl Default for InjectConfig {
    fn default() -> InjectConfig {
        InjectConfig {
            image: default_image(),
            image_pull_policy: None,
            control_plane: "https://sinew-control.sinew-system.svc:15010".into(),
            token_audience: "sinew".into(),
            token_expiration_seconds: 3600,
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 4191,
            log_level: "info".into(),
            resources: Resources {
                cpu_request: Some("100m".into()),
                cpu_limit: None,
                memory_request: Some("64Mi".into()),
                memory_limit: Some("256Mi".into()),
            },
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            native_sidecar: false,
            excluded_namespaces: SYSTEM_NAMESPACES.iter().map(|s| (*s).to_owned()).collect(),
            capture: true,
        }
    }
}

impl InjectConfig {
    /// Checks the settings themselves (flags), naming the bad one.
    pub fn validate(&self) -> Result<(), InjectError> {
        if self.image.trim().is_empty() {
            return Err(InjectError::new("image", "must not be empty"));
        }
        if self.control_plane.trim().is_empty() {
            return Err(InjectError::new(
                "control plane address",
                "must not be empty",
            ));
        }
        if self.token_audience.trim().is_empty() {
            return Err(InjectError::new("token audience", "must not be empty"));
        }
        if self.token_expiration_seconds < 600 {
            return Err(InjectError::new(
                "token expiration",
                "must be at least 600 seconds (the Kubernetes minimum)",
            ));
        }
        for (what, q) in [
            ("proxy CPU request", &self.resources.cpu_request),
            ("proxy CPU limit", &self.resources.cpu_limit),
            ("proxy memory request", &self.resources.memory_request),
            ("proxy memory limit", &self.resources.memory_limit),
        ] {
            if let Some(q) = q {
                check_quantity(q).map_err(|r| InjectError::new(what, r))?;
            }
        }
        let ports = [self.inbound_port, self.outbound_port, self.admin_port];
        if ports.contains(&0) {
            return Err(InjectError::new("proxy ports", "must be 1-65535"));
        }
        if ports[0] == ports[1] || ports[0] == ports[2] || ports[1] == ports[2] {
            return Err(InjectError::new(
                "proxy ports",
                "inbound, outbound and admin ports must differ",
            ));
        }
        for p in self
            .exclude_inbound_ports
            .iter()
            .chain(&self.exclude_outbound_ports)
        {
            check_port_range(p).map_err(|r| InjectError::new("excluded ports", r))?;
        }
        for c in &self.exclude_outbound_cidrs {
            check_cidr(c).map_err(|r| InjectError::new("excluded networks", r))?;
        }
        Ok(())
    }

    /// These settings with a pod's annotations applied; a bad annotation is an
    /// error naming it.
    pub fn for_pod(
        &self,
        annotations: &BTreeMap<String, String>,
        field_prefix: &str,
    ) -> Result<InjectConfig, InjectError> {
        let mut c = self.clone();
        let field = |name: &str| format!("{field_prefix}metadata.annotations[\"{name}\"]");
        let get = |name: &str| annotations.get(name).map(|v| v.trim());
        let port = |name: &str, default: u16| -> Result<u16, InjectError> {
            match get(name) {
                None => Ok(default),
                Some(v) => match v.parse::<u16>() {
                    Ok(p) if p > 0 => Ok(p),
                    _ => Err(InjectError::new(
                        field(name),
                        format!("{v:?} is not a port (1-65535)"),
                    )),
                },
            }
        };
        c.inbound_port = port(ANNOTATION_INBOUND_PORT, c.inbound_port)?;
        c.outbound_port = port(ANNOTATION_OUTBOUND_PORT, c.outbound_port)?;
        c.admin_port = port(ANNOTATION_ADMIN_PORT, c.admin_port)?;
        let ports = [c.inbound_port, c.outbound_port, c.admin_port];
        if ports[0] == ports[1] || ports[0] == ports[2] || ports[1] == ports[2] {
            return Err(InjectError::new(
                field(ANNOTATION_INBOUND_PORT),
                format!(
                    "inbound ({}), outbound ({}) and admin ({}) ports must differ",
                    ports[0], ports[1], ports[2]
                ),
            ));
        }
        if let Some(v) = get(ANNOTATION_PROXY_UID) {
            c.proxy_uid = match v.parse::<i64>() {
                Ok(u) if (1..=i64::from(u32::MAX)).contains(&u) => u,
                _ => {
                    return Err(InjectError::new(
                        field(ANNOTATION_PROXY_UID),
                        format!("{v:?} is not a non-root uid"),
                    ));
                }
            };
        }
        if let Some(v) = get(ANNOTATION_IMAGE) {
            if v.is_empty() || v.contains(char::is_whitespace) {
                return Err(InjectError::new(
                    field(ANNOTATION_IMAGE),
                    format!("{v:?} is not an image reference"),
                ));
            }
            c.image = v.to_owned();
        }
        match get(ANNOTATION_CAPTURE) {
            None | Some("enabled") => {}
            Some("disabled") => c.capture = false,
            Some(other) => {
                return Err(InjectError::new(
                    field(ANNOTATION_CAPTURE),
                    format!("{other:?}: must be enabled or disabled"),
                ));
            }
        }
        if let Some(v) = get(ANNOTATION_LOG_LEVEL) {
            if v.is_empty() {
                return Err(InjectError::new(field(ANNOTATION_LOG_LEVEL), "is empty"));
            }
            c.log_level = v.to_owned();
        }
        for (name, slot) in [
            (ANNOTATION_CPU_REQUEST, &mut c.resources.cpu_request),
            (ANNOTATION_CPU_LIMIT, &mut c.resources.cpu_limit),
            (ANNOTATION_MEMORY_REQUEST, &mut c.resources.memory_request),
            (ANNOTATION_MEMORY_LIMIT, &mut c.resources.memory_limit),
        ] {
            if let Some(v) = get(name) {
                check_quantity(v).map_err(|r| InjectError::new(field(name), r))?;
                *slot = Some(v.to_owned());
            }
        }
        for (name, list, check) in [
            (
                ANNOTATION_EXCLUDE_INBOUND_PORTS,
                &mut c.exclude_inbound_ports,
                check_port_range as fn(&str) -> Result<(), String>,
            ),
            (
                ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
                &mut c.exclude_outbound_ports,
                check_port_range,
            ),
            (
                ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
                &mut c.exclude_outbound_cidrs,
                check_cidr,
            ),
        ] {
            if let Some(v) = get(name) {
                for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    check(item).map_err(|r| InjectError::new(field(name), r))?;
                    if !list.iter().any(|x| x == item) {
                        list.push(item.to_owned());
                    }
                }
            }
        }
        Ok(c)
    }
}

/// A port (`8080`) or an inclusive range (`9000-9010`).
pub fn check_port_range(s: &str) -> Result<(), String> {
    let port = |p: &str| match p.trim().parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a port or a port range (1-65535)")),
    };
    match s.split_once('-') {
        None => port(s).map(|_| ()),
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a > b {
                return Err(format!("{s:?}: the range is empty"));
            }
            Ok(())
        }
    }
}

/// An IPv4 or IPv6 network, `address/prefix`, or a single address.
pub fn check_cidr(s: &str) -> Result<(), String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not a network (address/prefix)"))?;
    if let Some(p) = prefix {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match p.parse::<u8>() {
            Ok(n) if n <= max => {}
            _ => return Err(format!("{s:?}: the prefix must be 0-{max}")),
        }
    }
    Ok(())
}

/// A Kubernetes quantity: a decimal number with an optional suffix
/// (`m`, `k`, `M`, `G`, `T`, `P`, `E`, `Ki` … `Ei`, or an exponent `e3`).
pub fn check_quantity(s: &str) -> Result<(), String> {
    let bad = || format!("{s:?} is not a Kubernetes quantity (like 100m, 1, 64Mi)");
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(digits_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(bad());
    }
    const SUFFIXES: [&str; 14] = [
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    let exponent = suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    if SUFFIXES.contains(&suffix) || exponent {
        Ok(())
    } else {
        Err(bad())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn quantities_ports_and_networks_are_checked() {
        for ok in ["100m", "1", "0.5", "64Mi", "1Gi", "2e3", "+1k"] {
            assert!(check_quantity(ok).is_ok(), "{ok}");
        }
        for bad in ["", "m", "1x", "1.2.3", "Mi64", "64 Mi", "1e"] {
            assert!(check_quantity(bad).is_err(), "{bad}");
        }
        assert!(check_port_range("8080").is_ok());
        assert!(check_port_range("9000-9010").is_ok());
        assert!(check_port_range("0").is_err());
        assert!(check_port_range("9010-9000").is_err());
        assert!(check_port_range("http").is_err());
        assert!(check_cidr("10.0.0.0/8").is_ok());
        assert!(check_cidr("fd00::/8").is_ok());
        assert!(check_cidr("169.254.169.254").is_ok());
        assert!(check_cidr("10.0.0.0/33").is_err());
        assert!(check_cidr("ten/8").is_err());
    }

    #[test]
    fn native_sidecars_from_1_29() {
        for (v, native) in [
            ("v1.20.15", false),
            ("1.28", false),
            ("v1.28.9", false),
            ("v1.29.0", true),
            ("1.29+", true),
            ("v1.30.1-eks-1234", true),
            ("v1.31.0+k3s1", true),
        ] {
            assert_eq!(native_sidecars(v), Ok(native), "{v}");
        }
        assert!(
            native_sidecars("latest")
                .unwrap_err()
                .contains("\"latest\"")
        );
        assert!(native_sidecars("v1").is_err());
    }

    #[test]
    fn annotations_override_and_bad_ones_are_named() {
        let base = InjectConfig::default();
        let mut a = BTreeMap::new();
        a.insert(ANNOTATION_INBOUND_PORT.to_owned(), "5143".to_owned());
        a.insert(ANNOTATION_MEMORY_LIMIT.to_owned(), "1Gi".to_owned());
        a.insert(
            ANNOTATION_EXCLUDE_OUTBOUND_PORTS.to_owned(),
            "5432, 6379".to_owned(),
        );
        let c = base.for_pod(&a, "").unwrap();
        assert_eq!(c.inbound_port, 5143);
        assert_eq!(c.resources.memory_limit.as_deref(), Some("1Gi"));
        assert_eq!(c.exclude_outbound_ports, ["5432", "6379"]);

        a.insert(ANNOTATION_ADMIN_PORT.to_owned(), "5143".to_owned());
        let e = base.for_pod(&a, "spec.template.").unwrap_err();
        assert_eq!(
            e.field,
            "spec.template.metadata.annotations[\"sinew.dev/inbound-port\"]"
        );
        a.remove(ANNOTATION_ADMIN_PORT);
        a.insert(ANNOTATION_CPU_REQUEST.to_owned(), "lots".to_owned());
        let e = base.for_pod(&a, "").unwrap_err();
        assert_eq!(
            e.field,
            "metadata.annotations[\"sinew.dev/proxy-cpu-request\"]"
        );
        assert!(e.reason.contains("not a Kubernetes quantity"), "{e}");
    }
}
