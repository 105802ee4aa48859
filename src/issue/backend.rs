//! The issuing backend, the only thing the request pipeline calls to get a certificate or a
//! `/cacerts` answer, without knowing which kind of label it serves:
//!
//! - `sign`: the label's local issuer;
//! - `forward`: the upstream, as a registration authority, within the request's deadline;
//! - `auto`: the upstream while it is up; the local issuer, bounded by the label's
//!   `fallback` allowance, when it cannot be reached, does not answer within the deadline,
//!   answers 503, or is known to be away (then at once: see [`super::health`]). Never when
//!   it refused the request or is misconfigured.
//!
//! Deadlines: a request carries how long its client waits ([`BUDGET_HEADER`], or
//! `limits.client_timeout_secs` when a device asks). The upstream is given less than what is
//! left of it, so the layer that can fall back decides before the child gives up; it is told
//! what it got in the same header, and does the same above it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use time::OffsetDateTime;

use super::fallback::Fallback;
use super::health::State;
use super::upstream::{CacertsCache, CachedChain, Upstream, UpstreamError, BUDGET_HEADER};
use super::{IssueError, Profile};
use crate::config::Mode;
use crate::error::RequestError;
use crate::est::{Csr, KeyKind};
use crate::metrics::Metrics;
use crate::policy::Grant;
use crate::runtime::{LabelRuntime, Runtime};

/// The longest budget a request may claim.
const MAX_BUDGET: Duration = Duration::from_secs(120);
/// Below this, the upstream is not asked at all.
const MIN_UPSTREAM_BUDGET: Duration = Duration::from_millis(50);

/// When the client of a request stops waiting.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    at: Instant,
    /// What the request's [`BUDGET_HEADER`] claims, taken only from a lower layer.
    claimed: Option<Instant>,
}

impl Deadline {
    /// `default` from the request's start (a device's), remembering what its
    /// [`BUDGET_HEADER`] claims until [`Deadline::for_client`] knows who sent it.
    pub fn from_request(headers: &HeaderMap, started: Instant, default: Duration) -> Deadline {
        let claimed = headers
            .get(BUDGET_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|millis| started + Duration::from_millis(millis).min(MAX_BUDGET));
        Deadline {
            at: started + default.min(MAX_BUDGET),
            claimed,
        }
    }

    /// The deadline for an authenticated client: a lower layer's (a registration authority)
    /// claimed budget holds; anyone else's is ignored. A device that could claim a short
    /// budget would make an `auto` label time out on purpose and sign locally what the
    /// layer above may refuse.
    pub fn for_client(self, lower_layer: bool) -> Deadline {
        match (lower_layer, self.claimed) {
            (true, Some(at)) => Deadline { at, claimed: None },
            _ => Deadline {
                at: self.at,
                claimed: None,
            },
        }
    }

    pub fn after(budget: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + budget,
            claimed: None,
        }
    }

    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// What the upstream is given: what is left, less a reserve for this layer's own work
    /// and the way back (a fifth, at least half a second, where the layer can sign locally
    /// after a timeout; a tenth, at least 200 ms, where it only relays).
    pub fn upstream_budget(&self, can_fall_back: bool) -> Duration {
        let left = self.remaining();
        let reserve = if can_fall_back {
            (left / 5).max(Duration::from_millis(500))
        } else {
            (left / 10).max(Duration::from_millis(200))
        };
        left.saturating_sub(reserve)
    }
}

/// What a request asks the issuing backend for.
pub struct IssueRequest<'a> {
    pub grant: &'a Grant,
    pub profile: &'a Profile,
    /// The SubjectPublicKeyInfo to certify (the CSR's, or a key made here).
    pub spki: &'a [u8],
    pub key_kind: KeyKind,
    pub csr: &'a Csr,
    pub generated: Option<&'a rcgen::KeyPair>,
}

/// A certificate obtained from a backend, with what the journal records of it.
pub struct Issuance {
    /// The issued certificate first, then whatever the backend's answer carried.
    pub certs: Vec<Vec<u8>>,
    pub serial: String,
    pub subject: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub sha256: String,
    /// `local` or `upstream NAME`.
    pub issued_by: String,
    /// For a local issuance, SHA-256 (hex) of the CA that signed.
    pub issuer_ca: Option<String>,
}

pub struct Backend {
    cacerts: Arc<CacertsCache>,
    metrics: Arc<Metrics>,
    /// Where upstream state is kept across restarts.
    dir: Option<PathBuf>,
}

