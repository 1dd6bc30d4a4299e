//! Which addresses a webhook may be sent to (SSRF). A receiver's URL is the customer's, so aiq
//! must not be made to post to its own network: private, loopback, link-local (the cloud
//! metadata address 169.254.169.254 among them), unspecified, multicast, broadcast and reserved
//! addresses, shared address space (CGNAT, 100.64/10), and the IPv6 forms of IPv4 ones, are
//! refused unless `AIQ_WEBHOOK_ALLOW_NETS` names them. The check is made on the address that
//! is connected to: literal addresses before the request, names in the HTTP client's resolver
//! ([`CheckedResolver`]), which hands the connector only the addresses it allowed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// A network in CIDR notation, e.g. `127.0.0.1/32` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// Parses `a.b.c.d/n` or `x::y/n`; a bare address is its own /32 or /128.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or network like 10.1.0.0/16"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has a prefix length that is not 0-{max}"))?,
        };
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is inside this network (an IPv4-mapped IPv6 address counts as its IPv4
    /// address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.holds(ip) || self.holds(ip.to_canonical())
    }

    fn holds(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses a comma-separated list of networks (`AIQ_WEBHOOK_ALLOW_NETS`).
pub fn parse_nets(s: &str) -> Result<Vec<Net>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .take(1000)
        .map(Net::parse)
        .collect()
}

fn v4_forbidden(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        // "This network" (0/8), shared address space (100.64/10), reserved (240/4).
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || a >= 240
}

/// Whether `ip` is an address no webhook goes to unless the operator allows it.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_forbidden(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_forbidden(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return v4_forbidden(Ipv4Addr::from(u128::from(v6) as u32));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                // Deprecated site-local (fec0::/10) and IPv4-compatible (::/96) addresses.
                || (s[0] & 0xffc0) == 0xfec0
                || s[..6] == [0; 6]
        }
    }
}

/// The addresses webhooks may go to: every public one, and those of the allowed networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    allow: Vec<Net>,
}

impl AddressPolicy {
    pub fn new(allow: Vec<Net>) -> Self {
        Self { allow }
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_forbidden(ip) || self.allow.iter().any(|n| n.contains(ip))
    }

    /// The refusal of a URL's address, when it is a literal one that is not permitted (a name
    /// is checked when it is resolved), or when the URL is not one aiq posts to.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("must be an http:// or https:// URL".into());
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("must not carry a user name or password".into());
        }
        let ip = match parsed.host() {
            None => return Err("has no host".into()),
            Some(url::Host::Domain(_)) => return Ok(()),
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
        };
        if self.permits(ip) {
            Ok(())
        } else {
            Err(format!(
                "names {ip}, a private, loopback, link-local or reserved address (AIQ_WEBHOOK_ALLOW_NETS can allow it)"
            ))
        }
    }
}

