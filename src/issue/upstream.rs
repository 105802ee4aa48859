//! The forwarding backend: an EST client to the layer above. This layer authenticates with its
//! own credential (it is a registration authority, not a pipe), trusts only the configured
//! anchors for the upstream's TLS certificate, and keeps connections pooled so that a
//! forwarded request costs no new handshake upstream.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use lru::LruCache;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::health::{Health, Outcome, State};
use crate::auth::TrustSet;
use crate::config::{ConfigError, UpstreamConfig};
use crate::est::{self, media, Operation};

/// The request header in which a layer tells the layer above how long it will wait for the
/// answer, in milliseconds. Each layer honours it and gives its own upstream less.
pub const BUDGET_HEADER: &str = "edge-est-budget-ms";

/// Largest upstream answer read.
const MAX_ANSWER: usize = 1024 * 1024;
/// Pauses before retrying a request whose connection could not be made.
const CONNECT_RETRIES: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(400)];

/// What went wrong upstream. The texts reach the child: they name the upstream by host,
/// never this layer's RA credential, and pass on no text of the layer above (a refusal keeps
/// its status; this layer's log has the upper layer's reason).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the layer above ({host}) cannot be reached: {cause}")]
    Unreachable {
        host: String,
        cause: String,
        retry_after: u64,
    },
    #[error("the layer above ({host}) did not answer within {millis} ms")]
    Timeout {
        host: String,
        millis: u64,
        retry_after: u64,
    },
    /// Only this layer's configuration or the upper layer's can fix it: never signed
    /// locally in its place.
    #[error("this layer cannot use the layer above ({host}): {problem}; this layer's log has the detail")]
    Misconfigured {
        host: String,
        problem: &'static str,
        detail: String,
    },
    /// `text` is the upper layer's reason, for this layer's log only.
    #[error("refused by the layer above ({status}); this layer's log has its reason")]
    Refused { status: StatusCode, text: String },
    #[error("the layer above accepted the request for later processing; ask again later")]
    Pending { retry_after: Option<HeaderValue> },
    /// Busy (429) or itself cut off (503): its own text is passed on as it is (an edge-est
    /// layer's says how long to wait or which layer is away, and names no credential);
    /// other statuses keep only the status.
    #[error("{}", unavailable_text(host, *status, text))]
    Unavailable {
        host: String,
        status: StatusCode,
        text: String,
        retry_after: Option<HeaderValue>,
    },
    #[error("the answer of the layer above is malformed: {0}")]
    Malformed(String),
}

fn unavailable_text(host: &str, status: StatusCode, text: &str) -> String {
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        text.to_owned()
    } else {
        format!("the layer above ({host}) is unavailable ({status})")
    }
}

impl UpstreamError {
    /// Whether the upstream could not be asked at all, or did not answer in time.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. }
        )
    }

    /// Whether an `auto` label signs locally instead: the upstream could not be asked, did
    /// not answer in time, or answered 503 (a layer above it is away). Never for a refusal,
    /// a misconfiguration or a malformed answer.
    pub fn allows_fallback(&self) -> bool {
        self.is_unreachable()
            || matches!(self, UpstreamError::Unavailable { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE)
    }

    /// The upstream's own text, for this layer's log.
    pub fn upstream_text(&self) -> Option<&str> {
        match self {
            UpstreamError::Refused { text, .. } | UpstreamError::Unavailable { text, .. } => {
                Some(text)
            }
            UpstreamError::Misconfigured { detail, .. } => Some(detail),
            _ => None,
        }
    }

    fn outcome(&self) -> Outcome {
        match self {
            UpstreamError::Unreachable { cause, .. } => Outcome::Away(cause.clone()),
            UpstreamError::Timeout { millis, .. } => {
                Outcome::Away(format!("no answer within {millis} ms"))
            }
            UpstreamError::Misconfigured {
                problem, detail, ..
            } => Outcome::Misconfigured(format!("{problem}: {detail}")),
            _ => Outcome::Answered,
        }
    }
}

type UpstreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct Upstream {
    pub name: String,
    /// `host:port` of the URL, for texts and logs.
    pub host: String,
    base: String,
    /// One client (and connection pool) per connection thread, see [`Upstream::client`].
    clients: Box<[UpstreamClient]>,
    authorization: Option<HeaderValue>,
    request_timeout: Duration,
    pub cacerts_ttl: Duration,
    pub cacerts_stale: Duration,
    pub retry_after_secs: u64,
    probe_max: Duration,
    pub health: Health,
    /// This upstream, for the background probe (empty unless made with [`Upstream::shared`]).
    me: Weak<Upstream>,
}

impl Upstream {
    pub fn new(
        name: &str,
        config: &UpstreamConfig,
        base_dir: &Path,
    ) -> Result<Upstream, ConfigError> {
        Upstream::with_module(name, config, base_dir, None)
    }

    /// [`Upstream::new`], with the PKCS#11 library for a `pkcs11:` URI as the RA key (the
    /// configuration's `pkcs11_module`; a URI's `module-path=` wins).
    pub fn with_module(
        name: &str,
        config: &UpstreamConfig,
        base_dir: &Path,
        pkcs11_module: Option<&Path>,
    ) -> Result<Upstream, ConfigError> {
        let field = |f: &str| format!("upstreams.{name}.{f}");
        let uri: http::Uri = config
            .url
            .parse()
            .map_err(|e| ConfigError::invalid(field("url"), format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(ConfigError::invalid(
                field("url"),
                "must be an https:// URL with a host",
            ));
        }
        if uri.query().is_some() {
            return Err(ConfigError::invalid(field("url"), "takes no query"));
        }
        // The upper layer's EST root, optionally with one label: anything else answers 404
        // there, which a child would see as a relayed refusal.
        let path = uri.path().trim_end_matches('/');
        let label = path.strip_prefix("/.well-known/est");
        let fits = match label {
            Some("") => true,
            Some(rest) => rest
                .strip_prefix('/')
                .is_some_and(|l| crate::est::Label::new(l).is_ok()),
            None => false,
        };
        if !fits {
            return Err(ConfigError::invalid(
                field("url"),
                format!(
                    "the path must be /.well-known/est, optionally followed by one label                      (/.well-known/est/<label>); {:?} is not an EST path",
                    uri.path()
                ),
            ));
        }
        let host = match uri.port_u16() {
            Some(port) => format!("{}:{port}", uri.host().unwrap_or_default()),
            None => uri.host().unwrap_or_default().to_owned(),
        };

        let mut roots = RootCertStore::empty();
        for (i, source) in config.trust.iter().enumerate() {
            let pem = source.read(base_dir, &field(&format!("trust[{i}]")))?;
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert
                    .map_err(|e| ConfigError::invalid(field("trust"), format!("not PEM: {e}")))?;
                roots.add(cert).map_err(|e| {
                    ConfigError::invalid(field("trust"), format!("unusable CA certificate: {e}"))
                })?;
            }
        }
        if roots.is_empty() {
            return Err(ConfigError::invalid(
                field("trust"),
                "names no CA certificate",
            ));
        }
        let provider = crate::transport::tls::provider();
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ConfigError::invalid(field("trust"), e.to_string()))?
            .with_root_certificates(roots);
        let tls = match (&config.certificate, &config.key) {
            (Some(chain), Some(key)) => {
                let chain_pem = chain.read(base_dir, &field("certificate"))?;
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                        .collect::<Result<_, _>>()
                        .map_err(|e| {
                            ConfigError::invalid(field("certificate"), format!("not PEM: {e}"))
                        })?;
                if let Some(uri) = key.to_str().filter(|k| crate::keys::is_pkcs11(k)) {
                    // Never read as a file: the "cannot read" error would show a PIN in it.
                    let key = crate::keys::TokenKey::open(uri, pkcs11_module, &chain_pem)
                        .map_err(|e| ConfigError::invalid(field("key"), e.to_string()))?;
                    let resolver = crate::keys::client::token_client_cert(chain, key)
                        .map_err(|e| ConfigError::invalid(field("key"), e))?;
                    builder.with_client_cert_resolver(resolver)
                } else {
                    let key_pem = crate::config::read_path(base_dir, key, &field("key"))?;
                    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
                        ConfigError::invalid(field("key"), format!("unreadable private key: {e}"))
                    })?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| ConfigError::invalid(field("certificate"), e.to_string()))?
                }
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(ConfigError::invalid(
                    field("key"),
                    "certificate and key go together",
                ))
            }
        };

        let authorization = match (&config.username, &config.password_file) {
            (Some(user), Some(file)) => {
                let password = crate::config::read_path(base_dir, file, &field("password_file"))?;
                let password = password.trim_end_matches(['\r', '\n']);
                use base64::Engine;
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                let mut value = HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| {
                    ConfigError::invalid(field("username"), "cannot be sent in a header")
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            (None, None) => None,
            _ => {
                return Err(ConfigError::invalid(
                    field("password_file"),
                    "username and password_file go together",
                ))
            }
        };
        if config.request_timeout_secs == 0
            || config.request_timeout_secs > 120
            || config.connect_timeout_secs == 0
        {
            return Err(ConfigError::invalid(
                field("request_timeout_secs"),
                "timeouts must be between 1 and 120 s",
            ));
        }

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(config.connect_timeout_secs)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = || {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(64)
                // `Content-Type`, `Authorization`, `Host` on the wire: some EST servers (libest)
                // compare header names case-sensitively.
                .http1_title_case_headers(true)
                .build(https.clone())
        };
        let clients = (0..crate::transport::listener::threads_for_this_machine().max(1))
            .map(|_| client())
            .collect();
        let fingerprint = format!(
            "{name} {}",
            serde_json::to_string(config).unwrap_or_default()
        );
        Ok(Upstream {
            name: name.to_owned(),
            host,
            base: config.url.trim_end_matches('/').to_owned(),
            clients,
            authorization,
            request_timeout: Duration::from_secs(config.request_timeout_secs),
            cacerts_ttl: Duration::from_secs(config.cacerts_ttl_secs),
            cacerts_stale: Duration::from_secs(config.cacerts_stale_secs),
            retry_after_secs: config.retry_after_secs,
            probe_max: Duration::from_secs(config.probe_max_secs.max(1)),
            health: Health::new(fingerprint),
            me: Weak::new(),
        })
    }

    /// The client of the connection thread this runs on (the first one elsewhere). A pooled
    /// connection is driven by a task on the runtime that opened it: shared between the
    /// connection threads, a request on one thread would hand its bytes to the other thread's
    /// runtime and get the answer back from it (two cross-thread wake-ups per forwarded
    /// request). With a pool per thread, each request stays on its own thread.
    fn client(&self) -> &UpstreamClient {
        let index = crate::transport::connection_thread_index().unwrap_or(0);
        &self.clients[index % self.clients.len()]
    }

    /// The upstream as the running configuration holds it: failures start a background probe.
    pub fn shared(self) -> Arc<Upstream> {
        Arc::new_cyclic(|me| Upstream {
            me: me.clone(),
            ..self
        })
    }

    /// Whether the upstream answered at the last contact (false before any contact).
    pub fn is_reachable(&self) -> bool {
        self.health.state() == State::Up
    }

    /// The longest time a forwarded request may take (`request_timeout_secs`).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Starts the background probe if the upstream is away or misconfigured and none runs.
    pub fn ensure_probing(&self) {
        if matches!(self.health.state(), State::Away | State::Misconfigured)
            && self.health.start_probing()
        {
            super::health::spawn_probe(self.me.clone(), self.probe_max);
        }
    }

    /// An error answering at once for an upstream known to be away.
    pub fn away_error(&self) -> UpstreamError {
        let snapshot = self.health.snapshot();
        UpstreamError::Unreachable {
            host: self.host.clone(),
            cause: format!(
                "away since {} ({}); probing in the background",
                rfc3339(snapshot.since),
                snapshot.cause
            ),
            retry_after: self.retry_after_secs,
        }
    }

    pub fn url(&self, label: Option<&str>, operation: Operation) -> String {
        match label {
            Some(label) => format!("{}/{label}/{}", self.base, operation.as_str()),
            None => format!("{}/{}", self.base, operation.as_str()),
        }
    }

    /// The upstream's CA chain (`/cacerts`), in its order.
    pub async fn cacerts(
        &self,
        label: Option<&str>,
    ) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
        self.cacerts_within(label, self.request_timeout).await
    }

    /// [`Upstream::cacerts`] within `budget` (capped by `request_timeout_secs`).
    pub async fn cacerts_within(
        &self,
        label: Option<&str>,
        budget: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
        let certs = self
            .exchange(label, Operation::CaCerts, None, budget)
            .await?;
        if certs.is_empty() {
            return Err(UpstreamError::Malformed(
                "cacerts holds no certificate".into(),
            ));
        }
        Ok(certs.into_iter().map(CertificateDer::from).collect())
    }

    /// Forwards a CSR as `simpleenroll`; returns the certificates of the answer, in order.
    pub async fn enroll(
        &self,
        label: Option<&str>,
        csr_der: &[u8],
    ) -> Result<Vec<Vec<u8>>, UpstreamError> {
        self.enroll_within(label, csr_der, self.request_timeout)
            .await
    }

    /// [`Upstream::enroll`] within `budget` (capped by `request_timeout_secs`), which the
    /// layer above is told in [`BUDGET_HEADER`].
    pub async fn enroll_within(
        &self,
        label: Option<&str>,
        csr_der: &[u8],
        budget: Duration,
    ) -> Result<Vec<Vec<u8>>, UpstreamError> {
        let certs = self
            .exchange(label, Operation::SimpleEnroll, Some(csr_der), budget)
            .await?;
        if certs.is_empty() {
            return Err(UpstreamError::Malformed(
                "the answer holds no certificate".into(),
            ));
        }
        Ok(certs)
    }

    async fn exchange(
        &self,
        label: Option<&str>,
        operation: Operation,
        csr_der: Option<&[u8]>,
        budget: Duration,
    ) -> Result<Vec<Vec<u8>>, UpstreamError> {
        let timeout = budget.min(self.request_timeout);
        let budget_ms = HeaderValue::from(timeout.as_millis() as u64);
        let url = self.url(label, operation);
        let body = csr_der
            .map(|der| Bytes::from(est::body::encode_base64_lines(der)))
            .unwrap_or_default();
        let attempt = async {
            let mut retries = CONNECT_RETRIES.iter();
            loop {
                let mut request = Request::builder().method(operation.method()).uri(&url);
                if csr_der.is_some() {
                    request = request
                        .header(CONTENT_TYPE, media::PKCS10)
                        .header("content-transfer-encoding", "base64");
                }
                if let Some(auth) = &self.authorization {
                    request = request.header(AUTHORIZATION, auth.clone());
                }
                request = request.header(BUDGET_HEADER, budget_ms.clone());
                let request = request.body(Full::new(body.clone())).map_err(|e| {
                    UpstreamError::Malformed(format!("cannot build the request: {e}"))
                })?;
                match self.client().request(request).await {
                    Ok(response) => return self.read_answer(response).await,
                    // Nothing was sent when the connection could not be made: retrying is safe
                    // even for an enrollment.
                    Err(e) if e.is_connect() && tls_failure(&e).is_none() => match retries.next() {
                        Some(pause) => tokio::time::sleep(*pause).await,
                        None => return Err(self.unreachable(&e)),
                    },
                    Err(e) => return Err(self.unreachable(&e)),
                }
            }
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout {
                host: self.host.clone(),
                millis: timeout.as_millis() as u64,
                retry_after: self.retry_after_secs,
            }),
        };
        let outcome = match &result {
            Ok(_) => Outcome::Answered,
            Err(e) => e.outcome(),
        };
        self.health.record(&self.name, &self.host, &outcome, label);
        if !matches!(outcome, Outcome::Answered) {
            self.ensure_probing();
        }
        result
    }

    fn unreachable(&self, error: &hyper_util::client::legacy::Error) -> UpstreamError {
        // The source chain says what happened (refused, TLS certificate not trusted, ...).
        let mut cause = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(s) = source {
            cause = format!("{cause}: {s}");
            source = s.source();
        }
        if let Some(tls) = tls_failure(error) {
            let problem = match tls {
                rustls::Error::InvalidCertificate(_) => {
                    "its TLS certificate is not trusted here (upstream trust or URL host)"
                }
                rustls::Error::AlertReceived(_) => {
                    "it refused this layer's TLS connection (its client certificate?)"
                }
                _ => "TLS with it fails",
            };
            return UpstreamError::Misconfigured {
                host: self.host.clone(),
                problem,
                detail: format!("{tls}"),
            };
        }
        UpstreamError::Unreachable {
            host: self.host.clone(),
            cause,
            retry_after: self.retry_after_secs,
        }
    }

    async fn read_answer(
        &self,
        response: http::Response<hyper::body::Incoming>,
    ) -> Result<Vec<Vec<u8>>, UpstreamError> {
        let status = response.status();
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(media::essence)
            .unwrap_or_default();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| UpstreamError::Malformed(format!("cannot read the answer: {e}")))?
            .to_bytes();
        let text = || {
            let t = String::from_utf8_lossy(&body[..body.len().min(512)])
                .trim()
                .to_owned();
            if t.is_empty() {
                status.to_string()
            } else {
                t
            }
        };
        match status {
            StatusCode::OK => {}
            StatusCode::ACCEPTED => return Err(UpstreamError::Pending { retry_after }),
            // Only the URL (path or label) or the upper layer's configuration fixes these.
            StatusCode::NOT_FOUND => {
                return Err(UpstreamError::Misconfigured {
                    host: self.host.clone(),
                    problem: "its EST path answers 404 (upstream URL or label)",
                    detail: text(),
                })
            }
            StatusCode::UNAUTHORIZED => {
                return Err(UpstreamError::Misconfigured {
                    host: self.host.clone(),
                    problem: "it does not accept this layer's RA credentials",
                    detail: text(),
                })
            }
            // Rate limited upstream: not a refusal of the request, passed on with Retry-After.
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(UpstreamError::Unavailable {
                    host: self.host.clone(),
                    status,
                    text: text(),
                    retry_after,
                })
            }
            s if s.is_client_error() => {
                return Err(UpstreamError::Refused {
                    status: s,
                    text: text(),
                })
            }
            s => {
                return Err(UpstreamError::Unavailable {
                    host: self.host.clone(),
                    status: s,
                    text: text(),
                    retry_after,
                })
            }
        }
        if content_type != media::PKCS7_MIME && content_type != "application/x-pkcs7-mime" {
            return Err(UpstreamError::Malformed(format!(
                "unexpected Content-Type {content_type:?}"
            )));
        }
        let der = est::body::decode_base64_body(&body)
            .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        est::pkcs7::decode_certs_only(&der).map_err(|e| UpstreamError::Malformed(e.to_string()))
    }
}

