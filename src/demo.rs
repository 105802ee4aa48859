//! `edge-est demo`: a three-layer hierarchy on loopback, in one process
//! (`demo/enrolling.rs`). Only the root and the top layer's CA are provisioned; the middle and
//! bottom layers enroll their issuing CAs from the layer above at start; then a child IoT Edge
//! device at the bottom enrolls its identity and Edge CA certificates, renews, and every chain
//! is verified against the root.
//!
//! The file-provisioned hierarchy the integration tests of layered deployments start from is
//! built here too ([`write_pki`], [`top_config`], [`forward_config`], [`start_hierarchy`]):
//! the top signs with its delegated intermediate, the two below forward as registration
//! authorities with credentials of a dedicated RA CA.

mod enrolling;

pub use enrolling::{run, write_enrolling_configs};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};

use tokio::sync::oneshot;

use crate::config::{Config, UpstreamConfig};
use crate::pki::{ca_params, leaf_params};

const TEN_YEARS: time::Duration = time::Duration::days(3650);
const ONE_YEAR: time::Duration = time::Duration::days(365);
use crate::issue::Upstream;
use crate::server::App;
use crate::transport::Listener;

/// The Basic user children of the bottom layer use, and its password.
pub const CHILD_USER: &str = "estuser";
pub const CHILD_PASSWORD: &str = "demo-password";

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Writes the hierarchy's PKI into `dir`:
/// - `root.pem`: the hierarchy root (its key is not kept);
/// - `top-ca.pem`/`.key`: the top layer's delegated intermediate (pathlen 1: it issues Edge CAs);
/// - `auto-ca.pem`/`.key`: a lower layer's own intermediate, for `auto` mode;
/// - `server.pem`/`.key`: the TLS certificate every layer serves (`localhost`, `127.0.0.1`);
/// - `ra-ca.pem`: the CA of the layers' RA credentials, `layer2-ra.pem`/`.key` and
///   `layer3-ra.pem`/`.key` (clientAuth + id-kp-cmcRA);
/// - `child-password`: the bottom layer's Basic password for children.
pub fn write_pki(dir: &Path) -> Result<(), String> {
    let root_issuer = write_root_and_top(dir, 1)?;
    let key = KeyPair::generate().map_err(err)?;
    let cert = ca_params("lower layer issuing CA", Some(1), TEN_YEARS)
        .signed_by(&key, &root_issuer)
        .map_err(err)?;
    let root = std::fs::read_to_string(dir.join("root.pem")).map_err(err)?;
    write_file(dir, "auto-ca.pem", &format!("{}{root}", cert.pem()))?;
    write_file(dir, "auto-ca.key", &key.serialize_pem())?;

    let ra_key = KeyPair::generate().map_err(err)?;
    let ra_params = ca_params("RA credentials CA", Some(0), TEN_YEARS);
    let ra_cert = ra_params.self_signed(&ra_key).map_err(err)?;
    let ra_issuer = Issuer::new(ra_params, ra_key);
    write_file(dir, "ra-ca.pem", &ra_cert.pem())?;
    for layer in ["layer2-ra", "layer3-ra"] {
        let key = KeyPair::generate().map_err(err)?;
        let cmc_ra = ExtendedKeyUsagePurpose::Other(vec![1, 3, 6, 1, 5, 5, 7, 3, 28]);
        let cert = leaf_params(
            layer,
            vec![ExtendedKeyUsagePurpose::ClientAuth, cmc_ra],
            ONE_YEAR,
        )
        .signed_by(&key, &ra_issuer)
        .map_err(err)?;
        write_file(dir, &format!("{layer}.pem"), &cert.pem())?;
        write_file(dir, &format!("{layer}.key"), &key.serialize_pem())?;
    }
    Ok(())
}

/// Writes `name` in `dir`: private (0600) for keys and the password, readable otherwise.
fn write_file(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    if name.ends_with(".key") || name == "child-password" {
        write_private(&dir.join(name), text)
    } else {
        std::fs::write(dir.join(name), text).map_err(err)
    }
}

/// Writes what every variant of the hierarchy starts from: `root.pem` (its key not kept, the
/// returned issuer aside), `top-ca.pem`/`.key` (the top layer's issuing CA, `top_path_len`,
/// chain with the root), `server.pem`/`.key` (TLS of every layer, `localhost` and
/// `127.0.0.1`, issued by the top's CA) and `child-password`.
fn write_root_and_top(dir: &Path, top_path_len: u8) -> Result<Issuer<'static, KeyPair>, String> {
    let root_key = KeyPair::generate().map_err(err)?;
    let root_params = ca_params("hierarchy root", None, TEN_YEARS);
    let root = root_params.self_signed(&root_key).map_err(err)?;
    let root_issuer = Issuer::new(root_params, root_key);

    let top_key = KeyPair::generate().map_err(err)?;
    let top_params = ca_params("top layer issuing CA", Some(top_path_len), TEN_YEARS);
    let top_cert = top_params.signed_by(&top_key, &root_issuer).map_err(err)?;
    write_file(
        dir,
        "top-ca.pem",
        &format!("{}{}", top_cert.pem(), root.pem()),
    )?;
    write_file(dir, "top-ca.key", &top_key.serialize_pem())?;
    let top = Issuer::new(top_params, top_key);

    let server_key = KeyPair::generate().map_err(err)?;
    let mut server = leaf_params(
        "localhost",
        vec![ExtendedKeyUsagePurpose::ServerAuth],
        ONE_YEAR,
    );
    server.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().map_err(err)?),
        SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
    ];
    let server_cert = server.signed_by(&server_key, &top).map_err(err)?;
    write_file(
        dir,
        "server.pem",
        &format!("{}{}", server_cert.pem(), top_cert.pem()),
    )?;
    write_file(dir, "server.key", &server_key.serialize_pem())?;
    write_file(dir, "root.pem", &root.pem())?;
    write_file(dir, "child-password", CHILD_PASSWORD)?;
    Ok(root_issuer)
}

