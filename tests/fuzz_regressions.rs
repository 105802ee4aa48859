//! The malformed-input corpus and every fuzzer reproducer, through the fuzz targets' own entry
//! points (`fuzz/src/lib.rs`, included below): nothing may panic or hang, and each hand-made
//! fixture must give the kind of result listed in [`EXPECTED`].
//!
//! Files in `tests/fixtures/malformed/` are named `<prefix>-<what>.<ext>`, the prefix choosing
//! the target (`harness::FIXTURE_PREFIXES`); `fuzz/run.sh` adds crashes as
//! `crash-<target>-<id>` (also `timeout-`, `oom-`, `slow-unit-`), which must then stop
//! panicking once the bug is fixed. `fuzz/corpus_gen.py fixtures DIR` regenerates the fixtures.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::Outcome;

/// What a fixture must give: `"ok"` (accepted), `"ok: <description>"` (accepted with exactly
/// that description), or the name of the error variant it must be refused with.
const EXPECTED: &[(&str, &str)] = &[
    ("auth-bad-base64.txt", "MalformedBasic"),
    ("auth-bearer.txt", "MalformedBasic"),
    ("auth-empty-user.txt", "MalformedBasic"),
    ("auth-empty.txt", "MalformedBasic"),
    ("auth-invalid-utf8-credentials.txt", "MalformedBasic"),
    ("auth-invalid-utf8-header.txt", "MalformedBasic"),
    ("auth-no-colon.txt", "MalformedBasic"),
    ("auth-scheme-only.txt", "MalformedBasic"),
    ("auth-unpadded.txt", "MalformedBasic"),
    ("body-bad-base64.txt", "Base64"),
    ("body-base64-not-a-csr.txt", "MalformedCsr"),
    ("body-base64-of-pem-of-garbage.txt", "MalformedCsr"),
    ("body-der-empty-sequence.der", "MalformedCsr"),
    ("body-der-length-overflow.der", "Base64"),
    ("body-der-trailing-byte.der", "Base64"),
    ("body-empty.txt", "EmptyBody"),
    // Base64 of a PEM text inside PEM armour: one level of nesting is unwrapped by design.
    ("body-nested-pem.txt", "ok: issued CN=device1"),
    ("body-nul-bytes.bin", "Base64"),
    ("body-pem-bad-signature.pem", "BadCsrSignature"),
    ("body-pem-empty.txt", "EmptyBody"),
    ("body-pem-no-end-line.txt", "Base64"),
    ("body-pem-unclosed-begin.txt", "Base64"),
    ("body-truncated-base64.txt", "Base64"),
    ("body-whitespace-only.txt", "EmptyBody"),
    ("config-bad-listen.json", "Parse"),
    ("config-bad-mode.json", "Parse"),
    ("config-deeply-nested.json", "Parse"),
    ("config-deeply-nested.toml", "Parse"),
    ("config-duplicate-field.json", "Parse"),
    ("config-fake-private-key-in-trust.toml", "Invalid"),
    ("config-fake-private-key-inline.json", "Invalid"),
    ("config-huge-number.json", "Parse"),
    ("config-labels-wrong-type.json", "Parse"),
    ("config-not-utf8.bin", "Parse"),
    ("config-plaintext-password.json", "Invalid"),
    ("config-truncated.json", "Parse"),
    ("config-unknown-field.json", "Parse"),
    ("cri-attribute-not-a-set.der", "MalformedCsr"),
    // An INTEGER holding OID bytes where an OBJECT IDENTIFIER belongs: asn1-rs 0.7 reads any
    // primitive element as an OID, so csr.rs checks every OID tag in one strict pass.
    ("cri-attribute-type-integer-tag.der", "MalformedCsr"),
    ("cri-challenge-password-integer.der", "MalformedCsr"),
    ("cri-challenge-password-two-values.der", "MalformedCsr"),
    ("cri-cn-bmpstring-lone-surrogate.der", "MalformedCsr"),
    ("cri-cn-bmpstring-odd-length.der", "MalformedCsr"),
    ("cri-cn-context-tag.der", "MalformedCsr"),
    // Control and format characters (CR, LF, ESC, U+202E) in a name: refused by the name
    // hygiene of est/names.rs (400), whatever the policy allows.
    ("cri-cn-control-chars.der", "Name"),
    ("cri-cn-integer-value.der", "MalformedCsr"),
    ("cri-cn-nul-byte.der", "MalformedCsr"),
    ("cri-cn-utf8-invalid.der", "MalformedCsr"),
    // Refused as malformed names (400) before the issuer could fail on them (500).
    ("cri-country-not-printable.der", "Name"),
    ("cri-dc-not-ascii.der", "Name"),
    // extKeyUsage SEQUENCE { INTEGER 1 }.
    ("cri-eku-malformed.der", "MalformedCsr"),
    ("cri-empty-subject.der", "NoCommonName"),
    ("cri-extension-oid-integer-tag.der", "MalformedCsr"),
    ("cri-extension-repeated.der", "MalformedCsr"),
    ("cri-extension-request-not-a-sequence.der", "MalformedCsr"),
    ("cri-extension-request-twice.der", "MalformedCsr"),
    ("cri-multi-valued-rdn.der", "UnsupportedSubject"),
    ("cri-no-common-name.der", "NoCommonName"),
    ("cri-repeated-cn.der", "UnsupportedSubject"),
    ("cri-san-dns-not-ascii.der", "Name"),
    ("cri-san-ip-5-bytes.der", "SanNotAllowed"),
    ("cri-san-malformed.der", "MalformedCsr"),
    ("cri-san-othername.der", "SanNotAllowed"),
    ("cri-spki-algorithm-integer-tag.der", "MalformedCsr"),
    ("cri-truncated.der", "MalformedCsr"),
    ("cri-unlisted-attribute-huge-arc.der", "SubjectNotAllowed"),
    ("cri-version-1.der", "MalformedCsr"),
    (
        "cri-wrong-key-for-signature.der",
        "UnsupportedSignatureAlgorithm",
    ),
    ("csr-bad-signature.der", "BadCsrSignature"),
    ("csr-deep-nesting.ber", "MalformedCsr"),
    ("csr-ec-compressed-point.der", "UnsupportedKey"),
    ("csr-ec-no-curve.der", "UnsupportedKey"),
    ("csr-ec-p521-key.der", "UnsupportedKey"),
    ("csr-ecdsa-sha1.der", "UnsupportedSignatureAlgorithm"),
    (
        "csr-ecdsa-signature-rsa-key.der",
        "UnsupportedSignatureAlgorithm",
    ),
    ("csr-ed448-key.der", "UnsupportedKey"),
    ("csr-empty.der", "MalformedCsr"),
    ("csr-indefinite-length.ber", "MalformedCsr"),
    ("csr-length-overflow.der", "MalformedCsr"),
    ("csr-malformed-oid.der", "MalformedCsr"),
    ("csr-md5-with-rsa.der", "UnsupportedSignatureAlgorithm"),
    ("csr-rsa-1024.der", "UnsupportedKey"),
    ("csr-rsa-8192-bits.der", "UnsupportedKey"),
    ("csr-rsa-even-exponent.der", "UnsupportedKey"),
    ("csr-rsa-exponent-40-bits.der", "UnsupportedKey"),
    ("csr-signature-params-not-null.der", "MalformedCsr"),
    ("csr-signature-unused-bits.der", "MalformedCsr"),
    ("csr-trailing-data.der", "MalformedCsr"),
    ("csr-truncated.der", "MalformedCsr"),
    ("csr-version-1.der", "MalformedCsr"),
    ("csrattrs-double-dot.txt", "Invalid"),
    ("csrattrs-duplicate-value.txt", "Invalid"),
    ("csrattrs-empty-value.txt", "Invalid"),
    ("csrattrs-empty.txt", "Invalid"),
    ("csrattrs-first-arc-3.txt", "Invalid"),
    ("csrattrs-huge-arc.txt", "Invalid"),
    ("csrattrs-one-arc.txt", "Invalid"),
    ("csrattrs-only-equals.txt", "Invalid"),
    ("csrattrs-second-arc-40.txt", "Invalid"),
    ("csrattrs-too-long.txt", "Invalid"),
    ("csrattrs-two-short-arcs.txt", "Invalid"),
    ("csrattrs-unknown-name.txt", "Invalid"),
    ("path-absolute-uri.txt", "NotEst"),
    ("path-control-chars.txt", "InvalidLabel"),
    ("path-dotdot-deep.txt", "TooManySegments"),
    ("path-dotdot.txt", "InvalidLabel"),
    ("path-double-slash.txt", "EmptySegment"),
    ("path-empty.txt", "NotEst"),
    ("path-huge-operation.txt", "UnknownOperation"),
    ("path-invalid-utf8.txt", "InvalidLabel"),
    ("path-label-too-long.txt", "InvalidLabel"),
    ("path-many-slashes.txt", "TooManySegments"),
    ("path-no-operation.txt", "MissingOperation"),
    ("path-nul-byte.txt", "InvalidLabel"),
    ("path-operation-as-label.txt", "InvalidLabel"),
    ("path-percent-encoded-dotdot.txt", "InvalidLabel"),
    ("path-query-string.txt", "UnknownOperation"),
    ("path-trailing-slash.txt", "EmptySegment"),
    ("path-unknown-operation.txt", "UnknownOperation"),
    ("pattern-cn-with-star.txt", "ok: false false"),
    ("pattern-many-stars.txt", "ok: false false"),
    ("pattern-missing-cn.txt", "ok: false false"),
    ("pattern-missing-user.txt", "ok: false false"),
    ("pattern-multibyte-fold.txt", "ok: false false"),
    ("pattern-stray-closing-brace.txt", "Parse"),
    ("pattern-unclosed-brace.txt", "Parse"),
    ("pattern-unknown-placeholder.txt", "Parse"),
    ("pkcs7-bad-base64.txt", "Base64"),
    ("pkcs7-base64-of-garbage.txt", "MalformedPkcs7"),
    // BER lengths are normalised to DER by design (OpenSSL-based CAs).
    (
        "pkcs7-certificate-long-form-length.ber",
        "ok: 1 certificates",
    ),
    ("pkcs7-certificate-not-a-sequence.der", "MalformedPkcs7"),
    ("pkcs7-certificate-truncated.der", "MalformedPkcs7"),
    (
        "pkcs7-constructed-octet-string-holds-integer.ber",
        "MalformedPkcs7",
    ),
    ("pkcs7-deep-nesting.ber", "MalformedPkcs7"),
    ("pkcs7-empty.txt", "EmptyBody"),
    ("pkcs7-high-tag-number.ber", "MalformedPkcs7"),
    (
        "pkcs7-indefinite-length-no-end-of-contents.ber",
        "MalformedPkcs7",
    ),
    ("pkcs7-indefinite-length-primitive.ber", "MalformedPkcs7"),
    ("pkcs7-indefinite-length.ber", "ok: 1 certificates"),
    ("pkcs7-length-overflow.der", "MalformedPkcs7"),
    ("pkcs7-pem-no-end-line.txt", "Base64"),
    ("pkcs7-signeddata-version-9.der", "MalformedPkcs7"),
    ("pkcs7-trailing-data.der", "MalformedPkcs7"),
    ("pkcs7-truncated.der", "MalformedPkcs7"),
    ("pkcs7-wrong-content-type.der", "MalformedPkcs7"),
];

