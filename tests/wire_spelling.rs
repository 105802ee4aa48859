//! Header names on the wire, byte for byte. HTTP field names are case-insensitive, but the
//! deployed EST base is not: Cisco libest (`estclient`, `estproxy`) compares response header
//! names case-sensitively against exactly `Content-Type`, `Content-Length` and
//! `WWW-Authenticate`, and sends Basic credentials only after a challenge it could parse. These
//! tests read the raw bytes of every operation's answer and of every error status (over TLS,
//! over the API proxy's socket, from the metrics listener), the raw bytes of the upstream
//! client's requests, and run a client that behaves like libest's.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::client::{certs_from_answer, to_pem};
use common::{csr, standard_config, Pki, TestServer, PASSWORD, USER};
use edge_est::transport::head_case::conventional;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// One HTTP response as it came over the wire.
struct Raw {
    status_line: String,
    /// Header names and values exactly as sent.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Answers a HEAD: no body whatever the Content-Length.
    to_head: bool,
}

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Raw")
            .field("status_line", &self.status_line)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl Raw {
    fn status(&self) -> u16 {
        self.status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// The value of the header named exactly `name` (case-sensitive, as libest looks).
    fn exact(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every header name is spelled conventionally, `Content-Type` and `Content-Length` are
    /// there (but on 204), the length is the body's, and nothing is lower case.
    fn assert_spelling(&self, what: &str) {
        for (name, _) in &self.headers {
            assert_eq!(
                name,
                &conventional(&name.to_ascii_lowercase()),
                "{what}: header name {name:?} is not in its conventional spelling: {self:?}"
            );
        }
        if self.status() != 204 {
            assert!(self.exact("Content-Type").is_some(), "{what}: {self:?}");
            let length: usize = self
                .exact("Content-Length")
                .unwrap_or_else(|| panic!("{what}: no Content-Length: {self:?}"))
                .parse()
                .unwrap();
            if !self.to_head {
                assert_eq!(length, self.body.len(), "{what}");
            }
        }
    }
}

/// Splits the bytes of consecutive responses; `heads_only` says, per response, whether it
/// answers a HEAD (no body whatever its Content-Length).
fn parse_responses(mut bytes: &[u8], heads_only: &[bool]) -> Vec<Raw> {
    let mut out = Vec::new();
    let mut i = 0;
    while !bytes.is_empty() {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(bytes)));
        let head = std::str::from_utf8(&bytes[..end]).expect("ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap().to_owned();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("name: value");
                (n.to_owned(), v.trim().to_owned())
            })
            .collect();
        bytes = &bytes[end + 4..];
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse::<usize>().unwrap())
            .unwrap_or(0);
        let to_head = heads_only.get(i).copied().unwrap_or(false);
        let length = if to_head { 0 } else { length };
        out.push(Raw {
            status_line,
            headers,
            body: bytes[..length].to_vec(),
            to_head,
        });
        bytes = &bytes[length..];
        i += 1;
    }
    out
}

fn tls_client(root_pem: &str, identity: Option<(&str, &str)>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(chain.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Writes `request` (raw bytes) and reads until the server closes.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &[u8]) -> Vec<u8> {
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    out
}

async fn over_tls(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    request: &[u8],
) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    exchange(tls, request).await
}

