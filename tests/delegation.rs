//! Delegated intermediates (issue 16): the upper layer's `sub_ca` rule grants a lower layer's
//! RA (`module:DEVICE/MODULE`) an issuing CA within bounds (pathlen, validity, name
//! constraints), and refuses anything beyond them. Each attacker probe has its positive
//! control; what the sub-CA mints is checked with `openssl verify` against the root.

mod common;

use std::path::Path;

use ::time::{Duration, OffsetDateTime};
use common::bin::{free_port, Running, BIN};
use common::client::{
    basic, certs_from_answer, csr_shaped as csr, leaf_of, post_csr as post, refused, to_pem,
    Answer, EstClient,
};
use common::pki::Credential;
use common::softhsm::SOFTHSM;
use common::{openssl_verify, plant_config, Pki, TestServer, PASSWORD, USER};
use edge_est::config::Config;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use x509_parser::prelude::*;

// ---- helpers ------------------------------------------------------------------------------

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

fn as_holder(addr: std::net::SocketAddr, root: &str, who: &Credential) -> EstClient {
    EstClient::new(addr, root, Some((&who.cert_pem, &who.key_pem)))
}

/// `simpleenroll` of `csr` at `addr` with `who`'s certificate.
async fn ask_as(addr: std::net::SocketAddr, root: &str, who: &Credential, csr: Vec<u8>) -> Answer {
    post(&as_holder(addr, root, who), "simpleenroll", &[], csr).await
}

/// The CA `cn` (`path_len` asked for, key `key`) granted to `who` at `addr`.
async fn ca_of(
    addr: std::net::SocketAddr,
    root: &str,
    who: &Credential,
    cn: &str,
    key: &KeyPair,
    path_len: Option<u8>,
) -> Vec<u8> {
    leaf_of(&ask_as(addr, root, who, ca_csr(cn, key, path_len)).await)
}

/// Device `cn` enrolled with Basic: its certificate and key.
async fn device(addr: std::net::SocketAddr, root: &str, cn: &str) -> Credential {
    let key = KeyPair::generate().unwrap();
    let answer = post(
        &EstClient::new(addr, root, None),
        "simpleenroll",
        &[basic(USER, PASSWORD)],
        csr(cn, &key, |_| {}),
    )
    .await;
    Credential {
        cert_pem: to_pem(&leaf_of(&answer)),
        key_pem: key.serialize_pem(),
    }
}

/// A test's directory with a P-256 PKI in it; `root` is the root's PEM.
struct Plant {
    temp: tempfile::TempDir,
    pki: Pki,
    root: String,
}

impl Plant {
    fn new() -> Plant {
        let temp = tempfile::tempdir().unwrap();
        let pki = Pki::generate_p256(temp.path());
        let root = pki.root.cert_pem.clone();
        Plant { temp, pki, root }
    }

    fn dir(&self) -> &Path {
        self.temp.path()
    }
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
async fn module_of(addr: std::net::SocketAddr, root: &str, name: &str) -> Credential {
    let identity = device(addr, root, name).await;
    let key = KeyPair::generate().unwrap();
    let edge_ca_name = format!("aziot-edge CA {name}");
    let edge_ca = ca_of(addr, root, &identity, &edge_ca_name, &key, Some(0)).await;
    HeldCa::new(edge_ca, key).mint("edgeest", |_| {})
}

/// A top layer whose RA rule for gw-mid grants the sub-CA `sub_ca` (TOML of `sub_ca`): its
/// configuration, the server, and gw-mid's RA credential (its `edgeest` module).
async fn granting_top(dir: &Path, pki: &Pki, sub_ca: &str) -> (Config, TestServer, Credential) {
    let config = plant_config(pki, &top_rules(sub_ca));
    let top = TestServer::start(dir, &config).await;
    let ra = module_of(top.addr, &pki.root.cert_pem, "gw-mid").await;
    (config, top, ra)
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
    let plant = Plant::new();
    let (dir, pki, root) = (plant.dir(), &plant.pki, plant.root.as_str());
    let (_, server, ra) = granting_top(
        dir,
        pki,
        r#"common_names = ["L3 issuing CA gw-mid"]
max_path_len = 0
max_validity_days = 7"#,
    )
    .await;

    let key = KeyPair::generate().unwrap();
    let der = ca_of(server.addr, root, &ra, "L3 issuing CA gw-mid", &key, None).await;
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
    let plant = Plant::new();
    let (dir, pki, root) = (plant.dir(), &plant.pki, plant.root.as_str());
    let (_, server, ra) = granting_top(
        dir,
        pki,
        r#"common_names = ["L3 issuing CA gw-mid"]
directory_name = "O=Contoso,OU=Line 3""#,
    )
    .await;
    let key = KeyPair::generate().unwrap();
    let der = ca_of(
        server.addr,
        root,
        &ra,
        "L3 issuing CA gw-mid",
        &key,
        Some(0),
    )
    .await;
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
    let plant = Plant::new();
    let (dir, pki, root) = (plant.dir(), &plant.pki, plant.root.as_str());
    // The issuing CA has pathlen 1: a rule allowing 1 below it still cannot get 1.
    let (_, server, ra) = granting_top(
        dir,
        pki,
        r#"common_names = ["L3 issuing CA gw-mid"]
max_path_len = 1
max_validity_days = 36500"#,
    )
    .await;
    let key = KeyPair::generate().unwrap();

    let answer = ask_as(
        server.addr,
        root,
        &ra,
        ca_csr("L3 issuing CA gw-mid", &key, Some(2)),
    )
    .await;
    refused(&answer, 403, "asks for a CA with pathlen 2");
    refused(&answer, 403, "module of device gw-mid");
    refused(&answer, 403, "pathlen 1 at most");
    let answer = ask_as(
        server.addr,
        root,
        &ra,
        ca_csr("L3 issuing CA gw-mid", &key, Some(1)),
    )
    .await;
    refused(&answer, 403, "issuing CA (pathlen 1) cannot sign");
    let answer = ask_as(
        server.addr,
        root,
        &ra,
        ca_csr("L4 issuing CA gw-mid", &key, Some(0)),
    )
    .await;
    refused(&answer, 403, "CN=\"L4 issuing CA gw-mid\" is not allowed");
    let answer = ask_as(
        server.addr,
        root,
        &ra,
        csr("L3 issuing CA gw-mid", &key, |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.subject_alt_names = vec![SanType::DnsName("gw-top.plant.local".try_into().unwrap())];
        }),
    )
    .await;
    refused(&answer, 403, "gw-top.plant.local is not allowed");

