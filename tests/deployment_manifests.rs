//! `edge-est check-manifest` against the deployment manifests in `deployment/`: every one of
//! them passes (this test globs the folder, so CI checks each manifest added there), and
//! manifests broken in one place fail with the JSON path of that place: edge-est desired
//! properties the module's own validator refuses, createOptions above the enforced size, a
//! proxy socket another module could reach, and the shapes edgeAgent and edgeHub refuse.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use edge_est::edge::manifest::{check, check_file, CheckOptions, Parent, Report, Via};
use serde_json::{json, Value};

fn deployment_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deployment")
}

/// Every `.json` file under `deployment/`.
fn manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "json") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&deployment_dir(), &mut found);
    found.sort();
    found
}

fn load(name: &str) -> Value {
    let text = std::fs::read_to_string(deployment_dir().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

const TOP: &str = "top-layer.deployment.template.json";
const MIDDLE: &str = "middle-layer.deployment.template.json";
const PROXY: &str = "middle-layer-api-proxy.deployment.template.json";
const AGENT: &str = "modulesContent.$edgeAgent.properties.desired";
const EST_DESIRED: &str = "modulesContent.edgeest.properties.desired";

fn checked(manifest: &Value) -> Report {
    check(manifest, &CheckOptions::default())
}

/// The manifest fails, and one error is at `path` and says `says`.
fn fails_at(manifest: &Value, path: &str, says: &str) {
    let report = checked(manifest);
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.path == path && e.message.contains(says)),
        "expected an error at {path} saying {says:?}, got: {:#?}",
        report.errors
    );
}

#[test]
fn every_manifest_in_deployment_passes() {
    let files = manifests();
    assert!(files.len() >= 3, "{files:?}");
    for file in &files {
        let report = check_file(file, &CheckOptions::default());
        assert!(report.is_ok(), "{}: {:#?}", file.display(), report.errors);
        assert!(
            !report.edge_est.is_empty() && report.edge_est.iter().all(|m| m.config.is_some()),
            "{}: no validated edge-est module",
            file.display()
        );
    }
    // What each serves, as the child configurations rely on.
    let top = check_file(&deployment_dir().join(TOP), &CheckOptions::default());
    assert_eq!(top.parent, None);
    assert_eq!(
        top.endpoints
            .iter()
            .map(|e| (e.host_port, e.via.clone()))
            .collect::<Vec<_>>(),
        vec![(8085, Via::Direct)]
    );
    let middle = check_file(&deployment_dir().join(MIDDLE), &CheckOptions::default());
    assert!(middle.parent_inferred, "nested: images via $upstream");
    let proxy = check_file(&deployment_dir().join(PROXY), &CheckOptions::default());
    assert_eq!(
        proxy
            .endpoints
            .iter()
            .map(|e| (e.host_port, e.via.clone()))
            .collect::<Vec<_>>(),
        vec![(443, Via::ApiProxy("IoTEdgeAPIProxy".into()))]
    );
}

#[test]
fn the_command_checks_every_manifest_with_one_line_each() {
    let files = manifests();
    let output = Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .arg("check-manifest")
        .args(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), files.len(), "{stdout}");
    // ok, possibly with warnings (the middle layers' example hash of `change-me`).
    assert!(
        stdout
            .lines()
            .all(|l| l.contains(": ok: ") || l.contains(": ok, ")),
        "{stdout}"
    );

    // A broken one: non-zero, the field on stderr, still one line per manifest on stdout.
    let dir = tempfile::tempdir().unwrap();
    let mut broken = load(TOP);
    broken["modulesContent"]["edgeest"]["properties.desired"]["users"] =
        json!({ "bob": "hunter2" });
    let path = dir.path().join("broken.json");
    std::fs::write(&path, serde_json::to_string_pretty(&broken).unwrap()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .arg("check-manifest")
        .arg(&files[0])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{EST_DESIRED}.users.bob: must be an argon2 PHC hash"
        )),
        "{stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 2);
}