/// Fixtures on which edge-est is known to answer wrongly (no panic, but not the right kind of
/// result): (name, the right result, the result today). The test holds today's result so that
/// it passes; once the bug is fixed it fails and asks for the entry to move to [`EXPECTED`].
const KNOWN_WRONG: &[(&str, &str, &str)] = &[];

/// No single input may take longer than this (a debug build of edge-est; the fuzzer's own
/// timeout is much lower on optimised builds).
const MAX_TIME: Duration = Duration::from_secs(10);

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/malformed")
}

fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures/malformed exists")
        .map(|entry| entry.expect("readable directory").file_name())
        .map(|name| name.into_string().expect("UTF-8 file name"))
        .filter(|name| !name.starts_with('.') && name != "README.md")
        .collect();
    names.sort();
    names
}

fn is_reproducer(name: &str) -> bool {
    harness::ARTIFACT_KINDS
        .iter()
        .any(|kind| name.starts_with(&format!("{kind}-")))
}

fn matches_expectation(outcome: &Outcome, expected: &str) -> bool {
    match (outcome, expected.strip_prefix("ok")) {
        (Outcome::Accepted(_), Some("")) => true,
        (Outcome::Accepted(got), Some(rest)) => rest.strip_prefix(": ") == Some(got.as_str()),
        (Outcome::Rejected(kind), None) => kind == expected,
        _ => false,
    }
}

