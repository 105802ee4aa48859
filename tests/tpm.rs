//! A key in a TPM through tpm2-pkcs11, as on a gateway with `/dev/tpmrm0`: here a software TPM
//! (swtpm) behind the TPM2 access broker and resource manager (tpm2-abrmd, on a D-Bus session
//! bus of this test), the token and its key made by `tpm2_ptool` as `tools/tpm2-token.sh` makes
//! them. edge-est issues with the TPM-held issuing CA key through the real TLS server (chain
//! verified with openssl), the key reports itself unexportable, and a wrong PIN is a load error
//! without the PIN.
//!
//! The tools are Debian's swtpm, tpm2-abrmd, libtss2-tcti-swtpm0, libtss2-tcti-tabrmd0,
//! tpm2-tools, libtpm2-pkcs11-1, libtpm2-pkcs11-tools and dbus-daemon (`.ci/run` installs
//! them). Missing, the test fails and says
//! what to install; `EDGE_EST_SKIP_MISSING_TOOLS=1` turns that into a skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{enrolled, openssl_verify, standard_config, Pki, TestServer};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use edge_est::keys::{TokenKey, TokenKeyKind};
use rcgen::PublicKeyData;

const USER_PIN: &str = "7731-tpm-pin";
const SO_PIN: &str = "so-pin-0000";
const TCTI: &str = "tabrmd:bus_type=session";

/// Debian's tpm2-pkcs11 library for this machine's architecture.
fn tpm2_pkcs11() -> PathBuf {
    PathBuf::from(format!(
        "/usr/lib/{}-linux-gnu/pkcs11/libtpm2_pkcs11.so",
        std::env::consts::ARCH
    ))
}

/// Whether the tools this test drives are here: a missing one fails the test naming its
/// package (or skips it, with EDGE_EST_SKIP_MISSING_TOOLS=1: see `common::missing`).
fn tools_present() -> bool {
    let programs = [
        ("swtpm", "swtpm"),
        ("tpm2-abrmd", "tpm2-abrmd"),
        ("tpm2_ptool", "libtpm2-pkcs11-tools"),
        ("tpm2_getrandom", "tpm2-tools"),
        ("dbus-daemon", "dbus-daemon"),
    ];
    if programs
        .iter()
        .any(|(name, package)| common::tool(name, package).is_none())
    {
        return false;
    }
    tpm2_pkcs11().exists()
        || common::missing::<()>(&format!(
            "{} is not installed (apt-get install libtpm2-pkcs11-1 libtss2-tcti-swtpm0 \
             libtss2-tcti-tabrmd0)",
            tpm2_pkcs11().display()
        ))
        .is_some()
}

/// The processes of a software TPM stack, ended (by their ids) when dropped.
struct TpmStack {
    children: Vec<Child>,
}

