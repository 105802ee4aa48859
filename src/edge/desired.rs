//! The module twin's desired properties as configuration. The desired properties (less
//! `$version` and the other `$` keys) ARE the configuration document, in the same schema as a
//! configuration file (`config::Config`, as JSON). The module fills in what the twin leaves
//! out: [`module_config`] is the one function that does it, used by the module on every twin
//! change and by anything that checks a deployment manifest ahead of time.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::config::{Config, ConfigError, PemSource, TlsConfig, TrustConfig, UpstreamConfig};

/// Name of the default client trust set holding the workload API's trust bundle.
pub const TRUST_BUNDLE_SET: &str = "edge-trust-bundle";
/// Name of the default upstream (the parent gateway's edge-est).
pub const PARENT_UPSTREAM: &str = "parent";
/// The module listens on all interfaces of its container unless the twin says otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8085";
/// The port of the parent's edge-est that the default upstream uses.
pub const DEFAULT_PARENT_PORT: u16 = 8085;

/// What the module supplies when the twin leaves it out.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleDefaults {
    pub listen: SocketAddr,
    /// The Prometheus metrics listener (IoT Edge's convention: `0.0.0.0:9600`).
    pub metrics_listen: Option<SocketAddr>,
    /// The audit journal (on the data volume).
    pub journal: PathBuf,
    /// The TLS server certificate from the workload API (CN = the gateway host name).
    pub tls: Option<TlsConfig>,
    /// The workload API's trust bundle: the default client trust set
    /// [`TRUST_BUNDLE_SET`], and the anchors of the default parent upstream.
    pub trust_bundle: Option<PemSource>,
    /// `IOTEDGE_PARENTHOSTNAME`: with it, an upstream [`PARENT_UPSTREAM`] is defined at
    /// `https://<parent>:<parent_port>/.well-known/est` unless the twin defines one.
    pub parent_hostname: Option<String>,
    /// The parent's EST port for that default upstream ([`DEFAULT_PARENT_PORT`] unless
    /// `EDGE_EST_PARENT_PORT` says otherwise): independent of our own `listen`, so that one
    /// layer can move its listener without breaking the layer below.
    pub parent_port: u16,
    /// The module's workload identity certificate and key path: the default RA credential
    /// towards the parent.
    pub identity: Option<(PemSource, PathBuf)>,
}

impl ModuleDefaults {
    /// Defaults with placeholder files, for checking a desired document on a machine that has
    /// none of the gateway's files (nothing is read by `Config::validate`).
    pub fn placeholder(parent_hostname: Option<&str>) -> ModuleDefaults {
        ModuleDefaults {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            metrics_listen: Some(crate::metrics::MODULE_DEFAULT_LISTEN),
            journal: PathBuf::from("journal.jsonl"),
            tls: Some(TlsConfig {
                certificate: PemSource("workload/server.pem".into()),
                key: PathBuf::from("workload/server.key"),
            }),
            trust_bundle: Some(PemSource("workload/trust-bundle.pem".into())),
            parent_hostname: parent_hostname.map(str::to_owned),
            parent_port: DEFAULT_PARENT_PORT,
            identity: Some((
                PemSource("workload/identity.pem".into()),
                PathBuf::from("workload/identity.key"),
            )),
        }
    }
}

