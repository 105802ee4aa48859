//! HTTP Basic authentication against argon2 password hashes.
//!
//! One argon2 verification costs tens of milliseconds of CPU and its memory cost (~19 MiB for
//! the default parameters), and IoT Edge's client sends Basic credentials on every request.
//! So:
//!
//! - a success is remembered for a few minutes under a keyed hash of user, password and stored
//!   hash (the password itself is never stored), for the whole process, across
//!   reconfigurations;
//! - concurrent first checks of the same credentials are one verification (a fleet sharing
//!   one user, restarted at once, costs one argon2 run, not one per device);
//! - verifications run on a small dedicated pool of threads (`limits.password_checks`), each
//!   with one argon2 working area allocated once and reused: the memory argon2 holds is
//!   bounded by the pool, whatever the burst (freshly allocated areas on many blocking
//!   threads stayed in the allocator's per-thread arenas: 16 concurrent cold-start checks
//!   grew the process from 12 to 266 MB);
//! - before a credential not known to be good is verified, the pool asks the caller's
//!   [`Attempts`] whether one more may be (rate limits on failed authentication), and tells
//!   it of each failure: a password guesser gets at most one verification per pool thread past
//!   the limit.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use argon2::password_hash::PasswordHash;
use argon2::{Algorithm, Argon2, Block, Params, Version};
use aws_lc_rs::hmac;
use base64::Engine;
use lru::LruCache;
use subtle::ConstantTimeEq;
use tokio::sync::{oneshot, OnceCell};

use super::AuthError;

/// How long a successful verification is remembered.
const CACHE_TTL: Duration = Duration::from_secs(300);
const CACHE_ENTRIES: usize = 4096;

/// A hash for unknown users, so that a wrong user name costs as much as a wrong password and
/// user names cannot be probed by timing. (Hash of a random password, made once.)
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0m3bpUXMYeFt1pY2vH8bZrSNxwkmC3JvgDkKY7mr8Gw";

/// Failed-authentication accounting for one request: asked before a password not known to
/// be right is verified, told when it was wrong. Called on a verification thread.
pub trait Attempts: Send + Sync {
    /// `Err(wait)`: too many failures; no verification now, try again after `wait`.
    fn admit(&self, user: &str) -> Result<(), Duration>;
    /// The password (or user name) was wrong.
    fn failed(&self, user: &str);
}

/// No limits (tests, tools).
pub struct Unlimited;

impl Attempts for Unlimited {
    fn admit(&self, _user: &str) -> Result<(), Duration> {
        Ok(())
    }
    fn failed(&self, _user: &str) {}
}

pub struct UserDb {
    users: HashMap<String, String>,
    shared: &'static Shared,
}

/// What lives for the whole process: remembered successes, verifications under way, the
/// verification pool.
struct Shared {
    successes: Mutex<LruCache<[u8; 32], Instant>>,
    key: hmac::Key,
    /// Verifications under way, by the same keyed hash: later askers wait for the first.
    under_way: Mutex<HashMap<[u8; 32], Arc<OnceCell<bool>>>>,
    pool: Pool,
}

fn shared() -> Result<&'static Shared, String> {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    if let Some(shared) = SHARED.get() {
        return Ok(shared);
    }
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
        .map_err(|_| "cannot generate a random key".to_owned())?;
    Ok(SHARED.get_or_init(|| Shared {
        successes: Mutex::new(LruCache::new(
            NonZeroUsize::new(CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN),
        )),
        key,
        under_way: Mutex::new(HashMap::new()),
        pool: Pool::new(),
    }))
}

/// One verification for the pool.
struct Job {
    user: String,
    hash: String,
    password: String,
    attempts: Arc<dyn Attempts>,
    /// Whether the user exists (an unknown user is verified against [`DUMMY_HASH`] and fails).
    known: bool,
    reply: oneshot::Sender<Result<bool, Duration>>,
}

/// The verification threads: as many as the largest `password_checks` configured, each with
/// its own argon2 working area, reused.
struct Pool {
    jobs: Mutex<mpsc::Sender<Job>>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    threads: AtomicUsize,
}

impl Pool {
    fn new() -> Pool {
        let (tx, rx) = mpsc::channel();
        Pool {
            jobs: Mutex::new(tx),
            queue: Arc::new(Mutex::new(rx)),
            threads: AtomicUsize::new(0),
        }
    }

    /// Starts threads until there are `n`.
    fn grow_to(&self, n: usize) -> Result<(), String> {
        loop {
            let running = self.threads.load(Ordering::SeqCst);
            if running >= n {
                return Ok(());
            }
            if self
                .threads
                .compare_exchange(running, running + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue;
            }
            let queue = self.queue.clone();
            std::thread::Builder::new()
                .name(format!("edge-est-argon2-{running}"))
                .spawn(move || verification_thread(&queue))
                .map_err(|e| {
                    self.threads.fetch_sub(1, Ordering::SeqCst);
                    format!("cannot start a password verification thread: {e}")
                })?;
        }
    }

