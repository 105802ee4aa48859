//! RFC 7030 2.5.3: a registration authority forwards its clients' `simplereenroll` as
//! `simplereenroll`, authenticated by its own certificate (libest's `estproxy` does). The RA
//! knows nothing of the child's certificate: it passes the CSR on. edge-est judges such a
//! renewal under the RA's allowance (its rule's patterns); the subject-equality check of
//! RFC 7030 4.2.2 applies to end clients renewing themselves.

mod common;

use std::net::SocketAddr;

use common::client::{certs_from_answer, iot_edge_body, Answer, EstClient};
use edge_est::demo::{self, Layer};
use rcgen::{CertificateParams, DnType, KeyPair};

fn csr_for(key: &KeyPair, cn: &str) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.serialize_request(key).unwrap().der().to_vec()
}

/// A third-party-style RA (a test client with the demo's `layer2-ra` certificate and
/// nothing else): relays a child's CSR upstream under `operation`, as estproxy does.
struct ThirdPartyRa {
    upstream: EstClient,
}

impl ThirdPartyRa {
    async fn relay(&self, operation: &str, csr_der: &[u8]) -> Answer {
        self.upstream
            .request(
                "POST",
                operation,
                &[("content-type", "application/pkcs10".to_owned())],
                iot_edge_body(csr_der),
            )
            .await
    }
}

fn subject_cn(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    cn
}

/// The demo's top, its RA rule bounded to `l3-*` and marked `registration_authority` as
/// `marked` says.
async fn top(dir: &std::path::Path, marked: bool) -> (Layer, ThirdPartyRa, String) {
    demo::write_pki(dir).unwrap();
    let mut config = demo::top_config();
    let rule = &mut config.labels[0].rules[0];
    assert_eq!(rule.matches, ["certificate:ras"]);
    rule.common_names = vec!["l3-*".to_owned()];
    rule.ca_common_names = vec!["aziot-edge CA l3-*".to_owned()];
    rule.dns_names.clear();
    rule.registration_authority = marked;
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let top = Layer::start("top", dir, &config, any).await.unwrap();
    let root = std::fs::read_to_string(dir.join("root.pem")).unwrap();
    let ra_cert = std::fs::read_to_string(dir.join("layer2-ra.pem")).unwrap();
    let ra_key = std::fs::read_to_string(dir.join("layer2-ra.key")).unwrap();
    let ra = ThirdPartyRa {
        upstream: EstClient::new(top.addr, &root, Some((&ra_cert, &ra_key))),
    };
    (top, ra, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ra_forwarding_simplereenroll_gets_the_renewal_within_its_allowance_only() {
    let dir = tempfile::tempdir().unwrap();
    let (top, ra, root) = top(dir.path(), true).await;

    // The child enrolled through the RA once; now it renews through it, with a new key.
    let key = KeyPair::generate().unwrap();
    let first = ra.relay("simpleenroll", &csr_for(&key, "l3-dev1")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let child_cert = certs_from_answer(&first.body).remove(0);
    let new_key = KeyPair::generate().unwrap();
    let renewed = ra
        .relay("simplereenroll", &csr_for(&new_key, "l3-dev1"))
        .await;
    assert_eq!(renewed.status, 200, "{}", renewed.text());
    let renewed_cert = certs_from_answer(&renewed.body).remove(0);
    assert_eq!(subject_cn(&renewed_cert), "l3-dev1");
    assert_ne!(renewed_cert, child_cert);
    let journal =
        edge_est::journal::Journal::read_all(top.app.journal().path()).unwrap_or_default();
    assert_eq!(journal.last().unwrap().operation, "simplereenroll");
    assert!(journal.last().unwrap().identity.contains("layer2-ra"));

    // Outside the RA's allowance: refused, and the reason names what.
    let outside = ra
        .relay("simplereenroll", &csr_for(&new_key, "plant-boss"))
        .await;
    assert_eq!(outside.status, 403, "{}", outside.text());
    assert!(
        outside.text().contains("CN=\"plant-boss\" is not allowed"),
        "{}",
        outside.text()
    );

    // An end client renewing itself still keeps its subject (RFC 7030 4.2.2): the child's
    // own certificate from the top may not rename itself.
    let child = EstClient::new(
        top.addr,
        &root,
        Some((&common::client::to_pem(&child_cert), &key.serialize_pem())),
    );
    let renamed = child
        .request(
            "POST",
            "simplereenroll",
            &[("content-type", "application/pkcs10".to_owned())],
            iot_edge_body(&csr_for(&new_key, "l3-dev2")),
        )
        .await;
    assert_eq!(renamed.status, 403, "{}", renamed.text());
    assert!(
        renamed.text().contains("must keep the subject"),
        "{}",
        renamed.text()
    );
    top.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_without_the_ra_mark_keeps_the_subject_check() {
    let dir = tempfile::tempdir().unwrap();
    let (top, ra, _) = top(dir.path(), false).await;
    let key = KeyPair::generate().unwrap();
    // The same rule without `registration_authority`: the RA may enroll its names...
    let enrolled = ra.relay("simpleenroll", &csr_for(&key, "l3-dev1")).await;
    assert_eq!(enrolled.status, 200, "{}", enrolled.text());
    // ...but a simplereenroll is a renewal of its own certificate, which has another subject.
    let renewal = ra.relay("simplereenroll", &csr_for(&key, "l3-dev1")).await;
    assert_eq!(renewal.status, 403, "{}", renewal.text());
    assert!(
        renewal.text().contains("must keep the subject"),
        "{}",
        renewal.text()
    );
    top.stop().await;
}
