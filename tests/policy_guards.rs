//! Trust decisions of the policy that no other rule would make anyway:
//!
//! - `deny = ["cn:…", "serial:…"]`: a client certificate named in `deny` is refused although
//!   a rule grants it; the same request with a certificate not named succeeds.
//! - `simplereenroll` keeps the subject and the subjectAltNames, on a label whose rules would
//!   grant the changed names (`common_names = ["*"]`, any DNS name, any `O`): only the
//!   renewal check refuses, and a `simpleenroll` of the same CSR by the same certificate
//!   succeeds (the control).

mod common;

use common::client::{basic, certs_from_answer, iot_edge_body, to_pem, Answer, EstClient};
use common::pki::Credential;
use common::{standard_config_toml, Pki, TestServer, PASSWORD, USER};
use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use time::{Duration, OffsetDateTime};

/// The standard configuration plus label `open`: certificates from the issuer may ask for any
/// CN, any DNS name and any `O`; Basic `estuser` too; and `deny` naming a CN and a serial.
fn config(pki: &Pki) -> edge_est::config::Config {
    let text = standard_config_toml(pki)
        + r#"
[[labels]]
name = "open"
issuer = "plant"
client_trust = ["bootstrap", "issuer"]
deny = ["cn:stolen-device", "serial:00:0A:BC:DE:F1", "user:nobody"]

[[labels.rules]]
match = ["certificate:*", "user:estuser"]
common_names = ["*"]
dns_names = ["*"]
subject_attributes = { O = ["*"] }
"#;
    toml::from_str(&text).unwrap()
}

fn csr(key: &KeyPair, cn: &str, o: Option<&str>, dns: &[&str]) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = o {
        params.distinguished_name.push(DnType::OrganizationName, o);
    }
    params.subject_alt_names = dns
        .iter()
        .map(|d| SanType::DnsName((*d).try_into().unwrap()))
        .collect();
    params.serialize_request(key).unwrap().der().to_vec()
}

async fn post(client: &EstClient, path: &str, basic_auth: bool, body: Vec<u8>) -> Answer {
    let mut headers = vec![("content-type", "application/pkcs10".to_owned())];
    if basic_auth {
        headers.push(basic(USER, PASSWORD));
    }
    client
        .request("POST", path, &headers, iot_edge_body(&body))
        .await
}

fn refused(answer: &Answer, says: &[&str]) {
    assert_eq!(answer.status, 403, "{}", answer.text());
    for s in says {
        assert!(answer.text().contains(s), "{:?} lacks {s:?}", answer.text());
    }
}

fn granted(answer: &Answer, cn: &str) -> Vec<u8> {
    assert_eq!(answer.status, 200, "{}", answer.text());
    let leaf = certs_from_answer(&answer.body).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert!(
        cert.subject().to_string().starts_with(&format!("CN={cn}")),
        "{}",
        cert.subject()
    );
    leaf
}

/// A bootstrap certificate (trust set `bootstrap`) with this CN and serial.
fn bootstrap(pki: &Pki, cn: &str, serial: &[u8]) -> Credential {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(30);
    let cert = params.signed_by(&key, &pki.bootstrap.issuer).unwrap();
    Credential {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn client(server: &TestServer, pki: &Pki, who: &Credential) -> EstClient {
    EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&who.cert_pem, &who.key_pem)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_cn_and_serial_refuse_certificates_a_rule_grants() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let server = TestServer::start(dir.path(), &config(&pki)).await;
    let any = || csr(&KeyPair::generate().unwrap(), "some-name", None, &[]);

    // deny cn: the client certificate's CN.
    let stolen = bootstrap(&pki, "stolen-device", &[0x11, 0x22]);
    let answer = post(
        &client(&server, &pki, &stolen),
        "open/simpleenroll",
        false,
        any(),
    )
    .await;
    refused(&answer, &["denied", "stolen-device"]);
    // Control: another CN, same CA, same request.
    let fine = bootstrap(&pki, "stolen-device-2", &[0x11, 0x23]);
    let answer = post(
        &client(&server, &pki, &fine),
        "open/simpleenroll",
        false,
        any(),
    )
    .await;
    granted(&answer, "some-name");

    // deny serial: 0A:BC:DE:F1 written with colons, a leading zero byte and upper case.
    let listed = bootstrap(&pki, "fine-device", &[0x0a, 0xbc, 0xde, 0xf1]);
    let answer = post(
        &client(&server, &pki, &listed),
        "open/simpleenroll",
        false,
        any(),
    )
    .await;
    refused(&answer, &["denied", "fine-device"]);
    // Control: one bit away, same CN.
    let other = bootstrap(&pki, "fine-device", &[0x0a, 0xbc, 0xde, 0xf0]);
    let answer = post(
        &client(&server, &pki, &other),
        "open/simpleenroll",
        false,
        any(),
    )
    .await;
    granted(&answer, "some-name");

    // The denied CN asked for in a CSR by someone else is not what `cn:` is about: it names
    // the client certificate, and Basic estuser is not denied.
    let answer = post(
        &EstClient::new(server.addr, &pki.root.cert_pem, None),
        "open/simpleenroll",
        true,
        csr(&KeyPair::generate().unwrap(), "stolen-device", None, &[]),
    )
    .await;
    granted(&answer, "stolen-device");

    assert_eq!(server.journal().len(), 3, "nothing journaled for a refusal");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simplereenroll_keeps_subject_and_alt_names_where_the_rules_would_grant_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let server = TestServer::start(dir.path(), &config(&pki)).await;
    let anonymous = EstClient::new(server.addr, &pki.root.cert_pem, None);

    // A certificate from the issuer: CN dev40, O Contoso, two DNS names.
    let key = KeyPair::generate().unwrap();
    let names = ["a.plant.local", "b.plant.local"];
    let answer = post(
        &anonymous,
        "open/simpleenroll",
        true,
        csr(&key, "dev40", Some("Contoso"), &names),
    )
    .await;
    let first = granted(&answer, "dev40");
    let device = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&to_pem(&first), &key.serialize_pem())),
    );
    let renew =
        |cn: &str, o: Option<&str>, dns: &[&str]| csr(&KeyPair::generate().unwrap(), cn, o, dns);

    // Each change, refused by the renewal check only: the same CSR by simpleenroll passes.
    let changes: [(Vec<u8>, &[&str]); 6] = [
        (
            renew("dev41", Some("Contoso"), &names),
            &["must keep the subject", "CN=dev41"],
        ),
        (
            renew("dev40", Some("Fabrikam"), &names),
            &["must keep the subject", "Fabrikam"],
        ),
        (renew("dev40", None, &names), &["must keep the subject"]),
        (
            renew("dev40", Some("Contoso"), &["a.plant.local"]),
            &["must keep the subjectAltNames"],
        ),
        (
            renew(
                "dev40",
                Some("Contoso"),
                &["a.plant.local", "c.plant.local"],
            ),
            &["must keep the subjectAltNames", "c.plant.local"],
        ),
        (
            renew("dev40", Some("Contoso"), &[]),
            &["must keep the subjectAltNames"],
        ),
    ];
    for (body, says) in changes {
        let answer = post(&device, "open/simplereenroll", false, body.clone()).await;
        refused(&answer, says);
        let answer = post(&device, "open/simpleenroll", false, body).await;
        assert_eq!(answer.status, 200, "control: {}", answer.text());
    }

    // Control: the same names (in another order, one repeated) renew.
    let answer = post(
        &device,
        "open/simplereenroll",
        false,
        renew(
            "dev40",
            Some("Contoso"),
            &["b.plant.local", "a.plant.local", "b.plant.local"],
        ),
    )
    .await;
    granted(&answer, "dev40");
    let journal = server.journal();
    assert_eq!(
        journal
            .iter()
            .filter(|e| e.operation == "simplereenroll")
            .count(),
        1
    );
    assert_eq!(journal.len(), 1 + 6 + 1);
    server.stop().await;
}

