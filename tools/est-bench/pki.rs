//! `est-bench pki`: the benchmark's PKI and edge-est configurations, written into a directory.
//!
//! - `root.pem`: the root (its key is not kept);
//! - `issuing-p256.pem`/`.key`, `issuing-rsa.pem`/`.key`: delegated issuing CAs (chain to the
//!   root in the PEM), P-256 and RSA-2048;
//! - `server.pem`/`.key`: the TLS certificate of every server (P-256 key; `localhost`,
//!   `127.0.0.1`, `::1`), from the P-256 issuing CA;
//! - `device-p256.pem`/`.key`, `device-rsa.pem`/`.key`: a device's EST identity certificate
//!   (P-256 key, CN `bench-device`, clientAuth) from each issuing CA, leaf only, as IoT Edge
//!   presents it on renewal;
//! - `ra-ca.pem`, `ra-1.pem`/`.key`, `ra-2.pem`/`.key`: the forwarding layers' RA credentials;
//! - `device-ca-p256.pem`, `device-ca-rsa.pem`: the issuing CAs alone, as the `devices` trust
//!   set of every configuration: the device certificates are minted here, not enrolled, so
//!   they are not in any label's own issuance (`issuer`);
//! - `sign-p256.toml`, `sign-rsa.toml`: local signing, devices authenticated by their
//!   certificate (`certificate:devices`, CN `{cn}`);
//! - `rss.toml`: as `sign-p256.toml` with a one-day profile;
//! - `top.toml`: the signing top of a hierarchy, serving RA `ra-1` and devices;
//! - `forward-1.toml.in`, `forward-2.toml.in`: forwarding layers (RA `ra-1` to the top, RA
//!   `ra-2` to layer 1); `@UPSTREAM_PORT@` is to be replaced by the upstream's port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType, SignatureAlgorithm,
};

#[derive(Args, Debug)]
pub struct PkiArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
}

fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
    edge_est::pki::ca_params(cn, path_len, time::Duration::days(3650))
}

fn leaf_params(cn: &str, eku: Vec<ExtendedKeyUsagePurpose>) -> CertificateParams {
    edge_est::pki::leaf_params(cn, eku, time::Duration::days(365))
}

pub fn run(args: &PkiArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, text: &str| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };

    let root_key = KeyPair::generate()?;
    let root_params = ca_params("est-bench root", None);
    let root = root_params.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root_params, root_key);
    write("root.pem", &root.pem())?;

    let intermediate = |cn: &str,
                        file: &str,
                        alg: &'static SignatureAlgorithm|
     -> anyhow::Result<(Issuer<'static, KeyPair>, String)> {
        let key = KeyPair::generate_for(alg)?;
        let params = ca_params(cn, Some(1));
        let cert = params.signed_by(&key, &root_issuer)?;
        write(
            &format!("{file}.pem"),
            &format!("{}{}", cert.pem(), root.pem()),
        )?;
        write(&format!("{file}.key"), &key.serialize_pem())?;
        Ok((Issuer::new(params, key), cert.pem()))
    };
    let (p256, p256_pem) = intermediate(
        "est-bench issuing CA P-256",
        "issuing-p256",
        &rcgen::PKCS_ECDSA_P256_SHA256,
    )?;
    let (rsa, rsa_pem) = intermediate(
        "est-bench issuing CA RSA-2048",
        "issuing-rsa",
        &rcgen::PKCS_RSA_SHA256,
    )?;

    write("device-ca-p256.pem", &p256_pem)?;
    write("device-ca-rsa.pem", &rsa_pem)?;

    let server_key = KeyPair::generate()?;
    let mut server = leaf_params("localhost", vec![ExtendedKeyUsagePurpose::ServerAuth]);
    server.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    let server_cert = server.signed_by(&server_key, &p256)?;
    write("server.pem", &format!("{}{p256_pem}", server_cert.pem()))?;
    write("server.key", &server_key.serialize_pem())?;

    for (file, issuer) in [("device-p256", &p256), ("device-rsa", &rsa)] {
        let key = KeyPair::generate()?;
        let cert = leaf_params("bench-device", vec![ExtendedKeyUsagePurpose::ClientAuth])
            .signed_by(&key, issuer)?;
        write(&format!("{file}.pem"), &cert.pem())?;
        write(&format!("{file}.key"), &key.serialize_pem())?;
    }

    let ra_key = KeyPair::generate()?;
    let ra_params = ca_params("est-bench RA credentials CA", Some(0));
    let ra_cert = ra_params.self_signed(&ra_key)?;
    let ra_issuer = Issuer::new(ra_params, ra_key);
    write("ra-ca.pem", &ra_cert.pem())?;
    for name in ["ra-1", "ra-2"] {
        let key = KeyPair::generate()?;
        let cmc_ra = ExtendedKeyUsagePurpose::Other(vec![1, 3, 6, 1, 5, 5, 7, 3, 28]);
        let cert = leaf_params(name, vec![ExtendedKeyUsagePurpose::ClientAuth, cmc_ra])
            .signed_by(&key, &ra_issuer)?;
        write(&format!("{name}.pem"), &cert.pem())?;
        write(&format!("{name}.key"), &key.serialize_pem())?;
    }

    write("sign-p256.toml", &sign_config("sign-p256", "p256", None))?;
    write("sign-rsa.toml", &sign_config("sign-rsa", "rsa", None))?;
    write("rss.toml", &sign_config("rss", "p256", Some(1)))?;
    write("top.toml", &top_config())?;
    write("forward-1.toml.in", &forward_config(1))?;
    write("forward-2.toml.in", &forward_config(2))?;
    println!(
        "benchmark PKI and configurations written to {}",
        dir.display()
    );
    Ok(())
}

