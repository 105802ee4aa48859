//! The hierarchy `edge-est demo` runs. Only the root and the top layer's issuing CA are
//! provisioned. Each lower layer's gateway device enrolls at the layer above as IoT Edge does
//! (its identity with Basic, then its Edge CA with that identity) and mints the certificate of
//! its `edgeest` module below its Edge CA: the layer's RA credential, `module:DEVICE/edgeest`
//! to the layer above. The layer then starts without CA files, enrolls its issuing CA from the
//! layer above (`[enrolled_issuers]`, granted there by the RA rule's `sub_ca`) and signs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{ExtendedKeyUsagePurpose, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::{
    child_client, child_password_hash, config_from, csr, err, subject_of, verify,
    write_config_files, write_pem, write_private, write_root_and_top, Layer, ONE_YEAR,
};
use crate::issue::delegation;
use crate::issue::Upstream;
use crate::pki::leaf_params;

/// The top layer's CA's pathlen: the middle's CA gets 2, the bottom's 1, Edge CAs 0.
const TOP_PATH_LEN: u8 = 3;

/// A lower layer: its gateway device, the CA it enrolls, and the DNS subtree the layer above
/// grants that CA (its name constraint).
struct Lower {
    name: &'static str,
    /// The layer above: also the name of the upstream it enrolls from.
    above: &'static str,
    device: &'static str,
    ca: &'static str,
    path_len: u8,
    dns_subtree: &'static str,
}

const MIDDLE: Lower = Lower {
    name: "middle",
    above: "top",
    device: "gw-middle",
    ca: "middle layer issuing CA",
    path_len: 2,
    dns_subtree: "*.plant.local",
};

const BOTTOM: Lower = Lower {
    name: "bottom",
    above: "middle",
    device: "gw-bottom",
    ca: "bottom layer issuing CA",
    path_len: 1,
    dns_subtree: "*.line3.plant.local",
};

/// A layer's configuration. `enrolls`: the lower layer it is and the port of the layer above
/// (None: the top, signing with `top-ca`). `below`: the lower layer whose `edgeest` module is
/// its RA, granted a sub-CA. Basic user `estuser`: gateways (`gw-*`) where a layer is below,
/// children (any name) at the bottom. Certificates this layer issued renew and get the Edge
/// CA in their own name.
fn layer_text(enrolls: Option<(&Lower, u16)>, below: Option<&Lower>) -> String {
    let name = enrolls.map_or("top", |(lower, _)| lower.name);
    let issuer = match enrolls {
        None => "[issuers.top]\ncertificate = \"top-ca.pem\"\nkey = \"top-ca.key\"\n".to_owned(),
        Some((lower, port)) => format!(
            r#"[upstreams.{above}]
url = "https://localhost:{port}/.well-known/est"
trust = ["root.pem"]
certificate = "{name}-ra.pem"
key = "{name}-ra.key"
request_timeout_secs = 5
retry_after_secs = 10
[enrolled_issuers.{name}]
enroll = "{above}"
common_name = "{ca}"
path_len = {path_len}
root = "root.pem"
"#,
            above = lower.above,
            ca = lower.ca,
            path_len = lower.path_len,
        ),
    };
    let basic_names = if below.is_some() { "gw-*" } else { "*" };
    let ra_rule = below
        .map(|below| {
            format!(
                r#"[[labels.rules]]
match = ["module:{device}/edgeest"]
registration_authority = true
common_names = ["*"]
dns_names = ["{dns}"]
[labels.rules.sub_ca]
common_names = ["{ca}"]
max_path_len = {path_len}
"#,
                device = below.device,
                dns = below.dns_subtree,
                ca = below.ca,
                path_len = below.path_len,
            )
        })
        .unwrap_or_default();
    format!(
        r#"
journal = "journal-{name}.jsonl"
[tls]
certificate = "server.pem"
key = "server.key"
[users]
estuser = "{hash}"
{issuer}[[labels]]
issuer = "{name}"
client_trust = ["issuer"]
[[labels.rules]]
match = ["user:estuser"]
common_names = ["{basic_names}"]
[[labels.rules]]
match = ["certificate:issuer"]
common_names = ["{{cn}}"]
ca_common_names = ["aziot-edge CA {{cn}}"]
{ra_rule}"#,
        hash = child_password_hash(),
    )
}

