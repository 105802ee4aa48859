//! The crypto floor of one enrollment, measured on one thread without sockets:
//!
//! - a TLS 1.3 full handshake with a P-256 client certificate, between a rustls client and a
//!   rustls server in memory, the server verifying the client's chain (`WebPkiClientVerifier`)
//!   as a TLS server that authenticates clients must, and sending no session ticket (a
//!   post-handshake message that devices enrolling once never use); the CPU time of the
//!   server's calls and of the client's calls are timed apart;
//! - parsing a P-256 CSR and verifying its signature (x509-parser + aws-lc-rs);
//! - building and signing the certificate with rcgen, with a P-256 and an RSA-2048 issuer.
//!
//! The floor of a server is the sum of the server's parts: `enrollments/s/core = 1 / sum`. For
//! comparison with the planning figures (field notes), the sum with the client's side of the
//! handshake is printed as well. edge-est's own functions for the same steps are timed too, to
//! show where a request's time goes above the floor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Args, Debug)]
pub struct FloorArgs {
    /// Seconds spent measuring each operation.
    #[arg(long, default_value_t = 1.5)]
    pub seconds: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON object into this file.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
}

/// Costs in microseconds of CPU per operation, one thread.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FloorReport {
    pub cpu_model: String,
    /// The measuring thread's CPU time over its wall time: below 1, other processes took the
    /// core for part of the run (costs are CPU time, so they hold anyway).
    pub cpu_over_wall: f64,
    /// The machine's 1-minute load average when the floor was measured.
    pub load_average: Option<f64>,
    /// Negotiated key exchange group and cipher suite of the handshakes.
    pub tls: String,
    /// Server side of a TLS 1.3 full handshake, P-256 server key, P-256 client certificate
    /// issued by a P-256 CA (chain verified in the handshake), no session tickets.
    pub handshake_server_us: f64,
    /// Client side of the same handshake.
    pub handshake_client_us: f64,
    /// The same with the client certificate issued by an RSA-2048 CA.
    pub handshake_server_rsa_ca_us: f64,
    pub handshake_client_rsa_ca_us: f64,
    /// Server side of the P-256 handshake when the server also sends rustls's default two
    /// session tickets, as edge-est does (clients enrolling once never use them).
    pub handshake_server_with_tickets_us: f64,
    /// Server side of the P-256 handshake (no tickets) with TLS13_AES_128_GCM_SHA256 instead
    /// of the default TLS13_AES_256_GCM_SHA384.
    pub handshake_server_aes128_sha256_us: f64,
    /// Parse a P-256 CSR and verify its signature.
    pub csr_verify_us: f64,
    /// Build and sign an end-entity certificate (rcgen) with a P-256 issuer.
    pub sign_p256_us: f64,
    /// The same with an RSA-2048 issuer.
    pub sign_rsa2048_us: f64,
    /// Server floor, all P-256: handshake (server side) + CSR + sign.
    pub floor_p256_us: f64,
    pub floor_p256_per_s: f64,
    /// Server floor with an RSA-2048 issuer (client certificate from it too).
    pub floor_rsa2048_us: f64,
    pub floor_rsa2048_per_s: f64,
    /// Both sides of the handshake + CSR + sign, the way the field notes add it up.
    pub floor_p256_both_sides_us: f64,
    pub floor_p256_both_sides_per_s: f64,
    /// edge-est's own code for the same steps (informational).
    pub edge_est: EdgeEstCosts,
    /// aws-lc-rs primitives, for reference against `openssl speed`.
    pub primitives: Primitives,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Primitives {
    pub ecdsa_p256_sign_us: f64,
    pub ecdsa_p256_verify_us: f64,
    pub x25519_keygen_agree_us: f64,
    pub rsa2048_sign_us: f64,
    pub rsa2048_verify_us: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct EdgeEstCosts {
    /// `est::Csr::from_der` (parse, key policy, proof of possession).
    pub csr_from_der_us: f64,
    /// `auth::client_cert::verify` of a P-256 client certificate against the issuer set.
    pub client_cert_verify_us: f64,
    /// `issue::LocalIssuer::issue` with a P-256 issuer, identity profile.
    pub issue_p256_us: f64,
    /// `issue::LocalIssuer::issue` with an RSA-2048 issuer.
    pub issue_rsa2048_us: f64,
    /// Base64 request body decoding + PKCS#7 encoding + base64 answer encoding.
    pub codec_us: f64,
}

/// A CA held in memory.
struct Ca {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(cn: &str, alg: &'static SignatureAlgorithm) -> anyhow::Result<Ca> {
    let key = KeyPair::generate_for(alg)?;
    let key_pem = key.serialize_pem();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = KeyIdMethod::Sha256;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&key)?;
    Ok(Ca {
        cert: cert.der().clone(),
        cert_pem: cert.pem(),
        key_pem,
        issuer: Issuer::new(params, key),
    })
}

/// A P-256 leaf from `ca`: (certificate, key).
fn leaf(
    ca: &Ca,
    cn: &str,
    server: bool,
) -> anyhow::Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if server {
        params.subject_alt_names = vec![SanType::DnsName("localhost".try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
    let cert = params.signed_by(&key, &ca.issuer)?;
    let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| anyhow::anyhow!(e))?;
    Ok((cert.der().clone(), key))
}

struct TlsPair {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

/// Client and server configurations as the load generator and edge-est use them: aws-lc-rs
/// defaults, TLS 1.3, client resumption off, server ticketer on (it sends tickets).
/// The floor's server sends no session ticket: tickets are post-handshake messages, and a
/// device enrolling once never uses them.
fn tls_pair(ca: &Ca) -> anyhow::Result<TlsPair> {
    tls_pair_with(ca, Some(0), true)
}

/// A variant: a server that sends `tickets` TLS 1.3 session tickets (None: rustls's default,
/// two, as edge-est does), and, unless `default_suites`, TLS13_AES_128_GCM_SHA256 as the only
/// suite (SHA-256 has SHA-NI instructions on x86 while SHA-384 runs in software).
fn tls_pair_with(ca: &Ca, tickets: Option<usize>, default_suites: bool) -> anyhow::Result<TlsPair> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if !default_suites {
        provider.cipher_suites =
            vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
    }
    let provider = Arc::new(provider);
    let (server_cert, server_key) = leaf(ca, "localhost", true)?;
    let (client_cert, client_key) = leaf(ca, "bench-device", false)?;
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert.clone())?;
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server_cert, ca.cert.clone()], server_key)?;
    server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    if let Some(n) = tickets {
        server.send_tls13_tickets = n;
    }
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![client_cert], client_key)?;
    client.resumption = rustls::client::Resumption::disabled();
    Ok(TlsPair {
        client: Arc::new(client),
        server: Arc::new(server),
    })
}

