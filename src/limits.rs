//! Rate limits: token buckets per client address and per authenticated identity, kept in LRU
//! maps of bounded size, so memory stays bounded however many addresses or identities appear.
//! Evicting a bucket only forgets how much of it was used (the next request finds it full):
//! an attacker churning through addresses can make the limits more lenient, never stricter,
//! for anyone else.

use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

/// Buckets kept per limiter at most (about 100 bytes each).
pub const MAX_TRACKED: usize = 16_384;

/// A token bucket's refill rate and size. A rate of 0 turns the limit off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Tokens the bucket holds at most (the burst allowed after a quiet time).
    pub burst: f64,
}

impl Rate {
    pub fn is_off(&self) -> bool {
        self.per_second <= 0.0
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets by key, at most `capacity` of them (least recently used evicted first).
pub struct RateLimiter<K: Hash + Eq> {
    buckets: Mutex<LruCache<K, Bucket>>,
}

impl<K: Hash + Eq> RateLimiter<K> {
    pub fn new(capacity: usize) -> RateLimiter<K> {
        RateLimiter {
            buckets: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// Takes one token from `key`'s bucket. `Err` holds how long until a token is back.
    pub fn check(&self, key: K, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.check_cost(key, rate, 1.0, now)
    }

    /// Takes `cost` tokens (at least one) from `key`'s bucket, or none. `Err` holds how long
    /// until there are that many. A bucket smaller than `cost` holds `cost` at most.
    pub fn check_cost(&self, key: K, rate: Rate, cost: f64, now: Instant) -> Result<(), Duration> {
        if rate.is_off() {
            return Ok(());
        }
        let cost = cost.max(1.0);
        let burst = rate.burst.max(cost);
        let Ok(mut buckets) = self.buckets.lock() else {
            // A panic elsewhere poisoned the map: fail open rather than refuse everyone.
            return Ok(());
        };
        let bucket = buckets.get_or_insert_mut(key, || Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.per_second).min(burst);
        bucket.last = now;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            Ok(())
        } else {
            let missing = cost - bucket.tokens;
            Err(Duration::from_secs_f64(missing / rate.per_second))
        }
    }

    /// Whether `key`'s bucket holds a token, without taking it. `Err` holds how long until
    /// it does. A key without a bucket has a full one.
    pub fn ready(&self, key: &K, rate: Rate, now: Instant) -> Result<(), Duration> {
        if rate.is_off() {
            return Ok(());
        }
        let burst = rate.burst.max(1.0);
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let Some(bucket) = buckets.get_mut(key) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.per_second).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / rate.per_second,
            ))
        }
    }

    /// Takes a token from `key`'s bucket whether or not it has one: an empty bucket goes
    /// into debt (down to minus its size), so that what happened past the limit pushes the
    /// next token further away.
    pub fn charge(&self, key: K, rate: Rate, now: Instant) {
        if rate.is_off() {
            return;
        }
        let burst = rate.burst.max(1.0);
        let Ok(mut buckets) = self.buckets.lock() else {
            return;
        };
        let bucket = buckets.get_or_insert_mut(key, || Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = ((bucket.tokens + elapsed * rate.per_second).min(burst) - 1.0).max(-burst);
        bucket.last = now;
    }

    /// Buckets currently kept.
    pub fn len(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key a client address is limited under: IPv4 addresses (IPv4-mapped IPv6 included) as
/// they are, IPv6 addresses by their /64 prefix (one host usually holds a whole /64).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let limiter = RateLimiter::new(8);
        let rate = Rate {
            per_second: 2.0,
            burst: 3.0,
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("a", rate, t0).is_ok());
        }
        let wait = limiter.check("a", rate, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(500) && wait > Duration::ZERO);
        assert_eq!(retry_after_secs(wait), 1);
        // Another key has its own bucket.
        assert!(limiter.check("b", rate, t0).is_ok());
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert!(limiter.check("a", rate, t1).is_ok());
        assert!(limiter.check("a", rate, t1).is_err());
        // A long pause refills up to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.check("a", rate, t2).is_ok());
        }
        assert!(limiter.check("a", rate, t2).is_err());
    }

    #[test]
    fn a_rate_of_zero_is_off_and_memory_stays_bounded() {
        let limiter = RateLimiter::new(100);
        let off = Rate {
            per_second: 0.0,
            burst: 0.0,
        };
        let now = Instant::now();
        for _ in 0..1000 {
            assert!(limiter.check(1u32, off, now).is_ok());
        }
        assert!(limiter.is_empty(), "no bucket is kept while off");
        let on = Rate {
            per_second: 1.0,
            burst: 1.0,
        };
        for key in 0..100_000u32 {
            assert!(limiter.check(key, on, now).is_ok());
        }
        assert_eq!(limiter.len(), 100);
    }

    #[test]
    fn charges_go_into_bounded_debt_and_ready_takes_nothing() {
        let limiter = RateLimiter::new(8);
        let rate = Rate {
            per_second: 1.0,
            burst: 2.0,
        };
        let t0 = Instant::now();
        assert!(limiter.ready(&"a", rate, t0).is_ok());
        assert!(
            limiter.is_empty(),
            "ready keeps no bucket for a key never charged"
        );
        limiter.charge("a", rate, t0);
        assert!(limiter.ready(&"a", rate, t0).is_ok());
        assert!(limiter.ready(&"a", rate, t0).is_ok(), "ready took nothing");
        limiter.charge("a", rate, t0);
        assert_eq!(limiter.ready(&"a", rate, t0), Err(Duration::from_secs(1)));
        // Ten more charges: the debt stops at minus the burst (2 s + 1 s to the next token).
        for _ in 0..10 {
            limiter.charge("a", rate, t0);
        }
        assert_eq!(limiter.ready(&"a", rate, t0), Err(Duration::from_secs(3)));
        assert!(limiter
            .ready(&"a", rate, t0 + Duration::from_secs(3))
            .is_ok());
    }

    #[test]
    fn ipv6_addresses_share_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(address_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
