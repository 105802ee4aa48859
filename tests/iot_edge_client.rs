//! The flows of IoT Edge's EST client (aziot-certd), with requests shaped exactly like its
//! own: lowercase headers, `content-transfer-encoding: base64`, 64-column LF base64 bodies,
//! `simpleenroll` and `cacerts` at once on two connections, Basic sent up front.

mod common;

use common::client::{basic, certs_from_answer, iot_edge_body, to_pem, Answer, EstClient};
use common::{openssl_verify, run, standard_config, stdout, Pki, TestServer, PASSWORD, USER};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use x509_parser::prelude::*;

fn csr(cn: &str, key: &KeyPair, shape: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    shape(&mut params);
    params.serialize_request(key).unwrap().der().to_vec()
}

/// What aziot-certd does for one issuance: POST simpleenroll and GET cacerts concurrently,
/// each on its own connection, with the same credentials; both must succeed.
async fn issue(client: &EstClient, auth: &[(&str, String)], csr_der: &[u8]) -> (Answer, Answer) {
    let mut enroll_headers = vec![
        ("content-type", "application/pkcs10".to_owned()),
        ("content-transfer-encoding", "base64".to_owned()),
    ];
    enroll_headers.extend(auth.iter().cloned());
    let enroll = client.request(
        "POST",
        "simpleenroll",
        &enroll_headers,
        iot_edge_body(csr_der),
    );
    let cacerts = client.request("GET", "cacerts", auth, Vec::new());
    tokio::join!(enroll, cacerts)
}

/// Checks an issuance the way aziot-certd uses it: 200, the exact media type, the first
/// certificate is the leaf; returns the stored chain (leaf, then every cacerts certificate).
fn stored_chain(enroll: &Answer, cacerts: &Answer, expected_cn: &str) -> (Vec<u8>, String) {
    assert_eq!(enroll.status, 200, "simpleenroll: {}", enroll.text());
    assert_eq!(cacerts.status, 200, "cacerts: {}", cacerts.text());
    for answer in [enroll, cacerts] {
        let content_type = answer.header("content-type").unwrap();
        assert!(
            content_type == "application/pkcs7-mime"
                || content_type.starts_with("application/pkcs7-mime;"),
            "aziot-certd refuses content-type {content_type}"
        );
        assert_eq!(answer.header("content-transfer-encoding"), Some("base64"));
    }
    let issued = certs_from_answer(&enroll.body);
    assert_eq!(issued.len(), 1);
    let (_, leaf) = X509Certificate::from_der(&issued[0]).unwrap();
    assert_eq!(
        leaf.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        expected_cn
    );
    let ca_chain = certs_from_answer(&cacerts.body);
    assert_eq!(ca_chain.len(), 2, "cacerts is the issuing CA and the root");
    let mut pem = to_pem(&issued[0]);
    for cert in &ca_chain {
        pem.push_str(&to_pem(cert));
    }
    (issued[0].clone(), pem)
}

fn verify_chain(dir: &std::path::Path, name: &str, chain_pem: &str) {
    let path = dir.join(name);
    std::fs::write(&path, chain_pem).unwrap();
    // Leaf is the first PEM in the file; the rest serve as untrusted intermediates.
    assert!(
        openssl_verify(dir, "root.pem", name, name),
        "{name} must verify against the root"
    );
}

