//! The service-port rule: which one of a packet's two ports names the service.
//!
//! A flow key carries one port only, the server-side one, so that the client's
//! ephemeral ports never multiply keys (or Prometheus series). The rule runs in
//! the kernel on every packet and in host unit tests; both use this code.
//!
//! Rule, for a packet with source port `s` and destination port `d`:
//! 1. If exactly one of them is a known service port, that one.
//! 2. If both are known, the lower one: a client that happens to use a
//!    registered port (6000 is x11) while talking to https still reads https,
//!    in both directions of the connection.
//! 3. If neither is known, the lower one when it is below the start of the
//!    ephemeral range (a server on an unregistered port, e.g. 8123); else none
//!    (0): two ephemeral ports (peer-to-peer, RTP) name no service.
//!
//! Known ports come from /etc/services plus the user's additions; the agent
//! writes them into the kernel's bitmap ([`known_port_bit`]) at load time.

/// Ports are known per protocol class, as /etc/services lists them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortClass {
    Tcp = 0,
    /// UDP and UDP-Lite share /etc/services' "udp" entries.
    Udp = 1,
    Sctp = 2,
}

impl PortClass {
    pub const COUNT: u32 = 3;

    /// The class of an IP protocol that has ports, or None.
    #[inline(always)]
    pub fn of_ipproto(proto: u8) -> Option<Self> {
        match proto {
            crate::ipproto::TCP => Some(Self::Tcp),
            crate::ipproto::UDP | crate::ipproto::UDPLITE => Some(Self::Udp),
            crate::ipproto::SCTP => Some(Self::Sctp),
            _ => None,
        }
    }
}

/// Start of the client ephemeral port range assumed when the agent is not told
/// otherwise: Linux's default `net.ipv4.ip_local_port_range` begins here (and
/// the IANA range, 49152, lies above it).
pub const DEFAULT_EPHEMERAL_START: u16 = 32_768;

/// Position of a port's bit in the known-port bitmap: (word index, bit mask).
/// The bitmap is [`crate::KNOWN_PORT_WORDS`] u32 words, 2048 per class.
#[inline(always)]
pub fn known_port_bit(class: PortClass, port: u16) -> (u32, u32) {
    let word = (class as u32) * (65_536 / 32) + (port as u32 / 32);
    (word, 1u32 << (port as u32 % 32))
}

/// Applies the rule described in the module docs. It asks about the lower
/// port first: a known lower port is the answer whether the higher one is
/// known or not, so the usual flow (a client's ephemeral port talking to a
/// well-known one) costs one `is_known` per packet, not two.
#[inline(always)]
pub fn choose(
    src_port: u16,
    dst_port: u16,
    ephemeral_start: u16,
    is_known: impl Fn(u16) -> bool,
) -> u16 {
    choose_with_side(src_port, dst_port, ephemeral_start, is_known).0
}

