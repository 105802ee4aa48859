//! Hostile clients against one server while a well-behaved client keeps enrolling: slowloris
//! clients (a TLS handshake, the headers and a body trickled a byte at a time), a flood of
//! connections beyond the per-address cap, a flood that fills the whole connection cap, and
//! oversized bodies (declared, and streamed without a length). Every hostile client must be
//! cut off within its timeout; the well-behaved client must keep getting its certificates.
//!
//! Floods come from other loopback addresses (127.0.0.2, 127.0.0.3, ...) than the
//! well-behaved client (127.0.0.1), as they would from other hosts.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::{basic, certs_from_answer, iot_edge_body, EstClient};
use common::{csr, standard_config, Pki, TestServer, PASSWORD, USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection from a chosen loopback address.
async fn connect_from(source: &str, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0))?;
    socket.connect(server).await
}

async fn tls(
    tcp: TcpStream,
    root_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Reads until the peer closes (or fails); what was read, and when it ended.
async fn read_to_close<R: AsyncReadExt + Unpin>(
    reader: &mut R,
    limit: Duration,
) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buffer = [0u8; 4096];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await
    .is_ok();
    (got, closed)
}

/// The well-behaved client: enrolls in a loop until told to stop; every answer must be a
/// certificate. Returns the latencies.
fn well_behaved(
    server: SocketAddr,
    root: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Duration>> {
    tokio::spawn(async move {
        let client = EstClient::new(server, &root, None);
        let mut latencies = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let answer = client
                .request(
                    "POST",
                    "simpleenroll",
                    &[
                        ("content-type", "application/pkcs10".to_owned()),
                        basic(USER, PASSWORD),
                    ],
                    iot_edge_body(&csr(&format!("good-{i}"))),
                )
                .await;
            assert_eq!(
                answer.status,
                200,
                "well-behaved request {i}: {}",
                answer.text()
            );
            assert_eq!(certs_from_answer(&answer.body).len(), 1);
            latencies.push(started.elapsed());
            i += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        latencies
    })
}

fn summary(latencies: &mut [Duration]) -> (usize, Duration, Duration) {
    latencies.sort();
    (
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_are_cut_off_while_a_good_client_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.limits.handshake_timeout_secs = 2;
    config.limits.header_timeout_secs = 2;
    config.limits.body_timeout_secs = 2;
    config.limits.max_connections = 64;
    config.limits.max_connections_per_address = 24;
    let server = TestServer::start(dir.path(), &config).await;
    let addr = server.addr;
    let root = pki.root.cert_pem.clone();

    // Warm up (argon2 once, then cached) and measure the normal latency.
    let stop = Arc::new(AtomicBool::new(false));
    let baseline = well_behaved(addr, root.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut baseline = baseline.await.unwrap();
    let (n, median_before, max_before) = summary(&mut baseline);
    eprintln!("alone: {n} enrollments, median {median_before:?}, max {max_before:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let good = well_behaved(addr, root.clone(), stop.clone());

    // 1. A TLS handshake trickled a byte a second (a ClientHello that never completes).
    let handshake = tokio::spawn(async move {
        let mut tcp = connect_from("127.0.0.1", addr).await.unwrap();
        let started = Instant::now();
        let hello = [
            0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        for byte in hello {
            if tcp.write_all(&[byte]).await.is_err() {
                break;
            }
            let mut one = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut one)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                _ => {}
            }
        }
        let (_, closed) = read_to_close(&mut tcp, Duration::from_secs(10)).await;
        assert!(closed, "the trickled handshake was not cut off");
        started.elapsed()
    });

    // 2. Headers trickled a byte a second: cut off by the header timeout.
    let root2 = root.clone();
    let headers = tokio::spawn(async move {
        let stream = tls(connect_from("127.0.0.1", addr).await.unwrap(), &root2)
            .await
            .unwrap();
        let (mut reader, mut writer) = tokio::io::split(stream);
        let started = Instant::now();
        let request = b"GET /.well-known/est/cacerts HTTP/1.1\r\nhost: localhost\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let writing = tokio::spawn(async move {
            let mut sent = 0;
            for byte in request {
                if writer.write_all(&[*byte]).await.is_err() || writer.flush().await.is_err() {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            sent
        });
        let (answer, closed) = read_to_close(&mut reader, Duration::from_secs(15)).await;
        let elapsed = started.elapsed();
        writing.abort();
        assert!(closed, "the header trickler was not cut off");
        // hyper closes without an answer, or with 408: never a 200 for the trickled request.
        let text = String::from_utf8_lossy(&answer);
        assert!(!text.contains(" 200 "), "{text}");
        elapsed
    });

    // 3. Headers at once, then a body trickled a byte a second: 408 after the body timeout.
    let root3 = root.clone();
    let body = tokio::spawn(async move {
        let stream = tls(connect_from("127.0.0.1", addr).await.unwrap(), &root3)
            .await
            .unwrap();
        let (mut reader, mut writer) = tokio::io::split(stream);
        let (_, authorization) = basic(USER, PASSWORD);
        let head = format!(
            "POST /.well-known/est/simpleenroll HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/pkcs10\r\nauthorization: {authorization}\r\ncontent-length: 600\r\n\r\n"
        );
        writer.write_all(head.as_bytes()).await.unwrap();
        writer.flush().await.unwrap();
        let started = Instant::now();
        let writing = tokio::spawn(async move {
            for _ in 0..600 {
                if writer.write_all(b"M").await.is_err() || writer.flush().await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let (answer, closed) = read_to_close(&mut reader, Duration::from_secs(15)).await;
        let elapsed = started.elapsed();
        writing.abort();
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert!(closed, "the body trickler was not cut off");
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("did not arrive in time"), "{text}");
        elapsed
    });

    // 4. A declared 10 MiB body: 413 at once, before any of it is sent.
    let root4 = root.clone();
    let declared = tokio::spawn(async move {
        let stream = tls(connect_from("127.0.0.1", addr).await.unwrap(), &root4)
            .await
            .unwrap();
        let (mut reader, mut writer) = tokio::io::split(stream);
        let (_, authorization) = basic(USER, PASSWORD);
        let head = format!(
            "POST /.well-known/est/simpleenroll HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/pkcs10\r\nauthorization: {authorization}\r\ncontent-length: {}\r\n\r\n",
            10 * 1024 * 1024
        );
        writer.write_all(head.as_bytes()).await.unwrap();
        writer.flush().await.unwrap();
        let mut buffer = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), reader.read(&mut buffer))
            .await
            .expect("413 without waiting for the body")
            .unwrap();
        let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    });

    // 5. An endless chunked body (no length): read up to the drain cap at most, then 413.
    let root5 = root.clone();
    let streamed = tokio::spawn(async move {
        let stream = tls(connect_from("127.0.0.1", addr).await.unwrap(), &root5)
            .await
            .unwrap();
        let (mut reader, mut writer) = tokio::io::split(stream);
        let (_, authorization) = basic(USER, PASSWORD);
        let head = format!(
            "POST /.well-known/est/simpleenroll HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/pkcs10\r\nauthorization: {authorization}\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        writer.write_all(head.as_bytes()).await.unwrap();
        let reading =
            tokio::spawn(async move { read_to_close(&mut reader, Duration::from_secs(30)).await });
        let chunk = format!("{:x}\r\n{}\r\n", 16 * 1024, "A".repeat(16 * 1024));
        let mut sent = 0usize;
        while sent < 64 * 1024 * 1024 {
            let ok = tokio::time::timeout(Duration::from_secs(5), async {
                writer.write_all(chunk.as_bytes()).await?;
                writer.flush().await
            })
            .await;
            if !matches!(ok, Ok(Ok(()))) {
                break;
            }
            sent += 16 * 1024;
        }
        let (answer, _) = reading.await.unwrap();
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        // `sent` counts what the kernel took, socket buffers included (megabytes on
        // loopback); the server itself reads 64 KiB + its 1 MiB drain cap at most.
        assert!(
            sent < 16 * 1024 * 1024,
            "the server kept reading an oversized body: {sent} bytes accepted"
        );
        sent
    });

    // 6. A flood from one address: 200 connections, the per-address cap (24) admits some,
    //    the rest are closed at accept. They sit idle, holding their slots until the
    //    handshake timeout.
    let flood = tokio::spawn(async move {
        let mut checks = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let Ok(mut tcp) = connect_from("127.0.0.2", addr).await else {
                continue;
            };
            // Closed within 500 ms (long before the 2 s handshake timeout): closed at accept.
            checks.spawn(async move {
                let mut one = [0u8; 1];
                let closed = matches!(
                    tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut one)).await,
                    Ok(Ok(0) | Err(_))
                );
                (closed, tcp)
            });
        }
        let mut closed_at_once = 0;
        let mut held = Vec::new();
        while let Some(result) = checks.join_next().await {
            let (closed, tcp) = result.unwrap();
            closed_at_once += usize::from(closed);
            held.push(tcp);
        }
        closed_at_once
    });

    let handshake = handshake.await.unwrap();
    let headers = headers.await.unwrap();
    let body = body.await.unwrap();
    declared.await.unwrap();
    let streamed = streamed.await.unwrap();
    let closed_at_once = flood.await.unwrap();
    eprintln!(
        "cut off: trickled handshake after {handshake:?}, trickled headers after {headers:?}, \
         trickled body after {body:?}; endless body: {streamed} bytes accepted; flood: \
         {closed_at_once} of 200 closed at accept"
    );
    // Timeouts are 2 s; allow generous slack for a loaded machine, but far below "never".
    for (what, took) in [
        ("handshake", handshake),
        ("headers", headers),
        ("body", body),
    ] {
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
            "{what} trickler cut off after {took:?}"
        );
    }
    assert_eq!(closed_at_once, 200 - 24, "the per-address cap admits 24");
    let text = server.app.render_metrics();
    assert!(
        text.lines()
            .any(|l| l.starts_with("edgeest_connections_refused_total")
                && l.contains("reason=\"per_address\"")
                && l.ends_with(" 176")),
        "{text}"
    );
    // The good client kept enrolling through all of the above.
    stop.store(true, Ordering::Relaxed);
    let mut good_latencies = good.await.unwrap();

    // 7. A flood from many addresses that fills the whole cap (64): further connections,
    //    from anywhere, are closed at accept; once the flood's idle connections time out
    //    (handshake timeout, 2 s) the well-behaved client gets in again (it retries below).
    let mut filling = Vec::new();
    for source in ["127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        for _ in 0..24 {
            if let Ok(tcp) = connect_from(source, addr).await {
                filling.push(tcp);
            }
        }
    }
    let metrics = server.app.metrics().clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics.active_connections() < 64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metrics.active_connections(), 64);
    // While the cap is full, new connections from anywhere are closed at accept.
    let mut refused = 0;
    for _ in 0..10 {
        let mut tcp = connect_from("127.0.0.6", addr).await.unwrap();
        let mut one = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut one)).await
        {
            refused += 1;
        }
    }
    assert!(
        refused >= 8,
        "connections beyond the cap are refused: {refused} of 10"
    );
    let text = server.app.render_metrics();
    assert!(
        text.lines()
            .any(|l| l.starts_with("edgeest_connections_refused_total")
                && l.contains("reason=\"capacity\"")
                && !l.ends_with(" 0")),
        "{text}"
    );
    // The flood's idle connections time out; the good client is served again.
    let started = Instant::now();
    loop {
        // A TLS handshake that completes: the server admits connections again.
        let probe = match connect_from("127.0.0.1", addr).await {
            Ok(tcp) => tls(tcp, &root).await.is_ok(),
            Err(_) => false,
        };
        if probe {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server did not recover after the flood"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let answer = EstClient::new(addr, &root, None)
        .request(
            "POST",
            "simpleenroll",
            &[
                ("content-type", "application/pkcs10".to_owned()),
                basic(USER, PASSWORD),
            ],
            iot_edge_body(&csr("after-the-flood")),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    eprintln!(
        "served again {:?} after the cap was full",
        started.elapsed()
    );
    drop(filling);

    let (n, median, max) = summary(&mut good_latencies);
    eprintln!("under attack: {n} enrollments, median {median:?}, max {max:?}");
    assert!(n >= 5, "the good client kept enrolling: {n}");
    assert!(
        max < Duration::from_secs(3),
        "the good client's slowest enrollment took {max:?} (alone: median {median_before:?})"
    );
    // Nothing hostile was journaled: only the good client's certificates.
    let journal = server.journal();
    assert!(journal
        .iter()
        .all(|e| e.subject.starts_with("CN=good-") || e.subject == "CN=after-the-flood"));
    assert_eq!(journal.len(), baseline.len() + n + 1);
    server.stop().await;
}

/// TLS renegotiation is impossible: rustls refuses a TLS 1.2 client's renegotiation request
/// (TLS 1.3 has none). The first handshake is the positive control; OpenSSL's `R` command
/// then asks to renegotiate, and the server answers with the no_renegotiation alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_renegotiation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let server = TestServer::start(dir.path(), &standard_config(&pki)).await;
    let script = format!(
        "(sleep 1; echo R; sleep 1) | openssl s_client -connect 127.0.0.1:{} -servername localhost -CAfile root.pem -tls1_2 2>&1",
        server.addr.port()
    );
    let out = common::sh(&script, &server.dir);
    let text = format!("{}{}", common::stdout(&out), common::stderr(&out));
    assert!(
        text.contains("New, TLSv1.2, Cipher is"),
        "first handshake: {text}"
    );
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("RENEGOTIATING"), "{text}");
    assert!(
        text.contains("no renegotiation"),
        "the server refuses with the no_renegotiation alert: {text}"
    );
    server.stop().await;
}