/// The TLS error under a client error, if the connection failed in TLS (then it is not an
/// outage: the upstream answered, in a way this layer does not trust or is not trusted by).
fn tls_failure(error: &hyper_util::client::legacy::Error) -> Option<&rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // io::Error's `source` skips the error it wraps (itself often an io::Error around
        // rustls's): look inside instead.
        current = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339(unix_secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// An upstream's CA chain as this layer serves it.
pub struct CachedChain {
    pub chain: Vec<CertificateDer<'static>>,
    /// The `/cacerts` answer, encoded once.
    pub body: Bytes,
    /// Certificates issued directly by a CA that may sign for this subtree, as the upstream's
    /// chain says (see [`super::path::signing_cas`]).
    pub issuer_trust: Arc<TrustSet>,
    /// When it was fetched (seconds since the Unix epoch: it may come from an earlier run).
    fetched: u64,
}

impl CachedChain {
    fn new(
        chain: Vec<CertificateDer<'static>>,
        fetched: u64,
    ) -> Result<CachedChain, UpstreamError> {
        let ders: Vec<&[u8]> = chain.iter().map(|c| c.as_ref()).collect();
        let pkcs7 = est::pkcs7::encode_certs_only(&ders)
            .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let issuer_trust = super::path::issuer_trust(&chain)
            .map_err(|e| UpstreamError::Malformed(format!("cacerts: {e}")))?;
        Ok(CachedChain {
            body: Bytes::from(est::body::encode_base64_lines(&pkcs7)),
            issuer_trust: Arc::new(issuer_trust),
            chain,
            fetched,
        })
    }

    fn age(&self) -> Duration {
        Duration::from_secs(now_unix().saturating_sub(self.fetched))
    }
}

/// A chain as kept on disk.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeptChain {
    url: String,
    fetched: u64,
    /// DER certificates, base64.
    chain: Vec<String>,
}

