//! Entry points shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`) and the regression test
//! (`tests/fuzz_regressions.rs`, which includes this file as a module).
//!
//! Each entry point takes untrusted bytes, drives them through edge-est's parsers the way the
//! server does, checks the invariants that must hold whatever the input (a broken invariant
//! panics, which the fuzzer reports as a crash), and says what came out: accepted, or refused
//! with an error of some kind (the error's variant name, e.g. `Base64` or `MalformedCsr`).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::OnceLock;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use edge_est::auth::basic::parse_authorization;
use edge_est::auth::Identity;
use edge_est::config::{Config, RuleConfig};
use edge_est::est::name::{sans_from_general_names, Subject};
use edge_est::est::{body, csrattrs, media, pkcs7, route as est_route, Csr};
use edge_est::issue::{profile, LocalIssuer, Profile};
use edge_est::policy::{Pattern, Policy, Vars};

/// What an entry point made of its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted; a short description of the result.
    Accepted(String),
    /// Refused with an error of this kind (the error's variant name).
    Rejected(String),
}

impl Outcome {
    fn rejected(err: &impl Debug) -> Outcome {
        Outcome::Rejected(kind(err))
    }
}

/// An entry point: untrusted bytes in, what came of them out.
pub type Entry = fn(&[u8]) -> Outcome;

/// Every fuzz target, by its name in `fuzz/fuzz_targets/`.
pub const TARGETS: &[(&str, Entry)] = &[
    ("body_csr", body_csr),
    ("csr_der", csr_der),
    ("csr_signed", csr_signed),
    ("pkcs7_certs_only", pkcs7_certs_only),
    ("route", route),
    ("basic_auth", basic_auth),
    ("config", config),
    ("pattern", pattern),
    ("csrattrs", csr_attrs),
];

/// File name prefixes of the hand-made fixtures in `tests/fixtures/malformed/`, and the
/// target each one is fed to.
pub const FIXTURE_PREFIXES: &[(&str, &str)] = &[
    ("body-", "body_csr"),
    ("csr-", "csr_der"),
    ("cri-", "csr_signed"),
    ("pkcs7-", "pkcs7_certs_only"),
    ("path-", "route"),
    ("auth-", "basic_auth"),
    ("config-", "config"),
    ("pattern-", "pattern"),
    ("csrattrs-", "csrattrs"),
];

/// Prefixes libFuzzer gives its artifacts; `fuzz/run.sh` keeps them as `<kind>-<target>-<id>`.
pub const ARTIFACT_KINDS: &[&str] = &["crash", "timeout", "oom", "leak", "slow-unit"];

/// The target a fixture or reproducer file belongs to, by its name; `None` if the name fits
/// neither convention.
pub fn target_for_file(name: &str) -> Option<(&'static str, Entry)> {
    let target = |t: &str| TARGETS.iter().copied().find(|(n, _)| *n == t);
    for kind in ARTIFACT_KINDS {
        if let Some(rest) = name.strip_prefix(kind).and_then(|r| r.strip_prefix('-')) {
            return TARGETS
                .iter()
                .copied()
                .find(|(t, _)| rest.strip_prefix(t).is_some_and(|r| r.starts_with('-')));
        }
    }
    FIXTURE_PREFIXES
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .and_then(|(_, t)| target(t))
}

/// The variant name of an error: its `Debug` text up to the first `(`, `{` or space.
pub fn kind(err: &impl Debug) -> String {
    let text = format!("{err:?}");
    let end = text.find(['(', '{', ' ']).unwrap_or(text.len());
    text[..end].to_owned()
}

// --- request bodies and CSRs --------------------------------------------------------------------

/// A `simpleenroll` body: decoded (base64 / PEM / DER), parsed and verified as a CSR,
/// authorized and issued, as the server does.
pub fn body_csr(data: &[u8]) -> Outcome {
    match body::decode_request_body(data) {
        Ok(der) => {
            assert!(!der.is_empty(), "decode_request_body returned nothing");
            csr_pipeline(&der)
        }
        Err(e) => Outcome::rejected(&e),
    }
}

