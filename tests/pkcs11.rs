//! Keys in a PKCS#11 token (SoftHSM2, tokens made at test time): issuance with a token-held
//! issuing CA key through the real TLS server, TLS with a token-held server key, every load
//! error with its message (the PIN never in it), re-login after the token forgot the login,
//! and keys that stay unexportable.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once per process: every test of this binary shares one token
//! directory and makes its own token in it.

mod common;

use std::path::{Path, PathBuf};

use common::softhsm::{module, SOFTHSM};
use common::{
    client, enrolled, openssl_verify, sh, standard_config, stderr, stdout, Pki, TestServer,
};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use edge_est::config::Config;
use edge_est::keys::{TokenKey, TokenKeyKind};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, PublicKeyData, SanType};

const USER_PIN: &str = "7731-user-pin";
const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const P521: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23];

/// A fresh token labelled `label`, user PIN [`USER_PIN`]; returns its slot.
fn new_token(label: &str) -> Slot {
    common::softhsm::new_token(label, USER_PIN)
}

/// A public key read from the token, for rcgen to put in a certificate.
struct TokenPublic {
    der: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl PublicKeyData for TokenPublic {
    fn der_bytes(&self) -> &[u8] {
        &self.der
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Ec(&'static [u8]),
    Rsa2048,
    Rsa1024,
}

/// Generates a key pair inside the token (sensitive, never extractable) labelled `object`,
/// and checks that the token says so of the private key: every token key of these tests was
/// made in its token (none imported) and cannot leave it.
fn generate(slot: Slot, object: &str, kind: Kind) -> TokenPublic {
    let public = generate_unchecked(slot, object, kind);
    assert_unexportable(slot, object);
    public
}

/// CKA_SENSITIVE, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE true, CKA_EXTRACTABLE false, as the
/// token reports them for the private key labelled `object`, read through cryptoki.
fn assert_unexportable(slot: Slot, object: &str) {
    let ctx = edge_est::keys::pkcs11::module(&module()).unwrap();
    let session = ctx.open_ro_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&AuthPin::from(USER_PIN)));
    let handles = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(object.as_bytes().to_vec()),
        ])
        .unwrap();
    assert_eq!(handles.len(), 1, "{object}");
    let attributes = session
        .get_attributes(
            handles[0],
            &[
                AttributeType::Sensitive,
                AttributeType::AlwaysSensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
            ],
        )
        .unwrap();
    let mut seen = 0;
    for attribute in attributes {
        match attribute {
            Attribute::Sensitive(v) | Attribute::AlwaysSensitive(v) => {
                assert!(v, "{object}: {attribute:?}")
            }
            Attribute::Extractable(v) => assert!(!v, "{object}: CKA_EXTRACTABLE true"),
            Attribute::NeverExtractable(v) => assert!(v, "{object}: CKA_NEVER_EXTRACTABLE false"),
            other => panic!("{object}: {other:?}"),
        }
        seen += 1;
    }
    assert_eq!(
        seen, 4,
        "{object}: the token did not report every attribute"
    );
}

fn generate_unchecked(slot: Slot, object: &str, kind: Kind) -> TokenPublic {
    let ctx = edge_est::keys::pkcs11::module(&module()).unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    match session.login(UserType::User, Some(&AuthPin::from(USER_PIN))) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("login: {e}"),
    }
    let label = Attribute::Label(object.as_bytes().to_vec());
    let private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        label.clone(),
        Attribute::Id(object.as_bytes().to_vec()),
    ];
    match kind {
        Kind::Ec(params) => {
            let public = vec![
                Attribute::Token(true),
                Attribute::Verify(true),
                Attribute::EcParams(params.to_vec()),
                label,
            ];
            let (public, _) = session
                .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
                .unwrap();
            let point = match &session
                .get_attributes(public, &[AttributeType::EcPoint])
                .unwrap()[0]
            {
                // An OCTET STRING around the uncompressed point.
                Attribute::EcPoint(p) => p[2..].to_vec(),
                other => panic!("{other:?}"),
            };
            let alg = if params == P384 {
                &rcgen::PKCS_ECDSA_P384_SHA384
            } else {
                &rcgen::PKCS_ECDSA_P256_SHA256
            };
            TokenPublic { der: point, alg }
        }
        Kind::Rsa2048 | Kind::Rsa1024 => {
            let bits: u64 = if matches!(kind, Kind::Rsa1024) {
                1024
            } else {
                2048
            };
            let public = vec![
                Attribute::Token(true),
                Attribute::Verify(true),
                Attribute::ModulusBits(bits.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                label,
            ];
            let (public, _) = session
                .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
                .unwrap();
            let modulus = match &session
                .get_attributes(public, &[AttributeType::Modulus])
                .unwrap()[0]
            {
                Attribute::Modulus(m) => m.clone(),
                other => panic!("{other:?}"),
            };
            TokenPublic {
                der: rsa_public_key(&modulus),
                alg: &rcgen::PKCS_RSA_SHA256,
            }
        }
    }
}

