//! Services' virtual IPs: CIDR parsing and the deterministic allocation the control
//! plane uses for services that do not name one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Where virtual IPs are allocated when `MeshConfig.spec.virtualIPRange` is absent
/// (the reserved class E space, never routed on the internet).
pub const DEFAULT_VIP_RANGE: &str = "240.240.0.0/16";

/// An address range, `address/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (host bits cleared).
    pub network: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8` or `fd00::/64` (a bare address is a /32 or /128).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR: {addr:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} is not a CIDR: prefix must be 0-{max}"))?,
        };
        Ok(Cidr {
            network: mask(ip, prefix),
            prefix,
        })
    }

    /// True when `ip` is inside the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }

    /// The number of host bits.
    fn host_bits(&self) -> u32 {
        let max = if self.network.is_ipv4() { 32 } else { 128 };
        max - u32::from(self.prefix)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Allocates a virtual IP to each service key of `wanted` (`name.namespace`) that
/// has none, from `range`: the address is a hash of the key, so it is stable across
/// restarts and independent of other services, except on a collision, which moves
/// to the next free address (the key that sorts first keeps the hashed one).
/// `taken` holds explicit addresses, never handed out. The network and broadcast
/// addresses are skipped. Returns `None` for a key when the range is full.
pub fn allocate(
    range: Cidr,
    wanted: &BTreeSet<String>,
    taken: &BTreeSet<IpAddr>,
) -> BTreeMap<String, Option<IpAddr>> {
    let bits = range.host_bits().min(64);
    let size: u128 = 1u128 << bits;
    // Usable offsets: 1 ..= size-2 when there are at least 4 addresses.
    let (first, usable) = if size >= 4 {
        (1u128, size - 2)
    } else {
        (0, size)
    };
    let at = |offset: u128| -> IpAddr {
        match range.network {
            IpAddr::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n) + offset as u32)),
            IpAddr::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n) + offset)),
        }
    };
    let mut used: BTreeSet<IpAddr> = taken.clone();
    let mut out = BTreeMap::new();
    for key in wanted {
        let start = u128::from(fnv(key)) % usable;
        let mut found = None;
        // Linear probing; bounded by the range (and by a sane number of tries).
        for i in 0..usable.min(1 << 20) {
            let ip = at(first + (start + i) % usable);
            if used.insert(ip) {
                found = Some(ip);
                break;
            }
        }
        out.insert(key.clone(), found);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_contain() {
        let c = Cidr::parse("10.1.2.3/16").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains("10.1.255.1".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!(!c.contains("10.2.0.1".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope/8").is_err());
        let v6 = Cidr::parse("fd00::/64").unwrap_or_else(|e| panic!("{e}"));
        assert!(v6.contains("fd00::5".parse().unwrap_or_else(|e| panic!("{e}"))));
    }

    #[test]
    fn allocation_is_stable_and_collision_free() {
        let range = Cidr::parse("10.9.0.0/29").unwrap_or_else(|e| panic!("{e}"));
        let keys: BTreeSet<String> = (0..6).map(|i| format!("s{i}.default")).collect();
        let a = allocate(range, &keys, &BTreeSet::new());
        let b = allocate(range, &keys, &BTreeSet::new());
        assert_eq!(a, b, "the same services get the same addresses");
        let ips: BTreeSet<IpAddr> = a
            .values()
            .map(|v| v.unwrap_or_else(|| panic!("full")))
            .collect();
        assert_eq!(ips.len(), 6, "six distinct addresses: {a:?}");
        for ip in &ips {
            assert!(range.contains(*ip));
            assert_ne!(*ip, range.network, "the network address is never used");
        }
        // A seventh does not fit in a /29 (6 usable addresses).
        let mut more = keys.clone();
        more.insert("s6.default".into());
        assert!(
            allocate(range, &more, &BTreeSet::new())
                .values()
                .any(Option::is_none)
        );
        // Explicit addresses are never handed out.
        let taken: BTreeSet<IpAddr> = ips.iter().take(2).copied().collect();
        let c = allocate(range, &keys.iter().take(4).cloned().collect(), &taken);
        assert!(c.values().all(|v| v.is_some_and(|ip| !taken.contains(&ip))));
    }
}
