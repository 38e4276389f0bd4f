//! Where ntm attaches: a Linux bridge with ports in their own namespaces,
//! every frame counted exactly once whatever its path; ports added while
//! running; interfaces absent at start, deleted and re-created.

use std::{
    net::UdpSocket,
    thread,
    time::{Duration, Instant},
};

use crate::kit::{
    Agent, Netns,
    scrape::{http_get, sample_sum, wait_for},
    sh,
};
use ntm_agent::kernel::{attach::HookSet, drain::Drained};
use ntm_common::{Counters, ipproto};

const HOST: &str = "198.18.3.254";

/// A hub namespace holding br0 (the "host", 198.18.3.254) and, per port, a
/// namespace 198.18.3.N joined to br0 by a veth pair (pN in the hub).
struct Bridge {
    hub: Netns,
    hosts: Vec<Netns>,
}

impl Bridge {
    fn new(ports: usize) -> Self {
        let hub = Netns::new("hub");
        hub.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]);
        hub.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"]);
        // A fixed address: a bridge otherwise takes its lowest port MAC,
        // which changes as ports come, and stales the hosts' ARP entries.
        hub.exec(&[
            "ip",
            "link",
            "add",
            "br0",
            "address",
            "02:00:00:00:03:fe",
            "type",
            "bridge",
        ]);
        hub.exec(&["ip", "addr", "add", &format!("{HOST}/24"), "dev", "br0"]);
        hub.exec(&["ip", "link", "set", "br0", "up"]);
        let mut bridge = Self {
            hub,
            hosts: Vec::new(),
        };
        for _ in 0..ports {
            bridge.add_port();
        }
        bridge
    }

    /// Adds port pN and its host 198.18.3.N; returns N.
    fn add_port(&mut self) -> usize {
        let n = self.hosts.len() + 1;
        let host = Netns::new(&format!("h{n}"));
        host.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]);
        host.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"]);
        sh(&[
            "ip",
            "link",
            "add",
            &format!("p{n}"),
            "netns",
            &self.hub.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &host.name,
        ]);
        self.hub
            .exec(&["ip", "link", "set", &format!("p{n}"), "master", "br0", "up"]);
        host.exec(&[
            "ip",
            "addr",
            "add",
            &format!("198.18.3.{n}/24"),
            "dev",
            "eth0",
        ]);
        host.exec(&["ip", "link", "set", "eth0", "up"]);
        self.hosts.push(host);
        n
    }

    fn host(&self, n: usize) -> &Netns {
        &self.hosts[n - 1]
    }

    /// Waits until every port forwards (STP off: immediately after carrier)
    /// and neighbours are known, by pinging around once.
    fn warm_up(&self) {
        for (i, host) in self.hosts.iter().enumerate() {
            ping_until_answered(host, HOST);
            for j in 0..self.hosts.len() {
                if i != j {
                    ping_until_answered(host, &format!("198.18.3.{}", j + 1));
                }
            }
        }
    }
}