/// DER RSAPublicKey { modulus, 65537 }.
fn rsa_public_key(modulus: &[u8]) -> Vec<u8> {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match body.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n < 0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(body);
        out
    }
    let mut n = vec![0u8];
    n.extend_from_slice(modulus);
    let body = [tlv(0x02, &n), tlv(0x02, &[1, 0, 1])].concat();
    tlv(0x30, &body)
}

fn uri(token: &str, object: &str) -> String {
    format!("pkcs11:token={token};object={object}?pin-value={USER_PIN}")
}

/// The issuing CA of `pki` replaced by one whose key is `key` in a token (same name, signed
/// by the test root): issuing-ca.pem in `dir`.
fn token_issuing_ca(dir: &Path, pki: &Pki, key: &TokenPublic) -> String {
    let params = edge_est::pki::ca_params(
        "edge-est token issuing CA",
        Some(1),
        time::Duration::days(3650),
    );
    let cert = params.signed_by(key, &pki.root.issuer).unwrap();
    let chain = format!("{}{}", cert.pem(), pki.root.cert_pem);
    std::fs::write(dir.join("issuing-ca.pem"), &chain).unwrap();
    chain
}

/// A localhost server certificate for `key`, issued by the PKI's issuing CA: server.pem.
fn token_server_cert(dir: &Path, pki: &Pki, key: &TokenPublic) {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().unwrap()),
        SanType::IpAddress([127, 0, 0, 1].into()),
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(key, &pki.issuing.issuer).unwrap();
    std::fs::write(
        dir.join("server.pem"),
        format!("{}{}", cert.pem(), pki.issuing.cert_pem),
    )
    .unwrap();
}

fn with_token_issuer(pki: &Pki, key_uri: &str) -> Config {
    let mut config = standard_config(pki);
    config.issuers.get_mut("plant").unwrap().key = PathBuf::from(key_uri);
    config.pkcs11_module = Some(module());
    config
}

