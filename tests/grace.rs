//! The grace window for expired client certificates (`grace_expired_secs`, per label, off by
//! default): a device whose certificate expired less than the window ago renews its own
//! subject and names, journaled as a grace renewal; it gets nothing else, and a certificate
//! expired longer ago, or on a label without a window, is refused as before.

mod common;

use ::time::{Duration, OffsetDateTime};
use common::client::{certs_from_answer, iot_edge_body, to_pem, Answer, EstClient};
use common::pki::Credential;
use common::{enrolled, label, openssl_verify, record_issued, standard_config, Pki, TestServer};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};

const WEEK: u64 = 7 * 86_400;

fn csr(cn: &str, shape: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    shape(&mut params);
    params.serialize_request(&key).unwrap().der().to_vec()
}

async fn post(client: &EstClient, path: &str, body: Vec<u8>) -> Answer {
    client
        .request(
            "POST",
            path,
            &[("content-type", "application/pkcs10".to_owned())],
            iot_edge_body(&body),
        )
        .await
}

fn refused(answer: &Answer, status: u16, says: &[&str]) {
    assert_eq!(answer.status, status, "{}", answer.text());
    for phrase in says {
        assert!(
            answer.text().contains(phrase),
            "{phrase:?} in {}",
            answer.text()
        );
    }
}

/// A server with a grace window on the unlabeled path, which issued (on that path, by its
/// journal) the certificates `issued_earlier` makes with the PKI's issuing CA: expired ones,
/// which it cannot issue while the test runs.
async fn start(
    grace_secs: u64,
    issued_earlier: impl FnOnce(&Pki) -> Vec<Credential>,
) -> (tempfile::TempDir, Pki, TestServer, Vec<Credential>) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let earlier = issued_earlier(&pki);
    for credential in &earlier {
        record_issued(
            &dir.path().join("journal.jsonl"),
            &credential.cert_pem,
            None,
        );
    }
    let mut config = standard_config(&pki);
    label(&mut config, None).grace_expired_secs = grace_secs;
    let server = TestServer::start(dir.path(), &config).await;
    (dir, pki, server, earlier)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recently_expired_certificate_renews_itself_and_nothing_else() {
    let now = OffsetDateTime::now_utc();
    // A device certificate this server issued, expired yesterday.
    let (_dir, pki, server, earlier) = start(WEEK, |pki| {
        vec![pki
            .issuing
            .client_cert("dev-g", now - Duration::days(90), now - Duration::days(1))]
    })
    .await;
    let expired = &earlier[0];
    let as_expired = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&expired.cert_pem, &expired.key_pem)),
    );

    // Anything but itself is refused (403), each saying why.
    let other = post(&as_expired, "simpleenroll", csr("dev-other", |_| {})).await;
    refused(&other, 403, &["grace window", "subject \"CN=dev-other\""]);
    let with_san = post(
        &as_expired,
        "simpleenroll",
        csr("dev-g", |p| {
            p.subject_alt_names = vec![SanType::DnsName("dev-g.plant.local".try_into().unwrap())];
        }),
    )
    .await;
    refused(&with_san, 403, &["grace window", "subjectAltNames"]);
    let edge_ca = post(
        &as_expired,
        "simpleenroll",
        csr("aziot-edge CA dev-g", |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ];
        }),
    )
    .await;
    refused(&edge_ca, 403, &["grace window"]);
    assert_eq!(server.journal().len(), 1, "only the entry of its issuance");

    // Itself: renewed, by simpleenroll (as IoT Edge renews) and by simplereenroll.
    for operation in ["simpleenroll", "simplereenroll"] {
        let renewed = post(&as_expired, operation, csr("dev-g", |_| {})).await;
        assert_eq!(renewed.status, 200, "{operation}: {}", renewed.text());
        let leaf = certs_from_answer(&renewed.body).remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        assert_eq!(cert.subject().to_string(), "CN=dev-g");
        assert!(cert.validity().not_after.to_datetime() > now + Duration::days(300));
        let file = format!("renewed-{operation}.pem");
        std::fs::write(server.dir.join(&file), to_pem(&leaf)).unwrap();
        assert!(openssl_verify(
            &server.dir,
            "root.pem",
            "issuing-ca.pem",
            &file
        ));
    }
    let journal = &server.journal()[1..];
    assert_eq!(journal.len(), 2);
    assert!(journal.iter().all(|e| e.grace_renewal), "{journal:?}");
    assert!(journal.iter().all(|e| e.subject == "CN=dev-g"));

    // A certificate that has not expired renews without the mark.
    let valid = enrolled(&server, &pki.root.cert_pem, "dev-v").await;
    let as_valid = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&valid.cert_pem, &valid.key_pem)),
    );
    let renewed = post(&as_valid, "simpleenroll", csr("dev-v", |_| {})).await;
    assert_eq!(renewed.status, 200, "{}", renewed.text());
    assert!(!server.journal()[4].grace_renewal);
    let raw = std::fs::read_to_string(server.app.journal().path()).unwrap();
    assert_eq!(raw.matches("\"grace_renewal\":true").count(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_longer_than_the_window_or_without_one_is_refused() {
    let now = OffsetDateTime::now_utc();
    let (_dir, pki, server, earlier) = start(WEEK, |pki| {
        vec![
            pki.issuing.client_cert(
                "dev-old",
                now - Duration::days(120),
                now - Duration::days(30),
            ),
            pki.issuing
                .client_cert("dev-y", now - Duration::days(90), now - Duration::days(1)),
        ]
    })
    .await;
    let (long_ago, yesterday) = (&earlier[0], &earlier[1]);
    let as_long_ago = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&long_ago.cert_pem, &long_ago.key_pem)),
    );
    let answer = post(&as_long_ago, "simpleenroll", csr("dev-old", |_| {})).await;
    refused(
        &answer,
        401,
        &[
            "expired at",
            "longer ago than this label's grace window (604800 s)",
        ],
    );

    // Label `strict` has no window: yesterday's certificate is refused there.
    let as_yesterday = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&yesterday.cert_pem, &yesterday.key_pem)),
    );
    let answer = post(&as_yesterday, "strict/simpleenroll", csr("dev-y", |_| {})).await;
    refused(&answer, 401, &["client certificate rejected", "expired at"]);
    // A foreign certificate gets no grace whatever its dates.
    let foreign =
        pki.foreign
            .client_cert("dev-y", now - Duration::days(90), now - Duration::days(1));
    let as_foreign = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&foreign.cert_pem, &foreign.key_pem)),
    );
    let answer = post(&as_foreign, "simpleenroll", csr("dev-y", |_| {})).await;
    refused(&answer, 401, &["client certificate rejected"]);
    // Positive control: on the unlabeled path (window of a week) the same device renews.
    let answer = post(&as_yesterday, "simpleenroll", csr("dev-y", |_| {})).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        server.journal().len(),
        3,
        "the two issued earlier, and this renewal"
    );
    server.stop().await;
}

