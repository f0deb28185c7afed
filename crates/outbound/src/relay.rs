//! Who may relay to foreign recipients without authenticating.

use std::net::IpAddr;

/// Whether a client at `ip` on the relay port may send to any recipient:
/// only inside `relay_networks` (Postfix's permit_mynetworks). Everyone else
/// must authenticate first, or gets 554 5.7.1 for a foreign recipient, so
/// godwit is never an open relay. IPv4-mapped IPv6 clients are matched as
/// the IPv4 address they are.
pub fn relay_permitted(ip: IpAddr, networks: &[ipnet::IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    networks.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_table() {
        let nets: Vec<ipnet::IpNet> = ["127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        for (ip, want) in [
            ("127.0.0.1", true),
            ("127.0.0.2", false),
            ("10.200.1.1", true),
            ("11.0.0.1", false),
            ("2001:db8::25", true),
            ("2001:db9::25", false),
            ("::ffff:10.1.1.1", true),
            ("::ffff:192.0.2.1", false),
        ] {
            assert_eq!(relay_permitted(ip.parse().unwrap(), &nets), want, "{ip}");
        }
        assert!(!relay_permitted("127.0.0.1".parse().unwrap(), &[]));
    }
}
