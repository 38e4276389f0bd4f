//! Names learnt from the wire: DNS answers (which name a client asked for
//! an address), the server names clients send in their handshakes, and DHCP (which host name a device sent, which address it
//! was given). Every table is bounded and forgets the least recently used
//! entry first; answers also expire with their (clamped) TTL.

use std::{
    net::IpAddr,
    num::NonZeroUsize,
    time::{Duration, Instant},
};

use lru::LruCache;

use super::{
    source::{Lookup, NameSource, Query, Source, TableSizes},
    wire::{Client, Fact},
};
use crate::model::net::Mac;

/// Answers kept per (client, address) at most.
pub const MAX_ANSWERS: NonZeroUsize = NonZeroUsize::new(65_536).expect("not zero");
/// Addresses whose latest answer (to any client) is kept at most.
pub const MAX_ANSWERED_ADDRESSES: NonZeroUsize = NonZeroUsize::new(65_536).expect("not zero");
/// DHCP clients whose host name is kept at most (a /16 of devices).
pub const MAX_CLIENTS: NonZeroUsize = NonZeroUsize::new(65_536).expect("not zero");
/// Leased addresses kept at most.
pub const MAX_LEASES: NonZeroUsize = NonZeroUsize::new(65_536).expect("not zero");
/// Longest time an answer names its addresses, whatever its TTL says.
pub const MAX_ANSWER_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long the name a client sent in a handshake names its server: as a
/// typical DNS answer would (the handshake has no TTL of its own; the
/// series it named keeps its label as long as it lives).
pub const SERVER_NAME_TTL: Duration = Duration::from_secs(300);
/// How long a new flow's server waits for the name its client sends in its
/// handshake (at most `--name-wait`): a ClientHello follows a connection's
/// first segment by a round trip.
pub const HANDSHAKE_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
struct Answered {
    name: String,
    until: Instant,
    /// A DNS answer, or which handshake.
    source: Source,
}

pub struct ObservedNames {
    /// (client, address) to the name the client asked, or sent in its
    /// handshake with the address: the newer of the two.
    answers: LruCache<(IpAddr, IpAddr), Answered>,
    /// Address to the name last asked by anyone (for peers that did not
    /// ask themselves, e.g. behind another resolver).
    by_address: LruCache<IpAddr, Answered>,
    /// DHCP client to the host name it sent.
    clients: LruCache<Client, String>,
    /// Leased address to its client.
    leases: LruCache<IpAddr, Client>,
    min_ttl: Duration,
    /// How long a flow's server waits for its client's handshake; None
    /// when handshakes are not read.
    handshake_wait: Option<Duration>,
}

impl ObservedNames {
    pub fn new(min_ttl: Duration) -> Self {
        Self {
            answers: LruCache::new(MAX_ANSWERS),
            by_address: LruCache::new(MAX_ANSWERED_ADDRESSES),
            clients: LruCache::new(MAX_CLIENTS),
            leases: LruCache::new(MAX_LEASES),
            min_ttl: min_ttl.min(MAX_ANSWER_TTL),
            handshake_wait: None,
        }
    }

    /// Handshakes are read: a new flow's server without a name waits for
    /// its client's, [`HANDSHAKE_WAIT`] at most (and at most `name_wait`).
    pub fn wait_for_handshakes(&mut self, name_wait: Duration) {
        self.handshake_wait = Some(HANDSHAKE_WAIT.min(name_wait));
    }

    /// Keeps what one message said.
    pub fn learn(&mut self, fact: Fact, now: Instant) {
        match fact {
            Fact::Answer {
                client,
                address,
                name,
                ttl,
            } => {
                let ttl = Duration::from_secs(ttl.into());
                self.answered(client, address, name, ttl, Source::DnsAnswer, now);
            }
            Fact::Server {
                client,
                server,
                name,
                source,
            } => {
                self.answered(client, server, name, SERVER_NAME_TTL, source, now);
            }
            Fact::ClientName { client, name } => {
                self.clients.put(client, name);
            }
            Fact::Lease { client, address } => {
                self.leases.put(address, client);
            }
        }
    }

