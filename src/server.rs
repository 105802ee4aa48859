//! The EST request handler: route → authenticate → read and check the CSR → authorize →
//! issue → journal → answer. Errors of every step go through `error::RequestError`.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::auth::chain::CaKey;
use crate::auth::{
    self, AuthError, CertIdentity, Credentials, Hierarchy, Identity, IssuanceIndex, LabelTrust,
    TrustSet,
};
use crate::config::{Mode, ServerKeygen};
use crate::error::RequestError;
use crate::est::{self, media, Csr, KeyKind, Operation};
use crate::issue::{Backend, Deadline, IssueError, IssueRequest, Profile};
use crate::journal::{Journal, JournalEntry};
use crate::limits::{Rate, RateLimiter};
use crate::metrics::{LimitScope, Metrics, RefusedBecause, Snapshot};
use crate::runtime::{LabelRuntime, Runtime};
use crate::transport::{Connection, ConnectionLimits, Service};

/// The realm named in Basic challenges.
const REALM: &str = "edge-est";
/// How much of an oversized body is read and thrown away before answering 413, so the client
/// sees the answer instead of a reset.
const DRAIN_CAP: usize = 1024 * 1024;

/// The running server: the current runtime (swapped whole on reconfiguration) and the
/// journal, which outlives every runtime.
pub struct App {
    runtime: ArcSwap<Runtime>,
    journal: Journal,
    /// Who issues (local, upstream, auto) and the upstreams' chains and health, kept across
    /// reconfigurations.
    backend: Backend,
    /// Counters, gauges and histograms (Prometheus), kept across reconfigurations.
    metrics: Arc<Metrics>,
    /// Token buckets per client address and per identity, kept across reconfigurations (the
    /// rates come from the running configuration).
    address_limits: RateLimiter<IpAddr>,
    identity_limits: RateLimiter<String>,
    /// Which label issued which certificate: what `issuer` means on a label (`auth::chain`).
    issuance: Arc<IssuanceIndex>,
    /// Permits for client chain verifications off the connection threads (long chains only,
    /// see `auth::caps::INLINE_CHAIN_CERTS`): a few at a time, on the blocking pool.
    chain_verifications: Arc<tokio::sync::Semaphore>,
    /// Client chains verified since start: on the connection thread, on the blocking pool.
    verified_inline: std::sync::atomic::AtomicU64,
    verified_off_thread: std::sync::atomic::AtomicU64,
    /// Server-side key generation: RSA keys a few at a time, within each identity's budget.
    keygen: crate::keygen::KeyGenerator,
    /// Failed authentications per address and per presented identity (shared with the
    /// password verification threads, see [`FailureLimits`]).
    failed_by_address: Arc<RateLimiter<IpAddr>>,
    failed_by_identity: Arc<RateLimiter<String>>,
    /// Certificates per label and requested subject (server-generated keys: `keygen`).
    name_limits: RateLimiter<String>,
    /// Leaf certificates (SHA-256) that authenticated: presented again (the handshake proved
    /// the key), they are verified as usual but not held back by the failure limits.
    known_leaves: std::sync::Mutex<lru::LruCache<[u8; 32], ()>>,
    /// Whether the manager of enrolled issuers runs (`issue::delegation`).
    delegation: std::sync::atomic::AtomicBool,
}