/// The configuration of the module for a desired-properties document: `$` keys dropped,
/// secrets refused, module defaults filled in, the whole validated (without reading files).
pub fn module_config(desired: &Value, defaults: &ModuleDefaults) -> Result<Config, ConfigError> {
    let Value::Object(desired) = desired else {
        return Err(ConfigError::invalid(
            "desired properties",
            "must be a JSON object",
        ));
    };
    let mut doc = strip_metadata(desired);
    check_twin_secrets(&Value::Object(doc.clone()), "")?;

    let listen: SocketAddr = match doc.get("listen") {
        None | Some(Value::Null) => defaults.listen,
        Some(Value::String(text)) => text.parse().map_err(|e| {
            ConfigError::invalid("listen", format!("{text:?} is not an address: {e}"))
        })?,
        Some(_) => return Err(ConfigError::invalid("listen", "must be a string")),
    };
    doc.insert("listen".into(), Value::String(listen.to_string()));
    if is_absent(&doc, "metrics_listen") {
        if let Some(metrics) = defaults.metrics_listen {
            doc.insert("metrics_listen".into(), Value::String(metrics.to_string()));
        }
    }
    if is_absent(&doc, "journal") {
        doc.insert("journal".into(), to_value(&defaults.journal)?);
    }
    if is_absent(&doc, "tls") {
        if let Some(tls) = &defaults.tls {
            doc.insert("tls".into(), to_value(tls)?);
        }
    }
    if let Some(bundle) = &defaults.trust_bundle {
        let trust = object_entry(&mut doc, "trust")?;
        if !trust.contains_key(TRUST_BUNDLE_SET) {
            let set = TrustConfig {
                certificates: vec![bundle.clone()],
                depth: Default::default(),
            };
            trust.insert(TRUST_BUNDLE_SET.into(), to_value(&set)?);
        }
    }
    if let (Some(parent), Some(bundle)) = (&defaults.parent_hostname, &defaults.trust_bundle) {
        let upstreams = object_entry(&mut doc, "upstreams")?;
        if !upstreams.contains_key(PARENT_UPSTREAM) {
            let upstream = parent_upstream(
                parent,
                defaults.parent_port,
                bundle,
                defaults.identity.as_ref(),
            );
            upstreams.insert(PARENT_UPSTREAM.into(), to_value(&upstream)?);
        }
    }
    // The error names the field it is about (`labels[0].rules[0]`), not the whole document.
    let config: Config = serde_path_to_error::deserialize(Value::Object(doc)).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "desired properties".to_owned()
        } else {
            path
        };
        ConfigError::invalid(field, e.into_inner().to_string())
    })?;
    config.validate()?;
    Ok(config)
}

/// The default upstream: the parent's edge-est on `port`, trusted by the
/// trust bundle (the hierarchy's root), authenticated by our workload identity certificate.
pub fn parent_upstream(
    parent: &str,
    port: u16,
    trust_bundle: &PemSource,
    identity: Option<&(PemSource, PathBuf)>,
) -> UpstreamConfig {
    let host = match parent.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => parent.to_owned(),
    };
    let defaults: UpstreamConfig = serde_json::from_value(serde_json::json!({
        "url": format!("https://{host}:{port}/.well-known/est"),
        "trust": [trust_bundle],
    }))
    .expect("an upstream with url and trust deserializes");
    UpstreamConfig {
        certificate: identity.map(|(certificate, _)| certificate.clone()),
        key: identity.map(|(_, key)| key.clone()),
        ..defaults
    }
}