/// A DER CSR as it comes out of the body decoder.
pub fn csr_der(data: &[u8]) -> Outcome {
    csr_pipeline(data)
}

/// `data` is a CertificationRequestInfo; it is signed here with [`fixed_ed25519`] so that the
/// fuzzer gets past the proof of possession into subject, attribute and extension parsing,
/// policy and issuance. Seeds carry the fixed key's SubjectPublicKeyInfo ([`fixed_spki`]).
pub fn csr_signed(data: &[u8]) -> Outcome {
    csr_pipeline(&sign_cri(data))
}

/// The Ed25519 key that signs [`csr_signed`] inputs, derived from a constant seed (no key
/// material is stored anywhere). Its PKCS#8 form is `302e020100300506032b657004220420` followed
/// by 32 bytes of 0x42, which `fuzz/seeds.sh` uses to make seeds with openssl.
pub fn fixed_ed25519() -> &'static Ed25519KeyPair {
    static KEY: OnceLock<Ed25519KeyPair> = OnceLock::new();
    KEY.get_or_init(|| {
        Ed25519KeyPair::from_seed_unchecked(&[0x42; 32]).expect("a 32-byte Ed25519 seed")
    })
}

/// The SubjectPublicKeyInfo of [`fixed_ed25519`].
pub fn fixed_spki() -> Vec<u8> {
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(fixed_ed25519().public_key().as_ref());
    spki
}

/// `SEQUENCE { cri, AlgorithmIdentifier Ed25519, BIT STRING signature }`.
pub fn sign_cri(cri: &[u8]) -> Vec<u8> {
    const ALG_ED25519: &[u8] = &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
    let signature = fixed_ed25519().sign(cri);
    let mut content = Vec::with_capacity(cri.len() + 80);
    content.extend_from_slice(cri);
    content.extend_from_slice(ALG_ED25519);
    content.extend_from_slice(&[0x03, 0x41, 0x00]);
    content.extend_from_slice(signature.as_ref());
    let mut der = vec![0x30];
    push_der_length(&mut der, content.len());
    der.extend_from_slice(&content);
    der
}

fn push_der_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    out.push(0x80 | (bytes.len() - skip) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

/// The state the CSR pipeline needs, made once: a permissive policy and a local issuer.
struct Pipeline {
    policy: Policy,
    issuer: LocalIssuer,
    profile: Profile,
    ca_profile: Profile,
}

fn pipeline() -> &'static Pipeline {
    static PIPELINE: OnceLock<Pipeline> = OnceLock::new();
    PIPELINE.get_or_init(|| {
        let any = || vec!["*".to_owned()];
        let attributes: BTreeMap<String, Vec<String>> = [
            "O",
            "OU",
            "C",
            "ST",
            "L",
            "DC",
            "serialNumber",
            "emailAddress",
            "2.5.4.4",
            "2.5.4.42",
        ]
        .into_iter()
        .map(|name| (name.to_owned(), any()))
        .collect();
        let rule = RuleConfig {
            matches: vec!["user:*".to_owned()],
            common_names: any(),
            ca_common_names: any(),
            dns_names: any(),
            ip_addresses: any(),
            uris: any(),
            emails: any(),
            subject_attributes: attributes,
            ..RuleConfig::default()
        };
        let policy = Policy::new(&[rule], &["user:denied".to_owned()], &[]).expect("policy");

        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edge-est fuzz issuing CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let ca = params.self_signed(&key).expect("CA certificate");
        let issuer = LocalIssuer::load(&ca.pem(), &key.serialize_pem()).expect("issuer");

        let builtin = profile::builtin();
        let profile = |name: &str| Profile::try_from((name, &builtin[name])).expect("profile");
        Pipeline {
            policy,
            issuer,
            profile: profile("identity"),
            ca_profile: profile("edge-ca"),
        }
    })
}

