//! The journal across a restart: certificates issued by two successive servers on the same
//! directory and configuration, by Basic and by certificate, with refusals in between. The
//! journal file must then hold exactly what the clients received, nothing for the refusals.

mod common;

use std::path::Path;

use base64::Engine;
use common::client::{basic, certs_from_answer, iot_edge_body, to_pem, Answer, EstClient};
use common::{openssl_verify, run, standard_config, stdout, Pki, TestServer, PASSWORD, USER};
use edge_est::journal::Journal;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use x509_parser::prelude::*;

fn csr(cn: &str, key: &KeyPair, shape: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    shape(&mut params);
    params.serialize_request(key).unwrap().der().to_vec()
}

fn simple_csr(cn: &str) -> Vec<u8> {
    csr(cn, &KeyPair::generate().unwrap(), |_| {})
}

async fn post(
    client: &EstClient,
    path: &str,
    auth: &[(&'static str, String)],
    body: &[u8],
) -> Answer {
    let mut headers = vec![("content-type", "application/pkcs10".to_owned())];
    headers.extend(auth.iter().cloned());
    client
        .request("POST", path, &headers, iot_edge_body(body))
        .await
}

fn password() -> Vec<(&'static str, String)> {
    vec![basic(USER, PASSWORD)]
}

/// What the clients received, in the order they received it.
#[derive(Default)]
struct Received {
    certificates: Vec<Vec<u8>>,
}

impl Received {
    /// Takes a successful enrollment answer: one certificate for `cn` that verifies.
    fn enrolled(&mut self, dir: &Path, answer: &Answer, cn: &str) -> Vec<u8> {
        assert_eq!(answer.status, 200, "{cn}: {}", answer.text());
        let certs = certs_from_answer(&answer.body);
        assert_eq!(certs.len(), 1);
        self.keep(dir, certs[0].clone(), cn)
    }

    fn keep(&mut self, dir: &Path, der: Vec<u8>, cn: &str) -> Vec<u8> {
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            cn
        );
        let file = format!("received-{}.pem", self.certificates.len());
        std::fs::write(dir.join(&file), to_pem(&der)).unwrap();
        assert!(
            openssl_verify(dir, "root.pem", "issuing-ca.pem", &file),
            "{cn} must verify"
        );
        self.certificates.push(der.clone());
        der
    }
}

/// A refusal with its status and the phrase its text must contain.
fn refused(answer: &Answer, status: u16, phrase: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert!(
        answer.text().contains(phrase),
        "expected {phrase:?} in {:?}",
        answer.text()
    );
}

/// The certificate part of a serverkeygen answer.
fn serverkeygen_certificate(answer: &Answer) -> Vec<u8> {
    assert_eq!(answer.status, 200, "{}", answer.text());
    let content_type = answer.header("content-type").unwrap_or_default();
    let boundary = content_type
        .split_once("boundary=")
        .expect("a boundary")
        .1
        .trim_matches('"');
    let text = answer.text();
    let part = text
        .split(&format!("--{boundary}"))
        .find(|p| p.contains("application/pkcs7-mime"))
        .expect("a certificate part");
    let (_, content) = part.split_once("\r\n\r\n").expect("part headers end");
    let certs = certs_from_answer(content.as_bytes());
    assert_eq!(certs.len(), 1);
    certs[0].clone()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `openssl x509 -fingerprint -sha256` of a PEM file, as lowercase hex without colons.
fn openssl_fingerprint(dir: &Path, file: &str) -> String {
    let out = run(
        "openssl",
        &["x509", "-in", file, "-noout", "-fingerprint", "-sha256"],
        dir,
    );
    let text = stdout(&out);
    let (_, colons) = text
        .trim()
        .split_once('=')
        .unwrap_or_else(|| panic!("fingerprint: {text}"));
    colons.replace(':', "").to_ascii_lowercase()
}

/// The journal file holds exactly `received`, in that order: one complete line per
/// certificate, serial and SHA-256 matching, `certificate` decoding to the very DER.
fn journal_is_exactly(dir: &Path, received: &Received) -> Vec<edge_est::journal::JournalEntry> {
    let path = dir.join("journal.jsonl");
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(raw.ends_with('\n'), "no torn last line");
    assert_eq!(
        raw.lines().count(),
        received.certificates.len(),
        "one line per certificate:\n{raw}"
    );
    let entries = Journal::read_all(&path).unwrap();
    assert_eq!(
        entries.len(),
        received.certificates.len(),
        "every line parses"
    );
    for (i, (entry, der)) in entries.iter().zip(&received.certificates).enumerate() {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        assert_eq!(entry.serial, hex(cert.raw_serial()), "entry {i}: serial");
        let sha256 = hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref());
        assert_eq!(entry.sha256, sha256, "entry {i}: fingerprint");
        assert_eq!(
            openssl_fingerprint(dir, &format!("received-{i}.pem")),
            sha256,
            "entry {i}: openssl agrees"
        );
        let stored = base64::engine::general_purpose::STANDARD
            .decode(&entry.certificate)
            .unwrap();
        assert!(&stored == der, "entry {i}: the certificate the client got");
        assert_eq!(
            entry.subject,
            cert.subject().to_string().replace(", ", ","),
            "entry {i}: subject"
        );
    }
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_holds_exactly_the_issued_certificates_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let pki = Pki::generate_p256(dir);
    let config = standard_config(&pki);
    let root = &pki.root.cert_pem;
    let mut received = Received::default();

    // First server: Basic, bootstrap certificate, renewal by certificate, serverkeygen.
    let server = TestServer::start(dir, &config).await;
    let anonymous = EstClient::new(server.addr, root, None);
    let dev1_key = KeyPair::generate().unwrap();
    let answer = post(
        &anonymous,
        "simpleenroll",
        &password(),
        &csr("dev1", &dev1_key, |_| {}),
    )
    .await;
    let dev1 = received.enrolled(dir, &answer, "dev1");
    let answer = post(&anonymous, "simpleenroll", &password(), &simple_csr("dev2")).await;
    received.enrolled(dir, &answer, "dev2");

    let refusals_before = server.journal().len();
    let answer = post(
        &anonymous,
        "simpleenroll",
        &[basic("other", PASSWORD)],
        &simple_csr("dev2"),
    )
    .await;
    refused(&answer, 403, "denied");

    let bootstrap = pki.bootstrap.valid_client("dev3");
    let as_dev3 = EstClient::new(
        server.addr,
        root,
        Some((&bootstrap.cert_pem, &bootstrap.key_pem)),
    );
    let answer = post(&as_dev3, "simpleenroll", &[], &simple_csr("dev3")).await;
    received.enrolled(dir, &answer, "dev3");
    let answer = post(&as_dev3, "simpleenroll", &[], &simple_csr("dev4")).await;
    refused(&answer, 403, "CN=\"dev4\"");
    let mut broken = simple_csr("dev3");
    *broken.last_mut().unwrap() ^= 0x01;
    let answer = post(&as_dev3, "simpleenroll", &[], &broken).await;
    refused(&answer, 400, "signature");
    assert_eq!(
        server.journal().len(),
        refusals_before + 1,
        "refusals add nothing"
    );

    let as_dev1 = EstClient::new(
        server.addr,
        root,
        Some((&to_pem(&dev1), &dev1_key.serialize_pem())),
    );
    let answer = post(&as_dev1, "simplereenroll", &[], &simple_csr("dev1")).await;
    received.enrolled(dir, &answer, "dev1");
    let answer = post(&anonymous, "serverkeygen", &password(), &simple_csr("dev5")).await;
    let generated = serverkeygen_certificate(&answer);
    received.keep(dir, generated, "dev5");
    server.stop().await;

    let first_run = journal_is_exactly(dir, &received);
    assert_eq!(first_run.len(), 5);

    // Second server on the same directory and configuration: the certificate issued by the
    // first one still authenticates, and new entries go after the old ones.
    let server = TestServer::start(dir, &config).await;
    assert_eq!(
        server.journal(),
        first_run,
        "the journal survives the restart untouched"
    );
    let anonymous = EstClient::new(server.addr, root, None);
    let as_dev1 = EstClient::new(
        server.addr,
        root,
        Some((&to_pem(&dev1), &dev1_key.serialize_pem())),
    );
    let answer = post(&as_dev1, "simpleenroll", &[], &simple_csr("dev1")).await;
    received.enrolled(dir, &answer, "dev1");
    let edge_ca_csr = csr("aziot-edge CA dev1", &KeyPair::generate().unwrap(), |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    });
    let answer = post(&as_dev1, "simpleenroll", &[], &edge_ca_csr).await;
    received.enrolled(dir, &answer, "aziot-edge CA dev1");

    let answer = post(&as_dev1, "simplereenroll", &[], &simple_csr("dev9")).await;
    refused(&answer, 403, "simplereenroll must keep the subject");
    let answer = post(
        &anonymous,
        "simpleenroll",
        &[basic(USER, "wrong")],
        &simple_csr("dev6"),
    )
    .await;
    refused(&answer, 401, "wrong user name or password");
    let answer = post(
        &as_dev1,
        "simpleenroll",
        &[],
        &csr("aziot-edge CA dev2", &KeyPair::generate().unwrap(), |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        }),
    )
    .await;
    refused(&answer, 403, "aziot-edge CA dev2");

    let answer = post(&anonymous, "simpleenroll", &password(), &simple_csr("dev6")).await;
    received.enrolled(dir, &answer, "dev6");
    server.stop().await;

    let entries = journal_is_exactly(dir, &received);
    assert_eq!(entries.len(), 8);
    assert_eq!(
        &entries[..5],
        first_run.as_slice(),
        "the first run's entries are kept as they were"
    );
    for refused_name in ["dev4", "dev9", "aziot-edge CA dev2"] {
        assert!(
            !entries.iter().any(|e| e.subject.contains(refused_name)),
            "no entry for the refused {refused_name}"
        );
    }
    let operations: Vec<&str> = entries.iter().map(|e| e.operation.as_str()).collect();
    assert_eq!(
        operations,
        [
            "simpleenroll",
            "simpleenroll",
            "simpleenroll",
            "simplereenroll",
            "serverkeygen",
            "simpleenroll",
            "simpleenroll",
            "simpleenroll"
        ]
    );
    let identities: Vec<&str> = entries.iter().map(|e| e.identity.as_str()).collect();
    assert_eq!(identities[0], "user estuser");
    assert!(
        identities[2].contains("CN=dev3") && identities[2].contains("bootstrap"),
        "{}",
        identities[2]
    );
    assert!(
        identities[5].contains("CN=dev1") && identities[5].contains("issuer"),
        "{}",
        identities[5]
    );
    assert_eq!(entries[6].profile, "edge-ca");
    let mut serials: Vec<&str> = entries.iter().map(|e| e.serial.as_str()).collect();
    serials.sort_unstable();
    serials.dedup();
    assert_eq!(serials.len(), 8, "serials are unique across the restart");
}