/// The desired document without `$version`, `$metadata` and other `$` keys of the twin.
pub fn strip_metadata(desired: &Map<String, Value>) -> Map<String, Value> {
    desired
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The twin's `$version` of a desired document or patch.
pub fn version(desired: &Value) -> Option<i64> {
    desired.get("$version").and_then(Value::as_i64)
}

/// RFC 7386 JSON merge patch, as IoT Hub applies desired patches: objects merge, `null`
/// deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Field names that only ever hold secrets, refused wherever they appear.
const SECRET_FIELDS: [&str; 8] = [
    "password",
    "passwd",
    "passphrase",
    "secret",
    "private_key",
    "privatekey",
    "shared_access_key",
    "sharedaccesskey",
];

/// Whether a field name is one of [`SECRET_FIELDS`], whatever its case and its `_`/`-`
/// separators (`Password`, `private-key`, `SharedAccessKey`, `shared_access_key`).
fn is_secret_field(key: &str) -> bool {
    let bare: String = key
        .chars()
        .filter(|c| !matches!(c, '_' | '-'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    SECRET_FIELDS.iter().any(|f| f.replace('_', "") == bare)
}

/// Top-level sections whose keys are names chosen by the user.
const NAMED_MAPS: [&str; 6] = [
    "users",
    "trust",
    "issuers",
    "enrolled_issuers",
    "upstreams",
    "profiles",
];

/// The twin is readable by anyone with read access to the IoT hub: private keys, plaintext
/// passwords and shared access keys never travel in it. Names the offending field.
pub fn check_twin_secrets(value: &Value, path: &str) -> Result<(), ConfigError> {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                let field = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                // Keys of the named maps are names (a user may be called anything).
                let is_name = NAMED_MAPS.contains(&path);
                if !is_name && is_secret_field(key) && !value.is_null() {
                    return Err(ConfigError::invalid(
                        field,
                        "secrets never travel in the module twin: give passwords as argon2 \
                         hashes (`users`) or files (`password_file`), keys as file paths",
                    ));
                }
                check_twin_secrets(value, &field)?;
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_twin_secrets(item, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        Value::String(text) => {
            // Case-insensitive: IoT Hub's own parsers take `sharedaccesskey=` as well.
            let text = text.to_ascii_lowercase();
            if text.contains("private key-----") {
                return Err(ConfigError::invalid(
                    path,
                    "contains a private key; private keys are given as file paths only",
                ));
            }
            if text.contains("pin-value") {
                // The PIN of a PKCS#11 token (a `pkcs11:` key URI's `pin-value`); the message
                // must not repeat it.
                return Err(ConfigError::invalid(
                    path,
                    "holds a PKCS#11 PIN (pin-value); the twin is no place for it: use \
                     pin-source=file:<path> with the PIN in a file on a mounted volume",
                ));
            }
            if text.contains("sharedaccesskey=") || text.contains("sharedaccesssignature ") {
                return Err(ConfigError::invalid(
                    path,
                    "contains a shared access key or token; the module authenticates with the \
                     workload API",
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn is_absent(doc: &Map<String, Value>, key: &str) -> bool {
    doc.get(key).is_none_or(Value::is_null)
}

fn object_entry<'a>(
    doc: &'a mut Map<String, Value>,
    key: &str,
) -> Result<&'a mut Map<String, Value>, ConfigError> {
    let entry = doc
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if entry.is_null() {
        *entry = Value::Object(Map::new());
    }
    entry
        .as_object_mut()
        .ok_or_else(|| ConfigError::invalid(key, "must be an object"))
}

fn to_value(value: &impl serde::Serialize) -> Result<Value, ConfigError> {
    serde_json::to_value(value).map_err(|e| ConfigError::invalid("defaults", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use serde_json::json;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0m3bpUXMYeFt1pY2vH8bZrSNxwkmC3JvgDkKY7mr8Gw";

    fn desired() -> Value {
        json!({
            "$version": 4,
            "users": { "estuser": HASH },
            "issuers": { "plant": { "certificate": "/etc/edge-est/issuing-ca.pem", "key": "/etc/edge-est/issuing-ca.key" } },
            "labels": [
                { "issuer": "plant", "client_trust": ["issuer"],
                  "rules": [ { "match": ["user:estuser"], "common_names": ["plant1-*"] } ] },
                { "name": "up", "mode": "forward", "upstream": "parent", "client_trust": ["edge-trust-bundle"],
                  "rules": [ { "match": ["certificate:edge-trust-bundle"], "common_names": ["{cn}"] } ] }
            ]
        })
    }

    #[test]
    fn defaults_fill_what_the_twin_leaves_out() {
        let defaults = ModuleDefaults::placeholder(Some("parent.contoso.local"));
        let config = module_config(&desired(), &defaults).unwrap();
        assert_eq!(config.listen, "0.0.0.0:8085".parse().unwrap());
        assert_eq!(config.journal, PathBuf::from("journal.jsonl"));
        assert_eq!(config.metrics_listen, Some("0.0.0.0:9600".parse().unwrap()));
        assert_eq!(config.tls, defaults.tls);
        assert_eq!(
            config.trust[TRUST_BUNDLE_SET].certificates,
            vec![PemSource("workload/trust-bundle.pem".into())]
        );
        let parent = &config.upstreams[PARENT_UPSTREAM];
        assert_eq!(
            parent.url,
            "https://parent.contoso.local:8085/.well-known/est"
        );
        assert_eq!(
            parent.trust,
            vec![PemSource("workload/trust-bundle.pem".into())]
        );
        assert_eq!(
            parent.certificate,
            Some(PemSource("workload/identity.pem".into()))
        );
        assert_eq!(parent.key, Some(PathBuf::from("workload/identity.key")));
        assert_eq!(config.labels[1].mode, Mode::Forward);
    }

    #[test]
    fn an_unknown_field_is_reported_where_it_is() {
        let mut doc = desired();
        doc["labels"][0]["rules"][0]["colour"] = json!("red");
        let err = module_config(&doc, &ModuleDefaults::placeholder(None)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("labels[0].rules[0].colour: unknown field `colour`"),
            "{text}"
        );
    }

    #[test]
    fn the_twin_overrides_defaults_and_the_parent_port_is_not_ours() {
        let mut doc = desired();
        doc["listen"] = json!("0.0.0.0:9443");
        doc["tls"] =
            json!({ "certificate": "/etc/edge-est/server.pem", "key": "/etc/edge-est/server.key" });
        let config = module_config(&doc, &ModuleDefaults::placeholder(Some("fd00::1"))).unwrap();
        assert_eq!(
            config.tls.unwrap().key,
            PathBuf::from("/etc/edge-est/server.key")
        );
        assert_eq!(
            config.upstreams[PARENT_UPSTREAM].url, "https://[fd00::1]:8085/.well-known/est",
            "moving our listener does not move the parent's"
        );
        let mut defaults = ModuleDefaults::placeholder(Some("fd00::1"));
        defaults.parent_port = 443;
        let config = module_config(&doc, &defaults).unwrap();
        assert_eq!(
            config.upstreams[PARENT_UPSTREAM].url,
            "https://[fd00::1]:443/.well-known/est"
        );

        doc["upstreams"] = json!({ "parent": { "url": "https://ca.contoso.local/.well-known/est", "trust": ["/etc/edge-est/root.pem"] } });
        let config = module_config(&doc, &ModuleDefaults::placeholder(Some("p"))).unwrap();
        assert_eq!(
            config.upstreams[PARENT_UPSTREAM].url,
            "https://ca.contoso.local/.well-known/est"
        );
        assert_eq!(config.upstreams[PARENT_UPSTREAM].certificate, None);
    }

    #[test]
    fn without_a_parent_a_label_forwarding_to_parent_is_refused() {
        let err = module_config(&desired(), &ModuleDefaults::placeholder(None)).unwrap_err();
        assert!(
            err.to_string().contains("no upstream named \"parent\""),
            "{err}"
        );
    }

    #[test]
    fn secrets_are_refused_with_their_field() {
        let defaults = ModuleDefaults::placeholder(Some("p"));
        let mut doc = desired();
        doc["upstreams"] = json!({ "top": { "url": "https://x/.well-known/est", "trust": ["r.pem"], "username": "u", "password": "hunter2" } });
        let err = module_config(&doc, &defaults).unwrap_err().to_string();
        assert!(err.starts_with("upstreams.top.password:"), "{err}");

        let mut doc = desired();
        doc["users"]["bob"] = json!("hunter2");
        let err = module_config(&doc, &defaults).unwrap_err().to_string();
        assert!(err.contains("users.bob") && err.contains("argon2"), "{err}");

        let mut doc = desired();
        doc["tls"] = json!({ "certificate": "-----BEGIN CERTIFICATE-----\n", "key": "-----BEGIN EC PRIVATE KEY-----\nMHcC\n-----END EC PRIVATE KEY-----\n" });
        let err = module_config(&doc, &defaults).unwrap_err().to_string();
        assert!(
            err.starts_with("tls.key:") && err.contains("private key"),
            "{err}"
        );
    }

    #[test]
    fn shared_access_keys_are_refused_whatever_their_case() {
        let defaults = ModuleDefaults::placeholder(Some("p"));
        for text in [
            "HostName=h.azure-devices.net;DeviceId=d;SharedAccessKey=c2VjcmV0",
            "hostname=h;deviceid=d;sharedaccesskey=c2VjcmV0",
            "HostName=h;SHAREDACCESSKEY=c2VjcmV0",
            "SharedAccessSignature sr=h%2Fdevices%2Fd&sig=c2VjcmV0&se=1",
            "sharedaccesssignature sr=h&sig=c2VjcmV0",
        ] {
            let mut doc = desired();
            doc["issuers"]["plant"]["key"] = json!(text);
            let err = module_config(&doc, &defaults).unwrap_err().to_string();
            assert!(
                err.starts_with("issuers.plant.key:") && err.contains("shared access"),
                "{text}: {err}"
            );
            assert!(!err.contains("c2VjcmV0"), "{err}");
        }
        for text in [
            "-----BEGIN EC PRIVATE KEY-----\nMHcC\n",
            "-----begin private key-----\nMHcC\n",
        ] {
            let mut doc = desired();
            doc["labels"][0]["rules"][0]["common_names"] = json!([text]);
            let err = module_config(&doc, &defaults).unwrap_err().to_string();
            assert!(err.contains("private key"), "{text}: {err}");
            assert!(!err.contains("MHcC"), "{err}");
        }
        // Field names, whatever their case and separators.
        for field in [
            "Password",
            "PRIVATE-KEY",
            "SharedAccessKey",
            "shared-access-key",
        ] {
            let mut doc = desired();
            doc["issuers"]["plant"][field] = json!("x");
            let err = module_config(&doc, &defaults).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("issuers.plant.{field}:"))
                    && err.contains("secrets never travel"),
                "{field}: {err}"
            );
        }
        // Positive control: words that merely resemble them pass.
        let mut doc = desired();
        doc["labels"][0]["rules"][0]["common_names"] = json!(["SharedAccess-*", "key-*"]);
        doc["issuers"]["plant"]["key"] = json!("/etc/edge-est/shared-access-key-holder.pem");
        module_config(&doc, &defaults).unwrap();
    }

    /// A secret pasted into a path field: the twin's configuration validates (it is a string
    /// where a string belongs), and loading it, as the module does, fails naming the field and
    /// never echoing the secret (the rejection text becomes `lastRejection`).
    #[test]
    fn a_secret_in_a_path_field_is_named_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&server_key)
            .unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = crate::pki::ca_params("plant", Some(1), ::time::Duration::days(30))
            .self_signed(&ca_key)
            .unwrap();
        write("server.pem", &server.pem());
        write("server.key", &server_key.serialize_pem());
        write("ca.pem", &ca.pem());
        write("ca.key", &ca_key.serialize_pem());
        write("workload/trust-bundle.pem", &ca.pem());
        write("pw", "gw-password\n");
        let defaults = ModuleDefaults::placeholder(Some("p"));
        let doc = || {
            let mut doc = desired();
            doc["tls"] = json!({ "certificate": "server.pem", "key": "server.key" });
            doc["issuers"]["plant"] = json!({ "certificate": "ca.pem", "key": "ca.key" });
            doc["upstreams"] = json!({ "parent": { "url": "https://p/.well-known/est",
                "trust": ["ca.pem"], "username": "gw", "password_file": "pw" } });
            doc
        };
        let load = |doc: &Value| {
            let config = module_config(doc, &defaults).unwrap();
            crate::runtime::Runtime::build(&config, dir.path())
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(load(&doc()), None, "the positive control loads");

        let key = "MHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5UChr4ggLjQQboAoGCCqGSM49/AwEHoUQDQgAE";
        let password = "Tr0ub4dor&3-correct-horse";
        let cases: [(&str, &[&str], &str); 6] = [
            ("issuers.plant.key", &["issuers", "plant", "key"], key),
            (
                "issuers.plant.certificate",
                &["issuers", "plant", "certificate"],
                key,
            ),
            ("tls.key", &["tls", "key"], password),
            ("tls.certificate", &["tls", "certificate"], password),
            (
                "upstreams.parent.password_file",
                &["upstreams", "parent", "password_file"],
                password,
            ),
            (
                "upstreams.parent.trust[0]",
                &["upstreams", "parent", "trust", "0"],
                key,
            ),
        ];
        for (field, at, value) in cases {
            let mut doc = doc();
            let mut slot = &mut doc;
            for step in at {
                slot = match step.parse::<usize>() {
                    Ok(i) => &mut slot[i],
                    Err(_) => &mut slot[*step],
                };
            }
            *slot = json!(value);
            let err = load(&doc).expect("the secret names no file");
            assert!(
                err.starts_with(&format!("{field}: cannot read ")),
                "{field}: {err}"
            );
            assert!(err.contains("not shown"), "{err}");
            for window in value.as_bytes().windows(5) {
                let window = std::str::from_utf8(window).unwrap();
                assert!(!err.contains(window), "{field}: {err:?} echoes {window:?}");
            }
        }

        // Positive controls: a path that names an existing file or directory is shown whole;
        // a missing one shows the directory that exists.
        let mut doc = doc();
        doc["issuers"]["plant"]["key"] = json!("workload");
        let err = load(&doc).unwrap();
        let shown = dir.path().join("workload").display().to_string();
        assert!(
            err.starts_with(&format!("issuers.plant.key: cannot read {shown}: ")),
            "{err}"
        );
        doc["issuers"]["plant"]["key"] = json!("workload/missing.key");
        let err = load(&doc).unwrap();
        assert!(
            err.starts_with(&format!(
                "issuers.plant.key: cannot read {shown}/... (a value of 20 characters, not shown"
            )),
            "{err}"
        );
    }

    #[test]
    fn a_token_pin_is_refused_in_the_twin_and_never_repeated() {
        let defaults = ModuleDefaults::placeholder(Some("p"));
        for uri in [
            "pkcs11:token=plant;object=ca?pin-value=7731-secret",
            "pkcs11:token=plant;object=ca?module-path=/m.so&PIN-VALUE=7731-secret",
        ] {
            let mut doc = desired();
            doc["issuers"]["plant"]["key"] = json!(uri);
            let err = module_config(&doc, &defaults).unwrap_err().to_string();
            assert!(
                err.starts_with("issuers.plant.key:") && err.contains("pin-source=file:"),
                "{err}"
            );
            assert!(!err.contains("7731-secret"), "the PIN shows: {err}");
        }
        // Positive control: the same key with its PIN in a file on a mounted volume passes.
        let mut doc = desired();
        doc["issuers"]["plant"]["key"] =
            json!("pkcs11:token=plant;object=ca?pin-source=file:/run/secrets/hsm-pin");
        module_config(&doc, &defaults).unwrap();
    }

    /// An enrolled issuer in the twin is validated as in the TOML configuration: accepted with
    /// the parent upstream, a root file and no key or a token location whose PIN is in a
    /// file; refused, naming the field and the reason, for an upstream that does not exist, a
    /// key file, a PIN in the URI (never repeated) and a missing root.
    #[test]
    fn enrolled_issuers_in_the_twin_are_validated_like_the_configuration() {
        let defaults = ModuleDefaults::placeholder(Some("gw-top"));
        let with = |enrolled: Value| {
            let mut doc = desired();
            doc["enrolled_issuers"] = json!({ "mid": enrolled });
            doc["labels"][0]["issuer"] = json!("mid");
            module_config(&doc, &defaults).map_err(|e| e.to_string())
        };
        let good = json!({ "enroll": "parent", "common_name": "L3 issuing CA gw-mid",
            "root": "/etc/edge-est/root.pem" });
        let config = with(good.clone()).unwrap();
        assert_eq!(config.enrolled_issuers["mid"].enroll, "parent");
        let mut token = good.clone();
        token["key"] = json!("pkcs11:token=plant;object=mid-ca?module-path=/usr/lib/p11.so&pin-source=file:/run/secrets/hsm-pin");
        with(token).unwrap();
        // A name that is a secret field's name is a name, not a secret.
        let mut doc = desired();
        doc["enrolled_issuers"] = json!({ "password": good.clone() });
        doc["labels"][0]["issuer"] = json!("password");
        module_config(&doc, &defaults).unwrap();

        let mut nowhere = good.clone();
        nowhere["enroll"] = json!("nowhere");
        let e = with(nowhere).unwrap_err();
        assert!(
            e.starts_with("enrolled_issuers.mid.enroll:")
                && e.contains("no upstream named \"nowhere\""),
            "{e}"
        );
        let mut file_key = good.clone();
        file_key["key"] = json!("/etc/edge-est/mid-ca.key");
        let e = with(file_key).unwrap_err();
        assert!(
            e.starts_with("enrolled_issuers.mid.key:")
                && e.contains("only a pkcs11: token location"),
            "{e}"
        );
        let mut pin = good.clone();
        pin["key"] =
            json!("pkcs11:token=plant;object=mid-ca?module-path=/p.so&pin-value=4417-secret");
        let e = with(pin).unwrap_err();
        assert!(
            e.starts_with("enrolled_issuers.mid.key:") && e.contains("pin-source=file:"),
            "{e}"
        );
        assert!(!e.contains("4417-secret"), "the PIN shows: {e}");
        let mut no_root = good;
        no_root.as_object_mut().unwrap().remove("root");
        let e = with(no_root).unwrap_err();
        assert!(
            e.starts_with("enrolled_issuers.mid:") && e.contains("root"),
            "{e}"
        );
    }

    #[test]
    fn secrets_inside_arrays_are_refused_too() {
        let defaults = ModuleDefaults::placeholder(Some("p"));
        // A key pasted among a trust set's certificates, and a shared access key in a rule.
        let mut doc = desired();
        doc["trust"] = json!({ "bootstrap": { "certificates": [
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n" ] } });
        let err = module_config(&doc, &defaults).unwrap_err().to_string();
        assert!(
            err.starts_with("trust.bootstrap.certificates[1]:") && err.contains("private key"),
            "{err}"
        );
        let mut doc = desired();
        doc["labels"][0]["rules"][0]["common_names"] =
            json!(["plant1-*", "HostName=h;SharedAccessKey=c2VjcmV0"]);
        let err = module_config(&doc, &defaults).unwrap_err().to_string();
        assert!(
            err.starts_with("labels[0].rules[0].common_names[1]:")
                && err.contains("shared access key"),
            "{err}"
        );
        assert!(!err.contains("c2VjcmV0"), "the key is repeated: {err}");
    }

    #[test]
    fn invalid_documents_are_refused_whole() {
        // With a parent, so that `upstream = "parent"` of desired() exists: without one the
        // document is refused anyway, and every case below would pass whatever it checked.
        let defaults = ModuleDefaults::placeholder(Some("parent.contoso.local"));
        // Control: the document itself, and with a changed listen address, is accepted.
        let mut changed = desired();
        changed["listen"] = json!("0.0.0.0:9085");
        let config = module_config(&changed, &defaults).expect("the control is accepted");
        assert_eq!(config.listen, "0.0.0.0:9085".parse().unwrap());
        // The same document with one mistake each: refused, naming the field, and nothing of
        // it comes back (the result is an error, not a partial configuration).
        type Case = (&'static str, fn(&mut Value), &'static [&'static str]);
        let cases: [Case; 5] = [
            (
                "no labels",
                |d| {
                    d.as_object_mut().unwrap().remove("labels");
                },
                &["labels"],
            ),
            (
                "an issuer that does not exist",
                |d| d["labels"][0]["issuer"] = json!("nope"),
                &["labels[0].issuer", "no issuer named \"nope\""],
            ),
            ("an unknown field", |d| d["labelz"] = json!([]), &["labelz"]),
            (
                "a listen address that is not one",
                |d| d["listen"] = json!("nowhere"),
                &["listen", "\"nowhere\" is not an address"],
            ),
            (
                "a rule naming a trust set the label lacks",
                |d| d["labels"][0]["rules"][0]["match"] = json!(["certificate:factory"]),
                &["labels[0].rules", "rules[0].match", "factory"],
            ),
        ];
        for (what, spoil, says) in cases {
            let mut doc = changed.clone();
            spoil(&mut doc);
            let err = match module_config(&doc, &defaults) {
                Ok(config) => panic!("{what}: accepted: {config:?}"),
                Err(e) => e.to_string(),
            };
            for s in says {
                assert!(err.contains(s), "{what}: {err:?} lacks {s:?}");
            }
        }
        let err = module_config(&json!([1]), &defaults).unwrap_err();
        assert!(err.to_string().contains("must be a JSON object"), "{err}");
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2], "$version": 1});
        merge_patch(
            &mut doc,
            &json!({"a": {"b": null, "d": 3}, "l": [3], "n": {"x": null}, "$version": 2}),
        );
        assert_eq!(
            doc,
            json!({"a": {"c": 2, "d": 3}, "l": [3], "n": {}, "$version": 2})
        );
        assert_eq!(version(&doc), Some(2));
    }
}