/// Pings until an answer comes (a fresh veth's carrier, and so the first
/// neighbour resolution, can take up to a second), at most 10 times.
fn ping_until_answered(from: &Netns, to: &str) {
    for _ in 0..10 {
        let answered = std::process::Command::new("ip")
            .args([
                "netns", "exec", &from.name, "ping", "-q", "-c", "1", "-W", "1", to,
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if answered {
            return;
        }
        thread::sleep(Duration::from_millis(300));
    }
    panic!("{to} never answered a ping from {}", from.name);
}

fn ip(n: usize) -> String {
    format!("198.18.3.{n}")
}

/// Sends `count` datagrams of 100 bytes from `from` to `to:port` (with a
/// socket there swallowing them); returns the expected counters.
fn udp(from: &Netns, from_ip: &str, to: &Netns, to_ip: &str, port: u16, count: usize) -> Counters {
    let sink = to.run(|| UdpSocket::bind((to_ip, port)).unwrap());
    from.run(|| {
        let socket = UdpSocket::bind((from_ip, 0)).unwrap();
        for _ in 0..count {
            socket.send_to(&[9; 100], (to_ip, port)).unwrap();
            // Paced a little: nothing is dropped in a queue on the way.
            if count > 50 {
                thread::sleep(Duration::from_micros(200));
            }
        }
    });
    thread::sleep(Duration::from_millis(200));
    drop(sink);
    Counters {
        bytes: count as u64 * 128,
        packets: count as u64,
    }
}

/// The drained counts of UDP flows to `port`, over every hook.
fn counted(drains: &[Drained], port: u16) -> Counters {
    let mut total = Counters::default();
    for d in drains {
        for (k, c) in &d.flows {
            if k.proto == ipproto::UDP && k.port == port {
                total.add(c);
            }
        }
    }
    total
}

pub fn every_frame_crossing_a_bridge_is_counted_once() {
    let mut bridge = Bridge::new(3);
    bridge.warm_up();
    let mut agent = bridge.hub.run(|| crate::kit::start_kernel(&["-i", "br0"]));
    let mut hooked: Vec<(String, HookSet)> = agent
        .attachments()
        .map(|a| (a.iface.clone(), a.hooks))
        .collect();
    hooked.sort();
    assert_eq!(
        hooked,
        vec![
            ("br0".to_string(), HookSet::Egress),
            ("p1".to_string(), HookSet::Ingress),
            ("p2".to_string(), HookSet::Ingress),
            ("p3".to_string(), HookSet::Ingress),
        ]
    );
    let mut drains = Vec::new();

    // Port to port (never passes br0's own hooks), port to host, host to port.
    let p2p = udp(bridge.host(1), &ip(1), bridge.host(2), &ip(2), 5301, 100);
    let p2h = udp(bridge.host(1), &ip(1), &bridge.hub, HOST, 5302, 50);
    let h2p = udp(&bridge.hub, HOST, bridge.host(3), &ip(3), 5303, 30);
    drains.push(agent.drain().unwrap());
    assert_eq!(counted(&drains, 5301), p2p, "port to port, once");
    assert_eq!(counted(&drains, 5302), p2h, "port to host, once");
    assert_eq!(counted(&drains, 5303), h2p, "host to port, once");
    let names = agent.interface_labels().clone();
    for d in &drains {
        for (k, _) in &d.flows {
            assert_eq!(
                names.get(&k.ifindex).map(String::as_str),
                Some("br0"),
                "labelled br0"
            );
        }
    }

    // A port added while running is followed.
    let n = bridge.add_port();
    bridge.warm_up();
    bridge
        .hub
        .run(|| assert!(agent.reconcile().unwrap(), "the new port is attached"));
    let _ = agent.drain().unwrap();
    let later = udp(bridge.host(n), &ip(n), bridge.host(1), &ip(1), 5304, 40);
    let d = agent.drain().unwrap();
    assert_eq!(counted(&[d], 5304), later, "from the new port, once");

    // A port taken out of the bridge is let go.
    bridge
        .hub
        .exec(&["ip", "link", "set", &format!("p{n}"), "nomaster"]);
    bridge
        .hub
        .run(|| assert!(agent.reconcile().unwrap(), "the old port is detached"));
    let still: Vec<String> = agent.attachments().map(|a| a.iface.clone()).collect();
    assert!(!still.contains(&format!("p{n}")), "{still:?}");
    let _ = agent.shutdown().unwrap();
}

pub fn interfaces_absent_at_start_and_recreated_are_followed() {
    let a = Netns::new("hpa");
    let b = Netns::new("hpb");
    let create = || {
        sh(&[
            "ip", "link", "add", "wgx0", "netns", &a.name, "type", "veth", "peer", "name", "wgx1",
            "netns", &b.name,
        ]);
        a.exec(&["ip", "addr", "add", "198.18.4.1/24", "dev", "wgx0"]);
        b.exec(&["ip", "addr", "add", "198.18.4.2/24", "dev", "wgx1"]);
        a.exec(&["ip", "link", "set", "wgx0", "up"]);
        b.exec(&["ip", "link", "set", "wgx1", "up"]);
        // Until the carrier is up both ways, nothing passes.
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.exec(&["cat", "/sys/class/net/wgx1/operstate"]).trim() != "up" {
            assert!(Instant::now() < deadline, "wgx1 did not come up");
            thread::sleep(Duration::from_millis(50));
        }
    };
    let _agent = Agent::in_ns(&a)
        .iface("wgx0")
        .arg("--wait-for-interfaces")
        .port(9900)
        .args(["--drain-interval", "100ms"])
        .spawn();
    // Up, but the interface is not there: not healthy.
    let (status, body) = wait_for("the agent", Duration::from_secs(30), || {
        http_get(&a, 9900, "/healthz")
    });
    assert_eq!(status, 503, "{body}");

    create();
    wait_for(
        "attachment to the new interface",
        Duration::from_secs(30),
        || http_get(&a, 9900, "/healthz").filter(|(s, _)| *s == 200),
    );
    let first = udp(&b, "198.18.4.2", &a, "198.18.4.1", 5310, 25);

    // Deleted (its counts already taken) and created again.
    a.exec(&["ip", "link", "del", "wgx0"]);
    wait_for("the agent to notice", Duration::from_secs(30), || {
        http_get(&a, 9900, "/healthz").filter(|(s, _)| *s == 503)
    });
    create();
    wait_for("re-attachment", Duration::from_secs(30), || {
        http_get(&a, 9900, "/healthz").filter(|(s, _)| *s == 200)
    });
    let second = udp(&b, "198.18.4.2", &a, "198.18.4.1", 5310, 15);

    let want = first.packets + second.packets;
    let text = wait_for(
        "both rounds in the counters",
        Duration::from_secs(20),
        || {
            let (_, text) = http_get(&a, 9900, "/metrics")?;
            (sample_sum(&text, "ntm_packets_total", &[r#"service="5310""#]) == want).then_some(text)
        },
    );
    assert_eq!(
        sample_sum(
            &text,
            "ntm_bytes_total",
            &[r#"service="5310""#, r#"iface="wgx0""#]
        ),
        first.bytes + second.bytes,
        "{text}"
    );
}
