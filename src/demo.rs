//! `edge-est demo`: a three-layer hierarchy on loopback, in one process. The top layer signs
//! with its delegated intermediate, the two below forward as registration authorities; then a
//! child IoT Edge device at the bottom enrolls its identity and Edge CA certificates, renews,
//! and every chain is verified against the root.
//!
//! The PKI and configurations are built here so that the integration tests of layered
//! deployments start from the same hierarchy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    let write = |name: &str, text: &str| {
        if name.ends_with(".key") || name == "child-password" {
            write_private(&dir.join(name), text)
        } else {
            std::fs::write(dir.join(name), text).map_err(err)
        }
    };
    let root_key = KeyPair::generate().map_err(err)?;
    let root_params = ca_params("hierarchy root", None, TEN_YEARS);
    let root = root_params.self_signed(&root_key).map_err(err)?;
    let root_issuer = Issuer::new(root_params, root_key);

    let intermediate = |cn: &str, file: &str| -> Result<Issuer<'static, KeyPair>, String> {
        let key = KeyPair::generate().map_err(err)?;
        let params = ca_params(cn, Some(1), TEN_YEARS);
        let cert = params.signed_by(&key, &root_issuer).map_err(err)?;
        write(
            &format!("{file}.pem"),
            &format!("{}{}", cert.pem(), root.pem()),
        )?;
        write(&format!("{file}.key"), &key.serialize_pem())?;
        Ok(Issuer::new(params, key))
    };
    let top = intermediate("top layer issuing CA", "top-ca")?;
    intermediate("lower layer issuing CA", "auto-ca")?;

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
    let top_pem = std::fs::read_to_string(dir.join("top-ca.pem")).map_err(err)?;
    let top_only = top_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap_or_default();
    write("server.pem", &format!("{}{top_only}", server_cert.pem()))?;
    write("server.key", &server_key.serialize_pem())?;
    write("root.pem", &root.pem())?;

    let ra_key = KeyPair::generate().map_err(err)?;
    let ra_params = ca_params("RA credentials CA", Some(0), TEN_YEARS);
    let ra_cert = ra_params.self_signed(&ra_key).map_err(err)?;
    let ra_issuer = Issuer::new(ra_params, ra_key);
    write("ra-ca.pem", &ra_cert.pem())?;
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
        write(&format!("{layer}.pem"), &cert.pem())?;
        write(&format!("{layer}.key"), &key.serialize_pem())?;
    }
    write("child-password", CHILD_PASSWORD)?;
    Ok(())
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
    let files = [
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
    ];
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

/// An EST client for the demo's child device: edge-est's own upstream client, pointed at the
/// bottom layer with the child's credentials.
fn child_client(
    dir: &Path,
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
    Upstream::new("bottom layer", &config, dir).map_err(err)
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
    use base64::Engine;
    let mut text = String::new();
    for der in ders {
        text.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        for line in b64.as_bytes().chunks(64) {
            text.push_str(&String::from_utf8_lossy(line));
            text.push('\n');
        }
        text.push_str("-----END CERTIFICATE-----\n");
    }
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(err)?;
    Ok(path)
}

/// The first port of the configurations the demo writes (then +1, +2).
pub const CONFIG_PORT: u16 = 18085;

