//! Who the client is, tried as an attacker would (issue 11, findings 1 to 4), each probe with
//! its positive control: the same request, made by the legitimate holder, succeeds.
//!
//! 1. Any device can mint the RA's CN below its own Edge CA: the RA is named as a module of
//!    one device instead (`module:DEVICE/MODULE`), with the shipped top-layer manifest.
//! 2. A trust set listing an issuing CA must not accept what devices' Edge CAs mint below it.
//! 3. `issuer` means this label's issuance, not anything the same CA signed elsewhere.
//! 4. The grace window looks at the leaf as of its expiry, never at an expired CA above it.

mod common;

use std::path::Path;

use ::time::{Duration, OffsetDateTime};
use common::client::{
    basic, csr_shaped as csr, leaf_of, post_csr as post, refused, to_pem, EstClient,
};
use common::pki::{Credential, TestCa};
use common::{enrolled_at, openssl_verify, Pki, TestServer, PASSWORD, USER};
use edge_est::config::Config;
use edge_est::edge::desired::{module_config, ModuleDefaults};
use edge_est::runtime::Runtime;
use rcgen::{
    BasicConstraints, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::Value;

// ---- helpers ------------------------------------------------------------------------------

fn plain(cn: &str) -> Vec<u8> {
    csr(cn, &KeyPair::generate().unwrap(), |_| {})
}

/// IoT Edge's Edge CA request: CA:TRUE, pathlen 0, keyCertSign.
fn edge_ca_csr(device: &str, key: &KeyPair) -> Vec<u8> {
    csr(&format!("aziot-edge CA {device}"), key, |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    })
}

fn client(addr: std::net::SocketAddr, root: &str, who: Option<(&str, &str)>) -> EstClient {
    EstClient::new(addr, root, who)
}

/// A device's Edge CA, obtained by EST, with its key: what mints its modules' certificates.
struct EdgeCa {
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl EdgeCa {
    async fn obtain(
        server: std::net::SocketAddr,
        root: &str,
        identity: &Credential,
        device: &str,
    ) -> EdgeCa {
        let key = KeyPair::generate().unwrap();
        let as_device = client(server, root, Some((&identity.cert_pem, &identity.key_pem)));
        let answer = post(&as_device, "simpleenroll", &[], edge_ca_csr(device, &key)).await;
        let der = leaf_of(&answer);
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).unwrap();
        EdgeCa { der, issuer }
    }

    /// A certificate as the workload API issues a module's identity: CN = `cn`, clientAuth,
    /// signed by this Edge CA; the chain (leaf, Edge CA) and its key.
    fn mint(&self, cn: &str) -> Credential {
        let key = KeyPair::generate().unwrap();
        let params = edge_est::pki::leaf_params(
            cn,
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            Duration::days(30),
        );
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Credential {
            cert_pem: format!("{}{}", cert.pem(), to_pem(&self.der)),
            key_pem: key.serialize_pem(),
        }
    }
}

/// Writes an issued certificate and the chain above it (`chain_file`, relative to `dir`) and
/// checks it with `openssl verify` against the root.
fn openssl_verified(dir: &Path, der: &[u8], name: &str, chain_file: &str) {
    let file = format!("{name}.pem");
    std::fs::write(dir.join(&file), to_pem(der)).unwrap();
    assert!(
        openssl_verify(dir, "root.pem", chain_file, &file),
        "{name} verifies"
    );
}

/// The edge-est desired properties of a shipped manifest, files mapped into `dir`, loaded
/// through `edge::desired::module_config` as the module (and check-manifest) loads them.
fn manifest_config(manifest: &str, dir: &Path, defaults: ModuleDefaults) -> Config {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deployment")
            .join(manifest),
    )
    .unwrap();
    let text = text.replace("/etc/edge-est/", &format!("{}/", dir.display()));
    let manifest: Value = serde_json::from_str(&text).unwrap();
    module_config(
        &manifest["modulesContent"]["edgeest"]["properties.desired"],
        &defaults,
    )
    .unwrap_or_else(|e| panic!("{manifest}: {e}"))
}

fn defaults(dir: &Path, listen: &str, journal: &str) -> ModuleDefaults {
    ModuleDefaults {
        listen: listen.parse().unwrap(),
        metrics_listen: None,
        journal: dir.join(journal),
        tls: Some(edge_est::config::TlsConfig {
            certificate: edge_est::config::PemSource("server.pem".into()),
            key: "server.key".into(),
        }),
        trust_bundle: Some(edge_est::config::PemSource("root.pem".into())),
        parent_hostname: None,
        // The layers here share one port on different loopback addresses.
        parent_port: listen.parse::<std::net::SocketAddr>().unwrap().port(),
        identity: None,
    }
}

// ---- 1. the RA ----------------------------------------------------------------------------