    /// Keeps `name` for `address` as `client` knows it, for `ttl` (at
    /// least the shortest time an answer names, at most a day).
    fn answered(
        &mut self,
        client: IpAddr,
        address: IpAddr,
        name: String,
        ttl: Duration,
        source: Source,
        now: Instant,
    ) {
        let answered = Answered {
            name,
            until: now + ttl.clamp(self.min_ttl, MAX_ANSWER_TTL),
            source,
        };
        self.by_address.put(address, answered.clone());
        self.answers.put((client, address), answered);
    }

    /// The name `client` asked for `address` or sent in a handshake with
    /// it (else the one anyone did last), while it lasts, and where it
    /// came from.
    pub fn answer(
        &mut self,
        client: IpAddr,
        address: IpAddr,
        now: Instant,
    ) -> Option<(&str, Source)> {
        let own = self
            .answers
            .get(&(client, address))
            .is_some_and(|a| a.until > now);
        if own {
            return self
                .answers
                .peek(&(client, address))
                .map(|a| (a.name.as_str(), a.source));
        }
        match self.by_address.get(&address) {
            Some(a) if a.until > now => Some((a.name.as_str(), a.source)),
            _ => None,
        }
    }

    /// The host name of the device at `address`: the one its DHCP client
    /// sent for this lease, else the one sent from its MAC.
    pub fn device(&mut self, address: IpAddr, mac: Option<Mac>) -> Option<&str> {
        if let Some(client) = self.leases.get(&address).cloned()
            && self.clients.contains(&client)
        {
            return self.clients.get(&client).map(String::as_str);
        }
        let mac = mac?;
        self.clients.get(&Client::Mac(mac)).map(String::as_str)
    }

    /// The MAC of the device a lease was given to, if it is known by one.
    pub fn leased_mac(&self, address: IpAddr) -> Option<Mac> {
        match self.leases.peek(&address) {
            Some(Client::Mac(mac)) => Some(*mac),
            _ => None,
        }
    }

    /// Drops answers whose TTL is over.
    pub fn expire(&mut self, now: Instant) {
        expire_answers(&mut self.answers, now);
        expire_answers(&mut self.by_address, now);
    }

    pub fn sizes(&self) -> TableSizes {
        TableSizes {
            answers: self.answers.len(),
            clients: self.clients.len(),
            leases: self.leases.len(),
            ..TableSizes::default()
        }
    }
}

/// Two rungs from the wire: the host name a device's DHCP client sent
/// (its own name: whole), then the name the peer asked DNS for or sent in
/// its handshake (the newer).
impl NameSource for ObservedNames {
    fn name(&mut self, query: &Query) -> Lookup {
        if let Some(name) = self.device(query.ip, query.mac) {
            return Lookup::Name(name.to_string(), Source::Dhcp);
        }
        let waits = query.server
            && self
                .handshake_wait
                .is_some_and(|wait| query.now.duration_since(query.first_seen) < wait);
        match self.answer(query.peer, query.ip, query.now) {
            Some((name, source)) => Lookup::Name(name.to_string(), source),
            None if waits => Lookup::Wait,
            None => Lookup::Next,
        }
    }

    fn learn(&mut self, fact: &Fact, now: Instant) {
        ObservedNames::learn(self, fact.clone(), now);
    }

    fn expire(&mut self, now: Instant) {
        ObservedNames::expire(self, now);
    }

    fn leased_mac(&self, ip: IpAddr) -> Option<Mac> {
        ObservedNames::leased_mac(self, ip)
    }

    /// DHCP clients are known by MAC.
    fn names_macs(&self) -> bool {
        !self.clients.is_empty()
    }

