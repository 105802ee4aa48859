//! The child IoT Edge `config.toml` examples in `deployment/child/`: each parses as TOML,
//! names the manifest its parent runs (`# edge-est parent manifest: <file>`), and every EST
//! URL in it is one that manifest serves: https, host = the child's `parent_hostname` (the
//! name the parent's certificate carries), a port the manifest publishes for EST (edge-est's
//! own PortBindings, or the API proxy's 443), the path `/.well-known/est`, and a label the
//! parent's edge-est serves if one follows.

use std::path::{Path, PathBuf};

use edge_est::edge::manifest::{check_file, CheckOptions, Report, EST_PATH};
use toml::Value;

fn child_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deployment/child")
}

fn children() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(child_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    found.sort();
    found
}

/// Every EST URL of a config.toml, with where it is.
fn est_urls(config: &Value) -> Vec<(String, String)> {
    let mut urls = Vec::new();
    if let Some(table) = config
        .get("cert_issuance")
        .and_then(|c| c.get("est"))
        .and_then(|e| e.get("urls"))
        .and_then(Value::as_table)
    {
        for (key, url) in table {
            urls.push((
                format!("cert_issuance.est.urls.{key}"),
                url.as_str().expect("URLs are strings").to_owned(),
            ));
        }
    }
    if let Some(url) = config
        .get("edge_ca")
        .and_then(|e| e.get("url"))
        .and_then(Value::as_str)
    {
        urls.push(("edge_ca.url".into(), url.to_owned()));
    }
    urls
}

/// The parent's manifest a child names, checked.
fn parent_manifest(file: &Path, text: &str) -> (PathBuf, Report) {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("# edge-est parent manifest:"))
        .unwrap_or_else(|| panic!("{}: names no parent manifest", file.display()));
    let path = file.parent().unwrap().join(line.trim());
    let report = check_file(&path, &CheckOptions::default());
    assert!(report.is_ok(), "{}: {:#?}", path.display(), report.errors);
    (path, report)
}

#[test]
fn child_configs_parse_and_point_at_what_their_parent_serves() {
    let files = children();
    assert!(files.len() >= 3, "{files:?}");
    let mut ports = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let config: Value =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{} is not TOML: {e}", file.display()));
        let name = file.display();
        let parent_host = config
            .get("parent_hostname")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{name}: no parent_hostname"));
        assert!(
            config.get("trust_bundle_cert").is_some(),
            "{name}: trust_bundle_cert"
        );
        assert!(
            config
                .get("cert_issuance")
                .and_then(|c| c.get("est"))
                .and_then(|e| e.get("trusted_certs"))
                .is_some(),
            "{name}: cert_issuance.est.trusted_certs (the root of the parent's TLS certificate)"
        );
        // Without `default`, aziot-certd refuses to start when est-id is used (#7063).
        let urls = est_urls(&config);
        assert!(
            urls.iter()
                .any(|(k, _)| k == "cert_issuance.est.urls.default"),
            "{name}: cert_issuance.est.urls.default"
        );
        // What the child asks EST for.
        assert_eq!(
            config["edge_ca"]["method"].as_str(),
            Some("est"),
            "{name}: Edge CA by EST"
        );
        assert!(config["edge_ca"].get("auto_renew").is_some(), "{name}");
        let identity = &config["provisioning"]["attestation"]["identity_cert"];
        assert_eq!(identity["method"].as_str(), Some("est"), "{name}");
        assert!(identity.get("auto_renew").is_some(), "{name}");
        let auth = &config["cert_issuance"]["est"]["auth"];
        assert!(
            auth.get("bootstrap_identity_cert").is_some() || auth.get("username").is_some(),
            "{name}: some way to authenticate the first request"
        );
        if auth.get("bootstrap_identity_cert").is_some() {
            assert!(auth.get("bootstrap_identity_pk").is_some(), "{name}");
            assert!(
                config["cert_issuance"]["est"]
                    .get("identity_auto_renew")
                    .is_some(),
                "{name}: the EST identity certificate renews itself"
            );
        }

        let (manifest, report) = parent_manifest(file, &text);
        for (key, url) in urls {
            let uri: http::Uri = url
                .parse()
                .unwrap_or_else(|e| panic!("{name}: {key} = {url:?}: {e}"));
            assert_eq!(uri.scheme_str(), Some("https"), "{name}: {key}");
            assert_eq!(
                uri.host(),
                Some(parent_host),
                "{name}: {key} must name parent_hostname: the parent's certificate is issued \
                 for it and aziot-certd checks the name"
            );
            let port = uri.port_u16().unwrap_or(443);
            let path = uri.path().trim_end_matches('/');
            let label = path
                .strip_prefix(EST_PATH)
                .unwrap_or_else(|| panic!("{name}: {key} = {url:?} is not under {EST_PATH}"));
            let label = label.strip_prefix('/').filter(|l| !l.is_empty());
            let endpoint =
                report
                    .endpoints
                    .iter()
                    .find(|e| e.host_port == port)
                    .unwrap_or_else(|| {
                        panic!(
                        "{name}: {key} = {url:?}: {} serves EST on host port(s) {:?}, not {port}",
                        manifest.display(),
                        report.endpoints.iter().map(|e| e.host_port).collect::<Vec<_>>()
                    )
                    });
            assert!(
                endpoint.labels.contains(&label.map(str::to_owned)),
                "{name}: {key} = {url:?}: {} serves labels {:?}",
                endpoint.module,
                endpoint.labels
            );
            ports.push(port);
        }
    }
    // Both ways in are exemplified: edge-est's own port and the API proxy.
    assert!(ports.contains(&8085) && ports.contains(&443), "{ports:?}");
}

#[test]
fn a_url_the_parent_does_not_serve_is_caught() {
    // The check above is not vacuous: the bottom device pointed at 443 of a parent that
    // publishes edge-est on 8085 only finds no endpoint.
    let file = child_dir().join("bottom-device.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let (_, report) = parent_manifest(&file, &text);
    assert!(report.endpoints.iter().all(|e| e.host_port != 443));
    assert!(report.endpoints.iter().any(|e| e.host_port == 8085));
    let config: Value =
        toml::from_str(&text.replace(":8085/.well-known/est", "/.well-known/est")).unwrap();
    let url = &est_urls(&config)[0].1;
    let port = url.parse::<http::Uri>().unwrap().port_u16().unwrap_or(443);
    assert!(report.endpoints.iter().all(|e| e.host_port != port));
}