/// The demo's configuration files, on `port`, `port + 1` and `port + 2` of loopback:
/// `top.toml` (signs with the provisioned `top-ca`), `middle.toml` and `bottom.toml` (enroll
/// their CAs from the layer above with the RA credentials `middle-ra` and `bottom-ra`).
pub fn write_enrolling_configs(dir: &Path, port: u16) -> Result<[PathBuf; 3], String> {
    write_config_files(
        dir,
        [
            ("top.toml", port, layer_text(None, Some(&MIDDLE))),
            (
                "middle.toml",
                port + 1,
                layer_text(Some((&MIDDLE, port)), Some(&BOTTOM)),
            ),
            (
                "bottom.toml",
                port + 2,
                layer_text(Some((&BOTTOM, port + 1)), None),
            ),
        ],
    )
}

/// `lower`'s gateway device enrolls at the layer `above` as IoT Edge does: its identity
/// (`DEVICE.pem`/`.key`) with Basic, then its Edge CA with that identity. Below the Edge CA it
/// mints its `edgeest` module's certificate, the layer's RA credential: `NAME-ra.pem` (with
/// the Edge CA) and `NAME-ra.key`.
async fn enroll_gateway(dir: &Path, lower: &Lower, above: &Layer) -> Result<(), String> {
    let (layer, port) = (above.name.as_str(), above.addr.port());
    let device_key = KeyPair::generate().map_err(err)?;
    let identity = child_client(dir, layer, port, None, true)?
        .enroll(None, &csr(lower.device, &device_key, false)?)
        .await
        .map_err(|e| format!("{}'s identity: {e}", lower.device))?;
    let (cert_file, key_file) = (
        format!("{}.pem", lower.device),
        format!("{}.key", lower.device),
    );
    write_pem(dir, &cert_file, &[&identity[0]])?;
    write_private(&dir.join(&key_file), &device_key.serialize_pem())?;

    let ca_key = KeyPair::generate().map_err(err)?;
    let edge_ca_name = format!("aziot-edge CA {}", lower.device);
    let edge_ca = child_client(dir, layer, port, Some((&cert_file, &key_file)), false)?
        .enroll(None, &csr(&edge_ca_name, &ca_key, true)?)
        .await
        .map_err(|e| format!("{}'s Edge CA: {e}", lower.device))?;
    let edge_ca = edge_ca[0].clone();
    let issuer =
        Issuer::from_ca_cert_der(&CertificateDer::from(edge_ca.clone()), ca_key).map_err(err)?;
    let module_key = KeyPair::generate().map_err(err)?;
    let mut module = leaf_params(
        "edgeest",
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        ONE_YEAR,
    );
    if let Some(not_after) = delegation::not_after(&edge_ca) {
        module.not_after = module.not_after.min(not_after);
    }
    let module = module.signed_by(&module_key, &issuer).map_err(err)?;
    write_pem(
        dir,
        &format!("{}-ra.pem", lower.name),
        &[module.der(), &edge_ca],
    )?;
    write_private(
        &dir.join(format!("{}-ra.key", lower.name)),
        &module_key.serialize_pem(),
    )
}

