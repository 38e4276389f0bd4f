//! The labels a traffic series may carry (`--labels`), and what a name
//! from outside must be to stand as a label's value.

use std::str::FromStr;

/// The labels ntm can put on its traffic counters, in exposition order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Label {
    Src,
    Dst,
    Service,
    Proto,
    Direction,
    Iface,
    Vlan,
}

impl Label {
    pub const ALL: [Label; 7] = [
        Label::Src,
        Label::Dst,
        Label::Service,
        Label::Proto,
        Label::Direction,
        Label::Iface,
        Label::Vlan,
    ];
    /// Default set: the old tool's four plus direction and interface.
    pub const DEFAULT: [Label; 6] = [
        Label::Src,
        Label::Dst,
        Label::Service,
        Label::Proto,
        Label::Direction,
        Label::Iface,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Label::Src => "src",
            Label::Dst => "dst",
            Label::Service => "service",
            Label::Proto => "proto",
            Label::Direction => "direction",
            Label::Iface => "iface",
            Label::Vlan => "vlan",
        }
    }
}

impl FromStr for Label {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Label::ALL
            .into_iter()
            .find(|l| l.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown label {s:?}; choose from {}",
                    Label::ALL.map(Label::name).join(", ")
                )
            })
    }
}

/// A DNS name's longest text form.
const MAX_NAME_LEN: usize = 253;

/// A name that can stand as a label: not empty, not too long, no
/// whitespace or control characters. (Quotes and markup are allowed here:
/// every output escapes its labels.)
pub fn usable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}