/// One full handshake in memory; returns (server time, client time, description).
fn handshake(pair: &TlsPair) -> anyhow::Result<(Duration, Duration, String)> {
    let name = ServerName::try_from("localhost")?;
    let t = Instant::now();
    let mut client = ClientConnection::new(pair.client.clone(), name)?;
    let mut client_time = t.elapsed();
    let t = Instant::now();
    let mut server = ServerConnection::new(pair.server.clone())?;
    let mut server_time = t.elapsed();
    let mut wire = Vec::with_capacity(16 * 1024);
    for _ in 0..20 {
        wire.clear();
        let t = Instant::now();
        while client.wants_write() {
            client.write_tls(&mut wire)?;
        }
        client_time += t.elapsed();
        if !wire.is_empty() {
            let t = Instant::now();
            let mut input = wire.as_slice();
            while !input.is_empty() {
                server.read_tls(&mut input)?;
                server.process_new_packets()?;
            }
            server_time += t.elapsed();
        }
        wire.clear();
        let t = Instant::now();
        while server.wants_write() {
            server.write_tls(&mut wire)?;
        }
        server_time += t.elapsed();
        if !wire.is_empty() {
            let t = Instant::now();
            let mut input = wire.as_slice();
            while !input.is_empty() {
                client.read_tls(&mut input)?;
                client.process_new_packets()?;
            }
            client_time += t.elapsed();
        }
        if !client.is_handshaking()
            && !server.is_handshaking()
            && !client.wants_write()
            && !server.wants_write()
        {
            if server.peer_certificates().is_none_or(|c| c.is_empty()) {
                bail!("the client certificate was not presented");
            }
            let what = format!(
                "{:?}, {:?}, {:?}",
                client.protocol_version().context("no version")?,
                client
                    .negotiated_key_exchange_group()
                    .map(|g| g.name())
                    .context("no key exchange")?,
                client
                    .negotiated_cipher_suite()
                    .map(|s| s.suite())
                    .context("no suite")?,
            );
            return Ok((server_time, client_time, what));
        }
    }
    bail!("the in-memory handshake did not complete")
}

