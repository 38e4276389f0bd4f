//! Flow keys for tests, unit tests, integration tests and benches alike
//! (the `test-util` feature, as aya's `test-helpers`).
//!
//! Why here, in `ntm-common`, and not in the agent: [`FlowKey`] is defined
//! here, so its short constructors ([`FlowKey::v4_tcp`] and the like) can
//! only be inherent functions of this crate, and every crate that writes
//! keys (the agent's unit tests, its integration tests and benches) already
//! depends on it. Nothing here needs `std` (addresses are `core::net`), so
//! the crate stays `no_std` with the feature on; but only the agent's
//! dev-dependency on this crate turns it on (`cargo test`, `cargo bench`),
//! so neither the kernel object nor the released agent carries it.
//!
//! ```
//! use ntm_common::{Hook, FlowKey, test_util::KeyBuilder};
//! let key = KeyBuilder::v4([198, 18, 0, 1], [198, 18, 0, 2])
//!     .udp(53)
//!     .ifindex(2)
//!     .hook(Hook::Egress)
//!     .build();
//! assert_eq!(key.port, 53);
//! assert_eq!(
//!     FlowKey::v4_tcp([198, 18, 0, 1], [198, 18, 0, 2], 443),
//!     KeyBuilder::v4([198, 18, 0, 1], [198, 18, 0, 2]).tcp(443).build()
//! );
//! ```

use core::net::{Ipv4Addr, Ipv6Addr};

use crate::{FlowKey, Hook, family, ipproto, key_flags};

/// A [`FlowKey`], field by field; every field not set is zero (as in
/// `FlowKey::default()`: no family, interface 0, ingress, untagged).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct KeyBuilder(FlowKey);

impl KeyBuilder {
    /// A key with every field zero, to set the few a test cares about.
    pub fn new() -> Self {
        Self::default()
    }

    /// An IPv4 flow from `src` to `dst` (`[u8; 4]`, `u32` or `Ipv4Addr`).
    pub fn v4(src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>) -> Self {
        let mut key = FlowKey {
            family: family::IPV4,
            ..FlowKey::default()
        };
        key.src[..4].copy_from_slice(&src.into().octets());
        key.dst[..4].copy_from_slice(&dst.into().octets());
        Self(key)
    }

    /// An IPv6 flow from `src` to `dst` (`[u8; 16]` or `Ipv6Addr`).
    pub fn v6(src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>) -> Self {
        Self(FlowKey {
            family: family::IPV6,
            src: src.into().octets(),
            dst: dst.into().octets(),
            ..FlowKey::default()
        })
    }

    /// A non-IP frame, counted by its EtherType.
    pub fn non_ip(ethertype: u16) -> Self {
        Self(FlowKey {
            family: family::NON_IP,
            port: ethertype,
            ..FlowKey::default()
        })
    }

    /// The IP protocol number (the port stays as it is).
    pub fn proto(mut self, proto: u8) -> Self {
        self.0.proto = proto;
        self
    }

    /// The service port (or ICMP type, or EtherType: see [`FlowKey::port`]).
    pub fn port(mut self, port: u16) -> Self {
        self.0.port = port;
        self
    }

    /// TCP to service port `port`.
    pub fn tcp(self, port: u16) -> Self {
        self.proto(ipproto::TCP).port(port)
    }

    /// UDP to service port `port`.
    pub fn udp(self, port: u16) -> Self {
        self.proto(ipproto::UDP).port(port)
    }

    /// ICMP (for IPv4) of message type `kind`.
    pub fn icmp(self, kind: u16) -> Self {
        self.proto(ipproto::ICMP).port(kind)
    }

    /// ICMPv6 of message type `kind`.
    pub fn icmpv6(self, kind: u16) -> Self {
        self.proto(ipproto::ICMPV6).port(kind)
    }

    /// The interface index the frame was seen on.
    pub fn ifindex(mut self, ifindex: u32) -> Self {
        self.0.ifindex = ifindex;
        self
    }

    /// The outermost VLAN id.
    pub fn vlan(mut self, vlan_id: u16) -> Self {
        self.0.vlan_id = vlan_id;
        self
    }

    /// The hook that saw the frame.
    pub fn hook(mut self, hook: Hook) -> Self {
        self.0.hook = hook as u8;
        self
    }