/// `key`: `p256` or `rsa`, the issuing CA (`issuing-KEY`) that signs here and issued the
/// devices (`device-ca-KEY`). Local signing: devices renew with their certificate (IoT Edge's
/// renewal is a simpleenroll).
fn sign_config(name: &str, key: &str, validity_days: Option<u32>) -> String {
    let profile = match validity_days {
        Some(days) => format!(
            "\n[profiles.short]\nkind = \"end-entity\"\nvalidity_days = {days}\n\
             extended_key_usage = [\"clientAuth\"]\n"
        ),
        None => String::new(),
    };
    let label_profile = if validity_days.is_some() {
        "profile = \"short\"\n"
    } else {
        ""
    };
    format!(
        "{head}\n# The devices' certificates were minted by `est-bench pki`, not enrolled here.\n\
         {devices}\n{issuer}{profile}\n[[labels]]\nissuer = \"plant\"\nclient_trust = [\"devices\"]\n\
         {label_profile}{rules}",
        head = head(&format!("local signing ({name})"), name),
        devices = devices_trust(key),
        issuer = plant_issuer(key),
        rules = label_rules(None),
    )
}

/// The signing top of a hierarchy: serves the RA of layer 1 and devices.
fn top_config() -> String {
    format!(
        "{head}\n{RAS_TRUST}\n{devices}\n{issuer}\n[[labels]]\nissuer = \"plant\"\n\
         client_trust = [\"ras\", \"devices\"]\n{rules}",
        head = head("the signing top of a hierarchy", "top"),
        devices = devices_trust("p256"),
        issuer = plant_issuer("p256"),
        rules = label_rules(Some("ra-1")),
    )
}

/// Forwarding layer `n` (1 or 2): forwards with RA credential `ra-N`; layer 1 also serves
/// RA `ra-2` (layer 2), and both serve devices.
fn forward_config(n: u8) -> String {
    let serves_ra = (n == 1).then_some("ra-2");
    let (ras, trust) = match serves_ra {
        Some(_) => (format!("{RAS_TRUST}\n"), "[\"ras\", \"devices\"]"),
        None => (String::new(), "[\"devices\"]"),
    };
    format!(
        "{head}\n{ras}{devices}\n[upstreams.parent]\n\
         url = \"https://localhost:@UPSTREAM_PORT@/.well-known/est\"\ntrust = [\"root.pem\"]\n\
         certificate = \"ra-{n}.pem\"\nkey = \"ra-{n}.key\"\n\n\
         [[labels]]\nmode = \"forward\"\nupstream = \"parent\"\nclient_trust = {trust}\n{rules}",
        head = head(&format!("forwarding layer {n}"), &format!("forward-{n}")),
        devices = devices_trust("p256"),
        rules = label_rules(serves_ra),
    )
}

/// What every configuration starts with: listen address, journal, TLS identity, and limits.
/// The benchmark comes from one address with one identity: the per-address and per-identity
/// limits (policy, not capacity) are off.
fn head(title: &str, journal: &str) -> String {
    format!(
        r#"# est-bench: {title}
listen = "127.0.0.1:0"
journal = "journal-{journal}.jsonl"

[tls]
certificate = "server.pem"
key = "server.key"

# The benchmark comes from one address with one identity: the per-address and per-identity
# limits (policy, not capacity) are off.
[limits]
max_connections_per_address = 0
rate_per_address = 0.0
rate_per_identity = 0.0
enroll_per_name = 0.0
keygen_per_identity = 0.0
"#
    )
}

const RAS_TRUST: &str = "[trust.ras]\ncertificates = [\"ra-ca.pem\"]\n";

fn devices_trust(key: &str) -> String {
    format!("[trust.devices]\ncertificates = [\"device-ca-{key}.pem\"]\n")
}

fn plant_issuer(key: &str) -> String {
    format!("[issuers.plant]\ncertificate = \"issuing-{key}.pem\"\nkey = \"issuing-{key}.key\"\n")
}

/// A label's authentication (certificates only) and rules: the RA `ra` (any name, and Edge
/// CAs), if given, then devices (their own name, and their own Edge CA).
fn label_rules(ra: Option<&str>) -> String {
    let ra = ra
        .map(|cn| {
            format!(
                "\n[[labels.rules]]\nmatch = [\"certificate:ras\"]\nclient_cn = [\"{cn}\"]\n\
                 common_names = [\"*\"]\nca_common_names = [\"aziot-edge CA *\"]\n"
            )
        })
        .unwrap_or_default();
    format!(
        "\n[labels.authentication]\nbasic = false\n{ra}\n[[labels.rules]]\n\
         match = [\"certificate:devices\"]\ncommon_names = [\"{{cn}}\"]\n\
         ca_common_names = [\"aziot-edge CA {{cn}}\"]\n"
    )
}