impl App {
    pub fn new(runtime: Runtime, journal: Journal) -> App {
        let metrics = Arc::new(Metrics::new());
        // Rebuilt from the journal, which records every issuance, local and forwarded.
        let issuance = Arc::new(IssuanceIndex::new());
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Err(e) = Journal::scan(journal.path(), |entry| issuance.record_entry(&entry, now)) {
            tracing::warn!(journal = %journal.path().display(), error = %e, "the journal cannot be read: no earlier certificate counts as issued by a label");
        }
        // Upstream state is kept next to the journal.
        let state_dir = journal.path().parent().map(Path::to_path_buf);
        let backend = Backend::new(metrics.clone(), state_dir);
        backend.attach(&runtime, None);
        App {
            issuance,
            runtime: ArcSwap::from_pointee(runtime),
            journal,
            backend,
            metrics,
            address_limits: RateLimiter::new(crate::limits::MAX_TRACKED),
            identity_limits: RateLimiter::new(crate::limits::MAX_TRACKED),
            chain_verifications: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
            )),
            verified_inline: Default::default(),
            verified_off_thread: Default::default(),
            keygen: Default::default(),
            failed_by_address: Arc::new(RateLimiter::new(crate::limits::MAX_TRACKED)),
            failed_by_identity: Arc::new(RateLimiter::new(crate::limits::MAX_TRACKED)),
            name_limits: RateLimiter::new(crate::limits::MAX_TRACKED),
            known_leaves: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(crate::limits::MAX_TRACKED)
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            delegation: Default::default(),
        }
    }

    /// Starts the manager of enrolled issuers, once (it follows configuration changes).
    pub fn start_delegation(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.delegation.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(crate::issue::delegation::manage(Arc::downgrade(self)));
        }
    }

    /// Client certificate chains verified since start (remembered outcomes not counted): on
    /// the connection threads, and on the blocking pool.
    pub fn client_chain_verifications(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.verified_inline.load(Relaxed),
            self.verified_off_thread.load(Relaxed),
        )
    }

    /// Replaces the running configuration; requests in flight keep the old one.
    pub fn swap(&self, runtime: Runtime) {
        let old = self.runtime.load_full();
        self.backend.attach(&runtime, Some(&old));
        self.runtime.store(Arc::new(runtime));
    }

    /// [`App::swap`] if `expected` is still in force; false if another swap came first.
    pub fn swap_if(&self, expected: &Arc<Runtime>, runtime: Runtime) -> bool {
        let runtime = Arc::new(runtime);
        self.backend.attach(&runtime, Some(expected));
        let previous = self.runtime.compare_and_swap(expected, runtime);
        Arc::ptr_eq(&previous, expected)
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// What this layer issued, by label and by signing CA (from the journal).
    pub fn issuance(&self) -> &IssuanceIndex {
        &self.issuance
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Requests routed to `operation` since start.
    pub fn requests(&self, operation: Operation) -> u64 {
        self.metrics.routed_count(operation)
    }

    /// TLS handshakes completed since start.
    pub fn tls_handshakes(&self) -> u64 {
        self.metrics.tls_handshakes()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sets the `edgeest_config_version` gauge (e.g. to the module twin's `$version`).
    pub fn set_config_version(&self, version: i64) {
        self.metrics.set_config_version(version);
    }

    /// Buckets kept by the per-address and per-identity rate limits (bounded by
    /// `limits::MAX_TRACKED` each).
    pub fn rate_limit_buckets(&self) -> (usize, usize) {
        (self.address_limits.len(), self.identity_limits.len())
    }

    /// The metrics in the Prometheus text format, with the certificate expiries of the
    /// running configuration.
    pub fn render_metrics(&self) -> String {
        let runtime = self.runtime.load();
        let now = OffsetDateTime::now_utc();
        let seconds_left = |t: OffsetDateTime| (t - now).as_seconds_f64();
        let mut issuer_expiry: Vec<(String, f64)> = runtime
            .labels()
            .filter_map(|l| {
                let not_after = match (&l.local, &l.upstream) {
                    (Some(local), _) => Some(local.not_after()),
                    (None, Some(upstream)) => self
                        .backend
                        .peek(upstream, l.upstream_label.as_deref())
                        .and_then(|c| {
                            x509_parser::parse_x509_certificate(c.chain.first()?)
                                .ok()
                                .map(|(_, cert)| cert.validity().not_after.to_datetime())
                        }),
                    (None, None) => None,
                };
                not_after.map(|t| (l.display_name().to_owned(), seconds_left(t)))
            })
            .collect();
        issuer_expiry.sort_by(|a, b| a.0.cmp(&b.0));
        let mut upstream_states: Vec<(String, &'static str)> = runtime
            .labels()
            .filter_map(|l| l.upstream.as_ref())
            .map(|u| (u.name.clone(), u.health.state().as_str()))
            .collect();
        upstream_states.sort();
        upstream_states.dedup();
        let enrolled_issuers = runtime
            .enrolled()
            .iter()
            .map(|e| (e.name.clone(), e.current.map(|(_, na)| seconds_left(na))))
            .collect();
        self.metrics.render(&Snapshot {
            issuer_expiry,
            server_certificate_expiry: runtime.tls_not_after.map(seconds_left),
            upstream_states,
            enrolled_issuers,
        })
    }

    /// Takes a token from `key`'s bucket; 429 when it is empty.
    fn rate_limit(&self, runtime: &Runtime, key: RateKey) -> Result<(), RequestError> {
        let limits = &runtime.limits;
        let now = Instant::now();
        let rate = |per_second, burst| Rate { per_second, burst };
        let (scope, checked) = match key {
            RateKey::Address(ip) => (
                LimitScope::Address,
                self.address_limits.check(
                    crate::limits::address_key(ip),
                    rate(limits.rate_per_address, limits.burst_per_address),
                    now,
                ),
            ),
            RateKey::Identity(id) => (
                LimitScope::Identity,
                self.identity_limits.check(
                    id,
                    rate(limits.rate_per_identity, limits.burst_per_identity),
                    now,
                ),
            ),
            RateKey::Name(name) => (
                LimitScope::Name,
                self.name_limits.check(
                    name,
                    rate(limits.enroll_per_name, limits.enroll_burst_per_name),
                    now,
                ),
            ),
        };
        checked.map_err(|wait| self.limited(scope, wait))
    }

    /// The 429 of `scope`, counted.
    fn limited(&self, scope: LimitScope, wait: Duration) -> RequestError {
        self.metrics.rate_limited(scope);
        RequestError::RateLimited {
            scope: match scope {
                LimitScope::Address => "requests from this address",
                LimitScope::Identity => "requests from this identity",
                LimitScope::FailedAuthAddress => "failed authentications from this address",
                LimitScope::FailedAuthIdentity => "failed authentications for this identity",
                LimitScope::Name => "certificates for this name",
                LimitScope::Keygen => "server-generated keys for this identity",
            },
            retry_after: crate::limits::retry_after_secs(wait),
        }
    }

    /// The failed-authentication limits for a request from `remote`.
    fn failure_limits(&self, runtime: &Runtime, remote: IpAddr) -> FailureLimits {
        let limits = &runtime.limits;
        FailureLimits {
            by_address: self.failed_by_address.clone(),
            by_identity: self.failed_by_identity.clone(),
            address: crate::limits::address_key(remote),
            address_rate: Rate {
                per_second: limits.failed_auth_per_address,
                burst: limits.failed_auth_burst_per_address,
            },
            identity_rate: Rate {
                per_second: limits.failed_auth_per_identity,
                burst: limits.failed_auth_burst_per_identity,
            },
            refused_by: std::sync::Mutex::new(None),
        }
    }
}

/// What a rate limit is kept by.
enum RateKey {
    Address(IpAddr),
    Identity(String),
    /// A label and a requested subject.
    Name(String),
}

/// The failed-authentication limits of one request: per address and per presented identity
/// (`user NAME`, or `certificate` and a hash of the leaf's subject). Before a credential that
/// is not known to be good is verified (argon2, chain), both buckets must hold a token; each
/// failure takes one from both. Credentials known to be good (a remembered password, a
/// certificate verified earlier on the connection) pass without either, so a fleet keeps
/// working while someone guesses from its address or at its user.
struct FailureLimits {
    by_address: Arc<RateLimiter<IpAddr>>,
    by_identity: Arc<RateLimiter<String>>,
    address: IpAddr,
    address_rate: Rate,
    identity_rate: Rate,
    /// Which limit refused, for the answer.
    refused_by: std::sync::Mutex<Option<LimitScope>>,
}

impl FailureLimits {
    fn ready(&self, identity: &str) -> Result<(), (LimitScope, Duration)> {
        let now = Instant::now();
        self.by_address
            .ready(&self.address, self.address_rate, now)
            .map_err(|w| (LimitScope::FailedAuthAddress, w))?;
        self.by_identity
            .ready(&identity.to_owned(), self.identity_rate, now)
            .map_err(|w| (LimitScope::FailedAuthIdentity, w))
    }

    fn charge(&self, identity: Option<&str>) {
        let now = Instant::now();
        self.by_address.charge(self.address, self.address_rate, now);
        if let Some(identity) = identity {
            self.by_identity
                .charge(identity.to_owned(), self.identity_rate, now);
        }
    }

    fn refused_scope(&self) -> LimitScope {
        self.refused_by
            .lock()
            .ok()
            .and_then(|s| *s)
            .unwrap_or(LimitScope::FailedAuthAddress)
    }
}

impl auth::basic::Attempts for FailureLimits {
    fn admit(&self, user: &str) -> Result<(), Duration> {
        self.ready(&format!("user {user}"))
            .map_err(|(scope, wait)| {
                if let Ok(mut refused) = self.refused_by.lock() {
                    *refused = Some(scope);
                }
                wait
            })
    }

    fn failed(&self, user: &str) {
        self.charge(Some(&format!("user {user}")));
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref());
    out
}

/// The presented identity of a client certificate for the failed-authentication limit: its
/// leaf's subject (whatever key or issuer a forger uses for it).
fn certificate_key(leaf: &rustls::pki_types::CertificateDer<'_>) -> String {
    let subject = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| c.subject().as_raw().to_vec())
        .unwrap_or_default();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &subject);
    format!(
        "certificate {}",
        crate::auth::client_cert::hex(&digest.as_ref()[..16])
    )
}

impl Service for App {
    fn tls_config(&self) -> Arc<rustls::ServerConfig> {
        self.runtime.load().tls.clone()
    }

    fn on_handshake(&self) {
        self.metrics.tls_handshake();
    }

    fn on_refused(&self, because: RefusedBecause) {
        self.metrics.connection_refused(because);
    }

    fn on_connection_open(&self) {
        self.metrics.connection_opened();
    }

    fn until_first_request(&self) -> Option<Box<dyn Send + Sync>> {
        // A fresh connection spends most of an enrollment in its handshake: a journal flush
        // meanwhile may wait for its entry (see `journal`).
        Some(Box::new(self.journal.opening()))
    }

    fn on_connection_close(&self) {
        self.metrics.connection_closed();
    }

    fn connection_limits(&self) -> ConnectionLimits {
        let rt = self.runtime.load();
        ConnectionLimits {
            handshake_timeout: Duration::from_secs(rt.limits.handshake_timeout_secs),
            header_timeout: Duration::from_secs(rt.limits.header_timeout_secs),
            max_per_address: rt.limits.max_connections_per_address,
        }
    }

    async fn call(
        &self,
        request: Request<Incoming>,
        connection: Arc<Connection>,
    ) -> Response<Full<Bytes>> {
        let runtime = self.runtime.load_full();
        let health_probe = is_health_probe(&request, &connection);
        // Logs the request when it ends, also if the client goes away first and the answer
        // is never finished (the future is dropped).
        let mut log = RequestLog {
            app: self,
            started: Instant::now(),
            remote: connection.remote,
            via: if connection.forwarded.is_some() {
                "api-proxy"
            } else {
                "tls"
            },
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            trace: Trace::default(),
            done: false,
        };
        let deadline = Deadline::from_request(
            request.headers(),
            log.started,
            Duration::from_secs(runtime.limits.client_timeout_secs),
        );
        let result = self
            .dispatch(&runtime, request, &connection, deadline, &mut log.trace)
            .await;
        log.done = true;
        let elapsed_ms = crate::logging::millis(log.started.elapsed());
        let (remote, via, method, path) = (log.remote, log.via, &log.method, &log.path);
        let trace = &log.trace;
        let label = trace.label.as_deref().unwrap_or("-");
        let identity = trace.identity.as_deref().unwrap_or("-");
        let status = match &result {
            Ok(response) => response.status(),
            Err(error) => error.status(),
        };
        self.metrics
            .request(label, trace.operation.unwrap_or("-"), status.as_u16());
        match result {
            Ok(response) if health_probe && trace.operation == Some("cacerts") => {
                tracing::debug!(remote = %connection.remote, %path, status = response.status().as_u16(), elapsed_ms, "health probe served");
                response
            }
            Ok(response) => {
                tracing::info!(
                    %remote, via, %method, %path, status = response.status().as_u16(),
                    label, identity, serial = trace.serial.as_deref().unwrap_or("-"),
                    issued_by = trace.issued_by.as_deref().unwrap_or("-"),
                    elapsed_ms, "request served"
                );
                response
            }
            Err(error) => {
                let status = error.status();
                let text = error.to_string();
                if status.is_server_error() {
                    tracing::error!(%remote, via, %method, %path, status = status.as_u16(), label, identity, elapsed_ms, reason = %text, "request failed");
                } else {
                    tracing::info!(%remote, via, %method, %path, status = status.as_u16(), label, identity, elapsed_ms, reason = %text, "request refused");
                }
                error.into_response(trace.basic_realm.then_some(REALM))
            }
        }
    }
}

/// A lower layer (a registration authority, by a rule or by its trust set): it sends a whole
/// subtree's requests under one identity, and its budget header is believed.
fn is_lower_layer(runtime: &Runtime, label_rt: &LabelRuntime, identity: &Identity) -> bool {
    identity
        .certificate
        .as_ref()
        .is_some_and(|c| runtime.limits.unlimited_trust.contains(&c.trust))
        || label_rt.policy.is_registration_authority(identity)
}

/// `edge-est health` probing from loopback over TLS: its successful `cacerts` is logged at
/// debug, not info. Anything else it asks, or the same from elsewhere, is logged as usual.
fn is_health_probe(request: &Request<Incoming>, connection: &Connection) -> bool {
    connection.forwarded.is_none()
        && connection.remote.ip().is_loopback()
        && request.method() == http::Method::GET
        && request
            .headers()
            .get(http::header::USER_AGENT)
            .is_some_and(|ua| ua.as_bytes() == crate::health::PROBE_USER_AGENT.as_bytes())
}

/// The status counted for a request whose client went away before its answer (nginx's).
pub const ABANDONED: u16 = 499;

/// One log line per request, written by [`App::call`] when the answer is ready, or here
/// when the request is dropped before that (its client closed the connection, or the
/// connection was cut off).
struct RequestLog<'a> {
    app: &'a App,
    started: Instant,
    remote: std::net::SocketAddr,
    via: &'static str,
    method: http::Method,
    path: String,
    trace: Trace,
    done: bool,
}

impl Drop for RequestLog<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let label = self.trace.label.as_deref().unwrap_or("-");
        let identity = self.trace.identity.as_deref().unwrap_or("-");
        self.app
            .metrics
            .request(label, self.trace.operation.unwrap_or("-"), ABANDONED);
        tracing::info!(
            remote = %self.remote, via = self.via, method = %self.method, path = %self.path,
            status = ABANDONED, label, identity,
            elapsed_ms = crate::logging::millis(self.started.elapsed()),
            "request abandoned: the client went away before the answer"
        );
    }
}