    /// The [`key_flags`] bits, all of them.
    pub fn flags(mut self, flags: u8) -> Self {
        self.0.flags = flags;
        self
    }

    /// [`key_flags::L4_MISSING`]: a protocol with ports, a frame without them.
    pub fn l4_missing(mut self) -> Self {
        self.0.flags |= key_flags::L4_MISSING;
        self
    }

    /// [`key_flags::SERVICE_PORT_IS_SRC`]: the frame is the server's, its
    /// source port the service port.
    pub fn from_server(mut self) -> Self {
        self.0.flags |= key_flags::SERVICE_PORT_IS_SRC;
        self
    }

    /// The family (one of [`family`]), keeping the address bytes as they are.
    pub fn family(mut self, family: u8) -> Self {
        self.0.family = family;
        self
    }

    pub fn build(self) -> FlowKey {
        self.0
    }
}

impl From<KeyBuilder> for FlowKey {
    fn from(builder: KeyBuilder) -> Self {
        builder.build()
    }
}

/// The common cases in one call (interface 0, ingress, untagged).
impl FlowKey {
    /// IPv4 TCP from `src` to `dst`, service port `port`.
    pub fn v4_tcp(src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>, port: u16) -> Self {
        KeyBuilder::v4(src, dst).tcp(port).build()
    }

    /// IPv4 UDP from `src` to `dst`, service port `port`.
    pub fn v4_udp(src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>, port: u16) -> Self {
        KeyBuilder::v4(src, dst).udp(port).build()
    }

    /// IPv6 TCP from `src` to `dst`, service port `port`.
    pub fn v6_tcp(src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>, port: u16) -> Self {
        KeyBuilder::v6(src, dst).tcp(port).build()
    }

    /// IPv6 UDP from `src` to `dst`, service port `port`.
    pub fn v6_udp(src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>, port: u16) -> Self {
        KeyBuilder::v6(src, dst).udp(port).build()
    }

    /// A builder starting from this key (to change a field or two).
    pub fn to_builder(self) -> KeyBuilder {
        KeyBuilder(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_key_equals_the_literal() {
        let mut literal = FlowKey {
            family: family::IPV4,
            proto: ipproto::UDP,
            port: 53,
            ifindex: 2,
            vlan_id: 7,
            hook: Hook::Egress as u8,
            flags: key_flags::L4_MISSING,
            ..FlowKey::default()
        };
        literal.src[..4].copy_from_slice(&[198, 18, 0, 1]);
        literal.dst[..4].copy_from_slice(&[198, 18, 0, 2]);
        let built = KeyBuilder::v4([198, 18, 0, 1], 0xC612_0002u32)
            .udp(53)
            .ifindex(2)
            .vlan(7)
            .hook(Hook::Egress)
            .l4_missing()
            .build();
        assert_eq!(built, literal);
        assert_eq!(built.src_addr(), "198.18.0.1".parse().ok());
        assert_eq!(built.dst_addr(), "198.18.0.2".parse().ok());
    }

    #[test]
    fn short_constructors_and_other_families() {
        let a: Ipv6Addr = "2001:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:2::2".parse().unwrap();
        let key = FlowKey::v6_udp(a, b.octets(), 443);
        assert_eq!(
            (key.family, key.proto, key.port),
            (family::IPV6, ipproto::UDP, 443)
        );
        assert_eq!(key.dst_addr(), Some(b.into()));
        assert_eq!(FlowKey::v6_tcp(a, b, 22).proto, ipproto::TCP);
        assert_eq!(FlowKey::v4_tcp([1, 1, 1, 1], [2, 2, 2, 2], 22).proto, 6);
        let arp = KeyBuilder::non_ip(0x0806).build();
        assert_eq!((arp.family, arp.port, arp.src_addr()), (0, 0x0806, None));
        assert_eq!(KeyBuilder::new().build(), FlowKey::default());
        let icmp = KeyBuilder::v4([1, 1, 1, 1], [2, 2, 2, 2]).icmp(8).build();
        assert_eq!((icmp.proto, icmp.port), (ipproto::ICMP, 8));
        assert_eq!(
            icmp.to_builder().port(0).flags(0).build(),
            FlowKey { port: 0, ..icmp }
        );
    }
}