/// [`choose`], and whether the port chosen is the source port (the frame
/// is the server's): a port of 0 or two equal ports are no side. Each arm
/// knows which port it took, so the side costs the kernel's common frame a
/// constant per arm, where three compares after the choice took ten
/// instructions.
#[inline(always)]
pub fn choose_with_side(
    src_port: u16,
    dst_port: u16,
    ephemeral_start: u16,
    is_known: impl Fn(u16) -> bool,
) -> (u16, bool) {
    let src_lower = src_port < dst_port;
    let (lower, higher) = if src_lower {
        (src_port, dst_port)
    } else {
        (dst_port, src_port)
    };
    if is_known(lower) {
        (lower, src_lower && lower != 0)
    } else if is_known(higher) {
        // The higher port is the source one only where the source port is
        // the greater (so not 0).
        (higher, src_port > dst_port)
    } else if lower < ephemeral_start {
        (lower, src_lower && lower != 0)
    } else {
        (0, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [u16; 6] = [22, 53, 80, 443, 6000, 5353];
    fn known(p: u16) -> bool {
        KNOWN.contains(&p)
    }
    fn pick(s: u16, d: u16) -> u16 {
        choose(s, d, DEFAULT_EPHEMERAL_START, known)
    }

    #[test]
    fn server_port_wins_in_both_directions() {
        assert_eq!(pick(51_000, 443), 443);
        assert_eq!(pick(443, 51_000), 443);
        assert_eq!(pick(40_000, 22), 22);
    }

    #[test]
    fn registered_client_port_does_not_beat_the_server() {
        // The seed labelled this flow x11 in one direction.
        assert_eq!(pick(6000, 443), 443);
        assert_eq!(pick(443, 6000), 443);
    }

    #[test]
    fn unknown_server_port_below_ephemeral_range() {
        assert_eq!(pick(45_000, 8123), 8123);
        assert_eq!(pick(8123, 45_000), 8123);
        // A known port still wins over an unknown low port.
        assert_eq!(pick(8123, 53), 53);
    }

    #[test]
    fn two_ephemeral_ports_name_no_service() {
        assert_eq!(pick(50_000, 50_001), 0);
        assert_eq!(pick(32_768, 60_000), 0);
        assert_eq!(pick(32_767, 60_000), 32_767);
    }

    #[test]
    fn ephemeral_start_is_configurable() {
        assert_eq!(choose(50_000, 55_000, 60_000, known), 50_000);
        assert_eq!(choose(1_500, 2_000, 1_024, known), 0);
    }

    #[test]
    fn same_port_both_sides() {
        assert_eq!(pick(5353, 5353), 5353);
        assert_eq!(pick(123, 123), 123);
        assert_eq!(pick(40_000, 40_000), 0);
    }

    /// The rule as the module docs state it, both ports asked about.
    fn rule(s: u16, d: u16, ephemeral_start: u16, known: impl Fn(u16) -> bool) -> u16 {
        let lower = s.min(d);
        match (known(s), known(d)) {
            (true, false) => s,
            (false, true) => d,
            (true, true) => lower,
            (false, false) if lower < ephemeral_start => lower,
            (false, false) => 0,
        }
    }

    #[test]
    fn lower_port_first_gives_the_rule() {
        // Every pair of a spread of ports (known, unknown, either side of
        // the ephemeral start, equal), with two sets of known ports.
        let ports = [
            0, 1, 22, 53, 80, 123, 443, 5353, 6000, 8123, 32_767, 32_768, 40_000, 50_000, 65_535,
        ];
        let odd = |p: u16| p % 2 == 1;
        for s in ports {
            for d in ports {
                for start in [1_024, DEFAULT_EPHEMERAL_START, 60_000] {
                    assert_eq!(
                        choose(s, d, start, known),
                        rule(s, d, start, known),
                        "{s} {d}"
                    );
                    assert_eq!(choose(s, d, start, odd), rule(s, d, start, odd), "{s} {d}");
                }
            }
        }
    }

    #[test]
    fn the_side_is_the_source_port_chosen() {
        let ports = [
            0, 1, 22, 53, 80, 123, 443, 5353, 6000, 8123, 32_767, 32_768, 40_000, 50_000, 65_535,
        ];
        let odd = |p: u16| p % 2 == 1;
        let all = |_: u16| true;
        for s in ports {
            for d in ports {
                for start in [1_024, DEFAULT_EPHEMERAL_START, 60_000] {
                    for is_known in [&known as &dyn Fn(u16) -> bool, &odd, &all] {
                        let port = choose(s, d, start, is_known);
                        // The kernel's rule for the side, as the full parse
                        // applies it after the choice.
                        let side = port != 0 && port == s && s != d;
                        assert_eq!(
                            choose_with_side(s, d, start, is_known),
                            (port, side),
                            "{s} {d} {start}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn zero_ports_stay_zero() {
        assert_eq!(pick(0, 0), 0);
    }

    #[test]
    fn bitmap_positions_are_disjoint_per_class() {
        assert_eq!(known_port_bit(PortClass::Tcp, 0), (0, 1));
        assert_eq!(known_port_bit(PortClass::Tcp, 33), (1, 2));
        assert_eq!(known_port_bit(PortClass::Tcp, 65_535), (2047, 1 << 31));
        assert_eq!(known_port_bit(PortClass::Udp, 0), (2048, 1));
        assert_eq!(known_port_bit(PortClass::Sctp, 65_535).0, 3 * 2048 - 1);
        assert_eq!(crate::KNOWN_PORT_WORDS, 3 * 2048);
    }

    #[test]
    fn port_classes() {
        assert_eq!(PortClass::of_ipproto(6), Some(PortClass::Tcp));
        assert_eq!(PortClass::of_ipproto(17), Some(PortClass::Udp));
        assert_eq!(PortClass::of_ipproto(136), Some(PortClass::Udp));
        assert_eq!(PortClass::of_ipproto(132), Some(PortClass::Sctp));
        assert_eq!(PortClass::of_ipproto(1), None);
    }
}