/// The shipped top-layer manifest names its RA as `module:l4-gw-01/edgeest`. Another device
/// of the hierarchy (l4-gw-02), holding an Edge CA from the same top, mints `CN=edgeest`
/// below it and asks for what the RA may have: refused. The real RA (module edgeest of
/// l4-gw-01, behind the shipped middle-layer manifest) forwards a child's enrollment; so it
/// does after its module certificate is renewed and after l4-gw-01's Edge CA is renewed with
/// a new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_device_minting_the_ras_cn_is_refused_and_the_ra_forwards_across_renewals() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let pki = Pki::generate_p256(dir);
    let root = pki.root.cert_pem.clone();
    // The files the manifests name under /etc/edge-est: the top's issuing CA (the PKI's),
    // the middle's own intermediate, the factory CA of bootstrap certificates.
    std::fs::copy(dir.join("issuing-ca.pem"), dir.join("top-ca-chain.pem")).unwrap();
    std::fs::copy(dir.join("issuing-ca.key"), dir.join("top-ca.key")).unwrap();
    std::fs::copy(dir.join("bootstrap-ca.pem"), dir.join("factory-ca.pem")).unwrap();
    let (middle_ca, middle_key) =
        pki.root
            .sub_ca("middle issuing CA", Some(1), &rcgen::PKCS_ECDSA_P256_SHA256);
    std::fs::write(
        dir.join("middle-ca-chain.pem"),
        format!("{}{}", middle_ca.cert_pem, root),
    )
    .unwrap();
    std::fs::write(dir.join("middle-ca.key"), middle_key).unwrap();

    let top_config = manifest_config(
        "top-layer.deployment.template.json",
        dir,
        defaults(dir, "127.0.0.1:0", "journal-top.jsonl"),
    );
    let top = TestServer::start(dir, &top_config).await;

    // Each L4 gateway: factory bootstrap certificate → identity (certificate:factory), then
    // its Edge CA with that identity (certificate:issuer), as its config.toml has it.
    let gateway = |name: &'static str| {
        let root = root.clone();
        let bootstrap = pki.bootstrap.valid_client(name);
        let addr = top.addr;
        async move {
            let key = KeyPair::generate().unwrap();
            let as_bootstrap = client(addr, &root, Some((&bootstrap.cert_pem, &bootstrap.key_pem)));
            let answer = post(&as_bootstrap, "simpleenroll", &[], csr(name, &key, |_| {})).await;
            let identity = Credential {
                cert_pem: to_pem(&leaf_of(&answer)),
                key_pem: key.serialize_pem(),
            };
            let edge_ca = EdgeCa::obtain(addr, &root, &identity, name).await;
            (identity, edge_ca)
        }
    };
    let (ra_identity, ra_edge_ca) = gateway("l4-gw-01").await;
    let (_, attacker_edge_ca) = gateway("l4-gw-02").await;
    openssl_verified(dir, &ra_edge_ca.der, "ra-edge-ca", "issuing-ca.pem");

    // The attacker: CN=edgeest below its own Edge CA, asking for the RA's allowance.
    let forged = attacker_edge_ca.mint("edgeest");
    let as_forged = client(top.addr, &root, Some((&forged.cert_pem, &forged.key_pem)));
    let answer = post(&as_forged, "simpleenroll", &[], plain("l3-victim")).await;
    refused(
        &answer,
        403,
        "no rule on this label grants anything to certificate \"CN=edgeest\" (module of device l4-gw-02",
    );
    let key = KeyPair::generate().unwrap();
    let answer = post(
        &as_forged,
        "simpleenroll",
        &[],
        edge_ca_csr("l3-victim", &key),
    )
    .await;
    assert_eq!(answer.status, 403, "{}", answer.text());
    // Nor does the RA device's own name minted below another Edge CA pass for that device.
    let forged_device = attacker_edge_ca.mint("l4-gw-01");
    let as_forged_device = client(
        top.addr,
        &root,
        Some((&forged_device.cert_pem, &forged_device.key_pem)),
    );
    let answer = post(
        &as_forged_device,
        "simpleenroll",
        &[],
        edge_ca_csr("l4-gw-01", &KeyPair::generate().unwrap()),
    )
    .await;
    assert_eq!(answer.status, 403, "{}", answer.text());
    assert!(
        top.journal().iter().all(|e| !e.subject.contains("victim")),
        "nothing was issued to the attacker"
    );

    // Positive control, the same probe by the real RA: module edgeest of l4-gw-01.
    let ra = ra_edge_ca.mint("edgeest");
    let as_ra = client(top.addr, &root, Some((&ra.cert_pem, &ra.key_pem)));
    let answer = post(&as_ra, "simpleenroll", &[], plain("l3-victim")).await;
    let issued = leaf_of(&answer);
    openssl_verified(dir, &issued, "l3-victim", "issuing-ca.pem");

    // The real RA in place: the shipped middle manifest on 127.0.0.2 (same port as the top,
    // as IoT Edge gateways have it), forwarding with the module's certificate.
    std::fs::write(dir.join("ra.pem"), &ra.cert_pem).unwrap();
    std::fs::write(dir.join("ra.key"), &ra.key_pem).unwrap();
    let mut middle_defaults = defaults(
        dir,
        &format!("127.0.0.2:{}", top.addr.port()),
        "journal-middle.jsonl",
    );
    middle_defaults.parent_hostname = Some("127.0.0.1".into());
    middle_defaults.identity = Some((
        edge_est::config::PemSource("ra.pem".into()),
        "ra.key".into(),
    ));
    let middle_config = manifest_config(
        "middle-layer.deployment.template.json",
        dir,
        middle_defaults,
    );
    let middle = TestServer::start_on(dir, &middle_config, middle_config.listen).await;
    // The manifest's Basic user for L3 devices (its hash is of "change-me").
    let installer = [basic("l3-installer", "change-me")];
    let child = client(middle.addr, &root, None);
    let forwarded = |cn: &'static str| {
        let child = child.clone();
        let installer = installer.clone();
        async move { post(&child, "simpleenroll", &installer, plain(cn)).await }
    };
    let issued = leaf_of(&forwarded("l3-dev-01").await);
    openssl_verified(dir, &issued, "l3-dev-01", "issuing-ca.pem");
    let top_journal = top.journal();
    let last = top_journal.last().unwrap();
    assert_eq!(last.subject, "CN=l3-dev-01");
    assert_eq!(
        last.identity,
        "certificate \"CN=edgeest\" (module of device l4-gw-01, issuer)"
    );
    assert_eq!(
        middle.journal().last().unwrap().issued_by,
        "upstream parent"
    );

    // The module's monthly renewal: a new certificate (new key) from the same Edge CA.
    let reload = |credential: &Credential| {
        std::fs::write(dir.join("ra.pem"), &credential.cert_pem).unwrap();
        std::fs::write(dir.join("ra.key"), &credential.key_pem).unwrap();
        middle
            .app
            .swap(Runtime::build(&middle_config, dir).expect("the middle reloads"));
    };
    reload(&ra_edge_ca.mint("edgeest"));
    leaf_of(&forwarded("l3-dev-02").await);

    // l4-gw-01 renews its Edge CA with a new key (as aziot-certd does at 80 %), and its
    // module's next certificate comes from the new one.
    let renewed_edge_ca = EdgeCa::obtain(top.addr, &root, &ra_identity, "l4-gw-01").await;
    assert_ne!(renewed_edge_ca.der, ra_edge_ca.der);
    reload(&renewed_edge_ca.mint("edgeest"));
    let issued = leaf_of(&forwarded("l3-dev-03").await);
    openssl_verified(dir, &issued, "l3-dev-03", "issuing-ca.pem");
    assert_eq!(
        top.journal().last().unwrap().identity,
        "certificate \"CN=edgeest\" (module of device l4-gw-01, issuer)"
    );
    middle.stop().await;
    top.stop().await;
}