/// A stopwatch of the thread's CPU time (falling back to wall time where the kernel does not
/// report it): the floor is about CPU, and other processes may share the machine.
struct CpuClock {
    wall: Instant,
    cpu_ns: Option<u64>,
}

impl CpuClock {
    fn start() -> CpuClock {
        CpuClock {
            wall: Instant::now(),
            cpu_ns: crate::procfs::thread_cpu_ns(),
        }
    }

    /// (CPU seconds, wall seconds) since start.
    fn elapsed(&self) -> (f64, f64) {
        let wall = self.wall.elapsed().as_secs_f64();
        let cpu = match (self.cpu_ns, crate::procfs::thread_cpu_ns()) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e9,
            _ => wall,
        };
        (cpu, wall)
    }
}

/// Runs `f` for about `seconds` of CPU (at least 50 times); returns µs of CPU per call.
fn per_call(seconds: f64, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    for _ in 0..10 {
        f()?;
    }
    let clock = CpuClock::start();
    let mut n = 0u64;
    loop {
        for _ in 0..10 {
            f()?;
        }
        n += 10;
        let (cpu, _) = clock.elapsed();
        if n >= 50 && cpu >= seconds {
            return Ok(cpu * 1e6 / n as f64);
        }
    }
}

/// Server and client µs of CPU per handshake: the thread's CPU time over many handshakes,
/// split between the two sides in proportion to the time spent in each side's calls.
fn handshakes(seconds: f64, pair: &TlsPair) -> anyhow::Result<(f64, f64, String)> {
    let mut what = String::new();
    for _ in 0..10 {
        what = handshake(pair)?.2;
    }
    let clock = CpuClock::start();
    let (mut server, mut client, mut n) = (Duration::ZERO, Duration::ZERO, 0u32);
    loop {
        let (s, c, _) = handshake(pair)?;
        server += s;
        client += c;
        n += 1;
        if n % 10 == 0 && n >= 50 && clock.elapsed().0 >= seconds {
            break;
        }
    }
    let (cpu, _) = clock.elapsed();
    let share = server.as_secs_f64() / (server + client).as_secs_f64();
    let per = cpu * 1e6 / f64::from(n);
    Ok((per * share, per * (1.0 - share), what))
}

/// The CSRs the floor parses and certifies: (DER, SPKI).
fn csrs(n: usize) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    (0..n)
        .map(|i| {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, format!("device-{i}"));
            let der = params.serialize_request(&key)?.der().to_vec();
            Ok((der, rcgen::PublicKeyData::subject_public_key_info(&key)))
        })
        .collect()
}

/// The minimal CSR check: parse, then verify the signature over certificationRequestInfo.
fn verify_csr(der: &[u8]) -> anyhow::Result<()> {
    use x509_parser::prelude::FromDer;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| anyhow::anyhow!("CSR: {e}"))?;
    let key = &csr.certification_request_info.subject_pki;
    let cn = csr
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .context("no CN")?;
    std::hint::black_box(cn);
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        &key.subject_public_key.data,
    )
    .verify(
        csr.certification_request_info.raw,
        &csr.signature_value.data,
    )
    .map_err(|_| anyhow::anyhow!("CSR signature does not verify"))
}

/// Builds and signs an end-entity certificate the way an EST server must: subject, validity,
/// a random 159-bit serial, key identifiers, key usage, EKU clientAuth (the socket floor signs
/// with it too).
pub fn sign(issuer: &Issuer<'static, KeyPair>, spki: &[u8], cn: &str) -> anyhow::Result<Vec<u8>> {
    use aws_lc_rs::rand::SecureRandom;
    let mut serial = [0u8; 20];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    serial[0] = (serial[0] & 0x7f).max(1);
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(365);
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = KeyIdMethod::Sha256;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki)?;
    Ok(params.signed_by(&public_key, issuer)?.der().to_vec())
}