fn load_error(config: &Config, dir: &Path) -> String {
    match edge_est::runtime::Runtime::build(config, dir) {
        Ok(_) => panic!("the configuration loaded"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issuance_with_a_token_issuing_key_verifies_with_openssl() {
    for (name, kind) in [
        ("iss-p256", Kind::Ec(P256)),
        ("iss-p384", Kind::Ec(P384)),
        ("iss-rsa", Kind::Rsa2048),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate_p256(dir.path());
        let slot = new_token(name);
        let public = generate(slot, "issuing-ca", kind);
        token_issuing_ca(dir.path(), &pki, &public);
        let config = with_token_issuer(&pki, &uri(name, "issuing-ca"));
        let server = TestServer::start(dir.path(), &config).await;
        let issued = enrolled(&server, &pki.root.cert_pem, "device-1").await;
        std::fs::write(dir.path().join("leaf.pem"), &issued.cert_pem).unwrap();
        assert!(
            openssl_verify(dir.path(), "root.pem", "issuing-ca.pem", "leaf.pem"),
            "{name}: the chain does not verify"
        );
        // Negative control: the old (file) issuing CA does not vouch for the certificate.
        std::fs::write(dir.path().join("other-ca.pem"), &pki.issuing.cert_pem).unwrap();
        assert!(!openssl_verify(
            dir.path(),
            "root.pem",
            "other-ca.pem",
            "leaf.pem"
        ));
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enrollments_and_relogin_after_the_token_forgets() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let slot = new_token("pool");
    let public = generate(slot, "issuing-ca", Kind::Ec(P256));
    let chain = token_issuing_ca(dir.path(), &pki, &public);
    let key_uri = uri("pool", "issuing-ca");
    let server = TestServer::start(dir.path(), &with_token_issuer(&pki, &key_uri)).await;

    // The pool opens a second session while one is busy instead of waiting for it.
    let key = TokenKey::open(&key_uri, Some(&module()), &chain).unwrap();
    let token = key.token().clone();
    token
        .with_session(|_| token.with_session(|_| Ok(())))
        .unwrap();
    assert!(token.idle_sessions() >= 2, "{}", token.idle_sessions());

    let mut tasks = Vec::new();
    for i in 0..16 {
        let addr = server.addr;
        let root = pki.root.cert_pem.clone();
        tasks.push(tokio::spawn(async move {
            common::enrolled_at(addr, &root, &format!("device-{i}")).await
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    // The token forgets the login (what a reset does): the application is logged out of it.
    key.token().logout_for_test().unwrap();
    let ctx = edge_est::keys::pkcs11::module(&module()).unwrap();
    let probe = ctx.open_ro_session(slot).unwrap();
    let found = probe
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap();
    assert!(found.is_empty(), "still logged in: private objects visible");
    drop(probe);
    // The next enrollment logs in again and succeeds.
    let issued = enrolled(&server, &pki.root.cert_pem, "after-reset").await;
    std::fs::write(dir.path().join("leaf.pem"), &issued.cert_pem).unwrap();
    assert!(openssl_verify(
        dir.path(),
        "root.pem",
        "issuing-ca.pem",
        "leaf.pem"
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_token_server_key_curl_and_openssl_verify() {
    for (name, kind) in [("tls-rsa", Kind::Rsa2048), ("tls-p256", Kind::Ec(P256))] {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate_p256(dir.path());
        let slot = new_token(name);
        let public = generate(slot, "server", kind);
        token_server_cert(dir.path(), &pki, &public);
        let mut config = standard_config(&pki);
        config.tls.as_mut().unwrap().key = PathBuf::from(uri(name, "server"));
        config.pkcs11_module = Some(module());
        let server = TestServer::start(dir.path(), &config).await;

        let (status, body) = common::curl(&server, &[&server.url("cacerts")]);
        assert_eq!(status, 200, "{name}: {body}");
        // TLS 1.2 and 1.3 through openssl, the certificate verified against the test root;
        // for RSA, TLS 1.2 with PKCS#1 v1.5 too (TLS 1.3 signs with PSS).
        let mut runs = vec![("-tls1_3", ""), ("-tls1_2", "")];
        if matches!(kind, Kind::Rsa2048) {
            runs.push(("-tls1_2", "-sigalgs RSA+SHA256"));
        }
        for (version, sigalgs) in runs {
            let out = sh(
                &format!(
                    "echo | openssl s_client {version} {sigalgs} -connect 127.0.0.1:{} \
                     -servername localhost -verify_hostname localhost -CAfile root.pem \
                     -verify_return_error 2>&1",
                    server.addr.port()
                ),
                dir.path(),
            );
            let text = stdout(&out);
            assert!(
                out.status.success() && text.contains("Verify return code: 0 (ok)"),
                "{name} {version} {sigalgs}: {text}{}",
                stderr(&out)
            );
        }
        server.stop().await;
    }
}

#[test]
fn every_load_error_names_the_uri_and_never_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let slot = new_token("errors");
    let public = generate(slot, "issuing-ca", Kind::Ec(P256));
    generate(slot, "other-p256", Kind::Ec(P256));
    generate(slot, "a-p384", Kind::Ec(P384));
    generate(slot, "a-p521", Kind::Ec(P521));
    generate(slot, "a-rsa1024", Kind::Rsa1024);
    token_issuing_ca(dir.path(), &pki, &public);
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, format!("{USER_PIN}\n")).unwrap();

    let serial = {
        let ctx = edge_est::keys::pkcs11::module(&module()).unwrap();
        ctx.get_token_info(slot).unwrap().serial_number().to_owned()
    };
    // Positive controls: the key by label, by id, with the PIN from a file, by slot-id, by
    // serial, with the module in the URI.
    for good in [
        format!("pkcs11:serial={serial};object=issuing-ca?pin-value={USER_PIN}"),
        format!(
            "pkcs11:token=errors;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;\
             object=issuing-ca?pin-value={USER_PIN}"
        ),
        uri("errors", "issuing-ca"),
        format!("pkcs11:token=errors;id=issuing-ca?pin-value={USER_PIN}"),
        format!(
            "pkcs11:token=errors;object=issuing-ca?pin-source=file:{}",
            pin_file.display()
        ),
        format!(
            "pkcs11:slot-id={};object=issuing-ca?pin-value={USER_PIN}",
            slot.id()
        ),
    ] {
        edge_est::runtime::Runtime::build(&with_token_issuer(&pki, &good), dir.path())
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }

    // module-path= in the URI wins over pkcs11_module.
    let mut config = with_token_issuer(
        &pki,
        &format!(
            "pkcs11:token=errors;object=issuing-ca?pin-value={USER_PIN}&module-path={SOFTHSM}"
        ),
    );
    config.pkcs11_module = Some(PathBuf::from("/nonexistent/libpkcs11.so"));
    edge_est::runtime::Runtime::build(&config, dir.path()).unwrap();

    let cases: Vec<(Config, &str)> = vec![
        (
            with_token_issuer(
                &pki,
                &format!("pkcs11:token=errors;model=Other;object=issuing-ca?pin-value={USER_PIN}"),
            ),
            "no such token",
        ),
        (
            {
                let mut c = with_token_issuer(&pki, &uri("errors", "issuing-ca"));
                c.pkcs11_module = Some(PathBuf::from("/nonexistent/libpkcs11.so"));
                c
            },
            "PKCS#11 module /nonexistent/libpkcs11.so cannot be loaded",
        ),
        (
            {
                let mut c = with_token_issuer(&pki, &uri("errors", "issuing-ca"));
                c.pkcs11_module = None;
                c
            },
            "no PKCS#11 module",
        ),
        (
            with_token_issuer(&pki, &uri("no-such-token", "issuing-ca")),
            "no such token",
        ),
        (
            with_token_issuer(
                &pki,
                "pkcs11:token=errors;object=issuing-ca?pin-value=wrong-4242",
            ),
            "wrong PIN",
        ),
        (
            with_token_issuer(&pki, &uri("errors", "no-such-key")),
            "no private key with this object=/id=",
        ),
        (
            with_token_issuer(&pki, &uri("errors", "a-p521")),
            "key type unsupported: an EC key on a curve other than P-256 and P-384",
        ),
        (
            with_token_issuer(&pki, &uri("errors", "a-rsa1024")),
            "key type unsupported: an RSA key of 1024 bits (at least 2048)",
        ),
        (
            with_token_issuer(&pki, &uri("errors", "other-p256")),
            "does not belong to the certificate (a test signature does not verify",
        ),
        (
            with_token_issuer(&pki, &uri("errors", "a-p384")),
            "does not belong to the certificate (the token holds an EC P-384 key, the \
             certificate's key is an EC P-256 key)",
        ),
    ];
    for (config, expected) in cases {
        let err = load_error(&config, dir.path());
        assert!(
            err.starts_with("issuers.plant.key: ") && err.contains(expected),
            "expected {expected:?}: {err}"
        );
        assert!(
            !err.contains(USER_PIN) && !err.contains("wrong-4242"),
            "PIN shows: {err}"
        );
        if !expected.starts_with("PKCS#11 module") {
            assert!(err.contains("pin-value=(redacted)"), "{err}");
        }
    }
    // After a wrong PIN, the right one still works (the token was not left logged out).
    edge_est::runtime::Runtime::build(
        &with_token_issuer(&pki, &uri("errors", "issuing-ca")),
        dir.path(),
    )
    .unwrap();

    // The TLS key and an upstream credential: same messages under their own fields.
    let mut config = standard_config(&pki);
    config.tls.as_mut().unwrap().key = PathBuf::from(uri("errors", "no-such-key"));
    config.pkcs11_module = Some(module());
    let err = load_error(&config, dir.path());
    assert!(
        err.starts_with("tls.key: ") && err.contains("no private key"),
        "{err}"
    );
    assert!(!err.contains(USER_PIN), "{err}");

    // The upstream RA key: same messages under its own field, never read as a file (whose
    // error would print the path, PIN and all).
    let mut config = with_token_issuer(&pki, &uri("errors", "issuing-ca"));
    config.upstreams.insert(
        "parent".into(),
        serde_json::from_value(serde_json::json!({
            "url": "https://127.0.0.1:1/.well-known/est",
            "trust": ["root.pem"],
            "certificate": "issuing-ca.pem",
            "key": "pkcs11:token=errors;object=issuing-ca?pin-value=wrong-4242",
        }))
        .unwrap(),
    );
    let err = load_error(&config, dir.path());
    assert!(
        err.starts_with("upstreams.parent.key: ") && err.contains("wrong PIN"),
        "{err}"
    );
    assert!(
        !err.contains("wrong-4242") && err.contains("pin-value=(redacted)"),
        "{err}"
    );
    config.upstreams.get_mut("parent").unwrap().key =
        Some(PathBuf::from(uri("errors", "other-p256")));
    let err = load_error(&config, dir.path());
    assert!(
        err.starts_with("upstreams.parent.key: ") && err.contains("does not belong"),
        "{err}"
    );
    assert!(!err.contains(USER_PIN), "{err}");
    // Positive controls: the same upstream with the right token key, and with a key file.
    config.upstreams.get_mut("parent").unwrap().key =
        Some(PathBuf::from(uri("errors", "issuing-ca")));
    edge_est::runtime::Runtime::build(&config, dir.path()).unwrap();
    let upstream = config.upstreams.get_mut("parent").unwrap();
    upstream.certificate = Some(edge_est::config::PemSource("server.pem".into()));
    upstream.key = Some(PathBuf::from("server.key"));
    edge_est::runtime::Runtime::build(&config, dir.path()).unwrap();
}

#[test]
fn iot_edge_lib_path_names_the_module() {
    let config: Config = toml::from_str(
        r#"
lib_path = "/usr/lib/softhsm/libsofthsm2.so"
labels = []
"#,
    )
    .unwrap();
    assert_eq!(config.pkcs11_module, Some(PathBuf::from(SOFTHSM)));
}

#[test]
fn token_keys_stay_unexportable() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let slot = new_token("sealed");
    let public = generate(slot, "issuing-ca", Kind::Ec(P256));
    let chain = token_issuing_ca(dir.path(), &pki, &public);
    let key = TokenKey::open(&uri("sealed", "issuing-ca"), Some(&module()), &chain).unwrap();
    assert_eq!(key.kind(), TokenKeyKind::EcP256);
    assert_eq!(key.protection().unwrap(), (Some(true), Some(false)));

    // Asking the token for the private value is refused.
    let ctx = edge_est::keys::pkcs11::module(&module()).unwrap();
    let session = ctx.open_ro_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&AuthPin::from(USER_PIN)));
    let handle = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"issuing-ca".to_vec()),
        ])
        .unwrap()[0];
    match session.get_attributes(handle, &[AttributeType::Value]) {
        Ok(values) => assert!(
            !values.iter().any(|a| matches!(a, Attribute::Value(_))),
            "the private value came out"
        ),
        Err(e) => assert!(e.to_string().contains("ensitive"), "{e}"),
    }
    // The configuration with this key loads (it is used through the token, by handle).
    let runtime = edge_est::runtime::Runtime::build(
        &with_token_issuer(&pki, &uri("sealed", "issuing-ca")),
        dir.path(),
    )
    .unwrap();
    drop(runtime);
}

#[tokio::test]
async fn cacerts_is_served_by_a_token_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let slot = new_token("cacerts");
    let public = generate(slot, "issuing-ca", Kind::Ec(P256));
    token_issuing_ca(dir.path(), &pki, &public);
    let server = TestServer::start(
        dir.path(),
        &with_token_issuer(&pki, &uri("cacerts", "issuing-ca")),
    )
    .await;
    let answer = client::EstClient::new(server.addr, &pki.root.cert_pem, None)
        .request("GET", "cacerts", &[], Vec::new())
        .await;
    assert_eq!(answer.status, 200);
    server.stop().await;
}

/// An RA credential for the token key `key`: CN `cn`, clientAuth + id-kp-cmcRA, signed by `ca`.
fn token_ra_cert(
    key: &TokenPublic,
    cn: &str,
    ca: &rcgen::Issuer<'static, rcgen::KeyPair>,
) -> String {
    let cmc_ra = ExtendedKeyUsagePurpose::Other(vec![1, 3, 6, 1, 5, 5, 7, 3, 28]);
    edge_est::pki::leaf_params(
        cn,
        vec![ExtendedKeyUsagePurpose::ClientAuth, cmc_ra],
        time::Duration::days(365),
    )
    .signed_by(key, ca)
    .unwrap()
    .pem()
}

fn new_ca(cn: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = edge_est::pki::ca_params(cn, Some(0), time::Duration::days(3650));
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(params, key))
}

/// A child's enrollment at `layer` (Basic auth), the answer as the layer gives it.
async fn child_enrolls(layer: &edge_est::demo::Layer, root_pem: &str, cn: &str) -> client::Answer {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    client::EstClient::new(layer.addr, root_pem, None)
        .request(
            "POST",
            "simpleenroll",
            &[
                ("content-type", "application/pkcs10".to_owned()),
                client::basic(edge_est::demo::CHILD_USER, edge_est::demo::CHILD_PASSWORD),
            ],
            client::iot_edge_body(&csr),
        )
        .await
}

/// Two real layers on loopback: the bottom forwards with its RA key in a token (EC P-256 and
/// RSA 2048: TLS 1.3 client signatures with ECDSA and RSA-PSS made by the token) and the top
/// accepts it. An RA certificate from a CA the top does not trust, with its key in the same
/// token, is refused by the top (attacker), everything else the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_ra_key_in_a_token_forwards_to_the_layer_above() {
    use edge_est::demo::{self, Layer};
    let any: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    for (name, kind) in [("ra-p256", Kind::Ec(P256)), ("ra-rsa", Kind::Rsa2048)] {
        let dir = tempfile::tempdir().unwrap();
        demo::write_pki(dir.path()).unwrap();
        let root_pem = std::fs::read_to_string(dir.path().join("root.pem")).unwrap();
        let slot = new_token(name);
        let ra_public = generate(slot, "ra", kind);
        let rogue_public = generate(slot, "rogue", kind);
        // The top trusts the demo's RA CA and ours; not the rogue CA.
        let (ra_ca_pem, ra_ca) = new_ca("token RA credentials CA");
        let (_, rogue_ca) = new_ca("rogue RA CA");
        let trusted = std::fs::read_to_string(dir.path().join("ra-ca.pem")).unwrap();
        std::fs::write(
            dir.path().join("ra-ca.pem"),
            format!("{trusted}{ra_ca_pem}"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("token-ra.pem"),
            token_ra_cert(&ra_public, "layer2-ra", &ra_ca),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("rogue-ra.pem"),
            token_ra_cert(&rogue_public, "layer2-ra", &rogue_ca),
        )
        .unwrap();

        let top = Layer::start("top", dir.path(), &demo::top_config(), any)
            .await
            .unwrap();
        let bottom_config = |certificate: &str, object: &str| {
            let mut config = demo::forward_config("bottom", top.addr.port(), "layer2-ra", None);
            let parent = config.upstreams.get_mut("parent").unwrap();
            parent.certificate = Some(edge_est::config::PemSource(certificate.into()));
            parent.key = Some(PathBuf::from(uri(name, object)));
            config.pkcs11_module = Some(module());
            config
        };
        let bottom = Layer::start(
            "bottom",
            dir.path(),
            &bottom_config("token-ra.pem", "ra"),
            any,
        )
        .await
        .unwrap();
        let answer = child_enrolls(&bottom, &root_pem, "child-1").await;
        assert_eq!(answer.status, 200, "{name}: {}", answer.text());
        let leaf = client::certs_from_answer(&answer.body).remove(0);
        std::fs::write(dir.path().join("leaf.pem"), client::to_pem(&leaf)).unwrap();
        assert!(openssl_verify(
            dir.path(),
            "root.pem",
            "top-ca.pem",
            "leaf.pem"
        ));
        // The top signed it for the RA whose key is in the token.
        let top_journal = edge_est::journal::Journal::read_all(top.app.journal().path()).unwrap();
        assert_eq!(top_journal.len(), 1, "{top_journal:?}");
        assert_eq!(
            top_journal[0].identity,
            "certificate \"CN=layer2-ra\" (ras)"
        );
        assert!(
            top_journal[0].subject.contains("child-1"),
            "{top_journal:?}"
        );
        bottom.stop().await;

        // Attacker-shaped: same name, key in the token, certificate from a CA the top does
        // not trust. The configuration loads (the key is the certificate's); the top refuses.
        let rogue = Layer::start(
            "rogue",
            dir.path(),
            &bottom_config("rogue-ra.pem", "rogue"),
            any,
        )
        .await
        .unwrap();
        let answer = child_enrolls(&rogue, &root_pem, "child-2").await;
        assert_ne!(answer.status, 200, "{name}: the top accepted a rogue RA");
        assert!(
            answer
                .text()
                .contains("does not accept this layer's RA credentials"),
            "{name}: {}",
            answer.text()
        );
        assert!(
            !answer.text().contains(USER_PIN),
            "{name}: {}",
            answer.text()
        );
        let top_journal = edge_est::journal::Journal::read_all(top.app.journal().path()).unwrap();
        assert_eq!(top_journal.len(), 1, "{top_journal:?}");
        rogue.stop().await;
        top.stop().await;
    }
}

/// `edge-est check-config` opens token keys in every field that takes one (issuers.*.key,
/// tls.key, upstreams.*.key) and reports a token's refusal under the field, PIN redacted.
#[test]
fn check_config_reports_token_errors_without_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    edge_est::demo::write_pki(dir.path()).unwrap();
    let slot = new_token("check");
    let ra_public = generate(slot, "ra", Kind::Ec(P256));
    let (_, ra_ca) = new_ca("check RA CA");
    std::fs::write(
        dir.path().join("token-ra.pem"),
        token_ra_cert(&ra_public, "layer2-ra", &ra_ca),
    )
    .unwrap();
    edge_est::demo::write_configs(dir.path(), 18400).unwrap();
    let top = std::fs::read_to_string(dir.path().join("top.toml")).unwrap();
    let bottom = std::fs::read_to_string(dir.path().join("bottom.toml")).unwrap();
    let with_module = |text: &str| {
        text.replacen(
            "journal = ",
            &format!("pkcs11_module = \"{}\"\njournal = ", module().display()),
            1,
        )
    };
    let check = |name: &str, text: String| {
        std::fs::write(dir.path().join(name), text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-est"))
            .args(["check-config", name])
            .current_dir(dir.path())
            .output()
            .unwrap();
        (out.status.success(), stdout(&out), stderr(&out))
    };
    let wrong = "pkcs11:token=check;object=ra?pin-value=wrong-4242";
    let cases = [
        (
            "issuer.toml",
            top.replace("key = \"top-ca.key\"", &format!("key = \"{wrong}\"")),
            "issuers.top.key: ",
            "wrong PIN",
        ),
        (
            "tls.toml",
            top.replace(
                "key = \"server.key\"",
                &format!("key = \"{}\"", uri("check", "no-such-key")),
            ),
            "tls.key: ",
            "no private key with this object=/id=",
        ),
        (
            "tls-pin.toml",
            top.replace("key = \"server.key\"", &format!("key = \"{wrong}\"")),
            "tls.key: ",
            "wrong PIN",
        ),
        (
            "tls-mismatch.toml",
            top.replace(
                "key = \"server.key\"",
                &format!("key = \"{}\"", uri("check", "ra")),
            ),
            "tls.key: ",
            "does not belong to the certificate",
        ),
        (
            "upstream.toml",
            bottom
                .replace(
                    "certificate = \"layer3-ra.pem\"",
                    "certificate = \"token-ra.pem\"",
                )
                .replace("key = \"layer3-ra.key\"", &format!("key = \"{wrong}\"")),
            "upstreams.parent.key: ",
            "wrong PIN",
        ),
        (
            "mismatch.toml",
            bottom.replace(
                "key = \"layer3-ra.key\"",
                &format!("key = \"{}\"", uri("check", "ra")),
            ),
            "upstreams.parent.key: ",
            "does not belong to the certificate",
        ),
    ];
    for (name, text, field, expected) in cases {
        let (ok, out, err) = check(name, with_module(&text));
        assert!(!ok, "{name}: {out}");
        assert!(
            err.contains(&format!("{name}: {field}")) && err.contains(expected),
            "{name}: {err}"
        );
        assert!(err.contains("pin-value=(redacted)"), "{name}: {err}");
        assert!(
            !err.contains("wrong-4242") && !err.contains(USER_PIN),
            "{name}: PIN shows: {err}"
        );
    }
    // Positive control: the upstream RA key in the token, with its certificate.
    let good = bottom
        .replace(
            "certificate = \"layer3-ra.pem\"",
            "certificate = \"token-ra.pem\"",
        )
        .replace(
            "key = \"layer3-ra.key\"",
            &format!("key = \"{}\"", uri("check", "ra")),
        );
    let (ok, out, err) = check("good.toml", with_module(&good));
    assert!(ok && out.contains("configuration is valid"), "{out}{err}");
}