/// The RA rule forms: the old one (a CN under the trust bundle) is refused with what to write
/// instead, `module:` is checked, and a rule that lets someone else obtain the RA device's
/// Edge CA is warned about.
#[test]
fn ra_rules_that_any_device_could_satisfy_are_refused() {
    let dir = Path::new("/nonexistent");
    let top = |desired: &str| -> Result<Config, String> {
        let desired: Value = serde_json::from_str(desired).unwrap();
        module_config(&desired, &defaults(dir, "127.0.0.1:0", "j.jsonl")).map_err(|e| e.to_string())
    };
    let label = |trust: &str, rule: &str| {
        format!(
            r#"{{ "issuers": {{ "top": {{ "certificate": "/x/top.pem", "key": "/x/top.key" }} }},
                  "trust": {{ "deep": {{ "certificates": ["/x/root.pem"], "depth": "any" }} }},
                  "labels": [ {{ "issuer": "top", "client_trust": {trust}, "rules": [ {rule} ] }} ] }}"#
        )
    };
    // The old form, as the top-layer manifest had it.
    let old = top(&label(
        r#"["issuer", "edge-trust-bundle"]"#,
        r#"{ "match": ["certificate:edge-trust-bundle"], "client_cn": ["edgeest"], "common_names": ["l3-*"], "registration_authority": true }"#,
    ))
    .unwrap_err();
    assert!(old.contains("labels[0].rules[0].client_cn"), "{old}");
    assert!(old.contains("module:DEVICE/MODULE"), "{old}");
    // A CN under a set of depth "any" is as forgeable.
    let deep = top(&label(
        r#"["issuer", "deep"]"#,
        r#"{ "match": ["certificate:deep"], "client_cn": ["edgeest"], "common_names": ["l3-*"] }"#,
    ))
    .unwrap_err();
    assert!(deep.contains("depth is \"any\""), "{deep}");
    // module: names one device and one module, and needs the set its Edge CA comes from.
    for (rule, says) in [
        (
            r#"{ "match": ["module:l4-*/edgeest"] }"#,
            "without patterns",
        ),
        (r#"{ "match": ["module:edgeest"] }"#, "module:DEVICE/MODULE"),
        (
            r#"{ "match": ["module:l4-gw-01/edgeest"], "client_cn": ["x"] }"#,
            "drop client_cn",
        ),
        (
            r#"{ "match": ["module:l4-gw-01/edgeest"], "edge_ca_issuer": "deep" }"#,
            "not in this label's client_trust",
        ),
    ] {
        let error = top(&label(r#"["issuer"]"#, rule)).unwrap_err();
        assert!(error.contains(says), "{rule}: {error}");
    }
    // Positive control: the form the manifest ships.
    let config = top(&label(
        r#"["issuer"]"#,
        r#"{ "match": ["module:l4-gw-01/edgeest"], "common_names": ["l3-*"], "registration_authority": true }"#,
    ))
    .unwrap();
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());
    // A rule that lets a Basic user obtain "aziot-edge CA l4-gw-01" could make the RA.
    let config = top(&label(
        r#"["issuer"]"#,
        r#"{ "match": ["module:l4-gw-01/edgeest"], "common_names": ["l3-*"] },
           { "match": ["user:installer"], "common_names": ["l4-*"], "ca_common_names": ["aziot-edge CA l4-*"] }"#,
    ))
    .unwrap();
    let warnings = config.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("labels[0].rules[1].ca_common_names")
                && w.contains("aziot-edge CA l4-gw-01")),
        "{warnings:?}"
    );
    // The shipped manifests carry no warning.
    for manifest in [
        "top-layer.deployment.template.json",
        "middle-layer.deployment.template.json",
        "middle-layer-api-proxy.deployment.template.json",
    ] {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deployment")
                .join(manifest),
        )
        .unwrap();
        let manifest_json: Value = serde_json::from_str(&text).unwrap();
        let mut defaults = ModuleDefaults::placeholder(Some("gw-top.plant.local"));
        if manifest.starts_with("top") {
            defaults.parent_hostname = None;
        }
        let config = module_config(
            &manifest_json["modulesContent"]["edgeest"]["properties.desired"],
            &defaults,
        )
        .unwrap();
        assert!(
            config.warnings().is_empty(),
            "{manifest}: {:?}",
            config.warnings()
        );
    }
}