/// `Csr::from_der`, then what the server does with an accepted CSR: authorize it (Basic user
/// `estuser`, a policy allowing any names) and issue it; the issued certificate must carry
/// exactly the granted subject, subjectAltNames and the CSR's key.
fn csr_pipeline(der: &[u8]) -> Outcome {
    let csr = match Csr::from_der(der) {
        Ok(csr) => csr,
        Err(e) => return Outcome::rejected(&e),
    };
    assert_eq!(csr.der(), der, "Csr::der is not the input");
    // What logs and error texts do with a CSR: nothing may panic, and the challenge password
    // never shows in `{:?}`.
    let debug = format!("{csr:?}");
    if csr.challenge_password().is_some() {
        assert!(
            debug.contains("<redacted>"),
            "challenge password not redacted"
        );
    }
    let _ = (csr.subject().to_string(), csr.key().to_string());
    let _ = csr.sans().iter().map(ToString::to_string).count();
    let _ = (
        csr.signature_algorithm(),
        csr.requested_ca(),
        csr.requested_key_usage_cert_sign(),
        csr.requested_eku().len(),
        csr.requested_extension_oids().len(),
    );

    let p = pipeline();
    let identity = Identity {
        certificate: None,
        user: Some("estuser".to_owned()),
    };
    let grant = match p.policy.authorize(&identity, &csr, false) {
        Ok(grant) => grant,
        Err(refusal) => {
            let _ = refusal.to_string();
            return Outcome::rejected(&refusal);
        }
    };
    let profile = if grant.ca { &p.ca_profile } else { &p.profile };
    let issued = match p.issuer.issue(
        &grant.subject,
        &grant.sans,
        csr.spki_der(),
        csr.key(),
        profile,
    ) {
        Ok(issued) => issued,
        Err(e) => {
            let _ = e.to_string();
            return Outcome::rejected(&e);
        }
    };
    check_issued(&issued.der, &grant, &csr);
    Outcome::Accepted(format!("issued {}", grant.subject))
}

fn check_issued(der: &[u8], grant: &edge_est::policy::Grant, csr: &Csr) {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (rest, cert) = X509Certificate::from_der(der).expect("the issued certificate parses");
    assert!(
        rest.is_empty(),
        "trailing bytes after the issued certificate"
    );
    let subject = Subject::from_x509_name(cert.subject()).expect("issued subject readable");
    assert_eq!(
        subject, grant.subject,
        "issued subject differs from the grant"
    );
    let mut sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => sans_from_general_names(&ext.value.general_names),
        Ok(None) => Vec::new(),
        Err(e) => panic!("issued subjectAltName unreadable: {e}"),
    };
    sans.sort();
    sans.dedup();
    assert_eq!(
        sans, grant.sans,
        "issued subjectAltNames differ from the grant"
    );
    // The key, not its encoding: rcgen re-encodes the SubjectPublicKeyInfo.
    let (_, requested) = x509_parser::x509::SubjectPublicKeyInfo::from_der(csr.spki_der())
        .expect("the CSR's key parses again");
    let issued = cert.public_key();
    assert_eq!(
        (
            issued.algorithm.algorithm.as_bytes(),
            &issued.subject_public_key.data
        ),
        (
            requested.algorithm.algorithm.as_bytes(),
            &requested.subject_public_key.data
        ),
        "issued key differs from the CSR's"
    );
    assert_eq!(
        cert.is_ca(),
        grant.ca,
        "issued CA flag differs from the grant"
    );
}

// --- upstream answers ---------------------------------------------------------------------------

/// A certs-only PKCS#7 answer. Both ways in are run on every input: the upstream client's
/// (`decode_base64_body`, then `decode_certs_only`) and raw DER/BER (`decode_certs_only`).
/// The outcome is the raw decoder's when the input starts like a SEQUENCE (0x30), else the
/// base64 path's. Every decoded message must re-encode to the same certificates.
pub fn pkcs7_certs_only(data: &[u8]) -> Outcome {
    let raw = certs_only(data);
    let text = match body::decode_base64_body(data) {
        Ok(der) => {
            assert!(!der.is_empty(), "decode_base64_body returned nothing");
            certs_only(&der)
        }
        Err(e) => Outcome::rejected(&e),
    };
    // Our own encoder must round-trip through the liberal decoder.
    if !data.is_empty() && !data.starts_with(b"-----BEGIN") {
        let lines = body::encode_base64_lines(data);
        assert_eq!(
            body::decode_base64_body(lines.as_bytes()).as_deref(),
            Ok(data),
            "encode_base64_lines does not round-trip"
        );
    }
    if data.first() == Some(&0x30) {
        raw
    } else {
        text
    }
}