    // The device gw-mid itself, and another device's edgeest module: not the RA.
    let within_bounds = || ca_csr("L3 issuing CA gw-mid", &key, Some(0));
    let gw_mid = device(server.addr, root, "gw-mid").await;
    let answer = ask_as(server.addr, root, &gw_mid, within_bounds()).await;
    refused(&answer, 403, "CN=\"L3 issuing CA gw-mid\" is not allowed");
    let other = module_of(server.addr, root, "gw-other").await;
    let answer = ask_as(server.addr, root, &other, within_bounds()).await;
    assert!(
        matches!(answer.status, 401 | 403),
        "{}: {}",
        answer.status,
        answer.text()
    );
    // Basic users never get one either.
    let answer = post(
        &EstClient::new(server.addr, root, None),
        "simpleenroll",
        &[basic(USER, PASSWORD)],
        within_bounds(),
    )
    .await;
    refused(&answer, 403, "may not obtain a CA certificate");

    // Positive control: the RA within bounds. The validity is capped by the issuer's.
    let der = leaf_of(&ask_as(server.addr, root, &ra, within_bounds()).await);
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
        let config = plant_config(
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
    // An enrolled issuer names an upstream that exists; its key is made here.
    let enrolled = |extra: &str| -> Result<(), String> {
        let text = format!(
            r#"
journal = "journal.jsonl"
[tls]
certificate = "server.pem"
key = "server.key"
[upstreams.top]
url = "https://top:8085/.well-known/est"
trust = ["root.pem"]
[enrolled_issuers.mid]
common_name = "L3 issuing CA gw-mid"
root = "root.pem"
{extra}
[[labels]]
issuer = "mid"
[labels.authentication]
certificate = false
[[labels.rules]]
match = ["user:*"]
common_names = ["l3-*"]
"#
        );
        let config: Config = toml::from_str(&text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())
    };
    let e = enrolled("enroll = \"nowhere\"").unwrap_err();
    assert!(
        e.contains("enrolled_issuers.mid.enroll: no upstream named \"nowhere\""),
        "{e}"
    );
    // A token location is taken (its key is generated in the token); a PIN in it, a key file,
    // or no module is refused.
    let e = enrolled("enroll = \"top\"\nkey = \"pkcs11:token=t;object=k\"").unwrap_err();
    assert!(
        e.contains("enrolled_issuers.mid.key: no PKCS#11 module"),
        "{e}"
    );
    enrolled("enroll = \"top\"\nkey = \"pkcs11:token=t;object=k?pin-source=file:/run/pin&module-path=/usr/lib/softhsm/libsofthsm2.so\"").unwrap();
    let e = enrolled("enroll = \"top\"\nkey = \"pkcs11:token=t;object=k?pin-value=4711-secret&module-path=/usr/lib/softhsm/libsofthsm2.so\"").unwrap_err();
    assert!(e.contains("pin-value is refused here"), "{e}");
    assert!(!e.contains("4711-secret"), "{e}");
    let e = enrolled("enroll = \"top\"\nkey = \"ca.key\"").unwrap_err();
    assert!(e.contains("only a pkcs11: token location"), "{e}");
    enrolled("enroll = \"top\"").unwrap();
    // A CA of pathlen 0 cannot sign the Edge CAs the rules grant.
    let edge_cas = "enroll = \"top\"\n[[labels]]\nname = \"edge\"\nissuer = \"mid\"\n\
                    [labels.authentication]\ncertificate = false\n[[labels.rules]]\n\
                    match = [\"user:*\"]\nca_common_names = [\"aziot-edge CA l3-*\"]";
    let e = enrolled(edge_cas).unwrap_err();
    assert!(e.contains("asks for pathlen 0"), "{e}");
    enrolled(&format!("path_len = 1\n{edge_cas}")).unwrap();
}

// ---- 2. the lower layer enrolls, renews and rolls over its own CA -------------------------

/// The middle layer: Basic devices `l3-*` and renewals of what it issued; its issuer `mid` is
/// enrolled from the top with its RA credential (mid-ra.pem), its state under `mid/`.
fn mid_config(pki: &Pki, top: std::net::SocketAddr) -> Config {
    let text = mid_config_toml(pki, top.port());
    toml::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// [`mid_config`] as TOML, upstream `top` at `port`.
fn mid_config_toml(pki: &Pki, port: u16) -> String {
    format!(
        r#"
journal = "mid/journal.jsonl"
[tls]
certificate = "server.pem"
key = "server.key"
[users]
estuser = "{hash}"
[upstreams.top]
url = "https://localhost:{port}/.well-known/est"
trust = ["root.pem"]
certificate = "mid-ra.pem"
key = "mid-ra.key"
[enrolled_issuers.mid]
enroll = "top"
common_name = "L3 issuing CA gw-mid"
root = "root.pem"
retry_max_secs = 1
[[labels]]
issuer = "mid"
client_trust = ["issuer"]
[[labels.rules]]
match = ["user:estuser"]
common_names = ["l3-*"]
dns_names = ["*.l3.plant.local"]
[[labels.rules]]
match = ["certificate:issuer"]
common_names = ["{{cn}}"]
dns_names = ["*.l3.plant.local"]
"#,
        hash = pki.password_hash,
    )
}

/// A top layer whose RA rule for gw-mid grants a sub-CA of `validity` (TOML of `sub_ca`), and
/// gw-mid's RA credential written for the middle (mid-ra.pem, mid-ra.key).
async fn top_and_ra(dir: &Path, pki: &Pki, sub_ca: &str) -> (Config, TestServer) {
    let (config, top, ra) = granting_top(dir, pki, sub_ca).await;
    write(dir, "mid-ra.pem", &ra.cert_pem);
    write(dir, "mid-ra.key", &ra.key_pem);
    (config, top)
}

/// A `sub_ca` granting gw-mid's CA for `secs` seconds.
fn granted_for_secs(secs: u64) -> String {
    format!("common_names = [\"L3 issuing CA gw-mid\"]\nmax_validity_secs = {secs}")
}

/// `granting` without gw-mid's sub-CA allowance: the top refuses it a CA.
fn refusing(granting: &Config) -> Config {
    let mut refusing = granting.clone();
    refusing.labels[0].rules[2].sub_ca = None;
    refusing
}

/// The CAs the top's journal records as granted.
fn sub_cas_granted(top: &TestServer) -> usize {
    top.journal()
        .iter()
        .filter(|e| e.profile == "sub-ca")
        .count()
}

/// The middle's enrolled issuer's state directory (under `mid/`).
fn mid_state(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir.join("mid"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("issuer-"))
        .unwrap()
        .path()
}

/// `openssl verify` of `leaf` against root.pem with `chain` (a `/cacerts`) as untrusted,
/// written as `NAME-leaf.pem` and `NAME-cacerts.pem`.
fn chain_verifies(dir: &Path, name: &str, leaf: &[u8], chain: &[Vec<u8>]) -> bool {
    let chain_pem: String = chain.iter().map(|c| to_pem(c)).collect();
    let untrusted = write(dir, &format!("{name}-cacerts.pem"), &chain_pem);
    let leaf = write(dir, &format!("{name}-leaf.pem"), &to_pem(leaf));
    openssl_verify(dir, "root.pem", &untrusted, &leaf)
}

/// The CN of a certificate's subject (`issuer` false) or issuer (`issuer` true).
fn cn_in(der: &[u8], issuer: bool) -> String {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let name = if issuer {
        cert.issuer()
    } else {
        cert.subject()
    };
    let cn = name
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    cn
}

fn cn_of(der: &[u8]) -> String {
    cn_in(der, false)
}

fn issuer_cn(der: &[u8]) -> String {
    cn_in(der, true)
}

/// Whether certificate `der` is signed by the key of the CA `ca`.
fn signed_by(der: &[u8], ca: &[u8]) -> bool {
    let (_, ca) = X509Certificate::from_der(ca).unwrap();
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// A device CSR: CN `cn` and the DNS name `cn.l3.plant.local`.
fn l3_csr(cn: &str, key: &KeyPair) -> Vec<u8> {
    let dns = format!("{cn}.l3.plant.local");
    csr(cn, key, |p| {
        p.subject_alt_names = vec![SanType::DnsName(dns.as_str().try_into().unwrap())];
    })
}

async fn enroll_basic(addr: std::net::SocketAddr, root: &str, cn: &str) -> (Answer, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let answer = post(
        &EstClient::new(addr, root, None),
        "simpleenroll",
        &[basic(USER, PASSWORD)],
        l3_csr(cn, &key),
    )
    .await;
    (answer, key)
}

/// `simplereenroll` of `cn` (`cn.l3.plant.local`) by the holder of `cert` and `key`; the
/// renewed certificate.
async fn reenroll(
    addr: std::net::SocketAddr,
    root: &str,
    cn: &str,
    cert: &[u8],
    key: &KeyPair,
) -> Vec<u8> {
    let holder = Credential {
        cert_pem: to_pem(cert),
        key_pem: key.serialize_pem(),
    };
    leaf_of(
        &post(
            &as_holder(addr, root, &holder),
            "simplereenroll",
            &[],
            l3_csr(cn, key),
        )
        .await,
    )
}

/// `cn`'s certificate `leaf` (key `key`) renews at `addr`, signed by the CA `/cacerts` lists
/// first there now.
async fn renews_through_the_current_ca(
    addr: std::net::SocketAddr,
    root: &str,
    cn: &str,
    leaf: &[u8],
    key: &KeyPair,
) {
    let renewed = reenroll(addr, root, cn, leaf, key).await;
    let new_ca = cacerts(addr, root).await.remove(0);
    assert!(signed_by(&renewed, &new_ca), "renewed by the new CA");
}

/// The SHA-256 fingerprints of `chain`'s certificates.
fn fingerprints(chain: &[Vec<u8>]) -> Vec<[u8; 32]> {
    chain
        .iter()
        .map(|c| edge_est::auth::chain::fingerprint(c))
        .collect()
}

/// Waits (at most `secs`) until `/cacerts` at `addr` no longer lists the CA `gone`.
async fn wait_until_cacerts_drop(
    addr: std::net::SocketAddr,
    root: &str,
    gone: &[u8; 32],
    secs: u64,
) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while fingerprints(&cacerts(addr, root).await).contains(gone) {
        assert!(std::time::Instant::now() < until, "the replaced CA stays");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn cacerts(addr: std::net::SocketAddr, root: &str) -> Vec<Vec<u8>> {
    let answer = EstClient::new(addr, root, None)
        .request("GET", "cacerts", &[], Vec::new())
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    certs_from_answer(&answer.body)
}

/// The SHA-256 of the enrolled issuer's CA in force at `server`, once it has one.
async fn enrolled_ca(server: &TestServer, within: std::time::Duration) -> [u8; 32] {
    let until = std::time::Instant::now() + within;
    loop {
        if let Some(f) = server.app.runtime().enrolled()[0].fingerprint {
            return f;
        }
        assert!(
            std::time::Instant::now() < until,
            "no CA enrolled: {}",
            server.app.render_metrics()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The CA the enrolled issuer at `server` rolls over to from `from` (within `secs`).
async fn next_ca(server: &TestServer, from: [u8; 32], secs: u64) -> [u8; 32] {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let now = server.app.runtime().enrolled()[0].fingerprint;
        if let Some(f) = now.filter(|f| *f != from) {
            return f;
        }
        assert!(
            std::time::Instant::now() < until,
            "no rollover from {from:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The reported properties the module would send for `server`'s runtime.
fn reported(server: &TestServer) -> serde_json::Value {
    let runtime = server.app.runtime();
    let doc = edge_est::edge::reported::document(&edge_est::edge::reported::ReportInput {
        status: "running",
        config_version: None,
        config_source: None,
        rejection: None,
        config: Some(runtime.config()),
        runtime: Some(&runtime),
        counters: None,
        pending_restart: &[],
    });
    serde_json::Value::Object(doc)
}

fn metric_line<'a>(metrics: &'a str, name: &str) -> Vec<&'a str> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains("issuer=\"mid\""))
        .collect()
}

/// A middle layer without CA files forwards (and says so) while the top refuses it a CA,
/// retries with back-off, enrolls its CA once the top grants it, and signs: the leaf chains
/// to the root through the middle's /cacerts. Both journals record the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_without_a_ca_forwards_then_enrolls_one_and_signs() {
    let plant = Plant::new();
    let (dir, pki, root) = (plant.dir(), &plant.pki, plant.root.as_str());
    let (granting, top) = top_and_ra(dir, pki, r#"common_names = ["L3 issuing CA gw-mid"]"#).await;
    // At first the top grants gw-mid no CA.
    let refusing = refusing(&granting);
    top.app
        .swap(edge_est::runtime::Runtime::build(&refusing, dir).unwrap());

    let mid = TestServer::start(dir, &mid_config(pki, top.addr)).await;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let metrics = mid.app.render_metrics();
        if metrics.contains("outcome=\"failed\"} 2") {
            assert!(
                metric_line(&metrics, "edgeest_enrolled_issuer_forwarding")[0].ends_with(" 1"),
                "{metrics}"
            );
            break;
        }
        assert!(std::time::Instant::now() < until, "{metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let doc = reported(&mid);
    assert_eq!(
        doc["enrolledIssuers"]["mid"]["state"], "forwarding",
        "{doc}"
    );
    assert_eq!(doc["labels"]["(unlabeled)"]["mode"], "forward", "{doc}");
    // Meanwhile the middle forwards: the top's issuing CA signs.
    let (answer, _) = enroll_basic(mid.addr, root, "l3-dev-01").await;
    assert_eq!(issuer_cn(&leaf_of(&answer)), "edge-est test issuing CA");

    top.app
        .swap(edge_est::runtime::Runtime::build(&granting, dir).unwrap());
    enrolled_ca(&mid, std::time::Duration::from_secs(10)).await;
    let (answer, _) = enroll_basic(mid.addr, root, "l3-dev-02").await;
    let leaf = leaf_of(&answer);
    assert_eq!(issuer_cn(&leaf), "L3 issuing CA gw-mid");
    let chain = cacerts(mid.addr, root).await;
    assert_eq!(cn_of(&chain[0]), "L3 issuing CA gw-mid");
    assert!(chain_verifies(dir, "mid", &leaf, &chain));

    let metrics = mid.app.render_metrics();
    assert!(
        metric_line(&metrics, "edgeest_enrolled_issuer_forwarding")[0].ends_with(" 0"),
        "{metrics}"
    );
    assert!(
        !metric_line(&metrics, "edgeest_enrolled_issuer_expiry_seconds").is_empty(),
        "{metrics}"
    );
    assert!(metrics.contains("outcome=\"ok\"} 1"), "{metrics}");
    let doc = reported(&mid);
    assert_eq!(doc["enrolledIssuers"]["mid"]["state"], "enrolled", "{doc}");
    assert!(
        doc["enrolledIssuers"]["mid"]["renewAt"].is_string(),
        "{doc}"
    );
    assert_eq!(doc["labels"]["(unlabeled)"]["mode"], "sign", "{doc}");
    // Journaled as a CA issuance at both layers.
    assert!(top
        .journal()
        .iter()
        .any(|e| e.profile == "sub-ca" && e.subject.contains("L3 issuing CA gw-mid")));
    assert!(mid
        .journal()
        .iter()
        .any(|e| e.profile == "sub-ca" && e.identity.contains("enrolled issuer mid")));
    // The key file is the owner's alone.
    let state = mid_state(dir);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", state.display());
    }
    for entry in std::fs::read_dir(&state).unwrap().flatten() {
        use std::os::unix::fs::PermissionsExt;
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", entry.path().display());
    }
    mid.stop().await;
    top.stop().await;
}

/// A CA of seconds: the middle renews it at two thirds of its life while two clients enroll
/// without pause, and no request fails. A certificate from the old CA renews through the new
/// one; the old CA is in /cacerts after the rollover and leaves it once it has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_rolls_over_under_load_and_the_old_one_leaves_when_expired() {
    let plant = Plant::new();
    let (dir, pki, root) = (plant.dir(), &plant.pki, plant.root.as_str());
    let (_, top) = top_and_ra(dir, pki, &granted_for_secs(9)).await;
    let mid = TestServer::start(dir, &mid_config(pki, top.addr)).await;
    let first = enrolled_ca(&mid, std::time::Duration::from_secs(10)).await;
    let (answer, old_key) = enroll_basic(mid.addr, root, "l3-old").await;
    let old_leaf = leaf_of(&answer);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for worker in 0..2 {
        let (stop, root, addr) = (stop.clone(), root.to_owned(), mid.addr);
        load.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (answer, _) = enroll_basic(addr, &root, &format!("l3-load-{worker}-{n}")).await;
                statuses.push((answer.status, answer.text()));
                n += 1;
            }
            statuses
        }));
    }
    // The rollover.
    let second = next_ca(&mid, first, 15).await;
    let after = fingerprints(&cacerts(mid.addr, root).await);
    assert_eq!(after[0], second, "the new CA first");
    assert!(after.contains(&first), "the old CA still in /cacerts");

    // A certificate of the old CA renews through the new one.
    renews_through_the_current_ca(mid.addr, root, "l3-old", &old_leaf, &old_key).await;

    // The old CA leaves /cacerts once it has expired.
    wait_until_cacerts_drop(mid.addr, root, &first, 15).await;
    // Let the load run over one more renewal, then stop it.
    next_ca(&mid, second, 15).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        for (status, text) in task.await.unwrap() {
            assert_eq!(status, 200, "{text}");
            total += 1;
        }
    }
    assert!(total > 10, "{total} enrollments under load");
    mid.stop().await;
    top.stop().await;
}

/// Rollover retention from the journal: the middle's certificates live 20 s and its CA 45 s.
/// After the rollover the replaced CA stays in /cacerts and in `issuer` trust while the last
/// certificate it signed lives (also across a restart: the journal says so), that
/// certificate renews through the new CA, and the replaced CA leaves once it has expired,
/// before the CA's own notAfter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_ca_stays_until_the_last_certificate_it_signed_expires() {
    let plant = Plant::new();
    let (dir, pki, root) = (plant.dir(), &plant.pki, plant.root.as_str());
    let (_, top) = top_and_ra(dir, pki, &granted_for_secs(45)).await;
    let mut config = mid_config(pki, top.addr);
    config.profiles.insert(
        "short".into(),
        toml::from_str(
            "kind = \"end-entity\"\nvalidity_days = 1\nvalidity_secs = 20\nextended_key_usage = [\"clientAuth\"]",
        )
        .unwrap(),
    );
    config.labels[0].profile = "short".into();
    let mid = TestServer::start(dir, &config).await;
    let first = enrolled_ca(&mid, std::time::Duration::from_secs(10)).await;
    let first_der = cacerts(mid.addr, root).await.remove(0);
    let (_, first_ca) = X509Certificate::from_der(&first_der).unwrap();
    let first_until = first_ca.validity().not_after.to_datetime();
    let (renew_at, _) = (
        edge_est::issue::delegation::renew_point(
            mid.app.runtime().enrolled()[0].current.unwrap().0,
            first_until,
        ),
        (),
    );
    let sleep_until = |t: OffsetDateTime| async move {
        let left = t - OffsetDateTime::now_utc();
        if left.is_positive() {
            tokio::time::sleep(left.try_into().unwrap()).await;
        }
    };
    // The last certificate of the first CA, 8 s before the rollover: it outlives it.
    sleep_until(renew_at - Duration::seconds(8)).await;
    let (answer, last_key) = enroll_basic(mid.addr, root, "l3-last").await;
    let last = leaf_of(&answer);
    let (_, last_cert) = X509Certificate::from_der(&last).unwrap();
    let last_until = last_cert.validity().not_after.to_datetime();
    assert!(signed_by(&last, &first_der), "signed by the first CA");
    assert!(
        last_until < first_until - Duration::seconds(2),
        "{last_until} {first_until}"
    );

