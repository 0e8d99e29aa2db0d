//! Do the interception rules reach this node's pods? The rules match the interfaces
//! pods' traffic arrives on by name (`--interface`), and a pattern that misses some of them
//! leaves those pods a way to the node's own metadata service: a pattern written for
//! another CNI, mistyped, or missing a kind of interface the CNI makes. The agent cannot see
//! which interface a pod sends from, but the kernel's routes say which one leads to it: for
//! each pod of its table, the most specific route to each of its addresses (IPv4: the main
//! table, which `/proc/net/route` lists; IPv6: every table `/proc/net/ipv6_route` lists)
//! names the interface, and that name is checked against the patterns.
//!
//! What it cannot judge is skipped: the node's own addresses (host-network pods); addresses
//! the tables route only through a gateway, or through the interface of the node's own
//! address (their pods' routes are in another table: the VPC CNI routes pods with security
//! groups of their own so, through `vlan…` interfaces this check therefore does not see);
//! and interfaces a pod sends through without being routed to (the VPC CNI's IPv4 egress
//! interface of pods on IPv6 clusters). So 0 says the pods it can judge are intercepted, not
//! every interface; the check catches a pattern for the wrong CNI or a typo.
//!
//! What it finds is exported (`podiam_agent_pods_not_intercepted`) and each interface named
//! once in the log; nothing is refused, since a route may lead elsewhere on purpose (eBPF
//! datapaths that skip iptables altogether, say).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

/// Whether `interface` matches `pattern` as iptables' `-i` does: a name, a prefix ending
/// in `+`, either negated with a leading `!`.
pub fn matches(pattern: &str, interface: &str) -> bool {
    let (negated, pattern) = match pattern.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let matched = match pattern.strip_suffix('+') {
        Some(prefix) => interface.starts_with(prefix),
        None => interface == pattern,
    };
    matched != negated
}

/// Whether any of `patterns` matches `interface` (the jumps are one per pattern).
pub fn intercepted(patterns: &[String], interface: &str) -> bool {
    patterns.iter().any(|pattern| matches(pattern, interface))
}

/// The most specific route to an address: its interface, and whether it goes through a
/// gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub interface: String,
    pub via_gateway: bool,
}

/// `RTF_GATEWAY` and `RTF_REJECT` in the kernel's route flags.
const RTF_GATEWAY: u32 = 0x2;
const RTF_REJECT: u32 = 0x200;

/// One route as the kernel lists it: a network (an IPv4 one as its IPv4-mapped IPv6
/// address) and its prefix length, the metric, where it leads.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    v4: bool,
    network: u128,
    prefix: u32,
    metric: u32,
    route: Route,
}

impl Entry {
    fn holds(&self, address: u128) -> bool {
        let mask = u128::MAX.checked_shl(128 - self.prefix).unwrap_or(0);
        address & mask == self.network & mask
    }
}

/// An address as the entries hold it.
fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(ip) => u128::from_be_bytes(ip.to_ipv6_mapped().octets()),
        IpAddr::V6(ip) => u128::from_be_bytes(ip.octets()),
    }
}

/// The routes of `/proc/net/route`'s text (IPv4's main table; fields hexadecimal, addresses
/// in the host's byte order). Blackhole, unreachable and prohibit routes lead nowhere and are
/// left out.
fn parse_v4(table: &str) -> Vec<Entry> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (interface, destination, mask) = (fields.first()?, fields.get(1)?, fields.get(7)?);
            let destination = u32::from_str_radix(destination, 16).ok()?;
            let mask = u32::from_str_radix(mask, 16).ok()?;
            let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
            let metric: u32 = fields.get(6)?.parse().ok()?;
            if *interface == "*" || flags & RTF_REJECT != 0 {
                return None;
            }
            let network = Ipv4Addr::from(destination.to_ne_bytes());
            Some(Entry {
                v4: true,
                network: key(network.into()),
                prefix: 96 + u32::from_be(mask).leading_ones(),
                metric,
                route: Route {
                    interface: interface.to_string(),
                    via_gateway: flags & RTF_GATEWAY != 0,
                },
            })
        })
        .collect()
}

/// The routes of `/proc/net/ipv6_route`'s text (destination, prefix length, source, its
/// length, next hop, metric, references, use, flags, interface; all hexadecimal), of every
/// table. Left out: routes that lead nowhere (the loopback's, rejecting ones) and routes for
/// one source only.
fn parse_v6(table: &str) -> Vec<Entry> {
    table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != "00" || fields[9] == "lo" {
                return None;
            }
            let flags = u32::from_str_radix(fields[8], 16).ok()?;
            if flags & RTF_REJECT != 0 {
                return None;
            }
            Some(Entry {
                v4: false,
                network: u128::from_str_radix(fields[0], 16).ok()?,
                prefix: u32::from_str_radix(fields[1], 16).ok()?.min(128),
                metric: u32::from_str_radix(fields[5], 16).ok()?,
                route: Route {
                    interface: fields[9].to_string(),
                    via_gateway: u128::from_str_radix(fields[4], 16).ok()? != 0,
                },
            })
        })
        .collect()
}