impl Drop for TpmStack {
    fn drop(&mut self) {
        // The broker before the bus and the TPM it talks to.
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn quiet(command: &mut Command) -> &mut Command {
    command.stdout(Stdio::null()).stderr(Stdio::null())
}

/// swtpm on two loopback ports, a D-Bus session bus, tpm2-abrmd on it; this process's
/// environment then points tpm2-pkcs11 and tpm2-tools at the broker and at `dir/store`.
fn start_tpm(dir: &Path) -> TpmStack {
    let mut stack = TpmStack {
        children: Vec::new(),
    };
    std::fs::create_dir(dir.join("state")).unwrap();
    std::fs::create_dir(dir.join("store")).unwrap();
    // The swtpm TCTI finds the control port at the TPM port + 1.
    let (server, ctrl) = loop {
        let port = free_port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            break (port, port + 1);
        }
    };
    stack.children.push(
        quiet(Command::new("swtpm").args([
            "socket",
            "--tpm2",
            "--tpmstate",
            &format!("dir={}", dir.join("state").display()),
            "--server",
            &format!("type=tcp,port={server},bindaddr=127.0.0.1"),
            "--ctrl",
            &format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"),
            "--flags",
            "not-need-init,startup-clear",
        ]))
        .spawn()
        .unwrap(),
    );
    let bus = format!("unix:path={}", dir.join("bus").display());
    stack.children.push(
        quiet(Command::new("dbus-daemon").args([
            "--session",
            "--nofork",
            &format!("--address={bus}"),
        ]))
        .spawn()
        .unwrap(),
    );
    wait_for(|| dir.join("bus").exists(), "the D-Bus session bus");
    // Before any thread reads the environment or the library is loaded (this test is the
    // binary's only one).
    std::env::set_var("DBUS_SESSION_BUS_ADDRESS", &bus);
    std::env::set_var("TPM2TOOLS_TCTI", TCTI);
    std::env::set_var("TPM2_PKCS11_TCTI", TCTI);
    std::env::set_var("TPM2_PKCS11_STORE", dir.join("store"));
    std::env::set_var("TSS2_LOG", "all+NONE");
    // swtpm listens once it has its state; the broker connects to it at start. Probed on its
    // control port: swtpm serves one TPM connection at a time.
    wait_for(
        || std::net::TcpStream::connect(("127.0.0.1", ctrl)).is_ok(),
        "swtpm",
    );
    stack.children.push(
        Command::new("tpm2-abrmd")
            .args([
                "--session",
                "--allow-root",
                "--flush-all",
                &format!("--tcti=swtpm:host=127.0.0.1,port={server}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("abrmd.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_or(
        || {
            quiet(Command::new("tpm2_getrandom").arg("4"))
                .status()
                .is_ok_and(|s| s.success())
        },
        || {
            format!(
                "tpm2-abrmd did not come up: {}",
                std::fs::read_to_string(dir.join("abrmd.log")).unwrap_or_default()
            )
        },
    );
    stack
}

fn wait_for(ready: impl Fn() -> bool, what: &str) {
    wait_for_or(ready, || format!("{what} did not come up"))
}

fn wait_for_or(ready: impl Fn() -> bool, failed: impl Fn() -> String) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < Duration::from_secs(20), "{}", failed());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `tools/tpm2-token.sh`: a token labelled `label` with an ECC P-256 key `object` made in the
/// TPM.
fn make_token(dir: &Path, label: &str, object: &str) {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/tpm2-token.sh"))
        .args([
            "--store",
            &dir.join("store").display().to_string(),
            "--token",
            label,
            "--object",
            object,
            "--algorithm",
            "ecc256",
        ])
        .env("USER_PIN", USER_PIN)
        .env("SO_PIN", SO_PIN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tpm2-token.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        !said.contains(USER_PIN) && !said.contains(SO_PIN),
        "the script printed a PIN: {said}"
    );
}

/// The uncompressed EC point of the public key labelled `object`, read through cryptoki.
struct TpmPublic(Vec<u8>);

impl PublicKeyData for TpmPublic {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

fn public_key(label: &str, object: &str) -> TpmPublic {
    let ctx = edge_est::keys::pkcs11::module(&tpm2_pkcs11()).unwrap();
    let slot = ctx
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == label)
        .expect("the token is in a slot");
    let session = ctx.open_ro_session(slot).unwrap();
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(object.as_bytes().to_vec()),
        ])
        .unwrap();
    let point = match &session
        .get_attributes(found[0], &[AttributeType::EcPoint])
        .unwrap()[0]
    {
        // An OCTET STRING around the uncompressed point.
        Attribute::EcPoint(p) => p[2..].to_vec(),
        other => panic!("{other:?}"),
    };
    TpmPublic(point)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issuance_with_a_tpm_held_issuing_key() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _tpm = start_tpm(dir.path());
    make_token(dir.path(), "edge-tpm", "issuing-ca");
    let public = public_key("edge-tpm", "issuing-ca");

    let pki = Pki::generate_p256(dir.path());
    let params = edge_est::pki::ca_params(
        "edge-est TPM issuing CA",
        Some(1),
        time::Duration::days(3650),
    );
    let cert = params.signed_by(&public, &pki.root.issuer).unwrap();
    let chain = format!("{}{}", cert.pem(), pki.root.cert_pem);
    std::fs::write(dir.path().join("issuing-ca.pem"), &chain).unwrap();
    let key_uri = format!("pkcs11:token=edge-tpm;object=issuing-ca?pin-value={USER_PIN}");

    // The key is the TPM's: sensitive, not extractable, as the token reports it.
    let key = TokenKey::open(&key_uri, Some(&tpm2_pkcs11()), &chain).unwrap();
    assert_eq!(key.kind(), TokenKeyKind::EcP256);
    assert_eq!(key.protection().unwrap(), (Some(true), Some(false)));

    let mut config = standard_config(&pki);
    config.issuers.get_mut("plant").unwrap().key = PathBuf::from(&key_uri);
    config.pkcs11_module = Some(tpm2_pkcs11());
    let server = TestServer::start(dir.path(), &config).await;
    for cn in ["device-1", "device-2"] {
        let issued = enrolled(&server, &pki.root.cert_pem, cn).await;
        std::fs::write(dir.path().join("leaf.pem"), &issued.cert_pem).unwrap();
        assert!(
            openssl_verify(dir.path(), "root.pem", "issuing-ca.pem", "leaf.pem"),
            "{cn}: the chain does not verify"
        );
        // Negative control: the file issuing CA does not vouch for it.
        std::fs::write(dir.path().join("other-ca.pem"), &pki.issuing.cert_pem).unwrap();
        assert!(!openssl_verify(
            dir.path(),
            "root.pem",
            "other-ca.pem",
            "leaf.pem"
        ));
    }
    server.stop().await;

    // A wrong PIN is a load error naming the URI, the PIN redacted.
    config.issuers.get_mut("plant").unwrap().key =
        PathBuf::from("pkcs11:token=edge-tpm;object=issuing-ca?pin-value=wrong-4242");
    let err = match edge_est::runtime::Runtime::build(&config, dir.path()) {
        Ok(_) => panic!("a wrong PIN loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.starts_with("issuers.plant.key: ") && err.contains("wrong PIN"),
        "{err}"
    );
    assert!(
        !err.contains("wrong-4242") && err.contains("pin-value=(redacted)"),
        "{err}"
    );
}