#[tokio::test]
async fn basic_then_certificate_renewal_then_edge_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let server = TestServer::start(dir.path(), &standard_config(&pki)).await;
    let anonymous = EstClient::new(server.addr, &pki.root.cert_pem, None);
    let password = [basic(USER, PASSWORD)];

    // 1. Device identity certificate, authenticated by Basic.
    let key = KeyPair::generate().unwrap();
    let (enroll, cacerts) = issue(&anonymous, &password, &csr("dev1", &key, |_| {})).await;
    let (leaf, chain) = stored_chain(&enroll, &cacerts, "dev1");
    verify_chain(dir.path(), "dev1.pem", &chain);
    let (_, parsed) = X509Certificate::from_der(&leaf).unwrap();
    let eku = parsed.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth, "identity certificates carry clientAuth");
    assert!(!parsed.is_ca());

    // 2. Renewal: a simpleenroll with a new key, authenticated by the issued certificate
    // alone (leaf only, no chain, no password), as aziot-certd renews.
    let renewal_key = KeyPair::generate().unwrap();
    let as_device = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&to_pem(&leaf), &key.serialize_pem())),
    );
    let (enroll, cacerts) = issue(&as_device, &[], &csr("dev1", &renewal_key, |_| {})).await;
    let (renewed, chain) = stored_chain(&enroll, &cacerts, "dev1");
    verify_chain(dir.path(), "dev1-renewed.pem", &chain);
    assert_ne!(renewed, leaf);

    // 3. Edge CA certificate, authenticated by the renewed certificate: RSA-2048 with the
    // extensions IoT Edge requests; the answer must really be a CA with pathlen 0.
    let as_renewed = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&to_pem(&renewed), &renewal_key.serialize_pem())),
    );
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let edge_ca_csr = csr("aziot-edge CA dev1", &ca_key, |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    });
    let (enroll, cacerts) = issue(&as_renewed, &[], &edge_ca_csr).await;
    let (edge_ca, chain) = stored_chain(&enroll, &cacerts, "aziot-edge CA dev1");
    verify_chain(dir.path(), "edge-ca.pem", &chain);
    let (_, parsed) = X509Certificate::from_der(&edge_ca).unwrap();
    let constraints = parsed.basic_constraints().unwrap().unwrap();
    assert!(constraints.critical);
    assert!(constraints.value.ca);
    assert_eq!(constraints.value.path_len_constraint, Some(0));
    assert!(parsed.key_usage().unwrap().unwrap().value.key_cert_sign());
    let text = stdout(&run(
        "openssl",
        &["x509", "-in", "edge-ca.pem", "-noout", "-text"],
        dir.path(),
    ));
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");

    // A certificate issued by that Edge CA (as IoT Edge issues module certificates) must not
    // pass for a device identity: only certificates issued directly by our CA authenticate.
    let edge_ca_issuer = rcgen::Issuer::from_ca_cert_der(&edge_ca.clone().into(), ca_key).unwrap();
    let module_key = KeyPair::generate().unwrap();
    let mut module = CertificateParams::new(Vec::<String>::new()).unwrap();
    module.distinguished_name.push(DnType::CommonName, "dev1");
    module.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let module_cert = module.signed_by(&module_key, &edge_ca_issuer).unwrap();
    let module_chain = format!("{}{}", module_cert.pem(), to_pem(&edge_ca));
    let as_module = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&module_chain, &module_key.serialize_pem())),
    );
    let (refused, _) = issue(
        &as_module,
        &[],
        &csr("dev1", &KeyPair::generate().unwrap(), |_| {}),
    )
    .await;
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert!(
        refused
            .text()
            .contains("not issued directly by a CA of trust set issuer"),
        "{}",
        refused.text()
    );

    // The journal holds exactly these three certificates, each naming who asked.
    let journal = server.journal();
    assert_eq!(journal.len(), 3);
    assert_eq!(journal[0].identity, "user estuser");
    assert!(journal[1].identity.contains("CN=dev1") && journal[1].identity.contains("issuer"));
    assert_eq!(journal[2].profile, "edge-ca");
    server.stop().await;
}

#[tokio::test]
async fn bootstrap_certificate_then_est_identity_then_device_and_edge_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let server = TestServer::start(dir.path(), &standard_config(&pki)).await;
    let bootstrap = pki.bootstrap.valid_client("dev2");
    let as_bootstrap = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&bootstrap.cert_pem, &bootstrap.key_pem)),
    );

    // EST identity certificate: EC P-256, subject of the target certificate, EKU clientAuth.
    let est_id_key = KeyPair::generate().unwrap();
    let est_id_csr = csr("dev2", &est_id_key, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]
    });
    let (enroll, cacerts) = issue(&as_bootstrap, &[], &est_id_csr).await;
    let (est_id, chain) = stored_chain(&enroll, &cacerts, "dev2");
    verify_chain(dir.path(), "est-id.pem", &chain);

    // A bootstrap certificate may not obtain an Edge CA (only the issuer's certificates may).
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let edge_ca_csr = csr("aziot-edge CA dev2", &ca_key, |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    });
    let (refused, _) = issue(&as_bootstrap, &[], &edge_ca_csr).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(
        refused.text().contains("CA certificate"),
        "{}",
        refused.text()
    );

    // With the EST identity certificate: the device identity certificate (RSA-2048, no
    // extensions) and the Edge CA.
    let as_est_id = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&to_pem(&est_id), &est_id_key.serialize_pem())),
    );
    let device_key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let (enroll, cacerts) = issue(&as_est_id, &[], &csr("dev2", &device_key, |_| {})).await;
    let (_, chain) = stored_chain(&enroll, &cacerts, "dev2");
    verify_chain(dir.path(), "device-id.pem", &chain);
    let (enroll, cacerts) = issue(&as_est_id, &[], &edge_ca_csr).await;
    let (_, chain) = stored_chain(&enroll, &cacerts, "aziot-edge CA dev2");
    verify_chain(dir.path(), "edge-ca-2.pem", &chain);

    assert_eq!(
        server.journal().len(),
        3,
        "the refused request issued nothing"
    );
    server.stop().await;
}
