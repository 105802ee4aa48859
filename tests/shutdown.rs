//! Graceful shutdown of the real binary: `edge-est serve` (development setup in a temporary
//! directory) gets SIGTERM while an enrollment is in flight, its body still trickling in. The
//! server stops accepting at once, finishes that request (200 and its certificate), has the
//! certificate in the journal, flushes and closes the journal, and exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::certs_from_answer;
use rcgen::{CertificateParams, DnType, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEV_PASSWORD: &str = "shutdown-test-password";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_flushes_the_journal_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .args([
            "serve",
            "--data-dir",
            "data",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .current_dir(dir.path())
        .env("EDGE_EST_DEV_PASSWORD", DEV_PASSWORD)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start edge-est");
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let mut running = Running(child);
    // The enrollment instructions are printed once the listener is up.
    let mut reader = BufReader::new(stdout);
    let mut printed = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !printed.contains("openssl verify") {
        assert!(Instant::now() < deadline, "not serving: {printed}");
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "exited early: {printed}"
        );
        printed.push_str(&line);
    }
    std::thread::spawn(move || for _ in reader.lines() {});

    // An enrollment whose body arrives over about a second.
    let root = std::fs::read_to_string(dir.path().join("data/root.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(root.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut read_half, mut write_half) = tokio::io::split(stream);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "in-flight");
    let csr = params.serialize_request(&key).unwrap();
    let body = iot_edge(csr.der());
    use base64::Engine;
    let authorization =
        base64::engine::general_purpose::STANDARD.encode(format!("estuser:{DEV_PASSWORD}"));
    let head = format!(
        "POST /.well-known/est/simpleenroll HTTP/1.1\r\nhost: localhost:{port}\r\ncontent-type: application/pkcs10\r\nauthorization: Basic {authorization}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    write_half.write_all(head.as_bytes()).await.unwrap();
    let pieces: Vec<&[u8]> = body.chunks(body.len().div_ceil(10)).collect();
    write_half.write_all(pieces[0]).await.unwrap();
    write_half.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // SIGTERM while the body is still coming.
    let signalled = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    for piece in &pieces[1..] {
        tokio::time::sleep(Duration::from_millis(100)).await;
        write_half.write_all(piece).await.unwrap();
        write_half.flush().await.unwrap();
    }
    // It no longer accepts connections (checked while the request is still open).
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(refused.is_err(), "still accepting after SIGTERM");

    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), read_half.read_to_end(&mut answer))
        .await
        .expect("the in-flight request was answered")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let (_, payload) = text.split_once("\r\n\r\n").unwrap();
    let leaf = certs_from_answer(payload.as_bytes()).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(cert.subject().to_string(), "CN=in-flight");
    let serial = edge_est::auth::client_cert::hex(cert.raw_serial());

    // The process exits 0, within the drain bound.
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "edge-est did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    eprintln!("exited 0 {:?} after SIGTERM", signalled.elapsed());

    let journal =
        edge_est::journal::Journal::read_all(&dir.path().join("data/journal.jsonl")).unwrap();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].serial, serial);
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("journal flushed and closed"), "{log}");
    assert!(log.contains("edge-est stopped"), "{log}");
}

/// Base64 of the DER in 64-column lines, as IoT Edge sends a CSR.
fn iot_edge(der: &[u8]) -> Vec<u8> {
    common::client::iot_edge_body(der)
}