/// The routes the kernel lists, read once per check.
#[derive(Debug, Default)]
pub struct Routes(Vec<Entry>);

impl Routes {
    /// The tables' texts as `/proc/net/route` and `/proc/net/ipv6_route` print them.
    pub fn parse(v4: &str, v6: &str) -> Routes {
        let mut entries = parse_v4(v4);
        entries.extend(parse_v6(v6));
        Routes(entries)
    }

    /// The kernel's routes now; an error if IPv4's cannot be read (IPv6's may be missing).
    pub fn read() -> std::io::Result<Routes> {
        let v4 = std::fs::read_to_string("/proc/net/route")?;
        let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
        Ok(Routes::parse(&v4, &v6))
    }

    /// The most specific route to `ip` (of two as specific, the lower metric).
    pub fn route_to(&self, ip: IpAddr) -> Option<&Route> {
        let address = key(ip);
        let v4 = matches!(ip, IpAddr::V4(_));
        self.0
            .iter()
            .filter(|entry| entry.v4 == v4 && entry.holds(address))
            .max_by(|a, b| a.prefix.cmp(&b.prefix).then(b.metric.cmp(&a.metric)))
            .map(|entry| &entry.route)
    }
}

/// Of `pods` (each pod's addresses), those with an address whose route leads through an
/// interface no pattern matches, counted, with those interfaces' names. Addresses of the
/// node's own (`own`: host-network pods) are skipped, as are addresses routed through a
/// gateway or through the interface of one of the node's addresses: their pods' routes are
/// in another table, and nothing can be said of them.
pub fn not_intercepted(
    pods: &[Vec<IpAddr>],
    own: &[IpAddr],
    routes: &Routes,
    patterns: &[String],
) -> (usize, Vec<String>) {
    let nodes: Vec<&str> = own
        .iter()
        .filter_map(|ip| routes.route_to(*ip))
        .map(|route| route.interface.as_str())
        .collect();
    let mut interfaces: Vec<String> = Vec::new();
    let mut pods_missed = 0;
    for addresses in pods {
        let mut missed = false;
        for ip in addresses.iter().filter(|ip| !own.contains(ip)) {
            let Some(route) = routes.route_to(*ip) else {
                continue;
            };
            let interface = route.interface.as_str();
            if route.via_gateway || nodes.contains(&interface) || intercepted(patterns, interface) {
                continue;
            }
            missed = true;
            if !interfaces.iter().any(|i| i == interface) {
                interfaces.push(interface.to_string());
            }
        }
        pods_missed += usize::from(missed);
    }
    (pods_missed, interfaces)
}

/// Interfaces already named in the log (at most this many are remembered; later ones are
/// counted only).
const NAMED_AT_MOST: usize = 256;

/// The log's memory of interfaces named.
#[derive(Debug, Default)]
pub struct Named(HashSet<String>);

