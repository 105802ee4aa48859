//! The forwarding backend: an EST client to the layer above. This layer authenticates with its
//! own credential (it is a registration authority, not a pipe), trusts only the configured
//! anchors for the upstream's TLS certificate, and keeps connections pooled so that a
//! forwarded request costs no new handshake upstream.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

use crate::auth::TrustSet;
use crate::config::{ConfigError, UpstreamConfig};
use crate::est::{self, media, Operation};

/// Largest upstream answer read.
const MAX_ANSWER: usize = 1024 * 1024;
/// Pauses before retrying a request whose connection could not be made.
const CONNECT_RETRIES: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(400)];

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream {name} cannot be reached: {cause}")]
    Unreachable {
        name: String,
        cause: String,
        retry_after: u64,
    },
    #[error("the upstream {name} did not answer within {secs} s")]
    Timeout {
        name: String,
        secs: u64,
        retry_after: u64,
    },
    #[error("the upstream refused the request: {text}")]
    Refused { status: StatusCode, text: String },
    #[error("the upstream accepted the request for later processing; ask again later")]
    Pending { retry_after: Option<HeaderValue> },
    #[error("the upstream is unavailable ({status}): {text}")]
    Unavailable {
        status: StatusCode,
        text: String,
        retry_after: Option<HeaderValue>,
    },
    #[error("the upstream's answer is malformed: {0}")]
    Malformed(String),
}

impl UpstreamError {
    /// Whether the upstream could not be asked at all (so `auto` may sign locally).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. }
        )
    }
}

pub struct Upstream {
    pub name: String,
    base: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    authorization: Option<HeaderValue>,
    request_timeout: Duration,
    pub cacerts_ttl: Duration,
    pub cacerts_stale: Duration,
    pub retry_after_secs: u64,
    reachable: AtomicBool,
}

impl Upstream {
    pub fn new(
        name: &str,
        config: &UpstreamConfig,
        base_dir: &Path,
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

        let mut roots = RootCertStore::empty();
        for source in &config.trust {
            let pem = source.read(base_dir)?;
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
                let chain_pem = chain.read(base_dir)?;
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                        .collect::<Result<_, _>>()
                        .map_err(|e| {
                            ConfigError::invalid(field("certificate"), format!("not PEM: {e}"))
                        })?;
                let key_path = base_dir.join(key);
                let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
                    ConfigError::invalid(field("key"), format!("unreadable private key: {e}"))
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ConfigError::invalid(field("certificate"), e.to_string()))?
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
                let path = base_dir.join(file);
                let password = std::fs::read_to_string(&path)
                    .map_err(|e| ConfigError::Io(path, e.to_string()))?;
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
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            // `Content-Type`, `Authorization`, `Host` on the wire: some EST servers (libest)
            // compare header names case-sensitively.
            .http1_title_case_headers(true)
            .build(https);
        Ok(Upstream {
            name: name.to_owned(),
            base: config.url.trim_end_matches('/').to_owned(),
            client,
            authorization,
            request_timeout: Duration::from_secs(config.request_timeout_secs),
            cacerts_ttl: Duration::from_secs(config.cacerts_ttl_secs),
            cacerts_stale: Duration::from_secs(config.cacerts_stale_secs),
            retry_after_secs: config.retry_after_secs,
            reachable: AtomicBool::new(true),
        })
    }

