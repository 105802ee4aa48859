//! The embedded development setup of `edge-est serve` without `--config`: a root CA, a
//! delegated issuing CA and a `localhost` TLS certificate generated on first start in the data
//! directory and reused afterwards, with a policy that lets an IoT Edge device enroll.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::pki::ca_params;

use super::{
    AuthConfig, Config, ConfigError, IssuerConfig, LabelConfig, Limits, Mode, PemSource,
    RuleConfig, ServerKeygen, TlsConfig,
};

pub const DEV_USER: &str = "estuser";
pub const PASSWORD_ENV: &str = "EDGE_EST_DEV_PASSWORD";

/// Where the development password came from, for the start-up message.
pub enum PasswordSource {
    Environment,
    /// Generated on this start; shown once, kept in `<data-dir>/dev-password`.
    GeneratedNow(String),
    /// Generated on an earlier start, read from `<data-dir>/dev-password`.
    File,
}

pub struct DevSetup {
    pub config: Config,
    pub data_dir: PathBuf,
    pub password: PasswordSource,
}

impl DevSetup {
    pub fn root_pem(&self) -> PathBuf {
        self.data_dir.join("root.pem")
    }
}

fn io(path: &Path, e: impl ToString) -> ConfigError {
    ConfigError::Io(path.to_owned(), e.to_string())
}

fn cannot_write(path: &Path, e: std::io::Error) -> ConfigError {
    ConfigError::Write(path.to_owned(), super::write_error_text(&e))
}

fn write_private(path: &Path, contents: &str) -> Result<(), ConfigError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(|e| cannot_write(path, e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| cannot_write(path, e))
}

fn write_public(path: &Path, contents: &str) -> Result<(), ConfigError> {
    std::fs::write(path, contents).map_err(|e| cannot_write(path, e))
}

fn sign_err(e: rcgen::Error) -> ConfigError {
    ConfigError::invalid("development setup", e.to_string())
}

