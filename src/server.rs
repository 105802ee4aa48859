//! The EST request handler: route → authenticate → read and check the CSR → authorize →
//! issue → journal → answer. Errors of every step go through `error::RequestError`.

use std::net::IpAddr;
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

use crate::auth::{self, CertIdentity, Credentials, Identity, TrustSet};
use crate::config::{Mode, ServerKeygen};
use crate::error::RequestError;
use crate::est::{self, media, Csr, KeyKind, Operation};
use crate::issue::{CacertsCache, IssueError, Profile, UpstreamError};
use crate::journal::{Journal, JournalEntry};
use crate::limits::{Rate, RateLimiter};
use crate::metrics::{LimitScope, Metrics, RefusedBecause, Snapshot};
use crate::policy::Grant;
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
    /// Upstream CA chains, kept across reconfigurations.
    cacerts: CacertsCache,
    /// Counters, gauges and histograms (Prometheus), kept across reconfigurations.
    metrics: Arc<Metrics>,
    /// Token buckets per client address and per identity, kept across reconfigurations (the
    /// rates come from the running configuration).
    address_limits: RateLimiter<IpAddr>,
    identity_limits: RateLimiter<String>,
}

impl App {
    pub fn new(runtime: Runtime, journal: Journal) -> App {
        let metrics = Arc::new(Metrics::new());
        App {
            runtime: ArcSwap::from_pointee(runtime),
            journal,
            cacerts: CacertsCache::with_metrics(metrics.clone()),
            metrics,
            address_limits: RateLimiter::new(crate::limits::MAX_TRACKED),
            identity_limits: RateLimiter::new(crate::limits::MAX_TRACKED),
        }
    }

    /// Replaces the running configuration; requests in flight keep the old one.
    pub fn swap(&self, runtime: Runtime) {
        self.runtime.store(Arc::new(runtime));
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
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
                        .cacerts
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
        self.metrics.render(&Snapshot {
            issuer_expiry,
            server_certificate_expiry: runtime.tls_not_after.map(seconds_left),
        })
    }

    /// Takes a token from `key`'s bucket of `scope`; 429 when it is empty.
    fn rate_limit(&self, runtime: &Runtime, key: RateKey) -> Result<(), RequestError> {
        let limits = &runtime.limits;
        let now = Instant::now();
        let scope = match key {
            RateKey::Address(_) => LimitScope::Address,
            RateKey::Identity(_) => LimitScope::Identity,
        };
        let checked = match key {
            RateKey::Address(ip) => self.address_limits.check(
                crate::limits::address_key(ip),
                Rate {
                    per_second: limits.rate_per_address,
                    burst: limits.burst_per_address,
                },
                now,
            ),
            RateKey::Identity(id) => self.identity_limits.check(
                id,
                Rate {
                    per_second: limits.rate_per_identity,
                    burst: limits.burst_per_identity,
                },
                now,
            ),
        };
        checked.map_err(|wait| {
            self.metrics.rate_limited(scope);
            RequestError::RateLimited {
                scope: match scope {
                    LimitScope::Address => "this address",
                    LimitScope::Identity => "this identity",
                },
                retry_after: crate::limits::retry_after_secs(wait),
            }
        })
    }
}

/// What a rate limit is kept by.
enum RateKey {
    Address(IpAddr),
    Identity(String),
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
        let started = Instant::now();
        let runtime = self.runtime.load_full();
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let health_probe = is_health_probe(&request, &connection);
        let mut trace = Trace::default();
        let result = self
            .dispatch(&runtime, request, &connection, &mut trace)
            .await;
        let elapsed_ms = crate::logging::millis(started.elapsed());
        let label = trace.label.as_deref().unwrap_or("-");
        let identity = trace.identity.as_deref().unwrap_or("-");
        let via = if connection.forwarded.is_some() {
            "api-proxy"
        } else {
            "tls"
        };
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
                    remote = %connection.remote, via, %method, %path, status = response.status().as_u16(),
                    label, identity, serial = trace.serial.as_deref().unwrap_or("-"),
                    elapsed_ms, "request served"
                );
                response
            }
            Err(error) => {
                let status = error.status();
                let text = error.to_string();
                if status.is_server_error() {
                    tracing::error!(remote = %connection.remote, via, %method, %path, status = status.as_u16(), label, identity, elapsed_ms, reason = %text, "request failed");
                } else {
                    tracing::info!(remote = %connection.remote, via, %method, %path, status = status.as_u16(), label, identity, elapsed_ms, reason = %text, "request refused");
                }
                error.into_response(trace.basic_realm.then_some(REALM))
            }
        }
    }
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

