//! Chaos under load: a 2-layer hierarchy (the top signs, the bottom forwards as a registration
//! authority) takes concurrent enrollments from 8 clients while the top layer is stopped and
//! restarted on the same address and the bottom's configuration is changed under it.
//!
//! What must hold: every answer is either a chain that verifies to the root, or a clear 4xx or
//! 5xx with a text reason; nothing panics; the bottom journal holds exactly the certificates
//! that were answered, and each of them is in the top journal. Memory is measured where it
//! means something, in the server's own process: the shipped binary under the same load of
//! fresh-connection enrollments, its VmRSS read from /proc/PID/status after each round.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edge_est::demo::{self, Layer, CHILD_PASSWORD, CHILD_USER};
use edge_est::journal::Journal;
use edge_est::runtime::Runtime;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

const CLIENTS: usize = 8;
const PER_CLIENT: usize = 15;

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn csr(cn: &str) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.serialize_request(&key).unwrap().der().to_vec()
}

/// One enrollment at the bottom, on a fresh TLS connection: (status, content type, body).
/// Transport failures are answers too (status 0): they must not happen, and are reported.
async fn enroll(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    cn: &str,
) -> (u16, String, Vec<u8>) {
    enroll_as(addr, tls, cn, CHILD_USER, CHILD_PASSWORD).await
}

/// [`enroll`] as Basic `user`.
async fn enroll_as(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    cn: &str,
    user: &str,
    password: &str,
) -> (u16, String, Vec<u8>) {
    use base64::Engine;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let b64 = base64::engine::general_purpose::STANDARD.encode(csr(cn));
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let request = http::Request::post("/.well-known/est/simpleenroll")
            .header("host", format!("localhost:{}", addr.port()))
            .header("content-type", "application/pkcs10")
            .header("authorization", format!("Basic {credentials}"))
            .body(Full::new(Bytes::from(b64)))
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes()
            .to_vec();
        Ok::<_, String>((status, content_type, body))
    };
    match tokio::time::timeout(Duration::from_secs(30), attempt).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => (0, String::new(), e.into_bytes()),
        Err(_) => (0, String::new(), b"no answer within 30 s".to_vec()),
    }
}