/// The same steps through edge-est's own functions.
fn edge_est_costs(
    seconds: f64,
    p256: &Ca,
    rsa: &Ca,
    csrs: &[(Vec<u8>, Vec<u8>)],
) -> anyhow::Result<EdgeEstCosts> {
    use edge_est::auth::client_cert;
    use edge_est::auth::TrustSet;
    use edge_est::issue::{LocalIssuer, Profile};

    let profiles = edge_est::issue::profile::builtin();
    let identity = profiles.get("identity").context("no identity profile")?;
    let profile = Profile::try_from(("identity", identity)).map_err(anyhow::Error::msg)?;
    let p256_issuer =
        LocalIssuer::load(&p256.cert_pem, &p256.key_pem).map_err(anyhow::Error::msg)?;
    let rsa_issuer = LocalIssuer::load(&rsa.cert_pem, &rsa.key_pem).map_err(anyhow::Error::msg)?;

    let parsed: Vec<edge_est::est::Csr> = csrs
        .iter()
        .map(|(der, _)| edge_est::est::Csr::from_der(der))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut i = 0usize;
    let csr_from_der_us = per_call(seconds, || {
        i += 1;
        edge_est::est::Csr::from_der(&csrs[i % csrs.len()].0)
            .map(|c| std::hint::black_box(c).key())
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{e}"))
    })?;

    let (client_cert, _) = leaf(p256, "bench-device", false)?;
    let trust = vec![Arc::new(
        TrustSet::direct("bench", std::slice::from_ref(&p256.cert)).map_err(anyhow::Error::msg)?,
    )];
    let chain = vec![client_cert];
    let client_cert_verify_us = per_call(seconds, || {
        client_cert::verify(&chain, &trust, &[], std::time::SystemTime::now())
            .map(|id| {
                std::hint::black_box(id);
            })
            .map_err(anyhow::Error::msg)
    })?;

    let issue = |issuer: &LocalIssuer, i: usize| -> anyhow::Result<Vec<u8>> {
        let csr = &parsed[i % parsed.len()];
        Ok(issuer
            .issue(csr.subject(), &[], csr.spki_der(), csr.key(), &profile)?
            .der)
    };
    let mut i = 0usize;
    let issue_p256_us = per_call(seconds, || {
        i += 1;
        issue(&p256_issuer, i).map(|_| ())
    })?;
    let mut i = 0usize;
    let issue_rsa2048_us = per_call(seconds, || {
        i += 1;
        issue(&rsa_issuer, i).map(|_| ())
    })?;

    let issued = issue(&p256_issuer, 0)?;
    let bodies: Vec<String> = csrs
        .iter()
        .map(|(der, _)| edge_est::est::body::encode_base64_lines(der))
        .collect();
    let mut i = 0usize;
    let codec_us = per_call(seconds, || {
        i += 1;
        let der = edge_est::est::body::decode_request_body(bodies[i % bodies.len()].as_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        std::hint::black_box(der);
        let pkcs7 = edge_est::est::pkcs7::encode_certs_only(&[issued.as_slice()])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        std::hint::black_box(edge_est::est::body::encode_base64_lines(&pkcs7));
        Ok(())
    })?;
    Ok(EdgeEstCosts {
        csr_from_der_us,
        client_cert_verify_us,
        issue_p256_us,
        issue_rsa2048_us,
        codec_us,
    })
}

fn primitives(seconds: f64) -> anyhow::Result<Primitives> {
    use aws_lc_rs::agreement;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
    let rng = SystemRandom::new();
    let fail = |_| anyhow::anyhow!("aws-lc-rs failed");
    let msg = [0x5au8; 256];
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(fail)?;
    let ec = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("bad key"))?;
    let sig = ec.sign(&rng, &msg).map_err(fail)?;
    let ec_pub = signature::UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        ec.public_key().as_ref().to_vec(),
    );
    let ecdsa_p256_sign_us = per_call(seconds, || {
        std::hint::black_box(ec.sign(&rng, &msg).map_err(fail)?);
        Ok(())
    })?;
    let ecdsa_p256_verify_us =
        per_call(seconds, || ec_pub.verify(&msg, sig.as_ref()).map_err(fail))?;
    let peer = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
        .map_err(fail)?
        .compute_public_key()
        .map_err(fail)?;
    let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer.as_ref().to_vec());
    let x25519_keygen_agree_us = per_call(seconds, || {
        let mine =
            agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng).map_err(fail)?;
        std::hint::black_box(mine.compute_public_key().map_err(fail)?);
        agreement::agree_ephemeral(mine, &peer, aws_lc_rs::error::Unspecified, |k| {
            std::hint::black_box(k);
            Ok(())
        })
        .map_err(fail)
    })?;
    let rsa_der = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?.serialize_der();
    let rsa = RsaKeyPair::from_pkcs8(&rsa_der).map_err(|_| anyhow::anyhow!("bad RSA key"))?;
    let mut rsa_sig = vec![0u8; rsa.public_modulus_len()];
    rsa.sign(&signature::RSA_PKCS1_SHA256, &rng, &msg, &mut rsa_sig)
        .map_err(fail)?;
    let rsa_pub = signature::UnparsedPublicKey::new(
        &signature::RSA_PKCS1_2048_8192_SHA256,
        rsa.public_key().as_ref().to_vec(),
    );
    let rsa2048_sign_us = per_call(seconds, || {
        let mut out = vec![0u8; rsa.public_modulus_len()];
        rsa.sign(&signature::RSA_PKCS1_SHA256, &rng, &msg, &mut out)
            .map_err(fail)
    })?;
    let rsa2048_verify_us = per_call(seconds, || rsa_pub.verify(&msg, &rsa_sig).map_err(fail))?;
    Ok(Primitives {
        ecdsa_p256_sign_us,
        ecdsa_p256_verify_us,
        x25519_keygen_agree_us,
        rsa2048_sign_us,
        rsa2048_verify_us,
    })
}

