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
    write("top.toml", TOP)?;
    write("forward-1.toml.in", FORWARD_1)?;
    write("forward-2.toml.in", FORWARD_2)?;
    println!(
        "benchmark PKI and configurations written to {}",
        dir.display()
    );
    Ok(())
}

/// `key`: `p256` or `rsa`, the issuing CA (`issuing-KEY`) that signs here and issued the
/// devices (`device-ca-KEY`).
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
    SIGN.replace("@NAME@", name)
        .replace("@KEY@", key)
        .replace("@PROFILE@", &profile)
        .replace("@LABEL_PROFILE@", label_profile)
}

/// Local signing: devices renew with their certificate (IoT Edge's renewal is a simpleenroll).
const SIGN: &str = r#"# est-bench: local signing (@NAME@)
listen = "127.0.0.1:0"
journal = "journal-@NAME@.jsonl"

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

# The devices' certificates were minted by `est-bench pki`, not enrolled here.
[trust.devices]
certificates = ["device-ca-@KEY@.pem"]

[issuers.plant]
certificate = "issuing-@KEY@.pem"
key = "issuing-@KEY@.key"
@PROFILE@
[[labels]]
issuer = "plant"
client_trust = ["devices"]
@LABEL_PROFILE@
[labels.authentication]
basic = false

[[labels.rules]]
match = ["certificate:devices"]
common_names = ["{cn}"]
ca_common_names = ["aziot-edge CA {cn}"]
"#;

/// The signing top of a hierarchy: serves the RA of layer 1 and devices.
const TOP: &str = r#"# est-bench: the signing top of a hierarchy
listen = "127.0.0.1:0"
journal = "journal-top.jsonl"

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

[trust.ras]
certificates = ["ra-ca.pem"]

[trust.devices]
certificates = ["device-ca-p256.pem"]

[issuers.plant]
certificate = "issuing-p256.pem"
key = "issuing-p256.key"

[[labels]]
issuer = "plant"
client_trust = ["ras", "devices"]

[labels.authentication]
basic = false

[[labels.rules]]
match = ["certificate:ras"]
client_cn = ["ra-1"]
common_names = ["*"]
ca_common_names = ["aziot-edge CA *"]

[[labels.rules]]
match = ["certificate:devices"]
common_names = ["{cn}"]
ca_common_names = ["aziot-edge CA {cn}"]
"#;

/// Layer 1: forwards to the top with RA credential ra-1; serves RA ra-2 and devices.
const FORWARD_1: &str = r#"# est-bench: forwarding layer 1
listen = "127.0.0.1:0"
journal = "journal-forward-1.jsonl"

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

[trust.ras]
certificates = ["ra-ca.pem"]

[trust.devices]
certificates = ["device-ca-p256.pem"]

[upstreams.parent]
url = "https://localhost:@UPSTREAM_PORT@/.well-known/est"
trust = ["root.pem"]
certificate = "ra-1.pem"
key = "ra-1.key"

[[labels]]
mode = "forward"
upstream = "parent"
client_trust = ["ras", "devices"]

[labels.authentication]
basic = false

[[labels.rules]]
match = ["certificate:ras"]
client_cn = ["ra-2"]
common_names = ["*"]
ca_common_names = ["aziot-edge CA *"]

[[labels.rules]]
match = ["certificate:devices"]
common_names = ["{cn}"]
ca_common_names = ["aziot-edge CA {cn}"]
"#;

/// Layer 2: forwards to layer 1 with RA credential ra-2; serves devices.
const FORWARD_2: &str = r#"# est-bench: forwarding layer 2
listen = "127.0.0.1:0"
journal = "journal-forward-2.jsonl"

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

[trust.devices]
certificates = ["device-ca-p256.pem"]

[upstreams.parent]
url = "https://localhost:@UPSTREAM_PORT@/.well-known/est"
trust = ["root.pem"]
certificate = "ra-2.pem"
key = "ra-2.key"

[[labels]]
mode = "forward"
upstream = "parent"
client_trust = ["devices"]

[labels.authentication]
basic = false

[[labels.rules]]
match = ["certificate:devices"]
common_names = ["{cn}"]
ca_common_names = ["aziot-edge CA {cn}"]
"#;
