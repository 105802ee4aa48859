//! A small EST client over rustls and hyper, shaped like IoT Edge's (aziot-certd): HTTP/1.1
//! without ALPN, lowercase header names, one connection per request unless told otherwise.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone)]
pub struct EstClient {
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
}

impl EstClient {
    /// A client trusting `root_pem`, presenting `identity` (certificate chain PEM, key PEM).
    pub fn new(addr: SocketAddr, root_pem: &str, identity: Option<(&str, &str)>) -> EstClient {
        Self::with_versions(
            addr,
            root_pem,
            identity,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
        )
    }

    pub fn with_versions(
        addr: SocketAddr,
        root_pem: &str,
        identity: Option<(&str, &str)>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> EstClient {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some((chain, key)) => {
                let chain: Vec<_> = CertificateDer::pem_slice_iter(chain.as_bytes())
                    .map(Result::unwrap)
                    .collect();
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        EstClient {
            addr,
            tls: Arc::new(config),
        }
    }

    /// One request on a fresh TLS connection.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Answer {
        let mut sender = self.connect().await;
        Self::send(&mut sender, self.addr, method, path, headers, body).await
    }

    /// Opens a connection for several requests.
    pub async fn connect(&self) -> http1::SendRequest<Full<Bytes>> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake");
        let (sender, connection) = http1::handshake(TokioIo::new(tls))
            .await
            .expect("HTTP handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        sender
    }

    pub async fn send(
        sender: &mut http1::SendRequest<Full<Bytes>>,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Answer {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("/.well-known/est/{path}"))
            .header("host", format!("localhost:{}", addr.port()));
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if method == "POST" {
            request = request.header("content-length", body.len().to_string());
        }
        let request = request.body(Full::new(Bytes::from(body))).unwrap();
        sender.ready().await.expect("connection ready");
        let response = sender.send_request(request).await.expect("response");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }
}

/// `Authorization: Basic ...` for user and password.
pub fn basic(user: &str, password: &str) -> (&'static str, String) {
    use base64::Engine;
    (
        "authorization",
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        ),
    )
}

/// A CSR body as IoT Edge sends it: base64 of the DER in 64-column lines, each ending in LF.
pub fn iot_edge_body(csr_der: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(csr_der);
    let mut out = String::new();
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.into_bytes()
}

/// Decodes a base64 certs-only PKCS#7 answer into DER certificates, in order.
pub fn certs_from_answer(body: &[u8]) -> Vec<Vec<u8>> {
    let der = edge_est::est::body::decode_base64_body(body).expect("base64 answer");
    edge_est::est::pkcs7::decode_certs_only(&der).expect("certs-only PKCS#7")
}

pub fn to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A PKCS#10 request for `key` with CN `cn`; `shape` adds to it (names, CA:TRUE, ...).
pub fn csr_shaped(
    cn: &str,
    key: &rcgen::KeyPair,
    shape: impl FnOnce(&mut rcgen::CertificateParams),
) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    shape(&mut params);
    params.serialize_request(key).unwrap().der().to_vec()
}

/// POSTs a CSR to `path` as IoT Edge does (base64 body, `application/pkcs10`), with `auth`
/// headers.
pub async fn post_csr(
    client: &EstClient,
    path: &str,
    auth: &[(&str, String)],
    body: Vec<u8>,
) -> Answer {
    let mut headers = vec![("content-type", "application/pkcs10".to_owned())];
    headers.extend(auth.iter().cloned());
    client
        .request("POST", path, &headers, iot_edge_body(&body))
        .await
}

/// The issued certificate of a 200 answer (fails the test with the answer's text otherwise).
pub fn leaf_of(answer: &Answer) -> Vec<u8> {
    assert_eq!(answer.status, 200, "{}", answer.text());
    certs_from_answer(&answer.body).remove(0)
}

/// The answer is `status` and its text says `says`.
pub fn refused(answer: &Answer, status: u16, says: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert!(
        answer.text().contains(says),
        "{says:?} in {}",
        answer.text()
    );
}
