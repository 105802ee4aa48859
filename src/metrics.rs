//! Metrics in the Prometheus text format (0.0.4), served on a listener of their own
//! (IoT Edge's convention: plain HTTP, port 9600, path `/metrics`).
//!
//! Names are `edgeest_*`, snake case with unit or `_total` suffixes; every series carries the
//! labels IoT Edge's own modules use: `iothub` and `edge_device` (from the module environment
//! `IOTEDGE_IOTHUBHOSTNAME` / `IOTEDGE_DEVICEID`, empty outside IoT Edge) and
//! `instance_number` (a random id per process start). The text is rendered here, without a
//! metrics library: a few counters, gauges and histograms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::est::Operation;
use crate::issue::UpstreamError;

/// Where the metrics listener goes as an IoT Edge module (`http://<module>:9600/metrics`).
pub const MODULE_DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9600);

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why a connection was closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusedBecause {
    /// `limits.max_connections` reached.
    Capacity,
    /// `limits.max_connections_per_address` reached for the client's address.
    PerAddress,
}

impl RefusedBecause {
    fn as_str(self) -> &'static str {
        match self {
            RefusedBecause::Capacity => "capacity",
            RefusedBecause::PerAddress => "per_address",
        }
    }
}

/// Which limit refused a request with 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitScope {
    Address,
    Identity,
    /// Failed authentications from one address.
    FailedAuthAddress,
    /// Failed authentications of one presented identity (user name, certificate subject).
    FailedAuthIdentity,
    /// Certificates for one requested name.
    Name,
    /// Server-generated keys for one identity.
    Keygen,
}

impl LimitScope {
    pub const ALL: [LimitScope; 6] = [
        LimitScope::Address,
        LimitScope::Identity,
        LimitScope::FailedAuthAddress,
        LimitScope::FailedAuthIdentity,
        LimitScope::Name,
        LimitScope::Keygen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitScope::Address => "address",
            LimitScope::Identity => "identity",
            LimitScope::FailedAuthAddress => "failed_auth_address",
            LimitScope::FailedAuthIdentity => "failed_auth_identity",
            LimitScope::Name => "name",
            LimitScope::Keygen => "keygen",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        let index = BUCKETS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(BUCKETS.len());
        self.counts[index] += 1;
        self.sum += seconds;
        self.count += 1;
    }
}

/// Values read from the running configuration at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Seconds until each label's issuing CA expires (negative once expired), by label.
    pub issuer_expiry: Vec<(String, f64)>,
    /// Seconds until the TLS server certificate expires.
    pub server_certificate_expiry: Option<f64>,
    /// Each upstream's health (`unknown`, `up`, `away`, `misconfigured`), by upstream.
    pub upstream_states: Vec<(String, &'static str)>,
    /// Each enrolled issuer: seconds until its CA expires, `None` while it has none (its
    /// labels forward).
    pub enrolled_issuers: Vec<(String, Option<f64>)>,
}

/// Totals of [`Metrics::outcomes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub issued: u64,
    pub forwarded: u64,
    pub refused: u64,
}

/// The metrics of one running server.
pub struct Metrics {
    /// `iothub="…",edge_device="…",instance_number="…"`, escaped.
    common: String,
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    requests_by_operation: [AtomicU64; 5],
    issuance: Mutex<BTreeMap<(String, String), Histogram>>,
    upstream_duration: Mutex<BTreeMap<(String, String), Histogram>>,
    upstream_failures: Mutex<BTreeMap<(String, String), u64>>,
    cacerts_hits: AtomicU64,
    cacerts_misses: AtomicU64,
    active_connections: AtomicI64,
    refused_capacity: AtomicU64,
    refused_per_address: AtomicU64,
    rate_limited: [AtomicU64; 6],
    tls_handshakes: AtomicU64,
    config_version: AtomicI64,
    /// Enrollments of this layer's own CAs, by issuer and success.
    enrolled_renewals: Mutex<BTreeMap<(String, bool), u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A random id for this process, formatted like a GUID (IoT Edge's `instance_number`).
pub fn instance_number() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        use aws_lc_rs::rand::SecureRandom;
        let mut b = [0u8; 16];
        if aws_lc_rs::rand::SystemRandom::new().fill(&mut b).is_err() {
            // No randomness: the start time still tells process starts apart.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            b = nanos.to_le_bytes();
        }
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h = crate::auth::client_cert::hex(&b);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    })
}