/// `subject_attributes` keys are short names or OIDs, and a key allows only its own attribute:
/// `O = ["Contoso"]` does not let `OU=Contoso` through, while `"2.5.4.11" = ["Plant"]` (OU by
/// its OID) lets `OU=Plant` through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_attributes_match_their_own_attribute_by_short_name_or_oid() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let text = standard_config_toml(&pki)
        + r#"
[[labels]]
name = "attrs"
issuer = "plant"
client_trust = ["bootstrap"]

[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]
subject_attributes = { O = ["Contoso"], "2.5.4.11" = ["Plant"] }
"#;
    let server = TestServer::start(dir.path(), &toml::from_str(&text).unwrap()).await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);
    let ask = |attrs: &[(DnType, &str)]| {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "dev50");
        for (kind, value) in attrs {
            params.distinguished_name.push(kind.clone(), *value);
        }
        params
            .serialize_request(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    };
    let ou = DnType::OrganizationalUnitName;
    let answer = post(
        &client,
        "attrs/simpleenroll",
        true,
        ask(&[(ou.clone(), "Contoso")]),
    )
    .await;
    refused(&answer, &["OU", "Contoso"]);
    let answer = post(
        &client,
        "attrs/simpleenroll",
        true,
        ask(&[(DnType::OrganizationName, "Plant")]),
    )
    .await;
    refused(&answer, &["O", "Plant"]);
    // Controls: each attribute with a value its own key allows.
    let answer = post(&client, "attrs/simpleenroll", true, ask(&[(ou, "Plant")])).await;
    granted(&answer, "dev50");
    let answer = post(
        &client,
        "attrs/simpleenroll",
        true,
        ask(&[(DnType::OrganizationName, "Contoso")]),
    )
    .await;
    granted(&answer, "dev50");
    server.stop().await;
}

/// `ip_addresses` patterns match the address as text: `10.1.*` takes 10.1.2.3 and refuses
/// 10.2.0.1 (and an IPv6 address), naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_address_patterns_match_the_address_text() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let text = standard_config_toml(&pki)
        + r#"
[[labels]]
name = "ips"
issuer = "plant"
client_trust = ["bootstrap"]

[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]
ip_addresses = ["10.1.*"]
"#;
    let server = TestServer::start(dir.path(), &toml::from_str(&text).unwrap()).await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);
    let ask = |ip: &str| {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "dev60");
        params.subject_alt_names = vec![SanType::IpAddress(ip.parse().unwrap())];
        params
            .serialize_request(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    };
    for refused_ip in ["10.2.0.1", "fd00::10:1"] {
        let answer = post(&client, "ips/simpleenroll", true, ask(refused_ip)).await;
        refused(&answer, &[refused_ip]);
    }
    // Control.
    let answer = post(&client, "ips/simpleenroll", true, ask("10.1.2.3")).await;
    granted(&answer, "dev60");
    server.stop().await;
}