// ---- 2. trust sets and device CAs ---------------------------------------------------------

fn config_text(pki: &Pki, body: &str) -> Config {
    common::plant_config(pki, body)
}

/// A trust set that lists the issuing CA (both depths): `CN=dev-victim` minted below another
/// device's Edge CA gets nothing; dev-victim's own certificate does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_listing_the_issuing_ca_refuses_what_a_device_ca_mints() {
    for depth in ["direct", "any"] {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let pki = Pki::generate_p256(dir);
        let root = pki.root.cert_pem.clone();
        let config = config_text(
            &pki,
            &format!(
                r#"
[trust.hierarchy]
certificates = ["issuing-ca.pem"]
depth = "{depth}"
[[labels]]
issuer = "plant"
client_trust = ["issuer"]
[[labels.rules]]
match = ["user:estuser"]
common_names = ["dev-*"]
ca_common_names = ["aziot-edge CA dev-*"]
[[labels.rules]]
match = ["certificate:issuer"]
ca_common_names = ["aziot-edge CA {{cn}}"]
[[labels]]
name = "ids"
issuer = "plant"
client_trust = ["hierarchy"]
[labels.authentication]
basic = false
[[labels.rules]]
match = ["certificate:hierarchy"]
common_names = ["{{cn}}"]
"#
            ),
        );
        let server = TestServer::start(dir, &config).await;
        let attacker = enrolled_at(server.addr, &root, "dev-attacker").await;
        let victim = enrolled_at(server.addr, &root, "dev-victim").await;
        let attacker_ca = EdgeCa::obtain(server.addr, &root, &attacker, "dev-attacker").await;

        let forged = attacker_ca.mint("dev-victim");
        let as_forged = client(
            server.addr,
            &root,
            Some((&forged.cert_pem, &forged.key_pem)),
        );
        let answer = post(&as_forged, "ids/simpleenroll", &[], plain("dev-victim")).await;
        let says = if depth == "direct" {
            "not issued directly by a CA of trust set hierarchy"
        } else {
            "issued below \"aziot-edge CA dev-attacker\", a device's own CA"
        };
        refused(&answer, 401, says);

        // Positive control: dev-victim's own certificate, the same request.
        let as_victim = client(
            server.addr,
            &root,
            Some((&victim.cert_pem, &victim.key_pem)),
        );
        let answer = post(&as_victim, "ids/simpleenroll", &[], plain("dev-victim")).await;
        openssl_verified(dir, &leaf_of(&answer), "dev-victim", "issuing-ca.pem");
        server.stop().await;
    }
}

/// Depth "any" below a root: a device CA is recognised by who issued it (one of this
/// layer's issuing CAs), whatever its name; a CA of the same PKI that is no device's passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_any_refuses_paths_through_device_cas_and_accepts_other_cas() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let pki = Pki::generate_p256(dir);
    let root = pki.root.cert_pem.clone();
    let config = config_text(
        &pki,
        r#"
[trust.hierarchy]
certificates = ["root.pem"]
depth = "any"
[[labels]]
issuer = "plant"
client_trust = ["hierarchy"]
[labels.authentication]
basic = false
[[labels.rules]]
match = ["certificate:hierarchy"]
common_names = ["{cn}"]
"#,
    );
    let server = TestServer::start(dir, &config).await;
    // A CA the issuing CA issued, named like nothing in particular: a device's all the same.
    let now = OffsetDateTime::now_utc();
    let device_ca = ca_below(&pki.issuing, "plant gateway 7", now + Duration::days(30));
    let forged = device_ca.valid_client("dev-victim");
    let chain = format!("{}{}", forged.cert_pem, device_ca.cert_pem);
    let as_forged = client(server.addr, &root, Some((&chain, &forged.key_pem)));
    let answer = post(&as_forged, "simpleenroll", &[], plain("dev-victim")).await;
    refused(
        &answer,
        401,
        "issued below \"plant gateway 7\", a device's own CA",
    );

    // Positive control: the same shape below a CA the root issued (a factory's sub-CA).
    let factory_ca = ca_below_with(&pki.root, "factory sub-CA", now + Duration::days(30), None);
    let device = factory_ca.valid_client("dev-victim");
    let chain = format!("{}{}", device.cert_pem, factory_ca.cert_pem);
    let as_device = client(server.addr, &root, Some((&chain, &device.key_pem)));
    let answer = post(&as_device, "simpleenroll", &[], plain("dev-victim")).await;
    leaf_of(&answer);
    // Below it, a CA of the Edge CA's shape (pathlen 0) that is named like none (a factory
    // line's CA): it takes both, shape and name, to be taken for a device's; accepted.
    let line_ca = ca_below(&factory_ca, "factory line 3", now + Duration::days(30));
    let device = line_ca.valid_client("dev-victim");
    let chain = format!(
        "{}{}{}",
        device.cert_pem, line_ca.cert_pem, factory_ca.cert_pem
    );
    let as_device = client(server.addr, &root, Some((&chain, &device.key_pem)));
    leaf_of(&post(&as_device, "simpleenroll", &[], plain("dev-victim")).await);
    // Below that sub-CA, a CA shaped and named like an Edge CA (a device issued elsewhere
    // under the same root): refused by its shape and name.
    let edge_ca = ca_below(&factory_ca, "aziot-edge CA dev-x", now + Duration::days(30));
    let forged = edge_ca.valid_client("dev-victim");
    let chain = format!(
        "{}{}{}",
        forged.cert_pem, edge_ca.cert_pem, factory_ca.cert_pem
    );
    let as_forged = client(server.addr, &root, Some((&chain, &forged.key_pem)));
    let answer = post(&as_forged, "simpleenroll", &[], plain("dev-victim")).await;
    refused(
        &answer,
        401,
        "issued below \"aziot-edge CA dev-x\", a device's own CA",
    );
    server.stop().await;
}

