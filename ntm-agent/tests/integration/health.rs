//! Connection health (issue 26): what the tests of handshake latency,
//! failed connections and retransmissions stand on. A link with a known
//! delay and loss: this kernel has no netem, so a userspace delay line
//! (`kit::delay`) makes one; its fixture test shows it delays each way by
//! what it is given and drops exactly the frames its rule picks.

use std::time::Duration;

use crate::kit::{Netns, delay::DelayLine};

/// `ping`'s round trips from `from` to `to`: (sent, received, min ms).
fn ping(from: &Netns, to: &str, count: u32) -> (u32, u32, f64) {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", &from.name, "ping", "-n", "-i", "0.2", "-W", "1",
        ])
        .args(["-c", &count.to_string(), to])
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let number_before = |word: &str| -> u32 {
        let at = text
            .find(word)
            .unwrap_or_else(|| panic!("no {word:?} in {text}"));
        text[..at]
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count before {word:?} in {text}"))
    };
    let sent = number_before("packets transmitted");
    let received = number_before("received");
    // "rtt min/avg/max/mdev = 40.123/..."
    let min = text
        .split("= ")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|min| min.parse().ok())
        .unwrap_or(f64::NAN);
    (sent, received, min)
}

/// An ICMP echo request over IPv4 with an odd sequence number.
fn odd_echo_request(frame: &[u8], _: u64) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x00]
        && frame[23] == 1
        && frame[34] == 8
        && frame[41] & 1 == 1
}

pub fn the_delay_line_delays_each_way_and_drops_what_it_is_told() {
    let client = Netns::new("dlc");
    let server = Netns::new("dls");
    let line = DelayLine::new(
        "dl",
        (&client, "eth0"),
        (&server, "eth0"),
        Duration::from_millis(20),
    );
    client.exec(&["ip", "addr", "add", "198.18.80.1/24", "dev", "eth0"]);
    server.exec(&["ip", "addr", "add", "198.18.80.2/24", "dev", "eth0"]);
    let (sent, received, min) = ping(&client, "198.18.80.2", 5);
    assert_eq!((sent, received), (5, 5));
    // 20 ms each way; the threads' own time on top is well under 10 ms.
    assert!((40.0..50.0).contains(&min), "round trip {min} ms");
    assert_eq!(line.dropped(), 0);
    drop(line);

    let line = DelayLine::with_drops(
        "dl2",
        (&client, "eth1"),
        (&server, "eth1"),
        Duration::from_millis(5),
        [Some(Box::new(odd_echo_request)), None],
    );
    client.exec(&["ip", "addr", "add", "198.18.81.1/24", "dev", "eth1"]);
    server.exec(&["ip", "addr", "add", "198.18.81.2/24", "dev", "eth1"]);
    let (sent, received, min) = ping(&client, "198.18.81.2", 6);
    assert_eq!((sent, received), (6, 3), "the odd requests are dropped");
    assert!((10.0..20.0).contains(&min), "round trip {min} ms");
    assert_eq!(line.dropped(), 3);
}
