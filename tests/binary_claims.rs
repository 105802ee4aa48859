//! README claims, through the shipped binary (`env!("CARGO_BIN_EXE_edge-est")`):
//!
//! - `serve --config FILE`: TOML for `.toml`, JSON for anything else, relative paths against
//!   the file's directory (the process runs elsewhere);
//! - `check-config`: 0 and the label count for a valid file; the wrong field named otherwise;
//!   a plaintext password refused without being repeated;
//! - `hash-password`: its hash, in `users`, takes the password and refuses another;
//! - the certificate profile: 159-bit positive serials, key usages per key kind and for CAs,
//!   subject and authority key identifiers, 365/90 days, validity capped at the issuer's
//!   notAfter (x509-parser and `openssl x509 -text`);
//! - shutdown: a request stuck on an upstream that never answers does not hold the process
//!   longer than the 10 s drain bound.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::bin::{free_port, Running, BIN};
use common::client::{basic, certs_from_answer, iot_edge_body, to_pem, Answer, EstClient};
use common::upstream_stub::{Behaviour, UpstreamStub};
use common::{standard_config, standard_config_toml, stdout, Pki, PASSWORD, USER};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256,
    PKCS_RSA_SHA256,
};
use x509_parser::prelude::*;

async fn enroll(addr: std::net::SocketAddr, root: &str, password: &str, csr_der: &[u8]) -> Answer {
    enroll_at(addr, root, password, "simpleenroll", csr_der).await
}

async fn enroll_at(
    addr: std::net::SocketAddr,
    root: &str,
    password: &str,
    path: &str,
    csr_der: &[u8],
) -> Answer {
    EstClient::new(addr, root, None)
        .request(
            "POST",
            path,
            &[
                ("content-type", "application/pkcs10".to_owned()),
                basic(USER, password),
            ],
            iot_edge_body(csr_der),
        )
        .await
}

fn output(args: &[&str], dir: &Path, stdin: Option<&str>) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        stdout(&out),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A PKI in `dir/conf`; returns it and the root PEM.
fn pki_in(dir: &Path) -> (Pki, String) {
    std::fs::create_dir_all(dir.join("conf")).unwrap();
    let pki = Pki::generate_p256(&dir.join("conf"));
    let root = pki.root.cert_pem.clone();
    (pki, root)
}

#[tokio::test]
async fn serve_reads_toml_or_json_by_extension_with_paths_relative_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, root) = pki_in(dir.path());
    std::fs::write(
        dir.path().join("conf/edge-est.toml"),
        standard_config_toml(&pki),
    )
    .unwrap();
    let json = serde_json::to_string_pretty(&standard_config(&pki)).unwrap();
    std::fs::write(dir.path().join("conf/edge-est.json"), &json).unwrap();
    std::fs::write(dir.path().join("conf/edge-est.conf"), &json).unwrap();

    // Run from dir, one level above the files: every relative path (certificates, keys,
    // the journal) is the file's directory's.
    for (i, file) in [
        "conf/edge-est.toml",
        "conf/edge-est.json",
        "conf/edge-est.conf",
    ]
    .into_iter()
    .enumerate()
    {
        let server = Running::serve(dir.path(), file);
        let answer = enroll(
            server.addr(),
            &root,
            PASSWORD,
            &common::csr(&format!("d{i}")),
        )
        .await;
        assert_eq!(answer.status, 200, "{file}: {}", answer.text());
        drop(server);
        let journal =
            edge_est::journal::Journal::read_all(&dir.path().join("conf/journal.jsonl")).unwrap();
        assert_eq!(journal.len(), i + 1, "{file}");
        assert!(!dir.path().join("journal.jsonl").exists());
    }

    // TOML in a file that does not end in .toml is read as JSON, and refused as such.
    std::fs::write(
        dir.path().join("conf/toml-inside.json"),
        standard_config_toml(&pki),
    )
    .unwrap();
    let port = free_port().to_string();
    let (code, _, err) = output(
        &[
            "serve",
            "--config",
            "conf/toml-inside.json",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        dir.path(),
        None,
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("toml-inside.json"), "{err}");
}

#[test]
fn check_config_accepts_names_the_wrong_field_and_does_not_repeat_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, _) = pki_in(dir.path());
    let good = standard_config_toml(&pki);
    std::fs::write(dir.path().join("conf/good.toml"), &good).unwrap();
    let (code, out, err) = output(&["check-config", "conf/good.toml"], dir.path(), None);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("configuration is valid: 2 label(s)"), "{out}");

    let bad = good.replacen("issuer = \"plant\"", "issuer = \"plnat\"", 1);
    std::fs::write(dir.path().join("conf/bad.toml"), bad).unwrap();
    let (code, out, err) = output(&["check-config", "conf/bad.toml"], dir.path(), None);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("labels[0].issuer") && err.contains("plnat"),
        "{err}"
    );

    let plaintext = good.replacen(
        &format!("estuser = \"{}\"", pki.password_hash),
        "estuser = \"hunter2-plaintext\"",
        1,
    );
    assert_ne!(plaintext, good);
    std::fs::write(dir.path().join("conf/plain.toml"), plaintext).unwrap();
    let (code, out, err) = output(&["check-config", "conf/plain.toml"], dir.path(), None);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(err.contains("users.estuser"), "{err}");
    assert!(
        !err.contains("hunter2") && !out.contains("hunter2"),
        "the password is repeated: {err}"
    );
}