/// What the verification of a client certificate chain for a label found, kept for the
/// connection it came on: a kept-alive client (a lower layer's pooled RA connection above all)
/// is not verified again on every request, and neither is a chain that failed (a client
/// pipelining requests with a hostile chain costs one verification, not one a request). It
/// holds while the label is the one it was verified for (a configuration swap builds new
/// labels), the upstream CA that vouched for it (if any) is the one cached then, and until
/// `until`: for an identity, the first expiry on its path; for a failure,
/// [`FAILED_VERIFICATION_KEPT`] (a chain that was not yet valid may become so). Grace
/// identities are never kept. The weak references keep the allocations, so an address is
/// never that of another.
#[derive(Clone)]
struct VerifiedPeer {
    label: Weak<LabelRuntime>,
    upstream_issuer: Option<Weak<TrustSet>>,
    /// The identity, or why the chain was refused (an `AuthError::Certificate` text).
    outcome: Result<CertIdentity, String>,
    until: OffsetDateTime,
}

/// How long a connection remembers that its chain failed verification for a label.
const FAILED_VERIFICATION_KEPT: time::Duration = time::Duration::seconds(60);
/// Verification outcomes a connection keeps (one per label and upstream issuer; the oldest
/// goes first).
const KEPT_OUTCOMES: usize = 16;