/// A CA (pathlen 0) below `parent`, valid until `not_after`.
fn ca_below(parent: &TestCa, cn: &str, not_after: OffsetDateTime) -> TestCa {
    ca_below_with(parent, cn, not_after, Some(0))
}

fn ca_below_with(
    parent: &TestCa,
    cn: &str,
    not_after: OffsetDateTime,
    path_len: Option<u8>,
) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let mut params = edge_est::pki::ca_params(cn, path_len, Duration::days(3650));
    params.not_before = OffsetDateTime::now_utc() - Duration::days(400);
    params.not_after = not_after;
    let cert = params.signed_by(&key, &parent.issuer).unwrap();
    TestCa {
        cert_pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

// ---- 3. issuer = this label's issuance -----------------------------------------------------

/// A certificate from a narrow Basic label (end entities `b-*`) presented on the default
/// label, where `issuer` certificates get their Edge CA and a DNS name: refused, also after a
/// restart (the index is rebuilt from the journal). A device enrolled on the default label
/// gets both; a label that names the narrow one in `issuer_labels` accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_label_is_not_issuer_here() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let pki = Pki::generate_p256(dir);
    let root = pki.root.cert_pem.clone();
    let config = config_text(
        &pki,
        r#"
[[labels]]
issuer = "plant"
client_trust = ["issuer"]
[[labels.rules]]
match = ["user:estuser"]
common_names = ["dev-*"]
[[labels.rules]]
match = ["certificate:issuer"]
common_names = ["{cn}"]
ca_common_names = ["aziot-edge CA {cn}"]
dns_names = ["{cn}.plant.local"]
[[labels.rules]]
match = ["module:b-1/edgeest"]
common_names = ["ra-*"]
[[labels]]
name = "narrow"
issuer = "plant"
[labels.authentication]
certificate = false
[[labels.rules]]
match = ["user:estuser"]
common_names = ["b-*"]
ca_common_names = ["aziot-edge CA b-*"]
[[labels]]
name = "group"
issuer = "plant"
client_trust = ["issuer"]
issuer_labels = ["narrow"]
[[labels.rules]]
match = ["certificate:issuer"]
common_names = ["{cn}"]
[[labels.rules]]
match = ["module:b-1/edgeest"]
common_names = ["ra-*"]
"#,
    );
    let mut server = TestServer::start(dir, &config).await;
    let installer = [basic(USER, PASSWORD)];
    let anonymous = client(server.addr, &root, None);
    let key = KeyPair::generate().unwrap();
    let narrow = leaf_of(
        &post(
            &anonymous,
            "narrow/simpleenroll",
            &installer,
            csr("b-1", &key, |_| {}),
        )
        .await,
    );
    let narrow = Credential {
        cert_pem: to_pem(&narrow),
        key_pem: key.serialize_pem(),
    };
    let key = KeyPair::generate().unwrap();
    let device = leaf_of(
        &post(
            &anonymous,
            "simpleenroll",
            &installer,
            csr("dev-1", &key, |_| {}),
        )
        .await,
    );
    let device = Credential {
        cert_pem: to_pem(&device),
        key_pem: key.serialize_pem(),
    };

    // b-1's Edge CA, from the narrow label, and a module certificate below it.
    let key = KeyPair::generate().unwrap();
    let narrow_edge_ca = leaf_of(
        &post(
            &anonymous,
            "narrow/simpleenroll",
            &installer,
            edge_ca_csr("b-1", &key),
        )
        .await,
    );
    let narrow_edge_ca = EdgeCa {
        issuer: Issuer::from_ca_cert_der(&narrow_edge_ca.clone().into(), key).unwrap(),
        der: narrow_edge_ca,
    };
    let module = narrow_edge_ca.mint("edgeest");

    for round in ["running", "restarted"] {
        // module:b-1/edgeest on the default label: b-1's Edge CA was not issued here.
        let as_module = client(
            server.addr,
            &root,
            Some((&module.cert_pem, &module.key_pem)),
        );
        let answer = post(&as_module, "simpleenroll", &[], plain("ra-1")).await;
        refused(
            &answer,
            401,
            "a module of b-1, whose Edge CA was not issued on this label",
        );
        // Positive control: on the label whose group holds `narrow`, the same request passes.
        leaf_of(&post(&as_module, "group/simpleenroll", &[], plain("ra-1")).await);

        // The escalation: b-1's certificate asks the default label for an Edge CA, a DNS name.
        let as_narrow = client(
            server.addr,
            &root,
            Some((&narrow.cert_pem, &narrow.key_pem)),
        );
        let answer = post(
            &as_narrow,
            "simpleenroll",
            &[],
            edge_ca_csr("b-1", &KeyPair::generate().unwrap()),
        )
        .await;
        refused(&answer, 401, "not issued on this label");
        let with_dns = csr("b-1", &KeyPair::generate().unwrap(), |p| {
            p.subject_alt_names = vec![SanType::DnsName("b-1.plant.local".try_into().unwrap())];
        });
        let answer = post(&as_narrow, "simpleenroll", &[], with_dns).await;
        refused(&answer, 401, "not issued on this label");

        // Positive control: dev-1, issued here, asks for the same things.
        let as_device = client(
            server.addr,
            &root,
            Some((&device.cert_pem, &device.key_pem)),
        );
        let answer = post(
            &as_device,
            "simpleenroll",
            &[],
            edge_ca_csr("dev-1", &KeyPair::generate().unwrap()),
        )
        .await;
        openssl_verified(
            dir,
            &leaf_of(&answer),
            &format!("edge-ca-{round}"),
            "issuing-ca.pem",
        );
        let with_dns = csr("dev-1", &KeyPair::generate().unwrap(), |p| {
            p.subject_alt_names = vec![SanType::DnsName("dev-1.plant.local".try_into().unwrap())];
        });
        leaf_of(&post(&as_device, "simpleenroll", &[], with_dns).await);
        // The group that names `narrow` takes b-1 (and not dev-1, issued elsewhere).
        leaf_of(&post(&as_narrow, "group/simpleenroll", &[], plain("b-1")).await);
        let answer = post(&as_device, "group/simpleenroll", &[], plain("dev-1")).await;
        refused(&answer, 401, "not issued on this label");

        server.stop().await;
        server = TestServer::start(dir, &config).await;
    }
    server.stop().await;
}

