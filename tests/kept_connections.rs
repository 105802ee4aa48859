//! A client certificate verified on a kept-alive connection is not verified again for every
//! request (a lower layer's pooled RA connection sends many), but the remembered verification
//! never outlives what it depended on: the label's configuration, and the validity of every
//! certificate on the path. Each refusal here comes after a success on the same connection.

mod common;

use ::time::{Duration, OffsetDateTime};
use common::client::{iot_edge_body, Answer, EstClient};
use common::pki::TestCa;
use common::{csr, standard_config, start_standard, TestServer};
use edge_est::runtime::Runtime;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use rcgen::KeyPair;

async fn enroll(
    connection: &mut SendRequest<Full<Bytes>>,
    server: &TestServer,
    cn: &str,
) -> Answer {
    EstClient::send(
        connection,
        server.addr,
        "POST",
        "simpleenroll",
        &[("content-type", "application/pkcs10".to_owned())],
        iot_edge_body(&csr(cn)),
    )
    .await
}

fn refused_as(answer: &Answer, says: &str) {
    assert_eq!(answer.status, 401, "{}", answer.text());
    assert!(
        answer.text().contains(says),
        "{says:?} in {}",
        answer.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_swap_makes_a_kept_connection_verify_again() {
    let (dir, pki, server) = start_standard().await;
    let device = pki.bootstrap.valid_client("dev-kept");
    let client = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&device.cert_pem, &device.key_pem)),
    );
    let mut connection = client.connect().await;
    for _ in 0..3 {
        let answer = enroll(&mut connection, &server, "dev-kept").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    // The bootstrap trust set now holds another CA: the device's issuer is no longer in it.
    let mut config = standard_config(&pki);
    config.trust.get_mut("bootstrap").unwrap().certificates =
        vec![edge_est::config::PemSource("foreign-ca.pem".to_owned())];
    server
        .app
        .swap(Runtime::build(&config, dir.path()).unwrap());
    refused_as(
        &enroll(&mut connection, &server, "dev-kept").await,
        "not issued by a CA this label trusts",
    );
    // The swap back makes the same connection welcome again.
    server
        .app
        .swap(Runtime::build(&standard_config(&pki), dir.path()).unwrap());
    let answer = enroll(&mut connection, &server, "dev-kept").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let issued = server
        .journal()
        .iter()
        .filter(|e| e.subject == "CN=dev-kept")
        .count();
    assert_eq!(issued, 4);
}

/// Connects with `chain` (leaf first), enrolls once (allowed), waits until `expires_at` has
/// passed, and enrolls again on the same connection.
async fn before_and_after(
    server: &TestServer,
    root_pem: &str,
    chain_pem: &str,
    key_pem: &str,
    expires_at: OffsetDateTime,
) -> (Answer, Answer) {
    let client = EstClient::new(server.addr, root_pem, Some((chain_pem, key_pem)));
    let mut connection = client.connect().await;
    let before = enroll(&mut connection, server, "dev-short").await;
    let wait = expires_at - OffsetDateTime::now_utc() + Duration::milliseconds(1500);
    tokio::time::sleep(wait.try_into().unwrap_or_default()).await;
    let after = enroll(&mut connection, server, "dev-short").await;
    (before, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_is_refused_once_its_certificate_has_expired() {
    let (_dir, pki, server) = start_standard().await;
    let now = OffsetDateTime::now_utc();
    let expires_at = now + Duration::seconds(3);
    let device = pki
        .bootstrap
        .client_cert("dev-short", now - Duration::hours(1), expires_at);
    let (before, after) = before_and_after(
        &server,
        &pki.root.cert_pem,
        &device.cert_pem,
        &device.key_pem,
        expires_at,
    )
    .await;
    assert_eq!(before.status, 200, "{}", before.text());
    refused_as(&after, "expired at");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_is_refused_once_an_intermediate_on_its_path_has_expired() {
    // Bootstrap certificates from CAs below the anchor: a set of depth "any".
    let dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::generate_p256(dir.path());
    let mut config = common::standard_config(&pki);
    config.trust.get_mut("bootstrap").unwrap().depth = edge_est::auth::Depth::Any;
    let server = common::TestServer::start(dir.path(), &config).await;
    // The leaf is valid for a year, the CA between it and the bootstrap anchor for seconds.
    let now = OffsetDateTime::now_utc();
    let expires_at = now + Duration::seconds(3);
    let key = KeyPair::generate().unwrap();
    let mut params = edge_est::pki::ca_params("short-lived line CA", None, Duration::hours(1));
    params.not_after = expires_at;
    let intermediate_pem = params.signed_by(&key, &pki.bootstrap.issuer).unwrap().pem();
    let line = TestCa {
        cert_pem: intermediate_pem.clone(),
        issuer: rcgen::Issuer::new(params, key),
    };
    let device = line.valid_client("dev-short");
    let chain = format!("{}{}", device.cert_pem, intermediate_pem);
    let (before, after) = before_and_after(
        &server,
        &pki.root.cert_pem,
        &chain,
        &device.key_pem,
        expires_at,
    )
    .await;
    assert_eq!(before.status, 200, "{}", before.text());
    refused_as(&after, "expired at");
}
