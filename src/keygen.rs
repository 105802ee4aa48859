//! Server-side key generation (`/serverkeygen`), bounded. An RSA-2048 key costs tens of
//! milliseconds of CPU (about 76 ms on the reference machine), a thousand times a CSR check.
//! So RSA keys are made on the blocking pool, [`rsa_keys_at_once`] at a time whoever asks,
//! and each identity has one key budget: a token bucket of `keygen_per_identity` keys a
//! second and `keygen_burst_per_identity` at once, where an EC key costs one and an RSA key
//! [`RSA_KEY_COST`] (by default ten EC keys a second, fifty at once; or one RSA key a second,
//! five at once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::config::{Limits, ServerKeygen};
use crate::est::KeyKind;
use crate::limits::{Rate, RateLimiter};

/// What one RSA key costs of an identity's server-side key budget (`keygen_per_identity`),
/// in EC keys: an EC key costs next to nothing, an RSA key tens of milliseconds of CPU.
pub const RSA_KEY_COST: f64 = 10.0;

/// RSA keys generated at once by the whole server: at most half the cores (at least one), so
/// key generation never takes every core from the requests that need little.
pub fn rsa_keys_at_once() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// The server's key generation: its permits and the per-identity key budgets.
pub struct KeyGenerator {
    rsa_permits: Arc<Semaphore>,
    budgets: RateLimiter<String>,
}

impl Default for KeyGenerator {
    fn default() -> Self {
        KeyGenerator {
            rsa_permits: Arc::new(Semaphore::new(rsa_keys_at_once())),
            budgets: RateLimiter::new(crate::limits::MAX_TRACKED),
        }
    }
}

/// Why no key was made.
#[derive(Debug)]
pub enum KeygenError {
    /// The identity's key budget is spent; a key is back after this long.
    OverBudget(Duration),
    Failed(String),
}

impl KeyGenerator {
    /// The key budget of one identity under `limits`, in EC keys (off at rate 0).
    pub fn budget(limits: &Limits) -> Rate {
        Rate {
            per_second: limits.keygen_per_identity,
            burst: limits.keygen_burst_per_identity,
        }
    }

    /// What a key of `kind` costs of the budget.
    pub fn cost(kind: KeyKind) -> f64 {
        match kind {
            KeyKind::Rsa { .. } => RSA_KEY_COST,
            _ => 1.0,
        }
    }

    /// Makes a key of `kind` for `identity` (the key its rate limit is kept by).
    pub async fn generate(
        &self,
        kind: ServerKeygen,
        identity: &str,
        limits: &Limits,
    ) -> Result<(rcgen::KeyPair, KeyKind), KeygenError> {
        let (algorithm, key_kind) = match kind {
            ServerKeygen::EcP256 | ServerKeygen::Off => {
                (&rcgen::PKCS_ECDSA_P256_SHA256, KeyKind::EcP256)
            }
            ServerKeygen::EcP384 => (&rcgen::PKCS_ECDSA_P384_SHA384, KeyKind::EcP384),
            ServerKeygen::Rsa2048 => (&rcgen::PKCS_RSA_SHA256, KeyKind::Rsa { bits: 2048 }),
        };
        self.budgets
            .check_cost(
                identity.to_owned(),
                Self::budget(limits),
                Self::cost(key_kind),
                Instant::now(),
            )
            .map_err(KeygenError::OverBudget)?;
        let permit = if matches!(key_kind, KeyKind::Rsa { .. }) {
            Some(
                self.rsa_permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| KeygenError::Failed(e.to_string()))?,
            )
        } else {
            None
        };
        // Off the connection threads: RSA generation takes tens of milliseconds.
        let key = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            rcgen::KeyPair::generate_for(algorithm)
        })
        .await
        .map_err(|e| KeygenError::Failed(e.to_string()))?
        .map_err(|e| KeygenError::Failed(e.to_string()))?;
        Ok((key, key_kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_key_budget_per_identity_an_rsa_key_costs_ten() {
        let generator = KeyGenerator::default();
        let limits = Limits {
            keygen_per_identity: 0.001,
            keygen_burst_per_identity: 2.0 * RSA_KEY_COST,
            ..Limits::default()
        };
        for _ in 0..2 {
            let (key, kind) = generator
                .generate(ServerKeygen::Rsa2048, "device a", &limits)
                .await
                .unwrap();
            assert_eq!(kind, KeyKind::Rsa { bits: 2048 });
            assert!(key.serialize_der().len() > 1000);
        }
        match generator
            .generate(ServerKeygen::Rsa2048, "device a", &limits)
            .await
        {
            Err(KeygenError::OverBudget(wait)) => assert!(wait > Duration::from_secs(60)),
            other => panic!("a third RSA key: {:?}", other.map(|(_, k)| k)),
        }
        // One budget: an EC key for the same identity is refused too (it costs one, and the
        // bucket is empty).
        assert!(matches!(
            generator
                .generate(ServerKeygen::EcP256, "device a", &limits)
                .await,
            Err(KeygenError::OverBudget(_))
        ));
        // Positive controls: another identity's RSA key; EC keys cost one each (twenty of
        // them in the budget of two RSA keys).
        assert!(generator
            .generate(ServerKeygen::Rsa2048, "device b", &limits)
            .await
            .is_ok());
        for i in 0..20 {
            assert!(
                generator
                    .generate(ServerKeygen::EcP256, "device c", &limits)
                    .await
                    .is_ok(),
                "EC key {i}"
            );
        }
        assert!(generator
            .generate(ServerKeygen::EcP256, "device c", &limits)
            .await
            .is_err());
        // Rate limits off: no budget either.
        let off = Limits {
            keygen_per_identity: 0.0,
            ..limits
        };
        assert!(generator
            .generate(ServerKeygen::Rsa2048, "device a", &off)
            .await
            .is_ok());
    }

    #[test]
    fn the_default_budget_is_an_rsa_key_a_second_five_at_once() {
        let rate = KeyGenerator::budget(&Limits::default());
        let rsa = KeyGenerator::cost(KeyKind::Rsa { bits: 2048 });
        assert_eq!(rate.per_second / rsa, 1.0);
        assert_eq!(rate.burst / rsa, 5.0);
        assert_eq!(KeyGenerator::cost(KeyKind::EcP256), 1.0);
    }
}
