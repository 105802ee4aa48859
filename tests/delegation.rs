//! Delegated intermediates (issue 16): the upper layer's `sub_ca` rule grants a lower layer's
//! RA (`module:DEVICE/MODULE`) an issuing CA within bounds (pathlen, validity, name
//! constraints), and refuses anything beyond them. Each attacker probe has its positive
//! control; what the sub-CA mints is checked with `openssl verify` against the root.

mod common;

use std::path::Path;

use ::time::{Duration, OffsetDateTime};
use common::client::{basic, certs_from_answer, iot_edge_body, to_pem, Answer, EstClient};
use common::pki::Credential;
use common::{openssl_verify, Pki, TestServer, PASSWORD, USER};
use edge_est::config::Config;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use x509_parser::prelude::*;

// ---- helpers ------------------------------------------------------------------------------

fn csr(cn: &str, key: &KeyPair, shape: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    shape(&mut params);
    params.serialize_request(key).unwrap().der().to_vec()
}

/// A CA request: CA:TRUE with `path_len` (None: no pathlen asked), keyCertSign.
fn ca_csr(cn: &str, key: &KeyPair, path_len: Option<u8>) -> Vec<u8> {
    csr(cn, key, |p| {
        p.is_ca = IsCa::Ca(match path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    })
}

async fn post(client: &EstClient, path: &str, auth: &[(&str, String)], body: Vec<u8>) -> Answer {
    let mut headers = vec![("content-type", "application/pkcs10".to_owned())];
    headers.extend(auth.iter().cloned());
    client
        .request("POST", path, &headers, iot_edge_body(&body))
        .await
}

fn leaf_of(answer: &Answer) -> Vec<u8> {
    assert_eq!(answer.status, 200, "{}", answer.text());
    certs_from_answer(&answer.body).remove(0)
}

fn refused(answer: &Answer, status: u16, says: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert!(
        answer.text().contains(says),
        "{says:?} in {}",
        answer.text()
    );
}

fn as_holder(addr: std::net::SocketAddr, root: &str, who: &Credential) -> EstClient {
    EstClient::new(addr, root, Some((&who.cert_pem, &who.key_pem)))
}

/// A CA obtained over EST, with its key: mints what is signed below it.
struct HeldCa {
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl HeldCa {
    fn new(der: Vec<u8>, key: KeyPair) -> HeldCa {
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).unwrap();
        HeldCa { der, issuer }
    }

    /// A certificate signed by this CA: CN `cn`, `shape` adds names. The chain (leaf, this CA)
    /// and the key.
    fn mint(&self, cn: &str, shape: impl FnOnce(&mut CertificateParams)) -> Credential {
        let key = KeyPair::generate().unwrap();
        let mut params = edge_est::pki::leaf_params(
            cn,
            vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
            Duration::days(1),
        );
        shape(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Credential {
            cert_pem: format!("{}{}", cert.pem(), to_pem(&self.der)),
            key_pem: key.serialize_pem(),
        }
    }
}

fn config_text(pki: &Pki, body: &str) -> Config {
    let text = format!(
        r#"
journal = "journal.jsonl"
[tls]
certificate = "server.pem"
key = "server.key"
[users]
estuser = "{hash}"
[issuers.plant]
certificate = "issuing-ca.pem"
key = "issuing-ca.key"
{body}
"#,
        hash = pki.password_hash
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The top layer's label: devices enroll with Basic, get their Edge CA in their own name, and
/// module `edgeest` of gw-mid is the middle layer's RA with a sub-CA allowance (`sub_ca`).
fn top_rules(sub_ca: &str) -> String {
    format!(
        r#"
[[labels]]
issuer = "plant"
client_trust = ["issuer"]
[[labels.rules]]
match = ["user:estuser"]
common_names = ["gw-*"]
[[labels.rules]]
match = ["certificate:issuer"]
common_names = ["{{cn}}"]
ca_common_names = ["aziot-edge CA {{cn}}"]
[[labels.rules]]
match = ["module:gw-mid/edgeest"]
registration_authority = true
common_names = ["l3-*"]
ca_common_names = ["aziot-edge CA l3-*"]
dns_names = ["*.l3.plant.local", "gw-mid.plant.local"]
[labels.rules.sub_ca]
{sub_ca}
"#
    )
}

/// Enrolls device `device` with Basic, obtains its Edge CA with that certificate, and mints
/// its `edgeest` module's certificate below it: the RA credential of a lower layer.
async fn module_of(addr: std::net::SocketAddr, root: &str, device: &str) -> Credential {
    let anonymous = EstClient::new(addr, root, None);
    let key = KeyPair::generate().unwrap();
    let cert = leaf_of(
        &post(
            &anonymous,
            "simpleenroll",
            &[basic(USER, PASSWORD)],
            csr(device, &key, |_| {}),
        )
        .await,
    );
    let device_cred = Credential {
        cert_pem: to_pem(&cert),
        key_pem: key.serialize_pem(),
    };
    let key = KeyPair::generate().unwrap();
    let edge_ca = leaf_of(
        &post(
            &as_holder(addr, root, &device_cred),
            "simpleenroll",
            &[],
            ca_csr(&format!("aziot-edge CA {device}"), &key, Some(0)),
        )
        .await,
    );
    HeldCa::new(edge_ca, key).mint("edgeest", |_| {})
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).unwrap();
    name.to_owned()
}

/// `openssl verify` of a chain (leaf first) against root.pem, the issuing CA given as
/// untrusted along with the chain's CAs.
fn verifies(dir: &Path, name: &str, chain_pem: &str, issuing_pem: &str) -> bool {
    let certs: Vec<&str> = chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .collect();
    let leaf = write(dir, &format!("{name}.pem"), certs[0]);
    let untrusted = write(
        dir,
        &format!("{name}-chain.pem"),
        &format!("{}{issuing_pem}", certs[1..].concat()),
    );
    openssl_verify(dir, "root.pem", &untrusted, &leaf)
}

// ---- 1. the upper layer grants a bounded sub-CA to its RA only ----------------------------

/// gw-mid's RA obtains its sub-CA: CA:TRUE with the granted pathlen, keyCertSign and cRLSign,
/// validity within the rule's maximum, name constraints from the rule's dns_names, journaled
/// as `sub-ca`. What it mints inside its subtree verifies with openssl against the root; a
/// name outside, or an IP address, does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ra_gets_a_name_constrained_sub_ca_and_what_it_mints_outside_fails() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let pki = Pki::generate_p256(dir);
    let root = pki.root.cert_pem.clone();
    let config = config_text(
        &pki,
        &top_rules(
            r#"common_names = ["L3 issuing CA gw-mid"]
max_path_len = 0
max_validity_days = 7"#,
        ),
    );
    let server = TestServer::start(dir, &config).await;
    let ra = module_of(server.addr, &root, "gw-mid").await;

    let key = KeyPair::generate().unwrap();
    let der = leaf_of(
        &post(
            &as_holder(server.addr, &root, &ra),
            "simpleenroll",
            &[],
            ca_csr("L3 issuing CA gw-mid", &key, None),
        )
        .await,
    );
    {
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let lifetime = cert.validity().not_after.to_datetime() - OffsetDateTime::now_utc();
        assert!(lifetime <= Duration::days(7), "{lifetime}");
        assert!(lifetime > Duration::days(6), "{lifetime}");
        let nc = cert.name_constraints().unwrap().unwrap().value;
        let permitted: Vec<String> = nc
            .permitted_subtrees
            .as_ref()
            .unwrap()
            .iter()
            .map(|s| format!("{}", s.base))
            .collect();
        assert_eq!(
            permitted,
            ["DNSName(.l3.plant.local)", "DNSName(gw-mid.plant.local)"]
        );
        assert_eq!(nc.excluded_subtrees.as_ref().unwrap().len(), 2, "IPs");
    }
    let journal = server.journal();
    let entry = journal.last().unwrap();
    assert_eq!(entry.profile, "sub-ca");
    assert!(entry.identity.contains("edgeest"), "{}", entry.identity);

    let sub = HeldCa::new(der, key);
    let issuing = pki.issuing.cert_pem.clone();
    let dns = |name: &str| {
        let name = name.to_owned();
        move |p: &mut CertificateParams| {
            p.subject_alt_names = vec![SanType::DnsName(name.as_str().try_into().unwrap())];
        }
    };
    // Positive controls: names inside the subtree.
    let inside = sub.mint("l3-dev-01", dns("dev-01.l3.plant.local"));
    assert!(verifies(dir, "inside", &inside.cert_pem, &issuing));
    let deeper = sub.mint("l3-dev-02", dns("a.b.l3.plant.local"));
    assert!(verifies(dir, "deeper", &deeper.cert_pem, &issuing));
    let exact = sub.mint("gw-mid", dns("gw-mid.plant.local"));
    assert!(verifies(dir, "exact", &exact.cert_pem, &issuing));
    // The compromised gateway's CA mints names outside its subtree: refused by openssl.
    for (name, shape) in [
        ("sibling", dns("dev-01.l4.plant.local")),
        ("parent", dns("plant.local")),
        ("suffix-trick", dns("evil-l3.plant.local")),
        ("top", dns("gw-top.plant.local")),
    ] {
        let outside = sub.mint("l3-dev-03", shape);
        assert!(
            !verifies(dir, name, &outside.cert_pem, &issuing),
            "{name} must not verify"
        );
    }
    let with_ip = sub.mint("l3-dev-04", |p| {
        p.subject_alt_names = vec![SanType::IpAddress("10.0.0.1".parse().unwrap())];
    });
    assert!(!verifies(dir, "ip", &with_ip.cert_pem, &issuing));
    server.stop().await;
}

/// A directoryName subtree: what the sub-CA mints must carry its RDNs first; a subject
/// without them fails openssl verify, one with them passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_name_subtree_binds_the_subjects_below() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let pki = Pki::generate_p256(dir);
    let root = pki.root.cert_pem.clone();
    let config = config_text(
        &pki,
        &top_rules(
            r#"common_names = ["L3 issuing CA gw-mid"]
directory_name = "O=Contoso,OU=Line 3""#,
        ),
    );
    let server = TestServer::start(dir, &config).await;
    let ra = module_of(server.addr, &root, "gw-mid").await;
    let key = KeyPair::generate().unwrap();
    let der = leaf_of(
        &post(
            &as_holder(server.addr, &root, &ra),
            "simpleenroll",
            &[],
            ca_csr("L3 issuing CA gw-mid", &key, Some(0)),
        )
        .await,
    );
    let sub = HeldCa::new(der, key);
    let issuing = pki.issuing.cert_pem.clone();
    let subject = |o: &'static str, ou: &'static str| {
        move |p: &mut CertificateParams| {
            let mut dn = rcgen::DistinguishedName::new();
            dn.push(DnType::OrganizationName, o);
            dn.push(DnType::OrganizationalUnitName, ou);
            dn.push(DnType::CommonName, "l3-dev-01");
            p.distinguished_name = dn;
        }
    };
    let inside = sub.mint("l3-dev-01", subject("Contoso", "Line 3"));
    assert!(verifies(dir, "dn-inside", &inside.cert_pem, &issuing));
    let outside = sub.mint("l3-dev-01", subject("Contoso", "Line 4"));
    assert!(!verifies(dir, "dn-outside", &outside.cert_pem, &issuing));
    let bare = sub.mint("l3-dev-01", |_| {});
    assert!(!verifies(dir, "dn-bare", &bare.cert_pem, &issuing));
    server.stop().await;
}

/// Beyond the allowance: a pathlen above the rule's, a pathlen the issuer cannot sign, names
/// outside the rule, the device itself (not its RA module) and another device's module asking
/// for the same CA. Each refused with 403 and the reason; the positive control (the RA within
/// bounds) is granted on the same server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_beyond_the_allowance_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let pki = Pki::generate_p256(dir);
    let root = pki.root.cert_pem.clone();
    // The issuing CA has pathlen 1: a rule allowing 1 below it still cannot get 1.
    let config = config_text(
        &pki,
        &top_rules(
            r#"common_names = ["L3 issuing CA gw-mid"]
max_path_len = 1
max_validity_days = 36500"#,
        ),
    );
    let server = TestServer::start(dir, &config).await;
    let ra = module_of(server.addr, &root, "gw-mid").await;
    let as_ra = as_holder(server.addr, &root, &ra);
    let key = KeyPair::generate().unwrap();

    let answer = post(
        &as_ra,
        "simpleenroll",
        &[],
        ca_csr("L3 issuing CA gw-mid", &key, Some(2)),
    )
    .await;
    refused(&answer, 403, "asks for a CA with pathlen 2");
    refused(&answer, 403, "module of device gw-mid");
    refused(&answer, 403, "pathlen 1 at most");
    let answer = post(
        &as_ra,
        "simpleenroll",
        &[],
        ca_csr("L3 issuing CA gw-mid", &key, Some(1)),
    )
    .await;
    refused(&answer, 403, "issuing CA (pathlen 1) cannot sign");
    let answer = post(
        &as_ra,
        "simpleenroll",
        &[],
        ca_csr("L4 issuing CA gw-mid", &key, Some(0)),
    )
    .await;
    refused(&answer, 403, "CN=\"L4 issuing CA gw-mid\" is not allowed");
    let answer = post(
        &as_ra,
        "simpleenroll",
        &[],
        csr("L3 issuing CA gw-mid", &key, |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.subject_alt_names = vec![SanType::DnsName("gw-top.plant.local".try_into().unwrap())];
        }),
    )
    .await;
    refused(&answer, 403, "gw-top.plant.local is not allowed");

    // The device gw-mid itself, and another device's edgeest module: not the RA.
    let anonymous = EstClient::new(server.addr, &root, None);
    let device_key = KeyPair::generate().unwrap();
    let device = Credential {
        cert_pem: to_pem(&leaf_of(
            &post(
                &anonymous,
                "simpleenroll",
                &[basic(USER, PASSWORD)],
                csr("gw-mid", &device_key, |_| {}),
            )
            .await,
        )),
        key_pem: device_key.serialize_pem(),
    };
    let answer = post(
        &as_holder(server.addr, &root, &device),
        "simpleenroll",
        &[],
        ca_csr("L3 issuing CA gw-mid", &key, Some(0)),
    )
    .await;
    refused(&answer, 403, "CN=\"L3 issuing CA gw-mid\" is not allowed");
    let other = module_of(server.addr, &root, "gw-other").await;
    let answer = post(
        &as_holder(server.addr, &root, &other),
        "simpleenroll",
        &[],
        ca_csr("L3 issuing CA gw-mid", &key, Some(0)),
    )
    .await;
    assert!(
        matches!(answer.status, 401 | 403),
        "{}: {}",
        answer.status,
        answer.text()
    );
    // Basic users never get one either.
    let answer = post(
        &anonymous,
        "simpleenroll",
        &[basic(USER, PASSWORD)],
        ca_csr("L3 issuing CA gw-mid", &key, Some(0)),
    )
    .await;
    refused(&answer, 403, "may not obtain a CA certificate");

    // Positive control: the RA within bounds. The validity is capped by the issuer's.
    let der = leaf_of(
        &post(
            &as_ra,
            "simpleenroll",
            &[],
            ca_csr("L3 issuing CA gw-mid", &key, Some(0)),
        )
        .await,
    );
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let issuing_der =
        rustls::pki_types::CertificateDer::from_pem_slice(pki.issuing.cert_pem.as_bytes()).unwrap();
    let (_, issuing) = X509Certificate::from_der(&issuing_der).unwrap();
    assert_eq!(
        cert.validity().not_after.timestamp(),
        issuing.validity().not_after.timestamp()
    );
    server.stop().await;
}