fn certs_only(der: &[u8]) -> Outcome {
    match pkcs7::decode_certs_only(der) {
        Ok(certs) => {
            let refs: Vec<&[u8]> = certs.iter().map(Vec::as_slice).collect();
            let encoded = pkcs7::encode_certs_only(&refs).expect("decoded certificates re-encode");
            assert_eq!(
                pkcs7::decode_certs_only(&encoded).as_ref(),
                Ok(&certs),
                "certs-only does not round-trip"
            );
            Outcome::Accepted(format!("{} certificates", certs.len()))
        }
        Err(e) => {
            let _ = e.to_string();
            Outcome::rejected(&e)
        }
    }
}

// --- request head -------------------------------------------------------------------------------

/// A request path through the router (and, the same text, as a `Content-Type` through
/// `is_pkcs10`). Routed paths must be exactly `/.well-known/est/[<label>/]<op>`; error texts
/// (sent to the client and logged) must be printable ASCII and bounded.
pub fn route(data: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(data);
    let is_pkcs10 = media::is_pkcs10(Some(&text));
    assert_eq!(
        is_pkcs10,
        media::is_pkcs10(Some(&text.to_ascii_uppercase())),
        "is_pkcs10 depends on ASCII case"
    );
    let essence = media::essence(&text);
    assert!(
        !essence.contains(';') && !essence.chars().any(|c| c.is_ascii_whitespace()),
        "essence keeps parameters or whitespace"
    );
    match est_route::route(&text) {
        Ok((label, op)) => {
            let rebuilt = match &label {
                Some(l) => format!("{}{l}/{op}", est_route::WELL_KNOWN_PREFIX),
                None => format!("{}{op}", est_route::WELL_KNOWN_PREFIX),
            };
            assert_eq!(rebuilt, text, "a routed path is not what was asked");
            if let Some(l) = &label {
                assert_eq!(est_route::Label::new(l.as_str()).as_ref(), Ok(l));
            }
            Outcome::Accepted(rebuilt)
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.len() <= 1024,
                "route error text too long: {}",
                message.len()
            );
            assert!(
                message.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "route error text not printable ASCII: {message:?}"
            );
            Outcome::rejected(&e)
        }
    }
}

/// An `Authorization` header value through the Basic parser. Parsed credentials must re-encode
/// to the same credentials.
pub fn basic_auth(data: &[u8]) -> Outcome {
    use base64::Engine;
    match parse_authorization(data) {
        Ok((user, password)) => {
            assert!(!user.is_empty() && !user.contains(':'), "bad user {user:?}");
            let again = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            );
            assert_eq!(
                parse_authorization(again.as_bytes()).ok(),
                Some((user, password)),
                "Basic credentials do not round-trip"
            );
            Outcome::Accepted("credentials".to_owned())
        }
        Err(e) => Outcome::rejected(&e),
    }
}

// --- configuration ------------------------------------------------------------------------------

/// A configuration document (the module twin's JSON; TOML when it is not JSON): deserialized,
/// checked for secrets; it must survive a JSON round trip unchanged.
pub fn config(data: &[u8]) -> Outcome {
    let parsed: Config = match serde_json::from_slice(data) {
        Ok(config) => config,
        Err(json_err) => match std::str::from_utf8(data)
            .ok()
            .and_then(|text| toml::from_str::<Config>(text).ok())
        {
            Some(config) => config,
            None => {
                let _ = json_err.to_string();
                return Outcome::Rejected("Parse".to_owned());
            }
        },
    };
    let text = serde_json::to_string(&parsed).expect("a Config serializes");
    let again: Config = serde_json::from_str(&text).expect("a serialized Config parses");
    assert_eq!(again, parsed, "Config does not round-trip through JSON");
    match parsed.check_no_secrets() {
        Ok(()) => Outcome::Accepted(format!("{} labels", parsed.labels.len())),
        Err(e) => {
            let _ = e.to_string();
            Outcome::rejected(&e)
        }
    }
}