impl Backend {
    /// A backend reporting to `metrics`, keeping upstream state in `dir` (if any).
    pub fn new(metrics: Arc<Metrics>, dir: Option<PathBuf>) -> Backend {
        let cacerts = CacertsCache::with_metrics(metrics.clone());
        Backend {
            cacerts: Arc::new(match &dir {
                Some(d) => cacerts.kept_in(d.clone()),
                None => cacerts,
            }),
            metrics,
            dir,
        }
    }

    /// Wires the upstreams of `runtime` before it serves: each takes the health its
    /// predecessor in `old` knew (same name and configuration), or else what an earlier run
    /// kept on disk. Upstreams of `auto` labels are probed at once, so that a layer learns
    /// the chain above before its first enrollment.
    pub fn attach(&self, runtime: &Runtime, old: Option<&Runtime>) {
        let previous = |name: &str| {
            old.into_iter()
                .flat_map(|o| o.labels())
                .filter_map(|l| l.upstream.as_ref())
                .find(|u| u.name == name)
                .cloned()
        };
        for label in runtime.labels() {
            let Some(upstream) = &label.upstream else {
                continue;
            };
            if let Some(old) = previous(&upstream.name) {
                if !Arc::ptr_eq(&old, upstream) {
                    upstream.health.adopt(&old.health);
                }
            }
            if let Some(dir) = &self.dir {
                upstream.health.keep_in(dir, &upstream.name);
            }
            if label.mode == Mode::Auto && upstream.health.state() == State::Unknown {
                self.learn_chain(upstream.clone(), label.upstream_label.clone());
            } else {
                upstream.ensure_probing();
            }
        }
    }

    /// Fetches the upstream's chain in the background (when there is a runtime to do it on).
    fn learn_chain(&self, upstream: Arc<Upstream>, label: Option<String>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let cache = self.cacerts.clone();
        handle.spawn(async move {
            let budget = upstream.request_timeout();
            let _ = cache.get(&upstream, label.as_deref(), budget).await;
        });
    }

    /// The cached chain of `upstream` for `label`, without asking (for the metrics).
    pub fn peek(&self, upstream: &Upstream, label: Option<&str>) -> Option<Arc<CachedChain>> {
        self.cacerts.peek(upstream, label)
    }

    /// The upstream's chain for a label that forwards: fresh, or asked for within the
    /// deadline, or (the upstream away) cached. An `auto` label takes its cached chain
    /// however old, since it keeps signing in that chain's name's stead.
    pub async fn upstream_chain(
        &self,
        label_rt: &LabelRuntime,
        deadline: Deadline,
    ) -> Result<Option<Arc<CachedChain>>, UpstreamError> {
        let Some(upstream) = &label_rt.upstream else {
            return Ok(None);
        };
        let label = label_rt.upstream_label.as_deref();
        let auto = label_rt.mode == Mode::Auto;
        match self
            .cacerts
            .get(upstream, label, deadline.upstream_budget(auto))
            .await
        {
            Ok(chain) => Ok(Some(chain)),
            Err(e) if auto => Ok(self.cacerts.peek(upstream, label).or_else(|| {
                tracing::debug!(upstream = %upstream.name, cause = %e, "upstream chain unknown");
                None
            })),
            Err(e) => Err(e),
        }
    }

    /// What `issuer` trusts on a label that forwards, beyond the label's own issuer: the CAs
    /// that may sign for this subtree according to the upstream's chain (see
    /// [`super::path::issuer_trust`]). `None` when the label does not forward, does not
    /// trust `issuer`, or the chain is not known.
    pub async fn path_issuers(
        &self,
        label_rt: &LabelRuntime,
        deadline: Deadline,
    ) -> Option<Arc<CachedChain>> {
        if !label_rt.trust_upstream_issuer {
            return None;
        }
        match self.upstream_chain(label_rt, deadline).await {
            Ok(chain) => chain,
            Err(e) => {
                tracing::warn!(upstream = label_rt.upstream.as_ref().map(|u| u.name.as_str()), cause = %e, "upstream CA unknown: its certificates cannot authenticate");
                None
            }
        }
    }

    /// The `/cacerts` answer of a label: the CAs that may sign for its subtree (see
    /// [`super::path`]).
    pub async fn cacerts_body(
        &self,
        label_rt: &LabelRuntime,
        deadline: Deadline,
    ) -> Result<Bytes, RequestError> {
        match (label_rt.mode, &label_rt.local, &label_rt.cacerts_body) {
            (Mode::Sign, _, Some(local)) => Ok(local.clone()),
            (Mode::Forward, _, _) => match self.upstream_chain(label_rt, deadline).await? {
                Some(chain) => Ok(chain.body.clone()),
                None => Err(no_ca()),
            },
            (Mode::Auto, Some(issuer), Some(local)) => {
                match self.upstream_chain(label_rt, deadline).await? {
                    Some(chain) => {
                        let all = super::path::merged(&chain.chain, issuer.chain());
                        let ders: Vec<&[u8]> = all.iter().map(|c| c.as_ref()).collect();
                        let pkcs7 = crate::est::pkcs7::encode_certs_only(&ders)
                            .map_err(|e| IssueError::Sign(e.to_string()))?;
                        Ok(Bytes::from(crate::est::body::encode_base64_lines(&pkcs7)))
                    }
                    None => Ok(local.clone()),
                }
            }
            _ => Err(no_ca()),
        }
    }