/// Everything a connection keeps of its chain's verifications (in its `Memo`).
#[derive(Clone, Default)]
struct VerifiedPeers(Vec<VerifiedPeer>);

impl VerifiedPeer {
    fn holds_for(
        &self,
        label: &Arc<LabelRuntime>,
        upstream_issuer: Option<&Arc<TrustSet>>,
        now: OffsetDateTime,
    ) -> bool {
        self.is_for(label, upstream_issuer) && now < self.until
    }

    fn is_for(&self, label: &Arc<LabelRuntime>, upstream_issuer: Option<&Arc<TrustSet>>) -> bool {
        let same_upstream = match (&self.upstream_issuer, upstream_issuer) {
            (None, None) => true,
            (Some(kept), Some(now)) => std::ptr::eq(kept.as_ptr(), Arc::as_ptr(now)),
            _ => false,
        };
        std::ptr::eq(self.label.as_ptr(), Arc::as_ptr(label)) && same_upstream
    }
}

/// What the request log line says about a request, filled in as it goes.
#[derive(Default)]
struct Trace {
    label: Option<String>,
    /// The operation routed to, for the metrics.
    operation: Option<&'static str>,
    identity: Option<String>,
    serial: Option<String>,
    /// `local` or `upstream NAME`.
    issued_by: Option<String>,
    basic_realm: bool,
}

