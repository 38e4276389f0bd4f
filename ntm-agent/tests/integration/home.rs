//! A home network as a newcomer runs ntm on it: a router whose LAN bridge
//! `br-lan` carries 198.18.60.1/24 and 2001:2:0:60::1/64 (a network outside
//! every default list, and a global IPv6 prefix as ISPs delegate them),
//! dnsmasq handing out DHCP, two devices (alice; bob, also on two global
//! IPv6 addresses of the prefix), and a server behind the router's WAN
//! side. ntm runs on `br-lan` with no `--local-net` and must find the
//! devices by itself: exactly alice-laptop, bob-phone and the router, each
//! with exactly what it sent and received, multicast and broadcast in a row
//! of their own, and the LAN's new IPv6 prefix followed while it runs. With
//! `--local-net`, exactly the networks given.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv6Addr, SocketAddrV6, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::kit::{
    Agent, Netns, dhcp,
    dns::DnsServer,
    if_stats,
    scrape::{Guard, TempDir, bytes_where, http_get, metrics, wait_for, wait_healthy},
    sh,
};

const ROUTER_MAC: &str = "02:00:00:00:60:01";
const ROUTER4: &str = "198.18.60.1";
const ROUTER6: &str = "2001:2:0:60::1";
/// The prefix the ISP delegates next.
const NEW_ROUTER6: &str = "2001:2:0:61::1";
const SERVER4: &str = "198.19.0.2";
const SERVER6: &str = "2001:2:0:ff::2";
const BOB6: [&str; 2] = ["2001:2:0:60::b1", "2001:2:0:60::b2"];
const NEW_BOB6: &str = "2001:2:0:61::b1";
const PORT: u16 = 9460;
const GROUPS: &str = "multicast and broadcast";
const HOUSEKEEPING: &str = "network housekeeping";

/// One device of the LAN: its namespace, its port on `br-lan` and MAC.
struct Device {
    ns: Netns,
    port: &'static str,
    mac: &'static str,
    hostname: &'static str,
    /// Its IPv4 address, once leased.
    ip4: String,
}

/// The home network (see the module's documentation); everything goes
/// with it.
struct Home {
    router: Netns,
    isp: Netns,
    alice: Device,
    bob: Device,
    dir: TempDir,
    _dns: DnsServer,
    _dnsmasq: Guard,
}

/// A veth pair: `a_if` in `a`, `b_if` in `b` with MAC `b_mac`, both up.
fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str, b_mac: &str) {
    sh(&[
        "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name, "address", b_mac,
    ]);
    a.quiet_ipv6(a_if);
    b.quiet_ipv6(b_if);
}

