//! `/serverkeygen` with RSA keys costs the server tens of milliseconds of CPU a key: each
//! identity has one key budget (`keygen_per_identity`, an RSA key counting as ten; by default
//! an RSA key a second, five at once), past which it gets 429 with `Retry-After` before any
//! key is made. Positive controls: another identity still gets
//! its key, and the same identity still enrolls with its own CSR.

mod common;

use common::client::{basic, iot_edge_body, EstClient};
use common::{csr, label, standard_config, Pki, TestServer, PASSWORD, USER};
use edge_est::config::ServerKeygen;

#[tokio::test]
async fn rsa_keys_past_the_identity_budget_are_refused_with_429() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    // A budget of 20 at a trickle: two RSA keys (10 each), then none.
    config.limits.keygen_per_identity = 0.01;
    config.limits.keygen_burst_per_identity = 20.0;
    config
        .users
        .insert("second".into(), pki.password_hash.clone());
    let default = label(&mut config, None);
    default.serverkeygen = ServerKeygen::Rsa2048;
    default.rules[0].matches.push("user:second".into());
    let server = TestServer::start(dir.path(), &config).await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);
    let post = |op: &'static str, user: &'static str, cn: &'static str| {
        let client = client.clone();
        async move {
            client
                .request(
                    "POST",
                    op,
                    &[
                        basic(user, PASSWORD),
                        ("content-type", "application/pkcs10".into()),
                    ],
                    iot_edge_body(&csr(cn)),
                )
                .await
        }
    };

    for i in 0..2 {
        let answer = post("serverkeygen", USER, "rsa-dev").await;
        assert_eq!(answer.status, 200, "key {i}: {}", answer.text());
        assert!(answer
            .header("content-type")
            .unwrap()
            .starts_with("multipart/mixed"));
    }
    let refused = post("serverkeygen", USER, "rsa-dev").await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(
        refused
            .text()
            .starts_with("too many server-generated keys for this identity: retry after"),
        "{}",
        refused.text()
    );
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after > 60, "{retry_after}");
    assert_eq!(
        server.journal().len(),
        2,
        "no certificate for the refused key"
    );

    // Positive controls: the same identity with its own key, and another identity's RSA key.
    let own = post("simpleenroll", USER, "rsa-dev").await;
    assert_eq!(own.status, 200, "{}", own.text());
    let other = post("serverkeygen", "second", "rsa-dev-2").await;
    assert_eq!(other.status, 200, "{}", other.text());
    assert_eq!(server.journal().len(), 4);
    server.stop().await;
}