/// check-config refuses sub-CA rules whose bounds cannot be enforced: a CA for anyone but a
/// named module, DNS patterns with no name-constraint form, IP addresses, no DNS names.
#[test]
fn sub_ca_rules_that_cannot_be_enforced_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(temp.path());
    let check = |rule: &str| -> Result<(), String> {
        let config = config_text(
            &pki,
            &format!(
                r#"
[[labels]]
issuer = "plant"
client_trust = ["issuer"]
[[labels.rules]]
{rule}
"#
            ),
        );
        config.validate().map_err(|e| e.to_string())
    };
    let sub = r#"sub_ca = { common_names = ["L3 CA"] }"#;
    for (rule, says) in [
        (
            format!("match = [\"certificate:issuer\"]\ndns_names = [\"*.l3.plant.local\"]\n{sub}"),
            "module:DEVICE/MODULE only",
        ),
        (
            format!("match = [\"module:gw/edgeest\"]\ndns_names = [\"l3-*.plant.local\"]\n{sub}"),
            "no name-constraint form",
        ),
        (
            format!("match = [\"module:gw/edgeest\"]\ndns_names = [\"{{cn}}.plant.local\"]\n{sub}"),
            "no name-constraint form",
        ),
        (
            format!(
                "match = [\"module:gw/edgeest\"]\ndns_names = [\"*.l3.plant.local\"]\nip_addresses = [\"10.*\"]\n{sub}"
            ),
            "ip_addresses cannot bound",
        ),
        (
            format!("match = [\"module:gw/edgeest\"]\n{sub}"),
            "no dns_names",
        ),
        (
            "match = [\"module:gw/edgeest\"]\ndns_names = [\"*.l3.plant.local\"]\nsub_ca = { common_names = [\"L3 CA\"], directory_name = \"X=1\" }".to_owned(),
            "directory_name: unknown attribute",
        ),
    ] {
        let err = check(&rule).expect_err(&rule);
        assert!(err.contains(says), "{says:?} in {err}");
    }
    // Positive control.
    check(&format!(
        "match = [\"module:gw/edgeest\"]\ndns_names = [\"*.l3.plant.local\"]\n{sub}"
    ))
    .unwrap();
}