/// On a forwarding label `issuer` is the upstream's issuing CA, and still only what this
/// label issued: a certificate the top issued to a device elsewhere does not renew at the
/// bottom, one the bottom forwarded for does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_label_accepts_only_what_it_forwarded() {
    use edge_est::demo::{self, Layer};
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    demo::write_pki(dir).unwrap();
    let root = std::fs::read_to_string(dir.join("root.pem")).unwrap();
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let top = Layer::start("top", dir, &demo::top_config(), any)
        .await
        .unwrap();
    let bottom_config = demo::forward_config("bottom", top.addr.port(), "layer2-ra", None);
    let bottom = Layer::start("bottom", dir, &bottom_config, any)
        .await
        .unwrap();
    let ra = (
        std::fs::read_to_string(dir.join("layer2-ra.pem")).unwrap(),
        std::fs::read_to_string(dir.join("layer2-ra.key")).unwrap(),
    );

    // Issued by the top's CA, but not through this label (here: asked for at the top).
    let key = KeyPair::generate().unwrap();
    let as_ra = client(top.addr, &root, Some((&ra.0, &ra.1)));
    let elsewhere = leaf_of(&post(&as_ra, "simpleenroll", &[], csr("dev-e", &key, |_| {})).await);
    let as_elsewhere = client(
        bottom.addr,
        &root,
        Some((&to_pem(&elsewhere), &key.serialize_pem())),
    );
    let answer = post(&as_elsewhere, "simpleenroll", &[], plain("dev-e")).await;
    refused(&answer, 401, "not issued on this label");

    // Positive control: the same renewal by a child that enrolled through the bottom.
    let key = KeyPair::generate().unwrap();
    let child = client(bottom.addr, &root, None);
    let password = [basic(demo::CHILD_USER, demo::CHILD_PASSWORD)];
    let here = leaf_of(
        &post(
            &child,
            "simpleenroll",
            &password,
            csr("dev-h", &key, |_| {}),
        )
        .await,
    );
    let as_here = client(
        bottom.addr,
        &root,
        Some((&to_pem(&here), &key.serialize_pem())),
    );
    let renewed = leaf_of(&post(&as_here, "simpleenroll", &[], plain("dev-h")).await);
    std::fs::copy(dir.join("top-ca.pem"), dir.join("top-chain.pem")).unwrap();
    openssl_verified(dir, &renewed, "dev-h", "top-chain.pem");
    bottom.stop().await;
    top.stop().await;
}

// ---- 4. grace and expired CAs ---------------------------------------------------------------

/// With a one-day grace window: a leaf that expired twelve hours ago below a CA that expired
/// an hour ago is refused; the same leaf below a CA valid now renews (the grace renewal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_never_covers_an_expired_ca_on_the_path() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let pki = Pki::generate_p256(dir);
    let root = pki.root.cert_pem.clone();
    let config = config_text(
        &pki,
        r#"
[trust.factory]
certificates = ["bootstrap-ca.pem"]
depth = "any"
[[labels]]
issuer = "plant"
client_trust = ["factory"]
grace_expired_secs = 86400
[[labels.rules]]
match = ["certificate:factory"]
common_names = ["{cn}"]
"#,
    );
    let server = TestServer::start(dir, &config).await;
    let now = OffsetDateTime::now_utc();
    let expired_leaf_below = |ca: &TestCa| {
        let leaf = ca.client_cert("dev-x", now - Duration::days(90), now - Duration::hours(12));
        (format!("{}{}", leaf.cert_pem, ca.cert_pem), leaf.key_pem)
    };

    let expired_ca = ca_below(&pki.bootstrap, "factory line 1", now - Duration::hours(1));
    let (chain, key) = expired_leaf_below(&expired_ca);
    let answer = post(
        &client(server.addr, &root, Some((&chain, &key))),
        "simpleenroll",
        &[],
        plain("dev-x"),
    )
    .await;
    refused(
        &answer,
        401,
        "the CA \"factory line 1\" on its path expired at",
    );
    // A valid leaf below the expired CA: refused as well.
    let valid = expired_ca.valid_client("dev-x");
    let chain_valid = format!("{}{}", valid.cert_pem, expired_ca.cert_pem);
    let answer = post(
        &client(server.addr, &root, Some((&chain_valid, &valid.key_pem))),
        "simpleenroll",
        &[],
        plain("dev-x"),
    )
    .await;
    assert_eq!(answer.status, 401, "{}", answer.text());
    assert!(server.journal().is_empty());

    // Positive control: the same expired leaf below a CA that is valid now.
    let valid_ca = ca_below(&pki.bootstrap, "factory line 2", now + Duration::days(30));
    let (chain, key) = expired_leaf_below(&valid_ca);
    let answer = post(
        &client(server.addr, &root, Some((&chain, &key))),
        "simpleenroll",
        &[],
        plain("dev-x"),
    )
    .await;
    openssl_verified(dir, &leaf_of(&answer), "dev-x", "issuing-ca.pem");
    assert!(server.journal()[0].grace_renewal);
    server.stop().await;
}