#[test]
fn invalid_edge_est_desired_properties_name_the_field() {
    let base = load(TOP);
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut manifest = base.clone();
        f(&mut manifest["modulesContent"]["edgeest"]["properties.desired"]);
        manifest
    };
    // A plaintext password where an argon2 hash belongs.
    fails_at(
        &edit(&|d| d["users"] = json!({ "bob": "hunter2" })),
        &format!("{EST_DESIRED}.users.bob"),
        "never a plaintext password",
    );
    // A rule matching a trust set the label does not have.
    fails_at(
        &edit(&|d| d["labels"][0]["rules"][0]["match"] = json!(["certificate:factroy"])),
        &format!("{EST_DESIRED}.labels[0].rules"),
        "factroy",
    );
    // forward with an issuer and (on the top layer) no upstream.
    fails_at(
        &edit(&|d| d["labels"][0]["mode"] = json!("forward")),
        &format!("{EST_DESIRED}.labels[0].mode"),
        "forward needs an upstream and no issuer",
    );
    // The default upstream exists only on nested devices.
    fails_at(
        &edit(&|d| {
            d["labels"][0]["mode"] = json!("auto");
            d["labels"][0]["upstream"] = json!("parent");
        }),
        &format!("{EST_DESIRED}.labels[0].upstream"),
        "exists on nested devices only",
    );
    // A private key in the twin.
    fails_at(
        &edit(&|d| {
            d["issuers"]["top"]["key"] =
                json!("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
        }),
        &format!("{EST_DESIRED}.issuers.top.key"),
        "private key",
    );
    // An unknown field: serde's message, at the field itself.
    fails_at(
        &edit(&|d| d["labelz"] = json!([])),
        &format!("{EST_DESIRED}.labelz"),
        "unknown field `labelz`",
    );
    // A key file the container cannot see.
    fails_at(
        &edit(&|d| d["issuers"]["top"]["key"] = json!("/opt/keys/top-ca.key")),
        &format!("{EST_DESIRED}.issuers.top.key"),
        "is on no volume",
    );
    // A twin key IoT Hub refuses.
    fails_at(
        &edit(&|d| d["users"] = json!({ "bob.smith": d["labels"][0]["deny"].clone() })),
        &format!("{EST_DESIRED}.users.bob.smith"),
        "twin keys may not contain '.'",
    );
    // No desired properties at all: the module would wait forever.
    let mut manifest = base.clone();
    manifest["modulesContent"]
        .as_object_mut()
        .unwrap()
        .remove("edgeest");
    fails_at(
        &manifest,
        "modulesContent.edgeest",
        "never opens its EST port",
    );
}

#[test]
fn the_middle_layer_needs_its_parent_and_says_so() {
    let middle = load(MIDDLE);
    let report = check(
        &middle,
        &CheckOptions {
            parent: Parent::None,
            ..CheckOptions::default()
        },
    );
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.path == format!("{EST_DESIRED}.labels[0].upstream")
                && e.message.contains("no upstream named \"parent\"")),
        "{:#?}",
        report.errors
    );
    let report = check(
        &middle,
        &CheckOptions {
            parent: Parent::Hostname("gw-top.plant.local".into()),
            ..CheckOptions::default()
        },
    );
    assert!(report.is_ok(), "{:#?}", report.errors);
    let upstream = &report.edge_est[0].config.as_ref().unwrap().upstreams["parent"];
    assert_eq!(
        upstream.url,
        "https://gw-top.plant.local:8085/.well-known/est"
    );
}

