//! A misbehaving upstream: a real TLS listener on loopback (the test PKI's `localhost` server
//! certificate) that speaks EST as badly as it is told to. A forwarding label pointed at it
//! shows what a child gets for each kind of upstream failure.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateSigningRequestDer;

/// How the stub answers `simpleenroll`.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Signs the CSR with the PKI's issuing CA: the positive control.
    Sign,
    /// 202 Accepted with this `Retry-After`.
    Pending(&'static str),
    /// This status (503, 502, 500, 403, ...) with this text and optional `Retry-After`.
    Status(u16, &'static str, Option<&'static str>),
    /// 200 with a body that is not what EST promises: (content type, body).
    Malformed(&'static str, &'static [u8]),
    /// 200 with a certificates-only PKCS#7 holding no certificate.
    NoCertificate,
    /// 200 with a well-formed certificate from the right CA and the requested subject, but
    /// for another key than the CSR's.
    AnotherKey,
    /// Waits this long, then signs.
    Slow(Duration),
    /// Signs at once, answers `/cacerts` after the pause.
    SlowCacerts(Duration),
    /// Reads the request and never answers.
    Never,
}

pub struct UpstreamStub {
    pub addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    enrollments: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    behaviour: Arc<Mutex<Behaviour>>,
    enrollments: Arc<AtomicUsize>,
    issuer: Issuer<'static, KeyPair>,
    /// `/cacerts`: the issuing CA and the root (base64 certs-only).
    cacerts: Bytes,
}

impl UpstreamStub {
    /// Starts the stub with the PKI written in `dir` (server.pem/key, issuing-ca.pem/key).
    pub async fn start(dir: &Path, behaviour: Behaviour) -> UpstreamStub {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let tls = edge_est::transport::tls::server_config(
            &read("server.pem"),
            &edge_est::keys::PrivateKey::Pem(read("server.key")),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let chain_pem = read("issuing-ca.pem");
        let key = KeyPair::from_pem(&read("issuing-ca.key")).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&chain_pem, key).unwrap();
        let chain: Vec<Vec<u8>> =
            rustls::pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .map(|c| c.unwrap().to_vec())
                .collect();
        let refs: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
        let cacerts = Bytes::from(edge_est::est::body::encode_base64_lines(
            &edge_est::est::pkcs7::encode_certs_only(&refs).unwrap(),
        ));
        let behaviour = Arc::new(Mutex::new(behaviour));
        let enrollments = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            behaviour: behaviour.clone(),
            enrollments: enrollments.clone(),
            issuer,
            cacerts,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Connections end with the stub (dropping the set aborts them): a pooled
            // connection must not outlive it.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                while connections.try_join_next().is_some() {}
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let shared = shared.clone();
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |request| {
                        let shared = shared.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&shared, request).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        UpstreamStub {
            addr,
            behaviour,
            enrollments,
            task,
        }
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    /// `simpleenroll` requests received so far.
    pub fn enrollments(&self) -> usize {
        self.enrollments.load(Ordering::SeqCst)
    }

    /// The `[upstreams.NAME]` table for a configuration in the PKI's directory.
    pub fn upstream_toml(&self, name: &str, request_timeout_secs: u64) -> String {
        format!(
            "[upstreams.{name}]\nurl = \"https://localhost:{}/.well-known/est\"\ntrust = [\"root.pem\"]\nconnect_timeout_secs = 1\nrequest_timeout_secs = {request_timeout_secs}\nretry_after_secs = 17\n",
            self.addr.port()
        )
    }
}

impl Drop for UpstreamStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn response(
    status: u16,
    content_type: &str,
    body: impl Into<Bytes>,
) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap()
}

fn certs_only(ders: &[&[u8]]) -> http::Response<Full<Bytes>> {
    let pkcs7 = edge_est::est::pkcs7::encode_certs_only(ders).unwrap();
    let mut r = response(
        200,
        "application/pkcs7-mime; smime-type=certs-only",
        edge_est::est::body::encode_base64_lines(&pkcs7),
    );
    r.headers_mut()
        .insert("content-transfer-encoding", "base64".parse().unwrap());
    r
}

async fn answer(
    shared: &Shared,
    request: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    if path.ends_with("/cacerts") {
        let pause = match *shared.behaviour.lock().unwrap() {
            Behaviour::SlowCacerts(pause) => Some(pause),
            _ => None,
        };
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
        let mut r = response(200, "application/pkcs7-mime", shared.cacerts.clone());
        r.headers_mut()
            .insert("content-transfer-encoding", "base64".parse().unwrap());
        return r;
    }
    if !path.ends_with("/simpleenroll") {
        return response(404, "text/plain", "not here");
    }
    shared.enrollments.fetch_add(1, Ordering::SeqCst);
    let behaviour = shared.behaviour.lock().unwrap().clone();
    let sign = |public_key_of: Option<&KeyPair>| {
        let der = edge_est::est::body::decode_base64_body(&body).unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(der),
        )
        .unwrap();
        let cert = match public_key_of {
            None => csr.signed_by(&shared.issuer).unwrap(),
            Some(other) => {
                let mut params = CertificateParams::default();
                params.distinguished_name = csr.params.distinguished_name.clone();
                params.use_authority_key_identifier_extension = true;
                params.signed_by(other, &shared.issuer).unwrap()
            }
        };
        certs_only(&[cert.der()])
    };
    match behaviour {
        Behaviour::Sign => sign(None),
        Behaviour::Pending(retry_after) => {
            let mut r = response(202, "text/plain", "");
            r.headers_mut()
                .insert("retry-after", retry_after.parse().unwrap());
            r
        }
        Behaviour::Status(status, text, retry_after) => {
            let mut r = response(status, "text/plain", text);
            if let Some(v) = retry_after {
                r.headers_mut().insert("retry-after", v.parse().unwrap());
            }
            r
        }
        Behaviour::Malformed(content_type, body) => response(200, content_type, body),
        Behaviour::NoCertificate => certs_only(&[]),
        Behaviour::AnotherKey => sign(Some(&KeyPair::generate().unwrap())),
        Behaviour::Slow(pause) => {
            tokio::time::sleep(pause).await;
            sign(None)
        }
        Behaviour::SlowCacerts(_) => sign(None),
        Behaviour::Never => std::future::pending().await,
    }
}