/// Runs one file through its target, catching a panic; the error says what went wrong.
fn run(name: &str) -> Result<Outcome, String> {
    let (target, entry) = harness::target_for_file(name).ok_or_else(|| {
        format!("{name}: the name matches no fuzz target (see harness::FIXTURE_PREFIXES)")
    })?;
    let data = std::fs::read(fixtures_dir().join(name)).map_err(|e| format!("{name}: {e}"))?;
    let started = Instant::now();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| entry(&data)))
        .map_err(|_| format!("{name}: target {target} panicked (message above)"))?;
    let took = started.elapsed();
    if took > MAX_TIME {
        return Err(format!("{name}: target {target} took {took:?}"));
    }
    Ok(outcome)
}

#[test]
fn every_fixture_and_reproducer_passes() {
    let mut failures = Vec::new();
    let mut ran = 0;
    for name in fixture_names() {
        let outcome = match run(&name) {
            Ok(outcome) => outcome,
            Err(why) => {
                failures.push(why);
                continue;
            }
        };
        ran += 1;
        if is_reproducer(&name) {
            continue;
        }
        if let Some((_, right, today)) = KNOWN_WRONG.iter().find(|(n, _, _)| *n == name) {
            if matches_expectation(&outcome, right) {
                failures.push(format!(
                    "{name}: now gives the right result ({right}): move it from KNOWN_WRONG to EXPECTED"
                ));
            } else if !matches_expectation(&outcome, today) {
                failures.push(format!(
                    "{name}: expected {right} (known to give {today} today), got {outcome:?}"
                ));
            }
            continue;
        }
        match EXPECTED.iter().find(|(n, _)| *n == name) {
            Some((_, expected)) if matches_expectation(&outcome, expected) => {}
            Some((_, expected)) => {
                failures.push(format!("{name}: expected {expected}, got {outcome:?}"));
            }
            None => failures.push(format!(
                "{name}: no entry in EXPECTED (this run gave {outcome:?})"
            )),
        }
    }
    assert!(ran > 0, "no fixtures ran");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The wrongly tagged OIDs are refused with a message saying where.
#[test]
fn misplaced_oid_tags_are_explained() {
    for (name, wanted) in [
        (
            "cri-attribute-type-integer-tag.der",
            "the type of attribute #1 of the subject is an INTEGER (0x02) \
             instead of an OBJECT IDENTIFIER (0x06)",
        ),
        (
            "cri-extension-oid-integer-tag.der",
            "the extnID of requested extension #1 is an INTEGER (0x02) \
             instead of an OBJECT IDENTIFIER (0x06)",
        ),
        (
            "cri-spki-algorithm-integer-tag.der",
            "its public key algorithm is an INTEGER (0x02) \
             instead of an OBJECT IDENTIFIER (0x06)",
        ),
        (
            "cri-eku-malformed.der",
            "purpose #1 of the requested extKeyUsage is an INTEGER (0x02) \
             instead of an OBJECT IDENTIFIER (0x06)",
        ),
    ] {
        let cri = std::fs::read(fixtures_dir().join(name)).expect("fixture");
        match edge_est::est::Csr::from_der(&harness::sign_cri(&cri)) {
            Err(edge_est::est::ProtocolError::MalformedCsr(why)) => assert_eq!(why, wanted),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn every_expectation_has_its_fixture() {
    let names = fixture_names();
    let missing: Vec<&str> = EXPECTED
        .iter()
        .map(|(name, _)| *name)
        .chain(KNOWN_WRONG.iter().map(|(name, _, _)| *name))
        .filter(|name| !names.iter().any(|n| n == name))
        .collect();
    assert!(missing.is_empty(), "fixtures missing: {missing:?}");
}

#[test]
fn file_names_choose_targets() {
    let target = |name: &str| harness::target_for_file(name).map(|(t, _)| t);
    assert_eq!(target("csr-truncated.der"), Some("csr_der"));
    assert_eq!(target("csrattrs-empty.txt"), Some("csrattrs"));
    assert_eq!(target("cri-x.der"), Some("csr_signed"));
    assert_eq!(target("crash-csr_signed-0a1b"), Some("csr_signed"));
    assert_eq!(
        target("timeout-pkcs7_certs_only-0a1b"),
        Some("pkcs7_certs_only")
    );
    assert_eq!(target("crash-csr-0a1b"), None);
    assert_eq!(target("notes.txt"), None);
}

/// The entry points reach their deepest stage on valid input, so the invariants they check
/// there (issued certificate = grant, round trips) are exercised.
#[test]
fn valid_inputs_go_all_the_way() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["gw.plant.local".to_owned(), "10.1.2.3".to_owned()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "plant1-gw");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Contoso");
    let csr = params.serialize_request(&key).unwrap();
    let accepted = |o: Outcome| matches!(o, Outcome::Accepted(d) if d.starts_with("issued"));
    assert!(accepted(harness::body_csr(csr.pem().unwrap().as_bytes())));
    assert!(accepted(harness::csr_der(csr.der())));

    // csr_signed: a CertificationRequestInfo carrying the harness key, signed by the harness.
    let mut cri = vec![0x02, 0x01, 0x00];
    let cn = b"device1";
    let name = [
        &[
            0x30, 0x12, 0x31, 0x10, 0x30, 0x0e, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x07,
        ][..],
        cn,
    ]
    .concat();
    cri.extend_from_slice(&name);
    cri.extend_from_slice(&harness::fixed_spki());
    cri.extend_from_slice(&[0xa0, 0x00]);
    let cri = [&[0x30, cri.len() as u8][..], &cri].concat();
    assert_eq!(
        harness::csr_signed(&cri),
        Outcome::Accepted("issued CN=device1".to_owned())
    );

    // Certs-only: our own encoding of the CSR-signing CA's certificate, raw and in base64.
    let ca = rcgen::CertificateParams::new(vec!["ca".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let p7 = edge_est::est::pkcs7::encode_certs_only(&[ca.der(), ca.der()]).unwrap();
    let two = Outcome::Accepted("2 certificates".to_owned());
    assert_eq!(harness::pkcs7_certs_only(&p7), two);
    let text = edge_est::est::body::encode_base64_lines(&p7);
    assert_eq!(harness::pkcs7_certs_only(text.as_bytes()), two);

    assert_eq!(
        harness::route(b"/.well-known/est/edge-ca/simpleenroll"),
        Outcome::Accepted("/.well-known/est/edge-ca/simpleenroll".to_owned())
    );
    assert!(matches!(
        harness::basic_auth(b"Basic ZXN0dXNlcjpwdw=="),
        Outcome::Accepted(_)
    ));
    let config = br#"{"journal": "j", "tls": {"certificate": "c.pem", "key": "k.pem"},
        "users": {"u": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"}, "labels": [{}]}"#;
    assert_eq!(
        harness::config(config),
        Outcome::Accepted("1 labels".to_owned())
    );
    assert_eq!(
        harness::pattern(b"{cn}-*\nGW-1\ngw"),
        Outcome::Accepted("false true".to_owned())
    );
    assert_eq!(
        harness::csr_attrs(b"ecPublicKey=secp384r1\nchallengePassword"),
        Outcome::Accepted("2 attributes".to_owned())
    );
}
