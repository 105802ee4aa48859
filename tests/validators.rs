//! `edge-est check-config` and `edge-est check-manifest`, run as the shipped binary: every
//! problem in one run, the offline mode, the two validators agreeing, layered deployments,
//! and the warnings an operator should see.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{stderr, stdout};
use serde_json::{json, Value};

fn edge_est(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A configuration with a problem in every part: limits, a user, an upstream, two labels.
const BROKEN: &str = r#"
[tls]
certificate = "server.pem"
key = "server.key"
[limits]
max_body_bytes = 10
[users]
bob = "hunter2"
[upstreams.top]
url = "http://top.example/.well-known/est"
trust = ["root.pem"]
[[labels]]
issuer = "nope"
[[labels.rules]]
match = ["user:bob"]
common_names = ["*"]
[[labels]]
name = "ra"
mode = "forward"
upstream = "missing"
"#;

#[test]
fn check_config_reports_every_problem_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.toml"), BROKEN).unwrap();
    let out = edge_est(&["check-config", "broken.toml"], dir.path());
    assert!(!out.status.success());
    let text = stderr(&out);
    for expected in [
        "limits.max_body_bytes: must be between",
        "users.bob: must be an argon2 PHC hash",
        "upstreams.top.url: must be an https:// URL",
        "labels[0].issuer: no issuer named \"nope\"",
        "labels[1].upstream: no upstream named \"missing\"",
        // The files too, each one, in the same run.
        "tls.certificate: cannot read",
        "tls.key: cannot read",
        "upstreams.top.trust[0]: cannot read",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    assert!(text.contains("problem(s)"), "{text}");
    assert!(!text.contains("hunter2"), "no secret in the report: {text}");

    // --offline: structure and policy only, the same problems less the files.
    let out = edge_est(&["check-config", "--offline", "broken.toml"], dir.path());
    assert!(!out.status.success());
    let offline = stderr(&out);
    assert!(offline.contains("labels[1].upstream"), "{offline}");
    assert!(!offline.contains("cannot read"), "{offline}");
}

#[test]
fn the_layered_configurations_check_offline_without_their_pki() {
    for name in ["top", "middle", "bottom"] {
        let file = repo(&format!("deployment/layered/{name}.toml"));
        let file = file.to_str().unwrap();
        let out = edge_est(&["check-config", "--offline", file], Path::new("/"));
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(
            stdout(&out).contains("valid in structure and policy"),
            "{}",
            stdout(&out)
        );
        // Without --offline the files are read, and they are not here.
        let out = edge_est(&["check-config", file], Path::new("/"));
        assert!(
            !out.status.success(),
            "{name}: the PKI is not in the repository"
        );
        assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
    }
}

/// The middle layer's manifest of `deployment/`.
fn middle_manifest() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo("deployment/middle-layer.deployment.template.json")).unwrap(),
    )
    .unwrap()
}

fn check_manifest(manifest: &Value, extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.json");
    std::fs::write(&file, manifest.to_string()).unwrap();
    let mut args = vec!["check-manifest", file.to_str().unwrap()];
    args.extend(extra);
    edge_est(&args, dir.path())
}

const PLACEHOLDER_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n";

