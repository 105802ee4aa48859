//! An `auto` layer never grants, while the layer above is away, what the layer above would
//! refuse its RA: checked with the shipped manifests' own desired properties, through
//! `edge::desired::module_config` as `check-manifest` and the module read them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::SystemTime;

use edge_est::auth::{Identity, TrustSet};
use edge_est::config::Config;
use edge_est::edge::manifest::{check, check_file, CheckOptions};
use edge_est::est::name::AttributeType;
use edge_est::est::{Csr, Subject};
use edge_est::issue::fallback::{
    across_layers, ra_rules, within_upper_allowance, Fallback, LayerConfig,
};
use edge_est::policy::{Grant, Policy};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};

fn deployment(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deployment")
        .join(name)
}

const TOP: &str = "top-layer.deployment.template.json";
const MIDDLES: [&str; 2] = [
    "middle-layer.deployment.template.json",
    "middle-layer-api-proxy.deployment.template.json",
];

/// The edge-est configuration a manifest gives its module (and the module's name).
fn config_of(manifest: &Value) -> (String, Config) {
    let report = check(manifest, &CheckOptions::default());
    assert!(report.is_ok(), "{:#?}", report.errors);
    let module = report.edge_est.into_iter().next().unwrap();
    (module.name, module.config.unwrap())
}

fn load(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(deployment(name)).unwrap()).unwrap()
}

/// The middle's RA as the top sees it: a certificate with CN = the middle's module name,
/// issued by the middle gateway's Edge CA under the hierarchy root, authenticated against the
/// top's `edge-trust-bundle` (the root).
fn middle_ra_identity(module: &str) -> Identity {
    let root_key = KeyPair::generate().unwrap();
    let root_params = edge_est::pki::ca_params("root", None, time::Duration::days(30));
    let _root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let edge_key = KeyPair::generate().unwrap();
    let mut edge_params =
        edge_est::pki::ca_params("aziot-edge CA gw-middle", Some(0), time::Duration::days(30));
    edge_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let edge = edge_params.signed_by(&edge_key, &root_issuer).unwrap();
    let edge_issuer = Issuer::new(edge_params, edge_key);
    let ra_key = KeyPair::generate().unwrap();
    let mut ra = CertificateParams::default();
    ra.distinguished_name.push(DnType::CommonName, module);
    ra.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let ra = ra.signed_by(&ra_key, &edge_issuer).unwrap();
    // Verified here against the Edge CA itself; `auth::chain` checks the rest of the path.
    let trust =
        Arc::new(TrustSet::new("edge-ca", &[CertificateDer::from(edge.der().to_vec())]).unwrap());
    let chain = vec![CertificateDer::from(ra.der().to_vec())];
    let mut certificate =
        edge_est::auth::client_cert::verify(&chain, &[trust], &[], SystemTime::now()).unwrap();
    // What `auth::chain` makes of a module certificate below the Edge CA the top issued to
    // the middle gateway (device `l4-gw-01` in deployment/child/middle-gateway.toml).
    certificate.device = Some("l4-gw-01".to_owned());
    certificate.trust = "issuer".to_owned();
    Identity {
        certificate: Some(certificate),
        user: None,
    }
}

fn csr(cn: &str, ca: bool) -> Csr {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    }
    Csr::from_der(params.serialize_request(&key).unwrap().der()).unwrap()
}

#[test]
fn a_name_the_top_refuses_the_middles_ra_the_middles_fallback_refuses_too() {
    let (_, top) = config_of(&load(TOP));
    let top_label = &top.labels[0];
    let top_policy =
        Policy::new(&top_label.rules, &top_label.deny, &top_label.client_trust).unwrap();
    for middle_file in MIDDLES {
        let (module, middle) = config_of(&load(middle_file));
        let label = &middle.labels[0];
        let fallback = Fallback::new(label.fallback.as_ref().unwrap()).unwrap();
        let ra = middle_ra_identity(&module);
        let mut granted_somewhere = false;
        for (cn, ca) in [
            ("plc-07", false),
            ("gw-top", false),
            ("aziot-edge CA gw-top", true),
            ("l3-dev-01", false),
            ("aziot-edge CA l3-dev-01", true),
            ("l4-dev-02", false),
            ("aziot-edge CA l4-dev-02", true),
        ] {
            let top_grants = top_policy.authorize(&ra, &csr(cn, ca), false).is_ok();
            let grant = Grant {
                ca,
                subject: Subject::from_attributes(vec![(AttributeType::CommonName, cn.into())]),
                sans: Vec::new(),
                sub_ca: None,
            };
            let fallback_grants = fallback.check(&grant).is_ok();
            assert!(
                top_grants || !fallback_grants,
                "{middle_file}: the fallback grants {cn:?}, which the top refuses its RA"
            );
            if cn.starts_with("l3-") || cn.starts_with("aziot-edge CA l3-") {
                assert!(top_grants && fallback_grants, "{middle_file}: {cn:?}");
                granted_somewhere = true;
            } else {
                assert!(!top_grants && !fallback_grants, "{middle_file}: {cn:?}");
            }
        }
        assert!(granted_somewhere);
        // Statically, too: every fallback pattern lies within the top's RA rule.
        let rules = ra_rules(top_label, &module);
        assert!(!rules.is_empty(), "the top has an RA rule for {module}");
        assert_eq!(
            within_upper_allowance(label.fallback.as_ref().unwrap(), &rules),
            Vec::<String>::new()
        );
    }
}

#[test]
fn check_manifest_refuses_a_fallback_wider_than_the_tops_ra_rule() {
    let (top_module, top) = config_of(&load(TOP));
    let mut wide = load(MIDDLES[0]);
    wide["modulesContent"]["edgeest"]["properties.desired"]["labels"][0]["fallback"]
        ["common_names"] = json!(["l3-*", "*"]);
    let (module, middle) = config_of(&wide);
    let layers = [
        LayerConfig {
            source: "top",
            ra_cn: &top_module,
            config: &top,
            nested: false,
        },
        LayerConfig {
            source: "middle",
            ra_cn: &module,
            config: &middle,
            nested: true,
        },
    ];
    let problems = across_layers(&layers);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "middle");
    assert!(
        problems[0]
            .1
            .contains("fallback.common_names: \"*\" is wider"),
        "{problems:?}"
    );

    // Through the command, with the shipped manifests (positive control) and the widened one.
    let bin = env!("CARGO_BIN_EXE_edge-est");
    let dir = tempfile::tempdir().unwrap();
    let widened = dir.path().join("middle-wide.json");
    std::fs::write(&widened, serde_json::to_string_pretty(&wide).unwrap()).unwrap();
    let mut shipped = vec![deployment(TOP)];
    shipped.extend(MIDDLES.iter().map(|m| deployment(m)));
    let ok = Command::new(bin)
        .arg("check-manifest")
        .args(&shipped)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = Command::new(bin)
        .arg("check-manifest")
        .arg(deployment(TOP))
        .arg(&widened)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("is wider than what the upper layer allows this RA"),
        "{stderr}"
    );
    // Alone, the widened manifest is not refused for it: the top's rule is not known.
    let alone = check_file(&widened, &CheckOptions::default());
    assert!(alone.is_ok(), "{:#?}", alone.errors);
}