    fn table_sizes(&self, sizes: &mut TableSizes) {
        let mine = self.sizes();
        sizes.answers += mine.answers;
        sizes.clients += mine.clients;
        sizes.leases += mine.leases;
    }
}

/// Removes the entries of `table` whose TTL is over (a pass over the
/// table, every few drains).
fn expire_answers<K: Copy + std::hash::Hash + Eq>(table: &mut LruCache<K, Answered>, now: Instant) {
    let expired: Vec<K> = table
        .iter()
        .filter(|(_, a)| a.until <= now)
        .map(|(k, _)| *k)
        .collect();
    for key in expired {
        table.pop(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// The name `client` knows `address` by, without its source.
    fn asked(o: &mut ObservedNames, client: IpAddr, address: IpAddr, now: Instant) -> Option<&str> {
        o.answer(client, address, now).map(|(name, _)| name)
    }

    /// With handshakes read, a flow's server without a name waits for its
    /// client's handshake a moment (its client does not), then goes on.
    #[test]
    fn a_server_waits_a_moment_for_its_clients_handshake() {
        let mut o = ObservedNames::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let query = |server: bool, now: Instant| Query {
            ip: ip("198.18.1.1"),
            peer: ip("198.18.0.2"),
            mac: None,
            server,
            first_seen: t0,
            now,
        };
        assert_eq!(o.name(&query(true, t0)), Lookup::Next, "not read: no wait");
        o.wait_for_handshakes(Duration::from_secs(3));
        assert_eq!(o.name(&query(true, t0)), Lookup::Wait);
        assert_eq!(o.name(&query(false, t0)), Lookup::Next, "the client");
        assert_eq!(o.name(&query(true, t0 + HANDSHAKE_WAIT)), Lookup::Next);
        o.learn(
            Fact::Server {
                client: ip("198.18.0.2"),
                server: ip("198.18.1.1"),
                name: "hello.test".into(),
                source: Source::TlsSni,
            },
            t0,
        );
        assert_eq!(
            o.name(&query(true, t0)),
            Lookup::Name("hello.test".into(), Source::TlsSni)
        );
        // At most --name-wait.
        let mut short = ObservedNames::new(Duration::from_secs(60));
        short.wait_for_handshakes(Duration::from_millis(300));
        let at = t0 + Duration::from_millis(300);
        assert_eq!(short.name(&query(true, at)), Lookup::Next);
    }

    /// A handshake's name and a DNS answer for one client and server: the
    /// newer names it, with its source; another client's own name stays.
    #[test]
    fn the_newer_of_an_answer_and_a_handshake_names_the_server() {
        let mut o = ObservedNames::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let (client, server) = (ip("198.18.0.2"), ip("198.18.1.1"));
        o.learn(answer("198.18.0.2", "198.18.1.1", "asked.test", 60), t0);
        assert_eq!(
            o.answer(client, server, t0),
            Some(("asked.test", Source::DnsAnswer))
        );
        let sni = |name: &str, source| Fact::Server {
            client,
            server,
            name: name.into(),
            source,
        };
        o.learn(sni("hello.test", Source::TlsSni), t0);
        assert_eq!(
            o.answer(client, server, t0),
            Some(("hello.test", Source::TlsSni))
        );
        o.learn(sni("provider.test", Source::TlsEchOuter), t0);
        assert_eq!(
            o.answer(client, server, t0),
            Some(("provider.test", Source::TlsEchOuter))
        );
        o.learn(answer("198.18.0.2", "198.18.1.1", "asked.test", 60), t0);
        assert_eq!(
            o.answer(client, server, t0),
            Some(("asked.test", Source::DnsAnswer))
        );
        // A handshake's name lasts as a typical answer.
        o.learn(sni("quic.test", Source::QuicSni), t0);
        let later = t0 + SERVER_NAME_TTL;
        assert_eq!(
            o.answer(client, server, later - Duration::from_secs(1))
                .map(|a| a.1),
            Some(Source::QuicSni)
        );
        assert_eq!(o.answer(client, server, later), None);
    }

    fn answer(client: &str, address: &str, name: &str, ttl: u32) -> Fact {
        Fact::Answer {
            client: ip(client),
            address: ip(address),
            name: name.into(),
            ttl,
        }
    }

    #[test]
    fn two_clients_one_address_two_names() {
        let mut o = ObservedNames::new(Duration::from_secs(1));
        let t0 = Instant::now();
        o.learn(answer("198.18.0.2", "198.18.1.1", "video.test", 60), t0);
        o.learn(answer("198.18.0.3", "198.18.1.1", "shop.test", 60), t0);
        assert_eq!(
            asked(&mut o, ip("198.18.0.2"), ip("198.18.1.1"), t0),
            Some("video.test")
        );
        assert_eq!(
            asked(&mut o, ip("198.18.0.3"), ip("198.18.1.1"), t0),
            Some("shop.test")
        );
        // A peer that asked nothing gets the latest answer.
        assert_eq!(
            asked(&mut o, ip("198.18.0.4"), ip("198.18.1.1"), t0),
            Some("shop.test")
        );
    }

    #[test]
    fn answers_last_their_clamped_ttl() {
        let mut o = ObservedNames::new(Duration::from_secs(30));
        let t0 = Instant::now();
        o.learn(answer("198.18.0.2", "198.18.1.1", "short.test", 1), t0);
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(
            asked(&mut o, ip("198.18.0.2"), ip("198.18.1.1"), at(29)),
            Some("short.test")
        );
        assert_eq!(
            asked(&mut o, ip("198.18.0.2"), ip("198.18.1.1"), at(31)),
            None
        );
        o.learn(
            answer("198.18.0.2", "198.18.1.2", "long.test", u32::MAX),
            t0,
        );
        assert_eq!(
            asked(&mut o, ip("198.18.0.2"), ip("198.18.1.2"), at(86_399)),
            Some("long.test")
        );
        assert_eq!(
            asked(&mut o, ip("198.18.0.2"), ip("198.18.1.2"), at(86_401)),
            None
        );
        o.expire(at(86_401));
        assert_eq!(o.sizes().answers, 0);
    }

    #[test]
    fn a_lease_names_its_address_and_the_mac_names_the_rest() {
        let mut o = ObservedNames::new(Duration::from_secs(30));
        let now = Instant::now();
        let mac = [2, 0, 0, 0, 0, 7];
        o.learn(
            Fact::ClientName {
                client: Client::Mac(mac),
                name: "phone".into(),
            },
            now,
        );
        o.learn(
            Fact::Lease {
                client: Client::Mac(mac),
                address: ip("198.18.0.120"),
            },
            now,
        );
        assert_eq!(o.device(ip("198.18.0.120"), None), Some("phone"));
        assert_eq!(o.device(ip("2001:2::7"), Some(mac)), Some("phone"));
        assert_eq!(o.device(ip("2001:2::8"), Some([2, 0, 0, 0, 0, 8])), None);
        assert_eq!(o.leased_mac(ip("198.18.0.120")), Some(mac));
    }

    #[test]
    fn tables_are_bounded() {
        let mut o = ObservedNames::new(Duration::from_secs(30));
        let now = Instant::now();
        for i in 0..(MAX_ANSWERS.get() as u32 + 10) {
            let address = IpAddr::from((0xc612_0000u32 | (i & 0xffff)).to_be_bytes());
            let client = IpAddr::from((0xc613_0000u32 + (i >> 16)).to_be_bytes());
            o.learn(
                Fact::Answer {
                    client,
                    address,
                    name: "n.test".into(),
                    ttl: 60,
                },
                now,
            );
        }
        assert_eq!(o.sizes().answers, MAX_ANSWERS.get());
    }
}