    /// Issues `request` for `label_rt`'s mode.
    pub async fn issue(
        &self,
        label_rt: &LabelRuntime,
        request: &IssueRequest<'_>,
        deadline: Deadline,
    ) -> Result<Issuance, RequestError> {
        match label_rt.mode {
            Mode::Sign => sign_locally(label_rt, request),
            Mode::Forward => self.forward(label_rt, request, deadline, false).await,
            Mode::Auto => {
                let upstream = label_rt
                    .upstream
                    .as_ref()
                    .ok_or_else(|| IssueError::Sign("no upstream for this label".into()))?;
                if upstream.health.state() == State::Away {
                    upstream.ensure_probing();
                    return fall_back(label_rt, request);
                }
                match self.forward(label_rt, request, deadline, true).await {
                    Err(RequestError::Upstream(e)) if e.allows_fallback() => {
                        tracing::info!(label = label_rt.display_name(), upstream = %upstream.name, cause = %e, "signing locally: the layer above is away");
                        fall_back(label_rt, request)
                    }
                    other => other,
                }
            }
        }
    }

    /// Forwards the request upstream as a registration authority: the child was authenticated
    /// and authorized here; upstream sees this layer's credential and the CSR.
    async fn forward(
        &self,
        label_rt: &LabelRuntime,
        request: &IssueRequest<'_>,
        deadline: Deadline,
        can_fall_back: bool,
    ) -> Result<Issuance, RequestError> {
        let upstream = label_rt
            .upstream
            .as_ref()
            .ok_or_else(|| IssueError::Sign("no upstream for this label".into()))?;
        if upstream.health.state() == State::Away {
            upstream.ensure_probing();
            return Err(upstream.away_error().into());
        }
        let budget = deadline.upstream_budget(can_fall_back);
        if budget < MIN_UPSTREAM_BUDGET {
            return Err(UpstreamError::Timeout {
                host: upstream.host.clone(),
                millis: budget.as_millis() as u64,
                retry_after: upstream.retry_after_secs,
            }
            .into());
        }
        // With a key made here (serverkeygen), ask upstream for it with a CSR of our own.
        let csr_der = match request.generated {
            Some(key) => super::local::request_for(request.grant, key)?,
            None => request.csr.der().to_vec(),
        };
        let asked = Instant::now();
        let answer = upstream
            .enroll_within(label_rt.upstream_label.as_deref(), &csr_der, budget)
            .await;
        self.metrics
            .upstream(&upstream.name, "simpleenroll", asked.elapsed(), &answer);
        let certs = match answer {
            Ok(certs) => certs,
            Err(e) => {
                if let Some(text) = e.upstream_text() {
                    tracing::info!(label = label_rt.display_name(), upstream = %upstream.name, host = %upstream.host, status = %e, upstream_reason = %text, "the layer above did not issue");
                }
                return Err(e.into());
            }
        };
        let malformed = |m: String| RequestError::Upstream(UpstreamError::Malformed(m));
        let leaf = certs
            .first()
            .ok_or_else(|| malformed("no certificate".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| malformed(format!("unparseable certificate: {e}")))?;
        if parsed.public_key().raw != request.spki {
            return Err(malformed(
                "the first certificate is not for the requested key".into(),
            ));
        }
        let subject = crate::est::Subject::from_x509_name(parsed.subject())
            .map(|s| s.to_string())
            .unwrap_or_else(|_| parsed.subject().to_string());
        Ok(Issuance {
            serial: crate::auth::client_cert::hex(parsed.raw_serial()),
            subject,
            not_before: parsed.validity().not_before.to_datetime(),
            not_after: parsed.validity().not_after.to_datetime(),
            sha256: crate::auth::client_cert::hex(
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf).as_ref(),
            ),
            issued_by: format!("upstream {}", upstream.name),
            issuer_ca: None,
            certs,
        })
    }
}

fn no_ca() -> RequestError {
    RequestError::Issue(IssueError::Sign("no CA for this label".into()))
}