impl App {
    async fn dispatch(
        &self,
        runtime: &Runtime,
        request: Request<Incoming>,
        connection: &Connection,
        deadline: Deadline,
        trace: &mut Trace,
    ) -> Result<Response<Full<Bytes>>, RequestError> {
        let routed = est::route::route(request.uri().path());
        if let Ok((label, operation)) = &routed {
            trace.operation = Some(operation.as_str());
            trace.label = runtime.label(label).map(|l| l.display_name().to_owned());
        }
        // Before anything that costs: no password check, no CSR parsing for a flood. A client
        // that proved a certificate's key in the handshake is checked against its identity's
        // limit instead (after a chain check that costs far less than a handshake): a lower
        // layer forwards a whole layer's enrollments from one address.
        if connection.peer_chain.is_none() {
            self.rate_limit(runtime, RateKey::Address(connection.remote.ip()))?;
        }
        // Through the API proxy's socket: a forwarded client certificate that cannot be read
        // is refused, never taken for "no certificate".
        if let Some(reason) = connection
            .forwarded
            .as_ref()
            .and_then(|f| f.client_cert_error.as_ref())
        {
            return Err(RequestError::ForwardedCertificate(reason.clone()));
        }
        let (label, operation) = routed.map_err(|e| RequestError::NotFound(e.to_string()))?;
        let label_rt = runtime.label(&label).ok_or_else(|| {
            RequestError::NotFound(match &label {
                Some(l) => format!("no EST label \"{l}\" here"),
                None => "this server serves EST only under a label: /.well-known/est/<label>/<operation>".to_owned(),
            })
        })?;
        self.metrics.routed(operation);
        trace.basic_realm = label_rt.auth.basic;
        if request.method() != operation.method() {
            return Err(RequestError::MethodNotAllowed {
                operation: operation.as_str(),
                allowed: operation.method(),
            });
        }
        match operation {
            Operation::CaCerts => {
                // A claimed budget is believed only from a lower layer (authenticated here where
                // `/cacerts` is not anonymous): a device's short claim would make this layer time
                // out asking the layer above, and take it for away.
                let lower_layer = if label_rt.anonymous_cacerts {
                    false
                } else {
                    let identity = self
                        .authenticate(runtime, label_rt, &request, connection, deadline, trace)
                        .await?;
                    is_lower_layer(runtime, label_rt, &identity)
                };
                let deadline = deadline.for_client(lower_layer);
                Ok(est_answer(
                    media::PKCS7_MIME,
                    self.backend.cacerts_body(label_rt, deadline).await?,
                ))
            }
            Operation::CsrAttrs => {
                if !label_rt.anonymous_cacerts {
                    self.authenticate(runtime, label_rt, &request, connection, deadline, trace)
                        .await?;
                }
                Ok(match &label_rt.csrattrs_body {
                    Some(body) => est_answer(media::CSRATTRS, body.clone()),
                    None => {
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = StatusCode::NO_CONTENT;
                        response
                    }
                })
            }
            Operation::SimpleEnroll | Operation::SimpleReenroll | Operation::ServerKeygen => {
                self.enroll(
                    runtime, label_rt, operation, request, connection, deadline, trace,
                )
                .await
            }
        }
    }