    async fn verify(
        &self,
        job: Job,
        answer: oneshot::Receiver<Result<bool, Duration>>,
    ) -> Result<bool, Duration> {
        let sent = self
            .jobs
            .lock()
            .map(|jobs| jobs.send(job).is_ok())
            .unwrap_or(false);
        if !sent {
            return Ok(false);
        }
        answer.await.unwrap_or(Ok(false))
    }
}

fn verification_thread(queue: &Mutex<mpsc::Receiver<Job>>) {
    let mut memory: Vec<Block> = Vec::new();
    loop {
        let job = {
            let Ok(queue) = queue.lock() else { return };
            match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        if job.reply.is_closed() {
            continue; // the request is gone
        }
        let answer = match job.attempts.admit(&job.user) {
            Err(wait) => Err(wait),
            Ok(()) => {
                let ok = verify_into(&job.hash, job.password.as_bytes(), &mut memory) && job.known;
                if !ok {
                    job.attempts.failed(&job.user);
                }
                Ok(ok)
            }
        };
        let _ = job.reply.send(answer);
    }
}

/// Verifies `password` against a PHC string with `memory` as argon2's working area (grown
/// to what the hash needs, kept for the next verification).
fn verify_into(phc: &str, password: &[u8], memory: &mut Vec<Block>) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm) else {
        return false;
    };
    let version = match hash.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&hash) else {
        return false;
    };
    let Ok(params) = Params::new(
        params.m_cost(),
        params.t_cost(),
        params.p_cost(),
        Some(expected.len()),
    ) else {
        return false;
    };
    let mut salt_buffer = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buffer) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::new());
    }
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
        .is_ok()
        && bool::from(out.as_slice().ct_eq(expected.as_bytes()))
}