/// The HTTP client's resolver: the system's answer, with the addresses the policy refuses
/// taken out; a name left with none fails to connect, naming why.
pub struct CheckedResolver {
    pub policy: Arc<AddressPolicy>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| policy.permits(a.ip()))
                .collect();
            if allowed.is_empty() {
                let shown: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
                return Err(format!(
                    "{host} resolves to no address webhooks may go to ({}): private, loopback, link-local and reserved addresses are refused unless AIQ_WEBHOOK_ALLOW_NETS allows them",
                    shown.join(", ")
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    fn v6(bits: u128) -> Ipv6Addr {
        Ipv6Addr::from(bits)
    }

    /// The refused ranges, written out as CIDR text: the independent check the policy's code
    /// is held to.
    const REFUSED: &[&str] = &[
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/96",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    ];

    /// Bits and prefix of a CIDR text, computed by hand (not through [`Net`]).
    fn in_range(ip: IpAddr, cidr: &str) -> bool {
        let (a, p) = cidr.split_once('/').unwrap();
        let p: u32 = p.parse().unwrap();
        match (a.parse::<IpAddr>().unwrap(), ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let shift = 32 - p;
                (u32::from(n) as u64 >> shift) == (u32::from(i) as u64 >> shift)
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let shift = 128 - p;
                if shift == 128 {
                    return true;
                }
                (u128::from(n) >> shift) == (u128::from(i) >> shift)
            }
            _ => false,
        }
    }

    fn expected_refused(ip: IpAddr) -> bool {
        let direct = REFUSED.iter().any(|c| in_range(ip, c));
        let embedded = match ip {
            IpAddr::V6(v) => {
                let bits = u128::from(v);
                let v4 = IpAddr::V4(Ipv4Addr::from(bits as u32));
                let mapped = bits >> 32 == 0xffff;
                let nat64 = bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000;
                (mapped || nat64) && REFUSED.iter().any(|c| in_range(v4, c))
            }
            IpAddr::V4(_) => false,
        };
        direct || embedded
    }

    #[test]
    fn a_table_of_addresses_is_refused_or_allowed_as_the_ranges_say() {
        let refused = [
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
        ];
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ];
        let policy = AddressPolicy::default();
        for a in refused {
            let ip: IpAddr = a.parse().unwrap();
            assert!(!policy.permits(ip), "{a} must be refused");
            assert!(
                expected_refused(ip),
                "{a}: the table and the ranges disagree"
            );
        }
        for a in allowed {
            let ip: IpAddr = a.parse().unwrap();
            assert!(policy.permits(ip), "{a} must be allowed");
        }
    }

    #[test]
    fn an_allowed_network_lets_its_addresses_through_and_no_others() {
        let policy = AddressPolicy::new(parse_nets("127.0.0.1/32, fd00::/8").unwrap());
        assert!(policy.permits("127.0.0.1".parse().unwrap()));
        assert!(policy.permits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!policy.permits("127.0.0.2".parse().unwrap()));
        assert!(policy.permits("fd00::5".parse().unwrap()));
        assert!(!policy.permits("fc00::5".parse().unwrap()));
        assert!(!policy.permits("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn urls_with_literal_private_addresses_are_refused_and_names_wait_for_resolution() {
        let policy = AddressPolicy::default();
        for url in [
            "http://127.0.0.1:8080/x",
            "https://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[::ffff:7f00:1]/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://127.1/",
            "http://user:pw@example.com/",
            "ftp://example.com/",
            "http://[::1/",
        ] {
            assert!(policy.check_url(url).is_err(), "{url}");
        }
        for url in [
            "https://example.com/hook",
            "http://8.8.8.8/x",
            "https://localhost/",
        ] {
            assert!(policy.check_url(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn networks_parse_or_are_refused_with_a_reason() {
        assert_eq!(Net::parse("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(Net::parse("::1").unwrap().to_string(), "::1/128");
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "nope",
            "10.0.0.0/",
            "/8",
            "10.0.0.0/-1",
        ] {
            assert!(Net::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_a_name_that_resolves_only_to_loopback() {
        use reqwest::dns::Resolve;
        let r = CheckedResolver {
            policy: Arc::new(AddressPolicy::default()),
        };
        let err = r.resolve("localhost".parse().unwrap()).await.err().unwrap();
        assert!(
            err.to_string().contains("no address webhooks may go to"),
            "{err}"
        );
        let allowing = CheckedResolver {
            policy: Arc::new(AddressPolicy::new(
                parse_nets("127.0.0.0/8, ::1/128").unwrap(),
            )),
        };
        let addrs: Vec<SocketAddr> = allowing
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    fn any_ip() -> impl Strategy<Value = IpAddr> {
        let v4 = any::<u32>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b)));
        // Near the interesting prefixes too: mapped, NAT64, ULA, link-local, multicast.
        let v6 = prop_oneof![
            any::<u128>().prop_map(v6),
            any::<u32>().prop_map(|b| v6(0xffff_0000_0000 | u128::from(b))),
            any::<u32>().prop_map(|b| v6((0x0064_ff9b_u128 << 96) | u128::from(b))),
            (0u16..=0xffff, any::<u128>())
                .prop_map(|(top, rest)| v6((u128::from(top) << 112) | (rest >> 16))),
        ]
        .prop_map(IpAddr::V6);
        prop_oneof![v4, v6]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn the_policy_refuses_exactly_the_refused_ranges(ip in any_ip()) {
            prop_assert_eq!(is_forbidden(ip), expected_refused(ip), "{}", ip);
        }

        #[test]
        fn an_allowed_network_contains_what_its_bits_say(ip in any_ip(), prefix in 0u8..=128) {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let prefix = prefix.min(max);
            let net = Net::parse(&format!("{ip}/{prefix}")).unwrap();
            prop_assert!(net.contains(ip));
            prop_assert!(in_range(ip, &net.to_string()));
        }

        #[test]
        fn network_lists_never_panic(s in "[0-9a-f:./, ]{0,40}") {
            let _ = parse_nets(&s);
        }

        /// Any text as a URL: checked without a panic, and never allowed when its host is a
        /// literal address the policy refuses.
        #[test]
        fn any_url_is_checked_without_panicking(
            scheme in prop::sample::select(vec!["http://", "https://", "ftp://", ""]),
            host in prop_oneof![
                any_ip().prop_map(|ip| match ip { IpAddr::V6(v) => format!("[{v}]"), v => v.to_string() }),
                "[a-z0-9.@:\\[\\]%-]{0,30}",
            ],
            rest in "[ -~]{0,20}",
        ) {
            let url = format!("{scheme}{host}{rest}");
            let verdict = AddressPolicy::default().check_url(&url);
            let literal = url::Url::parse(&url).ok().and_then(|u| match u.host() {
                Some(url::Host::Ipv4(v)) => Some(IpAddr::V4(v)),
                Some(url::Host::Ipv6(v)) => Some(IpAddr::V6(v)),
                _ => None,
            });
            if let Some(ip) = literal.filter(|ip| is_forbidden(*ip)) {
                prop_assert!(verdict.is_err(), "{} ({}) was allowed", url, ip);
            }
        }
    }
}
