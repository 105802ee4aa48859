//! Names an attacker asks for, through the real TLS server: every malformed name is refused
//! with 400 (or, a well-formed name the rules do not allow, 403) and a text saying which name
//! and why; never issued, never a 500. Each class has a positive control: the same request
//! with a legitimate name is issued.

mod common;

use common::client::{basic, certs_from_answer, iot_edge_body, EstClient};
use common::{label, standard_config, Pki, TestServer, PASSWORD, USER};
use rcgen::{CertificateParams, CustomExtension, DnType, DnValue, KeyPair};
use x509_parser::prelude::*;

const DNS: u8 = 2;
const EMAIL: u8 = 1;
const URI: u8 = 6;

fn der_len(len: usize) -> Vec<u8> {
    match len {
        0..=0x7f => vec![len as u8],
        0x80..=0xff => vec![0x81, len as u8],
        _ => vec![0x82, (len >> 8) as u8, len as u8],
    }
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(content.len()));
    out.extend_from_slice(content);
    out
}

/// A CSR for CN `cn` with subjectAltNames given as raw (GeneralName tag, bytes): any bytes
/// at all, as an attacker would encode them.
fn csr(cn: &str, sans: &[(u8, &[u8])]) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, DnValue::Utf8String(cn.to_owned()));
    if !sans.is_empty() {
        let names: Vec<u8> = sans
            .iter()
            .flat_map(|(tag, bytes)| tlv(0x80 | tag, bytes))
            .collect();
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(
                &[2, 5, 29, 17],
                tlv(0x30, &names),
            ));
    }
    params.serialize_request(&key).unwrap().der().to_vec()
}

struct Case {
    what: &'static str,
    cn: String,
    sans: Vec<(u8, Vec<u8>)>,
    status: u16,
    /// A part of the answer's text (or, for 200, a name the certificate must carry).
    says: &'static str,
}

fn case(
    what: &'static str,
    cn: &str,
    sans: &[(u8, &str)],
    status: u16,
    says: &'static str,
) -> Case {
    Case {
        what,
        cn: cn.to_owned(),
        sans: sans
            .iter()
            .map(|(tag, s)| (*tag, s.as_bytes().to_vec()))
            .collect(),
        status,
        says,
    }
}

fn cases() -> Vec<Case> {
    let long_label = format!("{}.plant.local", "a".repeat(64));
    let long_name = format!("{}.plant.local", ["abcdefghij"; 23].join("."));
    let mut cases = vec![
        // The names reproduced in the finding.
        case(
            "NUL in a DNS name",
            "dev1",
            &[(DNS, "victim.example\0.plant.local")],
            400,
            "is not a DNS name: it holds U+0000",
        ),
        case(
            "NUL in an email",
            "dev1",
            &[(EMAIL, "ceo@corp.example\0@plant.local")],
            400,
            "is not an email address",
        ),
        case(
            "slash in a DNS name",
            "dev1",
            &[(DNS, "evil.com/.plant.local")],
            400,
            "it holds '/'",
        ),
        case(
            "a wildcard the pattern did not grant",
            "dev1",
            &[(DNS, "*.plant.local")],
            403,
            "subjectAltName DNS:*.plant.local is not allowed",
        ),
        case(
            "CR/LF in the CN",
            "dev1\r\nX-Injected: 1",
            &[],
            400,
            "control character U+000D",
        ),
        case(
            "a CN of 10,000 characters",
            &"c".repeat(10_000),
            &[],
            400,
            "10000 characters long; at most 64",
        ),
        case(
            "a non-ASCII DNS name",
            "dev1",
            &[(DNS, "bücher.plant.local")],
            400,
            "non-ASCII character U+00FC",
        ),
        // More of the class.
        case(
            "LF in a DNS name",
            "dev1",
            &[(DNS, "gw1.plant.local\nX")],
            400,
            "U+000A",
        ),
        case(
            "a trailing dot",
            "dev1",
            &[(DNS, "gw1.plant.local.")],
            400,
            "ends with a dot",
        ),
        case(
            "an empty label",
            "dev1",
            &[(DNS, "gw1..plant.local")],
            400,
            "empty label",
        ),
        case(
            "a space",
            "dev1",
            &[(DNS, "gw 1.plant.local")],
            400,
            "U+0020",
        ),
        case(
            "an underscore",
            "dev1",
            &[(DNS, "gw_1.plant.local")],
            400,
            "'_'",
        ),
        case(
            "a leading hyphen",
            "dev1",
            &[(DNS, "-gw.plant.local")],
            400,
            "hyphen",
        ),
        case(
            "a label of 64 characters",
            "dev1",
            &[(DNS, &long_label)],
            400,
            "at most 63",
        ),
        case(
            "a name of 264 characters",
            "dev1",
            &[(DNS, &long_name)],
            400,
            "at most 253",
        ),
        case(
            "a wildcard inside",
            "dev1",
            &[(DNS, "gw.*.plant.local")],
            400,
            "leftmost",
        ),
        case(
            "a partial wildcard",
            "dev1",
            &[(DNS, "gw*.plant.local")],
            400,
            "'*'",
        ),
        case(
            "a wildcard right below the TLD",
            "dev1",
            &[(DNS, "*.local")],
            400,
            "two labels",
        ),
        case("DEL in the CN", "dev\u{7f}1", &[], 400, "U+007F"),
        case("a C1 control in the CN", "dev\u{85}1", &[], 400, "U+0085"),
        case(
            "an ANSI escape in the CN",
            "dev\u{1b}[31m1",
            &[],
            400,
            "U+001B",
        ),
        case(
            "a bidi override in the CN",
            "gw\u{202e}1",
            &[],
            400,
            "invisible formatting character U+202E",
        ),
        case(
            "a CN of 65 characters",
            &"c".repeat(65),
            &[],
            400,
            "at most 64",
        ),
        case(
            "an email with two @",
            "dev1",
            &[(EMAIL, "ceo@corp.example@plant.local")],
            400,
            "more than one @",
        ),
        case(
            "an email with a quoted local part",
            "dev1",
            &[(EMAIL, "\"a b\"@plant.local")],
            400,
            "local part holds",
        ),
        case(
            "a URI with a space",
            "dev1",
            &[(URI, "spiffe://plant.local/a b")],
            400,
            "is not a URI",
        ),
        case(
            "a URI with user information",
            "dev1",
            &[(URI, "https://ceo@plant.local/")],
            400,
            "user information",
        ),
        case(
            "a URI with NUL",
            "dev1",
            &[(URI, "spiffe://plant.local/\0")],
            400,
            "U+0000",
        ),
        case(
            "one bad name among good ones",
            "dev1",
            &[(DNS, "gw1.plant.local"), (DNS, "gw2.plant.local\0")],
            400,
            "gw2.plant.local",
        ),
        // Positive controls: the same shapes, legitimate.
        case(
            "a DNS name the pattern allows",
            "dev1",
            &[(DNS, "gw1.plant.local")],
            200,
            "gw1.plant.local",
        ),
        case(
            "a deeper DNS name",
            "dev1",
            &[(DNS, "a.b.plant.local")],
            200,
            "a.b.plant.local",
        ),
        case(
            "an A-label",
            "dev1",
            &[(DNS, "xn--bcher-kva.plant.local")],
            200,
            "xn--bcher-kva.plant.local",
        ),
        case(
            "a literal wildcard granted by {*}",
            "dev1",
            &[(DNS, "*.wild.local")],
            200,
            "*.wild.local",
        ),
        case(
            "an email",
            "dev1",
            &[(EMAIL, "dev1@plant.local")],
            200,
            "dev1@plant.local",
        ),
        case(
            "a URI",
            "dev1",
            &[(URI, "spiffe://plant.local/dev1")],
            200,
            "spiffe://plant.local/dev1",
        ),
        case("a CN of 64 characters", &"c".repeat(64), &[], 200, ""),
        case(
            "a CN of 64 non-ASCII characters",
            &"é".repeat(64),
            &[],
            200,
            "",
        ),
    ];
    // A label of exactly 63 characters, a name of exactly 253.
    let label63 = format!("{}.plant.local", "a".repeat(63));
    let name253 = format!(
        "{a60}.{a60}.{a60}.{}.plant.local",
        "a".repeat(58),
        a60 = "a".repeat(60)
    );
    assert_eq!(name253.len(), 253);
    cases.push(Case {
        what: "a label of 63 characters",
        cn: "dev1".into(),
        sans: vec![(DNS, label63.into_bytes())],
        status: 200,
        says: "",
    });
    cases.push(Case {
        what: "a name of 253 characters",
        cn: "dev1".into(),
        sans: vec![(DNS, name253.into_bytes())],
        status: 200,
        says: "",
    });
    cases
}