    async fn authenticate(
        &self,
        runtime: &Runtime,
        label_rt: &Arc<LabelRuntime>,
        request: &Request<Incoming>,
        connection: &Connection,
        deadline: Deadline,
        trace: &mut Trace,
    ) -> Result<Identity, RequestError> {
        let authorization = request
            .headers()
            .get(AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        // On a label that forwards, "issuer" also means the CAs that may sign for this
        // subtree above (see `issue::path`): from the upstream's chain, which only matters
        // when a certificate was presented.
        let upstream_chain = if connection.peer_chain.is_some() {
            self.backend.path_issuers(label_rt, deadline).await
        } else {
            None
        };
        let (trust, intermediates) = match &upstream_chain {
            Some(chain) => {
                let mut trust = label_rt.trust.clone();
                trust.push(chain.issuer_trust.clone());
                let mut intermediates = label_rt.known_intermediates.clone();
                intermediates.extend(chain.chain.iter().cloned());
                (
                    std::borrow::Cow::Owned(trust),
                    std::borrow::Cow::Owned(intermediates),
                )
            }
            None => (
                std::borrow::Cow::Borrowed(label_rt.trust.as_slice()),
                std::borrow::Cow::Borrowed(label_rt.known_intermediates.as_slice()),
            ),
        };
        let upstream_issuer = upstream_chain.as_ref().map(|c| &c.issuer_trust);
        // The hierarchy around this label: the issuing CAs whose CA certificates go to
        // devices (ours, and every CA that may sign for this subtree above: `issue::path`),
        // and `issuer` = this label's issuance.
        let issuing_cas: std::borrow::Cow<'_, [CaKey]> = match &upstream_chain {
            Some(chain) => {
                let mut all = runtime.issuing_cas.clone();
                all.extend(
                    crate::issue::path::signing_cas(&chain.chain)
                        .iter()
                        .filter_map(CaKey::of),
                );
                std::borrow::Cow::Owned(all)
            }
            None => std::borrow::Cow::Borrowed(runtime.issuing_cas.as_slice()),
        };
        // Failed authentication is limited per address and per presented identity: a
        // certificate that needs verifying (a leaf not seen to authenticate before) waits for
        // both buckets (a password is checked by the verification thread, right before
        // argon2), and each failure takes a token.
        let failures = Arc::new(self.failure_limits(runtime, connection.remote.ip()));
        let leaf_hash = connection
            .peer_chain
            .as_deref()
            .and_then(|chain| chain.first())
            .map(|leaf| sha256(leaf));
        let known_leaf = leaf_hash.is_some_and(|h| {
            self.known_leaves
                .lock()
                .is_ok_and(|mut known| known.get(&h).is_some())
        });
        let certificate_key = match connection.peer_chain.as_deref() {
            Some([leaf, ..]) if label_rt.auth.certificate && !known_leaf => {
                Some(certificate_key(leaf))
            }
            _ => None,
        };
        if let Some(key) = &certificate_key {
            failures
                .ready(key)
                .map_err(|(scope, wait)| self.limited(scope, wait))?;
        }
        // The chain is verified here (or its outcome remembered), so that `auth` never
        // verifies on the connection thread what could take long.
        let peer_verified = match connection.peer_chain.as_deref() {
            Some(chain) if !chain.is_empty() && label_rt.auth.certificate => {
                let verified = self
                    .verify_peer(
                        label_rt,
                        upstream_issuer,
                        chain,
                        PeerAnchors {
                            trust: &trust,
                            intermediates: &intermediates,
                            issuing_cas: &issuing_cas,
                        },
                        connection,
                    )
                    .await;
                match verified {
                    Ok(identity) => Some(identity),
                    Err(error) => {
                        failures.charge(certificate_key.as_deref());
                        return Err(error.into());
                    }
                }
            }
            _ => None,
        };
        let credentials = Credentials {
            peer_chain: connection.peer_chain.as_deref(),
            peer_verified: peer_verified.as_ref(),
            authorization,
            attempts: failures.clone(),
        };
        let label_trust = LabelTrust {
            sets: &trust,
            module_sets: &label_rt.module_sets,
            intermediates: &intermediates,
            hierarchy: Hierarchy {
                issuing_cas: &issuing_cas,
                index: Some(&self.issuance),
                issuer_labels: &label_rt.issuer_labels,
            },
        };
        let authenticated =
            auth::authenticate(label_rt.auth, &label_trust, &runtime.users, credentials).await;
        let identity = match authenticated {
            Ok(identity) => identity,
            Err(AuthError::TooManyFailures(wait)) => {
                return Err(self.limited(failures.refused_scope(), wait))
            }
            Err(error) => {
                match &error {
                    AuthError::Certificate(_) => failures.charge(certificate_key.as_deref()),
                    AuthError::MalformedBasic => failures.charge(None),
                    // A wrong password was counted by the verification thread; a missing
                    // credential is the challenge step of clients like libest's.
                    _ => {}
                }
                return Err(error.into());
            }
        };
        if identity.certificate.as_ref().is_some_and(|c| !c.grace) {
            if let (Some(hash), false) = (leaf_hash, known_leaf) {
                if let Ok(mut known) = self.known_leaves.lock() {
                    known.put(hash, ());
                }
            }
        }
        trace.identity = Some(identity.to_string());
        // Registration authorities (lower layers) send a whole subtree's requests as one
        // identity: exempt.
        if is_lower_layer(runtime, label_rt, &identity) {
            return Ok(identity);
        }
        let key = match (&identity.certificate, &identity.user) {
            (Some(cert), _) => format!("certificate {} {}", cert.trust, cert.serial),
            (None, Some(user)) => format!("user {user}"),
            (None, None) => "anonymous".to_owned(),
        };
        self.rate_limit(runtime, RateKey::Identity(key))?;
        Ok(identity)
    }