/// The binary's checks: `check-config` refuses a CN under a deep set and warns about a rule
/// that uses a set of depth "any"; `check-manifest` refuses the old RA form of the top-layer
/// manifest and passes the shipped one without warning.
#[test]
fn check_config_and_check_manifest_refuse_and_warn() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let _pki = Pki::generate_p256(dir);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-est"))
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let config = |rule: &str| {
        format!(
            r#"
[tls]
certificate = "server.pem"
key = "server.key"
[trust.hierarchy]
certificates = ["root.pem"]
depth = "any"
[issuers.plant]
certificate = "issuing-ca.pem"
key = "issuing-ca.key"
[[labels]]
issuer = "plant"
client_trust = ["hierarchy"]
[[labels.rules]]
match = ["certificate:hierarchy"]
{rule}
"#
        )
    };
    std::fs::write(dir.join("cn.toml"), config("client_cn = [\"edgeest\"]")).unwrap();
    let (ok, stderr) = run(&["check-config", "cn.toml"]);
    assert!(!ok);
    assert!(stderr.contains("labels[0].rules[0].client_cn"), "{stderr}");
    std::fs::write(dir.join("deep.toml"), config("common_names = [\"{cn}\"]")).unwrap();
    let (ok, stderr) = run(&["check-config", "deep.toml"]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning: labels[0].rules[0]: trust set \"hierarchy\" has depth \"any\""),
        "{stderr}"
    );

    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deployment/top-layer.deployment.template.json");
    let (ok, stderr) = run(&["check-manifest", shipped.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    // The RA rule as the manifest had it before: any device could be the RA.
    let text = std::fs::read_to_string(&shipped).unwrap();
    let mut manifest: Value = serde_json::from_str(&text).unwrap();
    let label = &mut manifest["modulesContent"]["edgeest"]["properties.desired"]["labels"][0];
    label["client_trust"] = serde_json::json!(["factory", "issuer", "edge-trust-bundle"]);
    label["rules"][2] = serde_json::json!({
        "match": ["certificate:edge-trust-bundle"], "client_cn": ["edgeest"],
        "common_names": ["l3-*"], "registration_authority": true
    });
    std::fs::write(dir.join("old.json"), manifest.to_string()).unwrap();
    let (ok, stderr) = run(&["check-manifest", "old.json"]);
    assert!(!ok);
    assert!(
        stderr.contains("labels[0].rules[2].client_cn: narrows trust set \"edge-trust-bundle\""),
        "{stderr}"
    );
    // Bootstrap certificates from below the factory CA: loads, with a warning.
    let mut manifest: Value = serde_json::from_str(&text).unwrap();
    manifest["modulesContent"]["edgeest"]["properties.desired"]["trust"]["factory"]["depth"] =
        serde_json::json!("any");
    std::fs::write(dir.join("deep.json"), manifest.to_string()).unwrap();
    let (ok, stderr) = run(&["check-manifest", "deep.json"]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning: modulesContent.edgeest.properties.desired.labels[0].rules[0]: trust set \"factory\" has depth \"any\""),
        "{stderr}"
    );
}

/// The same for a module: its certificate expired within the grace window, its device's Edge
/// CA (issued on this label) expired an hour ago: refused; below an Edge CA valid now, the
/// grace renewal passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_never_covers_an_expired_edge_ca_of_a_module() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let pki = Pki::generate_p256(dir);
    let root = pki.root.cert_pem.clone();
    let now = OffsetDateTime::now_utc();
    // Edge CAs this server issued earlier (in its journal): one expired, one valid.
    let expired_ca = ca_below(&pki.issuing, "aziot-edge CA gw-1", now - Duration::hours(1));
    let valid_ca = ca_below(&pki.issuing, "aziot-edge CA gw-1", now + Duration::days(30));
    for ca in [&expired_ca, &valid_ca] {
        common::record_issued(&dir.join("journal.jsonl"), &ca.cert_pem, None);
    }
    let config = config_text(
        &pki,
        r#"
[[labels]]
issuer = "plant"
client_trust = ["issuer"]
grace_expired_secs = 86400
[[labels.rules]]
match = ["module:gw-1/edgeest"]
common_names = ["edgeest"]
"#,
    );
    let server = TestServer::start(dir, &config).await;
    let expired_module_below = |ca: &TestCa| {
        let leaf = ca.client_cert(
            "edgeest",
            now - Duration::days(30),
            now - Duration::hours(12),
        );
        let chain = format!("{}{}", leaf.cert_pem, ca.cert_pem);
        client(server.addr, &root, Some((&chain, &leaf.key_pem)))
    };
    let answer = post(
        &expired_module_below(&expired_ca),
        "simpleenroll",
        &[],
        plain("edgeest"),
    )
    .await;
    refused(&answer, 401, "expired at");
    // Positive control: the same module certificate's renewal below the valid Edge CA.
    let answer = post(
        &expired_module_below(&valid_ca),
        "simpleenroll",
        &[],
        plain("edgeest"),
    )
    .await;
    openssl_verified(dir, &leaf_of(&answer), "edgeest", "issuing-ca.pem");
    assert!(server.journal().last().unwrap().grace_renewal);
    server.stop().await;
}

