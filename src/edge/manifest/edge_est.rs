//! edge-est modules: their desired properties through the module's own validator, then what the container needs.

use super::*;

impl Checker {
    pub(super) fn edge_est(
        &mut self,
        content: &Map<String, Value>,
        base: &str,
        module: &ModuleInfo,
        parent: Option<&str>,
        endpoints: &mut Vec<Endpoint>,
    ) -> Option<Config> {
        let desired_path = format!("{base}.{}.properties.desired", module.name);
        let Ok(desired) = desired_of(content, &module.name) else {
            self.err(
                format!("{base}.{}", module.name),
                "edge-est takes its whole configuration from these desired properties: without \
                 them it waits for a configuration and never opens its EST port",
            );
            return None;
        };
        let config = match module_config(
            &Value::Object(desired.clone()),
            &ModuleDefaults::placeholder(parent),
        ) {
            Ok(config) => config,
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
                self.err(path, format!("{reason}{hint}"));
                return None;
            }
        };

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
        for (field, file) in files_of(&config) {
            let absolute = data_dir.join(&file);
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

/// Every file path a configuration names (not inline PEM), with its field.
fn files_of(config: &Config) -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    let pem = |field: String, source: &crate::config::PemSource, files: &mut Vec<_>| {
        if !source.is_inline() {
            files.push((field, PathBuf::from(&source.0)));
        }
    };
    if let Some(tls) = &config.tls {
        pem("tls.certificate".into(), &tls.certificate, &mut files);
        files.push(("tls.key".into(), tls.key.clone()));
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
        files.push((format!("issuers.{name}.key"), issuer.key.clone()));
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
        if let Some(key) = &upstream.key {
            files.push((format!("upstreams.{name}.key"), key.clone()));
        }
        if let Some(password) = &upstream.password_file {
            files.push((format!("upstreams.{name}.password_file"), password.clone()));
        }
    }
    files.push(("journal".into(), config.journal.clone()));
    files
}