pub fn run(args: &FloorArgs) -> anyhow::Result<()> {
    if !(args.seconds > 0.0 && args.seconds < 60.0) {
        bail!("--seconds must be between 0 and 60");
    }
    let s = args.seconds;
    let whole = CpuClock::start();
    let p256 = ca("floor P-256 CA", &rcgen::PKCS_ECDSA_P256_SHA256)?;
    let rsa = ca("floor RSA-2048 CA", &rcgen::PKCS_RSA_SHA256)?;
    let csrs = csrs(256)?;

    let pair = tls_pair(&p256)?;
    let (hs_server, hs_client, tls) = handshakes(s, &pair)?;
    let rsa_pair = tls_pair(&rsa)?;
    let (hs_server_rsa, hs_client_rsa, _) = handshakes(s, &rsa_pair)?;
    let (hs_server_with_tickets, _, _) = handshakes(s, &tls_pair_with(&p256, None, true)?)?;
    let (hs_server_aes128, _, _) = handshakes(s, &tls_pair_with(&p256, Some(0), false)?)?;

    let mut i = 0usize;
    let csr_verify_us = per_call(s, || {
        i += 1;
        verify_csr(&csrs[i % csrs.len()].0)
    })?;
    let mut i = 0usize;
    let sign_p256_us = per_call(s, || {
        i += 1;
        sign(
            &p256.issuer,
            &csrs[i % csrs.len()].1,
            &format!("device-{i}"),
        )
        .map(|c| {
            std::hint::black_box(c);
        })
    })?;
    let mut i = 0usize;
    let sign_rsa2048_us = per_call(s, || {
        i += 1;
        sign(&rsa.issuer, &csrs[i % csrs.len()].1, &format!("device-{i}")).map(|c| {
            std::hint::black_box(c);
        })
    })?;
    let edge_est = edge_est_costs(s, &p256, &rsa, &csrs)?;
    let primitives = primitives(s.min(1.0))?;

    let (cpu, wall) = whole.elapsed();
    let floor_p256_us = hs_server + csr_verify_us + sign_p256_us;
    let floor_rsa2048_us = hs_server_rsa + csr_verify_us + sign_rsa2048_us;
    let both = floor_p256_us + hs_client;
    let report = FloorReport {
        cpu_model: cpu_model(),
        cpu_over_wall: cpu / wall,
        load_average: crate::procfs::load_average(),
        tls,
        handshake_server_us: hs_server,
        handshake_client_us: hs_client,
        handshake_server_rsa_ca_us: hs_server_rsa,
        handshake_client_rsa_ca_us: hs_client_rsa,
        handshake_server_with_tickets_us: hs_server_with_tickets,
        handshake_server_aes128_sha256_us: hs_server_aes128,
        csr_verify_us,
        sign_p256_us,
        sign_rsa2048_us,
        floor_p256_us,
        floor_p256_per_s: 1e6 / floor_p256_us,
        floor_rsa2048_us,
        floor_rsa2048_per_s: 1e6 / floor_rsa2048_us,
        floor_p256_both_sides_us: both,
        floor_p256_both_sides_per_s: 1e6 / both,
        edge_est,
        primitives,
    };
    crate::emit(&report, args.json_out.as_deref(), args.json, print)?;
    Ok(())
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn print(r: &FloorReport) {
    let rate = |us: f64| 1e6 / us;
    println!(
        "crypto floor, one thread, in memory ({}; {})",
        r.cpu_model, r.tls
    );
    if r.cpu_over_wall < 0.95 {
        println!(
            "  (the machine was busy: this thread had the core {:.0} % of the time; costs are \
             thread CPU time)",
            r.cpu_over_wall * 100.0
        );
    }
    println!(
        "  TLS 1.3 full handshake, P-256 client cert (P-256 CA): server {:>7.1} µs  client {:>7.1} µs  ({:.0}/s both sides)",
        r.handshake_server_us,
        r.handshake_client_us,
        rate(r.handshake_server_us + r.handshake_client_us)
    );
    println!(
        "  the same, client cert from an RSA-2048 CA:             server {:>7.1} µs  client {:>7.1} µs",
        r.handshake_server_rsa_ca_us, r.handshake_client_rsa_ca_us
    );
    println!(
        "  server side with 2 session tickets (as edge-est): {:.1} µs; no tickets, \
         TLS13_AES_128_GCM_SHA256: {:.1} µs",
        r.handshake_server_with_tickets_us, r.handshake_server_aes128_sha256_us
    );
    println!(
        "  P-256 CSR parse + verify:                               {:>7.1} µs  ({:.0}/s)",
        r.csr_verify_us,
        rate(r.csr_verify_us)
    );
    println!(
        "  sign a leaf (rcgen), P-256 issuer:                      {:>7.1} µs  ({:.0}/s)",
        r.sign_p256_us,
        rate(r.sign_p256_us)
    );
    println!(
        "  sign a leaf (rcgen), RSA-2048 issuer:                   {:>7.1} µs  ({:.0}/s)",
        r.sign_rsa2048_us,
        rate(r.sign_rsa2048_us)
    );
    println!(
        "  FLOOR, server side, all P-256:   {:>7.1} µs = {:.0} enrollments/s per core",
        r.floor_p256_us, r.floor_p256_per_s
    );
    println!(
        "  FLOOR, server side, RSA-2048 issuer: {:>7.1} µs = {:.0} enrollments/s per core",
        r.floor_rsa2048_us, r.floor_rsa2048_per_s
    );
    println!(
        "  (with the client's side of the handshake, as in the field notes: {:.1} µs = {:.0}/s)",
        r.floor_p256_both_sides_us, r.floor_p256_both_sides_per_s
    );
    let e = &r.edge_est;
    println!(
        "  edge-est's own steps: Csr::from_der {:.1} µs, client_cert::verify {:.1} µs, \
         LocalIssuer::issue P-256 {:.1} µs / RSA-2048 {:.1} µs, body+PKCS#7 codecs {:.1} µs",
        e.csr_from_der_us, e.client_cert_verify_us, e.issue_p256_us, e.issue_rsa2048_us, e.codec_us
    );
    let p = &r.primitives;
    println!(
        "  aws-lc-rs primitives: ECDSA P-256 sign {:.1} µs, verify {:.1} µs; X25519 keygen+agree \
         {:.1} µs; RSA-2048 sign {:.1} µs, verify {:.1} µs",
        p.ecdsa_p256_sign_us,
        p.ecdsa_p256_verify_us,
        p.x25519_keygen_agree_us,
        p.rsa2048_sign_us,
        p.rsa2048_verify_us
    );
}
