//! Every way a request is refused, each next to its positive control: the same probe, allowed,
//! succeeds. Refusals must carry the exact status and a text/plain body that says what was
//! wrong, and must leave nothing in the journal.

mod common;

use std::path::Path;

use ::time::{Duration, OffsetDateTime};
use base64::Engine;
use common::client::{basic, certs_from_answer, iot_edge_body, to_pem, Answer, EstClient};
use common::{curl, openssl_verify, run, start_standard, stdout, TestServer, PASSWORD, USER};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
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

/// A CSR asking for a CA certificate, as IoT Edge asks for its Edge CA.
fn ca_csr(cn: &str) -> Vec<u8> {
    csr(cn, &KeyPair::generate().unwrap(), |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    })
}

fn password() -> Vec<(&'static str, String)> {
    vec![basic(USER, PASSWORD)]
}

/// POST of a PKCS#10 body to `path` with `auth` headers.
async fn post(
    client: &EstClient,
    path: &str,
    auth: &[(&'static str, String)],
    body: Vec<u8>,
) -> Answer {
    let mut headers = vec![("content-type", "application/pkcs10".to_owned())];
    headers.extend(auth.iter().cloned());
    client.request("POST", path, &headers, body).await
}

/// Checks a refusal: exact status, text/plain, and every phrase in the text.
fn refused(answer: &Answer, status: u16, says: &[&str]) {
    let text = answer.text();
    assert_eq!(answer.status, status, "{text}");
    let content_type = answer.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain"),
        "error bodies are text/plain, not {content_type}"
    );
    for phrase in says {
        assert!(text.contains(phrase), "expected {phrase:?} in {text:?}");
    }
}

/// Checks a successful enrollment: one certificate with CN `cn` that `openssl verify`
/// accepts against root.pem; returns its DER.
fn issued(answer: &Answer, dir: &Path, name: &str, cn: &str) -> Vec<u8> {
    assert_eq!(answer.status, 200, "{name}: {}", answer.text());
    assert_eq!(
        answer.header("content-type"),
        Some("application/pkcs7-mime; smime-type=certs-only")
    );
    let certs = certs_from_answer(&answer.body);
    assert_eq!(certs.len(), 1, "{name}");
    let (_, cert) = X509Certificate::from_der(&certs[0]).unwrap();
    assert_eq!(
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        cn,
        "{name}"
    );
    let file = format!("{name}.pem");
    std::fs::write(dir.join(&file), to_pem(&certs[0])).unwrap();
    assert!(
        openssl_verify(dir, "root.pem", "issuing-ca.pem", &file),
        "{name} must verify against the root"
    );
    certs[0].clone()
}

/// The journal holds exactly `expected` (in any order): serials, fingerprints and the
/// certificates themselves.
fn journal_holds_exactly(server: &TestServer, expected: &[&Vec<u8>]) {
    let journal = server.journal();
    let mut got: Vec<Vec<u8>> = journal
        .iter()
        .map(|e| {
            base64::engine::general_purpose::STANDARD
                .decode(&e.certificate)
                .expect("base64 certificate")
        })
        .collect();
    for (entry, der) in journal.iter().zip(&got) {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        assert_eq!(entry.serial, hex(cert.raw_serial()));
        assert_eq!(
            entry.sha256,
            hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref())
        );
    }
    let mut want: Vec<Vec<u8>> = expected.iter().map(|d| d.to_vec()).collect();
    got.sort();
    want.sort();
    assert_eq!(got.len(), want.len(), "journal entries: {journal:#?}");
    assert!(
        got == want,
        "the journal holds exactly the controls' certificates"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_credentials_missing_wrong_or_denied() {
    let (_dir, pki, server) = start_standard().await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);

    let answer = post(
        &client,
        "simpleenroll",
        &[],
        iot_edge_body(&simple_csr("dev1")),
    )
    .await;
    refused(
        &answer,
        401,
        &[
            "authentication required",
            "client certificate or HTTP Basic",
        ],
    );
    let challenge = answer.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Basic realm=\"edge-est\""),
        "{challenge:?}"
    );

    let wrong = [basic(USER, "not-the-password")];
    let answer = post(
        &client,
        "simpleenroll",
        &wrong,
        iot_edge_body(&simple_csr("dev1")),
    )
    .await;
    refused(&answer, 401, &["wrong user name or password"]);
    assert!(answer
        .header("www-authenticate")
        .unwrap_or_default()
        .starts_with("Basic realm="));

    let unknown_user = [basic("nobody", PASSWORD)];
    let answer = post(
        &client,
        "simpleenroll",
        &unknown_user,
        iot_edge_body(&simple_csr("dev1")),
    )
    .await;
    refused(&answer, 401, &["wrong user name or password"]);

    let denied = [basic("other", PASSWORD)];
    let answer = post(
        &client,
        "simpleenroll",
        &denied,
        iot_edge_body(&simple_csr("dev1")),
    )
    .await;
    refused(&answer, 403, &["user other", "denied"]);

    // Control: the same request with estuser's credentials.
    let answer = post(
        &client,
        "simpleenroll",
        &password(),
        iot_edge_body(&simple_csr("dev1")),
    )
    .await;
    let control = issued(&answer, &server.dir, "dev1", "dev1");
    journal_holds_exactly(&server, &[&control]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_foreign_or_expired() {
    let (_dir, pki, server) = start_standard().await;
    let root = &pki.root.cert_pem;

    let foreign = pki.foreign.valid_client("dev7");
    let as_foreign = EstClient::new(
        server.addr,
        root,
        Some((&foreign.cert_pem, &foreign.key_pem)),
    );
    let answer = post(
        &as_foreign,
        "simpleenroll",
        &[],
        iot_edge_body(&simple_csr("dev7")),
    )
    .await;
    refused(
        &answer,
        401,
        &[
            "client certificate rejected",
            "not issued by a CA this label trusts",
        ],
    );

    let now = OffsetDateTime::now_utc();
    let expired =
        pki.bootstrap
            .client_cert("dev7", now - Duration::days(30), now - Duration::days(1));
    let as_expired = EstClient::new(
        server.addr,
        root,
        Some((&expired.cert_pem, &expired.key_pem)),
    );
    let answer = post(
        &as_expired,
        "simpleenroll",
        &[],
        iot_edge_body(&simple_csr("dev7")),
    )
    .await;
    refused(&answer, 401, &["client certificate rejected", "expired at"]);

    let future =
        pki.bootstrap
            .client_cert("dev7", now + Duration::days(1), now + Duration::days(30));
    let as_future = EstClient::new(server.addr, root, Some((&future.cert_pem, &future.key_pem)));
    let answer = post(
        &as_future,
        "simpleenroll",
        &[],
        iot_edge_body(&simple_csr("dev7")),
    )
    .await;
    refused(
        &answer,
        401,
        &["client certificate rejected", "not valid before"],
    );

    // A bad certificate is refused even with a good password next to it.
    let answer = post(
        &as_expired,
        "simpleenroll",
        &password(),
        iot_edge_body(&simple_csr("dev7")),
    )
    .await;
    refused(&answer, 401, &["expired at"]);

    // Control: a valid bootstrap certificate with the same CN enrolls.
    let valid = pki.bootstrap.valid_client("dev7");
    let as_valid = EstClient::new(server.addr, root, Some((&valid.cert_pem, &valid.key_pem)));
    let answer = post(
        &as_valid,
        "simpleenroll",
        &[],
        iot_edge_body(&simple_csr("dev7")),
    )
    .await;
    let control = issued(&answer, &server.dir, "dev7", "dev7");
    journal_holds_exactly(&server, &[&control]);
    server.stop().await;
}

/// curl with the answer's headers, recorded through `-D <tag>.hdr`.
fn curl_with_headers(server: &TestServer, tag: &str, args: &[&str]) -> (u16, String, String) {
    let header_file = format!("{tag}.hdr");
    let mut all = vec!["-D", header_file.as_str()];
    all.extend_from_slice(args);
    let (status, body) = curl(server, &all);
    let headers = std::fs::read_to_string(server.dir.join(&header_file)).unwrap_or_default();
    (status, headers.to_ascii_lowercase(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_mistyped_bodies() {
    let (_dir, pki, server) = start_standard().await;
    let dir = server.dir.clone();
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);
    let user = format!("{USER}:{PASSWORD}");
    let url = server.url("simpleenroll");

    // A CSR whose signature is broken: the last byte of the DER is the last byte of the
    // signature value (for ECDSA, of s), so the structure stays valid.
    let good = simple_csr("dev30");
    let mut broken = good.clone();
    *broken.last_mut().unwrap() ^= 0x01;
    let answer = post(&client, "simpleenroll", &password(), iot_edge_body(&broken)).await;
    refused(&answer, 400, &["signature does not verify"]);
    let answer = post(&client, "simpleenroll", &password(), iot_edge_body(&good)).await;
    let signed = issued(&answer, &dir, "dev30", "dev30");

    let answer = post(
        &client,
        "simpleenroll",
        &password(),
        b"this is *not* base64 at all!\n".to_vec(),
    )
    .await;
    refused(&answer, 400, &["not valid base64"]);
    let answer = post(
        &client,
        "simpleenroll",
        &password(),
        b"bm90IGEgQ1NS\n".to_vec(),
    )
    .await;
    refused(&answer, 400, &["not a PKCS#10 certificate request"]);
    let answer = post(&client, "simpleenroll", &password(), Vec::new()).await;
    refused(&answer, 400, &["the request body is empty"]);

    // 100 KiB, past the 64 KiB limit: 413, and the server goes on serving. curl declares the
    // length and waits for the answer before sending the body (Expect: 100-continue), or
    // streams it without a declared length (chunked). The plain declared-length upload is
    // `oversized_declared_body_gets_its_413_not_a_reset` below.
    std::fs::write(dir.join("big.b64"), "QUFB".repeat(100 * 1024 / 4)).unwrap();
    std::fs::write(dir.join("ok.b64"), iot_edge_body(&simple_csr("dev31"))).unwrap();
    let pkcs10 = "Content-Type: application/pkcs10";
    for (tag, framing) in [
        ("big-expect", "Expect: 100-continue"),
        ("big-chunked", "Transfer-Encoding: chunked"),
    ] {
        let (status, headers, body) = curl_with_headers(
            &server,
            tag,
            &[
                "-u",
                &user,
                "-H",
                pkcs10,
                "-H",
                framing,
                "--data-binary",
                "@big.b64",
                &url,
            ],
        );
        assert_eq!(status, 413, "{framing}: {body}");
        assert!(headers.contains("content-type: text/plain"), "{headers}");
        assert!(
            body.contains("the request body is larger than 65536 bytes"),
            "{framing}: {body}"
        );
    }
    let (status, _, body) = curl_with_headers(
        &server,
        "after-big",
        &[
            "-u",
            &user,
            "-H",
            "Content-Type: application/pkcs10",
            "--data-binary",
            "@ok.b64",
            &url,
        ],
    );
    assert_eq!(status, 200, "{body}");
    let after_big = common::client::certs_from_answer(body.as_bytes()).remove(0);
    std::fs::write(dir.join("dev31.pem"), to_pem(&after_big)).unwrap();
    assert!(openssl_verify(
        &dir,
        "root.pem",
        "issuing-ca.pem",
        "dev31.pem"
    ));

    // Media types: JSON is refused; so is curl's default form type when -H is forgotten.
    let mut json = vec![("content-type", "application/json".to_owned())];
    json.extend(password());
    let answer = client
        .request(
            "POST",
            "simpleenroll",
            &json,
            iot_edge_body(&simple_csr("dev32")),
        )
        .await;
    refused(
        &answer,
        415,
        &[
            "unsupported Content-Type \"application/json\"",
            "application/pkcs10",
        ],
    );
    let (status, headers, body) = curl_with_headers(
        &server,
        "form",
        &["-u", &user, "--data-binary", "@ok.b64", &url],
    );
    assert_eq!(status, 415, "{body}");
    assert!(headers.contains("content-type: text/plain"), "{headers}");
    assert!(
        body.contains("unsupported Content-Type \"application/x-www-form-urlencoded\""),
        "{body}"
    );
    // Control: the legacy spelling and parameters are fine.
    let mut legacy = vec![(
        "content-type",
        "application/x-pkcs10; charset=utf-8".to_owned(),
    )];
    legacy.extend(password());
    let answer = client
        .request(
            "POST",
            "simpleenroll",
            &legacy,
            iot_edge_body(&simple_csr("dev32")),
        )
        .await;
    let typed = issued(&answer, &dir, "dev32", "dev32");

    journal_holds_exactly(&server, &[&signed, &after_big, &typed]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simplereenroll_must_keep_the_subject_and_present_the_certificate() {
    let (_dir, pki, server) = start_standard().await;
    let dir = server.dir.clone();
    let root = &pki.root.cert_pem;
    let client = EstClient::new(server.addr, root, None);
    let key = KeyPair::generate().unwrap();
    let answer = post(
        &client,
        "simpleenroll",
        &password(),
        iot_edge_body(&csr("dev20", &key, |_| {})),
    )
    .await;
    let first = issued(&answer, &dir, "dev20", "dev20");
    let as_device = EstClient::new(
        server.addr,
        root,
        Some((&to_pem(&first), &key.serialize_pem())),
    );

    let answer = post(
        &as_device,
        "simplereenroll",
        &[],
        iot_edge_body(&simple_csr("dev21")),
    )
    .await;
    refused(
        &answer,
        403,
        &[
            "simplereenroll must keep the subject",
            "CN=dev21",
            "CN=dev20",
        ],
    );

    // Basic alone authenticates, but a renewal needs the certificate being renewed.
    let answer = post(
        &client,
        "simplereenroll",
        &password(),
        iot_edge_body(&simple_csr("dev20")),
    )
    .await;
    refused(
        &answer,
        403,
        &["simplereenroll needs the certificate being renewed as the TLS client certificate"],
    );

    // Control: same subject, certificate presented.
    let answer = post(
        &as_device,
        "simplereenroll",
        &[],
        iot_edge_body(&simple_csr("dev20")),
    )
    .await;
    let renewed = issued(&answer, &dir, "dev20-renewed", "dev20");
    journal_holds_exactly(&server, &[&first, &renewed]);
    assert_eq!(
        server
            .journal()
            .iter()
            .filter(|e| e.operation == "simplereenroll")
            .count(),
        1
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_limits_ca_requests_common_names_and_alt_names() {
    let (_dir, pki, server) = start_standard().await;
    let dir = server.dir.clone();
    let root = &pki.root.cert_pem;
    let client = EstClient::new(server.addr, root, None);
    let bootstrap = pki.bootstrap.valid_client("dev7");
    let as_dev7 = EstClient::new(
        server.addr,
        root,
        Some((&bootstrap.cert_pem, &bootstrap.key_pem)),
    );

    // A CA certificate: not for a bootstrap identity, fine for estuser.
    let answer = post(
        &as_dev7,
        "simpleenroll",
        &[],
        iot_edge_body(&ca_csr("aziot-edge CA dev7")),
    )
    .await;
    refused(
        &answer,
        403,
        &["CN=dev7", "may not obtain a CA certificate"],
    );
    let answer = post(
        &client,
        "simpleenroll",
        &password(),
        iot_edge_body(&ca_csr("aziot-edge CA x")),
    )
    .await;
    let edge_ca = issued(&answer, &dir, "edge-ca", "aziot-edge CA x");
    let text = stdout(&run(
        "openssl",
        &["x509", "-in", "edge-ca.pem", "-noout", "-text"],
        &dir,
    ));
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");

    // Common names: dev7's certificate may ask for dev7 only.
    let answer = post(
        &as_dev7,
        "simpleenroll",
        &[],
        iot_edge_body(&simple_csr("dev8")),
    )
    .await;
    refused(
        &answer,
        403,
        &["subject CN=\"dev8\" is not allowed", "CN=dev7"],
    );
    let answer = post(
        &as_dev7,
        "simpleenroll",
        &[],
        iot_edge_body(&simple_csr("dev7")),
    )
    .await;
    let dev7 = issued(&answer, &dir, "dev7", "dev7");

    // Alternative names: estuser may ask for *.plant.local only.
    let with_dns = |name: &str| {
        let name = name.to_owned();
        csr("gw", &KeyPair::generate().unwrap(), move |p| {
            p.subject_alt_names = vec![SanType::DnsName(name.try_into().unwrap())];
        })
    };
    let answer = post(
        &client,
        "simpleenroll",
        &password(),
        iot_edge_body(&with_dns("evil.example.com")),
    )
    .await;
    refused(
        &answer,
        403,
        &[
            "subjectAltName DNS:evil.example.com is not allowed",
            "user estuser",
        ],
    );
    let answer = post(
        &client,
        "simpleenroll",
        &password(),
        iot_edge_body(&with_dns("gw.plant.local")),
    )
    .await;
    let gateway = issued(&answer, &dir, "gw", "gw");
    let (_, parsed) = X509Certificate::from_der(&gateway).unwrap();
    let sans = &parsed
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(sans, &[GeneralName::DNSName("gw.plant.local")]);

    journal_holds_exactly(&server, &[&edge_ca, &dev7, &gateway]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_label_is_404_naming_the_label() {
    let (_dir, pki, server) = start_standard().await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);

    let answer = client
        .request("GET", "strict/cacerts", &[], Vec::new())
        .await;
    assert_eq!(
        answer.status,
        200,
        "control: a configured label: {}",
        answer.text()
    );
    let answer = post(
        &client,
        "nope/simpleenroll",
        &password(),
        iot_edge_body(&simple_csr("dev1")),
    )
    .await;
    assert_eq!(answer.status, 404, "{}", answer.text());
    assert_eq!(server.journal().len(), 0);
    // The label as the client wrote it, quoted like the other path errors
    // (`invalid EST label "..."`), not the server's internal Debug form.
    refused(&answer, 404, &["no EST label \"nope\" here"]);
    let answer = client.request("GET", "nope/cacerts", &[], Vec::new()).await;
    refused(&answer, 404, &["no EST label \"nope\" here"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_operations_and_wrong_methods() {
    let (_dir, pki, server) = start_standard().await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);

    let answer = client.request("GET", "bogus", &[], Vec::new()).await;
    refused(&answer, 404, &["unknown EST operation \"bogus\""]);
    let answer = post(
        &client,
        "fullcmc",
        &password(),
        iot_edge_body(&simple_csr("dev1")),
    )
    .await;
    refused(&answer, 404, &["unknown EST operation \"fullcmc\""]);
    let answer = client.request("GET", "cacerts", &[], Vec::new()).await;
    assert_eq!(
        answer.status,
        200,
        "control: a known operation: {}",
        answer.text()
    );

    let answer = client
        .request("GET", "simpleenroll", &password(), Vec::new())
        .await;
    refused(&answer, 405, &["simpleenroll takes POST"]);
    assert_eq!(answer.header("allow"), Some("POST"));
    let answer = post(
        &client,
        "cacerts",
        &password(),
        iot_edge_body(&simple_csr("dev1")),
    )
    .await;
    refused(&answer, 405, &["cacerts takes GET"]);
    assert_eq!(answer.header("allow"), Some("GET"));

    // Control: POST simpleenroll.
    let answer = post(
        &client,
        "simpleenroll",
        &password(),
        iot_edge_body(&simple_csr("dev1")),
    )
    .await;
    let control = issued(&answer, &server.dir, "dev1", "dev1");
    journal_holds_exactly(&server, &[&control]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_label_takes_certificates_only() {
    let (_dir, pki, server) = start_standard().await;
    let root = &pki.root.cert_pem;
    let client = EstClient::new(server.addr, root, None);

    let answer = post(
        &client,
        "strict/simpleenroll",
        &password(),
        iot_edge_body(&simple_csr("dev40")),
    )
    .await;
    refused(
        &answer,
        401,
        &["this label accepts only client certificates"],
    );
    assert_eq!(
        answer.header("www-authenticate"),
        None,
        "no Basic challenge where Basic is off"
    );
    let answer = post(
        &client,
        "strict/simpleenroll",
        &[],
        iot_edge_body(&simple_csr("dev40")),
    )
    .await;
    refused(&answer, 401, &["authentication required"]);

    // A bootstrap certificate is no good on strict either: it trusts the issuer only.
    let bootstrap = pki.bootstrap.valid_client("dev40");
    let as_bootstrap = EstClient::new(
        server.addr,
        root,
        Some((&bootstrap.cert_pem, &bootstrap.key_pem)),
    );
    let answer = post(
        &as_bootstrap,
        "strict/simpleenroll",
        &[],
        iot_edge_body(&simple_csr("dev40")),
    )
    .await;
    refused(&answer, 401, &["not issued by a CA this label trusts"]);

    // Control: a certificate from the issuer (obtained with the password on the unlabeled
    // path) enrolls on strict.
    let key = KeyPair::generate().unwrap();
    let answer = post(
        &client,
        "simpleenroll",
        &password(),
        iot_edge_body(&csr("dev40", &key, |_| {})),
    )
    .await;
    let identity = issued(&answer, &server.dir, "dev40", "dev40");
    let as_device = EstClient::new(
        server.addr,
        root,
        Some((&to_pem(&identity), &key.serialize_pem())),
    );
    let answer = post(
        &as_device,
        "strict/simpleenroll",
        &[],
        iot_edge_body(&simple_csr("dev40")),
    )
    .await;
    let strict = issued(&answer, &server.dir, "dev40-strict", "dev40");
    journal_holds_exactly(&server, &[&identity, &strict]);
    assert_eq!(
        server
            .journal()
            .iter()
            .filter(|e| e.label.as_deref() == Some("strict"))
            .count(),
        1
    );
    server.stop().await;
}

/// A TLS connection to the server trusting the test root, for requests written by hand,
/// and a second handle on the same TCP socket to read its pending error (SO_ERROR) later.
async fn raw_tls(
    server: &TestServer,
    root_pem: &str,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    std::net::TcpStream,
) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = std::net::TcpStream::connect(server.addr).unwrap();
    tcp.set_nonblocking(true).unwrap();
    let socket = tcp.try_clone().unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    (tls, socket)
}

/// An upload with a declared length past the limit, the way curl (without Expect) and IoT
/// Edge send it: headers and body, then the answer is read. The server may answer 413 before
/// reading the body, but it must then read and drop it (the 100 KiB are well under its 1 MiB
/// DRAIN_CAP) instead of closing the socket on unread data: that close makes the kernel send
/// a TCP reset, and a client still writing (curl) fails with "Send failure: Broken pipe" and
/// never shows the 413. The reset is observed without any timing: a failed write, a failed
/// read, or the error left pending on the client's socket once the server has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_declared_body_gets_its_413_not_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, pki, server) = start_standard().await;
    let (mut stream, socket) = raw_tls(&server, &pki.root.cert_pem).await;
    let body = vec![b'A'; 100 * 1024];
    let (_, authorization) = basic(USER, PASSWORD);
    let head = format!(
        "POST /.well-known/est/simpleenroll HTTP/1.1\r\nhost: localhost:{}\r\ncontent-type: application/pkcs10\r\nauthorization: {authorization}\r\ncontent-length: {}\r\n\r\n",
        server.addr.port(),
        body.len()
    );
    let mut write_error = None;
    for piece in std::iter::once(head.as_bytes()).chain(body.chunks(4096)) {
        let sent = match stream.write_all(piece).await {
            Ok(()) => stream.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            write_error = Some(e);
            break;
        }
    }
    // No shutdown of our side: the server may still owe the answer (it closes after a 413).
    let mut got = Vec::new();
    let read_end = stream.read_to_end(&mut got).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 413"),
        "{text:?} (write {write_error:?}, read {read_end:?})"
    );
    assert!(
        text.contains("the request body is larger than 65536 bytes"),
        "{text}"
    );

    // The server goes on serving.
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);
    let answer = post(
        &client,
        "simpleenroll",
        &password(),
        iot_edge_body(&simple_csr("dev33")),
    )
    .await;
    let control = issued(&answer, &server.dir, "dev33", "dev33");
    journal_holds_exactly(&server, &[&control]);
    // Once stopped, the server has closed every socket; a reset would be pending on ours.
    server.stop().await;
    let pending = socket.take_error().unwrap();
    assert!(
        write_error.is_none() && read_end.is_ok() && pending.is_none(),
        "the server answered 413 and then reset the connection instead of reading the 100 KiB \
         body it was sent: write {write_error:?}, read {read_end:?}, pending socket error {pending:?}"
    );
    drop(stream);
}

/// A label that takes HTTP Basic only: a client certificate the label's trust sets accept
/// (a bootstrap certificate, which its rules grant elsewhere) authenticates nothing there (401
/// naming the method), and alongside a password it is not part of the identity. Positive
/// control: the same client with the password enrolls, as the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_label_takes_passwords_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::generate_p256(dir.path());
    let mut config = common::standard_config(&pki);
    let mut passwords_only = common::label(&mut config, None).clone();
    passwords_only.name = Some("pw".into());
    passwords_only.authentication.certificate = false;
    config.labels.push(passwords_only);
    let server = TestServer::start(dir.path(), &config).await;
    let root = &pki.root.cert_pem;
    let bootstrap = pki.bootstrap.valid_client("dev41");
    let as_device = EstClient::new(
        server.addr,
        root,
        Some((&bootstrap.cert_pem, &bootstrap.key_pem)),
    );

    let answer = post(
        &as_device,
        "pw/simpleenroll",
        &[],
        iot_edge_body(&simple_csr("dev41")),
    )
    .await;
    refused(&answer, 401, &["this label accepts only HTTP Basic"]);
    journal_holds_exactly(&server, &[]);

    let answer = post(
        &as_device,
        "pw/simpleenroll",
        &password(),
        iot_edge_body(&simple_csr("dev41")),
    )
    .await;
    let with_password = issued(&answer, &server.dir, "dev41-pw", "dev41");
    journal_holds_exactly(&server, &[&with_password]);
    assert_eq!(server.journal()[0].identity, "user estuser");
    server.stop().await;
}

/// A label with `anonymous_cacerts = false` answers `/cacerts` and `/csrattrs` only to an
/// authenticated client: 401 without credentials or with a wrong password, served with the
/// right ones. Positive control: a label with the default serves both to anyone.
#[tokio::test]
async fn cacerts_and_csrattrs_need_credentials_where_anonymous_cacerts_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::generate_p256(dir.path());
    let mut config = common::standard_config(&pki);
    common::label(&mut config, None)
        .authentication
        .anonymous_cacerts = false;
    let server = TestServer::start(dir.path(), &config).await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);
    for path in ["cacerts", "csrattrs"] {
        let answer = client.request("GET", path, &[], Vec::new()).await;
        refused(&answer, 401, &[]);
        let answer = client
            .request("GET", path, &[basic(USER, "not the password")], Vec::new())
            .await;
        refused(&answer, 401, &[]);
        let answer = client.request("GET", path, &password(), Vec::new()).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        assert!(!answer.body.is_empty(), "{path}");
    }
    let answer = client
        .request("GET", "strict/cacerts", &[], Vec::new())
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let answer = client
        .request("GET", "strict/csrattrs", &[], Vec::new())
        .await;
    assert_eq!(answer.status, 204, "{}", answer.text());
}

/// The body limit is inclusive: a body of exactly `limits.max_body_bytes` is read and served,
/// one byte more is a 413 naming the limit.
#[tokio::test]
async fn a_body_of_exactly_the_limit_is_served_and_one_byte_more_is_413() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::generate_p256(dir.path());
    let mut config = common::standard_config(&pki);
    config.limits.max_body_bytes = 1024;
    let server = TestServer::start(dir.path(), &config).await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);
    let mut body = iot_edge_body(&simple_csr("dev-limit"));
    assert!(body.len() < 1024, "{}", body.len());
    body.resize(1024, b'\n');
    let answer = post(&client, "simpleenroll", &password(), body.clone()).await;
    issued(&answer, dir.path(), "exactly the limit", "dev-limit");
    body.push(b'\n');
    let answer = post(&client, "simpleenroll", &password(), body).await;
    refused(
        &answer,
        413,
        &["the request body is larger than 1024 bytes"],
    );
}

/// Writes a chunked POST to simpleenroll by hand (one chunk a piece, the terminating chunk
/// only if `finish`) on a fresh TLS connection, and returns what the server answered until it
/// closed (`connection: close`), reading while writing: the server may answer before it has
/// read the whole body.
async fn chunked_post(
    server: &TestServer,
    root_pem: &str,
    pieces: Vec<Vec<u8>>,
    finish: bool,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (stream, _socket) = raw_tls(server, root_pem).await;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (_, authorization) = basic(USER, PASSWORD);
    let head = format!(
        "POST /.well-known/est/simpleenroll HTTP/1.1\r\nhost: localhost:{}\r\ncontent-type: application/pkcs10\r\nauthorization: {authorization}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        server.addr.port(),
    );
    let writing = tokio::spawn(async move {
        let mut wire = vec![head.into_bytes()];
        for piece in pieces {
            let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
            chunk.extend_from_slice(&piece);
            chunk.extend_from_slice(b"\r\n");
            wire.push(chunk);
        }
        if finish {
            wire.push(b"0\r\n\r\n".to_vec());
        }
        for bytes in wire {
            if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                break;
            }
        }
        // Kept open (not shut down) until the answer is read: the server decides when to stop.
        writer
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        reader.read_to_end(&mut got),
    )
    .await;
    assert!(
        read.is_ok(),
        "no answer within 60 s: {:?}",
        String::from_utf8_lossy(&got)
    );
    writing.abort();
    String::from_utf8_lossy(&got).into_owned()
}

/// A chunked body (no declared length, so only the reading enforces the limit): at exactly
/// `limits.max_body_bytes`, in two chunks, it is served; one byte more, in a single chunk, is
/// a 413 naming the limit; a body that goes on and on past the limit is a 413 once the server
/// has dropped its 1 MiB drain allowance, well before the body timeout (a server that read on
/// would answer 408 at the timeout, having read all the attacker cared to send). Nothing is
/// journaled for the refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_is_held_to_the_limit_and_an_endless_one_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::generate_p256(dir.path());
    let mut config = common::standard_config(&pki);
    config.limits.max_body_bytes = 1024;
    config.limits.body_timeout_secs = 10;
    let server = TestServer::start(dir.path(), &config).await;
    let root = &pki.root.cert_pem;

    // Positive control: exactly the limit, in two chunks.
    let mut body = iot_edge_body(&simple_csr("dev-chunked"));
    assert!(body.len() < 1024, "{}", body.len());
    body.resize(1024, b'\n');
    let (first, second) = body.split_at(512);
    let answer = chunked_post(&server, root, vec![first.to_vec(), second.to_vec()], true).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(server.journal().len(), 1);

    // One byte more, in one chunk.
    body.push(b'\n');
    let answer = chunked_post(&server, root, vec![body], true).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("the request body is larger than 1024 bytes"),
        "{answer}"
    );

    // An endless body: 1.5 MiB in chunks of 10000 bytes (an odd size, so that what the
    // server drops never lands on its 1 MiB allowance exactly), never terminated.
    let pieces = vec![vec![b'A'; 10_000]; 150];
    let answer = chunked_post(&server, root, pieces, false).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("the request body is larger than 1024 bytes"),
        "{answer}"
    );
    assert_eq!(server.journal().len(), 1);
    server.stop().await;
}