    // The rollover.
    next_ca(&mid, first, 20).await;
    // Past the settling time, and after a restart: the journal keeps the first CA.
    sleep_until(OffsetDateTime::now_utc() + Duration::seconds(6)).await;
    mid.stop().await;
    let mid = TestServer::start(dir, &config).await;
    assert!(OffsetDateTime::now_utc() < last_until, "the test ran late");
    let now = fingerprints(&cacerts(mid.addr, root).await);
    assert_ne!(now[0], first, "the new CA first");
    assert!(
        now.contains(&first),
        "the replaced CA stays while its last certificate lives"
    );

    // The certificate of the replaced CA renews through the new one.
    renews_through_the_current_ca(mid.addr, root, "l3-last", &last, &last_key).await;

    // Once that certificate has expired, the replaced CA leaves, before its own notAfter.
    wait_until_cacerts_drop(mid.addr, root, &first, 20).await;
    let gone = OffsetDateTime::now_utc();
    assert!(
        gone >= last_until,
        "left at {gone}, its last certificate lived until {last_until}"
    );
    assert!(
        gone < first_until,
        "left at {gone}, only when it expired itself ({first_until})"
    );
    let kept =
        std::fs::read_to_string(mid.app.runtime().enrolled()[0].dir.join("current.json")).unwrap();
    let kept: serde_json::Value = serde_json::from_str(&kept).unwrap();
    assert_eq!(kept["previous"].as_array().map(Vec::len), Some(0), "{kept}");
    mid.stop().await;
    top.stop().await;
}

