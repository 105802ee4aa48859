//! HTTP Basic authentication against argon2 password hashes.
//!
//! One argon2 verification costs tens of milliseconds of CPU and ~19 MiB, and IoT Edge's
//! client sends Basic credentials on every request. So verifications run on the blocking pool
//! behind a small semaphore, and a success is remembered for a few minutes under a keyed hash
//! of user, password and stored hash (the password itself is never stored). The memory of
//! successes is kept for the whole process, across reconfigurations: a configuration change
//! does not make every device pay an argon2 verification again (nor grow the heap by one
//! argon2 working area per concurrent check); a changed password hash does not match it.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use aws_lc_rs::hmac;
use base64::Engine;
use lru::LruCache;
use tokio::sync::Semaphore;

use super::AuthError;

/// How long a successful verification is remembered.
const CACHE_TTL: Duration = Duration::from_secs(300);
const CACHE_ENTRIES: usize = 4096;

/// A hash for unknown users, so that a wrong user name costs as much as a wrong password and
/// user names cannot be probed by timing. (Hash of a random password, made once.)
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0m3bpUXMYeFt1pY2vH8bZrSNxwkmC3JvgDkKY7mr8Gw";

pub struct UserDb {
    users: HashMap<String, String>,
    cache: &'static SuccessCache,
    checks: Arc<Semaphore>,
}

/// Successful verifications, by keyed hash; one per process.
struct SuccessCache {
    entries: Mutex<LruCache<[u8; 32], Instant>>,
    key: hmac::Key,
}

fn success_cache() -> Result<&'static SuccessCache, String> {
    static CACHE: OnceLock<SuccessCache> = OnceLock::new();
    if let Some(cache) = CACHE.get() {
        return Ok(cache);
    }
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
        .map_err(|_| "cannot generate a random key".to_owned())?;
    Ok(CACHE.get_or_init(|| SuccessCache {
        entries: Mutex::new(LruCache::new(
            NonZeroUsize::new(CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN),
        )),
        key,
    }))
}

impl UserDb {
    /// `users` maps user names to argon2 PHC strings; they are parsed here so that a bad
    /// hash is a configuration error, not a runtime surprise.
    pub fn new(
        users: &std::collections::BTreeMap<String, String>,
        concurrent_checks: usize,
    ) -> Result<UserDb, String> {
        for (user, hash) in users {
            PasswordHash::new(hash)
                .map_err(|e| format!("users.{user}: not an argon2 PHC hash: {e}"))?;
        }
        Ok(UserDb {
            users: users.iter().map(|(u, h)| (u.clone(), h.clone())).collect(),
            cache: success_cache()?,
            checks: Arc::new(Semaphore::new(concurrent_checks.max(1))),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Verifies a password; true only for a known user with the right password.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let known = self.users.get(user);
        let tag = self.cache_tag(user, password, known.map_or("", String::as_str));
        if let Ok(mut cache) = self.cache.entries.lock() {
            if let Some(expiry) = cache.get(&tag) {
                if *expiry > Instant::now() {
                    return true;
                }
                cache.pop(&tag);
            }
        }
        let hash = known.cloned().unwrap_or_else(|| DUMMY_HASH.to_owned());
        let password = password.to_owned();
        let Ok(_permit) = self.checks.acquire().await else {
            return false;
        };
        let matches = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        let ok = matches && known.is_some();
        if ok {
            if let Ok(mut cache) = self.cache.entries.lock() {
                cache.put(tag, Instant::now() + CACHE_TTL);
            }
        }
        ok
    }

    fn cache_tag(&self, user: &str, password: &str, hash: &str) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.cache.key);
        ctx.update(&(user.len() as u64).to_be_bytes());
        ctx.update(user.as_bytes());
        ctx.update(&(hash.len() as u64).to_be_bytes());
        ctx.update(hash.as_bytes());
        ctx.update(password.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }
}

/// Parses `Basic base64(user:password)`.
pub fn parse_authorization(header: &[u8]) -> Result<(String, String), AuthError> {
    let text = std::str::from_utf8(header)
        .map_err(|_| AuthError::MalformedBasic)?
        .trim();
    let (scheme, encoded) = text.split_once(' ').ok_or(AuthError::MalformedBasic)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::MalformedBasic);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| AuthError::MalformedBasic)?;
    let decoded = String::from_utf8(decoded).map_err(|_| AuthError::MalformedBasic)?;
    let (user, password) = decoded.split_once(':').ok_or(AuthError::MalformedBasic)?;
    if user.is_empty() {
        return Err(AuthError::MalformedBasic);
    }
    Ok((user.to_owned(), password.to_owned()))
}

/// Makes an argon2id PHC hash of a password (for `edge-est hash-password`).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_basic_credentials() {
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("estuser:pa:ss")
        );
        assert_eq!(
            parse_authorization(header.as_bytes()),
            Ok(("estuser".to_owned(), "pa:ss".to_owned()))
        );
        assert_eq!(
            parse_authorization(b"Bearer abc"),
            Err(AuthError::MalformedBasic)
        );
        assert_eq!(
            parse_authorization(b"Basic !!!"),
            Err(AuthError::MalformedBasic)
        );
        let no_colon = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("estuser")
        );
        assert_eq!(
            parse_authorization(no_colon.as_bytes()),
            Err(AuthError::MalformedBasic)
        );
    }

    #[tokio::test]
    async fn verifies_and_caches() {
        let mut users = std::collections::BTreeMap::new();
        users.insert("estuser".to_owned(), hash_password("right").unwrap());
        let db = UserDb::new(&users, 2).unwrap();
        assert!(db.verify("estuser", "right").await);
        assert!(
            db.verify("estuser", "right").await,
            "cached success still succeeds"
        );
        assert!(!db.verify("estuser", "wrong").await);
        assert!(!db.verify("nobody", "right").await);
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());

        // A rebuilt database (a reconfiguration) remembers the success: no argon2 at all,
        // even with no check allowed to run.
        let rebuilt = UserDb::new(&users, 1).unwrap();
        let _all = rebuilt.checks.clone().acquire_many_owned(1).await.unwrap();
        let remembered = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            rebuilt.verify("estuser", "right"),
        )
        .await;
        assert_eq!(remembered, Ok(true));
        // A new hash for the user (a password change) is not matched by the old success.
        let mut changed = users.clone();
        changed.insert("estuser".to_owned(), hash_password("other").unwrap());
        let changed = UserDb::new(&changed, 2).unwrap();
        assert!(!changed.verify("estuser", "right").await);
        assert!(changed.verify("estuser", "other").await);
    }

    #[test]
    fn refuses_non_phc_hashes() {
        let mut users = std::collections::BTreeMap::new();
        users.insert("u".to_owned(), "plaintext".to_owned());
        assert!(UserDb::new(&users, 1).is_err());
    }
}