/// Creates (on first start) or reuses the development PKI in `data_dir`.
pub fn prepare(data_dir: &Path, listen: SocketAddr) -> Result<DevSetup, ConfigError> {
    std::fs::create_dir_all(data_dir).map_err(|e| cannot_write(data_dir, e))?;
    let root_pem = data_dir.join("root.pem");
    let ca_pem = data_dir.join("issuing-ca.pem");
    let ca_key = data_dir.join("issuing-ca.key");
    let server_pem = data_dir.join("server.pem");
    let server_key = data_dir.join("server.key");

    if !(root_pem.exists() && ca_pem.exists() && ca_key.exists()) {
        let root_key = KeyPair::generate().map_err(sign_err)?;
        let mut root_params = ca_params("edge-est development root", None, Duration::days(3650));
        root_params
            .distinguished_name
            .push(DnType::OrganizationName, "edge-est development");
        let root = root_params.self_signed(&root_key).map_err(sign_err)?;
        let root_issuer = Issuer::new(root_params, root_key);
        let key = KeyPair::generate().map_err(sign_err)?;
        // pathlen 1: it issues IoT Edge's Edge CA certificates (CA, pathlen 0) below it.
        let mut ca_template = ca_params(
            "edge-est development issuing CA",
            Some(1),
            Duration::days(5 * 365),
        );
        ca_template
            .distinguished_name
            .push(DnType::OrganizationName, "edge-est development");
        let ca = ca_template
            .signed_by(&key, &root_issuer)
            .map_err(sign_err)?;
        // The root's key is not kept: the issuing CA is all a development server signs with.
        write_public(&root_pem, &root.pem())?;
        write_private(&ca_key, &key.serialize_pem())?;
        write_public(&ca_pem, &format!("{}{}", ca.pem(), root.pem()))?;
        let _ = std::fs::remove_file(&server_pem);
    }

    if !server_cert_fresh(&server_pem) {
        let chain = std::fs::read_to_string(&ca_pem).map_err(|e| io(&ca_pem, e))?;
        let key_pem = std::fs::read_to_string(&ca_key).map_err(|e| io(&ca_key, e))?;
        let ca_key_pair = KeyPair::from_pem(&key_pem).map_err(sign_err)?;
        let ca_issuer = Issuer::from_ca_cert_pem(&chain, ca_key_pair).map_err(sign_err)?;
        let key = KeyPair::generate().map_err(sign_err)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().map_err(sign_err)?),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        let cert = params.signed_by(&key, &ca_issuer).map_err(sign_err)?;
        let intermediate = chain
            .split_inclusive("-----END CERTIFICATE-----\n")
            .next()
            .unwrap_or_default();
        write_private(&server_key, &key.serialize_pem())?;
        write_public(&server_pem, &format!("{}{}", cert.pem(), intermediate))?;
    }

    let password_file = data_dir.join("dev-password");
    let (password, source) = match std::env::var(PASSWORD_ENV) {
        Ok(p) if !p.is_empty() => (p, PasswordSource::Environment),
        _ => match std::fs::read_to_string(&password_file) {
            Ok(p) if !p.trim().is_empty() => (p.trim().to_owned(), PasswordSource::File),
            _ => {
                let p = random_password()?;
                write_private(&password_file, &format!("{p}\n"))?;
                (p.clone(), PasswordSource::GeneratedNow(p))
            }
        },
    };
    let hash = crate::auth::basic::hash_password(&password)
        .map_err(|e| ConfigError::invalid("dev password", e))?;

    let config = Config {
        listen,
        journal: data_dir.join("journal.jsonl"),
        tls: Some(TlsConfig {
            certificate: PemSource(path_string(&server_pem)),
            key: server_key,
        }),
        limits: Limits::default(),
        metrics_listen: None,
        proxy_socket: None,
        trust: BTreeMap::new(),
        users: BTreeMap::from([(DEV_USER.to_owned(), hash)]),
        issuers: BTreeMap::from([(
            "dev".to_owned(),
            IssuerConfig {
                certificate: PemSource(path_string(&ca_pem)),
                key: ca_key,
            },
        )]),
        enrolled_issuers: BTreeMap::new(),
        upstreams: BTreeMap::new(),
        profiles: BTreeMap::new(),
        pkcs11_module: None,
        labels: vec![LabelConfig {
            name: None,
            mode: Mode::Sign,
            issuer: Some("dev".to_owned()),
            upstream: None,
            upstream_label: None,
            authentication: AuthConfig::default(),
            client_trust: vec!["issuer".to_owned()],
            profile: "identity".to_owned(),
            ca_profile: "edge-ca".to_owned(),
            rules: dev_rules(),
            deny: Vec::new(),
            csr_attributes: vec!["ecdsa-with-SHA256".to_owned()],
            serverkeygen: ServerKeygen::EcP256,
            grace_expired_secs: 0,
            issuer_labels: Vec::new(),
            fallback: None,
        }],
    };
    Ok(DevSetup {
        config,
        data_dir: data_dir.to_owned(),
        password: source,
    })
}

/// The password user may ask for any name; a client certificate from this server may renew
/// its own name and obtain the Edge CA certificate of its device (IoT Edge's default subject).
fn dev_rules() -> Vec<RuleConfig> {
    let any = || vec!["*".to_owned()];
    let attributes: BTreeMap<String, Vec<String>> = ["O", "OU", "C", "ST", "L", "DC"]
        .iter()
        .map(|a| (a.to_string(), any()))
        .collect();
    vec![
        RuleConfig {
            matches: vec![format!("user:{DEV_USER}")],
            common_names: any(),
            ca_common_names: any(),
            dns_names: any(),
            ip_addresses: any(),
            uris: any(),
            emails: any(),
            subject_attributes: attributes.clone(),
            ..RuleConfig::default()
        },
        RuleConfig {
            matches: vec!["certificate:issuer".to_owned()],
            common_names: vec!["{cn}".to_owned()],
            ca_common_names: vec!["aziot-edge CA {cn}".to_owned()],
            dns_names: any(),
            ip_addresses: any(),
            uris: any(),
            emails: any(),
            subject_attributes: attributes,
            ..RuleConfig::default()
        },
    ]
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn server_cert_fresh(path: &Path) -> bool {
    use rustls::pki_types::pem::PemObject;
    let Ok(pem) = std::fs::read(path) else {
        return false;
    };
    let Some(Ok(der)) = rustls::pki_types::CertificateDer::pem_slice_iter(&pem).next() else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    cert.validity().not_after.to_datetime() > OffsetDateTime::now_utc() + Duration::days(7)
}

fn random_password() -> Result<String, ConfigError> {
    use aws_lc_rs::rand::SecureRandom;
    use base64::Engine;
    let mut bytes = [0u8; 18];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ConfigError::invalid("dev password", "no randomness available"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}