/// Runs the demo in `dir`; prints each step, its time and its chain. The configurations it
/// leaves listen on `config_port` and the two ports after it.
pub async fn run(dir: &Path, config_port: u16) -> Result<(), String> {
    let started = Instant::now();
    write_pki(dir)?;
    let configs = write_configs(dir, config_port)?;
    let layers = start_hierarchy(dir).await?;
    let [top, middle, bottom] = &layers;
    println!("hierarchy on loopback (PKI in {}):", dir.display());
    println!(
        "  top     https://localhost:{}  signs with \"top layer issuing CA\"",
        top.addr.port()
    );
    println!(
        "  middle  https://localhost:{}  forwards to top as RA layer2-ra",
        middle.addr.port()
    );
    println!(
        "  bottom  https://localhost:{}  forwards to middle as RA layer3-ra",
        bottom.addr.port()
    );
    println!(
        "  ready in {:.0} ms\n",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let root = std::fs::read_to_string(dir.join("root.pem")).map_err(err)?;
    let port = bottom.addr.port();

    // Each issuance as IoT Edge does it: simpleenroll and cacerts at once.
    let issue = |client: Upstream, csr_der: Vec<u8>| async move {
        let t = Instant::now();
        let (enrolled, cacerts) = tokio::join!(client.enroll(None, &csr_der), client.cacerts(None));
        let enrolled = enrolled.map_err(err)?;
        let cacerts = cacerts.map_err(err)?;
        Ok::<_, String>((enrolled, cacerts, t.elapsed()))
    };
    let step = |title: &str,
                leaf: &[u8],
                cacerts: &[CertificateDer<'static>],
                took: Duration|
     -> Result<(), String> {
        verify(leaf, cacerts, &root)?;
        println!(
            "{title}: {:.1} ms, chain verified against the root",
            took.as_secs_f64() * 1000.0
        );
        println!("    {}", subject_of(leaf));
        for c in cacerts {
            println!("    {}", subject_of(c));
        }
        Ok(())
    };

    let device_key = KeyPair::generate().map_err(err)?;
    let (certs, cacerts, took) = issue(
        child_client(dir, port, None, true)?,
        csr("child-device", &device_key, false)?,
    )
    .await?;
    step(
        "1. device identity (Basic at the bottom, forwarded twice)",
        &certs[0],
        &cacerts,
        took,
    )?;
    write_pem(dir, "child-device.pem", &[&certs[0]])?;
    write_private(&dir.join("child-device.key"), &device_key.serialize_pem())?;

    let ca_key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).map_err(err)?;
    let as_device = child_client(
        dir,
        port,
        Some(("child-device.pem", "child-device.key")),
        false,
    )?;
    let (certs, cacerts, took) =
        issue(as_device, csr("aziot-edge CA child-device", &ca_key, true)?).await?;
    // A CA is not an end entity: prove the Edge CA works as IoT Edge uses it, by issuing a
    // module certificate with it and verifying that through the Edge CA to the root.
    let edge_ca =
        Issuer::from_ca_cert_der(&CertificateDer::from(certs[0].clone()), ca_key).map_err(err)?;
    let module_key = KeyPair::generate().map_err(err)?;
    let module = leaf_params(
        "edgeHub",
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        ONE_YEAR,
    )
    .signed_by(&module_key, &edge_ca)
    .map_err(err)?;
    let mut through_edge_ca = vec![CertificateDer::from(certs[0].clone())];
    through_edge_ca.extend(cacerts.iter().cloned());
    verify(module.der(), &through_edge_ca, &root).map_err(|e| format!("Edge CA: {e}"))?;
    println!(
        "2. Edge CA (authenticated by the device certificate): {:.1} ms, a module certificate it issues verifies against the root",
        took.as_secs_f64() * 1000.0
    );
    println!("    {}", subject_of(&certs[0]));
    for c in &cacerts {
        println!("    {}", subject_of(c));
    }

    let renewal_key = KeyPair::generate().map_err(err)?;
    let as_device = child_client(
        dir,
        port,
        Some(("child-device.pem", "child-device.key")),
        false,
    )?;
    let (certs, cacerts, took) =
        issue(as_device, csr("child-device", &renewal_key, false)?).await?;
    step(
        "3. renewal with a new key (simpleenroll with the current certificate)",
        &certs[0],
        &cacerts,
        took,
    )?;

    let top_journal = crate::journal::Journal::read_all(top.app.journal().path()).map_err(err)?;
    let bottom_journal =
        crate::journal::Journal::read_all(bottom.app.journal().path()).map_err(err)?;
    println!("\njournals (who asked each layer, as that layer authenticated it):");
    for (name, journal) in [("top", &top_journal), ("bottom", &bottom_journal)] {
        println!(
            "  {name:<7} {} entries: {}",
            journal.len(),
            who_asked(journal.iter().map(|e| e.identity.as_str()))
        );
    }
    if top_journal.len() != 3 || bottom_journal.len() != 3 {
        return Err("the journals do not hold the three certificates".into());
    }
    for layer in layers {
        layer.stop().await;
    }
    let name = |p: &PathBuf| p.display().to_string();
    println!(
        "\nconfigurations: {} (127.0.0.1:{config_port}), {} (:{}), {} (:{}); run each with\n  \
         edge-est serve --config {}",
        name(&configs[0]),
        name(&configs[1]),
        config_port + 1,
        name(&configs[2]),
        config_port + 2,
        name(&configs[0]),
    );
    println!(
        "demo passed in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

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
