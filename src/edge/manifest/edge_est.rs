//! edge-est modules: their desired properties through the module's own validator, then what the container needs.

use super::*;

impl Checker {
    /// An edge-est module's desired properties through the module's own validator.
    pub(super) fn edge_est_desired(
        &mut self,
        content: &Map<String, Value>,
        base: &str,
        name: &str,
        parent: Option<&str>,
    ) -> Option<Config> {
        let desired_path = format!("{base}.{name}.properties.desired");
        let Ok(desired) = desired_of(content, name) else {
            self.err(
                format!("{base}.{name}"),
                "edge-est takes its whole configuration from these desired properties: without \
                 them it waits for a configuration and never opens its EST port",
            );
            return None;
        };
        match module_config(
            &Value::Object(desired.clone()),
            &ModuleDefaults::placeholder(parent),
        ) {
            Ok(config) => Some(config),
            Err(e) => {
                let (field, reason) = match e {
                    ConfigError::Invalid { field, reason } => (field, reason),
                    other => (String::new(), other.to_string()),
                };
                let path = if field.is_empty() || field == "desired properties" {
                    desired_path
                } else {
                    format!("{desired_path}.{field}")
                };
                let hint = if parent.is_none() && reason.contains("no upstream named \"parent\"") {
                    " (the default upstream `parent` exists on nested devices only: pull images \
                         through $upstream, or say --parent-hostname)"
                } else {
                    ""
                };
                // A layer that sets parts of the document may name what the base defines.
                let elsewhere = [
                    "no issuer named",
                    "no upstream named",
                    "no trust set named",
                    "at least one label",
                ];
                if self.partial.contains(name) && elsewhere.iter().any(|e| reason.contains(e)) {
                    self.warn(
                        path,
                        format!("{reason}{hint}, unless the base deployment or another layer defines it (this layer sets parts of the desired properties only)"),
                    );
                } else {
                    self.err(path, format!("{reason}{hint}"));
                }
                None
            }
        }
    }

    pub(super) fn edge_est(
        &mut self,
        content: &Map<String, Value>,
        base: &str,
        module: &ModuleInfo,
        parent: Option<&str>,
        endpoints: &mut Vec<Endpoint>,
    ) -> Option<Config> {
        let desired_path = format!("{base}.{}.properties.desired", module.name);
        let config = self.edge_est_desired(content, base, &module.name, parent)?;

        // What the container needs: its data directory and every file on a volume.
        let data_dir = PathBuf::from(
            module
                .env
                .get("EDGE_EST_DATA_DIR")
                .map_or(DEFAULT_DATA_DIR, String::as_str),
        );
        if module.mount_of(&data_dir).is_none() {
            self.err(
                module.create_path(),
                format!(
                    "no volume on {}: edge-est keeps its journal and last-known-good configuration \
                     there, and edgeAgent re-creates the container on every image or createOptions \
                     change; mount a named volume (HostConfig.Binds [\"edge-est-data:{}\"])",
                    data_dir.display(),
                    data_dir.display()
                ),
            );
        }
        let placeholder_keys = placeholder_keys();
        for (field, file) in files_of(&config) {
            let absolute = data_dir.join(&file);
            if field.ends_with(".key") && !placeholder_keys.contains(&file) {
                if let Some((mount, _)) = module.mount_of(&absolute).filter(|(m, _)| !m.read_only) {
                    self.warn(
                        format!("{desired_path}.{field}"),
                        format!(
                            "the private key {} is on a read-write mount ({} on {}): edge-est \
                             only reads it; mount its directory read-only (\":ro\" in Binds, \
                             \"ReadOnly\": true in Mounts)",
                            absolute.display(),
                            mount.source,
                            mount.target.display()
                        ),
                    );
                }
            }
            if absolute.starts_with(&data_dir) {
                continue;
            }
            if module.mount_of(&absolute).is_none() {
                let dir = absolute
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .display()
                    .to_string();
                self.err(
                    format!("{desired_path}.{field}"),
                    format!(
                        "{} is on no volume of the container (the image holds nothing but the \
                         binary): mount its directory read-only, HostConfig.Binds [\"{dir}:{dir}:ro\"]",
                        absolute.display()
                    ),
                );
            }
        }
        if let Some(socket) = &config.proxy_socket {
            if module.mount_of(socket).is_none() {
                self.err(
                    format!("{desired_path}.proxy_socket"),
                    format!(
                        "{} is on no volume: the API proxy can only reach it through a volume \
                         both containers mount (HostConfig.Binds [\"edge-est-proxy:{}\"])",
                        socket.display(),
                        socket.parent().unwrap_or(Path::new("/")).display()
                    ),
                );
            }
        }

        for (user, hash) in &config.users {
            if is_example_password(hash) {
                self.warn(
                    format!("{desired_path}.users.{user}"),
                    format!(
                        "the hash of `{EXAMPLE_PASSWORD}`, the example password of the README and \
                         deployment/: anyone who read them can enroll; make your own with \
                         `edge-est hash-password`"
                    ),
                );
            }
        }

        // Published ports must be ports edge-est listens on.
        let listen = config.listen.port();
        let metrics = config.metrics_listen.map(|m| m.port());
        let labels: Vec<Option<String>> = config.labels.iter().map(|l| l.name.clone()).collect();
        for binding in &module.bindings {
            let field = format!(
                "{}.HostConfig.PortBindings.{}/{}",
                module.create_path(),
                binding.container_port,
                binding.protocol
            );
            if binding.container_port == listen && binding.protocol == "tcp" {
                if config.listen.ip().is_loopback() {
                    self.err(
                        format!("{desired_path}.listen"),
                        format!(
                            "{} is loopback inside the container: the published port reaches nothing",
                            config.listen
                        ),
                    );
                }
                endpoints.push(Endpoint {
                    host_port: binding.host_port,
                    module: module.name.clone(),
                    via: Via::Direct,
                    labels: labels.clone(),
                });
            } else if Some(binding.container_port) != metrics || binding.protocol != "tcp" {
                self.err(
                    field,
                    format!(
                        "edge-est listens on {listen}/tcp (EST){}; nothing answers on {}/{}",
                        metrics
                            .map(|m| format!(" and {m}/tcp (metrics)"))
                            .unwrap_or_default(),
                        binding.container_port,
                        binding.protocol
                    ),
                );
            }
        }
        Some(config)
    }
}