impl Home {
    fn new(tag: &str) -> Self {
        let router = Netns::new(&format!("{tag}r"));
        router.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        router.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
        // No multicast snooping: the bridge floods groups, as a home
        // router's usually does, and sends no queries of its own.
        router.exec(&[
            "ip",
            "link",
            "add",
            "br-lan",
            "address",
            ROUTER_MAC,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        router.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{ROUTER4}/24"),
            "dev",
            "br-lan",
        ]);
        router.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{ROUTER6}/64"),
            "dev",
            "br-lan",
            "nodad",
        ]);
        router.exec(&["ip", "link", "set", "br-lan", "up"]);

        // The WAN side: the ISP's network and a server on it.
        let isp = Netns::new(&format!("{tag}i"));
        veth(&router, "wan0", &isp, "eth0", "02:00:00:00:ff:02");
        router.exec(&["ip", "link", "set", "wan0", "address", "02:00:00:00:ff:01"]);
        for (ns, v4, v6) in [
            (&router, "198.19.0.1/24", "2001:2:0:ff::1/64"),
            (&isp, "198.19.0.2/24", "2001:2:0:ff::2/64"),
        ] {
            let ifname = if std::ptr::eq(ns, &router) {
                "wan0"
            } else {
                "eth0"
            };
            ns.exec(&["ip", "addr", "add", v4, "dev", ifname]);
            ns.exec(&["ip", "addr", "add", v6, "dev", ifname, "nodad"]);
            ns.exec(&["ip", "link", "set", ifname, "up"]);
        }
        router.permanent_neighbour("wan0", SERVER4, "02:00:00:00:ff:02");
        router.permanent_neighbour("wan0", SERVER6, "02:00:00:00:ff:02");
        for (ip, via) in [
            ("198.18.60.0/24", "198.19.0.1"),
            ("2001:2:0:60::/64", "2001:2:0:ff::1"),
            ("2001:2:0:61::/64", "2001:2:0:ff::1"),
        ] {
            isp.exec(&["ip", "route", "add", ip, "via", via]);
        }
        isp.permanent_neighbour("eth0", "198.19.0.1", "02:00:00:00:ff:01");
        isp.permanent_neighbour("eth0", "2001:2:0:ff::1", "02:00:00:00:ff:01");

        let device = |ns_tag: &str, port: &'static str, mac: &'static str, hostname| {
            let ns = Netns::new(&format!("{tag}{ns_tag}"));
            veth(&router, port, &ns, "eth0", mac);
            router.exec(&["ip", "link", "set", port, "master", "br-lan", "up"]);
            ns.exec(&["ip", "link", "set", "eth0", "up"]);
            ns.permanent_neighbour("eth0", ROUTER4, ROUTER_MAC);
            ns.permanent_neighbour("eth0", ROUTER6, ROUTER_MAC);
            Device {
                ns,
                port,
                mac,
                hostname,
                ip4: String::new(),
            }
        };
        let alice = device("a", "lan-a", "02:00:00:00:60:0a", "alice-laptop");
        let bob = device("b", "lan-b", "02:00:00:00:60:0b", "bob-phone");
        let deadline = Instant::now() + Duration::from_secs(10);
        for (ns, ifname) in [
            (&router, "lan-a"),
            (&router, "lan-b"),
            (&router, "wan0"),
            (&alice.ns, "eth0"),
            (&bob.ns, "eth0"),
        ] {
            ns.wait_up(ifname, deadline);
        }
        let dir = TempDir::new(tag);
        // Reverse lookups go to a server of the test's that knows no name.
        let dns = DnsServer::start(&router, 5360, Default::default());
        let dnsmasq = dhcp::dnsmasq_on(
            &router,
            "br-lan",
            &dir.0,
            &[
                "--port=0",
                "--dhcp-range=198.18.60.100,198.18.60.150,255.255.255.0,1h",
                &format!("--dhcp-leasefile={}", dir.0.join("leases").display()),
            ],
        );
        let home = Self {
            router,
            isp,
            alice,
            bob,
            dir,
            _dns: dns,
            _dnsmasq: dnsmasq,
        };
        home.wait_quiet();
        home
    }

    /// Waits until no frame has crossed the LAN's ports for a while, at
    /// most a few seconds.
    fn wait_quiet(&self) {
        let stats =
            || [self.alice.port, self.bob.port, "br-lan"].map(|port| if_stats(&self.router, port));
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut last = stats();
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
            let now = stats();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(600) {
                return;
            }
        }
    }

    /// ntm on `br-lan`, naming hosts, with `extra` flags.
    fn agent(&self, extra: &[&str]) -> Guard {
        let agent = Agent::in_ns(&self.router)
            .names(true)
            .iface("br-lan")
            .port(PORT)
            .args(["--dns-server", "127.0.0.1:5360", "--name-wait", "500ms"])
            .args(["--drain-interval", "200ms"])
            .args(extra)
            .log_to(&self.dir.0.join("agent.log"))
            .spawn();
        wait_healthy(&self.router, PORT);
        agent
    }

    /// The devices get their addresses: DHCP from dnsmasq (with ntm
    /// watching), a default route, and bob his two global IPv6 addresses.
    /// The router's neighbour entries are static, so that no neighbour
    /// discovery crosses the LAN while the test counts.
    fn join(&mut self) {
        for device in [&mut self.alice, &mut self.bob] {
            let out = dhcp::udhcpc_on(&device.ns, "eth0", &self.dir.0, device.hostname);
            // The script put the leased address on the interface.
            let shown = device
                .ns
                .exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
            let ip = shown
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|a| a.split('/').next())
                .unwrap_or_else(|| panic!("no lease for {}: {out}{shown}", device.hostname));
            device.ip4 = ip.to_string();
            device
                .ns
                .exec(&["ip", "route", "add", "default", "via", ROUTER4]);
            self.router.permanent_neighbour("br-lan", ip, device.mac);
        }
        for ip in BOB6 {
            self.bob.ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            self.router.permanent_neighbour("br-lan", ip, self.bob.mac);
        }
        self.bob
            .ns
            .exec(&["ip", "-6", "route", "add", "default", "via", ROUTER6]);
        self.wait_quiet();
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) =
            http_get(&self.router, PORT, path).unwrap_or_else(|| panic!("GET {path}"));
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// Each device row's (download, upload) bytes since the agent started.
    fn devices(&self) -> BTreeMap<String, (u64, u64)> {
        let doc = self.get("/api/v1/devices");
        doc["devices"]
            .as_array()
            .expect("a device listing")
            .iter()
            .map(|d| {
                let bytes = |way: &str| d[way]["bytes"].as_u64().unwrap();
                (
                    d["name"].as_str().unwrap().to_string(),
                    (bytes("download"), bytes("upload")),
                )
            })
            .collect()
    }

    /// The names of a listing (`servers`, `services`, ...).
    fn names(&self, path: &str, list: &str) -> BTreeSet<String> {
        self.get(path)[list]
            .as_array()
            .expect("a listing")
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The local networks the status shows, as (network, origin,
    /// interface).
    fn local_networks(&self) -> Vec<(String, String, String)> {
        self.get("/api/v1/status")["local_networks"]
            .as_array()
            .expect("local networks")
            .iter()
            .map(|n| {
                let text = |key: &str| n[key].as_str().unwrap_or_default().to_string();
                (text("network"), text("origin"), text("interface"))
            })
            .collect()
    }
}

/// Sends `count` datagrams of `size` bytes from `from` to `to`; returns
/// the bytes ntm counts for them (IP packets: headers of 28 bytes for
/// IPv4, 48 for IPv6, and the payload).
fn send(ns: &Netns, from: &str, to: std::net::SocketAddr, count: u64, size: usize) -> u64 {
    let from: std::net::IpAddr = from.parse().unwrap();
    ns.run(|| {
        let socket = UdpSocket::bind((from, 0)).unwrap();
        for _ in 0..count {
            socket.send_to(&vec![7u8; size], to).unwrap();
        }
    });
    let headers = if to.is_ipv4() { 28 } else { 48 };
    count * (headers + size as u64)
}

/// The sinks that take the test's datagrams, so that none is answered
/// with an ICMP error.
fn sinks(home: &Home) -> Vec<UdpSocket> {
    let mut sinks = home.isp.run(|| {
        vec![
            UdpSocket::bind((SERVER4, 9000)).unwrap(),
            UdpSocket::bind((SERVER6, 9000)).unwrap(),
        ]
    });
    sinks.push(
        home.router
            .run(|| UdpSocket::bind((ROUTER4, 9001)).unwrap()),
    );
    sinks
}

/// What each device row must have gained: (download, upload).
type Gains = BTreeMap<String, (u64, u64)>;

/// Waits until every device row has gained exactly `gains` since
/// `before`, then a little longer (nothing more may come); returns the
/// rows.
fn wait_for_gains(home: &Home, before: &Gains, gains: &Gains) -> Gains {
    let gained = |now: &Gains| -> Gains {
        now.iter()
            .map(|(name, (down, up))| {
                let (d0, u0) = before.get(name).copied().unwrap_or_default();
                (name.clone(), (down - d0, up - u0))
            })
            .filter(|(_, g)| *g != (0, 0))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = home.devices();
        if gained(&now) == *gains {
            // Two more drains: nothing else arrives late.
            thread::sleep(Duration::from_millis(500));
            let again = home.devices();
            assert_eq!(gained(&again), *gains, "devices after the traffic settled");
            return again;
        }
        assert!(
            Instant::now() < deadline,
            "device gains {:?}, expected {gains:?}\n{}",
            gained(&now),
            std::fs::read_to_string(home.dir.0.join("agent.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The traffic of both tests: alice and bob upload to the server, alice to
/// the router, bob from each of his IPv6 addresses; alice sends mDNS, bob
/// SSDP and mDNS over IPv6 (from his link-local address). Returns the
/// bytes of each part.
struct Sent {
    alice_server: u64,
    alice_router: u64,
    alice_mdns: u64,
    bob_server4: u64,
    bob_server6: [u64; 2],
    bob_ssdp: u64,
    bob_mdns6: u64,
}

fn send_all(home: &Home) -> Sent {
    let server4 = (SERVER4.parse::<std::net::IpAddr>().unwrap(), 9000).into();
    let server6 = (SERVER6.parse::<std::net::IpAddr>().unwrap(), 9000).into();
    let (alice, bob) = (&home.alice, &home.bob);
    let bob_ifindex: u32 = bob
        .ns
        .exec(&["cat", "/sys/class/net/eth0/ifindex"])
        .trim()
        .parse()
        .unwrap();
    let mdns6 = SocketAddrV6::new(
        "ff02::fb".parse::<Ipv6Addr>().unwrap(),
        5353,
        0,
        bob_ifindex,
    );
    Sent {
        alice_server: send(&alice.ns, &alice.ip4, server4, 20, 100),
        alice_router: send(
            &alice.ns,
            &alice.ip4,
            (ROUTER4.parse::<std::net::IpAddr>().unwrap(), 9001).into(),
            5,
            100,
        ),
        alice_mdns: send(
            &alice.ns,
            &alice.ip4,
            "224.0.0.251:5353".parse().unwrap(),
            3,
            50,
        ),
        bob_server4: send(&bob.ns, &bob.ip4, server4, 10, 200),
        bob_server6: BOB6.map(|ip| send(&bob.ns, ip, server6, 10, 100)),
        bob_ssdp: send(
            &bob.ns,
            &bob.ip4,
            "239.255.255.250:1900".parse().unwrap(),
            2,
            120,
        ),
        bob_mdns6: send(&bob.ns, "::", mdns6.into(), 3, 50),
    }
}

/// With no `--local-net`: the LAN's networks are learnt from `br-lan`;
/// the devices are exactly alice-laptop, bob-phone and the router, each
/// with exactly its traffic (bob's IPv6 uploads his); multicast and
/// broadcast in their own row, never servers; the network's own chatter
/// one service on the page and each its own in `/metrics`; a new IPv6
/// prefix on `br-lan` is the LAN's within seconds.
pub fn a_home_network_is_right_without_configuration() {
    let mut home = Home::new("home");
    let _sinks = sinks(&home);
    let _agent = home.agent(&[]);
    let learnt = home.local_networks();
    for net in ["198.18.60.0/24", "2001:2:0:60::/64", "fe80::/64"] {
        assert!(
            learnt.contains(&(net.into(), "interface".into(), "br-lan".into())),
            "{net} from br-lan in {learnt:?}"
        );
    }
    assert!(
        !learnt
            .iter()
            .any(|(net, _, _)| net.starts_with("198.19.") || net.starts_with("2001:2:0:ff:")),
        "the WAN side is not monitored: {learnt:?}"
    );
    assert_eq!(home.get("/api/v1/status")["local_networks_learnt"], true);

    home.join();
    let before = home.devices();
    let sent = send_all(&home);
    let router = crate::kit::host_name();
    let groups_up = sent.alice_mdns + sent.bob_ssdp + sent.bob_mdns6;
    let gains = Gains::from([
        (
            "alice-laptop".to_string(),
            (0, sent.alice_server + sent.alice_router + sent.alice_mdns),
        ),
        (
            "bob-phone".to_string(),
            (
                0,
                sent.bob_server4
                    + sent.bob_server6[0]
                    + sent.bob_server6[1]
                    + sent.bob_ssdp
                    + sent.bob_mdns6,
            ),
        ),
        (router.clone(), (sent.alice_router, 0)),
        (GROUPS.to_string(), (0, groups_up)),
    ]);
    let devices = wait_for_gains(&home, &before, &gains);
    // DHCP counted before too: the devices are exactly these, from the
    // start.
    assert_eq!(
        devices.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "alice-laptop".to_string(),
            "bob-phone".to_string(),
            router.clone(),
            GROUPS.to_string()
        ]),
        "devices"
    );
    // The groups are the multicast row's "servers", never servers.
    assert_eq!(
        home.names("/api/v1/servers", "servers"),
        BTreeSet::from([SERVER4.to_string(), SERVER6.to_string()])
    );
    let groups = home.names(
        &format!("/api/v1/servers?device={}", urlencode(GROUPS)),
        "servers",
    );
    for group in [
        "224.0.0.251",
        "239.255.255.250",
        "ff02::fb",
        "255.255.255.255",
    ] {
        assert!(groups.contains(group), "{group} in {groups:?}");
    }
    // mDNS, SSDP and DHCP are one row on the page, each its own service
    // in /metrics with exactly its bytes.
    let services = home.names("/api/v1/services", "services");
    assert!(services.contains(HOUSEKEEPING), "{services:?}");
    for chatter in [
        "mdns", "ssdp", "bootps", "bootpc", "5353", "1900", "67", "68",
    ] {
        assert!(!services.contains(chatter), "{chatter} in {services:?}");
    }
    let text = metrics(&home.router, PORT).unwrap();
    assert_eq!(
        bytes_where(&text, &[r#"dst="224.0.0.251""#]),
        sent.alice_mdns,
        "{text}"
    );
    assert_eq!(
        bytes_where(&text, &[r#"dst="239.255.255.250""#]),
        sent.bob_ssdp,
        "{text}"
    );
    assert_eq!(
        bytes_where(&text, &[r#"dst="ff02::fb""#]),
        sent.bob_mdns6,
        "{text}"
    );
    // The direction label goes by the same networks: bob's IPv6 uploads
    // are outbound, from bob.
    assert_eq!(
        bytes_where(
            &text,
            &[
                r#"src="bob-phone""#,
                r#"dst="2001:2:0:ff::2""#,
                r#"direction="outbound""#
            ]
        ),
        sent.bob_server6[0] + sent.bob_server6[1],
        "{text}"
    );

    // The ISP delegates a new prefix: the router's LAN address moves.
    home.router.exec(&[
        "ip",
        "addr",
        "del",
        &format!("{ROUTER6}/64"),
        "dev",
        "br-lan",
    ]);
    let changed = Instant::now();
    home.router.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{NEW_ROUTER6}/64"),
        "dev",
        "br-lan",
        "nodad",
    ]);
    wait_for(
        "the new prefix among the local networks",
        Duration::from_secs(5),
        || {
            let nets = home.local_networks();
            let has = |net: &str| nets.iter().any(|(n, _, _)| n == net);
            (has("2001:2:0:61::/64") && !has("2001:2:0:60::/64")).then_some(())
        },
    );
    eprintln!("the new prefix was local after {:?}", changed.elapsed());
    let bob = &home.bob;
    bob.ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{NEW_BOB6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    bob.ns.exec(&[
        "ip",
        "-6",
        "route",
        "replace",
        "default",
        "via",
        NEW_ROUTER6,
    ]);
    bob.ns.permanent_neighbour("eth0", NEW_ROUTER6, ROUTER_MAC);
    // No neighbour entry on the router for the new address (nothing
    // answers bob): only the frames' source MAC, which the kernel learns
    // in the new prefix once it is local, ties it to bob.
    home.wait_quiet();
    let before = home.devices();
    let server6 = (SERVER6.parse::<std::net::IpAddr>().unwrap(), 9000).into();
    let new_prefix = send(&bob.ns, NEW_BOB6, server6, 10, 100);
    wait_for_gains(
        &home,
        &before,
        &Gains::from([("bob-phone".to_string(), (0, new_prefix))]),
    );
    assert!(!home.names("/api/v1/servers", "servers").contains(NEW_BOB6));
}

/// With `--local-net`: exactly the networks given, nothing learnt. Bob's
/// IPv6 addresses are outside them, so his IPv6 traffic is not his.
pub fn given_local_networks_are_exactly_those() {
    let mut home = Home::new("homeg");
    let _sinks = sinks(&home);
    let _agent = home.agent(&["--local-net", "198.18.60.0/24"]);
    assert_eq!(
        home.local_networks(),
        [(
            "198.18.60.0/24".to_string(),
            "given".to_string(),
            String::new()
        )]
    );
    assert_eq!(home.get("/api/v1/status")["local_networks_learnt"], false);
    home.join();
    let before = home.devices();
    let sent = send_all(&home);
    let router = crate::kit::host_name();
    // Bob's IPv6 is between two remote hosts now; his link-local mDNS is
    // from outside the local networks: the groups row's download.
    let gains = Gains::from([
        (
            "alice-laptop".to_string(),
            (0, sent.alice_server + sent.alice_router + sent.alice_mdns),
        ),
        (
            "bob-phone".to_string(),
            (0, sent.bob_server4 + sent.bob_ssdp),
        ),
        (router, (sent.alice_router, 0)),
        (
            GROUPS.to_string(),
            (sent.bob_mdns6, sent.alice_mdns + sent.bob_ssdp),
        ),
    ]);
    wait_for_gains(&home, &before, &gains);
    let text = metrics(&home.router, PORT).unwrap();
    assert_eq!(
        bytes_where(
            &text,
            &[r#"dst="2001:2:0:ff::2""#, r#"direction="external""#]
        ),
        sent.bob_server6[0] + sent.bob_server6[1],
        "{text}"
    );
}

fn urlencode(s: &str) -> String {
    crate::kit::scrape::urlencode(s)
}