/// A client certificate chain verified for a label, kept for the connection it came on: a
/// kept-alive client (a lower layer's pooled RA connection above all) is not verified again
/// on every request. It holds while the label is the one it was verified for (a
/// configuration swap builds new labels), the upstream CA that vouched for it (if any) is the
/// one cached then, and no certificate on its path has expired. Grace identities are never
/// kept. The weak references keep the allocations, so an address is never that of another.
struct VerifiedPeer {
    label: Weak<LabelRuntime>,
    upstream_issuer: Option<Weak<TrustSet>>,
    identity: CertIdentity,
}

impl VerifiedPeer {
    fn holds_for(
        &self,
        label: &Arc<LabelRuntime>,
        upstream_issuer: Option<&Arc<TrustSet>>,
        now: OffsetDateTime,
    ) -> bool {
        let same_upstream = match (&self.upstream_issuer, upstream_issuer) {
            (None, None) => true,
            (Some(kept), Some(now)) => std::ptr::eq(kept.as_ptr(), Arc::as_ptr(now)),
            _ => false,
        };
        std::ptr::eq(self.label.as_ptr(), Arc::as_ptr(label))
            && same_upstream
            && now < self.identity.valid_until
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
    basic_realm: bool,
}

impl App {
    async fn dispatch(
        &self,
        runtime: &Runtime,
        request: Request<Incoming>,
        connection: &Connection,
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
                if !label_rt.anonymous_cacerts {
                    self.authenticate(runtime, label_rt, &request, connection, trace)
                        .await?;
                }
                Ok(est_answer(
                    media::PKCS7_MIME,
                    self.cacerts_body(label_rt).await?,
                ))
            }
            Operation::CsrAttrs => {
                if !label_rt.anonymous_cacerts {
                    self.authenticate(runtime, label_rt, &request, connection, trace)
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
                self.enroll(runtime, label_rt, operation, request, connection, trace)
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
        trace: &mut Trace,
    ) -> Result<Identity, RequestError> {
        let authorization = request
            .headers()
            .get(AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        // On a forwarding label, "issuer" is the upstream's issuing CA: its chain comes from
        // the cached upstream cacerts, and only matters when a certificate was presented.
        let upstream_chain = match (&label_rt.upstream, connection.peer_chain.is_some()) {
            (Some(upstream), true) if label_rt.trust_upstream_issuer => {
                match self
                    .cacerts
                    .get(upstream, label_rt.upstream_label.as_deref())
                    .await
                {
                    Ok(chain) => Some(chain),
                    Err(e) => {
                        tracing::warn!(upstream = %upstream.name, cause = %e, "upstream CA unknown: its certificates cannot authenticate");
                        None
                    }
                }
            }
            _ => None,
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
        let remembered = connection
            .memo
            .get::<VerifiedPeer>()
            .filter(|v| v.holds_for(label_rt, upstream_issuer, OffsetDateTime::now_utc()));
        let credentials = Credentials {
            peer_chain: connection.peer_chain.as_deref(),
            peer_verified: remembered.as_ref().map(|v| &v.identity),
            authorization,
        };
        let identity = auth::authenticate(
            label_rt.auth,
            &trust,
            &intermediates,
            &runtime.users,
            credentials,
        )
        .await?;
        if let Some(certificate) = identity.certificate.as_ref().filter(|c| !c.grace) {
            if remembered.is_none() {
                connection.memo.set(Arc::new(VerifiedPeer {
                    label: Arc::downgrade(label_rt),
                    upstream_issuer: upstream_issuer.map(Arc::downgrade),
                    identity: certificate.clone(),
                }));
            }
        }
        trace.identity = Some(identity.to_string());
        // Registration authorities (lower layers) send a whole subtree's requests as one
        // identity: a rule or their trust set exempts them.
        let unlimited = identity
            .certificate
            .as_ref()
            .is_some_and(|c| runtime.limits.unlimited_trust.contains(&c.trust))
            || label_rt.policy.is_registration_authority(&identity);
        if unlimited {
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

    async fn enroll(
        &self,
        runtime: &Runtime,
        label_rt: &Arc<LabelRuntime>,
        operation: Operation,
        request: Request<Incoming>,
        connection: &Connection,
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
            .authenticate(runtime, label_rt, &request, connection, trace)
            .await?;
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
        let profile = if grant.ca {
            &label_rt.ca_profile
        } else {
            &label_rt.profile
        };

        let generated = match (operation, label_rt.serverkeygen) {
            (Operation::ServerKeygen, kind) => Some(generate_key(kind).await?),
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
        let issuance = match label_rt.mode {
            Mode::Sign => self.sign_locally(label_rt, &request)?,
            Mode::Forward => self.forward(label_rt, &request).await?,
            Mode::Auto => match self.forward(label_rt, &request).await {
                Err(RequestError::Upstream(e)) if e.is_unreachable() => {
                    tracing::warn!(label = label_rt.display_name(), identity = %identity, cause = %e, "upstream away: signing locally");
                    self.sign_locally(label_rt, &request)?
                }
                other => other?,
            },
        };
        trace.serial = Some(issuance.serial.clone());
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
        };
        self.journal.record(&entry, expected).await?;

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

    fn sign_locally(
        &self,
        label_rt: &LabelRuntime,
        request: &IssueRequest<'_>,
    ) -> Result<Issuance, RequestError> {
        let issuer = label_rt.local.as_ref().ok_or_else(|| {
            RequestError::Issue(IssueError::Sign("no local issuer for this label".into()))
        })?;
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
        })
    }

    /// Forwards the request upstream as a registration authority: the child was authenticated
    /// and authorized here; upstream sees this layer's credential and the CSR.
    async fn forward(
        &self,
        label_rt: &LabelRuntime,
        request: &IssueRequest<'_>,
    ) -> Result<Issuance, RequestError> {
        let upstream = label_rt.upstream.as_ref().ok_or_else(|| {
            RequestError::Issue(IssueError::Sign("no upstream for this label".into()))
        })?;
        // With a key made here (serverkeygen), ask upstream for it with a CSR of our own.
        let csr_der = match request.generated {
            Some(key) => crate::issue::local::request_for(request.grant, key)?,
            None => request.csr.der().to_vec(),
        };
        let asked = Instant::now();
        let answer = upstream
            .enroll(label_rt.upstream_label.as_deref(), &csr_der)
            .await;
        self.metrics
            .upstream(&upstream.name, "simpleenroll", asked.elapsed(), &answer);
        let certs = answer?;
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
            certs,
        })
    }

    /// The `/cacerts` answer of a label: its own issuer's chain, or the upstream's (cached).
    async fn cacerts_body(&self, label_rt: &LabelRuntime) -> Result<Bytes, RequestError> {
        let upstream = match (&label_rt.upstream, &label_rt.cacerts_body) {
            (None, Some(local)) => return Ok(local.clone()),
            // auto, upstream away: enrollments are signed here, so the chain is ours.
            (Some(upstream), Some(local)) if !upstream.is_reachable() => return Ok(local.clone()),
            (Some(upstream), _) => upstream,
            (None, None) => {
                return Err(RequestError::Issue(IssueError::Sign(
                    "no CA for this label".into(),
                )))
            }
        };
        match self
            .cacerts
            .get(upstream, label_rt.upstream_label.as_deref())
            .await
        {
            Ok(chain) => Ok(chain.body.clone()),
            Err(e) => match &label_rt.cacerts_body {
                Some(local) if e.is_unreachable() => Ok(local.clone()),
                _ => Err(e.into()),
            },
        }
    }
}

/// What a request asks the issuing backend for.
struct IssueRequest<'a> {
    grant: &'a Grant,
    profile: &'a Profile,
    /// The SubjectPublicKeyInfo to certify (the CSR's, or a key made here).
    spki: &'a [u8],
    key_kind: KeyKind,
    csr: &'a Csr,
    generated: Option<&'a rcgen::KeyPair>,
}

/// A certificate obtained from a backend, with what the journal records of it.
struct Issuance {
    /// The issued certificate first, then whatever the backend's answer carried.
    certs: Vec<Vec<u8>>,
    serial: String,
    subject: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    sha256: String,
    issued_by: String,
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

async fn generate_key(kind: ServerKeygen) -> Result<(rcgen::KeyPair, KeyKind), RequestError> {
    let (algorithm, key_kind) = match kind {
        ServerKeygen::EcP256 | ServerKeygen::Off => {
            (&rcgen::PKCS_ECDSA_P256_SHA256, KeyKind::EcP256)
        }
        ServerKeygen::EcP384 => (&rcgen::PKCS_ECDSA_P384_SHA384, KeyKind::EcP384),
        ServerKeygen::Rsa2048 => (&rcgen::PKCS_RSA_SHA256, KeyKind::Rsa { bits: 2048 }),
    };
    // RSA generation takes tens of milliseconds: keep it off the async workers.
    let key = tokio::task::spawn_blocking(move || rcgen::KeyPair::generate_for(algorithm))
        .await
        .map_err(|e| RequestError::KeyGeneration(e.to_string()))?
        .map_err(|e| RequestError::KeyGeneration(e.to_string()))?;
    Ok((key, key_kind))
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}