/// Verifies an answered leaf through the top's issuing CA to the root; returns its serial.
fn verify(
    leaf: &[u8],
    intermediates: &[CertificateDer<'static>],
    root: &CertificateDer<'_>,
    cn: &str,
) -> String {
    let anchor = webpki::anchor_from_trusted_cert(root).unwrap();
    let leaf_der = CertificateDer::from(leaf.to_vec());
    let ee = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
    let now = UnixTime::since_unix_epoch(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap(),
    );
    let algorithms = rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all;
    ee.verify_for_usage(
        algorithms,
        &[anchor],
        intermediates,
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .unwrap_or_else(|e| panic!("the chain of {cn} does not verify: {e:?}"));
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
    assert_eq!(cert.subject().to_string(), format!("CN={cn}"));
    edge_est::auth::client_cert::hex(cert.raw_serial())
}

fn decode_answer(body: &[u8]) -> Vec<Vec<u8>> {
    let der = edge_est::est::body::decode_base64_body(body).expect("base64 answer");
    edge_est::est::pkcs7::decode_certs_only(&der).expect("certs-only PKCS#7")
}

#[derive(Default)]
struct Tally {
    issued: Vec<String>,
    refused: Vec<(u16, String)>,
}

fn journal_serials(path: &Path) -> Vec<String> {
    Journal::read_all(path)
        .unwrap()
        .into_iter()
        .map(|e| e.serial)
        .collect()
}

/// One round: 8 clients enroll at the bottom; at a third of the load the top goes away, the
/// bottom's configuration is replaced by `config` while it is away, and the top comes back on
/// the same address. Returns the new top and a summary.
#[allow(clippy::too_many_arguments)]
async fn chaos_round(
    round: usize,
    bottom: &Layer,
    top: Layer,
    dir: &Path,
    config: &edge_est::config::Config,
    tls: Arc<rustls::ClientConfig>,
    tally: Arc<Mutex<Tally>>,
    intermediates: &[CertificateDer<'static>],
    root: &CertificateDer<'static>,
) -> (Layer, String) {
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (tls, tally, done, intermediates, root) = (
            tls.clone(),
            tally.clone(),
            done.clone(),
            intermediates.to_vec(),
            root.clone(),
        );
        let bottom_addr = bottom.addr;
        clients.push(tokio::spawn(async move {
            for i in 0..PER_CLIENT {
                // Half the names are allowed by one configuration and not by the other.
                let cn = if i % 2 == 0 {
                    format!("chaos-{round}-{c}-{i}")
                } else {
                    format!("other-{round}-{c}-{i}")
                };
                let (status, content_type, body) = enroll(bottom_addr, tls.clone(), &cn).await;
                let text = String::from_utf8_lossy(&body).into_owned();
                match status {
                    200 => {
                        let certs = decode_answer(&body);
                        let serial = verify(&certs[0], &intermediates, &root, &cn);
                        tally.lock().unwrap().issued.push(serial);
                    }
                    400..=599 => {
                        assert!(
                            content_type.starts_with("text/plain") && !text.trim().is_empty(),
                            "{cn}: {status} without a text reason: {content_type:?} {text:?}"
                        );
                        assert_ne!(status, 500, "{cn}: an internal failure: {text}");
                        tally.lock().unwrap().refused.push((status, text));
                    }
                    other => panic!("{cn}: unexpected answer {other}: {text}"),
                }
                done.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    let total = CLIENTS * PER_CLIENT;
    while done.load(Ordering::SeqCst) < total / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let top_addr = top.addr;
    top.stop().await;
    let stopped_at = done.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    bottom.app.swap(Runtime::build(config, dir).unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let top = Layer::start("top", dir, &demo::top_config(), top_addr)
        .await
        .unwrap();
    let restarted_at = done.load(Ordering::SeqCst);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(120), client)
            .await
            .expect("the load finished in bounded time")
            .expect("a client task failed");
    }
    let summary = format!(
        "{total} requests in {:?}, top stopped after {stopped_at} answers, back after {restarted_at}",
        started.elapsed()
    );
    (top, summary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrollments_under_upstream_restart_and_reconfiguration() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let dir = tempfile::tempdir().unwrap();
    demo::write_pki(dir.path()).unwrap();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let top = Layer::start("top", dir.path(), &demo::top_config(), any)
        .await
        .unwrap();
    let top_addr = top.addr;
    let mut bottom_config = demo::forward_config("bottom", top_addr.port(), "layer2-ra", None);
    bottom_config
        .upstreams
        .get_mut("parent")
        .unwrap()
        .request_timeout_secs = 3;
    let bottom = Layer::start("bottom", dir.path(), &bottom_config, any)
        .await
        .unwrap();

    let root_pem = std::fs::read_to_string(dir.path().join("root.pem")).unwrap();
    let root = CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap();
    let top_ca_pem = std::fs::read_to_string(dir.path().join("top-ca.pem")).unwrap();
    let intermediates: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(top_ca_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    // Warm up (argon2 once, the bottom's pool to the top).
    let (status, _, body) = enroll(bottom.addr, tls.clone(), "chaos-warmup").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let warmup_serial = verify(
        &decode_answer(&body)[0],
        &intermediates,
        &root,
        "chaos-warmup",
    );

    // Two rounds of the same chaos: the first brings the process to its working size (thread
    // arenas of the argon2 checks after each reconfiguration, connection buffers, pools); the
    // second must not grow it further.
    let tally = Arc::new(Mutex::new(Tally::default()));
    tally.lock().unwrap().issued.push(warmup_serial);
    let mut changed = bottom_config.clone();
    for rule in &mut changed.labels[0].rules {
        if rule.matches == ["user:estuser"] {
            rule.common_names = vec!["chaos-*".into()];
        }
    }
    let mut top = top;
    for (round, config) in [(1, &changed), (2, &bottom_config)] {
        let before = tally.lock().unwrap().refused.len();
        let (next_top, summary) = chaos_round(
            round,
            &bottom,
            top,
            dir.path(),
            config,
            tls.clone(),
            tally.clone(),
            &intermediates,
            &root,
        )
        .await;
        top = next_top;
        eprintln!("round {round}: {summary}");
        let tally = tally.lock().unwrap();
        let statuses: HashSet<u16> = tally.refused[before..].iter().map(|(s, _)| *s).collect();
        assert!(
            statuses.contains(&503),
            "round {round}: the top's absence was felt"
        );
        assert!(
            statuses.contains(&403),
            "round {round}: the configuration change was felt"
        );
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let total = 2 * CLIENTS * PER_CLIENT + 1;
    assert_eq!(tally.issued.len() + tally.refused.len(), total);
    // Each kind of failure is one a child can act on, and says so.
    for (status, text) in &tally.refused {
        match status {
            503 => assert!(
                text.contains("cannot be reached") || text.contains("did not answer"),
                "{text}"
            ),
            403 => assert!(text.contains("is not allowed"), "{text}"),
            502 => assert!(text.contains("upstream"), "{text}"),
            other => panic!("unexpected refusal {other}: {text}"),
        }
    }
    assert!(
        tally.issued.len() > total / 3,
        "most of the load was served"
    );

    // The journals: the bottom holds exactly what was answered; each is in the top's.
    let mut answered: Vec<String> = tally.issued.clone();
    answered.sort();
    let mut bottom_serials = journal_serials(bottom.app.journal().path());
    bottom_serials.sort();
    assert_eq!(
        bottom_serials, answered,
        "bottom journal = answered certificates"
    );
    let top_serials: HashSet<String> = journal_serials(top.app.journal().path())
        .into_iter()
        .collect();
    for serial in &answered {
        assert!(
            top_serials.contains(serial),
            "{serial} is not in the top journal"
        );
    }

    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
    bottom.stop().await;
    top.stop().await;
}

/// The shipped binary's resident memory (its own /proc/PID/status, not this test process's)
/// after a warm-up and after each of two equal rounds of concurrent fresh-connection
/// enrollments: the second round must not grow it further than a little.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_servers_own_memory_is_flat_from_round_to_round() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::generate_p256(dir.path());
    std::fs::write(
        dir.path().join("edge-est.toml"),
        common::standard_config_toml(&pki)
            + "\n[limits]\nrate_per_address = 0.0\nrate_per_identity = 0.0\n",
    )
    .unwrap();
    let server = common::bin::Running::serve(dir.path(), "edge-est.toml");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.root.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let addr = server.addr();
    let round = |n: usize| {
        let tls = tls.clone();
        async move {
            let tasks: Vec<_> = (0..CLIENTS)
                .map(|c| {
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        for i in 0..n {
                            let (status, _, body) = enroll_as(
                                addr,
                                tls.clone(),
                                &format!("mem-{c}-{i}"),
                                common::USER,
                                common::PASSWORD,
                            )
                            .await;
                            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    round(10).await;
    let warm = server.rss_kib();
    round(60).await;
    let first = server.rss_kib();
    round(60).await;
    let second = server.rss_kib();
    eprintln!(
        "edge-est VmRSS: {warm} KiB after warm-up, {first} KiB after round 1, {second} KiB after round 2 ({} enrollments each)",
        CLIENTS * 60
    );
    assert!(
        second < first + 8 * 1024,
        "the server grew from {first} KiB to {second} KiB in a round no heavier than the last"
    );
    assert!(second < 256 * 1024, "{second} KiB");
    let journal = edge_est::journal::Journal::read_all(&dir.path().join("journal.jsonl")).unwrap();
    assert_eq!(journal.len(), CLIENTS * (10 + 60 + 60));
}