struct Entries {
    chains: LruCache<String, Arc<CachedChain>>,
    /// Keys whose kept file was already looked for.
    loaded: HashSet<String>,
}

/// `/cacerts` answers of upstreams, kept across reconfigurations and (with a directory)
/// across restarts; served fresh for the upstream's TTL and, while it cannot be reached,
/// stale for a bounded time ([`CacertsCache::get`]) or for as long as it is kept
/// ([`CacertsCache::peek`], what `auto` labels use).
pub struct CacertsCache {
    entries: Mutex<Entries>,
    refresh: tokio::sync::Mutex<()>,
    /// Counts hits and misses, and times the requests upstream.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Where chains are kept across restarts.
    dir: Option<PathBuf>,
}

impl Default for CacertsCache {
    fn default() -> Self {
        CacertsCache {
            entries: Mutex::new(Entries {
                chains: LruCache::new(NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN)),
                loaded: HashSet::new(),
            }),
            refresh: tokio::sync::Mutex::new(()),
            metrics: None,
            dir: None,
        }
    }
}

impl CacertsCache {
    /// A cache that reports to `metrics`.
    pub fn with_metrics(metrics: Arc<crate::metrics::Metrics>) -> CacertsCache {
        CacertsCache {
            metrics: Some(metrics),
            ..CacertsCache::default()
        }
    }