#[tokio::test]
async fn hash_password_makes_a_hash_that_users_takes() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, root) = pki_in(dir.path());
    let (code, out, err) = output(&["hash-password"], dir.path(), Some("s3cret pass\n"));
    assert_eq!(code, Some(0), "{err}");
    let hash = out.trim();
    assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
    assert!(!out.contains("s3cret"));
    let text = standard_config_toml(&pki).replace(&pki.password_hash, hash);
    std::fs::write(dir.path().join("conf/edge-est.toml"), text).unwrap();
    let server = Running::serve(dir.path(), "conf/edge-est.toml");
    let answer = enroll(server.addr(), &root, "s3cret pass", &common::csr("h1")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let answer = enroll(server.addr(), &root, PASSWORD, &common::csr("h2")).await;
    assert_eq!(answer.status, 401, "{}", answer.text());
    // Nothing on standard input: refused.
    let (code, _, err) = output(&["hash-password"], dir.path(), Some(""));
    assert_ne!(code, Some(0));
    assert!(err.contains("no password"), "{err}");
}

fn csr_with(key: &KeyPair, cn: &str, ca: bool) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    }
    params.serialize_request(key).unwrap().der().to_vec()
}

fn ski(cert: &X509Certificate<'_>) -> Vec<u8> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("subject key identifier")
}

fn aki(cert: &X509Certificate<'_>) -> Vec<u8> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(k) => {
                k.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("authority key identifier")
}

fn openssl_text(dir: &Path, name: &str, der: &[u8]) -> String {
    std::fs::write(dir.join(name), to_pem(der)).unwrap();
    let out = common::run("openssl", &["x509", "-noout", "-text", "-in", name], dir);
    assert!(out.status.success());
    stdout(&out)
}

#[tokio::test]
async fn issued_certificates_follow_the_profile() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, root) = pki_in(dir.path());
    let conf = dir.path().join("conf");
    // A second issuing CA that expires in 30 days, on label `short`.
    let short_key = KeyPair::generate().unwrap();
    let short_params = edge_est::pki::ca_params(
        "short-lived issuing CA",
        Some(1),
        ::time::Duration::days(30),
    );
    let short = short_params
        .signed_by(&short_key, &pki.root.issuer)
        .unwrap();
    std::fs::write(
        conf.join("short-ca.pem"),
        format!("{}{}", short.pem(), pki.root.cert_pem),
    )
    .unwrap();
    std::fs::write(conf.join("short-ca.key"), short_key.serialize_pem()).unwrap();
    let text = standard_config_toml(&pki)
        + r#"
[issuers.short]
certificate = "short-ca.pem"
key = "short-ca.key"

[[labels]]
name = "short"
issuer = "short"
client_trust = ["bootstrap"]