/// Local signing in an `auto` label's fallback: never beyond its `fallback` allowance.
fn fall_back(
    label_rt: &LabelRuntime,
    request: &IssueRequest<'_>,
) -> Result<Issuance, RequestError> {
    let bound: &Fallback = label_rt.fallback.as_ref().ok_or_else(|| {
        IssueError::Sign("an auto label without a fallback allowance never signs locally".into())
    })?;
    bound.check(request.grant)?;
    sign_locally(label_rt, request)
}

fn sign_locally(
    label_rt: &LabelRuntime,
    request: &IssueRequest<'_>,
) -> Result<Issuance, RequestError> {
    let issuer = label_rt
        .local
        .as_ref()
        .ok_or_else(|| IssueError::Sign("no local issuer for this label".into()))?;
    let issued = issuer.issue(
        &request.grant.subject,
        &request.grant.sans,
        request.spki,
        request.key_kind,
        request.profile,
    )?;
    Ok(Issuance {
        serial: issued.serial,
        subject: request.grant.subject.to_string(),
        not_before: issued.not_before,
        not_after: issued.not_after,
        sha256: issued.sha256,
        certs: vec![issued.der],
        issued_by: "local".to_owned(),
        issuer_ca: Some(issuer.ca_sha256().to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_always_gets_less_than_the_client_gives() {
        let started = Instant::now();
        let mut headers = HeaderMap::new();
        let device = Deadline::from_request(&headers, started, Duration::from_secs(30));
        assert!(device.remaining() <= Duration::from_secs(30));
        // A forwarding layer keeps a tenth; an auto layer a fifth (at least 0.5 s), so the
        // one that can fall back decides first, whatever the depth.
        let forward = device.upstream_budget(false);
        assert!(forward < device.remaining() && forward > Duration::from_secs(26));
        headers.insert(
            BUDGET_HEADER,
            forward.as_millis().to_string().parse().unwrap(),
        );
        let claimed = Deadline::from_request(&headers, Instant::now(), Duration::from_secs(30));
        // Only a lower layer's claim holds.
        assert!(claimed.for_client(false).remaining() > forward);
        let middle = claimed.for_client(true);
        assert!(middle.remaining() <= forward);
        let auto = middle.upstream_budget(true);
        assert!(auto < middle.remaining() && auto > Duration::from_secs(20));
        // Short budgets keep their reserve; nothing is left below it.
        assert_eq!(
            Deadline::after(Duration::from_millis(400)).upstream_budget(true),
            Duration::ZERO
        );
        // A budget is never taken beyond two minutes, and garbage is the default.
        headers.insert(BUDGET_HEADER, "999999999".parse().unwrap());
        assert!(
            Deadline::from_request(&headers, started, Duration::from_secs(30))
                .for_client(true)
                .remaining()
                <= MAX_BUDGET
        );
        headers.insert(BUDGET_HEADER, "soon".parse().unwrap());
        assert!(
            Deadline::from_request(&headers, started, Duration::from_secs(3))
                .for_client(true)
                .remaining()
                <= Duration::from_secs(3)
        );
    }

    /// The reserve kept from the upstream's budget, exactly: a fifth (at least 0.5 s) where
    /// the layer can fall back, a tenth (at least 0.2 s) where it only relays. A deadline
    /// counts down from when it was made.
    #[test]
    fn the_reserve_is_a_fifth_or_a_tenth_of_what_is_left() {
        let close = |got: Duration, want_ms: u64| {
            let want = Duration::from_millis(want_ms);
            assert!(
                got <= want && got + Duration::from_millis(500) >= want,
                "{got:?}, not about {want:?}"
            );
        };
        let deadline = Deadline::after(Duration::from_secs(10));
        close(deadline.remaining(), 10_000);
        close(deadline.upstream_budget(true), 8_000);
        close(deadline.upstream_budget(false), 9_000);
        // Below 2.5 s (or 2 s) left, the floor of the reserve applies.
        let short = Deadline::after(Duration::from_secs(1));
        close(short.upstream_budget(true), 500);
        close(short.upstream_budget(false), 800);
        // From a lower layer's header, counted from when the request started; anyone
        // else's header is ignored.
        let mut headers = HeaderMap::new();
        headers.insert(BUDGET_HEADER, "4000".parse().unwrap());
        let started = Instant::now();
        let claimed = Deadline::from_request(&headers, started, Duration::from_secs(30));
        close(claimed.for_client(true).remaining(), 4_000);
        close(claimed.for_client(false).remaining(), 30_000);
        close(
            Deadline::from_request(&HeaderMap::new(), started, Duration::from_secs(3))
                .for_client(true)
                .remaining(),
            3_000,
        );
    }
}
