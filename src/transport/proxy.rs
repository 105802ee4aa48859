//! The listener for the IoT Edge API proxy: plain HTTP/1.1 on a unix socket that only the API
//! proxy can reach (the socket lives in a volume mounted by the two containers alone).
//!
//! nginx terminates the child's TLS (`ssl_verify_client optional_no_ca`: it checks that the
//! client holds the key of the certificate it shows, not the chain) and forwards that
//! certificate in `x-ms-edge-clientcert` (`$ssl_client_escaped_cert`: URL-encoded PEM, the leaf
//! only). Here the header becomes the request's peer chain, which the label then validates
//! against its `client_trust` exactly as a TLS client certificate. The TLS listener never reads
//! the header: there anyone could send it.
//!
//! Limits are the TLS listener's: `max_connections` (a cap of this listener's own), the header
//! and idle timeout, and (in the handler) body size, body deadline and rate limits. There is no
//! per-address connection cap: the socket has one peer, the API proxy. The per-address rate
//! limit is kept by the client address nginx forwards in `x-forwarded-for` (its last entry,
//! the one nginx itself wrote), or by the socket's one peer when there is none.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::UnixListener;
use tokio::sync::{watch, Semaphore};

use super::{drain, serve_http, Connection, RefusedBecause, Service};

/// The header nginx (the IoT Edge API proxy) forwards the client certificate in.
pub const CLIENT_CERT_HEADER: &str = "x-ms-edge-clientcert";
/// The header nginx forwards the client's address in.
pub const FORWARDED_FOR_HEADER: &str = "x-forwarded-for";
/// Most certificates one forwarded header may hold (nginx sends the leaf alone): the cap of a
/// TLS client's chain. The bytes cap of `auth::caps` cannot be reached here: the connection's
/// 16 KiB header limit (`transport`) refuses a header that large first.
const MAX_FORWARDED_CERTS: usize = crate::auth::caps::MAX_CHAIN_CERTS;

/// What the API proxy said about the client of a request on the proxy socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// The client address from `x-forwarded-for`, if the proxy sent a usable one.
    pub client_address: Option<IpAddr>,
    /// Why `x-ms-edge-clientcert` could not be used, if it could not: the request is refused
    /// (400) rather than served as if no certificate had been shown.
    pub client_cert_error: Option<String>,
}

/// The client certificate chain forwarded in `x-ms-edge-clientcert`: URL-encoded PEM (nginx's
/// `$ssl_client_escaped_cert`; plain PEM, or the old tab-indented `$ssl_client_cert` form, are
/// read too). `None` when the header is absent or empty (the client showed no certificate).
pub fn forwarded_client_cert(
    headers: &HeaderMap,
) -> Result<Option<Vec<CertificateDer<'static>>>, String> {
    let mut values = headers.get_all(CLIENT_CERT_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(format!("more than one {CLIENT_CERT_HEADER} header"));
    }
    let raw = value.as_bytes();
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    // Percent-decoding only: a `+` is part of base64 here, not an encoded space.
    let decoded = percent_encoding::percent_decode(raw)
        .decode_utf8()
        .map_err(|_| "not UTF-8 once URL-decoded".to_owned())?;
    let pem: String = decoded
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    let sections = pem.matches("-----BEGIN ").count();
    if sections == 0 {
        return Err(
            "not a URL-encoded PEM certificate (nginx: $ssl_client_escaped_cert)".to_owned(),
        );
    }
    if sections != pem.matches("-----BEGIN CERTIFICATE-----").count() {
        return Err("holds PEM sections other than certificates".to_owned());
    }
    if sections > MAX_FORWARDED_CERTS {
        return Err(format!(
            "holds {sections} certificates, more than {MAX_FORWARDED_CERTS}"
        ));
    }
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if certs.len() != sections {
        return Err("a PEM certificate is not terminated".to_owned());
    }
    for (i, cert) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(cert)
            .map_err(|e| format!("certificate {} is not X.509: {e}", i + 1))?;
    }
    Ok(Some(certs))
}