impl UserDb {
    /// `users` maps user names to argon2 PHC strings; they are parsed here so that a bad
    /// hash is a configuration error, not a runtime surprise. `concurrent_checks` is the
    /// size of the verification pool (it only grows over reconfigurations).
    pub fn new(
        users: &std::collections::BTreeMap<String, String>,
        concurrent_checks: usize,
    ) -> Result<UserDb, String> {
        for (user, hash) in users {
            PasswordHash::new(hash)
                .map_err(|e| format!("users.{user}: not an argon2 PHC hash: {e}"))?;
        }
        let shared = shared()?;
        shared.pool.grow_to(concurrent_checks.max(1))?;
        Ok(UserDb {
            users: users.iter().map(|(u, h)| (u.clone(), h.clone())).collect(),
            shared,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether these credentials succeeded recently (no argon2, no limit involved).
    pub fn known_good(&self, user: &str, password: &str) -> bool {
        let tag = self.cache_tag(user, password);
        self.remembered(&tag)
    }

    fn remembered(&self, tag: &[u8; 32]) -> bool {
        if let Ok(mut cache) = self.shared.successes.lock() {
            if let Some(expiry) = cache.get(tag) {
                if *expiry > Instant::now() {
                    return true;
                }
                cache.pop(tag);
            }
        }
        false
    }

    /// Verifies a password: `Ok(true)` only for a known user with the right password;
    /// `Err(wait)` when `attempts` allowed no verification now.
    pub async fn verify(
        &self,
        user: &str,
        password: &str,
        attempts: Arc<dyn Attempts>,
    ) -> Result<bool, Duration> {
        let tag = self.cache_tag(user, password);
        if self.remembered(&tag) {
            return Ok(true);
        }
        let cell = {
            let Ok(mut under_way) = self.shared.under_way.lock() else {
                return Ok(false);
            };
            under_way.entry(tag).or_default().clone()
        };
        let known = self.users.get(user);
        let result = cell
            .get_or_try_init(|| async {
                let (reply, answer) = oneshot::channel();
                let job = Job {
                    user: user.to_owned(),
                    hash: known.cloned().unwrap_or_else(|| DUMMY_HASH.to_owned()),
                    password: password.to_owned(),
                    attempts,
                    known: known.is_some(),
                    reply,
                };
                let ok = self.shared.pool.verify(job, answer).await?;
                if ok {
                    if let Ok(mut cache) = self.shared.successes.lock() {
                        cache.put(tag, Instant::now() + CACHE_TTL);
                    }
                }
                Ok(ok)
            })
            .await
            .copied();
        // Done with: once answered, or when nobody else waits on it (map + us).
        if let Ok(mut under_way) = self.shared.under_way.lock() {
            if under_way.get(&tag).is_some_and(|c| Arc::ptr_eq(c, &cell))
                && (cell.initialized() || Arc::strong_count(&cell) <= 2)
            {
                under_way.remove(&tag);
            }
        }
        result
    }

    /// The keyed hash of user, password and the user's stored hash (a changed hash does
    /// not match an old success).
    fn cache_tag(&self, user: &str, password: &str) -> [u8; 32] {
        let hash = self.users.get(user).map_or("", String::as_str);
        let mut ctx = hmac::Context::with_key(&self.shared.key);
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

    /// Counts admissions and failures; refuses admission once `refuse` is set.
    #[derive(Default)]
    struct Counting {
        admitted: AtomicUsize,
        failed: AtomicUsize,
        refuse: std::sync::atomic::AtomicBool,
    }

    impl Attempts for Counting {
        fn admit(&self, _user: &str) -> Result<(), Duration> {
            if self.refuse.load(Ordering::SeqCst) {
                return Err(Duration::from_secs(7));
            }
            self.admitted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn failed(&self, _user: &str) {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn verifies_and_caches() {
        let mut users = std::collections::BTreeMap::new();
        users.insert("estuser".to_owned(), hash_password("right").unwrap());
        let db = UserDb::new(&users, 2).unwrap();
        let counting = Arc::new(Counting::default());
        let attempts = || counting.clone() as Arc<dyn Attempts>;
        assert_eq!(db.verify("estuser", "right", attempts()).await, Ok(true));
        assert_eq!(
            db.verify("estuser", "right", attempts()).await,
            Ok(true),
            "cached success still succeeds"
        );
        assert_eq!(
            counting.admitted.load(Ordering::SeqCst),
            1,
            "one argon2 run"
        );
        assert_eq!(db.verify("estuser", "wrong", attempts()).await, Ok(false));
        assert_eq!(db.verify("nobody", "right", attempts()).await, Ok(false));
        assert_eq!(counting.failed.load(Ordering::SeqCst), 2);
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());

        // With no verification allowed: a remembered success still passes, across a rebuilt
        // database (a reconfiguration); anything else is refused without argon2.
        counting.refuse.store(true, Ordering::SeqCst);
        let rebuilt = UserDb::new(&users, 1).unwrap();
        assert_eq!(
            rebuilt.verify("estuser", "right", attempts()).await,
            Ok(true)
        );
        assert!(rebuilt.known_good("estuser", "right"));
        assert!(!rebuilt.known_good("estuser", "wrong"));
        assert!(!rebuilt.is_empty());
        assert!(UserDb::new(&Default::default(), 1).unwrap().is_empty());
        assert_eq!(
            rebuilt.verify("estuser", "wrong", attempts()).await,
            Err(Duration::from_secs(7))
        );
        counting.refuse.store(false, Ordering::SeqCst);
        // A new hash for the user (a password change) is not matched by the old success.
        let mut changed = users.clone();
        changed.insert("estuser".to_owned(), hash_password("other").unwrap());
        let changed = UserDb::new(&changed, 2).unwrap();
        assert_eq!(
            changed.verify("estuser", "right", attempts()).await,
            Ok(false)
        );
        assert_eq!(
            changed.verify("estuser", "other", attempts()).await,
            Ok(true)
        );
        // Nothing of these checks is left under way (other tests verify at the same time in
        // the same process: only this test's own credentials are looked for).
        let under_way = shared().unwrap().under_way.lock().unwrap();
        for (db, user, password) in [
            (&db, "estuser", "right"),
            (&db, "estuser", "wrong"),
            (&db, "nobody", "right"),
            (&rebuilt, "estuser", "wrong"),
            (&changed, "estuser", "right"),
            (&changed, "estuser", "other"),
        ] {
            let tag = db.cache_tag(user, password);
            assert!(!under_way.contains_key(&tag), "{user}:{password}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_checks_of_the_same_credentials_are_one_verification() {
        let mut users = std::collections::BTreeMap::new();
        users.insert("fleet".to_owned(), hash_password("shared").unwrap());
        let db = Arc::new(UserDb::new(&users, 2).unwrap());
        let counting = Arc::new(Counting::default());
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let db = db.clone();
                let attempts = counting.clone() as Arc<dyn Attempts>;
                tokio::spawn(async move { db.verify("fleet", "shared", attempts).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Ok(true));
        }
        assert_eq!(counting.admitted.load(Ordering::SeqCst), 1);
        // A refused admission is the asker's alone: the next asker of the same credentials
        // runs its own check.
        let wrong = Arc::new(Counting::default());
        wrong.refuse.store(true, Ordering::SeqCst);
        assert!(db.verify("fleet", "nope", wrong).await.is_err());
        let fresh = Arc::new(Counting::default());
        assert_eq!(db.verify("fleet", "nope", fresh.clone()).await, Ok(false));
        assert_eq!(fresh.failed.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn verification_with_reused_memory_agrees_with_the_argon2_crate() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let mut memory = Vec::new();
        for params in [Params::new(8, 1, 1, None), Params::new(64, 2, 2, Some(16))] {
            let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.unwrap());
            let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
            let phc = argon2.hash_password(b"pw", &salt).unwrap().to_string();
            assert!(verify_into(&phc, b"pw", &mut memory), "{phc}");
            assert!(!verify_into(&phc, b"pW", &mut memory));
        }
        assert!(verify_into(&hash_password("x").unwrap(), b"x", &mut memory));
        assert_eq!(memory.len(), 19456, "grown to the largest hash, kept");
        assert!(!verify_into(
            "$argon2id$v=19$m=8,t=1,p=1$bad",
            b"x",
            &mut memory
        ));
    }

    #[test]
    fn refuses_non_phc_hashes() {
        let mut users = std::collections::BTreeMap::new();
        users.insert("u".to_owned(), "plaintext".to_owned());
        assert!(UserDb::new(&users, 1).is_err());
    }
}
