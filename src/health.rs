//! `edge-est health`: a liveness probe for container health checks. It opens a TLS connection
//! to the EST listener, asks for `/cacerts` and checks that the answer is edge-est's: 200,
//! `application/pkcs7-mime`, a certs-only PKCS#7 with at least one certificate. Any other
//! answer (another server on the port, an error page) is a failure.
//!
//! Where it looks: `--addr`, else the configuration's `listen` (`--config`), else the address
//! the server recorded in its data directory when it bound ([`LISTEN_RECORD`], rewritten when
//! the module twin moves the listener), else 127.0.0.1:8085. An unspecified address
//! (`0.0.0.0`, `::`) is probed on loopback.
//!
//! The server certificate is not verified: the probe talks to its own container over
//! loopback and sends nothing secret. It sends [`PROBE_USER_AGENT`]; the server logs a
//! successful probe from loopback at debug, not info (a probe every 30 s is ~2,900 lines a
//! day).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The file in the data directory that holds the address the EST listener is bound to.
pub const LISTEN_RECORD: &str = "edge-est.listen";
/// The `user-agent` of the probe.
pub const PROBE_USER_AGENT: &str = concat!("edge-est-health/", env!("CARGO_PKG_VERSION"));
/// The largest `cacerts` answer the probe reads.
const MAX_BODY: usize = 256 * 1024;

/// Records the listener's address in `data_dir` for the probe (written to a temporary file,
/// then renamed: the probe never reads half a record).
pub fn record_listen(data_dir: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let path = data_dir.join(LISTEN_RECORD);
    let temporary = data_dir.join(format!("{LISTEN_RECORD}.tmp"));
    std::fs::write(&temporary, format!("{addr}\n"))?;
    std::fs::rename(&temporary, &path)
}

/// The address recorded in `data_dir`, if there is a record.
pub fn recorded_listen(data_dir: &Path) -> Result<Option<SocketAddr>, String> {
    let path = data_dir.join(LISTEN_RECORD);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{}: not an address: {:?}", path.display(), text.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Where to probe a listener bound to `addr`: loopback for an unspecified address.
pub fn probe_address(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Resolves `host:port` (a name or an address) and probes each address until one answers as
/// edge-est; Ok with what it answered, or what failed at each.
pub async fn probe_host(target: &str, timeout: Duration) -> Result<String, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target)
        .await
        .map_err(|e| format!("{target}: {e} (give host:port)"))?
        .collect();
    let mut failures = Vec::new();
    for addr in addrs {
        match probe(probe_address(addr), timeout).await {
            Ok(answer) => return Ok(answer),
            Err(e) => failures.push(e),
        }
    }
    if failures.is_empty() {
        return Err(format!("{target}: no address"));
    }
    Err(failures.join("; "))
}

/// Probes `addr`; Ok with a line about the answer, or what failed.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    tokio::time::timeout(timeout, probe_inner(addr))
        .await
        .map_err(|_| format!("no answer from {addr} within {} s", timeout.as_secs()))?
}

async fn probe_inner(addr: SocketAddr) -> Result<String, String> {
    let provider = crate::transport::tls::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::get("/.well-known/est/cacerts")
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, PROBE_USER_AGENT)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{addr}: no HTTP answer: {e}"))?;
    let status = response.status();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("{addr}: reading the answer: {e}"))?
        .to_bytes();
    if status != http::StatusCode::OK {
        return Err(format!(
            "{addr} answered {status} to cacerts: not a serving edge-est"
        ));
    }
    if crate::est::media::essence(&content_type) != "application/pkcs7-mime" {
        return Err(format!(
            "{addr} answered cacerts with content-type {content_type:?}: not edge-est"
        ));
    }
    let certs = crate::est::body::decode_base64_body(&body)
        .ok()
        .and_then(|der| crate::est::pkcs7::decode_certs_only(&der).ok())
        .filter(|certs| !certs.is_empty())
        .ok_or_else(|| format!("{addr} answered cacerts without certificates: not edge-est"))?;
    Ok(format!(
        "edge-est answers on {addr}: cacerts 200, {} CA certificate(s)",
        certs.len()
    ))
}

/// Accepts any server certificate but still checks the handshake signature.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
