//! `basic_auth_users`: checking a request's `Authorization: Basic` header
//! against the users' bcrypt hashes, off the serving thread and a few at a
//! time, with the credentials that verified remembered.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::BuildHasher as _,
    sync::{Arc, Mutex},
};

use crate::model::sync;

/// What in `basic_auth_users` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "basic_auth_users: the password of {user:?} is not a bcrypt hash ({source}); make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`"
    )]
    NotBcrypt {
        user: String,
        #[source]
        source: bcrypt::BcryptError,
    },
    #[error("basic_auth_users: {0}")]
    Hash(#[source] bcrypt::BcryptError),
}

/// `basic_auth_users`: user names and bcrypt hashes.
pub struct BasicAuth {
    users: HashMap<String, String>,
    /// SHA-256 of (user, password, hash) of credentials that verified: bcrypt
    /// is slow on purpose (about 70 ms at cost 10), and a scrape every few
    /// seconds should not pay it each time (the toolkit caches them too).
    verified: Mutex<HashSet<[u8; 32]>>,
    /// A hash of a random password at the users' highest cost, compared
    /// against when the user is unknown, so that a wrong user name takes as
    /// long as a wrong password.
    no_user: String,
}

/// Verified credentials remembered at most.
const MAX_VERIFIED: usize = 64;

impl BasicAuth {
    /// The file's users (None when there are none: no basic auth).
    pub(super) fn new(users: BTreeMap<String, String>) -> Result<Option<Self>, AuthError> {
        if users.is_empty() {
            return Ok(None);
        }
        let mut cost = bcrypt::DEFAULT_COST;
        for (user, hash) in &users {
            let parts =
                hash.parse::<bcrypt::HashParts>()
                    .map_err(|source| AuthError::NotBcrypt {
                        user: user.clone(),
                        source,
                    })?;
            cost = cost.max(parts.get_cost());
        }
        let random = format!(
            "{:x}",
            std::collections::hash_map::RandomState::new().hash_one(0u8)
        );
        let no_user = bcrypt::hash(random, cost).map_err(AuthError::Hash)?;
        Ok(Some(Self {
            users: users.into_iter().collect(),
            verified: Mutex::new(HashSet::new()),
            no_user,
        }))
    }

    /// The answer without bcrypt where there is one: Some(false) for no or
    /// a malformed header, Some(true) for credentials that verified
    /// before; None: ask [`BasicAuth::check`].
    pub fn quick(&self, authorization: Option<&str>) -> Option<bool> {
        let Some((user, password)) = authorization.and_then(decode_basic) else {
            return Some(false);
        };
        let hash = self.users.get(&user)?;
        let key = credentials_key(&user, &password, hash);
        sync::lock(&self.verified).contains(&key).then_some(true)
    }

    /// Whether `authorization` (the header's value) holds one of the
    /// users' passwords. Blocking: bcrypt takes tens of milliseconds.
    pub fn check(&self, authorization: Option<&str>) -> bool {
        let Some((user, password)) = authorization.and_then(decode_basic) else {
            return false;
        };
        let (hash, known) = match self.users.get(&user) {
            Some(hash) => (hash.as_str(), true),
            None => (self.no_user.as_str(), false),
        };
        let key = credentials_key(&user, &password, hash);
        if known && sync::lock(&self.verified).contains(&key) {
            return true;
        }
        let ok = bcrypt::verify(password.as_bytes(), hash).unwrap_or(false) && known;
        if ok {
            let mut verified = sync::lock(&self.verified);
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(key);
        }
        ok
    }
}

/// bcrypt verifications running at once, at most: a client trying
/// passwords as fast as it can takes at most this many cores' worth.
const BCRYPT_AT_ONCE: usize = 2;

/// The server's bcrypt verifications: off the serving thread, a few at a
/// time (one for every connection of a server).
#[derive(Clone)]
pub(super) struct Verifier {
    slots: Arc<tokio::sync::Semaphore>,
}

impl Verifier {
    pub(super) fn new() -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(BCRYPT_AT_ONCE)),
        }
    }

    /// Whether `authorization` holds one of `auth`'s users' passwords:
    /// from what verified before if it can, else by bcrypt on a blocking
    /// thread once a slot is free.
    pub(super) async fn admits(
        &self,
        auth: &Arc<BasicAuth>,
        authorization: Option<String>,
    ) -> bool {
        if let Some(verdict) = auth.quick(authorization.as_deref()) {
            return verdict;
        }
        let permit = Arc::clone(&self.slots).acquire_owned().await;
        let auth = Arc::clone(auth);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            auth.check(authorization.as_deref())
        })
        .await
        .unwrap_or(false)
    }
}

fn credentials_key(user: &str, password: &str, hash: &str) -> [u8; 32] {
    let mut context = ::ring::digest::Context::new(&::ring::digest::SHA256);
    for part in [user, password, hash] {
        context.update(&(part.len() as u64).to_le_bytes());
        context.update(part.as_bytes());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(context.finish().as_ref());
    key
}

/// `Basic <base64(user:password)>` to (user, password).
fn decode_basic(header: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_checks_bcrypt_hashes_and_caches_what_verified() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let auth = BasicAuth::new(BTreeMap::from([("prom".to_string(), hash)]))
            .unwrap()
            .unwrap();
        use base64::Engine as _;
        let header = |user: &str, password: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )
        };
        assert!(auth.check(Some(&header("prom", "secret"))));
        assert!(
            auth.check(Some(&header("prom", "secret"))),
            "from the cache"
        );
        assert!(!auth.check(Some(&header("prom", "wrong"))));
        assert!(!auth.check(Some(&header("nobody", "secret"))));
        assert!(!auth.check(Some("Bearer abc")));
        assert!(!auth.check(Some("Basic !!!")));
        assert!(!auth.check(None));
    }

    proptest::proptest! {
        /// The Authorization header comes from any client: any bytes of it
        /// are refused or decoded, never a panic.
        #[test]
        fn any_authorization_header_is_safe(header in ".{0,80}", raw in proptest::collection::vec(proptest::num::u8::ANY, 0..60)) {
            let _ = decode_basic(&header);
            use base64::Engine as _;
            let encoded = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(&raw));
            let _ = decode_basic(&encoded);
        }
    }

    #[test]
    fn basic_headers_decode() {
        assert_eq!(
            decode_basic("Basic cHJvbTpzM2NyZXQ6eA=="),
            Some(("prom".into(), "s3cret:x".into()))
        );
        assert_eq!(decode_basic("basic"), None);
    }
}
