//! Services' virtual IPs: CIDR parsing and the deterministic allocation the control
//! plane uses for services that do not name one.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hasher as _;
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

/// FNV-1a 64 of the key's bytes (`Hasher::write`, not `Hash::hash`, which would
/// add a terminator): fixed by the addresses already handed out.
fn fnv(s: &str) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(s.as_bytes());
    h.finish()
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
        let c = Cidr::parse("10.1.2.3/16").unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains("10.1.255.1".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope/8").is_err());
        let v6 = Cidr::parse("fd00::/64").unwrap();
        assert!(v6.contains("fd00::5".parse().unwrap()));
    }

    #[test]
    fn allocation_is_stable_and_collision_free() {
        let range = Cidr::parse("10.9.0.0/29").unwrap();
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

    /// The hash is FNV-1a 64 (the published test vectors), and the addresses it
    /// gives are the ones earlier releases gave: a changed hash would move every
    /// service's virtual IP on upgrade.
    #[test]
    fn addresses_come_from_fnv1a_and_stay_where_they_were() {
        assert_eq!(fnv(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv("foobar"), 0x8594_4171_f739_67e8);
        let keys: BTreeSet<String> = ["catalog.default", "reviews.shop", "ratings.shop"]
            .into_iter()
            .map(String::from)
            .collect();
        for (range, want) in [
            (
                "10.96.0.0/12",
                ["10.107.1.140", "10.96.103.174", "10.104.219.181"],
            ),
            (
                "fd00::/64",
                [
                    "fd00::15c:effa:c3e6:3550",
                    "fd00::835e:c9c0:945a:d9ba",
                    "fd00::c04a:c454:2b7d:2ad5",
                ],
            ),
        ] {
            let range = Cidr::parse(range).unwrap();
            let got = allocate(range, &keys, &BTreeSet::new());
            let got: Vec<String> = got
                .values()
                .map(|ip| ip.map_or_else(|| "none".to_owned(), |ip| ip.to_string()))
                .collect();
            assert_eq!(got, want, "{range}");
        }
    }
}