    /// Verifies the connection's client certificate chain for a label, or recalls what an
    /// earlier verification on the same connection found (see [`VerifiedPeer`]). Chains over
    /// `auth::caps` were refused before (handshake, forwarded header); chains longer than
    /// `INLINE_CHAIN_CERTS` are verified on the blocking pool, a few at a time, so they never
    /// hold up the other connections of this connection thread.
    async fn verify_peer(
        &self,
        label_rt: &Arc<LabelRuntime>,
        upstream_issuer: Option<&Arc<TrustSet>>,
        chain: &[rustls::pki_types::CertificateDer<'static>],
        anchors: PeerAnchors<'_>,
        connection: &Connection,
    ) -> Result<CertIdentity, auth::AuthError> {
        let PeerAnchors {
            trust,
            intermediates,
            issuing_cas,
        } = anchors;
        let now = OffsetDateTime::now_utc();
        let kept = connection.memo.get::<VerifiedPeers>();
        if let Some(peer) = kept
            .iter()
            .flat_map(|k| k.0.iter())
            .find(|p| p.holds_for(label_rt, upstream_issuer, now))
        {
            return peer.outcome.clone().map_err(auth::AuthError::Certificate);
        }
        let grace = label_rt.auth.grace_expired;
        // A chain over `auth::caps` never gets here: the TLS handshake refuses it
        // (`transport::tls`), and so does the proxy socket's header reading (`transport::proxy`).
        let outcome = match chain.len() {
            n if n <= auth::caps::INLINE_CHAIN_CERTS => {
                self.verified_inline
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let label_trust = LabelTrust {
                    sets: trust,
                    module_sets: &label_rt.module_sets,
                    intermediates,
                    hierarchy: Hierarchy {
                        issuing_cas,
                        index: Some(&self.issuance),
                        issuer_labels: &label_rt.issuer_labels,
                    },
                };
                auth::client_cert::verify_for_label(
                    chain,
                    &label_trust,
                    std::time::SystemTime::now(),
                    grace,
                )
            }
            _ => {
                let permit = self
                    .chain_verifications
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| auth::AuthError::Certificate("the server is stopping".into()))?;
                self.verified_off_thread
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (chain, trust, intermediates, issuing_cas) = (
                    chain.to_vec(),
                    trust.to_vec(),
                    intermediates.to_vec(),
                    issuing_cas.to_vec(),
                );
                let (module_sets, issuer_labels, index) = (
                    label_rt.module_sets.clone(),
                    label_rt.issuer_labels.clone(),
                    self.issuance.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    let label_trust = LabelTrust {
                        sets: &trust,
                        module_sets: &module_sets,
                        intermediates: &intermediates,
                        hierarchy: Hierarchy {
                            issuing_cas: &issuing_cas,
                            index: Some(&index),
                            issuer_labels: &issuer_labels,
                        },
                    };
                    auth::client_cert::verify_for_label(
                        &chain,
                        &label_trust,
                        std::time::SystemTime::now(),
                        grace,
                    )
                })
                .await
                .unwrap_or_else(|e| Err(format!("verification failed: {e}")))
            }
        };
        let until = match &outcome {
            Ok(identity) if !identity.grace => Some(identity.valid_until),
            Ok(_) => None,
            Err(_) => Some(now + FAILED_VERIFICATION_KEPT),
        };
        if let Some(until) = until {
            let mut peers: Vec<VerifiedPeer> = kept
                .map(|k| k.0.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|p| !p.is_for(label_rt, upstream_issuer) && p.label.strong_count() > 0)
                .collect();
            if peers.len() >= KEPT_OUTCOMES {
                peers.remove(0);
            }
            peers.push(VerifiedPeer {
                label: Arc::downgrade(label_rt),
                upstream_issuer: upstream_issuer.map(Arc::downgrade),
                outcome: outcome.clone(),
                until,
            });
            connection.memo.set(Arc::new(VerifiedPeers(peers)));
        }
        outcome.map_err(auth::AuthError::Certificate)
    }

    // The request's parts, each used at a different step: bundling them would only rename them.
    #[allow(clippy::too_many_arguments)]
    async fn enroll(
        &self,
        runtime: &Runtime,
        label_rt: &Arc<LabelRuntime>,
        operation: Operation,
        request: Request<Incoming>,
        connection: &Connection,
        deadline: Deadline,
        trace: &mut Trace,
    ) -> Result<Response<Full<Bytes>>, RequestError> {
        let started = Instant::now();
        if operation == Operation::ServerKeygen && label_rt.serverkeygen == ServerKeygen::Off {
            return Err(RequestError::NotFound(format!(
                "serverkeygen is not offered on label {}",
                label_rt.display_name()
            )));
        }
        // A local signing reaches the journal within a few hundred microseconds of CPU: a flush
        // starting meanwhile may wait for its entry (see `journal`). Announced this early (not
        // after authentication or the body: measured, that lost most of the grouping), a
        // slow body or an argon2 check can make a flush wait its whole window: bounded, and
        // only while others are under way. Forwarded ones wait on the upstream for longer.
        let expected = (label_rt.mode == Mode::Sign).then(|| self.journal.expect());
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if !media::is_pkcs10(content_type.as_deref()) {
            return Err(RequestError::UnsupportedMediaType(
                content_type.unwrap_or_default(),
            ));
        }
        let limit = runtime.limits.max_body_bytes;
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(declared) = declared.filter(|n| *n > limit as u64) {
            // Read and drop a body we can afford to, so the client reads our 413 rather than
            // a reset; past that, close at once.
            if declared <= (limit + DRAIN_CAP) as u64 {
                let timeout = Duration::from_secs(runtime.limits.body_timeout_secs);
                read_body(request.into_body(), limit, timeout).await?;
            }
            return Err(RequestError::BodyTooLarge(limit));
        }
        let identity = self
            .authenticate(runtime, label_rt, &request, connection, deadline, trace)
            .await?;
        let deadline = deadline.for_client(is_lower_layer(runtime, label_rt, &identity));
        let body = read_body(
            request.into_body(),
            limit,
            Duration::from_secs(runtime.limits.body_timeout_secs),
        )
        .await?;
        let der = est::body::decode_request_body(&body)?;
        let csr = Csr::from_der(&der)?;
        let grant =
            label_rt
                .policy
                .authorize(&identity, &csr, operation == Operation::SimpleReenroll)?;
        let sub_ca_profile = match &grant.sub_ca {
            Some(granted) => {
                // A CA below this layer's own has a smaller pathlen (RFC 5280 4.2.1.9).
                if let Some(issuer) = label_rt.local.as_ref() {
                    if !issuer.can_issue_ca(granted.path_len) {
                        return Err(RequestError::Refused(
                            crate::policy::Refusal::SubCaBeyondIssuer {
                                requested: granted.path_len,
                                issuer: issuer.path_len().unwrap_or(0),
                            },
                        ));
                    }
                }
                Some(Profile::sub_ca(granted))
            }
            None => None,
        };
        let profile = match &sub_ca_profile {
            Some(profile) => profile,
            None if grant.ca => &label_rt.ca_profile,
            None => &label_rt.profile,
        };
        // One device enrolling its name over and over (one identity asking for keys: within
        // its key budget, in `generate_key`).
        self.rate_limit(
            runtime,
            RateKey::Name(format!("{} {}", label_rt.display_name(), grant.subject)),
        )?;
        let generated = match (operation, label_rt.serverkeygen) {
            (Operation::ServerKeygen, kind) => {
                Some(self.generate_key(runtime, &identity, kind).await?)
            }
            _ => None,
        };
        let (spki, key_kind) = match &generated {
            Some((key, kind)) => (rcgen::PublicKeyData::subject_public_key_info(key), *kind),
            None => (csr.spki_der().to_vec(), csr.key()),
        };
        let request = IssueRequest {
            grant: &grant,
            profile,
            spki: &spki,
            key_kind,
            csr: &csr,
            generated: generated.as_ref().map(|(k, _)| k),
        };
        let issuance = self.backend.issue(label_rt, &request, deadline).await?;
        trace.serial = Some(issuance.serial.clone());
        trace.issued_by = Some(issuance.issued_by.clone());
        let grace_renewal = identity.certificate.as_ref().is_some_and(|c| c.grace);
        if let Some(cert) = identity.certificate.as_ref().filter(|c| c.grace) {
            tracing::warn!(
                label = label_rt.display_name(), identity = %identity,
                expired_serial = %cert.serial, expired_at = %rfc3339(cert.not_after),
                serial = %issuance.serial,
                "grace renewal: a certificate that has expired renewed itself within the label's grace window"
            );
        }

        let entry = JournalEntry {
            time: rfc3339(OffsetDateTime::now_utc()),
            serial: issuance.serial.clone(),
            subject: issuance.subject.clone(),
            sans: grant.sans.iter().map(ToString::to_string).collect(),
            label: label_rt.name.as_ref().map(|l| l.as_str().to_owned()),
            operation: operation.as_str().to_owned(),
            identity: identity.to_string(),
            profile: profile.name.clone(),
            not_before: rfc3339(issuance.not_before),
            not_after: rfc3339(issuance.not_after),
            sha256: issuance.sha256.clone(),
            certificate: base64::engine::general_purpose::STANDARD.encode(&issuance.certs[0]),
            issued_by: issuance.issued_by.clone(),
            grace_renewal,
            issuer_ca: issuance.issuer_ca.clone(),
        };
        self.journal.record(&entry, expected).await?;
        // From now on `issuer` on this label knows it (renewals, module Edge CAs).
        self.issuance.record_issued(&entry);

        let certs: Vec<&[u8]> = issuance.certs.iter().map(Vec::as_slice).collect();
        let pkcs7 = est::pkcs7::encode_certs_only(&certs)
            .map_err(|e| RequestError::Issue(IssueError::Sign(e.to_string())))?;
        let backend = if issuance.issued_by == "local" {
            "local"
        } else {
            "upstream"
        };
        self.metrics
            .issuance(label_rt.display_name(), backend, started.elapsed());
        Ok(match generated {
            Some((key, _)) => {
                let multipart = est::multipart::serverkeygen_answer(&key.serialize_der(), &pkcs7);
                let mut response = Response::new(Full::new(Bytes::from(multipart.body)));
                if let Ok(v) = HeaderValue::from_str(&multipart.content_type) {
                    response.headers_mut().insert(CONTENT_TYPE, v);
                }
                response
            }
            None => est_answer(
                media::PKCS7_CERTS_ONLY,
                Bytes::from(est::body::encode_base64_lines(&pkcs7)),
            ),
        })
    }

    /// A key made here for `/serverkeygen`, within the identity's key budget (429 past it;
    /// see `keygen`).
    async fn generate_key(
        &self,
        runtime: &Runtime,
        identity: &Identity,
        kind: ServerKeygen,
    ) -> Result<(rcgen::KeyPair, KeyKind), RequestError> {
        let key = match (&identity.certificate, &identity.user) {
            (Some(cert), _) => format!("certificate {} {}", cert.trust, cert.serial),
            (None, Some(user)) => format!("user {user}"),
            (None, None) => "anonymous".to_owned(),
        };
        match self.keygen.generate(kind, &key, &runtime.limits).await {
            Ok(generated) => Ok(generated),
            Err(crate::keygen::KeygenError::OverBudget(wait)) => {
                Err(self.limited(LimitScope::Keygen, wait))
            }
            Err(crate::keygen::KeygenError::Failed(e)) => Err(RequestError::KeyGeneration(e)),
        }
    }
}