[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]
ca_common_names = ["*"]
"#;
    std::fs::write(conf.join("edge-est.toml"), text).unwrap();
    let server = Running::serve(dir.path(), "conf/edge-est.toml");
    let issuing_pem = std::fs::read_to_string(conf.join("issuing-ca.pem")).unwrap();
    let issuing_der = rustls::pki_types::pem::PemObject::from_pem_slice(issuing_pem.as_bytes())
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    let (_, issuing) = parse_x509_certificate(&issuing_der).unwrap();

    let get = |answer: &Answer| {
        assert_eq!(answer.status, 200, "{}", answer.text());
        certs_from_answer(&answer.body).remove(0)
    };
    let ec = get(&enroll(
        server.addr(),
        &root,
        PASSWORD,
        &csr_with(
            &KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
            "ec1",
            false,
        ),
    )
    .await);
    let rsa = get(&enroll(
        server.addr(),
        &root,
        PASSWORD,
        &csr_with(
            &KeyPair::generate_for(&PKCS_RSA_SHA256).unwrap(),
            "rsa1",
            false,
        ),
    )
    .await);
    let ca = get(&enroll(
        server.addr(),
        &root,
        PASSWORD,
        &csr_with(&KeyPair::generate().unwrap(), "aziot-edge CA ca1", true),
    )
    .await);
    let capped = get(&enroll_at(
        server.addr(),
        &root,
        PASSWORD,
        "short/simpleenroll",
        &csr_with(&KeyPair::generate().unwrap(), "capped1", false),
    )
    .await);
    let mut more = Vec::new();
    for i in 0..12 {
        more.push(get(&enroll(
            server.addr(),
            &root,
            PASSWORD,
            &common::csr(&format!("s{i}")),
        )
        .await));
    }

    // Serials: 20 bytes, positive, at most 159 bits, all different, and the top bit used.
    let mut serials = std::collections::HashSet::new();
    let mut widest = 0;
    for der in more.iter().chain([&ec, &rsa, &ca, &capped]) {
        let (_, cert) = parse_x509_certificate(der).unwrap();
        let raw = cert.raw_serial();
        assert_eq!(raw.len(), 20, "{raw:02x?}");
        assert!(raw[0] & 0x80 == 0 && raw[0] != 0, "{raw:02x?}");
        widest = widest.max(160 - raw[0].leading_zeros() as usize);
        assert!(serials.insert(raw.to_vec()));
    }
    assert_eq!(widest, 159, "no serial used its top bit in 16");

    let now = ::time::OffsetDateTime::now_utc();
    let days =
        |cert: &X509Certificate<'_>| (cert.validity().not_after.to_datetime() - now).whole_days();
    let usage = |cert: &X509Certificate<'_>| *cert.key_usage().unwrap().unwrap().value;
    let eku_client = |cert: &X509Certificate<'_>| {
        cert.extended_key_usage()
            .unwrap()
            .is_some_and(|e| e.value.client_auth)
    };

    let (_, c) = parse_x509_certificate(&ec).unwrap();
    let ku = usage(&c);
    assert!(ku.digital_signature() && !ku.key_encipherment() && !ku.key_cert_sign());
    assert!(eku_client(&c));
    assert!(!c.is_ca());
    assert!((364..=365).contains(&days(&c)), "{}", days(&c));
    assert_eq!(aki(&c), ski(&issuing));
    assert!(!ski(&c).is_empty());
    let text = openssl_text(dir.path(), "ec.pem", &ec);
    for needle in [
        "Digital Signature",
        "TLS Web Client Authentication",
        "Subject Key Identifier",
        "Authority Key Identifier",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    assert!(!text.contains("Key Encipherment"), "{text}");

    let (_, c) = parse_x509_certificate(&rsa).unwrap();
    let ku = usage(&c);
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    assert!(
        openssl_text(dir.path(), "rsa.pem", &rsa).contains("Digital Signature, Key Encipherment")
    );

    let (_, c) = parse_x509_certificate(&ca).unwrap();
    let ku = usage(&c);
    assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
    let bc = c.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca && bc.path_len_constraint == Some(0), "{bc:?}");
    assert!((89..=90).contains(&days(&c)), "{}", days(&c));
    assert_eq!(aki(&c), ski(&issuing));
    let text = openssl_text(dir.path(), "ca.pem", &ca);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");

    // Capped: the identity profile asks for 365 days, the issuer ends in 30.
    let (_, c) = parse_x509_certificate(&capped).unwrap();
    assert_eq!(
        c.validity().not_after.timestamp(),
        short_params.not_after.unix_timestamp(),
        "capped at the issuer's notAfter"
    );
    let (_, short_parsed) = parse_x509_certificate(short.der()).unwrap();
    assert_eq!(aki(&c), ski(&short_parsed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_past_its_drain_bound_for_a_stuck_request() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, root) = pki_in(dir.path());
    let stub = UpstreamStub::start(&dir.path().join("conf"), Behaviour::Never).await;
    let text = format!(
        r#"
listen = "127.0.0.1:0"
journal = "journal.jsonl"

[tls]
certificate = "server.pem"
key = "server.key"

[users]
estuser = "{hash}"

{upstream}

[[labels]]
mode = "forward"
upstream = "parent"
client_trust = ["issuer"]

[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]
"#,
        hash = pki.password_hash,
        upstream = stub.upstream_toml("parent", 60),
    );
    std::fs::write(dir.path().join("conf/edge-est.toml"), text).unwrap();
    let mut server = Running::serve(dir.path(), "conf/edge-est.toml");
    let addr = server.addr();
    let request =
        tokio::spawn(async move { enroll(addr, &root, PASSWORD, &common::csr("stuck")).await });
    // The request reaches the upstream and hangs there.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while stub.enrollments() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, took) = tokio::task::spawn_blocking(move || {
        let r = server.terminate(Duration::from_secs(15));
        (r, server)
    })
    .await
    .map(|(r, _server)| r)
    .unwrap();
    assert_eq!(code, Some(0));
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(12),
        "exited {took:?} after SIGTERM; the bound is 10 s"
    );
    // The stuck client is not left hanging either.
    let _ = tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .expect("the client's connection ends with the process");
}