/// A restart in the middle of a renewal: a key written but never committed (the process died
/// before the CA came back) and a half-written state file are ignored; the committed CA keeps
/// signing at once after the restart, and the orphan key goes at the next renewal. A state
/// file destroyed outright makes the layer enroll anew, never use a key it does not name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_renewal_uses_no_orphan_key_and_no_half_written_ca() {
    let plant = Plant::new();
    let (dir, pki, root) = (plant.dir(), &plant.pki, plant.root.as_str());
    let (_, top) = top_and_ra(dir, pki, r#"common_names = ["L3 issuing CA gw-mid"]"#).await;
    let config = mid_config(pki, top.addr);
    let mid = TestServer::start(dir, &config).await;
    let first = enrolled_ca(&mid, std::time::Duration::from_secs(10)).await;
    let state = mid.app.runtime().enrolled()[0].dir.clone();
    mid.stop().await;

    // The renewal interrupted: a fresh key on disk, the state file half replaced.
    let orphan = state.join("key-99999999999999999999.pem");
    std::fs::write(&orphan, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    std::fs::write(
        state.join("current.json.tmp4242"),
        "{\"chain\": \"-----BEGIN",
    )
    .unwrap();
    let granted_before = sub_cas_granted(&top);

    let mid = TestServer::start(dir, &config).await;
    assert_eq!(
        mid.app.runtime().enrolled()[0].fingerprint,
        Some(first),
        "the committed CA serves at once"
    );
    let (answer, _) = enroll_basic(mid.addr, root, "l3-after-restart").await;
    let leaf = leaf_of(&answer);
    let ca = cacerts(mid.addr, root).await.remove(0);
    assert!(signed_by(&leaf, &ca), "signed by the committed CA");
    assert_eq!(sub_cas_granted(&top), granted_before, "no new CA asked for");
    mid.stop().await;

    // The state file destroyed: nothing names a key, so a new CA is enrolled, and the
    // orphan is never used (it is removed with the next commit).
    std::fs::write(state.join("current.json"), "{ not json").unwrap();
    let mid = TestServer::start(dir, &config).await;
    let again = enrolled_ca(&mid, std::time::Duration::from_secs(10)).await;
    assert_ne!(again, first);
    assert!(!orphan.exists(), "the orphan key is removed");
    let (answer, _) = enroll_basic(mid.addr, root, "l3-after-loss").await;
    assert_eq!(issuer_cn(&leaf_of(&answer)), "L3 issuing CA gw-mid");
    mid.stop().await;
    top.stop().await;
}

// ---- 3. the shipped binary: what an operator sees, a kill in the middle of a renewal --------

/// `GET /metrics` of a binary's metrics listener.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// The value of the gauge `name` for the issuer `mid`.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metric_line(metrics, name)
        .first()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits up to `within` for the gauge `name` of `mid` to satisfy `test`.
async fn gauge_until(port: u16, name: &str, within: u64, test: impl Fn(f64) -> bool) -> f64 {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(within);
    loop {
        let metrics = scrape(port);
        if let Some(v) = gauge(&metrics, name).filter(|v| test(*v)) {
            return v;
        }
        assert!(std::time::Instant::now() < until, "{name}:\n{metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Waits up to `within` seconds for a line of the binary's log holding `what`; the line.
async fn log_line(running: &Running, what: &str, within: u64) -> String {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(within);
    loop {
        let log = running.log_text();
        if let Some(line) = log.lines().find(|l| l.contains(what)) {
            return line.to_owned();
        }
        assert!(std::time::Instant::now() < until, "no {what:?} in:\n{log}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `edge-est serve --config mid.toml` in `dir`, its log in `log`, its metrics on `metrics`.
fn serve_mid(dir: &Path, pki: &Pki, upstream_port: u16, metrics: u16, log: &str) -> Running {
    write(
        dir,
        "mid.toml",
        &format!(
            "metrics_listen = \"127.0.0.1:{metrics}\"\n{}",
            mid_config_toml(pki, upstream_port)
        ),
    );
    let port = free_port();
    let mut command = std::process::Command::new(BIN);
    command
        .args(["serve", "--config", "mid.toml", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(dir);
    Running::start(command, port, &dir.join(log))
}

/// The shipped binary, as its CA ages: without a CA it says in one log line that its labels
/// forward (gauge `forwarding` 1, and the top's CA signs); enrolled, it exposes the seconds
/// left; its renewals refused, it warns at 90 % of the CA's life with the seconds left; expired
/// unrenewed, it says it forwards again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_says_when_it_forwards_and_warns_at_ninety_percent() {
    let plant = Plant::new();
    let (dir, pki, root) = (plant.dir(), &plant.pki, plant.root.as_str());
    let (granting, top) = top_and_ra(dir, pki, &granted_for_secs(12)).await;
    let refusing = refusing(&granting);
    let build = |c: &Config| edge_est::runtime::Runtime::build(c, dir).unwrap();
    top.app.swap(build(&refusing));

    let metrics = free_port();
    let mid = serve_mid(dir, pki, top.addr.port(), metrics, "mid.log");
    let line = log_line(&mid, "enrolled issuer has no valid CA yet", 10).await;
    assert!(line.contains("WARN") && line.contains("mid"), "{line}");
    assert!(line.contains("labels forward to the layer above"), "{line}");
    gauge_until(metrics, "edgeest_enrolled_issuer_forwarding", 10, |v| {
        v == 1.0
    })
    .await;
    let (answer, _) = enroll_basic(mid.addr(), root, "l3-dev-01").await;
    assert_eq!(issuer_cn(&leaf_of(&answer)), "edge-est test issuing CA");

    top.app.swap(build(&granting));
    log_line(&mid, "enrolled a new issuing CA from the layer above", 15).await;
    top.app.swap(build(&refusing));
    gauge_until(metrics, "edgeest_enrolled_issuer_forwarding", 5, |v| {
        v == 0.0
    })
    .await;
    let left = gauge_until(metrics, "edgeest_enrolled_issuer_expiry_seconds", 5, |v| {
        v > 0.0
    })
    .await;
    assert!(left <= 12.0, "{left}");
    let (answer, _) = enroll_basic(mid.addr(), root, "l3-dev-02").await;
    assert_eq!(issuer_cn(&leaf_of(&answer)), "L3 issuing CA gw-mid");

    // Renewal refused from two thirds on; at 90 % a warning with the seconds left.
    let failed = log_line(&mid, "enrolling the issuing CA failed", 15).await;
    assert!(failed.contains("retry_in_secs"), "{failed}");
    let warning = log_line(&mid, "past 90 % of its life and not renewed yet", 15).await;
    assert!(warning.contains("WARN"), "{warning}");
    let seconds_left: f64 = warning
        .split("seconds_left=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no seconds_left in {warning}"));
    assert!((0.0..=1.5).contains(&seconds_left), "{warning}");
    let left = gauge(&scrape(metrics), "edgeest_enrolled_issuer_expiry_seconds").unwrap();
    assert!(left < 2.0, "{left}");

    // Expired unrenewed: it forwards again, and says so.
    let expired = log_line(&mid, "the enrolled CA expired before it was renewed", 10).await;
    assert!(expired.contains("forward"), "{expired}");
    gauge_until(metrics, "edgeest_enrolled_issuer_forwarding", 5, |v| {
        v == 1.0
    })
    .await;
    let (answer, _) = enroll_basic(mid.addr(), root, "l3-dev-03").await;
    assert_eq!(issuer_cn(&leaf_of(&answer)), "edge-est test issuing CA");
    drop(mid);
    top.stop().await;
}

/// A TCP relay to `target` that holds what a client sends while `hold` is set: a request
/// through it waits as for an upper layer that does not answer.
struct Relay {
    port: u16,
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

async fn relay(target: std::net::SocketAddr) -> Relay {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held = hold.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let hold = held.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut client_in, mut client_out) = client.into_split();
                let (mut server_in, mut server_out) = server.into_split();
                let up = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = client_in.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        while hold.load(Relaxed) {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                        if server_out.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = server_out.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut server_in, &mut client_out).await;
                    let _ = client_out.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    Relay { port, hold }
}

/// The key files of an issuer's state directory.
fn key_files(state: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("key-"))
        .collect();
    names.sort();
    names
}

/// The shipped binary killed (SIGKILL) while its renewal waits for the layer above: the new
/// key is on disk, the committed CA untouched. Restarted, it never uses that key: it enrolls
/// a CA for a fresh one, removes the orphan, and signs what chains to the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_killed_mid_renewal_loses_nothing() {
    let plant = Plant::new();
    let (dir, pki, root) = (plant.dir(), &plant.pki, plant.root.as_str());
    let (_, top) = top_and_ra(dir, pki, &granted_for_secs(15)).await;
    let relay = relay(top.addr).await;
    let metrics = free_port();
    let mut mid = serve_mid(dir, pki, relay.port, metrics, "mid.log");
    log_line(&mid, "enrolled a new issuing CA from the layer above", 15).await;
    let state = mid_state(dir);
    let current = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(state.join("current.json")).unwrap()).unwrap()
    };
    let committed = current();
    let committed_key = committed["key"].as_str().unwrap().to_owned();
    assert_eq!(key_files(&state), vec![committed_key.clone()]);

    // The renewal (at two thirds: 10 s) makes its key, then waits for the top: killed then.
    relay.hold.store(true, std::sync::atomic::Ordering::Relaxed);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let orphan = loop {
        if let Some(k) = key_files(&state).into_iter().find(|k| *k != committed_key) {
            break k;
        }
        assert!(std::time::Instant::now() < until, "no renewal began");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    mid.child.kill().unwrap();
    mid.child.wait().unwrap();
    let log = mid.log_text();
    assert_eq!(
        log.matches("enrolled a new issuing CA from the layer above")
            .count(),
        1,
        "the renewal finished before the kill:\n{log}"
    );
    // Nothing half written: the state names the committed CA and key.
    assert_eq!(current(), committed, "the committed state is intact");
    let orphan_key =
        KeyPair::from_pem(&std::fs::read_to_string(state.join(&orphan)).unwrap()).unwrap();
    let orphan_spki = rcgen::PublicKeyData::subject_public_key_info(&orphan_key);
    assert_eq!(
        sub_cas_granted(&top),
        1,
        "the held request never reached the top"
    );

    // Restarted with the top reachable: a CA for a fresh key, the orphan gone.
    relay
        .hold
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let mid = serve_mid(dir, pki, relay.port, metrics, "mid-restarted.log");
    log_line(&mid, "enrolled a new issuing CA from the layer above", 15).await;
    let renewed = current();
    let key = renewed["key"].as_str().unwrap().to_owned();
    assert_ne!(key, orphan);
    assert_ne!(key, committed_key);
    assert_eq!(
        key_files(&state),
        vec![key.clone()],
        "the orphan key is removed"
    );
    let chain = cacerts(mid.addr(), root).await;
    let (_, ca) = X509Certificate::from_der(&chain[0]).unwrap();
    assert_ne!(
        ca.public_key().raw,
        orphan_spki.as_slice(),
        "the orphan key is not used"
    );
    assert_eq!(sub_cas_granted(&top), 2);
    let (answer, _) = enroll_basic(mid.addr(), root, "l3-after-kill").await;
    let leaf = leaf_of(&answer);
    assert_eq!(issuer_cn(&leaf), "L3 issuing CA gw-mid");
    assert!(chain_verifies(dir, "mid", &leaf, &chain));
    drop(mid);
    top.stop().await;
}

/// README's section on enrolled issuers: both examples load, the upper layer's rule grants
/// its RA a sub-CA within the bounds it states.
#[test]
fn the_readme_examples_validate() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("\n### A layer's own CA, enrolled from the layer above\n")
        .nth(1)
        .unwrap();
    let blocks: Vec<&str> = section
        .split("```toml\n")
        .skip(1)
        .take(2)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    let temp = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(temp.path());
    let upper = plant_config(
        &pki,
        &format!(
            "[[labels]]\nissuer = \"plant\"\nclient_trust = [\"issuer\"]\n{}",
            blocks[0]
        ),
    );
    upper.validate().unwrap();
    let sub = upper.labels[0].rules[0].sub_ca.as_ref().unwrap();
    assert_eq!((sub.max_path_len, sub.max_validity_days), (0, 30));
    let lower: Config = toml::from_str(&format!(
        "[tls]\ncertificate = \"server.pem\"\nkey = \"server.key\"\n{}",
        blocks[1]
    ))
    .unwrap();
    lower.validate().unwrap();
    assert_eq!(lower.enrolled_issuers["mid"].retry_max_secs, 300);
}

/// The top stops granting: the middle's renewals fail (retried, counted), and when its CA
/// expires its label forwards instead of failing; devices keep enrolling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_expires_unrenewed_leaves_the_layer_forwarding() {
    let plant = Plant::new();
    let (dir, pki, root) = (plant.dir(), &plant.pki, plant.root.as_str());
    let (granting, top) = top_and_ra(dir, pki, &granted_for_secs(6)).await;
    let mid = TestServer::start(dir, &mid_config(pki, top.addr)).await;
    enrolled_ca(&mid, std::time::Duration::from_secs(10)).await;
    let refusing = refusing(&granting);
    top.app
        .swap(edge_est::runtime::Runtime::build(&refusing, dir).unwrap());
    let (answer, _) = enroll_basic(mid.addr, root, "l3-while-valid").await;
    assert_eq!(issuer_cn(&leaf_of(&answer)), "L3 issuing CA gw-mid");

    let until = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while mid.app.runtime().enrolled()[0].current.is_some() {
        assert!(std::time::Instant::now() < until, "the expired CA stays");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let metrics = mid.app.render_metrics();
    assert!(metrics.contains("outcome=\"failed\"}"), "{metrics}");
    assert!(
        metric_line(&metrics, "edgeest_enrolled_issuer_forwarding")[0].ends_with(" 1"),
        "{metrics}"
    );
    let (answer, _) = enroll_basic(mid.addr, root, "l3-after-expiry").await;
    assert_eq!(issuer_cn(&leaf_of(&answer)), "edge-est test issuing CA");
    mid.stop().await;
    top.stop().await;
}

// ---- a layer's CA key generated inside a PKCS#11 token (SoftHSM2) ------------------------

const TOKEN_PIN: &str = "5518-user-pin";

/// The token tests run one at a time: SoftHSM's login state is per process and token, and a
/// token is initialised with an SO login.
static TOKEN_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A SoftHSM token labelled `label`, user PIN [`TOKEN_PIN`].
fn softhsm_token(label: &str) -> cryptoki::slot::Slot {
    common::softhsm::new_token(label, TOKEN_PIN)
}

/// (CKA_SENSITIVE, CKA_EXTRACTABLE) of each private key on the token, by label.
fn token_private_keys(slot: cryptoki::slot::Slot) -> Vec<(String, bool, bool)> {
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    let ctx = edge_est::keys::pkcs11::module(Path::new(SOFTHSM)).unwrap();
    let session = ctx.open_ro_session(slot).unwrap();
    // The process is logged in already (the server's key); login state is per application.
    let _ = session.login(
        cryptoki::session::UserType::User,
        Some(&cryptoki::types::AuthPin::from(TOKEN_PIN)),
    );
    let mut out = Vec::new();
    for handle in session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap()
    {
        let (mut label, mut sensitive, mut extractable) = (String::new(), false, true);
        for a in session
            .get_attributes(
                handle,
                &[
                    AttributeType::Label,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .unwrap()
        {
            match a {
                Attribute::Label(l) => label = String::from_utf8(l).unwrap(),
                Attribute::Sensitive(v) => sensitive = v,
                Attribute::Extractable(v) => extractable = v,
                _ => {}
            }
        }
        out.push((label, sensitive, extractable));
    }
    out.sort();
    out
}

/// A layer whose key location is a token: each renewal generates its CA key inside the token
/// (sensitive, never extractable), the CSR is signed there, current.json names the key by URI
/// with its pin-source and no PIN, and what the CA signs verifies with openssl. An orphan of
/// an interrupted renewal (same label prefix) is never used and is destroyed at the next
/// commit; a key of another prefix on the same token stays (control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_generates_its_ca_key_inside_the_token() {
    let _one_at_a_time = TOKEN_TESTS.lock().await;
    let plant = Plant::new();
    let (dir, pki, root) = (plant.dir(), &plant.pki, plant.root.as_str());
    let (_top_config, top) =
        top_and_ra(dir, pki, r#"common_names = ["L3 issuing CA gw-mid"]"#).await;
    let slot = softhsm_token("deleg");
    std::fs::write(dir.join("token.pin"), format!("{TOKEN_PIN}\n")).unwrap();
    let location = format!(
        "pkcs11:token=deleg;object=mid-ca?pin-source=file:{}&module-path={SOFTHSM}",
        dir.join("token.pin").display()
    );
    // What an interrupted renewal leaves: a key of this issuer's prefix that current.json
    // never named; and a key of someone else on the same token.
    let orphan_uri = format!(
        "pkcs11:token=deleg;object=mid-ca-1;id=1?pin-source=file:{}&module-path={SOFTHSM}",
        dir.join("token.pin").display()
    );
    let orphan = edge_est::keys::TokenKey::generate(&orphan_uri, None).unwrap();
    let orphan_spki =
        rcgen::PublicKeyData::subject_public_key_info(&edge_est::keys::IssuerKey::Token(orphan));
    let other_uri = orphan_uri.replace("mid-ca-1;id=1", "other-key;id=2");
    edge_est::keys::TokenKey::generate(&other_uri, None).unwrap();

    let mut config = mid_config(pki, top.addr);
    config.enrolled_issuers.get_mut("mid").unwrap().key = Some(location);
    config.validate().unwrap();
    let mid = TestServer::start(dir, &config).await;
    enrolled_ca(&mid, std::time::Duration::from_secs(20)).await;

    // It signs, and the chain verifies with openssl against the root.
    let (answer, _) = enroll_basic(mid.addr, root, "l3-dev-tok").await;
    let leaf = leaf_of(&answer);
    assert_eq!(issuer_cn(&leaf), "L3 issuing CA gw-mid");
    let chain = cacerts(mid.addr, root).await;
    assert!(chain_verifies(dir, "tok", &leaf, &chain));

    // current.json names the token key by URI, with its pin-source and no PIN.
    let state_dir = mid_state(dir);
    let state = std::fs::read_to_string(state_dir.join("current.json")).unwrap();
    let kept: serde_json::Value = serde_json::from_str(&state).unwrap();
    let key = kept["key"].as_str().unwrap().to_owned();
    assert!(
        key.starts_with("pkcs11:token=deleg;object=mid-ca-"),
        "{key}"
    );
    assert!(key.contains("pin-source=file:"), "{key}");
    assert!(
        !state.contains("pin-value") && !state.contains(TOKEN_PIN),
        "{state}"
    );
    // No key file was written.
    assert!(std::fs::read_dir(&state_dir)
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().starts_with("key-")));

    // The CA's key is the one generated in the token for this renewal, not the orphan.
    let (_, ca) = X509Certificate::from_der(&chain[0]).unwrap();
    assert_eq!(cn_of(&chain[0]), "L3 issuing CA gw-mid");
    assert_ne!(ca.public_key().raw, &orphan_spki[..]);
    let label = edge_est::keys::Pkcs11Uri::parse(&key)
        .unwrap()
        .object
        .unwrap();
    // On the token: the CA key (sensitive, not extractable) and the other prefix's key; the
    // orphan was destroyed at the commit.
    let keys = token_private_keys(slot);
    assert_eq!(
        keys,
        vec![
            (label.clone(), true, false),
            ("other-key".into(), true, false)
        ],
        "{keys:?}"
    );
    // The kept CA loads again from its URI (what a restart does).
    let loaded = edge_est::runtime::Runtime::build(&config, dir).unwrap();
    assert!(loaded.enrolled()[0].fingerprint.is_some());
}

/// Rollover with token keys: after a renewal the key of the CA just replaced stays (the
/// runtime in force signs with it until the swap); at the renewal after, it is destroyed. The
/// token then holds the current CA's key and the previous one's, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_keys_of_replaced_cas_are_destroyed_one_renewal_later() {
    let _one_at_a_time = TOKEN_TESTS.lock().await;
    let plant = Plant::new();
    let (dir, pki) = (plant.dir(), &plant.pki);
    let (_, top) = top_and_ra(dir, pki, &granted_for_secs(9)).await;
    let slot = softhsm_token("roll");
    std::fs::write(dir.join("roll.pin"), format!("{TOKEN_PIN}\n")).unwrap();
    let mut config = mid_config(pki, top.addr);
    config.enrolled_issuers.get_mut("mid").unwrap().key = Some(format!(
        "pkcs11:token=roll?pin-source=file:{}&module-path={SOFTHSM}",
        dir.join("roll.pin").display()
    ));
    let mid = TestServer::start(dir, &config).await;
    let mut seen = vec![enrolled_ca(&mid, std::time::Duration::from_secs(20)).await];
    let until = std::time::Instant::now() + std::time::Duration::from_secs(40);
    while seen.len() < 3 {
        assert!(std::time::Instant::now() < until, "{seen:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let f = mid.app.runtime().enrolled()[0].fingerprint.unwrap();
        if f != *seen.last().unwrap() {
            seen.push(f);
        }
    }
    let keys = token_private_keys(slot);
    // Default prefix edge-est-<issuer>; three CAs made three keys, the first was destroyed.
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys
        .iter()
        .all(|(l, s, e)| l.starts_with("edge-est-mid-") && *s && !*e));
}