/// A 200 answer with a base64 body, `Content-Transfer-Encoding` included for old clients.
fn est_answer(content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        "content-transfer-encoding",
        HeaderValue::from_static("base64"),
    );
    response
}

/// Reads a body of at most `limit` bytes within `timeout`. Past the limit the rest is read
/// and dropped up to [`DRAIN_CAP`] so that the client gets to read our 413.
async fn read_body(body: Incoming, limit: usize, timeout: Duration) -> Result<Bytes, RequestError> {
    let read = async move {
        let mut body = body;
        let mut buffer = BytesMut::new();
        let mut dropped = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| RequestError::BodyRead(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if dropped == 0 && buffer.len() + data.len() <= limit {
                buffer.extend_from_slice(&data);
            } else {
                dropped += data.len();
                if dropped > DRAIN_CAP {
                    break;
                }
            }
        }
        if dropped > 0 {
            return Err(RequestError::BodyTooLarge(limit));
        }
        Ok(buffer.freeze())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| RequestError::BodyTimeout)?
}

/// What a client chain is verified against on a label (see `App::verify_peer`).
struct PeerAnchors<'a> {
    trust: &'a [Arc<TrustSet>],
    intermediates: &'a [rustls::pki_types::CertificateDer<'static>],
    issuing_cas: &'a [CaKey],
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}