impl Named {
    /// Whether `interface` is to be named now (the first time).
    pub fn first_time(&mut self, interface: &str) -> bool {
        self.0.len() < NAMED_AT_MOST && self.0.insert(interface.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    #[test]
    fn patterns_match_as_iptables_does() {
        for (pattern, interface, expected) in [
            ("cali+", "cali12ab", true),
            ("cali+", "eni12ab", false),
            ("cni0", "cni0", true),
            ("cni0", "cni01", false),
            ("!lo", "vethab12", true),
            ("!lo", "lo", false),
            ("!eth+", "eth0", false),
            ("!eth+", "eni3", true),
            ("+", "anything", true),
        ] {
            assert_eq!(
                matches(pattern, interface),
                expected,
                "{pattern} {interface}"
            );
        }
        let patterns = ["eni+".to_string(), "vlan+".to_string()];
        assert!(intercepted(&patterns, "vlan7f"));
        assert!(!intercepted(&patterns, "veth7f"));
    }

    /// An address or mask as `/proc/net/route` prints it: its bytes in network order, read
    /// as a number in the host's.
    fn hex(octets: [u8; 4]) -> String {
        format!("{:08X}", u32::from_ne_bytes(octets))
    }

    /// `/proc/net/route` as a VPC CNI node shows it.
    fn routes_v4() -> String {
        let mut table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
                .to_string();
        for (interface, destination, gateway, flags, mask) in [
            ("eth0", [0, 0, 0, 0], [10, 0, 0, 1], "0003", [0, 0, 0, 0]),
            (
                "eth0",
                [10, 0, 0, 0],
                [0, 0, 0, 0],
                "0001",
                [255, 255, 0, 0],
            ),
            ("eni1a2b", [10, 0, 0, 5], [0, 0, 0, 0], "0005", [255; 4]),
            ("vlan9c", [10, 0, 0, 6], [0, 0, 0, 0], "0005", [255; 4]),
            (
                "tun0",
                [10, 1, 0, 0],
                [10, 0, 0, 1],
                "0003",
                [255, 255, 0, 0],
            ),
            (
                "*",
                [10, 2, 0, 0],
                [0, 0, 0, 0],
                "0201",
                [255, 255, 255, 192],
            ),
        ] {
            table.push_str(&format!(
                "{interface}\t{}\t{}\t{flags}\t0\t0\t0\t{}\t0\t0\t0\n",
                hex(destination),
                hex(gateway),
                hex(mask)
            ));
        }
        table
    }

    #[test]
    fn the_most_specific_route_names_the_interface() {
        let ip = |o: [u8; 4]| IpAddr::from(Ipv4Addr::from(o));
        let routes = Routes::parse(&routes_v4(), ROUTES_V6);
        let on = |interface: &str, via_gateway| {
            Some(Route {
                interface: interface.into(),
                via_gateway,
            })
        };
        let route = |ip| routes.route_to(ip).cloned();
        assert_eq!(route(ip([10, 0, 0, 5])), on("eni1a2b", false));
        assert_eq!(route(ip([10, 0, 0, 6])), on("vlan9c", false));
        assert_eq!(route(ip([10, 0, 0, 7])), on("eth0", false));
        assert_eq!(route(ip([8, 8, 8, 8])), on("eth0", true));
        assert_eq!(route(ip([10, 1, 2, 3])), on("tun0", true));
        // Calico's blackhole for its block leads nowhere: a pod whose own route is gone is
        // not judged by it.
        assert_eq!(route(ip([10, 2, 0, 9])), on("eth0", true));
        let v6 = |text: &str| IpAddr::from(text.parse::<Ipv6Addr>().expect("an address"));
        assert_eq!(route(v6("fd00::5")), on("eni1a2b", false));
        assert_eq!(route(v6("fd00::6")), on("eth0", false));
        // Not the rejecting route, the source-specific one or the loopback's.
        assert_eq!(route(v6("fd00::7")), on("eth0", false));
        assert_eq!(route(v6("fd00::8")), on("eth0", false));
        // An IPv6 /128 is not taken for an IPv4 route, nor the reverse.
        assert_eq!(route(v6("::ffff:10.0.0.5")), None);
    }

    /// `/proc/net/ipv6_route`: the node's /64 on eth0, a pod's /128 on eni1a2b, an
    /// unreachable /128, a source-specific /128 and a local route on lo.
    const ROUTES_V6: &str = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
fd000000000000000000000000000005 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001  eni1a2b
fd000000000000000000000000000007 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00200200  eni77
fd000000000000000000000000000008 80 fd000000000000000000000000000001 80 00000000000000000000000000000000 00000400 00000001 00000000 00000001  eni88
fd000000000000000000000000000005 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 80200001       lo
";

    #[test]
    fn pods_behind_interfaces_no_pattern_matches_are_found_and_the_nodes_own_skipped() {
        let routes = Routes::parse(&routes_v4(), ROUTES_V6);
        // 10.0.0.9 is the node's; 10.0.0.7 is routed only through the node's own interface
        // (its route is in another table) and 10.1.2.3 through a gateway: nothing is said.
        // The pod at 10.0.0.6 has an IPv6 address too: one pod.
        let v4 = |o: [u8; 4]| IpAddr::from(Ipv4Addr::from(o));
        let v6: IpAddr = "fd00::6".parse().expect("an address");
        let pods = vec![
            vec![v4([10, 0, 0, 5])],
            vec![v4([10, 0, 0, 6]), v6],
            vec![v4([10, 0, 0, 9])],
            vec![v4([10, 0, 0, 7])],
            vec![v4([10, 1, 2, 3])],
        ];
        let own = [v4([10, 0, 0, 9])];
        let patterns = |p: &[&str]| p.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert_eq!(
            not_intercepted(&pods, &own, &routes, &patterns(&["eni+"])),
            (1, vec!["vlan9c".to_string()])
        );
        assert_eq!(
            not_intercepted(&pods, &own, &routes, &patterns(&["eni+", "vlan+"])),
            (0, vec![])
        );
        assert_eq!(
            not_intercepted(&pods, &own, &routes, &patterns(&["cali+"])),
            (2, vec!["eni1a2b".to_string(), "vlan9c".to_string()])
        );
        let mut named = Named::default();
        assert!(named.first_time("vlan9c"));
        assert!(!named.first_time("vlan9c"));
    }
}
