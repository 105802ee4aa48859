//! Client certificate chains built to make refusing them expensive: many intermediates named
//! like the label's trust anchors, each a signature check for path building. A chain over the
//! caps is refused at the TLS handshake; a hostile chain within them is verified once per
//! connection and label (its failure is remembered, until the configuration changes); chains
//! longer than two certificates are verified off the connection thread. Each with its
//! positive control: a legitimate chain of the same length is accepted.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::client::{certs_from_answer, iot_edge_body, EstClient};
use common::{csr, standard_config, Pki, TestServer};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The names of the standard configuration's anchors (`tests/common/pki.rs`).
const ANCHOR_NAMES: [&str; 2] = ["factory bootstrap CA", "edge-est test issuing CA"];

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn leaf_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

/// (chain PEM leaf first, key PEM) of a hostile chain of `certs` certificates: a leaf issued
/// by a forged CA named like an anchor, then forged CAs named like the anchors.
fn hostile_chain(certs: usize) -> (String, String) {
    let first_key = KeyPair::generate().unwrap();
    let first_params = ca_params(ANCHOR_NAMES[0]);
    let first = first_params.self_signed(&first_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params("hostile")
        .signed_by(&leaf_key, &Issuer::new(first_params, first_key))
        .unwrap();
    let mut pem = format!("{}{}", leaf.pem(), first.pem());
    for i in 2..certs {
        let key = KeyPair::generate().unwrap();
        pem.push_str(
            &ca_params(ANCHOR_NAMES[i % 2])
                .self_signed(&key)
                .unwrap()
                .pem(),
        );
    }
    (pem, leaf_key.serialize_pem())
}

/// (chain PEM, key PEM) of a legitimate chain of `certs` certificates: a leaf below
/// `certs - 1` intermediates below the bootstrap CA (which is not sent).
fn legitimate_chain(pki: &Pki, cn: &str, certs: usize) -> (String, String) {
    let mut pems = Vec::new();
    let mut issuer: Option<Issuer<'static, KeyPair>> = None;
    for i in 1..certs {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(&format!("bootstrap intermediate {i}"));
        let cert = match &issuer {
            None => params.signed_by(&key, &pki.bootstrap.issuer).unwrap(),
            Some(parent) => params.signed_by(&key, parent).unwrap(),
        };
        pems.push(cert.pem());
        issuer = Some(Issuer::new(params, key));
    }
    let key = KeyPair::generate().unwrap();
    let leaf = match &issuer {
        None => leaf_params(cn)
            .signed_by(&key, &pki.bootstrap.issuer)
            .unwrap(),
        Some(parent) => leaf_params(cn).signed_by(&key, parent).unwrap(),
    };
    pems.push(leaf.pem());
    pems.reverse();
    (pems.concat(), key.serialize_pem())
}

fn tls_client(
    root_pem: &str,
    identity: &(String, String),
    version: &'static rustls::SupportedProtocolVersion,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_slice_iter(identity.0.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(identity.1.as_bytes()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

const EMPTY_POST: &str = "POST /.well-known/est/simpleenroll HTTP/1.1\r\nhost: localhost\r\n\
content-type: application/pkcs10\r\ncontent-length: 0\r\n\r\n";
const EMPTY_POST_STRICT: &str = "POST /.well-known/est/strict/simpleenroll HTTP/1.1\r\n\
host: localhost\r\ncontent-type: application/pkcs10\r\ncontent-length: 0\r\n\r\n";

/// Sends `requests` pipelined on one connection; the answers' status lines and bodies as
/// text (`None`: the handshake or the connection was refused before any answer).
async fn pipeline(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    requests: &[&str],
) -> Option<String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    tls.write_all(requests.concat().as_bytes()).await.ok()?;
    let mut got = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let read = async {
        loop {
            match tls.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if text.matches("HTTP/1.1 ").count() == requests.len() && text.ends_with('\n') {
                        break;
                    }
                }
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), read)
        .await
        .expect("answers within a minute");
    let text = String::from_utf8_lossy(&got).into_owned();
    (!text.is_empty()).then_some(text)
}

/// The standard server, its bootstrap set of depth `any`: legitimate chains below the
/// factory CA through further CAs authenticate, the longest ones the caps allow included.
async fn start_deep() -> (tempfile::TempDir, Pki, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.trust.get_mut("bootstrap").unwrap().depth = edge_est::auth::chain::Depth::Any;
    let server = TestServer::start(dir.path(), &config).await;
    (dir, pki, server)
}