#[test]
fn the_window_is_off_by_default_and_needs_certificate_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    assert!(config.labels.iter().all(|l| l.grace_expired_secs == 0));
    let strict = label(&mut config, Some("strict"));
    strict.grace_expired_secs = WEEK;
    strict.authentication.certificate = false;
    strict.authentication.basic = true;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("labels[1].grace_expired_secs"), "{error}");
    label(&mut config, Some("strict"))
        .authentication
        .certificate = true;
    config.validate().unwrap();
    label(&mut config, None).grace_expired_secs = 400 * 86_400;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("labels[0].grace_expired_secs"), "{error}");
}

/// An RA's exemption from the identity limit is not carried by its certificate once it has
/// expired: in the grace window the RA renews itself like any device, under the identity
/// limit. Positive control: the same RA with a valid certificate is not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_ra_certificate_in_its_grace_window_is_not_exempt_from_the_identity_limit() {
    let now = OffsetDateTime::now_utc();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    // Two certificates of the RA this server issued: one expired yesterday, one valid.
    let expired =
        pki.issuing
            .client_cert("ra-1", now - Duration::days(90), now - Duration::days(1));
    let valid = pki
        .issuing
        .client_cert("ra-1", now - Duration::days(1), now + Duration::days(90));
    for credential in [&expired, &valid] {
        record_issued(
            &dir.path().join("journal.jsonl"),
            &credential.cert_pem,
            None,
        );
    }
    let mut config = standard_config(&pki);
    config.limits.rate_per_address = 0.0;
    config.limits.rate_per_identity = 0.1;
    config.limits.burst_per_identity = 1.0;
    let unlabeled = label(&mut config, None);
    unlabeled.grace_expired_secs = WEEK;
    let ra_rule = unlabeled
        .rules
        .iter_mut()
        .find(|r| r.matches == ["certificate:issuer"])
        .expect("the issuer rule");
    ra_rule.registration_authority = true;
    let server = TestServer::start(dir.path(), &config).await;
    let as_ = |c: &Credential| {
        EstClient::new(
            server.addr,
            &pki.root.cert_pem,
            Some((&c.cert_pem, &c.key_pem)),
        )
    };

    // Positive control: the RA with its valid certificate, three times over a burst of one.
    let as_valid = as_(&valid);
    for i in 0..3 {
        let answer = post(&as_valid, "simpleenroll", csr("ra-1", |_| {})).await;
        assert_eq!(answer.status, 200, "request {i}: {}", answer.text());
    }
    // The expired one: its grace renewal passes once, then the identity limit holds it.
    let as_expired = as_(&expired);
    let answer = post(&as_expired, "simpleenroll", csr("ra-1", |_| {})).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(server.journal().last().unwrap().grace_renewal);
    let answer = post(&as_expired, "simpleenroll", csr("ra-1", |_| {})).await;
    refused(&answer, 429, &["too many requests from this identity"]);
    server.stop().await;
}