/// The client address the proxy forwarded: the last entry of the last `x-forwarded-for`
/// header (the one the nearest proxy wrote; entries before it came from the client).
pub fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let value = headers.get_all(FORWARDED_FOR_HEADER).iter().next_back()?;
    let last = value.to_str().ok()?.rsplit(',').next()?.trim();
    last.parse::<IpAddr>()
        .ok()
        .or_else(|| last.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// What the handler learns of a request that came through the proxy socket.
pub fn connection_for(headers: &HeaderMap) -> Connection {
    let client_address = forwarded_for(headers);
    let (peer_chain, client_cert_error) = match forwarded_client_cert(headers) {
        Ok(chain) => (chain, None),
        Err(e) => (None, Some(e)),
    };
    Connection {
        remote: SocketAddr::new(
            client_address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            0,
        ),
        peer_chain,
        forwarded: Some(Forwarded {
            client_address,
            client_cert_error,
        }),
        memo: super::Memo::default(),
    }
}

/// Binds the proxy socket at `path`, replacing a stale socket file of an earlier run (never a
/// socket something still answers on, nor any other kind of file), readable and writable by
/// everyone who can reach the file: who may reach it is decided by which containers mount
/// its directory.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Serves the API proxy's socket until `shutdown` completes, then drains like the TLS
/// listener and removes the socket file.
pub async fn serve<S: Service>(
    listener: UnixListener,
    service: Arc<S>,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let slots = Arc::new(Semaphore::new(max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff = Duration::from_millis(5);
                    stream
                }
                Err(e) => {
                    tracing::warn!(error = %e, "proxy socket: accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                max_connections,
                "proxy socket: connection refused: too many connections"
            );
            service.on_refused(RefusedBecause::Capacity);
            drop(stream);
            continue;
        };
        let limits = service.connection_limits();
        let service = service.clone();
        let mut stop = stop_rx.clone();
        service.on_connection_open();
        let open = super::OpenConnection(service.clone());
        tokio::spawn(async move {
            let _open = open;
            let _slot = slot;
            serve_http(
                stream,
                service,
                limits.header_timeout,
                "api-proxy socket",
                &mut stop,
                |request| Arc::new(connection_for(request.headers())),
            )
            .await;
        });
    }
    drain(stop_tx, slots, max_connections).await;
    if let Some(path) = path {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn cert_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        crate::pki::leaf_params("device1", vec![], time::Duration::days(1))
            .self_signed(&key)
            .unwrap()
            .pem()
    }

    /// nginx's `$ssl_client_escaped_cert`: everything but unreserved characters escaped.
    fn escape(pem: &str) -> String {
        percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    #[test]
    fn an_escaped_pem_certificate_is_the_chain() {
        let pem = cert_pem();
        let chain = forwarded_client_cert(&headers(&[(CLIENT_CERT_HEADER, &escape(&pem))]))
            .unwrap()
            .unwrap();
        let expected = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(chain, vec![expected]);
        // The old `$ssl_client_cert` form: continuation lines indented with a tab.
        let indented = pem.trim_end().replace('\n', "\n\t");
        let chain = forwarded_client_cert(&headers(&[(CLIENT_CERT_HEADER, &escape(&indented))]));
        assert_eq!(chain.unwrap().unwrap().len(), 1);
    }

    #[test]
    fn absent_or_empty_is_no_certificate() {
        assert_eq!(forwarded_client_cert(&headers(&[])).unwrap(), None);
        assert_eq!(
            forwarded_client_cert(&headers(&[(CLIENT_CERT_HEADER, "")])).unwrap(),
            None
        );
    }

    #[test]
    fn malformed_headers_are_errors() {
        let pem = cert_pem();
        for (value, expected) in [
            ("hello".to_owned(), "not a URL-encoded PEM certificate"),
            (
                escape("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"),
                "bad PEM",
            ),
            (
                escape("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
                "not X.509",
            ),
            (
                escape(&format!(
                    "{pem}-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
                )),
                "other than certificates",
            ),
            ("%FF%FE".to_owned(), "not UTF-8"),
        ] {
            let err = forwarded_client_cert(&headers(&[(CLIENT_CERT_HEADER, &value)])).unwrap_err();
            assert!(err.contains(expected), "{value}: {err}");
        }
        let twice = headers(&[
            (CLIENT_CERT_HEADER, &escape(&pem)),
            (CLIENT_CERT_HEADER, &escape(&pem)),
        ]);
        assert!(forwarded_client_cert(&twice)
            .unwrap_err()
            .contains("more than one"));
    }

    #[test]
    fn the_last_forwarded_address_counts() {
        let h = headers(&[(FORWARDED_FOR_HEADER, "203.0.113.9, 10.1.2.3")]);
        assert_eq!(forwarded_for(&h), Some("10.1.2.3".parse().unwrap()));
        let h = headers(&[(FORWARDED_FOR_HEADER, "fd00::7")]);
        assert_eq!(forwarded_for(&h), Some("fd00::7".parse().unwrap()));
        let h = headers(&[(FORWARDED_FOR_HEADER, "unknown")]);
        assert_eq!(forwarded_for(&h), None);
        let connection = connection_for(&h);
        assert_eq!(connection.remote, "0.0.0.0:0".parse().unwrap());
        assert!(connection.forwarded.is_some());
    }
}