#[test]
fn both_validators_refuse_a_placeholder_pem() {
    // check-manifest: an inline placeholder in the module's desired properties.
    let mut manifest = middle_manifest();
    manifest["modulesContent"]["edgeest"]["properties.desired"]["trust"]["factory"]
        ["certificates"] = json!([PLACEHOLDER_PEM]);
    let out = check_manifest(&manifest, &[]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("trust.factory.certificates[0]: inline PEM"),
        "{}",
        stderr(&out)
    );

    // check-config, offline: the same refusal, the same field.
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(repo("deployment/layered/middle.toml")).unwrap();
    let config =
        format!("{config}\n[trust.placeholder]\ncertificates = [\"\"\"{PLACEHOLDER_PEM}\"\"\"]\n");
    std::fs::write(dir.path().join("c.toml"), config).unwrap();
    let out = edge_est(&["check-config", "--offline", "c.toml"], dir.path());
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("trust.placeholder.certificates[0]: inline PEM"),
        "{}",
        stderr(&out)
    );

    // Positive control: a real certificate inline passes both.
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::generate_p256(pki_dir.path());
    let root = pki.root.cert_pem.clone();
    let mut manifest = middle_manifest();
    manifest["modulesContent"]["edgeest"]["properties.desired"]["trust"]["factory"]
        ["certificates"] = json!([root]);
    let out = check_manifest(&manifest, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn unknown_fields_are_reported_where_they_are() {
    let mut manifest = middle_manifest();
    manifest["modulesContent"]["edgeest"]["properties.desired"]["labels"][0]["rules"][0]
        ["colour"] = json!("red");
    let out = check_manifest(&manifest, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "modulesContent.edgeest.properties.desired.labels[0].rules[0].colour: unknown field `colour`"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn warnings_for_a_writable_key_the_example_password_and_no_edge_est() {
    // The shipped middle manifest: its example hash is that of `change-me`.
    let out = check_manifest(&middle_manifest(), &[]);
    assert!(
        out.status.success(),
        "a warning is not an error: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("warning: modulesContent.edgeest.properties.desired.users.l3-installer: the hash of `change-me`"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("1 warning(s)"), "{}", stdout(&out));

    // Positive control: another password's hash draws no warning.
    let mut manifest = middle_manifest();
    manifest["modulesContent"]["edgeest"]["properties.desired"]["users"]["l3-installer"] =
        json!(common::pki::password_hash());
    let out = check_manifest(&manifest, &[]);
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));

    // The key's directory mounted read-write.
    let binds = &mut manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
        ["edgeest"]["settings"]["createOptions"]["HostConfig"]["Binds"];
    assert_eq!(binds[0], "/etc/edge-est:/etc/edge-est:ro");
    binds[0] = json!("/etc/edge-est:/etc/edge-est");
    let out = check_manifest(&manifest, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning: modulesContent.edgeest.properties.desired.issuers.middle.key: the private key /etc/edge-est/middle-ca.key is on a read-write mount"),
        "{}",
        stderr(&out)
    );

    // No module recognised as edge-est: nothing of it was validated, and that is said.
    let mut manifest = middle_manifest();
    let content = manifest["modulesContent"].as_object_mut().unwrap();
    let section = content.remove("edgeest").unwrap();
    content.insert("pki".into(), section);
    let modules = content["$edgeAgent"]["properties.desired"]["modules"]
        .as_object_mut()
        .unwrap();
    let mut module = modules.remove("edgeest").unwrap();
    module["settings"]["image"] = json!("$upstream:443/pki-server:1.0");
    modules.insert("pki".into(), module);
    let out = check_manifest(&manifest, &[]);
    assert!(
        stderr(&out).contains("warning: modulesContent.$edgeAgent.properties.desired.modules: no edge-est module found"),
        "{}",
        stderr(&out)
    );
    // Named with --module, it is validated (and the warning goes).
    let out = check_manifest(&manifest, &["--module", "pki"]);
    assert!(
        !stderr(&out).contains("no edge-est module"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("edge-est: pki"), "{}", stdout(&out));
}

#[test]
fn layered_deployments_are_checked_in_parts() {
    let base = middle_manifest();
    let content = &base["modulesContent"];
    let module = &content["$edgeAgent"]["properties.desired"]["modules"]["edgeest"];
    let desired = &content["edgeest"]["properties.desired"];
    // As `az iot edge deployment create --layered` takes it.
    let layered = json!({
        "content": { "modulesContent": {
            "$edgeAgent": { "properties.desired.modules.edgeest": module },
            "$edgeHub": { "properties.desired.routes.est": "FROM /messages/modules/edgeest/* INTO $upstream" },
            "edgeest": { "properties.desired": desired }
        } }
    });
    // Its one module's image comes by a placeholder, not through $upstream: nothing says the
    // device is nested, so the operator says so.
    let out = check_manifest(&layered, &["--parent-hostname", "gw-top.plant.local"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("layered deployment") && stdout(&out).contains("edge-est: edgeest"),
        "{}",
        stdout(&out)
    );

    // Its module is checked like a base deployment's: a module without its data volume.
    let mut broken = layered.clone();
    broken["content"]["modulesContent"]["$edgeAgent"]["properties.desired.modules.edgeest"]
        ["settings"]["createOptions"]["HostConfig"]["Binds"] =
        json!(["/etc/edge-est:/etc/edge-est:ro"]);
    let out = check_manifest(&broken, &["--parent-hostname", "gw-top.plant.local"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("content.modulesContent.$edgeAgent.properties.desired.modules.edgeest.settings.createOptions: no volume on /data"),
        "{}",
        stderr(&out)
    );

    // A layer setting one part of edge-est's twin: what it names may be in the base.
    let partial = json!({
        "content": { "modulesContent": {
            "edgeest": { "properties.desired.labels": desired["labels"] }
        } }
    });
    let out = check_manifest(&partial, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unless the base deployment"),
        "{}",
        stderr(&out)
    );

    // A base deployment with a stray layered section is still refused.
    let mut stray = base.clone();
    let section = stray["modulesContent"]["edgeest"].take();
    stray["modulesContent"]["edgeest"] =
        json!({ "properties.desired.labels": section["properties.desired"]["labels"] });
    let out = check_manifest(&stray, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("layered-deployment syntax"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_failed_write_says_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .args([
            "serve",
            "--data-dir",
            "file/data",
            "--listen",
            "127.0.0.1:0",
        ])
        .current_dir(dir.path())
        .env_remove("IOTEDGE_WORKLOADURI")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot write file/data"),
        "{}",
        stderr(&out)
    );
}