/// Starts `lower` on loopback, enrolling its CA from `above` (its gateway's RA credential
/// obtained first), and serving `below` as RA. Waits for the CA, checks its chain (the CA's
/// pathlen and keyCertSign, each certificate signed by the next up to the root), keeps it in
/// `NAME-ca.pem` and prints it.
async fn start_lower(
    dir: &Path,
    lower: &Lower,
    above: &Layer,
    below: Option<&Lower>,
    root_pem: &str,
) -> Result<Layer, String> {
    enroll_gateway(dir, lower, above).await?;
    let started = Instant::now();
    let config = config_from(&layer_text(Some((lower, above.addr.port())), below));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let layer = Layer::start(lower.name, dir, &config, any).await?;
    let until = started + Duration::from_secs(20);
    let state = loop {
        let runtime = layer.app.runtime();
        if let Some(enrolled) = runtime.enrolled().first() {
            if enrolled.fingerprint.is_some() {
                break enrolled.dir.clone();
            }
        }
        if Instant::now() > until {
            return Err(format!(
                "{}: no CA enrolled from {} within 20 s",
                lower.name, above.name
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = started.elapsed();
    let kept = delegation::read_kept(&state)
        .ok_or_else(|| format!("{}: the enrolled CA is not kept", lower.name))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(kept.chain.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let root = CertificateDer::from_pem_slice(root_pem.as_bytes()).map_err(err)?;
    let (ca, above_ca) = chain
        .split_first()
        .ok_or_else(|| format!("{}: an empty chain", lower.name))?;
    let spki = x509_parser::parse_x509_certificate(ca)
        .map(|(_, c)| c.public_key().raw.to_vec())
        .map_err(err)?;
    delegation::check_answer(&[ca.to_vec()], above_ca, &root, &spki, lower.path_len)
        .map_err(|e| format!("{}'s CA: {e}", lower.name))?;
    std::fs::write(dir.join(format!("{}-ca.pem", lower.name)), &kept.chain).map_err(err)?;
    println!(
        "  {:<7} https://localhost:{}  enrolled its CA from {} (as module edgeest of {}) in {:.1} ms:",
        lower.name,
        layer.addr.port(),
        above.name,
        lower.device,
        took.as_secs_f64() * 1000.0
    );
    for c in &chain {
        println!("    {}", subject_of(c));
    }
    Ok(layer)
}

/// Runs the demo in `dir`; prints each step, its time and its chain. The configurations it
/// leaves listen on `config_port` and the two ports after it.
pub async fn run(dir: &Path, config_port: u16) -> Result<(), String> {
    let started = Instant::now();
    write_root_and_top(dir, TOP_PATH_LEN)?;
    let root = std::fs::read_to_string(dir.join("root.pem")).map_err(err)?;
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let top = Layer::start(
        "top",
        dir,
        &config_from(&layer_text(None, Some(&MIDDLE))),
        any,
    )
    .await?;
    println!(
        "hierarchy on loopback (PKI in {}; provisioned: root.pem and the top layer's CA):",
        dir.display()
    );
    println!(
        "  top     https://localhost:{}  signs with \"top layer issuing CA\" (top-ca.pem, pathlen {TOP_PATH_LEN})",
        top.addr.port()
    );
    let middle = start_lower(dir, &MIDDLE, &top, Some(&BOTTOM), &root).await?;
    let bottom = start_lower(dir, &BOTTOM, &middle, None, &root).await?;
    println!(
        "  ready in {:.0} ms. Each gateway enrolled its identity and Edge CA at the layer above;\n  \
         the certificate of its module edgeest is the RA credential its layer enrolled the CA\n  \
         with (middle-ra.pem, bottom-ra.pem; the CAs' chains in middle-ca.pem, bottom-ca.pem)\n",
        started.elapsed().as_secs_f64() * 1000.0
    );
    enroll_child(dir, bottom.addr.port(), &root).await?;

    println!("\njournals (who asked each layer, as that layer authenticated it; [sub-ca]: a layer's CA):");
    // (layer, entries, of which CAs: the one granted below and the layer's own)
    let expected = [(&top, 3, 1), (&middle, 4, 2), (&bottom, 4, 1)];
    let mut wrong = Vec::new();
    for (layer, entries, cas) in expected {
        let journal = crate::journal::Journal::read_all(layer.app.journal().path()).map_err(err)?;
        let who: Vec<String> = journal
            .iter()
            .map(|e| match e.profile.as_str() {
                "sub-ca" => format!("{} [sub-ca]", e.identity),
                _ => e.identity.clone(),
            })
            .collect();
        println!(
            "  {:<7} {} entries: {}",
            layer.name,
            journal.len(),
            super::who_asked(who.iter().map(String::as_str))
        );
        let sub_cas = journal.iter().filter(|e| e.profile == "sub-ca").count();
        if journal.len() != entries || sub_cas != cas {
            wrong.push(layer.name.clone());
        }
    }
    if !wrong.is_empty() {
        return Err(format!(
            "the journals of {} do not hold what was issued",
            wrong.join(", ")
        ));
    }
    for layer in [top, middle, bottom] {
        layer.stop().await;
    }
    let configs = write_enrolling_configs(dir, config_port)?;
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

/// A child IoT Edge device at the bottom (`port`): its identity with Basic, its Edge CA with
/// that identity (verified by a module certificate it issues), and a renewal with a new key.
/// Each chain verified against the root.
async fn enroll_child(dir: &Path, port: u16, root: &str) -> Result<(), String> {
    // Each issuance as IoT Edge does it: simpleenroll and cacerts at once.
    let issue = |client: Upstream, csr_der: Vec<u8>| async move {
        let t = Instant::now();
        let (enrolled, cacerts) = tokio::join!(client.enroll(None, &csr_der), client.cacerts(None));
        let enrolled = enrolled.map_err(err)?;
        let cacerts = cacerts.map_err(err)?;
        Ok::<_, String>((enrolled, cacerts, t.elapsed()))
    };
    let print_chain = |leaf: &[u8], cacerts: &[CertificateDer<'static>]| {
        println!("    {}", subject_of(leaf));
        for c in cacerts {
            println!("    {}", subject_of(c));
        }
    };
    let step = |title: &str,
                leaf: &[u8],
                cacerts: &[CertificateDer<'static>],
                took: Duration|
     -> Result<(), String> {
        verify(leaf, cacerts, root)?;
        println!(
            "{title}: {:.1} ms, chain verified against the root",
            took.as_secs_f64() * 1000.0
        );
        print_chain(leaf, cacerts);
        Ok(())
    };
    let as_device = || {
        child_client(
            dir,
            "bottom layer",
            port,
            Some(("child-device.pem", "child-device.key")),
            false,
        )
    };

    let device_key = KeyPair::generate().map_err(err)?;
    let (certs, cacerts, took) = issue(
        child_client(dir, "bottom layer", port, None, true)?,
        csr("child-device", &device_key, false)?,
    )
    .await?;
    step(
        "1. device identity (Basic at the bottom, signed there)",
        &certs[0],
        &cacerts,
        took,
    )?;
    write_pem(dir, "child-device.pem", &[&certs[0]])?;
    write_private(&dir.join("child-device.key"), &device_key.serialize_pem())?;

    let ca_key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).map_err(err)?;
    let (certs, cacerts, took) = issue(
        as_device()?,
        csr("aziot-edge CA child-device", &ca_key, true)?,
    )
    .await?;
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
    verify(module.der(), &through_edge_ca, root).map_err(|e| format!("Edge CA: {e}"))?;
    println!(
        "2. Edge CA (authenticated by the device certificate): {:.1} ms, a module certificate it issues verifies against the root",
        took.as_secs_f64() * 1000.0
    );
    print_chain(&certs[0], &cacerts);

    let renewal_key = KeyPair::generate().map_err(err)?;
    let (certs, cacerts, took) =
        issue(as_device()?, csr("child-device", &renewal_key, false)?).await?;
    step(
        "3. renewal with a new key (simpleenroll with the current certificate)",
        &certs[0],
        &cacerts,
        took,
    )
}