#[tokio::test]
async fn malformed_names_are_refused_with_the_reason_and_legitimate_ones_issued() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    let rule = &mut label(&mut config, None).rules[0];
    assert_eq!(rule.matches, ["user:estuser"]);
    rule.dns_names = vec!["*.plant.local".into(), "{*}.wild.local".into()];
    rule.emails = vec!["*@plant.local".into(), "*@corp.example".into()];
    rule.uris = vec!["spiffe://plant.local/*".into(), "https://*".into()];
    let server = TestServer::start(dir.path(), &config).await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);

    let mut failures = Vec::new();
    let mut issued = 0;
    for case in cases() {
        let sans: Vec<(u8, &[u8])> = case.sans.iter().map(|(t, b)| (*t, b.as_slice())).collect();
        let answer = client
            .request(
                "POST",
                "simpleenroll",
                &[
                    basic(USER, PASSWORD),
                    ("content-type", "application/pkcs10".into()),
                ],
                iot_edge_body(&csr(&case.cn, &sans)),
            )
            .await;
        let text = answer.text();
        if answer.status != case.status {
            failures.push(format!(
                "{}: status {} (wanted {}): {text}",
                case.what, answer.status, case.status
            ));
            continue;
        }
        if case.status == 200 {
            issued += 1;
            let certs = certs_from_answer(&answer.body);
            let (_, cert) = X509Certificate::from_der(&certs[0]).unwrap();
            let names: Vec<String> = cert
                .subject_alternative_name()
                .unwrap()
                .map(|ext| {
                    ext.value
                        .general_names
                        .iter()
                        .map(|n| match n {
                            GeneralName::DNSName(s)
                            | GeneralName::RFC822Name(s)
                            | GeneralName::URI(s) => (*s).to_owned(),
                            other => format!("{other:?}"),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let cn = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok())
                .unwrap_or_default()
                .to_owned();
            if cn != case.cn || (!case.says.is_empty() && !names.iter().any(|n| n == case.says)) {
                failures.push(format!("{}: issued CN {cn:?} names {names:?}", case.what));
            }
        } else {
            if !text.contains(case.says) {
                failures.push(format!(
                    "{}: text {text:?} lacks {:?}",
                    case.what, case.says
                ));
            }
            // The text is one line, however the name was made.
            if text.trim_end().contains(['\n', '\r', '\0']) || text.len() > 400 {
                failures.push(format!("{}: unsafe text {text:?}", case.what));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Only the positive controls reached the journal.
    assert_eq!(server.journal().len(), issued);
    server.stop().await;
}