// --- policy patterns ----------------------------------------------------------------------------

/// Lines: pattern, value, then optionally the client CN and the Basic user. The pattern must
/// agree with a plain dynamic-programming matcher, with and without case folding.
pub fn pattern(data: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(4, '\n');
    let source = lines.next().unwrap_or_default();
    let value = lines.next().unwrap_or_default();
    let vars = Vars {
        cn: lines.next(),
        user: lines.next(),
    };
    let pattern = match Pattern::parse(source) {
        Ok(p) => p,
        Err(_) => return Outcome::Rejected("Parse".to_owned()),
    };
    assert_eq!(
        pattern.to_string(),
        source,
        "Pattern's Display is not its source"
    );
    let exact = pattern.matches(value, vars, false);
    let folded = pattern.matches(value, vars, true);
    assert!(
        !exact || folded,
        "matches exactly but not case-insensitively"
    );
    if let Some(tokens) = reference_tokens(source, vars) {
        let value: Vec<char> = value.chars().collect();
        if tokens.len().saturating_mul(value.len()) <= 200_000 {
            assert_eq!(exact, reference_glob(&tokens, &value, false), "exact match");
            assert_eq!(
                folded,
                reference_glob(&tokens, &value, true),
                "folded match"
            );
        }
    } else {
        assert!(
            !exact && !folded,
            "matched with a missing placeholder value"
        );
    }
    Outcome::Accepted(format!("{exact} {folded}"))
}

/// The pattern with placeholders substituted: `None` is a star, `Some(c)` a literal character;
/// `None` overall when a placeholder has no value.
fn reference_tokens(source: &str, vars: Vars<'_>) -> Option<Vec<Option<char>>> {
    let mut tokens = Vec::new();
    let mut rest = source;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("{cn}") {
            tokens.extend(vars.cn?.chars().map(Some));
            rest = after;
        } else if let Some(after) = rest.strip_prefix("{user}") {
            tokens.extend(vars.user?.chars().map(Some));
            rest = after;
        } else {
            tokens.push(if c == '*' { None } else { Some(c) });
            rest = &rest[c.len_utf8()..];
        }
    }
    Some(tokens)
}

fn reference_glob(tokens: &[Option<char>], value: &[char], fold: bool) -> bool {
    // can[j]: the tokens so far match value[..j].
    let mut can = vec![false; value.len() + 1];
    let mut next = vec![false; value.len() + 1];
    can[0] = true;
    for token in tokens {
        next[0] = token.is_none() && can[0];
        for (j, v) in value.iter().enumerate() {
            next[j + 1] = match token {
                None => can[j + 1] || next[j],
                Some(c) if fold => can[j] && c.eq_ignore_ascii_case(v),
                Some(c) => can[j] && c == v,
            };
        }
        std::mem::swap(&mut can, &mut next);
    }
    can[value.len()]
}

// --- csrattrs -----------------------------------------------------------------------------------

/// Each line a `csr_attributes` entry of the configuration; parsed entries must read back from
/// their `Display` form, and all of them encode.
pub fn csr_attrs(data: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(data);
    let mut parsed = Vec::new();
    let mut first_error = None;
    for line in text.split('\n') {
        match csrattrs::parse_csr_attr(line) {
            Ok(attr) => {
                assert_eq!(
                    csrattrs::parse_csr_attr(&attr.to_string()).as_ref(),
                    Ok(&attr),
                    "csrattr {attr} does not read back"
                );
                parsed.push(attr);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let encoded = csrattrs::encode_csrattrs(&parsed);
    assert_eq!(encoded.first(), Some(&0x30), "csrattrs is not a SEQUENCE");
    match first_error {
        None => Outcome::Accepted(format!("{} attributes", parsed.len())),
        Some(_) => Outcome::Rejected("Invalid".to_owned()),
    }
}