/// The password the README and the files of `deployment/` use as an example.
pub const EXAMPLE_PASSWORD: &str = "change-me";

/// Whether an argon2 hash is that of [`EXAMPLE_PASSWORD`].
fn is_example_password(hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2::Argon2::default()
            .verify_password(EXAMPLE_PASSWORD.as_bytes(), &parsed)
            .is_ok()
    })
}

/// The key files the module writes itself (workload certificates), as the placeholder
/// defaults name them: not the operator's to mount.
fn placeholder_keys() -> Vec<PathBuf> {
    let defaults = ModuleDefaults::placeholder(Some(PLACEHOLDER_PARENT));
    let mut keys: Vec<PathBuf> = defaults.tls.map(|t| t.key).into_iter().collect();
    keys.extend(defaults.identity.map(|(_, key)| key));
    keys
}

/// Every file path a configuration names (not inline PEM), with its field.
fn files_of(config: &Config) -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    // A token key is no file: what the container must see of it is its PIN file (the
    // PKCS#11 library itself is in the image that loads it).
    let key = |field: String, path: &Path, files: &mut Vec<_>| {
        let text = path.to_string_lossy();
        if !crate::keys::is_pkcs11(&text) {
            files.push((field, path.to_owned()));
        } else if let Ok(uri) = crate::keys::Pkcs11Uri::parse(&text) {
            if let Some(crate::keys::uri::PinSource::File(pin)) = uri.pin {
                files.push((format!("{field} (pin-source)"), pin));
            }
        }
    };
    let pem = |field: String, source: &crate::config::PemSource, files: &mut Vec<_>| {
        if !source.is_inline() {
            files.push((field, PathBuf::from(&source.0)));
        }
    };
    if let Some(tls) = &config.tls {
        pem("tls.certificate".into(), &tls.certificate, &mut files);
        key("tls.key".into(), &tls.key, &mut files);
    }
    for (name, set) in &config.trust {
        for (i, source) in set.certificates.iter().enumerate() {
            pem(
                format!("trust.{name}.certificates[{i}]"),
                source,
                &mut files,
            );
        }
    }
    for (name, issuer) in &config.issuers {
        pem(
            format!("issuers.{name}.certificate"),
            &issuer.certificate,
            &mut files,
        );
        key(format!("issuers.{name}.key"), &issuer.key, &mut files);
    }
    // An enrolled issuer's CA and key are kept next to the journal (checked below); the
    // container must see its root and, for a key generated in a token, the PIN file.
    for (name, enrolled) in &config.enrolled_issuers {
        pem(
            format!("enrolled_issuers.{name}.root"),
            &enrolled.root,
            &mut files,
        );
        if let Some(location) = &enrolled.key {
            key(
                format!("enrolled_issuers.{name}.key"),
                Path::new(location),
                &mut files,
            );
        }
    }
    for (name, upstream) in &config.upstreams {
        for (i, source) in upstream.trust.iter().enumerate() {
            pem(format!("upstreams.{name}.trust[{i}]"), source, &mut files);
        }
        if let Some(certificate) = &upstream.certificate {
            pem(
                format!("upstreams.{name}.certificate"),
                certificate,
                &mut files,
            );
        }
        if let Some(path) = &upstream.key {
            key(format!("upstreams.{name}.key"), path, &mut files);
        }
        if let Some(password) = &upstream.password_file {
            files.push((format!("upstreams.{name}.password_file"), password.clone()));
        }
    }
    files.push(("journal".into(), config.journal.clone()));
    files
}