/// Writes a file only its owner may read (mode 0600 on unix), replacing any earlier one.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let _ = std::fs::remove_file(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    #[cfg(unix)]
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The top layer: signs with `top-ca`, serves the RA `layer2-ra` (any name, Edge CAs too)
/// and its own certificates' renewals.
pub fn top_config() -> Config {
    config_from(TOP_CONFIG)
}

const TOP_CONFIG: &str = r#"
journal = "journal-top.jsonl"
[tls]
certificate = "server.pem"
key = "server.key"
[trust.ras]
certificates = ["ra-ca.pem"]
[limits]
unlimited_trust = ["ras"]
[issuers.top]
certificate = "top-ca.pem"
key = "top-ca.key"
[[labels]]
issuer = "top"
client_trust = ["ras", "issuer"]
[[labels.rules]]
match = ["certificate:ras"]
client_cn = ["layer2-ra"]
common_names = ["*"]
ca_common_names = ["aziot-edge CA *"]
dns_names = ["*"]
[[labels.rules]]
match = ["certificate:issuer"]
common_names = ["{cn}"]
ca_common_names = ["aziot-edge CA {cn}"]
"#;

/// A forwarding layer: `name` (journal-NAME.jsonl), forwarding to `upstream_port` with the RA
/// credential `ra` ("layer2-ra" or "layer3-ra"), serving the RA `serves_ra` below it (if any)
/// and Basic children (user `estuser`) and renewals by certificates of the hierarchy's CA.
pub fn forward_config(name: &str, upstream_port: u16, ra: &str, serves_ra: Option<&str>) -> Config {
    config_from(&forward_config_text(name, upstream_port, ra, serves_ra))
}

fn forward_config_text(
    name: &str,
    upstream_port: u16,
    ra: &str,
    serves_ra: Option<&str>,
) -> String {
    let ra_rule = serves_ra
        .map(|below| {
            format!(
                r#"
[[labels.rules]]
match = ["certificate:ras"]
client_cn = ["{below}"]
common_names = ["*"]
ca_common_names = ["aziot-edge CA *"]
dns_names = ["*"]
"#
            )
        })
        .unwrap_or_default();
    format!(
        r#"
journal = "journal-{name}.jsonl"
[tls]
certificate = "server.pem"
key = "server.key"
[trust.ras]
certificates = ["ra-ca.pem"]
[limits]
unlimited_trust = ["ras"]
[users]
estuser = "{hash}"
[upstreams.parent]
url = "https://localhost:{upstream_port}/.well-known/est"
trust = ["root.pem"]
certificate = "{ra}.pem"
key = "{ra}.key"
request_timeout_secs = 5
retry_after_secs = 10
[[labels]]
mode = "forward"
upstream = "parent"
client_trust = ["ras", "issuer"]
{ra_rule}
[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]
ca_common_names = ["aziot-edge CA *"]
[[labels.rules]]
match = ["certificate:issuer"]
common_names = ["{{cn}}"]
ca_common_names = ["aziot-edge CA {{cn}}"]
"#,
        hash = child_password_hash(),
    )
}

/// The configuration files of the three layers, on `port`, `port + 1` and `port + 2` of
/// loopback: `top.toml`, `middle.toml` and `bottom.toml` in `dir` (paths in them relative to
/// it), for `edge-est serve --config`.
pub fn write_configs(dir: &Path, port: u16) -> Result<[PathBuf; 3], String> {
    let [top, middle, bottom] = [port, port + 1, port + 2];
    write_config_files(
        dir,
        [
            ("top.toml", top, TOP_CONFIG.to_owned()),
            (
                "middle.toml",
                middle,
                forward_config_text("middle", top, "layer2-ra", Some("layer3-ra")),
            ),
            (
                "bottom.toml",
                bottom,
                forward_config_text("bottom", middle, "layer3-ra", None),
            ),
        ],
    )
}