#[test]
fn create_options_above_4096_characters_fail() {
    let create = format!("{AGENT}.modules.edgeest.settings.createOptions");
    let with_env = |padding: usize| {
        let mut manifest = load(TOP);
        manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]
            ["settings"]["createOptions"]["Env"] = json!([format!("PAD={}", "x".repeat(padding))]);
        manifest
    };
    // Find the padding that makes the minified object exactly 4096 characters.
    let length = |m: &Value| {
        serde_json::to_string(
            &m["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]
                ["settings"]["createOptions"],
        )
        .unwrap()
        .len()
    };
    let padding = 4096 - length(&with_env(0));
    let at_limit = with_env(padding);
    assert_eq!(length(&at_limit), 4096);
    let report = checked(&at_limit);
    assert!(report.is_ok(), "4096 is allowed: {:#?}", report.errors);
    fails_at(
        &with_env(padding + 1),
        &create,
        "4097 characters once minified",
    );

    // The string form counts as given, chunks included.
    let mut manifest = load(TOP);
    let settings = &mut manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
        ["edgeest"]["settings"];
    let text =
        serde_json::to_string(&json!({ "Env": [format!("PAD={}", "x".repeat(5000))] })).unwrap();
    settings["createOptions"] = json!(text[..512]);
    let rest: Vec<&str> = text.as_bytes()[512..]
        .chunks(512)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    for (i, chunk) in rest.iter().enumerate() {
        settings[format!("createOptions{:02}", i + 1)] = json!(chunk);
    }
    fails_at(&manifest, &create, "the enforced limit is 4096");
    // A gap in the chunks: edgeAgent would stop there.
    settings_remove(&mut manifest, "createOptions02");
    fails_at(
        &manifest,
        &format!("{AGENT}.modules.edgeest.settings.createOptions03"),
        "createOptions02 is missing",
    );

    // A stringified createOptions must parse.
    let mut manifest = load(TOP);
    manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]
        ["settings"]["createOptions"] = json!("{\"HostConfig\": {");
    fails_at(&manifest, &create, "not JSON");
}

fn settings_remove(manifest: &mut Value, key: &str) {
    manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]
        ["settings"]
        .as_object_mut()
        .unwrap()
        .remove(key);
}