    /// Whether the last request reached the upstream.
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
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
        let certs = self.exchange(label, Operation::CaCerts, None).await?;
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
        let certs = self
            .exchange(label, Operation::SimpleEnroll, Some(csr_der))
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
    ) -> Result<Vec<Vec<u8>>, UpstreamError> {
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
                let request = request.body(Full::new(body.clone())).map_err(|e| {
                    UpstreamError::Malformed(format!("cannot build the request: {e}"))
                })?;
                match self.client.request(request).await {
                    Ok(response) => return self.read_answer(response).await,
                    // Nothing was sent when the connection could not be made: retrying is safe
                    // even for an enrollment.
                    Err(e) if e.is_connect() => match retries.next() {
                        Some(pause) => tokio::time::sleep(*pause).await,
                        None => return Err(self.unreachable(&e)),
                    },
                    Err(e) => return Err(self.unreachable(&e)),
                }
            }
        };
        let result = match tokio::time::timeout(self.request_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout {
                name: self.name.clone(),
                secs: self.request_timeout.as_secs(),
                retry_after: self.retry_after_secs,
            }),
        };
        self.reachable.store(
            !matches!(&result, Err(e) if e.is_unreachable()),
            Ordering::Relaxed,
        );
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
        UpstreamError::Unreachable {
            name: self.name.clone(),
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
            // Rate limited upstream: not a refusal of the request, passed on with Retry-After.
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(UpstreamError::Unavailable {
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

/// An upstream's CA chain as this layer serves it.
pub struct CachedChain {
    pub chain: Vec<CertificateDer<'static>>,
    /// The `/cacerts` answer, encoded once.
    pub body: Bytes,
    /// Certificates issued directly by the upstream's issuing CA (the first of the chain).
    pub issuer_trust: Arc<TrustSet>,
    fetched: Instant,
}

/// `/cacerts` answers of upstreams, kept across reconfigurations, served fresh for the
/// upstream's TTL and, while it cannot be reached, stale for a bounded time.
pub struct CacertsCache {
    entries: Mutex<LruCache<String, Arc<CachedChain>>>,
    refresh: tokio::sync::Mutex<()>,
    /// Counts hits and misses, and times the requests upstream.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Default for CacertsCache {
    fn default() -> Self {
        CacertsCache {
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN),
            )),
            refresh: tokio::sync::Mutex::new(()),
            metrics: None,
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

    fn lookup(&self, key: &str) -> Option<Arc<CachedChain>> {
        self.entries.lock().ok()?.get(key).cloned()
    }

    /// The cached chain of `upstream` for `label`, fresh or not, without asking upstream.
    pub fn peek(&self, upstream: &Upstream, label: Option<&str>) -> Option<Arc<CachedChain>> {
        self.entries
            .lock()
            .ok()?
            .peek(&upstream.url(label, Operation::CaCerts))
            .cloned()
    }

    fn count(&self, hit: bool) {
        if let Some(m) = &self.metrics {
            m.cacerts_cache(hit);
        }
    }

    /// The upstream's chain for `label`: from cache while fresh, else asked for; on failure
    /// the cached one while within the stale bound.
    pub async fn get(
        &self,
        upstream: &Upstream,
        label: Option<&str>,
    ) -> Result<Arc<CachedChain>, UpstreamError> {
        let key = upstream.url(label, Operation::CaCerts);
        if let Some(hit) = self
            .lookup(&key)
            .filter(|c| c.fetched.elapsed() < upstream.cacerts_ttl)
        {
            self.count(true);
            return Ok(hit);
        }
        // One refresh at a time: concurrent children wait for it instead of all asking.
        let _refreshing = self.refresh.lock().await;
        if let Some(hit) = self
            .lookup(&key)
            .filter(|c| c.fetched.elapsed() < upstream.cacerts_ttl)
        {
            self.count(true);
            return Ok(hit);
        }
        self.count(false);
        let started = Instant::now();
        let fetched = upstream.cacerts(label).await;
        if let Some(m) = &self.metrics {
            m.upstream(&upstream.name, "cacerts", started.elapsed(), &fetched);
        }
        match fetched.and_then(CachedChain::new) {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                if let Ok(mut entries) = self.entries.lock() {
                    entries.put(key, fresh.clone());
                }
                Ok(fresh)
            }
            Err(error) => match self.lookup(&key) {
                Some(stale)
                    if stale.fetched.elapsed() < upstream.cacerts_ttl + upstream.cacerts_stale =>
                {
                    tracing::warn!(upstream = %upstream.name, %error, "serving cached cacerts while the upstream is away");
                    Ok(stale)
                }
                _ => Err(error),
            },
        }
    }
}

impl CachedChain {
    fn new(chain: Vec<CertificateDer<'static>>) -> Result<CachedChain, UpstreamError> {
        let ders: Vec<&[u8]> = chain.iter().map(|c| c.as_ref()).collect();
        let pkcs7 = est::pkcs7::encode_certs_only(&ders)
            .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let issuer_trust = TrustSet::direct("issuer", &chain[..1])
            .map_err(|e| UpstreamError::Malformed(format!("cacerts: {e}")))?;
        Ok(CachedChain {
            body: Bytes::from(est::body::encode_base64_lines(&pkcs7)),
            issuer_trust: Arc::new(issuer_trust),
            chain,
            fetched: Instant::now(),
        })
    }
}