#[tokio::test]
async fn a_chain_over_the_caps_is_refused_at_the_handshake() {
    let (_dir, pki, server) = start_deep().await;
    let root = pki.root.cert_pem.clone();
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // Nine certificates: over the cap of eight. Hostile, and legitimate alike.
        for chain in [hostile_chain(9), legitimate_chain(&pki, "long-chain", 9)] {
            let answer = pipeline(
                server.addr,
                &tls_client(&root, &chain, version),
                &[EMPTY_POST],
            )
            .await;
            assert_eq!(answer, None, "{version:?}: answered {answer:?}");
        }
        // Over the byte cap: a leaf and one CA with 40 KiB of subject.
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params("huge CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "x".repeat(40 * 1024));
        let huge = params.self_signed(&key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf_params("bytes")
            .signed_by(&leaf_key, &Issuer::new(params, key))
            .unwrap();
        let chain = (
            format!("{}{}", leaf.pem(), huge.pem()),
            leaf_key.serialize_pem(),
        );
        let answer = pipeline(
            server.addr,
            &tls_client(&root, &chain, version),
            &[EMPTY_POST],
        )
        .await;
        assert_eq!(answer, None, "{version:?}: answered {answer:?}");
    }
    assert_eq!(server.app.client_chain_verifications(), (0, 0));

    // Positive control: the longest legitimate chain (a leaf below six intermediates, the
    // most path building takes) and its root, eight certificates, enrolls (verified on the
    // blocking pool).
    let mut chain = legitimate_chain(&pki, "eight", 7);
    chain.0.push_str(&pki.bootstrap.cert_pem);
    let client = EstClient::new(server.addr, &root, Some((&chain.0, &chain.1)));
    let answer = client
        .request(
            "POST",
            "simpleenroll",
            &[("content-type", "application/pkcs10".into())],
            iot_edge_body(&csr("eight")),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(certs_from_answer(&answer.body).len(), 1);
    assert_eq!(server.app.client_chain_verifications(), (0, 1));
    server.stop().await;
}

#[tokio::test]
async fn a_failed_chain_is_verified_once_per_connection_and_label() {
    let (_dir, pki, server) = start_deep().await;
    let root = pki.root.cert_pem.clone();
    let hostile = tls_client(&root, &hostile_chain(8), &rustls::version::TLS13);

    // 60 pipelined requests, alternating between two labels: two verifications, all 401.
    let requests: Vec<&str> = (0..60)
        .map(|i| {
            if i % 2 == 0 {
                EMPTY_POST
            } else {
                EMPTY_POST_STRICT
            }
        })
        .collect();
    let text = pipeline(server.addr, &hostile, &requests).await.unwrap();
    // Each failure takes a token of the failed-authentication limits (a burst of 30 by
    // default): until then every answer says why the chain was refused, from two
    // verifications; then one 429 ends the connection.
    let rejected = text
        .matches("\r\n\r\nclient certificate rejected: ")
        .count();
    assert_eq!(rejected, 30, "{text}");
    assert_eq!(text.matches("HTTP/1.1 401").count(), 30, "{text}");
    assert_eq!(text.matches("HTTP/1.1 429").count(), 1, "{text}");
    assert!(text.contains("too many failed authentications"), "{text}");
    assert_eq!(server.app.client_chain_verifications(), (0, 2));

    // Another connection from the same address: refused before any verification.
    let text = pipeline(server.addr, &hostile, &[EMPTY_POST; 10])
        .await
        .unwrap();
    assert_eq!(text.matches("HTTP/1.1 429").count(), 1, "{text}");
    assert_eq!(server.app.client_chain_verifications(), (0, 2));

    // Positive control: a legitimate two-certificate chain, kept alive, is verified once on
    // the connection thread and enrolls every time. It shares the attacker's address here
    // (loopback): it waits for one token of the address's failure bucket, as a client at
    // another address would not.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let chain = legitimate_chain(&pki, "kept", 2);
    let client = EstClient::new(server.addr, &root, Some((&chain.0, &chain.1)));
    let mut kept = client.connect().await;
    for i in 0..3 {
        let answer = EstClient::send(
            &mut kept,
            server.addr,
            "POST",
            "simpleenroll",
            &[("content-type", "application/pkcs10".into())],
            iot_edge_body(&csr("kept")),
        )
        .await;
        assert_eq!(answer.status, 200, "{i}: {}", answer.text());
    }
    assert_eq!(server.app.client_chain_verifications(), (1, 2));
    server.stop().await;
}

async fn enroll(
    kept: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    addr: SocketAddr,
    cn: &str,
) -> common::client::Answer {
    EstClient::send(
        kept,
        addr,
        "POST",
        "simpleenroll",
        &[("content-type", "application/pkcs10".into())],
        iot_edge_body(&csr(cn)),
    )
    .await
}

#[tokio::test]
async fn a_remembered_failure_ends_with_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let config = standard_config(&pki);
    let server = TestServer::start(dir.path(), &config).await;
    // A legitimate chain from a CA the label does not trust yet.
    let (foreign_ca, _) =
        pki.foreign
            .sub_ca("foreign intermediate", None, &rcgen::PKCS_ECDSA_P256_SHA256);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params("newcomer")
        .signed_by(&leaf_key, &foreign_ca.issuer)
        .unwrap();
    let chain = (
        format!("{}{}", leaf.pem(), foreign_ca.cert_pem),
        leaf_key.serialize_pem(),
    );
    let client = EstClient::new(server.addr, &pki.root.cert_pem, Some((&chain.0, &chain.1)));
    let mut kept = client.connect().await;
    for _ in 0..2 {
        let answer = enroll(&mut kept, server.addr, "newcomer").await;
        assert_eq!(answer.status, 401, "{}", answer.text());
    }
    assert_eq!(server.app.client_chain_verifications(), (1, 0));

    // The operator trusts the foreign root: the same connection is verified again and enrolls.
    let mut config = config.clone();
    config.trust.insert(
        "partner".into(),
        edge_est::config::TrustConfig {
            certificates: vec![edge_est::config::PemSource("foreign-ca.pem".into())],
            depth: edge_est::auth::chain::Depth::Any,
        },
    );
    let default = common::label(&mut config, None);
    default.client_trust.push("partner".into());
    default.rules.push(edge_est::config::RuleConfig {
        matches: vec!["certificate:partner".into()],
        common_names: vec!["{cn}".into()],
        ..Default::default()
    });
    server
        .app
        .swap(edge_est::runtime::Runtime::build(&config, dir.path()).unwrap());
    let answer = enroll(&mut kept, server.addr, "newcomer").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(server.app.client_chain_verifications(), (2, 0));
    server.stop().await;
}
