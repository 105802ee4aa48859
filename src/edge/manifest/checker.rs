//! The walk over a manifest: what it collects of each module, and the order of the checks.

use super::*;

/// A volume or bind mount of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Mount {
    /// A volume name, or a host path for binds.
    pub(super) source: String,
    pub(super) target: PathBuf,
    /// `:ro` in Binds, `"ReadOnly": true` in Mounts.
    pub(super) read_only: bool,
}

/// A published port: container port, protocol, host address and host port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Binding {
    pub(super) container_port: u16,
    pub(super) protocol: String,
    pub(super) host_ip: String,
    pub(super) host_port: u16,
}

/// What the checks need of one module of `$edgeAgent`.
#[derive(Clone, Debug, Default)]
pub(super) struct ModuleInfo {
    pub(super) name: String,
    /// JSON path of the module in `$edgeAgent`.
    pub(super) path: String,
    pub(super) image: Option<String>,
    pub(super) env: BTreeMap<String, String>,
    pub(super) mounts: Vec<Mount>,
    pub(super) bindings: Vec<Binding>,
}

impl ModuleInfo {
    pub(super) fn create_path(&self) -> String {
        format!("{}.settings.createOptions", self.path)
    }

    /// The mount a container path is on (the deepest one), and the rest of the path.
    pub(super) fn mount_of(&self, path: &Path) -> Option<(&Mount, PathBuf)> {
        self.mounts
            .iter()
            .filter(|m| path.starts_with(&m.target))
            .max_by_key(|m| m.target.components().count())
            .map(|m| {
                let rest = path.strip_prefix(&m.target).unwrap_or(path).to_path_buf();
                (m, rest)
            })
    }
}

#[derive(Default)]
pub(super) struct Checker {
    pub(super) errors: Vec<ManifestError>,
    pub(super) warnings: Vec<ManifestError>,
    /// A layered deployment: sections set parts of the twins (`properties.desired.<path>`),
    /// so what a base deployment must hold may be in the base instead.
    pub(super) layered: bool,
    /// Modules whose section in a layered deployment sets parts of the desired properties
    /// only (not the whole `properties.desired`).
    pub(super) partial: BTreeSet<String>,
}