/// A trust anchor that has expired, or is not valid yet, vouches for nothing, even for a
/// certificate valid now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_trust_anchor_vouches_for_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let pki = Pki::generate_p256(dir);
    let root = pki.root.cert_pem.clone();
    let now = OffsetDateTime::now_utc();
    let key = KeyPair::generate().unwrap();
    let mut params = edge_est::pki::ca_params("old factory CA", None, Duration::days(1));
    params.not_before = now - Duration::days(400);
    params.not_after = now - Duration::hours(1);
    let old_factory = TestCa {
        cert_pem: params.self_signed(&key).unwrap().pem(),
        issuer: Issuer::new(params, key),
    };
    std::fs::write(dir.join("old-factory.pem"), &old_factory.cert_pem).unwrap();
    // Nor one not valid yet (its notBefore tomorrow), for a certificate valid now.
    let key = KeyPair::generate().unwrap();
    let mut params = edge_est::pki::ca_params("next factory CA", None, Duration::days(1));
    params.not_before = now + Duration::days(1);
    params.not_after = now + Duration::days(400);
    let next_factory = TestCa {
        cert_pem: params.self_signed(&key).unwrap().pem(),
        issuer: Issuer::new(params, key),
    };
    std::fs::write(dir.join("next-factory.pem"), &next_factory.cert_pem).unwrap();
    let config = config_text(
        &pki,
        r#"
[trust.old]
certificates = ["old-factory.pem"]
[trust.next]
certificates = ["next-factory.pem"]
[trust.factory]
certificates = ["bootstrap-ca.pem"]
[[labels]]
issuer = "plant"
client_trust = ["old", "next", "factory"]
[[labels.rules]]
match = ["certificate:old", "certificate:next", "certificate:factory"]
common_names = ["{cn}"]
"#,
    );
    let server = TestServer::start(dir, &config).await;
    let device = old_factory.valid_client("dev-o");
    let as_device = client(
        server.addr,
        &root,
        Some((&device.cert_pem, &device.key_pem)),
    );
    let answer = post(&as_device, "simpleenroll", &[], plain("dev-o")).await;
    refused(&answer, 401, "the trust anchor of trust set old expired at");
    let device = next_factory.valid_client("dev-o");
    let as_device = client(
        server.addr,
        &root,
        Some((&device.cert_pem, &device.key_pem)),
    );
    let answer = post(&as_device, "simpleenroll", &[], plain("dev-o")).await;
    refused(
        &answer,
        401,
        "the trust anchor of trust set next is not valid before",
    );
    // Positive control: the same request with a certificate of the valid factory CA.
    let device = pki.bootstrap.valid_client("dev-o");
    let as_device = client(
        server.addr,
        &root,
        Some((&device.cert_pem, &device.key_pem)),
    );
    leaf_of(&post(&as_device, "simpleenroll", &[], plain("dev-o")).await);
    server.stop().await;
}

/// A module's certificate comes from its device's Edge CA, and an Edge CA has IoT Edge's
/// shape: CA, pathlen 0. A CA named like gw-1's Edge CA but free to issue CAs below it (a
/// layer's own sub-CA, say), issued on this label, does not make what it signs a module of
/// gw-1. Positive control: the same leaf below gw-1's Edge CA (pathlen 0) is gw-1's module.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_comes_only_from_a_ca_of_the_edge_ca_shape() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let pki = Pki::generate_p256(dir);
    let root = pki.root.cert_pem.clone();
    let until = OffsetDateTime::now_utc() + Duration::days(30);
    let edge_ca = ca_below(&pki.issuing, "aziot-edge CA gw-1", until);
    let unconstrained = ca_below_with(&pki.issuing, "aziot-edge CA gw-1", until, None);
    let pathlen_1 = ca_below_with(&pki.issuing, "aziot-edge CA gw-1", until, Some(1));
    for ca in [&edge_ca, &unconstrained, &pathlen_1] {
        common::record_issued(&dir.join("journal.jsonl"), &ca.cert_pem, None);
    }
    let config = config_text(
        &pki,
        r#"
[[labels]]
issuer = "plant"
client_trust = ["issuer"]
[labels.authentication]
basic = false
[[labels.rules]]
match = ["module:gw-1/edgeest"]
common_names = ["edgeest"]
"#,
    );
    let server = TestServer::start(dir, &config).await;
    let as_module_below = |ca: &TestCa| {
        let leaf = ca.valid_client("edgeest");
        let chain = format!("{}{}", leaf.cert_pem, ca.cert_pem);
        client(server.addr, &root, Some((&chain, &leaf.key_pem)))
    };
    for (ca, shape) in [(&unconstrained, "no pathlen"), (&pathlen_1, "pathlen 1")] {
        let answer = post(&as_module_below(ca), "simpleenroll", &[], plain("edgeest")).await;
        assert_eq!(answer.status, 401, "{shape}: {}", answer.text());
        assert!(
            answer
                .text()
                .contains("not issued directly by a CA of trust set issuer"),
            "{shape}: {}",
            answer.text()
        );
    }
    let answer = post(
        &as_module_below(&edge_ca),
        "simpleenroll",
        &[],
        plain("edgeest"),
    )
    .await;
    openssl_verified(dir, &leaf_of(&answer), "edgeest", "issuing-ca.pem");
    assert_eq!(
        server.journal().len(),
        4,
        "the three CAs and the module's certificate"
    );
    server.stop().await;
}