impl Metrics {
    /// Metrics labelled from the IoT Edge module environment (empty values outside IoT Edge).
    pub fn new() -> Metrics {
        let env = |name: &str| std::env::var(name).unwrap_or_default();
        Self::with_identity(
            &env("IOTEDGE_IOTHUBHOSTNAME"),
            &env("IOTEDGE_DEVICEID"),
            instance_number(),
        )
    }

    pub fn with_identity(iothub: &str, edge_device: &str, instance: &str) -> Metrics {
        Metrics {
            common: format!(
                "iothub=\"{}\",edge_device=\"{}\",instance_number=\"{}\"",
                escape(iothub),
                escape(edge_device),
                escape(instance)
            ),
            requests: Mutex::default(),
            requests_by_operation: Default::default(),
            issuance: Mutex::default(),
            upstream_duration: Mutex::default(),
            upstream_failures: Mutex::default(),
            cacerts_hits: AtomicU64::new(0),
            cacerts_misses: AtomicU64::new(0),
            active_connections: AtomicI64::new(0),
            refused_capacity: AtomicU64::new(0),
            refused_per_address: AtomicU64::new(0),
            rate_limited: Default::default(),
            tls_handshakes: AtomicU64::new(0),
            config_version: AtomicI64::new(0),
            enrolled_renewals: Mutex::new(BTreeMap::new()),
        }
    }

