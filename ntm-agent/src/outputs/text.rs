//! The Prometheus text exposition format, written straight into the body:
//! a family's `# HELP` and `# TYPE` lines, escaped label values, integer
//! sample values.
//!
//! ntm's two families with a series per flow or per host (the traffic
//! series and `<prefix>_host_info`) are written with these rather than by
//! the `prometheus` crate, whose `gather` copies every series into owned
//! label pairs and sorts them on each scrape: at 100k series that copy was
//! most of a scrape's time and of the agent's memory (see
//! `docs/performance.md`). The output is the crate's, byte for byte: the
//! same escaping, the same number format for integers.

use std::{fmt, net::IpAddr};

/// `# HELP name help` and `# TYPE name kind` (`counter`, `gauge`), the help
/// escaped as the format wants (backslash and newline).
pub fn family_header(out: &mut String, name: &str, help: &str, kind: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    escape(help, false, out);
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind);
    out.push('\n');
}

/// A label value, escaped: backslash, double quote, newline. Values can
/// come from DNS answers and DHCP host names, so this is not optional.
pub fn label_value(value: &str, out: &mut String) {
    escape(value, true, out);
}

/// An integer sample value, as `Display` writes it (and as the crate
/// writes a whole `f64` such as a gauge's 1).
pub fn integer(value: u64, out: &mut String) {
    out.push_str(itoa::Buffer::new().format(value));
}

/// A MAC address as ntm writes it everywhere: lower-case hex, colons.
pub fn mac(mac: [u8; 6], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [b':'; 17];
    for (i, byte) in mac.iter().enumerate() {
        text[3 * i] = HEX[usize::from(byte >> 4)];
        text[3 * i + 1] = HEX[usize::from(byte & 0xf)];
    }
    // Hex digits and colons: always text.
    out.push_str(std::str::from_utf8(&text).unwrap_or_default());
}

/// An address as `IpAddr`'s `Display` writes it, into a body or a sort
/// key without a `String` of its own (IPv4 directly, its four numbers;
/// IPv6 through `Display`, for its rules of zero compression and embedded
/// IPv4).
pub fn address(ip: IpAddr, out: &mut impl fmt::Write) -> fmt::Result {
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.write_char('.')?;
                }
                out.write_str(digits.format(octet))?;
            }
            Ok(())
        }
        IpAddr::V6(_) => write!(out, "{ip}"),
    }
}

fn escape(value: &str, quote: bool, out: &mut String) {
    // Almost every value needs no escaping: one pass over its bytes (a
    // label value is a few to a few tens of bytes, too short for a
    // vectorised search to pay), one copy.
    let special = |b: &u8| matches!(b, b'\\' | b'\n') || (quote && *b == b'"');
    let Some(first) = value.as_bytes().iter().position(special) else {
        out.push_str(value);
        return;
    };
    out.push_str(&value[..first]);
    for c in value[first..].chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' if quote => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_the_formats() {
        let mut out = String::new();
        label_value("evil\"} 1\nfake_metric 2\\", &mut out);
        assert_eq!(out, r#"evil\"} 1\nfake_metric 2\\"#);
        let mut out = String::new();
        family_header(&mut out, "m", "a \"quoted\" \\ help\nline", "gauge");
        assert_eq!(
            out,
            "# HELP m a \"quoted\" \\\\ help\\nline\n# TYPE m gauge\n"
        );
    }

    #[test]
    fn numbers_macs_and_addresses() {
        let mut out = String::new();
        integer(u64::MAX, &mut out);
        out.push(' ');
        mac([0x02, 0xab, 0, 0x10, 0xff, 7], &mut out);
        out.push(' ');
        address("2001:db8::1".parse().unwrap(), &mut out).unwrap();
        assert_eq!(out, "18446744073709551615 02:ab:00:10:ff:07 2001:db8::1");
        for ip in [
            "0.0.0.0",
            "10.0.0.255",
            "192.168.100.7",
            "::ffff:1.2.3.4",
            "::",
        ] {
            let mut out = String::new();
            address(ip.parse().unwrap(), &mut out).unwrap();
            assert_eq!(out, ip);
        }
    }
}
