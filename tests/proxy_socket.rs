//! The listener for the IoT Edge API proxy (`proxy_socket`): plain HTTP on a unix socket on
//! which the client certificate nginx forwards in `x-ms-edge-clientcert` authenticates, and
//! the TLS listener, on which that header is ignored. Each refusal comes with its positive
//! control; the socket keeps the TLS listener's limits (body size, header timeout, connection
//! cap) and keys the per-address rate limit by the forwarded `x-forwarded-for`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::client::{certs_from_answer, iot_edge_body, Answer, EstClient};
use common::pki::Credential;
use common::{csr, standard_config, Pki};
use edge_est::config::Config;
use edge_est::server::App;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

const CLIENT_CERT: &str = "x-ms-edge-clientcert";

/// What nginx's `$ssl_client_escaped_cert` makes of a PEM certificate.
fn escaped(pem: &str) -> String {
    percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The server on both listeners: TLS on a loopback port, plain HTTP on `dir/run/proxy.sock`.
struct Both {
    app: Arc<App>,
    tls: std::net::SocketAddr,
    socket: PathBuf,
    stop: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Both {
    async fn start(dir: &Path, mut config: Config) -> Both {
        std::fs::create_dir_all(dir.join("run")).unwrap();
        let socket = dir.join("run/proxy.sock");
        config.proxy_socket = Some(socket.clone());
        config.validate().expect("valid with a proxy socket");
        let app = edge_est::app::build(&config, dir).expect("configuration loads");
        let listener = edge_est::transport::Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let tls = listener.local_addr();
        let proxy = edge_est::app::bind_proxy_socket(&config)
            .unwrap()
            .expect("a socket");
        let (stop_tls, stopped_tls) = oneshot::channel::<()>();
        let (stop_proxy, stopped_proxy) = oneshot::channel::<()>();
        let tasks = vec![
            tokio::spawn(edge_est::app::run(listener, app.clone(), async {
                let _ = stopped_tls.await;
            })),
            tokio::spawn(edge_est::app::run_proxy_socket(proxy, app.clone(), async {
                let _ = stopped_proxy.await;
            })),
        ];
        Both {
            app,
            tls,
            socket,
            stop: vec![stop_tls, stop_proxy],
            tasks,
        }
    }

    async fn stop(self) {
        for stop in self.stop {
            let _ = stop.send(());
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }

    fn journal(&self) -> Vec<edge_est::journal::JournalEntry> {
        edge_est::journal::Journal::read_all(self.app.journal().path()).unwrap_or_default()
    }

    /// One request over the unix socket, as nginx sends it.
    async fn via_proxy(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Answer {
        let stream = UnixStream::connect(&self.socket).await.expect("connect");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("/.well-known/est/{path}"))
            .header("host", "gw-middle.plant.local")
            .header("content-length", body.len().to_string());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .expect("response");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: body.to_vec(),
        }
    }
}

fn enroll_headers(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut headers = vec![("content-type", "application/pkcs10".to_owned())];
    headers.extend(extra.iter().cloned());
    headers
}

fn common_name(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    cn
}

fn setup() -> (tempfile::TempDir, Pki) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    (dir, pki)
}

/// A device that was issued its certificate by this server earlier (its first enrollment,
/// with the Basic user over TLS).
async fn enrolled_device(server: &Both, pki: &Pki, cn: &str) -> Credential {
    common::enrolled_at(server.tls, &pki.root.cert_pem, cn).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_certificate_authenticates_on_the_socket_and_is_ignored_over_tls() {
    let (dir, pki) = setup();
    let server = Both::start(dir.path(), standard_config(&pki)).await;
    let device = enrolled_device(&server, &pki, "device-7").await;
    let header = (CLIENT_CERT, escaped(&device.cert_pem));

    // Positive: label `strict` takes client certificates only; the forwarded one counts.
    let answer = server
        .via_proxy(
            "POST",
            "strict/simpleenroll",
            &enroll_headers(std::slice::from_ref(&header)),
            iot_edge_body(&csr("device-7")),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let certs = certs_from_answer(&answer.body);
    assert_eq!(common_name(&certs[0]), "device-7");
    let journal = server.journal();
    assert_eq!(journal.len(), 2, "its first enrollment, then this one");
    assert!(
        journal[1].identity.contains("CN=device-7") && journal[1].identity.contains("(issuer)"),
        "the journal names the forwarded certificate: {}",
        journal[1].identity
    );

    // The same header on the TLS listener, without a TLS client certificate: ignored, 401.
    let tls = EstClient::new(server.tls, &pki.root.cert_pem, None);
    let answer = tls
        .request(
            "POST",
            "strict/simpleenroll",
            &enroll_headers(std::slice::from_ref(&header)),
            iot_edge_body(&csr("device-7")),
        )
        .await;
    assert_eq!(answer.status, 401, "{}", answer.text());
    assert!(
        answer.text().contains("authentication required"),
        "{}",
        answer.text()
    );
    // ... and with a certificate in TLS, it is the TLS one that counts, not the header's.
    let other = enrolled_device(&server, &pki, "device-8").await;
    let tls_with_cert = EstClient::new(
        server.tls,
        &pki.root.cert_pem,
        Some((&other.cert_pem, &other.key_pem)),
    );
    let answer = tls_with_cert
        .request(
            "POST",
            "strict/simpleenroll",
            &enroll_headers(std::slice::from_ref(&header)),
            iot_edge_body(&csr("device-7")),
        )
        .await;
    assert_eq!(
        answer.status,
        403,
        "device-8 may not ask for device-7: {}",
        answer.text()
    );
    let answer = tls_with_cert
        .request(
            "POST",
            "strict/simpleenroll",
            &enroll_headers(&[header]),
            iot_edge_body(&csr("device-8")),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    // On the socket, no header is no certificate: nothing is granted by reaching the socket.
    let answer = server
        .via_proxy(
            "POST",
            "strict/simpleenroll",
            &enroll_headers(&[]),
            iot_edge_body(&csr("device-7")),
        )
        .await;
    assert_eq!(answer.status, 401, "{}", answer.text());
    assert_eq!(
        server.journal().len(),
        4,
        "two first enrollments, two renewals"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_certificates_are_validated_and_malformed_headers_refused() {
    let (dir, pki) = setup();
    let server = Both::start(dir.path(), standard_config(&pki)).await;
    let device = enrolled_device(&server, &pki, "device-7").await;
    let enroll = |value: String| {
        let headers = enroll_headers(&[(CLIENT_CERT, value)]);
        let server = &server;
        async move {
            server
                .via_proxy(
                    "POST",
                    "strict/simpleenroll",
                    &headers,
                    iot_edge_body(&csr("device-7")),
                )
                .await
        }
    };

    // A well-formed certificate from a CA the label does not trust: 401, as over TLS.
    let foreign = pki.foreign.valid_client("device-7");
    let answer = enroll(escaped(&foreign.cert_pem)).await;
    assert_eq!(answer.status, 401, "{}", answer.text());
    assert!(
        answer.text().contains("client certificate rejected"),
        "{}",
        answer.text()
    );

    // Malformed headers: 400 saying what is wrong, whatever the label.
    for (value, says) in [
        (
            "not-a-certificate".to_owned(),
            "not a URL-encoded PEM certificate",
        ),
        (
            escaped("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            "not X.509",
        ),
        (
            escaped(&device.cert_pem.replace("-----END CERTIFICATE-----", "")),
            "PEM",
        ),
        (
            escaped(&format!("{}{}", device.cert_pem, device.key_pem)),
            "other than certificates",
        ),
    ] {
        let answer = enroll(value.clone()).await;
        assert_eq!(answer.status, 400, "{value}: {}", answer.text());
        let text = answer.text();
        assert!(
            text.starts_with("malformed x-ms-edge-clientcert header from the API proxy")
                && text.contains(says),
            "{value}: {text}"
        );
        // cacerts too: a broken header is never taken for "no certificate".
        let answer = server
            .via_proxy(
                "GET",
                "cacerts",
                &[(CLIENT_CERT, value.clone())],
                Vec::new(),
            )
            .await;
        assert_eq!(answer.status, 400, "{}", answer.text());
    }
    // Positive control on the same server: the well-formed header of a trusted device.
    let answer = enroll(escaped(&device.cert_pem)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    server.stop().await;
}

/// The socket has no handshake to refuse a chain over the caps of `auth::caps`: a forwarded
/// header of more certificates than a TLS client may present is refused (400) before any
/// verification; at the cap, the device's certificate with its issuing CA repeated, it is
/// verified and served (positive control at the boundary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_chain_over_the_certificate_cap_is_refused_before_verification() {
    let (dir, pki) = setup();
    let server = Both::start(dir.path(), standard_config(&pki)).await;
    let device = enrolled_device(&server, &pki, "device-8").await;
    let cap = edge_est::auth::caps::MAX_CHAIN_CERTS;
    let chain_of = |certs: usize| {
        let mut pem = device.cert_pem.clone();
        for _ in 1..certs {
            pem.push_str(&pki.issuing.cert_pem);
        }
        escaped(&pem)
    };
    let enroll = |value: String| {
        let headers = enroll_headers(&[(CLIENT_CERT, value)]);
        let server = &server;
        async move {
            server
                .via_proxy(
                    "POST",
                    "strict/simpleenroll",
                    &headers,
                    iot_edge_body(&csr("device-8")),
                )
                .await
        }
    };
    let answer = enroll(chain_of(cap + 1)).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert!(
        answer
            .text()
            .contains(&format!("holds {} certificates, more than {cap}", cap + 1)),
        "{}",
        answer.text()
    );
    let answer = enroll(chain_of(cap)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_keeps_the_limits_of_the_tls_listener() {
    let (dir, pki) = setup();
    let mut config = standard_config(&pki);
    config.limits.max_body_bytes = 2048;
    config.limits.header_timeout_secs = 2;
    config.limits.max_connections = 3;
    config.limits.max_connections_per_address = 3;
    let server = Both::start(dir.path(), config).await;
    let device = enrolled_device(&server, &pki, "device-7").await;
    let header = (CLIENT_CERT, escaped(&device.cert_pem));

    // Body over the limit: 413, as over TLS.
    let answer = server
        .via_proxy(
            "POST",
            "strict/simpleenroll",
            &enroll_headers(std::slice::from_ref(&header)),
            vec![b'A'; 4096],
        )
        .await;
    assert_eq!(answer.status, 413, "{}", answer.text());

    // Headers trickled in: the connection is closed after the header timeout.
    let mut slow = UnixStream::connect(&server.socket).await.unwrap();
    slow.write_all(b"GET /.well-known/est/cacerts HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(6), slow.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "closed after the header timeout");
    assert!(started.elapsed() >= Duration::from_millis(1800));
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(slow);

    // Connection cap: with 3 connections open, a fourth is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = UnixStream::connect(&server.socket).await.unwrap();
        stream
            .write_all(b"GET /.well-known/est/cacerts HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        held.push(stream);
    }
    let mut fourth = UnixStream::connect(&server.socket).await.unwrap();
    let _ = fourth
        .write_all(b"GET /.well-known/est/cacerts HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), fourth.read_to_end(&mut buffer))
        .await
        .expect("closed at once");
    assert!(
        read.is_err() || buffer.is_empty(),
        "the fourth connection got an answer: {}",
        String::from_utf8_lossy(&buffer)
    );
    drop(held);
    // Positive control: once they are gone, the socket serves again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = server.via_proxy("GET", "cacerts", &[], Vec::new()).await;
    assert_eq!(answer.status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_address_rate_limit_follows_the_forwarded_address_on_the_socket_only() {
    let (dir, pki) = setup();
    let mut config = standard_config(&pki);
    config.limits.rate_per_address = 0.01;
    config.limits.burst_per_address = 2.0;
    let server = Both::start(dir.path(), config).await;
    let from = |ip: &str| vec![("x-forwarded-for", ip.to_owned())];

    for _ in 0..2 {
        let answer = server
            .via_proxy("GET", "cacerts", &from("10.3.0.1"), Vec::new())
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let answer = server
        .via_proxy("GET", "cacerts", &from("10.3.0.1"), Vec::new())
        .await;
    assert_eq!(answer.status, 429, "{}", answer.text());
    // Another child behind the same proxy has its own bucket; a client-supplied entry before
    // the one nginx appended does not count.
    let answer = server
        .via_proxy("GET", "cacerts", &from("10.3.0.1, 10.3.0.2"), Vec::new())
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    // Over TLS the header means nothing: the bucket is the TCP peer's (127.0.0.1).
    let tls = EstClient::new(server.tls, &pki.root.cert_pem, None);
    for ip in ["10.9.0.1", "10.9.0.2"] {
        let answer = tls.request("GET", "cacerts", &from(ip), Vec::new()).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let answer = tls
        .request("GET", "cacerts", &from("10.9.0.3"), Vec::new())
        .await;
    assert_eq!(answer.status, 429, "{}", answer.text());
    server.stop().await;
}

#[test]
fn the_socket_path_is_validated_and_a_live_socket_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    for (path, says) in [
        ("relative/proxy.sock", "absolute"),
        ("/proxy.sock", "directory of its own"),
        ("/var/run/edge-est/", "socket file"),
    ] {
        config.proxy_socket = Some(PathBuf::from(path));
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("proxy_socket:") && err.contains(says),
            "{path}: {err}"
        );
    }
    let long = format!("/{}/proxy.sock", "d".repeat(110));
    config.proxy_socket = Some(PathBuf::from(long));
    assert!(config.validate().is_err());

    // A regular file is never replaced; a stale socket is; a live one is not.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "data").unwrap();
    let err = edge_est::transport::proxy::bind(&file).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let path = dir.path().join("s.sock");
        let live = edge_est::transport::proxy::bind(&path).unwrap();
        let err = edge_est::transport::proxy::bind(&path).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(live);
        // Stale now (nobody accepts): replaced.
        let again = edge_est::transport::proxy::bind(&path);
        assert!(again.is_ok(), "{:?}", again.err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666);
    });
}