    /// A request answered: `label` and `operation` as routed (`-` when not routed).
    pub fn request(&self, label: &str, operation: &str, status: u16) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry((label.to_owned(), operation.to_owned(), status))
                .or_default() += 1;
        }
    }

    /// A request routed to `operation` (counted whatever its outcome).
    pub fn routed(&self, operation: Operation) {
        if let Some(i) = Operation::ALL.iter().position(|o| *o == operation) {
            self.requests_by_operation[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn routed_count(&self, operation: Operation) -> u64 {
        Operation::ALL
            .iter()
            .position(|o| *o == operation)
            .map_or(0, |i| self.requests_by_operation[i].load(Ordering::Relaxed))
    }

    /// A certificate issued for `label` by `backend` (`local` or `upstream`) in `elapsed`.
    pub fn issuance(&self, label: &str, backend: &str, elapsed: Duration) {
        if let Ok(mut map) = self.issuance.lock() {
            map.entry((label.to_owned(), backend.to_owned()))
                .or_default()
                .observe(elapsed.as_secs_f64());
        }
    }

    /// A request to an upstream (`operation`: `simpleenroll` or `cacerts`) and its outcome.
    pub fn upstream<T>(
        &self,
        upstream: &str,
        operation: &str,
        elapsed: Duration,
        result: &Result<T, UpstreamError>,
    ) {
        if let Ok(mut map) = self.upstream_duration.lock() {
            map.entry((upstream.to_owned(), operation.to_owned()))
                .or_default()
                .observe(elapsed.as_secs_f64());
        }
        if let Err(e) = result {
            let reason = match e {
                UpstreamError::Unreachable { .. } => "unreachable",
                UpstreamError::Timeout { .. } => "timeout",
                UpstreamError::Refused { .. } => "refused",
                UpstreamError::Pending { .. } => "pending",
                UpstreamError::Unavailable { .. } => "unavailable",
                UpstreamError::Malformed(_) => "malformed",
                UpstreamError::Misconfigured { .. } => "misconfigured",
            };
            if let Ok(mut map) = self.upstream_failures.lock() {
                *map.entry((upstream.to_owned(), reason.to_owned()))
                    .or_default() += 1;
            }
        }
    }

    pub fn cacerts_cache(&self, hit: bool) {
        let counter = if hit {
            &self.cacerts_hits
        } else {
            &self.cacerts_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.active_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.active_connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn active_connections(&self) -> i64 {
        self.active_connections.load(Ordering::Relaxed)
    }

    pub fn connection_refused(&self, because: RefusedBecause) {
        match because {
            RefusedBecause::Capacity => &self.refused_capacity,
            RefusedBecause::PerAddress => &self.refused_per_address,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn rate_limited(&self, scope: LimitScope) {
        self.rate_limited[scope as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn tls_handshake(&self) {
        self.tls_handshakes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn tls_handshakes(&self) -> u64 {
        self.tls_handshakes.load(Ordering::Relaxed)
    }

    /// An enrollment of an enrolled issuer's CA, successful or not.
    pub fn enrolled_issuer_renewal(&self, issuer: &str, ok: bool) {
        if let Ok(mut map) = self.enrolled_renewals.lock() {
            *map.entry((issuer.to_owned(), ok)).or_default() += 1;
        }
    }

    /// The version of the configuration in force (e.g. the module twin's `$version`).
    pub fn set_config_version(&self, version: i64) {
        self.config_version.store(version, Ordering::Relaxed);
    }

    pub fn config_version(&self) -> i64 {
        self.config_version.load(Ordering::Relaxed)
    }

    /// Totals since start for the module's reported properties: certificates issued (by any
    /// backend), those obtained upstream, and requests refused (401 or 403).
    pub fn outcomes(&self) -> Outcomes {
        let mut outcomes = Outcomes::default();
        if let Ok(map) = self.issuance.lock() {
            for ((_, backend), histogram) in map.iter() {
                outcomes.issued += histogram.count;
                if backend != "local" {
                    outcomes.forwarded += histogram.count;
                }
            }
        }
        if let Ok(map) = self.requests.lock() {
            outcomes.refused = map
                .iter()
                .filter(|((_, _, status), _)| matches!(status, 401 | 403))
                .map(|(_, n)| n)
                .sum();
        }
        outcomes
    }

    /// The whole exposition, in the Prometheus text format.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = String::with_capacity(4096);
        let c = &self.common;
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };

        head(
            &mut out,
            "edgeest_requests_total",
            "counter",
            "EST requests answered, by label, operation and HTTP status.",
        );
        if let Ok(map) = self.requests.lock() {
            for ((label, operation, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "edgeest_requests_total{{{c},label=\"{}\",operation=\"{}\",status=\"{status}\"}} {n}",
                    escape(label),
                    escape(operation)
                );
            }
        }

        head(
            &mut out,
            "edgeest_issuance_duration_seconds",
            "histogram",
            "Time from the start of an enrollment request to its issued and journaled certificate, by label and backend.",
        );
        if let Ok(map) = self.issuance.lock() {
            for ((label, backend), h) in map.iter() {
                let labels = format!(
                    "{c},label=\"{}\",backend=\"{}\"",
                    escape(label),
                    escape(backend)
                );
                histogram(&mut out, "edgeest_issuance_duration_seconds", &labels, h);
            }
        }

        head(
            &mut out,
            "edgeest_upstream_request_duration_seconds",
            "histogram",
            "Duration of requests to the upstream EST server, by upstream and operation.",
        );
        if let Ok(map) = self.upstream_duration.lock() {
            for ((upstream, operation), h) in map.iter() {
                let labels = format!(
                    "{c},upstream=\"{}\",operation=\"{}\"",
                    escape(upstream),
                    escape(operation)
                );
                histogram(
                    &mut out,
                    "edgeest_upstream_request_duration_seconds",
                    &labels,
                    h,
                );
            }
        }

        head(
            &mut out,
            "edgeest_upstream_failures_total",
            "counter",
            "Requests to the upstream EST server that failed, by upstream and reason.",
        );
        if let Ok(map) = self.upstream_failures.lock() {
            for ((upstream, reason), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "edgeest_upstream_failures_total{{{c},upstream=\"{}\",reason=\"{}\"}} {n}",
                    escape(upstream),
                    escape(reason)
                );
            }
        }

        let counters: [(&str, &str, u64); 3] = [
            (
                "edgeest_cacerts_cache_hits_total",
                "Upstream /cacerts answers served from cache.",
                self.cacerts_hits.load(Ordering::Relaxed),
            ),
            (
                "edgeest_cacerts_cache_misses_total",
                "Upstream /cacerts answers that had to be asked for.",
                self.cacerts_misses.load(Ordering::Relaxed),
            ),
            (
                "edgeest_tls_handshakes_total",
                "TLS handshakes completed on the EST listener.",
                self.tls_handshakes.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in &counters {
            head(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name}{{{c}}} {value}");
        }

        head(
            &mut out,
            "edgeest_active_connections",
            "gauge",
            "Connections open on the EST listener.",
        );
        let _ = writeln!(
            out,
            "edgeest_active_connections{{{c}}} {}",
            self.active_connections.load(Ordering::Relaxed)
        );

        head(
            &mut out,
            "edgeest_connections_refused_total",
            "counter",
            "Connections closed at accept, by reason (capacity: max_connections; per_address: max_connections_per_address).",
        );
        for (because, counter) in [
            (RefusedBecause::Capacity, &self.refused_capacity),
            (RefusedBecause::PerAddress, &self.refused_per_address),
        ] {
            let _ = writeln!(
                out,
                "edgeest_connections_refused_total{{{c},reason=\"{}\"}} {}",
                because.as_str(),
                counter.load(Ordering::Relaxed)
            );
        }

        head(
            &mut out,
            "edgeest_rate_limited_total",
            "counter",
            "Requests answered 429 by a rate limit, by scope (address, identity, failed_auth_address, failed_auth_identity, name, keygen).",
        );
        for scope in LimitScope::ALL {
            let _ = writeln!(
                out,
                "edgeest_rate_limited_total{{{c},scope=\"{}\"}} {}",
                scope.as_str(),
                self.rate_limited[scope as usize].load(Ordering::Relaxed)
            );
        }

        head(
            &mut out,
            "edgeest_issuer_expiry_seconds",
            "gauge",
            "Seconds until the issuing CA of each label expires (the upstream's, from cache, on forwarding labels).",
        );
        for (label, seconds) in &snapshot.issuer_expiry {
            let _ = writeln!(
                out,
                "edgeest_issuer_expiry_seconds{{{c},label=\"{}\"}} {}",
                escape(label),
                number(*seconds)
            );
        }

        head(
            &mut out,
            "edgeest_upstream_state",
            "gauge",
            "Health of each upstream as this layer sees it: 1 for its current state (unknown, up, away, misconfigured), 0 for the others.",
        );
        for (upstream, current) in &snapshot.upstream_states {
            for state in crate::issue::health::State::ALL {
                let _ = writeln!(
                    out,
                    "edgeest_upstream_state{{{c},upstream=\"{}\",state=\"{}\"}} {}",
                    escape(upstream),
                    state.as_str(),
                    u8::from(state.as_str() == *current)
                );
            }
        }

        head(
            &mut out,
            "edgeest_enrolled_issuer_expiry_seconds",
            "gauge",
            "Seconds until the CA of each enrolled issuer expires (renewed at two thirds of its life).",
        );
        for (issuer, seconds) in &snapshot.enrolled_issuers {
            if let Some(seconds) = seconds {
                let _ = writeln!(
                    out,
                    "edgeest_enrolled_issuer_expiry_seconds{{{c},issuer=\"{}\"}} {}",
                    escape(issuer),
                    number(*seconds)
                );
            }
        }
        head(
            &mut out,
            "edgeest_enrolled_issuer_forwarding",
            "gauge",
            "1 while an enrolled issuer has no valid CA and its labels forward instead of signing.",
        );
        for (issuer, seconds) in &snapshot.enrolled_issuers {
            let _ = writeln!(
                out,
                "edgeest_enrolled_issuer_forwarding{{{c},issuer=\"{}\"}} {}",
                escape(issuer),
                u8::from(seconds.is_none())
            );
        }
        head(
            &mut out,
            "edgeest_enrolled_issuer_enrollments_total",
            "counter",
            "Enrollments of each enrolled issuer's CA from the layer above, by outcome (ok, failed).",
        );
        if let Ok(map) = self.enrolled_renewals.lock() {
            for ((issuer, ok), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "edgeest_enrolled_issuer_enrollments_total{{{c},issuer=\"{}\",outcome=\"{}\"}} {n}",
                    escape(issuer),
                    if *ok { "ok" } else { "failed" }
                );
            }
        }

        head(
            &mut out,
            "edgeest_server_certificate_expiry_seconds",
            "gauge",
            "Seconds until the TLS server certificate expires.",
        );
        if let Some(seconds) = snapshot.server_certificate_expiry {
            let _ = writeln!(
                out,
                "edgeest_server_certificate_expiry_seconds{{{c}}} {}",
                number(seconds)
            );
        }

        head(
            &mut out,
            "edgeest_config_version",
            "gauge",
            "Version of the configuration in force (the module twin's $version; 0 for a file).",
        );
        let _ = writeln!(
            out,
            "edgeest_config_version{{{c}}} {}",
            self.config_version.load(Ordering::Relaxed)
        );
        out
    }
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let mut cumulative = 0;
    for (le, n) in BUCKETS.iter().zip(h.counts.iter()) {
        cumulative += n;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", number(h.sum));
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

/// A float as Prometheus reads it.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Escapes a label value: backslash, double quote and line feed.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Limits of the metrics listener: it is plain HTTP for a scraper on the module network, so
/// it answers little and holds nothing for long.
pub const MAX_CONNECTIONS: usize = 16;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves `GET /metrics` on `listener` until `shutdown` completes; everything else is 404 (or
/// 405 with `Allow: GET` on `/metrics`). `render` makes the exposition for each scrape.
pub async fn serve<F>(listener: TcpListener, render: Arc<F>, shutdown: impl Future<Output = ()>)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "metrics: connection refused, too many connections");
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Conventional header names on the wire, as on the EST listener.
            let methods = crate::transport::head_case::Methods::default();
            let io = crate::transport::head_case::HeadCase::new(tcp, methods.clone());
            let handler = service_fn(move |request: Request<hyper::body::Incoming>| {
                methods.note(request.method());
                let render = render.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&request, &*render)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(8 * 1024)
                .max_headers(32)
                .serve_connection(TokioIo::new(io), handler);
            if tokio::time::timeout(CONNECTION_LIFETIME, conn)
                .await
                .is_err()
            {
                tracing::debug!(%remote, "metrics: connection closed after its lifetime");
            }
        });
    }
}

fn answer<B>(request: &Request<B>, render: &dyn Fn() -> String) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, "/metrics takes GET\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from(render())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_TEXT));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_the_common_labels() {
        let m = Metrics::with_identity("hub.azure-devices.net", "gw\"1", "id");
        m.request("(unlabeled)", "simpleenroll", 200);
        m.request("(unlabeled)", "simpleenroll", 200);
        m.issuance("(unlabeled)", "local", Duration::from_millis(3));
        m.set_config_version(7);
        let text = m.render(&Snapshot {
            issuer_expiry: vec![("(unlabeled)".into(), 1234.5)],
            server_certificate_expiry: Some(99.0),
            upstream_states: vec![("parent".into(), "away")],
            enrolled_issuers: Vec::new(),
        });
        assert!(
            text.contains("upstream=\"parent\",state=\"away\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("upstream=\"parent\",state=\"up\"} 0\n"),
            "{text}"
        );
        assert!(text.contains(
            "edgeest_requests_total{iothub=\"hub.azure-devices.net\",edge_device=\"gw\\\"1\",instance_number=\"id\",label=\"(unlabeled)\",operation=\"simpleenroll\",status=\"200\"} 2"
        ), "{text}");
        assert!(text.contains("le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("edgeest_config_version{") && text.contains("} 7\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("edgeest_"), "{line}");
            assert!(line.contains("instance_number=\"id\""), "{line}");
        }
        let id = instance_number();
        assert_eq!(id.len(), 36);
        assert_eq!(id, instance_number(), "one per process");
    }
}
