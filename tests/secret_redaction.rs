//! A secret pasted into a path field of the configuration (a key into `certificates` or
//! `key`, a password into `password_file`) must not come back in an error: `edge-est
//! check-config` names the field and shows no more of the value than a directory that exists.

mod common;

use std::path::Path;
use std::process::Command;

use common::{standard_config, Pki};

const KEY: &str = "MHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5UChr4ggLjQQboAoGCCqGSM49/AwEHoUQDQgAE";
const PASSWORD: &str = "Tr0ub4dor&3-correct-horse";

fn check_config(dir: &Path, config: &serde_json::Value) -> (bool, String) {
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .arg("check-config")
        .arg(&path)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn assert_no_echo(what: &str, text: &str, secret: &str) {
    for window in secret.as_bytes().windows(5) {
        let window = std::str::from_utf8(window).unwrap();
        assert!(
            !text.contains(window),
            "{what}: the output echoes {window:?} of the secret:\n{text}"
        );
    }
}

#[test]
fn check_config_names_the_field_and_never_echoes_a_pasted_secret() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    std::fs::write(dir.path().join("pw"), "gw-password\n").unwrap();
    let mut base = serde_json::to_value(standard_config(&pki)).unwrap();
    base["upstreams"] = serde_json::json!({ "parent": {
        "url": "https://parent.example/.well-known/est", "trust": ["root.pem"],
        "username": "gw", "password_file": "pw" } });

    // Positive control: the configuration as it is, valid.
    let (ok, text) = check_config(dir.path(), &base);
    assert!(ok, "{text}");
    assert!(text.contains("configuration is valid"), "{text}");

    let cases: [(&str, &[&str], &str); 6] = [
        ("tls.key", &["tls", "key"], KEY),
        ("tls.certificate", &["tls", "certificate"], PASSWORD),
        (
            "trust.bootstrap.certificates[0]",
            &["trust", "bootstrap", "certificates", "0"],
            KEY,
        ),
        ("issuers.plant.key", &["issuers", "plant", "key"], KEY),
        (
            "upstreams.parent.password_file",
            &["upstreams", "parent", "password_file"],
            PASSWORD,
        ),
        (
            "upstreams.parent.trust[0]",
            &["upstreams", "parent", "trust", "0"],
            KEY,
        ),
    ];
    for (field, at, secret) in cases {
        let mut config = base.clone();
        let mut slot = &mut config;
        for step in at {
            slot = match step.parse::<usize>() {
                Ok(i) => &mut slot[i],
                Err(_) => &mut slot[*step],
            };
        }
        *slot = serde_json::json!(secret);
        let (ok, text) = check_config(dir.path(), &config);
        assert!(!ok, "{field}: {text}");
        assert!(
            text.contains(&format!("{field}: cannot read ")),
            "{field}: {text}"
        );
        assert!(text.contains("not shown"), "{field}: {text}");
        assert_no_echo(field, &text, secret);
    }

    // A whole private key pasted into a certificate field, with its PEM header.
    let pem_key = format!("-----BEGIN EC PRIVATE KEY-----\n{KEY}\n-----END EC PRIVATE KEY-----\n");
    let mut config = base.clone();
    config["trust"]["bootstrap"]["certificates"][0] = serde_json::json!(pem_key);
    let (ok, text) = check_config(dir.path(), &config);
    assert!(!ok && text.contains("contains a private key"), "{text}");
    assert_no_echo("inline key", &text, KEY);

    // Positive control: a real path that names nothing is shown up to its existing directory,
    // and one that names a directory is shown whole.
    let mut config = base.clone();
    config["issuers"]["plant"]["key"] = serde_json::json!("issuing-ca.key.missing");
    let (ok, text) = check_config(dir.path(), &config);
    let shown_dir = dir.path().display().to_string();
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "issuers.plant.key: cannot read {shown_dir}/... (a value of 22 characters, not shown"
        )),
        "{text}"
    );
    config["issuers"]["plant"]["key"] = serde_json::json!(".");
    let (ok, text) = check_config(dir.path(), &config);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("issuers.plant.key: cannot read {shown_dir}/.: ")),
        "{text}"
    );
}
