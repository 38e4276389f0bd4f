//! Names learnt from the wire: DNS answers (which name a client asked for
//! an address) and DHCP (which host name a device sent, which address it
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

#[derive(Clone, Debug)]
struct Answered {
    name: String,
    until: Instant,
}

pub struct ObservedNames {
    /// (client, address) to the name the client asked.
    answers: LruCache<(IpAddr, IpAddr), Answered>,
    /// Address to the name last asked by anyone (for peers that did not
    /// ask themselves, e.g. behind another resolver).
    by_address: LruCache<IpAddr, Answered>,
    /// DHCP client to the host name it sent.
    clients: LruCache<Client, String>,
    /// Leased address to its client.
    leases: LruCache<IpAddr, Client>,
    min_ttl: Duration,
}

impl ObservedNames {
    pub fn new(min_ttl: Duration) -> Self {
        Self {
            answers: LruCache::new(MAX_ANSWERS),
            by_address: LruCache::new(MAX_ANSWERED_ADDRESSES),
            clients: LruCache::new(MAX_CLIENTS),
            leases: LruCache::new(MAX_LEASES),
            min_ttl: min_ttl.min(MAX_ANSWER_TTL),
        }
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
                let ttl = Duration::from_secs(ttl.into()).clamp(self.min_ttl, MAX_ANSWER_TTL);
                let answered = Answered {
                    name,
                    until: now + ttl,
                };
                self.by_address.put(address, answered.clone());
                self.answers.put((client, address), answered);
            }
            Fact::ClientName { client, name } => {
                self.clients.put(client, name);
            }
            Fact::Lease { client, address } => {
                self.leases.put(address, client);
            }
        }
    }

    /// The name `client` asked for `address` (else the one anyone asked
    /// last), while its TTL lasts.
    pub fn answer(&mut self, client: IpAddr, address: IpAddr, now: Instant) -> Option<&str> {
        let own = self
            .answers
            .get(&(client, address))
            .is_some_and(|a| a.until > now);
        if own {
            return self
                .answers
                .peek(&(client, address))
                .map(|a| a.name.as_str());
        }
        match self.by_address.get(&address) {
            Some(a) if a.until > now => Some(a.name.as_str()),
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
/// (its own name: whole), then the name the peer asked DNS for.
impl NameSource for ObservedNames {
    fn name(&mut self, query: &Query) -> Lookup {
        if let Some(name) = self.device(query.ip, query.mac) {
            return Lookup::Name(name.to_string(), Source::Dhcp);
        }
        match self.answer(query.peer, query.ip, query.now) {
            Some(name) => Lookup::Name(name.to_string(), Source::DnsAnswer),
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
            o.answer(ip("198.18.0.2"), ip("198.18.1.1"), t0),
            Some("video.test")
        );
        assert_eq!(
            o.answer(ip("198.18.0.3"), ip("198.18.1.1"), t0),
            Some("shop.test")
        );
        // A peer that asked nothing gets the latest answer.
        assert_eq!(
            o.answer(ip("198.18.0.4"), ip("198.18.1.1"), t0),
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
            o.answer(ip("198.18.0.2"), ip("198.18.1.1"), at(29)),
            Some("short.test")
        );
        assert_eq!(o.answer(ip("198.18.0.2"), ip("198.18.1.1"), at(31)), None);
        o.learn(
            answer("198.18.0.2", "198.18.1.2", "long.test", u32::MAX),
            t0,
        );
        assert_eq!(
            o.answer(ip("198.18.0.2"), ip("198.18.1.2"), at(86_399)),
            Some("long.test")
        );
        assert_eq!(
            o.answer(ip("198.18.0.2"), ip("198.18.1.2"), at(86_401)),
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