/// Writes each (file name, port, configuration text) in `dir`, listening on that port.
fn write_config_files(dir: &Path, files: [(&str, u16, String); 3]) -> Result<[PathBuf; 3], String> {
    let mut written = Vec::new();
    for (name, port, text) in files {
        let text = format!(
            "# Written by `edge-est demo`: run with `edge-est serve --config {name}`.\n\
             listen = \"127.0.0.1:{port}\"{text}"
        );
        config_from(&text);
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok([written[0].clone(), written[1].clone(), written[2].clone()])
}

fn child_password_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| crate::auth::basic::hash_password(CHILD_PASSWORD).unwrap_or_default())
        .clone()
}

fn config_from(text: &str) -> Config {
    // The texts above are fixed and tested; a mistake in them is a bug caught by any test.
    toml::from_str(text).unwrap_or_else(|e| panic!("demo configuration: {e}"))
}

/// A layer running in this process.
pub struct Layer {
    pub name: String,
    pub addr: SocketAddr,
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Layer {
    /// Starts a layer with `config` (paths relative to `dir`) on `addr` (port 0: any).
    pub async fn start(
        name: &str,
        dir: &Path,
        config: &Config,
        addr: SocketAddr,
    ) -> Result<Layer, String> {
        let app = crate::app::build(config, dir).map_err(|e| format!("{name}: {e}"))?;
        let listener = Listener::bind(addr).map_err(|e| format!("{name}: {e}"))?;
        let addr = listener.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::app::run(listener, app.clone(), async {
            let _ = stopped.await;
        }));
        Ok(Layer {
            name: name.to_owned(),
            addr,
            app,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stops accepting and drains open connections.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Starts top, middle and bottom on loopback ports.
pub async fn start_hierarchy(dir: &Path) -> Result<[Layer; 3], String> {
    let any: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let top = Layer::start("top", dir, &top_config(), any).await?;
    let middle = Layer::start(
        "middle",
        dir,
        &forward_config("middle", top.addr.port(), "layer2-ra", Some("layer3-ra")),
        any,
    )
    .await?;
    let bottom = Layer::start(
        "bottom",
        dir,
        &forward_config("bottom", middle.addr.port(), "layer3-ra", None),
        any,
    )
    .await?;
    Ok([top, middle, bottom])
}

/// An EST client for a device of the demo: edge-est's own upstream client, pointed at the
/// layer `layer` on `port` with the device's credentials.
fn child_client(
    dir: &Path,
    layer: &str,
    port: u16,
    identity: Option<(&str, &str)>,
    basic: bool,
) -> Result<Upstream, String> {
    let (certificate, key) = match identity {
        Some((cert, key)) => (
            Some(crate::config::PemSource(cert.to_owned())),
            Some(PathBuf::from(key)),
        ),
        None => (None, None),
    };
    let config = UpstreamConfig {
        url: format!("https://localhost:{port}/.well-known/est"),
        trust: vec![crate::config::PemSource("root.pem".into())],
        certificate,
        key,
        username: basic.then(|| CHILD_USER.to_owned()),
        password_file: basic.then(|| PathBuf::from("child-password")),
        connect_timeout_secs: 3,
        request_timeout_secs: 25,
        cacerts_ttl_secs: 0,
        cacerts_stale_secs: 0,
        retry_after_secs: 1,
        probe_max_secs: 5,
    };
    Upstream::new(layer, &config, dir).map_err(err)
}

fn csr(cn: &str, key: &KeyPair, ca: bool) -> Result<Vec<u8>, String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    }
    Ok(params.serialize_request(key).map_err(err)?.der().to_vec())
}

/// Verifies `leaf` + `chain` against `root_pem` (any key usage).
fn verify(leaf: &[u8], chain: &[CertificateDer<'static>], root_pem: &str) -> Result<(), String> {
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(root_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{e:?}"))?;
    let leaf = CertificateDer::from(leaf.to_vec());
    let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| format!("{e:?}"))?;
    let now = UnixTime::since_unix_epoch(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let algorithms = rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all;
    // clientAuth where an extended key usage is present: Edge CAs carry none.
    let usage = webpki::KeyUsage::client_auth();
    ee.verify_for_usage(algorithms, &anchors, chain, now, usage, None, None)
        .map(|_| ())
        .map_err(|e| format!("chain does not verify: {e:?}"))
}

fn subject_of(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn write_pem(dir: &Path, name: &str, ders: &[&[u8]]) -> Result<PathBuf, String> {
    let chain: Vec<CertificateDer<'_>> = ders.iter().map(|d| CertificateDer::from(*d)).collect();
    let path = dir.join(name);
    std::fs::write(&path, crate::issue::delegation::pem_of(&chain)).map_err(err)?;
    Ok(path)
}

/// The first port of the configurations the demo writes (then +1, +2).
pub const CONFIG_PORT: u16 = 18085;

/// `a, b ×2` for the identities `a, b, b` (runs of the same identity counted).
fn who_asked<'a>(identities: impl Iterator<Item = &'a str>) -> String {
    let mut runs: Vec<(&str, usize)> = Vec::new();
    for identity in identities {
        match runs.last_mut() {
            Some((last, count)) if *last == identity => *count += 1,
            _ => runs.push((identity, 1)),
        }
    }
    runs.iter()
        .map(|(identity, count)| match count {
            1 => (*identity).to_owned(),
            n => format!("{identity} ×{n}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