impl Checker {
    pub(super) fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ManifestError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// A finding that does not stop the deployment but that an operator should see.
    pub(super) fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(ManifestError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub(super) fn run(&mut self, manifest: &Value, options: &CheckOptions) -> Report {
        let mut report = Report::default();
        let Some(root) = manifest.as_object() else {
            self.err("", "a deployment manifest is a JSON object");
            return report;
        };
        let (content, base) = match (root.get("modulesContent"), root.get("content")) {
            (Some(content), _) => (content, "modulesContent".to_owned()),
            (None, Some(Value::Object(c))) if c.contains_key("modulesContent") => {
                (&c["modulesContent"], "content.modulesContent".to_owned())
            }
            _ => {
                self.err(
                    "modulesContent",
                    "missing: a deployment manifest is {\"modulesContent\": {\"$edgeAgent\": …, \"$edgeHub\": …}}",
                );
                return report;
            }
        };
        let Some(content) = content.as_object() else {
            self.err(&base, "must be an object");
            return report;
        };
        // A base deployment gives $edgeAgent's whole `properties.desired`; a layered one sets
        // paths of it (`properties.desired.modules.<name>`), or leaves $edgeAgent out.
        self.layered = content
            .get("$edgeAgent")
            .and_then(Value::as_object)
            .is_none_or(|agent| !agent.contains_key("properties.desired"));
        let normalized;
        let content = if self.layered {
            normalized = self.assemble_layers(content, &base);
            &normalized
        } else {
            content
        };
        report.layered = self.layered;

        let agent_path = format!("{base}.$edgeAgent.properties.desired");
        let modules = match desired_of(content, "$edgeAgent") {
            Ok(agent) => self.edge_agent(agent, &agent_path),
            Err(_) if self.layered => Vec::new(),
            Err(e) => {
                self.err(format!("{base}.$edgeAgent"), e);
                Vec::new()
            }
        };
        match desired_of(content, "$edgeHub") {
            Ok(hub) => self.edge_hub(hub, &format!("{base}.$edgeHub.properties.desired")),
            Err(_) if self.layered => {}
            Err(e) => self.err(format!("{base}.$edgeHub"), e),
        }
        report.modules = modules.iter().map(|m| m.name.clone()).collect();

        // Module sections: desired properties of modules the deployment runs.
        let custom: BTreeSet<&str> = modules
            .iter()
            .filter(|m| !m.path.contains(".systemModules."))
            .map(|m| m.name.as_str())
            .collect();
        for (key, section) in content {
            if key == "$edgeAgent" || key == "$edgeHub" {
                continue;
            }
            let path = format!("{base}.{key}");
            if !custom.contains(key.as_str()) {
                if self.layered {
                    self.warn(
                        &path,
                        format!(
                            "desired properties for {key:?}, which this layer's $edgeAgent does \
                             not run: the base deployment (or another layer) must"
                        ),
                    );
                } else {
                    self.err(
                        &path,
                        format!("desired properties for {key:?}, which $edgeAgent does not run"),
                    );
                }
            }
            match desired_of(content, key) {
                Ok(desired) => self.twin(
                    &Value::Object(desired.clone()),
                    &format!("{path}.properties.desired"),
                ),
                Err(e) => {
                    let layered = section
                        .as_object()
                        .is_some_and(|s| s.keys().any(|k| k.starts_with("properties.desired.")));
                    self.err(
                        &path,
                        if layered {
                            "`properties.desired.<path>` is layered-deployment syntax; a base \
                             deployment gives the whole `properties.desired` object"
                                .to_owned()
                        } else {
                            e
                        },
                    );
                }
            }
        }
        for name in &options.modules {
            if !custom.contains(name.as_str()) {
                self.err(
                    format!("{agent_path}.modules"),
                    format!("--module {name}: no such module"),
                );
            }
        }

        // The parent edge-est's default upstream points at.
        let nested = modules.iter().any(|m| {
            m.image
                .as_deref()
                .is_some_and(|i| i.trim_start().starts_with("$upstream"))
        });
        (report.parent, report.parent_inferred) = match &options.parent {
            Parent::Hostname(h) => (Some(h.clone()), false),
            Parent::None => (None, false),
            Parent::Infer => (nested.then(|| PLACEHOLDER_PARENT.to_owned()), nested),
        };

        let mut endpoints = Vec::new();
        for module in modules.iter().filter(|m| custom.contains(m.name.as_str())) {
            let explicit = options.modules.iter().any(|n| n == &module.name);
            if !explicit && !is_edge_est(&module.name, module.image.as_deref()) {
                continue;
            }
            let config = self.edge_est(
                content,
                &base,
                module,
                report.parent.as_deref(),
                &mut endpoints,
            );
            report.edge_est.push(EdgeEstModule {
                name: module.name.clone(),
                config,
            });
        }
        // A layer may set edge-est's desired properties for a module the base deployment
        // runs: they are validated without the container's side.
        if self.layered {
            for name in content.keys() {
                let known = custom.contains(name.as_str());
                let explicit = options.modules.iter().any(|n| n == name);
                if !known && (explicit || is_edge_est(name, None)) {
                    let config =
                        self.edge_est_desired(content, &base, name, report.parent.as_deref());
                    report.edge_est.push(EdgeEstModule {
                        name: name.clone(),
                        config,
                    });
                }
            }
        }
        for module in modules.iter().filter(|m| {
            m.image.as_deref().and_then(repository_name).as_deref() == Some(API_PROXY_REPOSITORY)
        }) {
            self.api_proxy(
                content,
                &base,
                module,
                &modules,
                &report.edge_est,
                &mut endpoints,
            );
        }
        if report.edge_est.is_empty() && !modules.is_empty() {
            self.warn(
                format!("{agent_path}.modules"),
                format!(
                    "no edge-est module found (image repository `{EDGE_EST_REPOSITORY}`, or a \
                     module named {}): no desired properties were validated; say which with \
                     --module NAME",
                    EDGE_EST_NAMES.join(", ")
                ),
            );
        }
        report.endpoints = endpoints;
        self.port_conflicts(&modules);
        report
    }

    /// The sections of a layered deployment as base-deployment sections: each
    /// `properties.desired.a.b` key set at `a.b` of one `properties.desired` object (a whole
    /// `properties.desired`, if also given, is the start). Paths in findings read the same.
    fn assemble_layers(&mut self, content: &Map<String, Value>, base: &str) -> Map<String, Value> {
        let mut normalized = Map::new();
        for (name, section) in content {
            let Some(section) = section.as_object() else {
                normalized.insert(name.clone(), section.clone());
                continue;
            };
            let mut desired = match section.get("properties.desired") {
                Some(Value::Object(whole)) => whole.clone(),
                _ => Map::new(),
            };
            let mut partial = false;
            for (key, value) in section {
                let Some(path) = key.strip_prefix("properties.desired.") else {
                    if key != "properties.desired" {
                        self.err(
                            format!("{base}.{name}.{key}"),
                            "a module section holds `properties.desired` or \
                             `properties.desired.<path>` keys only",
                        );
                    }
                    continue;
                };
                partial = true;
                let mut at = &mut desired;
                let parts: Vec<&str> = path.split('.').collect();
                for (i, part) in parts.iter().enumerate() {
                    if i + 1 == parts.len() {
                        at.insert((*part).to_owned(), value.clone());
                        break;
                    }
                    let entry = at
                        .entry((*part).to_owned())
                        .or_insert_with(|| Value::Object(Map::new()));
                    if !entry.is_object() {
                        *entry = Value::Object(Map::new());
                    }
                    at = entry.as_object_mut().expect("made an object above");
                }
            }
            if partial && !section.contains_key("properties.desired") {
                self.partial.insert(name.clone());
            }
            let mut assembled = Map::new();
            assembled.insert("properties.desired".into(), Value::Object(desired));
            normalized.insert(name.clone(), Value::Object(assembled));
        }
        normalized
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Agent,
    Hub,
    Custom,
}

/// `properties.desired` of a module section, as an object.
pub(super) fn desired_of<'a>(
    content: &'a Map<String, Value>,
    module: &str,
) -> Result<&'a Map<String, Value>, String> {
    match content.get(module) {
        None => Err("missing".to_owned()),
        Some(section) => match section.get("properties.desired") {
            Some(Value::Object(desired)) => Ok(desired),
            Some(_) => Err("`properties.desired` must be an object".to_owned()),
            None => Err("needs a `properties.desired` object".to_owned()),
        },
    }
}
