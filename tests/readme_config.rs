//! What README.md's "Configuration" section says, held against the shipped binary: its
//! example configuration parses and its RA rule can grant the Edge CAs of the devices below,
//! both spellings of `serverkeygen = "rsa2048"` are read, a `client_cn` written as a
//! distinguished name is refused, and the sample configuration error is what
//! `edge-est check-config` prints.

mod common;

use std::path::Path;

use common::{standard_config, Pki};
use edge_est::config::{Config, RuleConfig, ServerKeygen};

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The first ```toml block after the heading `## Configuration`.
fn configuration_example() -> String {
    let text = readme();
    let section = text.split("\n## Configuration\n").nth(1).unwrap();
    let block = section.split("```toml\n").nth(1).unwrap();
    block.split("```").next().unwrap().to_owned()
}

#[test]
fn the_readme_example_parses_and_its_ra_rule_grants_edge_cas() {
    let config: Config = toml::from_str(&configuration_example()).expect("README example parses");
    let ra_rules: Vec<&RuleConfig> = config
        .labels
        .iter()
        .flat_map(|l| &l.rules)
        .filter(|r| r.registration_authority)
        .collect();
    assert_eq!(ra_rules.len(), 1);
    let ra = ra_rules[0];
    assert!(
        !ra.ca_common_names.is_empty(),
        "an RA forwards its devices' Edge CA requests: its rule needs ca_common_names"
    );
    assert!(ra.client_cn.iter().all(|cn| !cn.contains('=')));
    assert_eq!(config.labels[0].serverkeygen, ServerKeygen::EcP256);
}

#[test]
fn serverkeygen_reads_rsa2048_in_both_spellings() {
    #[derive(serde::Deserialize)]
    struct Label {
        serverkeygen: ServerKeygen,
    }
    for spelling in ["rsa2048", "rsa-2048"] {
        let label: Label = toml::from_str(&format!("serverkeygen = \"{spelling}\"")).unwrap();
        assert_eq!(label.serverkeygen, ServerKeygen::Rsa2048, "{spelling}");
    }
    // The README documents one of them.
    assert!(readme().contains("ec-p384, rsa2048"));
    assert!(toml::from_str::<Label>("serverkeygen = \"rsa-4096\"").is_err());
}

#[test]
fn client_cn_written_as_a_distinguished_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.labels[0].rules[1].client_cn = vec!["CN=bottom-ra".to_owned()];
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("client_cn: \"CN=bottom-ra\" is written as a distinguished name; give the common name alone (\"bottom-ra\")"),
        "{error}"
    );
    config.labels[0].rules[1].client_cn = vec!["cn=bottom-ra".to_owned()];
    assert!(config.validate().is_err());
    // The positive control: the common name alone.
    config.labels[0].rules[1].client_cn = vec!["bottom-ra".to_owned()];
    config.validate().unwrap();
}

#[test]
fn the_readme_sample_error_is_what_check_config_prints() {
    let text = readme();
    let sentence = text
        .split("`edge-est check-config` prints `")
        .nth(1)
        .expect("the README quotes check-config");
    let quoted = sentence.split('`').next().unwrap().replace('\n', " ");
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.labels[0].rules[1].matches = vec!["certificate:factory".to_owned()];
    let toml_text = toml::to_string(&config).unwrap();
    std::fs::write(dir.path().join("edge-est.toml"), toml_text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .args(["check-config", "edge-est.toml"])
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // check-config prints every problem, one a line, then how many there were.
    let first = stderr.lines().next().unwrap_or_default();
    assert_eq!(first, quoted, "README: {quoted}\nbinary: {stderr}");
    assert!(stderr.contains("edge-est.toml: 1 problem(s)"), "{stderr}");
}