    /// Keeps chains in `dir` (created when first needed).
    pub fn kept_in(self, dir: PathBuf) -> CacertsCache {
        CacertsCache {
            dir: Some(dir),
            ..self
        }
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| {
            d.join(format!(
                "upstream-{}.cacerts.json",
                super::store::file_key(key)
            ))
        })
    }

    fn lookup(&self, key: &str) -> Option<Arc<CachedChain>> {
        let mut entries = self.entries.lock().ok()?;
        if let Some(hit) = entries.chains.get(key) {
            return Some(hit.clone());
        }
        if !entries.loaded.insert(key.to_owned()) {
            return None;
        }
        // First look at this key since start: the chain an earlier run kept.
        let kept: KeptChain = super::store::read(&self.path(key)?)?;
        if kept.url != key {
            return None;
        }
        use base64::Engine;
        let chain = kept
            .chain
            .iter()
            .map(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map(CertificateDer::from)
            })
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        let cached = Arc::new(CachedChain::new(chain, kept.fetched).ok()?);
        entries.chains.put(key.to_owned(), cached.clone());
        Some(cached)
    }

    fn keep(&self, key: &str, chain: &CachedChain) {
        let Some(path) = self.path(key) else {
            return;
        };
        use base64::Engine;
        let kept = KeptChain {
            url: key.to_owned(),
            fetched: chain.fetched,
            chain: chain
                .chain
                .iter()
                .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
                .collect(),
        };
        super::store::write_soon(path, &kept);
    }

    /// The cached chain of `upstream` for `label`, however old (from this run or kept by an
    /// earlier one), without asking upstream.
    pub fn peek(&self, upstream: &Upstream, label: Option<&str>) -> Option<Arc<CachedChain>> {
        self.lookup(&upstream.url(label, Operation::CaCerts))
    }

    fn count(&self, hit: bool) {
        if let Some(m) = &self.metrics {
            m.cacerts_cache(hit);
        }
    }

    /// The upstream's chain for `label`: from cache while fresh, else asked for within
    /// `budget`; on failure, or at once while the upstream is away, the cached one while
    /// within the stale bound.
    pub async fn get(
        &self,
        upstream: &Upstream,
        label: Option<&str>,
        budget: Duration,
    ) -> Result<Arc<CachedChain>, UpstreamError> {
        let key = upstream.url(label, Operation::CaCerts);
        let fresh = |c: &Arc<CachedChain>| c.age() < upstream.cacerts_ttl;
        if let Some(hit) = self.lookup(&key).filter(fresh) {
            self.count(true);
            return Ok(hit);
        }
        if upstream.health.state() == State::Away {
            upstream.ensure_probing();
            return self.stale(upstream, &key, upstream.away_error());
        }
        // One refresh at a time: concurrent children wait for it instead of all asking.
        let _refreshing = self.refresh.lock().await;
        if let Some(hit) = self.lookup(&key).filter(fresh) {
            self.count(true);
            return Ok(hit);
        }
        if upstream.health.state() == State::Away {
            // The refresh just waited for found it away: do not pay its timeout again.
            return self.stale(upstream, &key, upstream.away_error());
        }
        self.count(false);
        let started = Instant::now();
        let fetched = upstream.cacerts_within(label, budget).await;
        if let Some(m) = &self.metrics {
            m.upstream(&upstream.name, "cacerts", started.elapsed(), &fetched);
        }
        match fetched.and_then(|chain| CachedChain::new(chain, now_unix())) {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                let changed = self.lookup(&key).is_none_or(|old| old.chain != fresh.chain);
                if let Ok(mut entries) = self.entries.lock() {
                    entries.chains.put(key.clone(), fresh.clone());
                }
                if changed {
                    self.keep(&key, &fresh);
                }
                Ok(fresh)
            }
            Err(error) => self.stale(upstream, &key, error),
        }
    }

    fn stale(
        &self,
        upstream: &Upstream,
        key: &str,
        error: UpstreamError,
    ) -> Result<Arc<CachedChain>, UpstreamError> {
        match self.lookup(key) {
            Some(stale) if stale.age() < upstream.cacerts_ttl + upstream.cacerts_stale => {
                tracing::debug!(upstream = %upstream.name, %error, "serving cached cacerts while the upstream is away");
                Ok(stale)
            }
            _ => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PemSource;

    fn config(url: &str) -> UpstreamConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = crate::pki::ca_params("anchor", None, time::Duration::days(1))
            .self_signed(&key)
            .unwrap();
        serde_json::from_value(serde_json::json!({
            "url": url,
            "trust": [PemSource(ca.pem())],
        }))
        .unwrap()
    }

    #[test]
    fn the_url_must_be_an_est_path() {
        for good in [
            "https://gw:8085/.well-known/est",
            "https://gw:8085/.well-known/est/",
            "https://gw/.well-known/est/plant",
        ] {
            let upstream = Upstream::new("parent", &config(good), Path::new(".")).unwrap();
            assert!(upstream.host.starts_with("gw"));
        }
        for bad in [
            "https://gw:8085/",
            "https://gw:8085/est",
            "https://gw:8085/.well-known/estx",
            "https://gw:8085/.well-known/est/a/b",
            "https://gw:8085/api/.well-known/est",
        ] {
            let error = Upstream::new("parent", &config(bad), Path::new("."))
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(
                error
                    .to_string()
                    .contains("upstreams.parent.url: the path must be /.well-known/est"),
                "{bad}: {error}"
            );
        }
    }
    /// Every kind of upstream failure, with texts that must not reach a child.
    fn failures() -> Vec<(&'static str, UpstreamError)> {
        let secret = "CN=ra-mid-layer user=mid-ra trust=plant-devices";
        vec![
            (
                "unreachable",
                UpstreamError::Unreachable {
                    host: "gw:8085".into(),
                    cause: "connection refused".into(),
                    retry_after: 5,
                },
            ),
            (
                "timeout",
                UpstreamError::Timeout {
                    host: "gw:8085".into(),
                    millis: 1500,
                    retry_after: 5,
                },
            ),
            (
                "misconfigured",
                UpstreamError::Misconfigured {
                    host: "gw:8085".into(),
                    problem: "it does not accept this layer's RA credentials",
                    detail: secret.into(),
                },
            ),
            (
                "refused",
                UpstreamError::Refused {
                    status: StatusCode::FORBIDDEN,
                    text: secret.into(),
                },
            ),
            ("pending", UpstreamError::Pending { retry_after: None }),
            (
                "busy",
                UpstreamError::Unavailable {
                    host: "gw:8085".into(),
                    status: StatusCode::TOO_MANY_REQUESTS,
                    text: "try again in 3 s".into(),
                    retry_after: None,
                },
            ),
            (
                "away above",
                UpstreamError::Unavailable {
                    host: "gw:8085".into(),
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    text: "the layer above (top:8085) is away".into(),
                    retry_after: None,
                },
            ),
            (
                "broken above",
                UpstreamError::Unavailable {
                    host: "gw:8085".into(),
                    status: StatusCode::BAD_GATEWAY,
                    text: secret.into(),
                    retry_after: None,
                },
            ),
            ("malformed", UpstreamError::Malformed("not PKCS#7".into())),
        ]
    }

    /// Only an upstream that could not be asked, did not answer in time, or said a layer
    /// above it is away (503) lets an `auto` label sign in its stead: never a refusal (a
    /// child refused above must not get a local certificate), a misconfiguration, a busy
    /// upstream, a 202 or a malformed answer.
    #[test]
    fn only_an_outage_lets_a_label_sign_in_the_upstreams_stead() {
        for (name, error) in failures() {
            let outage = matches!(name, "unreachable" | "timeout");
            assert_eq!(error.is_unreachable(), outage, "{name}");
            let fallback = matches!(name, "unreachable" | "timeout" | "away above");
            assert_eq!(error.allows_fallback(), fallback, "{name}");
        }
    }

    /// What the child reads (the error's text) names the upstream by host and never repeats
    /// what the layer above said about this layer (its RA's name, user, trust sets), but for
    /// a 429 or 503, whose text an edge-est layer writes for the child; this layer's log gets
    /// the upstream's text; the health of the upstream follows what it showed.
    #[test]
    fn relayed_errors_keep_the_upper_layers_reasons_to_this_layers_log() {
        let secret = "CN=ra-mid-layer user=mid-ra trust=plant-devices";
        for (name, error) in failures() {
            let text = error.to_string();
            assert!(!text.contains(secret), "{name}: {text}");
            let logged = error.upstream_text();
            match name {
                "misconfigured" | "refused" | "broken above" => {
                    assert_eq!(logged, Some(secret), "{name}")
                }
                "busy" => assert_eq!(logged, Some("try again in 3 s")),
                "away above" => assert_eq!(logged, Some("the layer above (top:8085) is away")),
                _ => assert_eq!(logged, None, "{name}"),
            }
            let outcome = format!("{:?}", error.outcome());
            let expected = match name {
                "unreachable" => "Away(\"connection refused\")".to_owned(),
                "timeout" => "Away(\"no answer within 1500 ms\")".to_owned(),
                "misconfigured" => format!(
                    "Misconfigured(\"it does not accept this layer's RA credentials: {secret}\")"
                ),
                _ => "Answered".to_owned(),
            };
            assert_eq!(outcome, expected, "{name}");
        }
        let texts: Vec<(&str, String)> = failures()
            .into_iter()
            .map(|(name, e)| (name, e.to_string()))
            .collect();
        let text = |name: &str| texts.iter().find(|(n, _)| *n == name).unwrap().1.clone();
        assert_eq!(text("busy"), "try again in 3 s");
        assert_eq!(text("away above"), "the layer above (top:8085) is away");
        assert_eq!(
            text("broken above"),
            "the layer above (gw:8085) is unavailable (502 Bad Gateway)"
        );
        assert_eq!(
            text("refused"),
            "refused by the layer above (403 Forbidden); this layer's log has its reason"
        );
        assert_eq!(
            unavailable_text("gw:8085", StatusCode::INTERNAL_SERVER_ERROR, secret),
            "the layer above (gw:8085) is unavailable (500 Internal Server Error)"
        );
    }
    /// The cache counts its hits and misses in the metrics it was given, and keeps chains
    /// across restarts in the directory it was given (and nowhere without one).
    #[test]
    fn the_cache_reports_to_its_metrics_and_keeps_chains_in_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let cache = CacertsCache::with_metrics(metrics.clone()).kept_in(dir.path().to_owned());
        let path = cache
            .path("https://gw:8085/.well-known/est/cacerts")
            .unwrap();
        assert_eq!(path.parent(), Some(dir.path()));
        assert!(CacertsCache::default()
            .path("https://gw:8085/.well-known/est/cacerts")
            .is_none());
        cache.count(true);
        cache.count(true);
        cache.count(false);
        let text = metrics.render(&crate::metrics::Snapshot {
            issuer_expiry: Vec::new(),
            server_certificate_expiry: None,
            upstream_states: Vec::new(),
            enrolled_issuers: Vec::new(),
        });
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{name}{{")))
                .and_then(|l| l.rsplit_once(' '))
                .map(|(_, v)| v.to_owned())
        };
        assert_eq!(
            value("edgeest_cacerts_cache_hits_total").as_deref(),
            Some("2")
        );
        assert_eq!(
            value("edgeest_cacerts_cache_misses_total").as_deref(),
            Some("1")
        );
    }
}