#[test]
fn edge_agent_and_edge_hub_shapes() {
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut manifest = load(TOP);
        f(&mut manifest["modulesContent"]);
        manifest
    };
    fails_at(
        &edit(&|c| {
            c["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]["status"] = json!("started")
        }),
        &format!("{AGENT}.modules.edgeest.status"),
        "not one of running, stopped",
    );
    fails_at(
        &edit(&|c| {
            c["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]["restartPolicy"] =
                json!("sometimes")
        }),
        &format!("{AGENT}.modules.edgeest.restartPolicy"),
        "on-unhealthy",
    );
    fails_at(
        &edit(&|c| c["$edgeAgent"]["properties.desired"]["schemaVersion"] = json!("1.0")),
        &format!("{AGENT}.modules.edgeest.startupOrder"),
        "needs $edgeAgent schemaVersion \"1.1\"",
    );
    fails_at(
        &edit(&|c| {
            c["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]["env"]["RUST_LOG"] =
                json!("info")
        }),
        &format!("{AGENT}.modules.edgeest.env.RUST_LOG"),
        "{\"value\"",
    );
    fails_at(
        &edit(&|c| {
            c["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]["settings"]
                ["createOptions"]["HostConfig"]["PortBindings"]["8085/tcp"][0]["HostPort"] =
                json!(8085)
        }),
        &format!(
            "{AGENT}.modules.edgeest.settings.createOptions.HostConfig.PortBindings.8085/tcp[0].HostPort"
        ),
        "must be a string",
    );
    fails_at(
        &edit(&|c| {
            c["$edgeAgent"]["properties.desired"]["systemModules"]["edgeHub"]["settings"]
                ["createOptions"]["HostConfig"]["PortBindings"]["443/tcp"] =
                json!([{ "HostPort": "443" }])
        }),
        &format!(
            "{AGENT}.modules.IoTEdgeAPIProxy.settings.createOptions.HostConfig.PortBindings.443/tcp"
        ),
        "already published by edgeHub",
    );
    fails_at(
        &edit(&|c| {
            c["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]["settings"]
                ["createOptions"]["HostConfig"]["Binds"] = json!(["/etc/edge-est:/etc/edge-est:ro"])
        }),
        &format!("{AGENT}.modules.edgeest.settings.createOptions"),
        "no volume on /data",
    );
    fails_at(
        &edit(&|c| {
            c["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]["settings"]
                ["createOptions"]["HostConfig"]["PortBindings"] =
                json!({ "8443/tcp": [{ "HostPort": "8085" }] })
        }),
        &format!("{AGENT}.modules.edgeest.settings.createOptions.HostConfig.PortBindings.8443/tcp"),
        "edge-est listens on 8085/tcp",
    );
    fails_at(
        &edit(&|c| {
            c["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]["settings"]["image"] =
                json!("myacr.azurecr.io/Edge-Est:1")
        }),
        &format!("{AGENT}.modules.edgeest.settings.image"),
        "lower-case",
    );
    fails_at(
        &edit(&|c| {
            c["$edgeHub"]["properties.desired"]["routes"]["bad"] = json!("SELECT * INTO $upstream")
        }),
        "modulesContent.$edgeHub.properties.desired.routes.bad",
        "FROM <source>",
    );
    fails_at(
        &edit(&|c| c["$edgeHub"]["properties.desired"]["schemaVersion"] = json!("1.0")),
        "modulesContent.$edgeHub.properties.desired.routes.upstream",
        "need $edgeHub schemaVersion 1.1",
    );
    fails_at(
        &edit(&|c| c["ghost"] = json!({ "properties.desired": {} })),
        "modulesContent.ghost",
        "which $edgeAgent does not run",
    );
}

#[test]
fn the_api_proxy_variant_keeps_the_socket_to_itself() {
    let base = load(PROXY);
    let nginx = std::fs::read_to_string(deployment_dir().join("middle-layer-api-proxy.nginx.conf"))
        .unwrap();
    // The file next to the manifest is exactly what the twin holds.
    let encoded = base["modulesContent"]["IoTEdgeAPIProxy"]["properties.desired"]["proxy_config"]
        .as_str()
        .unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), nginx);
    assert!(encoded.len() <= 4096, "a twin string holds at most 4 KB");
    assert!(nginx.contains("proxy_set_header x-ms-edge-clientcert $ssl_client_escaped_cert;"));

    let config_path = "modulesContent.IoTEdgeAPIProxy.properties.desired.proxy_config";
    let with_nginx = |text: &str| {
        let mut manifest = base.clone();
        manifest["modulesContent"]["IoTEdgeAPIProxy"]["properties.desired"]["proxy_config"] =
            json!(base64::engine::general_purpose::STANDARD.encode(text));
        manifest
    };
    // EST to the TLS port: the header could be forged there.
    fails_at(
        &with_nginx(&nginx.replace(
            "http://unix:/var/run/edge-est/proxy.sock:",
            "https://edgeest:8085",
        )),
        config_path,
        "somewhere other than a unix socket",
    );
    // A socket nobody serves.
    fails_at(
        &with_nginx(&nginx.replace("proxy.sock", "other.sock")),
        config_path,
        "no edge-est module mounts that volume and has its proxy_socket there",
    );
    let mut manifest = base.clone();
    manifest["modulesContent"]["IoTEdgeAPIProxy"]["properties.desired"]["proxy_config"] =
        json!("not base64!");
    fails_at(&manifest, config_path, "not base64");

    // A third module mounting the socket's volume could forge client certificates.
    let mut manifest = base.clone();
    manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["sidecar"] = json!({
        "type": "docker", "status": "running", "restartPolicy": "always",
        "settings": { "image": "$upstream:443/sidecar:1",
                      "createOptions": { "HostConfig": { "Binds": ["edge-est-proxy:/mnt"] } } }
    });
    fails_at(
        &manifest,
        &format!("{AGENT}.modules.sidecar.settings.createOptions"),
        "can forge client certificates",
    );
    // edge-est's socket on no volume: the API proxy cannot reach it.
    let mut manifest = base.clone();
    manifest["modulesContent"]["edgeest"]["properties.desired"]["proxy_socket"] =
        json!("/run/elsewhere/proxy.sock");
    fails_at(
        &manifest,
        &format!("{EST_DESIRED}.proxy_socket"),
        "is on no volume",
    );
    // And the API proxy must say which port nginx listens on.
    let mut manifest = base.clone();
    manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["IoTEdgeAPIProxy"]
        ["env"]
        .as_object_mut()
        .unwrap()
        .remove("NGINX_DEFAULT_PORT");
    fails_at(
        &manifest,
        &format!("{AGENT}.modules.IoTEdgeAPIProxy.env"),
        "NGINX_DEFAULT_PORT is not set",
    );
}

/// The top layer names its RA as a module of one device: only that identity is exempt from
/// the identity rate limit; the same module name on another device, or the device itself, is
/// not (the forging itself is refused on the wire in tests/identity.rs).
#[test]
fn the_top_layer_exempts_its_ra_and_only_its_ra_from_the_identity_limit() {
    use edge_est::auth::{CertIdentity, Identity};
    use edge_est::config::RuleConfig;
    use edge_est::est::name::{AttributeType, Subject};
    use edge_est::policy::Policy;

    let manifest = load("top-layer.deployment.template.json");
    let label = &manifest["modulesContent"]["edgeest"]["properties.desired"]["labels"][0];
    let rules: Vec<RuleConfig> = serde_json::from_value(label["rules"].clone()).unwrap();
    let trust: Vec<String> = serde_json::from_value(label["client_trust"].clone()).unwrap();
    assert!(
        rules.iter().all(|r| r.client_cn.is_empty()),
        "no rule names an identity by CN alone"
    );
    let policy = Policy::new(&rules, &[], &trust).unwrap();
    let who = |cn: &str, trust: &str, device: Option<&str>| Identity {
        certificate: Some(CertIdentity {
            subject: Subject::from_attributes(vec![(
                AttributeType::from_oid("2.5.4.3"),
                cn.into(),
            )]),
            sans: vec![],
            serial: "01".into(),
            not_after: time::OffsetDateTime::now_utc() + time::Duration::days(1),
            trust: trust.into(),
            ca: false,
            grace: false,
            valid_until: time::OffsetDateTime::now_utc() + time::Duration::days(1),
            device: device.map(str::to_owned),
        }),
        user: None,
    };
    let ra = who("edgeest", "issuer", Some("l4-gw-01"));
    assert!(policy.is_registration_authority(&ra));
    assert!(!policy.is_registration_authority(&who("edgeest", "issuer", Some("l3-dev-01"))));
    assert!(!policy.is_registration_authority(&who("edgeest", "issuer", None)));
    assert!(!policy.is_registration_authority(&who("edgeest", "factory", None)));
    assert!(!policy.is_registration_authority(&who("l4-gw-01", "issuer", None)));
    let mut unmarked = rules.clone();
    unmarked
        .iter_mut()
        .for_each(|r| r.registration_authority = false);
    let unmarked = Policy::new(&unmarked, &[], &trust).unwrap();
    assert!(!unmarked.is_registration_authority(&ra));
    let deny = Policy::new(&rules, &["cn:edgeest".to_owned()], &trust).unwrap();
    assert!(!deny.is_registration_authority(&ra));
}

/// What an IoT Edge operator checks first in each manifest: every module (edgeAgent and
/// edgeHub included) rotates its logs (json-file with max-size and max-file, as Azure/iotedge's
/// nested e2e manifests set); edge-est's image is iotedgedev's platform placeholder (an arm64
/// gateway gets the arm64 image), never a fixed `…-amd64` tag; the registry module is pinned
/// and starts before the API proxy that routes `/v2` to it; the API proxy starts after
/// edge-est (the volume they share gets edge-est's ownership).
#[test]
fn modules_rotate_logs_and_images_are_pinned_or_placeholders() {
    for file in manifests() {
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let agent = &manifest["modulesContent"]["$edgeAgent"]["properties.desired"];
        let name = file.display();
        let mut all: Vec<(&String, &Value)> = Vec::new();
        for group in ["systemModules", "modules"] {
            all.extend(agent[group].as_object().unwrap().iter());
        }
        assert!(all.len() >= 4, "{name}");
        for (module, spec) in &all {
            let log = &spec["settings"]["createOptions"]["HostConfig"]["LogConfig"];
            assert_eq!(log["Type"], "json-file", "{name}: {module} rotates no logs");
            for key in ["max-size", "max-file"] {
                assert!(
                    log["Config"][key].as_str().is_some_and(|v| !v.is_empty()),
                    "{name}: {module}: LogConfig.Config.{key} (a string)"
                );
            }
            let image = spec["settings"]["image"].as_str().unwrap();
            assert!(
                !image.ends_with(":latest") && (image.contains(':') || image.starts_with("${")),
                "{name}: {module}: image {image} is not pinned"
            );
        }
        let modules = agent["modules"].as_object().unwrap();
        if name.to_string().contains("pkcs11") {
            // module/build-pkcs11-image.sh builds it (iotedgedev cannot: it needs the host's
            // PKCS#11 library); the tag it printed comes from the deployment's environment.
            assert_eq!(
                modules["edgeest"]["settings"]["image"],
                "${CONTAINER_REGISTRY_SERVER}/edge-est:${EDGE_EST_PKCS11_TAG}",
                "{name}: the PKCS#11 image's tag"
            );
        } else {
            assert_eq!(
                modules["edgeest"]["settings"]["image"], "${MODULES.edge-est}",
                "{name}: edge-est's image must follow the platform iotedgedev builds for"
            );
        }
        let order = |m: &str| modules[m]["startupOrder"].as_u64().unwrap();
        assert!(order("edgeest") < order("IoTEdgeAPIProxy"), "{name}");
        if let Some(registry) = modules.get("registry") {
            assert!(
                registry["settings"]["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("registry:2.")),
                "{name}"
            );
            assert!(order("registry") < order("IoTEdgeAPIProxy"), "{name}");
            assert_eq!(
                modules["IoTEdgeAPIProxy"]["env"]["DOCKER_REQUEST_ROUTE_ADDRESS"]["value"],
                "registry:5000",
                "{name}"
            );
        }
    }
    // No file in deployment/ or module/ hard-codes an edge-est image tag.
    let version = env!("CARGO_PKG_VERSION");
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains(&format!("edge-est:{version}-")),
            "{}: a fixed edge-est image tag",
            file.display()
        );
    }
}

/// The README's metrics-collector module (deployment section, 8.): valid in each manifest by
/// `check-manifest`'s rules, and its scrape endpoint is the manifests' edge-est module on the
/// port the module serves metrics on by default.
#[test]
fn the_readme_metrics_collector_snippet_fits_the_manifests() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("### 8. Metrics in Azure Monitor")
        .nth(1)
        .expect("the README's metrics section");
    let block = section
        .split("```json\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a json block");
    let snippet: Value = serde_json::from_str(&format!("{{{block}}}")).unwrap();
    let collector = &snippet["metricscollector"];
    let endpoints = collector["env"]["MetricsEndpointsCSV"]["value"]
        .as_str()
        .unwrap();
    assert!(endpoints.split(',').any(|e| e
        == format!(
            "http://edgeest:{}/metrics",
            edge_est::metrics::MODULE_DEFAULT_LISTEN.port()
        )));
    assert_eq!(collector["env"]["UploadTarget"]["value"], "AzureMonitor");
    for name in [TOP, MIDDLE, PROXY] {
        let mut manifest = load(name);
        let modules =
            &mut manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"];
        assert!(modules.get("edgeest").is_some(), "{name}");
        modules["metricscollector"] = collector.clone();
        let report = checked(&manifest);
        assert!(report.is_ok(), "{name}: {:#?}", report.errors);
    }
}

/// The PKCS#11 variant: the issuing key is a token URI, never checked as a file; what the
/// container must see of it is its PIN file, on a volume.
#[test]
fn a_token_key_needs_its_pin_file_on_a_volume_not_a_key_file() {
    let manifest = load("top-layer-pkcs11.deployment.template.json");
    let report = checked(&manifest);
    assert!(report.is_ok(), "{:#?}", report.errors);
    assert!(
        report
            .warnings
            .iter()
            .all(|w| !w.message.contains("pkcs11:")),
        "a token URI was taken for a file: {:#?}",
        report.warnings
    );
    let key = &manifest["modulesContent"]["edgeest"]["properties.desired"]["issuers"]["top"]["key"];
    assert!(key.as_str().is_some_and(|k| k.starts_with("pkcs11:")));
    // Without the volume that holds the PIN file: refused, naming it.
    let mut without = manifest.clone();
    let binds = &mut without["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
        ["edgeest"]["settings"]["createOptions"]["HostConfig"]["Binds"];
    binds
        .as_array_mut()
        .unwrap()
        .retain(|b| !b.as_str().unwrap().contains("/run/secrets"));
    fails_at(
        &without,
        &format!("{EST_DESIRED}.issuers.top.key (pin-source)"),
        "/run/secrets/hsm-pin is on no volume",
    );
}

fn edge_est_binds(m: &mut Value) -> &mut Vec<Value> {
    m["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["edgeest"]["settings"]
        ["createOptions"]["HostConfig"]["Binds"]
        .as_array_mut()
        .unwrap()
}

/// An enrolled issuer in edge-est's desired properties: check-manifest wants the upstream it
/// enrolls from, its root on a volume and, for a key generated in a token, the PIN file on a
/// volume (never the token URI taken for a file); accepted when they are.
#[test]
fn an_enrolled_issuer_needs_its_upstream_its_root_and_its_pin_file() {
    let mut manifest = load(MIDDLE);
    let desired = &mut manifest["modulesContent"]["edgeest"]["properties.desired"];
    desired["issuers"] = json!({});
    desired["enrolled_issuers"] = json!({ "middle": {
        "enroll": "parent",
        "common_name": "L3 issuing CA gw-mid",
        "path_len": 1,
        "root": "/etc/edge-est/root.pem",
        "key": "pkcs11:token=plant;object=mid-ca?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/secrets/hsm-pin"
    }});
    edge_est_binds(&mut manifest).push(json!("/run/secrets:/run/secrets:ro"));
    let report = checked(&manifest);
    assert!(report.is_ok(), "{:#?}", report.errors);
    assert!(
        report
            .warnings
            .iter()
            .all(|w| !w.message.contains("pkcs11:")),
        "a token URI was taken for a file: {:#?}",
        report.warnings
    );
    assert!(
        report.edge_est[0].config.as_ref().unwrap().enrolled_issuers["middle"]
            .key
            .is_some()
    );

    let field = |f: &str| format!("{EST_DESIRED}.enrolled_issuers.middle.{f}");
    // The PIN file on no volume.
    let mut without = manifest.clone();
    edge_est_binds(&mut without).retain(|b| !b.as_str().unwrap().contains("/run/secrets"));
    fails_at(
        &without,
        &field("key (pin-source)"),
        "/run/secrets/hsm-pin is on no volume",
    );
    // The root on no volume.
    let mut root = manifest.clone();
    root["modulesContent"]["edgeest"]["properties.desired"]["enrolled_issuers"]["middle"]["root"] =
        json!("/opt/pki/root.pem");
    fails_at(&root, &field("root"), "/opt/pki/root.pem is on no volume");
    // No upstream of that name.
    let mut nowhere = manifest.clone();
    nowhere["modulesContent"]["edgeest"]["properties.desired"]["enrolled_issuers"]["middle"]
        ["enroll"] = json!("enterprise");
    fails_at(
        &nowhere,
        &field("enroll"),
        "no upstream named \"enterprise\"",
    );
    // A top layer (no parent) has no `parent` upstream: said so, with the hint.
    let report = check(
        &manifest,
        &CheckOptions {
            parent: Parent::None,
            ..CheckOptions::default()
        },
    );
    assert!(
        report.errors.iter().any(|e| e.path == field("enroll")
            && e.message.contains("no upstream named \"parent\"")
            && e.message.contains("--parent-hostname")),
        "{:#?}",
        report.errors
    );
}