/// A request's raw bytes, closing the connection after it.
fn request(method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut text = format!(
        "{method} /.well-known/est/{path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    );
    for (n, v) in headers {
        text.push_str(&format!("{n}: {v}\r\n"));
    }
    if method == "POST" {
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn basic(user: &str, password: &str) -> (&'static str, String) {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    ("Authorization", format!("Basic {encoded}"))
}

fn pkcs10() -> (&'static str, String) {
    ("Content-Type", "application/pkcs10".to_owned())
}

fn b64(der: &[u8]) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .encode(der)
        .into_bytes()
}

/// The standard configuration plus a forwarding label whose upstream is away (503) and a
/// short body deadline (408).
fn config(pki: &Pki) -> edge_est::config::Config {
    let mut config = standard_config(pki);
    config.limits.body_timeout_secs = 1;
    let extra: edge_est::config::Config = toml::from_str(
        r#"
[tls]
certificate = "server.pem"
key = "server.key"
[upstreams.away]
url = "https://localhost:1/.well-known/est"
trust = ["root.pem"]
connect_timeout_secs = 1
[[labels]]
name = "away"
mode = "forward"
upstream = "away"
client_trust = ["bootstrap"]
[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]
"#,
    )
    .unwrap();
    config.upstreams.extend(extra.upstreams);
    config.labels.extend(extra.labels);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_over_tls_spells_its_header_names_conventionally() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let server = TestServer::start(dir.path(), &config(&pki)).await;
    let anonymous = tls_client(&pki.root.cert_pem, None);
    let password = basic(USER, PASSWORD);
    let mut seen = BTreeSet::new();
    let mut statuses = BTreeSet::new();
    let mut check = |what: &str, bytes: Vec<u8>, heads_only: &[bool]| -> Vec<Raw> {
        let answers = parse_responses(&bytes, heads_only);
        assert!(!answers.is_empty(), "{what}: no answer");
        for answer in &answers {
            answer.assert_spelling(what);
            statuses.insert(answer.status());
            seen.extend(answer.headers.iter().map(|(n, _)| n.clone()));
        }
        answers
    };

    let a = check(
        "cacerts",
        over_tls(
            server.addr,
            &anonymous,
            &request("GET", "cacerts", &[], b""),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 200);
    assert_eq!(a[0].exact("Content-Type"), Some("application/pkcs7-mime"));
    assert_eq!(a[0].exact("Content-Transfer-Encoding"), Some("base64"));
    let a = check(
        "csrattrs",
        over_tls(
            server.addr,
            &anonymous,
            &request("GET", "csrattrs", &[], b""),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 200);
    let a = check(
        "csrattrs without attributes",
        over_tls(
            server.addr,
            &anonymous,
            &request("GET", "strict/csrattrs", &[], b""),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 204);

    let enroll = request(
        "POST",
        "simpleenroll",
        &[pkcs10(), password.clone()],
        &b64(&csr("wire-1")),
    );
    let a = check(
        "simpleenroll",
        over_tls(server.addr, &anonymous, &enroll).await,
        &[],
    );
    assert_eq!(a[0].status(), 200, "{a:?}");
    assert_eq!(certs_from_answer(&a[0].body).len(), 1);

    // Re-enrollment: a certificate issued here authenticates, the CSR keeps its subject.
    let key = rcgen::KeyPair::generate().unwrap();
    let first_key = rcgen::KeyPair::generate().unwrap();
    let mut first = rcgen::CertificateParams::default();
    first.distinguished_name = rcgen::DistinguishedName::new();
    first
        .distinguished_name
        .push(rcgen::DnType::CommonName, "wire-2");
    let first_csr = first.serialize_request(&first_key).unwrap().der().to_vec();
    let a = check(
        "simpleenroll",
        over_tls(
            server.addr,
            &anonymous,
            &request(
                "POST",
                "simpleenroll",
                &[pkcs10(), password.clone()],
                &b64(&first_csr),
            ),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 200);
    let cert = to_pem(&certs_from_answer(&a[0].body)[0]);
    let renewing = tls_client(
        &pki.root.cert_pem,
        Some((&cert, &first_key.serialize_pem())),
    );
    let mut same = rcgen::CertificateParams::default();
    same.distinguished_name = rcgen::DistinguishedName::new();
    same.distinguished_name
        .push(rcgen::DnType::CommonName, "wire-2");
    let renew_csr = same.serialize_request(&key).unwrap().der().to_vec();
    let a = check(
        "simplereenroll",
        over_tls(
            server.addr,
            &renewing,
            &request("POST", "simplereenroll", &[pkcs10()], &b64(&renew_csr)),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 200, "{a:?}");

    let a = check(
        "serverkeygen",
        over_tls(
            server.addr,
            &anonymous,
            &request(
                "POST",
                "serverkeygen",
                &[pkcs10(), password.clone()],
                &b64(&csr("wire-3")),
            ),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 200);
    assert!(a[0]
        .exact("Content-Type")
        .unwrap()
        .starts_with("multipart/mixed"));

    // Errors.
    let a = check(
        "401",
        over_tls(
            server.addr,
            &anonymous,
            &request("POST", "simpleenroll", &[pkcs10()], &b64(&csr("x"))),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 401);
    assert!(
        a[0].exact("WWW-Authenticate")
            .unwrap()
            .starts_with("Basic realm="),
        "{a:?}"
    );
    let a = check(
        "400",
        over_tls(
            server.addr,
            &anonymous,
            &request(
                "POST",
                "simpleenroll",
                &[pkcs10(), password.clone()],
                b"!!not base64!!",
            ),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 400);
    let a = check(
        "403",
        over_tls(
            server.addr,
            &anonymous,
            &request(
                "POST",
                "simpleenroll",
                &[pkcs10(), basic("other", PASSWORD)],
                &b64(&csr("denied-user")),
            ),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 403, "{a:?}");
    let a = check(
        "404",
        over_tls(
            server.addr,
            &anonymous,
            &request("GET", "nosuch/cacerts", &[], b""),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 404);
    let a = check(
        "405",
        over_tls(
            server.addr,
            &anonymous,
            &request("GET", "simpleenroll", &[], b""),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 405);
    assert_eq!(a[0].exact("Allow"), Some("POST"));
    let big = vec![b'A'; 70 * 1024];
    let a = check(
        "413",
        over_tls(
            server.addr,
            &anonymous,
            &request("POST", "simpleenroll", &[pkcs10(), password.clone()], &big),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 413);
    assert_eq!(a[0].exact("Connection"), Some("close"));
    let a = check(
        "415",
        over_tls(
            server.addr,
            &anonymous,
            &request(
                "POST",
                "simpleenroll",
                &[("Content-Type", "text/plain".into()), password.clone()],
                b"x",
            ),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 415);
    // 408: the body never comes whole.
    let slow = format!(
        "POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/pkcs10\r\n{}: {}\r\nContent-Length: 100\r\n\r\nMIIB",
        password.0, password.1
    )
    .into_bytes();
    let a = check("408", over_tls(server.addr, &anonymous, &slow).await, &[]);
    assert_eq!(a[0].status(), 408);
    let a = check(
        "503",
        over_tls(
            server.addr,
            &anonymous,
            &request(
                "POST",
                "away/simpleenroll",
                &[pkcs10(), password.clone()],
                &b64(&csr("away-1")),
            ),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 503, "{a:?}");
    assert!(a[0].exact("Retry-After").is_some());

    // HEAD, then a GET on the same connection: the HEAD's answer has no body, and the
    // answer after it is still rewritten (the framing was followed).
    let mut two = b"HEAD /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec();
    two.extend_from_slice(&request("GET", "cacerts", &[], b""));
    let a = check(
        "HEAD then GET",
        over_tls(server.addr, &anonymous, &two).await,
        &[true, false],
    );
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[1].status(), 200);
    server.stop().await;

    // 429 from a server with a per-address limit reached at once.
    let mut limited = config(&pki);
    limited.limits.rate_per_address = 0.1;
    limited.limits.burst_per_address = 1.0;
    let server = TestServer::start(dir.path(), &limited).await;
    let _ = over_tls(
        server.addr,
        &anonymous,
        &request("GET", "cacerts", &[], b""),
    )
    .await;
    let a = check(
        "429",
        over_tls(
            server.addr,
            &anonymous,
            &request("GET", "cacerts", &[], b""),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 429);
    assert!(a[0].exact("Retry-After").is_some());
    server.stop().await;

    for status in [200, 204, 400, 401, 403, 404, 405, 408, 413, 415, 429, 503] {
        assert!(
            statuses.contains(&status),
            "status {status} not covered: {statuses:?}"
        );
    }
    for name in [
        "Content-Type",
        "Content-Length",
        "Content-Transfer-Encoding",
        "WWW-Authenticate",
        "Retry-After",
        "Allow",
        "Connection",
        "Date",
    ] {
        assert!(seen.contains(name), "{name} never seen: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_socket_and_the_metrics_listener_spell_them_too() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    config.proxy_socket = Some(dir.path().join("run/proxy.sock"));
    let app = edge_est::app::build(&config, dir.path()).unwrap();
    let socket = edge_est::app::bind_proxy_socket(&config).unwrap().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn(edge_est::app::run_proxy_socket(
        socket,
        app.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    let via_proxy = |bytes: Vec<u8>| {
        let path = dir.path().join("run/proxy.sock");
        async move {
            let stream = tokio::net::UnixStream::connect(path).await.unwrap();
            parse_responses(&exchange(stream, &bytes).await, &[])
        }
    };
    let a = via_proxy(request("GET", "cacerts", &[], b"")).await;
    a[0].assert_spelling("proxy cacerts");
    assert_eq!(a[0].status(), 200);
    let a = via_proxy(request(
        "POST",
        "simpleenroll",
        &[pkcs10()],
        &b64(&csr("p-1")),
    ))
    .await;
    a[0].assert_spelling("proxy 401");
    assert!(a[0].exact("WWW-Authenticate").is_some(), "{a:?}");
    let a = via_proxy(request(
        "POST",
        "simpleenroll",
        &[pkcs10(), basic(USER, PASSWORD)],
        &b64(&csr("p-1")),
    ))
    .await;
    a[0].assert_spelling("proxy simpleenroll");
    assert_eq!(a[0].status(), 200);
    let _ = stop.send(());
    proxy.await.unwrap();

    // The metrics listener.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let render = Arc::new(move || app.render_metrics());
    let metrics = tokio::spawn(edge_est::metrics::serve(listener, render, async {
        let _ = stopped.await;
    }));
    for (method, path, status) in [
        ("GET", "/metrics", 200),
        ("GET", "/nothing", 404),
        ("POST", "/metrics", 405),
    ] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let bytes = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        let a = parse_responses(&exchange(tcp, bytes.as_bytes()).await, &[]);
        a[0].assert_spelling(&format!("metrics {method} {path}"));
        assert_eq!(a[0].status(), status);
    }
    let _ = stop.send(());
    metrics.await.unwrap();
}

/// A TLS listener that records the raw head of each request it gets and answers 503.
async fn recording_upstream(pki_dir: &Path) -> (SocketAddr, tokio::sync::mpsc::Receiver<String>) {
    let chain = std::fs::read_to_string(pki_dir.join("server.pem")).unwrap();
    let key = std::fs::read_to_string(pki_dir.join("server.key")).unwrap();
    let config = edge_est::transport::tls::server_config(
        &chain,
        &edge_est::keys::PrivateKey::Pem(key.clone()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned()).await;
            let _ = tls
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            let _ = tls.shutdown().await;
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_client_sends_conventional_header_names() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let (upstream, mut heads) = recording_upstream(dir.path()).await;
    std::fs::write(dir.path().join("upstream-password"), "secret").unwrap();
    let mut config = standard_config(&pki);
    let extra: edge_est::config::Config = toml::from_str(&format!(
        r#"
[tls]
certificate = "server.pem"
key = "server.key"
[upstreams.parent]
url = "https://localhost:{port}/.well-known/est"
trust = ["root.pem"]
username = "layer2"
password_file = "upstream-password"
[[labels]]
name = "up"
mode = "forward"
upstream = "parent"
client_trust = ["bootstrap"]
[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]
"#,
        port = upstream.port()
    ))
    .unwrap();
    config.upstreams.extend(extra.upstreams);
    config.labels.extend(extra.labels);
    let server = TestServer::start(dir.path(), &config).await;
    let client = tls_client(&pki.root.cert_pem, None);
    let a = parse_responses(
        &over_tls(
            server.addr,
            &client,
            &request(
                "POST",
                "up/simpleenroll",
                &[pkcs10(), basic(USER, PASSWORD)],
                &b64(&csr("up-1")),
            ),
        )
        .await,
        &[],
    );
    assert_eq!(a[0].status(), 503, "{a:?}");
    let head = tokio::time::timeout(Duration::from_secs(5), heads.recv())
        .await
        .unwrap()
        .unwrap();
    let names: Vec<&str> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n))
        .collect();
    for name in &names {
        assert_eq!(*name, conventional(&name.to_ascii_lowercase()), "{head}");
    }
    for name in ["Host", "Content-Type", "Content-Length", "Authorization"] {
        assert!(names.contains(&name), "{name} missing from {head}");
    }
    server.stop().await;
}

/// A client that behaves like libest's `estclient`: one connection per request, header names
/// compared byte for byte, `Content-Type` and `Content-Length` required, and Basic
/// credentials sent only after a 401 whose `WWW-Authenticate: Basic realm=...` it could parse.
struct LibestLike {
    addr: SocketAddr,
    root_pem: String,
    user: String,
    password: String,
}

#[derive(Debug, PartialEq)]
enum LibestError {
    Status(u16),
    MissingContentType,
    MissingContentLength,
    WrongContentType(String),
    LengthMismatch,
    NoAuthenticateHeader,
}

impl LibestLike {
    /// Checks an answer as libest does; returns its body.
    fn accept(answer: &Raw, content_type: &str) -> Result<Vec<u8>, LibestError> {
        if !answer.status_line.starts_with("HTTP/1.1 ") {
            return Err(LibestError::Status(0));
        }
        if answer.status() == 204 {
            return Ok(Vec::new());
        }
        if answer.status() != 200 {
            return Err(LibestError::Status(answer.status()));
        }
        let ct = answer
            .exact("Content-Type")
            .ok_or(LibestError::MissingContentType)?;
        if !ct.starts_with(content_type) {
            return Err(LibestError::WrongContentType(ct.to_owned()));
        }
        let cl: usize = answer
            .exact("Content-Length")
            .ok_or(LibestError::MissingContentLength)?
            .parse()
            .map_err(|_| LibestError::MissingContentLength)?;
        if cl != answer.body.len() {
            return Err(LibestError::LengthMismatch);
        }
        Ok(answer.body.clone())
    }

    /// The realm of a `WWW-Authenticate: Basic realm=...` challenge, if there is one.
    fn basic_challenge(answer: &Raw) -> Result<String, LibestError> {
        let value = answer
            .exact("WWW-Authenticate")
            .ok_or(LibestError::NoAuthenticateHeader)?;
        let rest = value
            .strip_prefix("Basic")
            .ok_or(LibestError::NoAuthenticateHeader)?;
        let realm = rest
            .split(',')
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k.eq_ignore_ascii_case("realm"))
            .map(|(_, v)| v.trim_matches('"').to_owned())
            .ok_or(LibestError::NoAuthenticateHeader)?;
        Ok(realm)
    }

    async fn send(&self, identity: Option<(&str, &str)>, bytes: Vec<u8>) -> Raw {
        let connector = tls_client(&self.root_pem, identity);
        let mut answers = parse_responses(&over_tls(self.addr, &connector, &bytes).await, &[]);
        answers.remove(0)
    }

    async fn get(&self, op: &str, content_type: &str) -> Result<Vec<u8>, LibestError> {
        let answer = self.send(None, request("GET", op, &[], b"")).await;
        Self::accept(&answer, content_type)
    }

    /// An enrollment: first without credentials; Basic only after a challenge it parsed.
    async fn enroll(
        &self,
        op: &str,
        identity: Option<(&str, &str)>,
        csr_der: &[u8],
    ) -> Result<Vec<u8>, LibestError> {
        let body = b64(csr_der);
        let answer = self
            .send(identity, request("POST", op, &[pkcs10()], &body))
            .await;
        let answer = if answer.status() == 401 {
            let _realm = Self::basic_challenge(&answer)?;
            self.send(
                identity,
                request(
                    "POST",
                    op,
                    &[pkcs10(), basic(&self.user, &self.password)],
                    &body,
                ),
            )
            .await
        } else {
            answer
        };
        Self::accept(&answer, "application/pkcs7-mime")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_behaves_like_libest_enrolls_reenrolls_and_gets_cacerts_and_csrattrs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let server = TestServer::start(dir.path(), &standard_config(&pki)).await;
    let client = LibestLike {
        addr: server.addr,
        root_pem: pki.root.cert_pem.clone(),
        user: USER.to_owned(),
        password: PASSWORD.to_owned(),
    };
    let cacerts = client
        .get("cacerts", "application/pkcs7-mime")
        .await
        .unwrap();
    assert!(!certs_from_answer(&cacerts).is_empty());
    let csrattrs = client
        .get("csrattrs", "application/csrattrs")
        .await
        .unwrap();
    assert!(!csrattrs.is_empty());

    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "libest-dev1");
    let csr_der = params.serialize_request(&key).unwrap().der().to_vec();
    let issued = client.enroll("simpleenroll", None, &csr_der).await.unwrap();
    let cert = certs_from_answer(&issued).remove(0);

    // Re-enrollment with the certificate as the TLS client certificate, the same key
    // (libest's `-r` reuses it by default).
    let cert_pem = to_pem(&cert);
    let renewed = client
        .enroll(
            "simplereenroll",
            Some((&cert_pem, &key.serialize_pem())),
            &csr_der,
        )
        .await
        .unwrap();
    assert_eq!(certs_from_answer(&renewed).len(), 1);
    assert_eq!(server.journal().len(), 2);
    server.stop().await;

    // The same client refuses what edge-est used to send: lower-case names, title case.
    for head in [
        "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"x\"\r\ncontent-length: 0\r\n\r\n",
        "HTTP/1.1 401 Unauthorized\r\nWww-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n",
    ] {
        let raw = parse_responses(head.as_bytes(), &[]).remove(0);
        assert_eq!(
            LibestLike::basic_challenge(&raw),
            Err(LibestError::NoAuthenticateHeader)
        );
    }
    let raw = parse_responses(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/pkcs7-mime\r\ncontent-length: 0\r\n\r\n",
        &[],
    )
    .remove(0);
    assert_eq!(
        LibestLike::accept(&raw, "application/pkcs7-mime"),
        Err(LibestError::MissingContentType)
    );
}
