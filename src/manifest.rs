//! `edge-est check-manifest`: validates an IoT Hub deployment manifest (or an iotedgedev
//! `deployment.template.json`) before it reaches a gateway.
//!
//! - **Shape**, with the rules edgeAgent and edgeHub apply: `$edgeAgent` (schema 1.0/1.1,
//!   runtime, system modules, modules: `type`, `status`, `restartPolicy`, `imagePullPolicy`,
//!   `startupOrder` only with schema 1.1, `env`, image references), `$edgeHub` (schema, routes,
//!   store and forward), and every module section's `properties.desired`.
//! - **Twin limits** of IoT Hub on every desired section: keys without `.`, `$`, spaces or
//!   control characters and at most 1 KB, depth at most 10, strings at most 4 KB, a section at
//!   most 32 KB (createOptions counted in their deployed, chunked form).
//! - **createOptions**: a string that parses as JSON or an object (template form); the chunks
//!   `createOptions`, `createOptions01`, … contiguous; the whole at most
//!   [`CREATE_OPTIONS_MAX`] characters, the limit of iotedgedev and the VS Code tooling
//!   (8 chunks of 512). edgeAgent itself reads up to 100 chunks, but the tools that turn a
//!   template into a deployment refuse more than 8, so a manifest above that cannot be
//!   produced or round-tripped by them; we enforce the practical limit. Port bindings
//!   (`HostPort` a string, as Docker wants), binds and mounts are checked, and two modules may
//!   not publish the same host port.
//! - **edge-est modules** (see [`is_edge_est`]): their desired properties go through
//!   [`module_config`] with [`ModuleDefaults::placeholder`], the very function the module runs
//!   on every twin change; then what the container needs: a volume on the data directory,
//!   every file the configuration names on a mounted volume, published ports that edge-est
//!   listens on.
//! - **The API proxy**: its `proxy_config` (base64) must decode; a `proxy_pass` to a unix
//!   socket must reach an edge-est module's `proxy_socket` through one volume mounted by both
//!   containers, and by no other module.
//!
//! Every error names the JSON path of the field it is about.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{Map, Value};

use crate::config::{Config, ConfigError};
use crate::edge::desired::{module_config, ModuleDefaults};

/// Characters per `createOptions` chunk (edgeAgent's `TwinValueMaxSize`).
pub const CREATE_OPTIONS_CHUNK: usize = 512;
/// Chunks iotedgedev and the VS Code extension write at most.
pub const CREATE_OPTIONS_MAX_CHUNKS: usize = 8;
/// The largest createOptions enforced: 8 chunks of 512 characters.
pub const CREATE_OPTIONS_MAX: usize = CREATE_OPTIONS_CHUNK * CREATE_OPTIONS_MAX_CHUNKS;
/// Chunks edgeAgent reads at most (`createOptions`, `createOptions01` … `createOptions99`).
pub const EDGE_AGENT_MAX_CHUNKS: usize = 100;
/// IoT Hub's twin limits.
pub const TWIN_MAX_STRING: usize = 4096;
pub const TWIN_MAX_KEY: usize = 1024;
pub const TWIN_MAX_DEPTH: usize = 10;
pub const TWIN_MAX_DESIRED: usize = 32 * 1024;

/// Module names taken as edge-est whatever their image.
pub const EDGE_EST_NAMES: [&str; 3] = ["edge-est", "edgeest", "estproxy"];
/// The image repository (last path component) of edge-est, as `module/module.json` builds it.
pub const EDGE_EST_REPOSITORY: &str = "edge-est";
/// The image repository of the IoT Edge API proxy.
pub const API_PROXY_REPOSITORY: &str = "azureiotedge-api-proxy";
/// Where edge-est keeps its journal and last-known-good configuration (`EDGE_EST_DATA_DIR`).
pub const DEFAULT_DATA_DIR: &str = "/data";
/// The EST path prefix every endpoint serves.
pub const EST_PATH: &str = "/.well-known/est";
/// The host name the parent placeholder uses when the manifest is for a nested device.
const PLACEHOLDER_PARENT: &str = "parent.invalid";

/// Whether the device the manifest is for has a parent (`IOTEDGE_PARENTHOSTNAME`), which
/// gives edge-est its default `upstreams.parent`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Parent {
    /// Nested if any image is pulled through `$upstream` (how lower layers pull).
    #[default]
    Infer,
    Hostname(String),
    None,
}

#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// Modules to validate as edge-est whatever their image or name.
    pub modules: Vec<String>,
    pub parent: Parent,
}

/// One finding: the JSON path of the field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// How children reach an EST endpoint of the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// A host port published by the edge-est module itself (TLS by edge-est).
    Direct,
    /// The IoT Edge API proxy module of this name (TLS by nginx, then the unix socket).
    ApiProxy(String),
}

/// An EST endpoint the device serves: `https://<device hostname>:<host_port>/.well-known/est`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host_port: u16,
    /// The edge-est module that answers.
    pub module: String,
    pub via: Via,
    /// The label path segments served (`None`: the unlabeled path).
    pub labels: Vec<Option<String>>,
}

/// An edge-est module of the manifest, with the configuration its twin gives it.
#[derive(Debug)]
pub struct EdgeEstModule {
    pub name: String,
    pub config: Option<Config>,
}

/// The outcome of checking one manifest.
#[derive(Debug, Default)]
pub struct Report {
    /// Every module the manifest runs, system modules first.
    pub modules: Vec<String>,
    pub edge_est: Vec<EdgeEstModule>,
    /// The parent host name edge-est was validated with (`None`: a top-layer device).
    pub parent: Option<String>,
    /// Whether that was inferred from `$upstream` images.
    pub parent_inferred: bool,
    pub endpoints: Vec<Endpoint>,
    pub errors: Vec<ManifestError>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// One line about what was checked.
    pub fn summary(&self) -> String {
        let layer = match (&self.parent, self.parent_inferred) {
            (None, _) => "top-layer device".to_owned(),
            (Some(_), true) => "nested device (images via $upstream)".to_owned(),
            (Some(p), false) => format!("nested device, parent {p}"),
        };
        let est: Vec<String> = self
            .edge_est
            .iter()
            .map(|m| match &m.config {
                Some(c) => format!("{} ({} label(s))", m.name, c.labels.len()),
                None => m.name.clone(),
            })
            .collect();
        let endpoints: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| match &e.via {
                Via::Direct => format!("{} by {}", e.host_port, e.module),
                Via::ApiProxy(p) => format!("{} via {p} to {}", e.host_port, e.module),
            })
            .collect();
        let status = if self.is_ok() {
            "ok".to_owned()
        } else {
            format!("{} error(s)", self.errors.len())
        };
        format!(
            "{status}: {} module(s); {layer}; edge-est: {}; EST on host port {}",
            self.modules.len(),
            if est.is_empty() {
                "none".to_owned()
            } else {
                est.join(", ")
            },
            if endpoints.is_empty() {
                "none".to_owned()
            } else {
                endpoints.join(", ")
            },
        )
    }
}

/// Reads and checks a manifest file.
pub fn check_file(path: &Path, options: &CheckOptions) -> Report {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => return failed(format!("cannot read {}: {e}", path.display())),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(manifest) => check(&manifest, options),
        Err(e) => failed(format!("not JSON: {e}")),
    }
}

fn failed(message: String) -> Report {
    Report {
        errors: vec![ManifestError {
            path: String::new(),
            message,
        }],
        ..Report::default()
    }
}

/// Checks a parsed manifest.
pub fn check(manifest: &Value, options: &CheckOptions) -> Report {
    let mut checker = Checker::default();
    let report = checker.run(manifest, options);
    Report {
        errors: checker.errors,
        ..report
    }
}

/// Whether a module is edge-est: its image repository is `edge-est` (`…/edge-est:tag`,
/// `$upstream:443/edge-est:tag`, iotedgedev's `${MODULES.edge-est}` or
/// `${MODULES.edge-est.<platform>}`), or its name is one of [`EDGE_EST_NAMES`].
pub fn is_edge_est(name: &str, image: Option<&str>) -> bool {
    if EDGE_EST_NAMES.iter().any(|n| n.eq_ignore_ascii_case(name)) {
        return true;
    }
    let Some(image) = image.map(str::trim) else {
        return false;
    };
    if let Some(rest) = image.strip_prefix("${MODULES.") {
        let module = rest.trim_end_matches('}');
        return module == EDGE_EST_REPOSITORY
            || module.starts_with(&format!("{EDGE_EST_REPOSITORY}."));
    }
    if let Some(dir) = image
        .strip_prefix("${MODULEDIR<")
        .and_then(|r| r.split('>').next())
    {
        return dir.trim_end_matches('/').rsplit('/').next() == Some(EDGE_EST_REPOSITORY);
    }
    repository_name(image).as_deref() == Some(EDGE_EST_REPOSITORY)
}

/// The last path component of an image's repository (no registry, tag or digest).
fn repository_name(image: &str) -> Option<String> {
    let without_digest = image.split('@').next()?;
    let last = without_digest.rsplit('/').next()?;
    let name = last.split(':').next()?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// A volume or bind mount of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    /// A volume name, or a host path for binds.
    source: String,
    target: PathBuf,
}

/// A published port: container port, protocol, host address and host port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Binding {
    container_port: u16,
    protocol: String,
    host_ip: String,
    host_port: u16,
}

/// What the checks need of one module of `$edgeAgent`.
#[derive(Clone, Debug, Default)]
struct ModuleInfo {
    name: String,
    /// JSON path of the module in `$edgeAgent`.
    path: String,
    image: Option<String>,
    env: BTreeMap<String, String>,
    mounts: Vec<Mount>,
    bindings: Vec<Binding>,
}

impl ModuleInfo {
    fn create_path(&self) -> String {
        format!("{}.settings.createOptions", self.path)
    }

    /// The mount a container path is on (the deepest one), and the rest of the path.
    fn mount_of(&self, path: &Path) -> Option<(&Mount, PathBuf)> {
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
struct Checker {
    errors: Vec<ManifestError>,
}

impl Checker {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ManifestError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn run(&mut self, manifest: &Value, options: &CheckOptions) -> Report {
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

        let agent_path = format!("{base}.$edgeAgent.properties.desired");
        let modules = match desired_of(content, "$edgeAgent") {
            Ok(agent) => self.edge_agent(agent, &agent_path),
            Err(e) => {
                self.err(format!("{base}.$edgeAgent"), e);
                Vec::new()
            }
        };
        match desired_of(content, "$edgeHub") {
            Ok(hub) => self.edge_hub(hub, &format!("{base}.$edgeHub.properties.desired")),
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
                self.err(
                    &path,
                    format!("desired properties for {key:?}, which $edgeAgent does not run"),
                );
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
        report.endpoints = endpoints;
        self.port_conflicts(&modules);
        report
    }

    // ---- $edgeAgent -------------------------------------------------------------------

    fn edge_agent(&mut self, agent: &Map<String, Value>, path: &str) -> Vec<ModuleInfo> {
        let schema = match agent.get("schemaVersion") {
            Some(Value::String(v)) if v == "1.0" || v == "1.1" => v.clone(),
            Some(other) => {
                self.err(
                    format!("{path}.schemaVersion"),
                    format!("{other} is not an edgeAgent schema version (\"1.0\" or \"1.1\")"),
                );
                "1.1".to_owned()
            }
            None => {
                self.err(format!("{path}.schemaVersion"), "missing (\"1.1\")");
                "1.1".to_owned()
            }
        };
        self.runtime(agent.get("runtime"), &format!("{path}.runtime"));

        let mut modules = Vec::new();
        match agent.get("systemModules") {
            Some(Value::Object(system)) => {
                for required in ["edgeAgent", "edgeHub"] {
                    if !system.contains_key(required) {
                        self.err(format!("{path}.systemModules.{required}"), "missing");
                    }
                }
                for (name, module) in system {
                    let module_path = format!("{path}.systemModules.{name}");
                    if name != "edgeAgent" && name != "edgeHub" {
                        self.err(
                            &module_path,
                            "the system modules are edgeAgent and edgeHub; others go in `modules`",
                        );
                        continue;
                    }
                    let kind = if name == "edgeAgent" {
                        Kind::Agent
                    } else {
                        Kind::Hub
                    };
                    if let Some(info) = self.module(name, module, &module_path, &schema, kind) {
                        modules.push(info);
                    }
                }
            }
            Some(_) => self.err(format!("{path}.systemModules"), "must be an object"),
            None => self.err(format!("{path}.systemModules"), "missing"),
        }
        match agent.get("modules") {
            Some(Value::Object(custom)) => {
                for (name, module) in custom {
                    let module_path = format!("{path}.modules.{name}");
                    if let Err(e) = check_module_name(name) {
                        self.err(&module_path, e);
                    }
                    if let Some(info) =
                        self.module(name, module, &module_path, &schema, Kind::Custom)
                    {
                        modules.push(info);
                    }
                }
            }
            Some(_) => self.err(format!("{path}.modules"), "must be an object"),
            None => {}
        }
        // The twin edgeAgent receives: createOptions stringified and chunked as deployed.
        self.twin(&Value::Object(deployed_agent(agent)), path);
        modules
    }

    fn runtime(&mut self, runtime: Option<&Value>, path: &str) {
        let Some(runtime) = runtime else {
            self.err(path, "missing ({\"type\": \"docker\", \"settings\": {…}})");
            return;
        };
        let Some(runtime) = runtime.as_object() else {
            self.err(path, "must be an object");
            return;
        };
        if runtime.get("type").and_then(Value::as_str) != Some("docker") {
            self.err(format!("{path}.type"), "must be \"docker\"");
        }
        let Some(settings) = runtime.get("settings") else {
            return;
        };
        let Some(settings) = settings.as_object() else {
            self.err(format!("{path}.settings"), "must be an object");
            return;
        };
        for key in ["minDockerVersion", "loggingOptions"] {
            if settings.get(key).is_some_and(|v| !v.is_string()) {
                self.err(format!("{path}.settings.{key}"), "must be a string");
            }
        }
        match settings.get("registryCredentials") {
            None => {}
            Some(Value::Object(credentials)) => {
                for (name, credential) in credentials {
                    for key in ["username", "password", "address"] {
                        if !credential.get(key).is_some_and(Value::is_string) {
                            self.err(
                                format!("{path}.settings.registryCredentials.{name}.{key}"),
                                "missing or not a string",
                            );
                        }
                    }
                }
            }
            Some(_) => self.err(
                format!("{path}.settings.registryCredentials"),
                "must be an object of {username, password, address}",
            ),
        }
    }

    fn module(
        &mut self,
        name: &str,
        module: &Value,
        path: &str,
        schema: &str,
        kind: Kind,
    ) -> Option<ModuleInfo> {
        let Some(module) = module.as_object() else {
            self.err(path, "must be an object");
            return None;
        };
        let mut info = ModuleInfo {
            name: name.to_owned(),
            path: path.to_owned(),
            ..ModuleInfo::default()
        };
        if module.get("type").and_then(Value::as_str) != Some("docker") {
            self.err(format!("{path}.type"), "must be \"docker\"");
        }
        let enumerated: [(&str, &[&str]); 3] = [
            ("status", &["running", "stopped"]),
            (
                "restartPolicy",
                &["never", "on-failure", "on-unhealthy", "always"],
            ),
            ("imagePullPolicy", &["on-create", "never"]),
        ];
        for (field, allowed) in enumerated {
            let required = kind != Kind::Agent && field != "imagePullPolicy";
            match module.get(field) {
                None if required => self.err(
                    format!("{path}.{field}"),
                    format!("missing (one of {})", allowed.join(", ")),
                ),
                None => {}
                Some(Value::String(v)) if allowed.contains(&v.as_str()) => {}
                Some(other) => self.err(
                    format!("{path}.{field}"),
                    format!("{other} is not one of {}", allowed.join(", ")),
                ),
            }
        }
        if let Some(version) = module.get("version") {
            if !version.is_string() {
                self.err(format!("{path}.version"), "must be a string");
            }
        }
        if let Some(order) = module.get("startupOrder") {
            if order.as_u64().is_none_or(|n| n > u64::from(u32::MAX)) {
                self.err(
                    format!("{path}.startupOrder"),
                    format!("{order} is not an unsigned 32-bit integer"),
                );
            } else if schema != "1.1" {
                self.err(
                    format!("{path}.startupOrder"),
                    "needs $edgeAgent schemaVersion \"1.1\"",
                );
            }
        }
        match module.get("env") {
            None => {}
            Some(Value::Object(env)) => {
                for (key, value) in env {
                    match value.get("value") {
                        Some(Value::String(v)) if value.as_object().is_some() => {
                            info.env.insert(key.clone(), v.clone());
                        }
                        _ => self.err(
                            format!("{path}.env.{key}"),
                            "must be {\"value\": \"<string>\"}",
                        ),
                    }
                }
            }
            Some(_) => self.err(
                format!("{path}.env"),
                "must be an object {\"NAME\": {\"value\": \"…\"}}",
            ),
        }
        let Some(settings) = module.get("settings").and_then(Value::as_object) else {
            self.err(
                format!("{path}.settings"),
                "missing or not an object ({\"image\": …, \"createOptions\": …})",
            );
            return Some(info);
        };
        match settings.get("image") {
            Some(Value::String(image)) if !image.trim().is_empty() => {
                if let Err(e) = check_image(image) {
                    self.err(format!("{path}.settings.image"), e);
                }
                info.image = Some(image.clone());
            }
            _ => self.err(format!("{path}.settings.image"), "missing or empty"),
        }
        if let Some(create) = self.create_options(settings, &format!("{path}.settings")) {
            let create_path = format!("{path}.settings.createOptions");
            info.mounts = self.mounts(&create, &create_path);
            info.bindings = self.bindings(&create, &create_path);
        }
        Some(info)
    }

    /// The createOptions of a module's settings, parsed, after the size and chunk rules.
    fn create_options(&mut self, settings: &Map<String, Value>, path: &str) -> Option<Value> {
        let base = settings.get("createOptions")?;
        let field = format!("{path}.createOptions");
        let mut chunks: Vec<(usize, &str)> = Vec::new();
        for key in settings.keys() {
            let Some(number) = key.strip_prefix("createOptions") else {
                continue;
            };
            if number.is_empty() {
                continue;
            }
            match number.parse::<usize>() {
                Ok(n) if number.len() == 2 && (1..EDGE_AGENT_MAX_CHUNKS).contains(&n) => {
                    match settings[key].as_str() {
                        Some(text) => chunks.push((n, text)),
                        None => self.err(format!("{path}.{key}"), "a chunk must be a string"),
                    }
                }
                _ => self.err(
                    format!("{path}.{key}"),
                    "edgeAgent reads chunks createOptions01 … createOptions99 only",
                ),
            }
        }
        chunks.sort_by_key(|(n, _)| *n);
        for (i, (n, _)) in chunks.iter().enumerate() {
            if *n != i + 1 {
                self.err(
                    format!("{path}.createOptions{n:02}"),
                    format!(
                        "createOptions{:02} is missing: edgeAgent stops at the first missing chunk",
                        i + 1
                    ),
                );
                break;
            }
        }
        let text = match base {
            Value::String(first) => {
                let mut text = first.clone();
                for (_, chunk) in &chunks {
                    text.push_str(chunk);
                }
                text
            }
            Value::Object(_) => {
                if !chunks.is_empty() {
                    self.err(
                        &field,
                        "an object (template form) cannot have chunks; tools chunk it when they stringify it",
                    );
                }
                serde_json::to_string(base).unwrap_or_default()
            }
            _ => {
                self.err(
                    &field,
                    "must be a string (stringified JSON) or an object (template form)",
                );
                return None;
            }
        };
        let length = text.chars().count();
        if length > CREATE_OPTIONS_MAX {
            self.err(
                &field,
                format!(
                    "{length} characters{}; the enforced limit is {CREATE_OPTIONS_MAX} \
                     ({CREATE_OPTIONS_MAX_CHUNKS} chunks of {CREATE_OPTIONS_CHUNK}), what iotedgedev \
                     and the VS Code tooling accept (\"The maximum size of createOptions is 4K\")",
                    if base.is_object() { " once minified" } else { "" }
                ),
            );
        }
        if text.trim().is_empty() || text.trim() == "null" {
            return Some(Value::Object(Map::new()));
        }
        match serde_json::from_str::<Value>(&text) {
            Ok(value @ Value::Object(_)) => Some(value),
            Ok(_) => {
                self.err(
                    &field,
                    "must be a JSON object (Docker's container create body)",
                );
                None
            }
            Err(e) => {
                self.err(&field, format!("not JSON: {e}"));
                None
            }
        }
    }

    fn mounts(&mut self, create: &Value, path: &str) -> Vec<Mount> {
        let mut mounts = Vec::new();
        let host = create.get("HostConfig");
        if let Some(host) = host {
            if !host.is_object() {
                self.err(format!("{path}.HostConfig"), "must be an object");
                return mounts;
            }
        }
        match host.and_then(|h| h.get("Binds")) {
            None | Some(Value::Null) => {}
            Some(Value::Array(binds)) => {
                for (i, bind) in binds.iter().enumerate() {
                    let field = format!("{path}.HostConfig.Binds[{i}]");
                    let Some(text) = bind.as_str() else {
                        self.err(field, "must be a string \"source:target[:ro]\"");
                        continue;
                    };
                    let parts: Vec<&str> = text.split(':').collect();
                    let options_ok = parts.get(2).is_none_or(|o| {
                        o.split(',').all(|o| {
                            matches!(
                                o,
                                "ro" | "rw"
                                    | "z"
                                    | "Z"
                                    | "nocopy"
                                    | "private"
                                    | "rprivate"
                                    | "shared"
                                    | "rshared"
                                    | "slave"
                                    | "rslave"
                            )
                        })
                    });
                    if !(2..=3).contains(&parts.len())
                        || parts[0].is_empty()
                        || !parts[1].starts_with('/')
                        || !options_ok
                    {
                        self.err(
                            field,
                            format!("{text:?} is not \"source:/container/path[:ro]\""),
                        );
                        continue;
                    }
                    mounts.push(Mount {
                        source: parts[0].to_owned(),
                        target: PathBuf::from(parts[1]),
                    });
                }
            }
            Some(_) => self.err(format!("{path}.HostConfig.Binds"), "must be an array"),
        }
        match host.and_then(|h| h.get("Mounts")) {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for (i, mount) in list.iter().enumerate() {
                    let field = format!("{path}.HostConfig.Mounts[{i}]");
                    let kind = mount.get("Type").and_then(Value::as_str);
                    let target = mount.get("Target").and_then(Value::as_str);
                    let source = mount.get("Source").and_then(Value::as_str).unwrap_or("");
                    match (kind, target) {
                        (Some("volume" | "bind"), Some(t)) if t.starts_with('/') => {
                            if source.is_empty() {
                                self.err(format!("{field}.Source"), "missing");
                            }
                            mounts.push(Mount {
                                source: source.to_owned(),
                                target: PathBuf::from(t),
                            });
                        }
                        (Some("tmpfs"), Some(t)) if t.starts_with('/') => {}
                        _ => self.err(
                            field,
                            "needs Type (volume, bind or tmpfs) and an absolute Target",
                        ),
                    }
                }
            }
            Some(_) => self.err(format!("{path}.HostConfig.Mounts"), "must be an array"),
        }
        mounts
    }

    fn bindings(&mut self, create: &Value, path: &str) -> Vec<Binding> {
        let mut bindings = Vec::new();
        if let Some(exposed) = create.get("ExposedPorts") {
            match exposed.as_object() {
                Some(ports) => {
                    for key in ports.keys() {
                        if parse_port_key(key).is_none() {
                            self.err(
                                format!("{path}.ExposedPorts.{key}"),
                                "not a port (\"8085/tcp\")",
                            );
                        }
                    }
                }
                None => self.err(format!("{path}.ExposedPorts"), "must be an object"),
            }
        }
        let Some(ports) = create.get("HostConfig").and_then(|h| h.get("PortBindings")) else {
            return bindings;
        };
        let Some(ports) = ports.as_object() else {
            self.err(
                format!("{path}.HostConfig.PortBindings"),
                "must be an object",
            );
            return bindings;
        };
        for (key, list) in ports {
            let field = format!("{path}.HostConfig.PortBindings.{key}");
            let Some((container_port, protocol)) = parse_port_key(key) else {
                self.err(&field, "not a container port (\"8085/tcp\")");
                continue;
            };
            let Some(list) = list.as_array() else {
                self.err(&field, "must be an array of {\"HostPort\": \"…\"}");
                continue;
            };
            for (i, binding) in list.iter().enumerate() {
                let host_port = binding.get("HostPort");
                let port = match host_port {
                    Some(Value::String(p)) => p.parse::<u16>().ok().filter(|p| *p > 0),
                    Some(Value::Number(n)) => {
                        self.err(
                            format!("{field}[{i}].HostPort"),
                            format!("must be a string (\"{n}\"): Docker refuses a number"),
                        );
                        continue;
                    }
                    _ => None,
                };
                let Some(host_port) = port else {
                    self.err(
                        format!("{field}[{i}].HostPort"),
                        "missing or not a port number",
                    );
                    continue;
                };
                let host_ip = match binding.get("HostIp") {
                    None => String::new(),
                    Some(Value::String(ip)) => ip.clone(),
                    Some(_) => {
                        self.err(format!("{field}[{i}].HostIp"), "must be a string");
                        String::new()
                    }
                };
                bindings.push(Binding {
                    container_port,
                    protocol: protocol.clone(),
                    host_ip,
                    host_port,
                });
            }
        }
        bindings
    }

    fn port_conflicts(&mut self, modules: &[ModuleInfo]) {
        let any = |ip: &str| ip.is_empty() || ip == "0.0.0.0" || ip == "::";
        let all: Vec<(&ModuleInfo, &Binding)> = modules
            .iter()
            .flat_map(|m| m.bindings.iter().map(move |b| (m, b)))
            .collect();
        for (i, (module, binding)) in all.iter().enumerate() {
            let taken = all[..i].iter().find(|(other, b)| {
                other.name != module.name
                    && b.host_port == binding.host_port
                    && b.protocol == binding.protocol
                    && (any(&b.host_ip) || any(&binding.host_ip) || b.host_ip == binding.host_ip)
            });
            if let Some((other, _)) = taken {
                self.err(
                    format!(
                        "{}.HostConfig.PortBindings.{}/{}",
                        module.create_path(),
                        binding.container_port,
                        binding.protocol
                    ),
                    format!(
                        "host port {} is already published by {}",
                        binding.host_port, other.name
                    ),
                );
            }
        }
    }

    // ---- $edgeHub ---------------------------------------------------------------------

    fn edge_hub(&mut self, hub: &Map<String, Value>, path: &str) {
        let schema = match hub.get("schemaVersion").and_then(Value::as_str) {
            Some(v @ ("1.0" | "1.1" | "1.2")) => v,
            Some(v) => {
                self.err(
                    format!("{path}.schemaVersion"),
                    format!("{v:?} is not an edgeHub schema version (1.0, 1.1, 1.2)"),
                );
                "1.2"
            }
            None => {
                self.err(format!("{path}.schemaVersion"), "missing (\"1.2\")");
                "1.2"
            }
        };
        match hub.get("routes") {
            Some(Value::Object(routes)) => {
                for (name, route) in routes {
                    let field = format!("{path}.routes.{name}");
                    let text = match route {
                        Value::String(text) => Some(text.as_str()),
                        Value::Object(spec) => {
                            if schema == "1.0" {
                                self.err(
                                    &field,
                                    "route objects (priority, timeToLiveSecs) need $edgeHub schemaVersion 1.1 or later",
                                );
                            }
                            if let Some(p) = spec.get("priority") {
                                if p.as_u64().is_none_or(|p| p > 9) {
                                    self.err(format!("{field}.priority"), "must be 0 to 9");
                                }
                            }
                            if let Some(t) = spec.get("timeToLiveSecs") {
                                if t.as_u64().is_none_or(|t| t > u64::from(u32::MAX)) {
                                    self.err(
                                        format!("{field}.timeToLiveSecs"),
                                        "must be an unsigned integer",
                                    );
                                }
                            }
                            let text = spec.get("route").and_then(Value::as_str);
                            if text.is_none() {
                                self.err(format!("{field}.route"), "missing");
                            }
                            text
                        }
                        _ => {
                            self.err(&field, "must be a route string or a route object");
                            None
                        }
                    };
                    if let Some(text) = text {
                        if !is_route(text) {
                            self.err(
                                &field,
                                format!("{text:?} is not \"FROM <source> [WHERE …] INTO <sink>\""),
                            );
                        }
                    }
                }
            }
            Some(_) => self.err(format!("{path}.routes"), "must be an object"),
            None => self.err(format!("{path}.routes"), "missing"),
        }
        if let Some(store) = hub.get("storeAndForwardConfiguration") {
            if store
                .get("timeToLiveSecs")
                .is_some_and(|t| t.as_u64().is_none_or(|t| t > u64::from(u32::MAX)))
            {
                self.err(
                    format!("{path}.storeAndForwardConfiguration.timeToLiveSecs"),
                    "must be an unsigned integer",
                );
            }
        }
        self.twin(&Value::Object(hub.clone()), path);
    }

    // ---- twin limits ------------------------------------------------------------------

    fn twin(&mut self, desired: &Value, path: &str) {
        let size = serde_json::to_string(desired).map(|t| t.len()).unwrap_or(0);
        if size > TWIN_MAX_DESIRED {
            self.err(
                path,
                format!("{size} bytes; IoT Hub takes at most {TWIN_MAX_DESIRED} bytes of desired properties per twin"),
            );
        }
        let mut deep = false;
        self.twin_value(desired, path, 0, &mut deep);
    }

    fn twin_value(&mut self, value: &Value, path: &str, depth: usize, deep: &mut bool) {
        match value {
            Value::Object(map) => {
                if depth > TWIN_MAX_DEPTH && !*deep {
                    *deep = true;
                    self.err(
                        path,
                        format!("nested deeper than IoT Hub's {TWIN_MAX_DEPTH} levels"),
                    );
                }
                for (key, child) in map {
                    let field = format!("{path}.{key}");
                    if let Err(e) = check_twin_key(key) {
                        self.err(&field, e);
                    }
                    self.twin_value(child, &field, depth + 1, deep);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.twin_value(item, &format!("{path}[{i}]"), depth + 1, deep);
                }
            }
            Value::String(text) if text.len() > TWIN_MAX_STRING => self.err(
                path,
                format!(
                    "a string of {} bytes; IoT Hub takes at most {TWIN_MAX_STRING} per value",
                    text.len()
                ),
            ),
            Value::Number(n)
                if n.as_i64().is_some_and(|n| n.unsigned_abs() > 1 << 52)
                    || n.as_u64().is_some_and(|n| n > 1 << 52) =>
            {
                self.err(path, "integers in a twin lie within ±2^52");
            }
            _ => {}
        }
    }

    // ---- edge-est -----------------------------------------------------------------------

    fn edge_est(
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

    // ---- the API proxy ------------------------------------------------------------------

    fn api_proxy(
        &mut self,
        content: &Map<String, Value>,
        base: &str,
        proxy: &ModuleInfo,
        modules: &[ModuleInfo],
        edge_est: &[EdgeEstModule],
        endpoints: &mut Vec<Endpoint>,
    ) {
        let config_path = format!("{base}.{}.properties.desired.proxy_config", proxy.name);
        let Some(encoded) = desired_of(content, &proxy.name)
            .ok()
            .and_then(|d| d.get("proxy_config"))
        else {
            return; // The default configuration: no EST route.
        };
        let Some(encoded) = encoded.as_str() else {
            self.err(
                config_path,
                "must be a string: the nginx configuration, base64-encoded",
            );
            return;
        };
        let compact: String = encoded.chars().filter(|c| !c.is_whitespace()).collect();
        let text = match base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|bytes| String::from_utf8(bytes).map_err(|e| e.to_string()))
        {
            Ok(text) => text,
            Err(e) => {
                self.err(
                    config_path,
                    format!("not base64 of a UTF-8 nginx configuration: {e}"),
                );
                return;
            }
        };
        if !text.contains(EST_PATH) {
            return;
        }
        let port = match proxy
            .env
            .get("NGINX_DEFAULT_PORT")
            .map(|p| p.parse::<u16>())
        {
            Some(Ok(port)) => Some(port),
            Some(Err(_)) => {
                self.err(
                    format!("{}.env.NGINX_DEFAULT_PORT", proxy.path),
                    "not a port number",
                );
                None
            }
            None => {
                self.err(
                    format!("{}.env", proxy.path),
                    "NGINX_DEFAULT_PORT is not set: say which port nginx listens on (443 for \
                     children; the module's own default differs between its docs and readme)",
                );
                None
            }
        };
        let sockets = unix_sockets(&text);
        if sockets.is_empty() {
            self.err(
                config_path,
                format!(
                    "routes {EST_PATH} somewhere other than a unix socket: edge-est honours the \
                     forwarded client certificate only on its proxy_socket (any module on the \
                     Docker network could forge the header on its TLS port)"
                ),
            );
            return;
        }
        for socket in sockets {
            let socket_path = PathBuf::from(&socket);
            let Some((mount, rest)) = proxy.mount_of(&socket_path) else {
                self.err(
                    &config_path,
                    format!(
                        "proxy_pass to {socket}, which is on no volume of {}",
                        proxy.name
                    ),
                );
                continue;
            };
            // The edge-est module whose proxy_socket is the same file of the same volume.
            let target = edge_est.iter().find_map(|m| {
                let config = m.config.as_ref()?;
                let info = modules.iter().find(|i| i.name == m.name)?;
                let (their_mount, their_rest) = info.mount_of(config.proxy_socket.as_deref()?)?;
                (their_mount.source == mount.source && their_rest == rest).then_some((m, config))
            });
            let Some((module, config)) = target else {
                self.err(
                    &config_path,
                    format!(
                        "proxy_pass to {socket} (volume {:?}), but no edge-est module mounts that \
                         volume and has its proxy_socket there",
                        mount.source
                    ),
                );
                continue;
            };
            // Nobody else may reach the socket: the forwarded header is believed there.
            for other in modules {
                if other.name == proxy.name || other.name == module.name {
                    continue;
                }
                if other
                    .mounts
                    .iter()
                    .any(|m| same_source(&m.source, &mount.source))
                {
                    self.err(
                        other.create_path(),
                        format!(
                            "mounts {:?}, the volume of edge-est's proxy socket: any container that \
                             can reach that socket can forge client certificates",
                            mount.source
                        ),
                    );
                }
            }
            if let Some(port) = port {
                for binding in proxy
                    .bindings
                    .iter()
                    .filter(|b| b.container_port == port && b.protocol == "tcp")
                {
                    endpoints.push(Endpoint {
                        host_port: binding.host_port,
                        module: module.name.clone(),
                        via: Via::ApiProxy(proxy.name.clone()),
                        labels: config.labels.iter().map(|l| l.name.clone()).collect(),
                    });
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Agent,
    Hub,
    Custom,
}

/// `properties.desired` of a module section, as an object.
fn desired_of<'a>(
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

/// `$edgeAgent`'s desired properties as edgeAgent receives them: createOptions given as
/// objects (template form) or long strings stringified and cut into 512-character chunks,
/// as iotedgedev does.
fn deployed_agent(agent: &Map<String, Value>) -> Map<String, Value> {
    let mut agent = agent.clone();
    for section in ["systemModules", "modules"] {
        let Some(Value::Object(modules)) = agent.get_mut(section) else {
            continue;
        };
        for module in modules.values_mut() {
            let Some(Value::Object(settings)) = module.get_mut("settings") else {
                continue;
            };
            let text = match settings.get("createOptions") {
                Some(Value::Object(_)) => {
                    serde_json::to_string(&settings["createOptions"]).unwrap_or_default()
                }
                Some(Value::String(s)) if !settings.contains_key("createOptions01") => s.clone(),
                _ => continue,
            };
            let chars: Vec<char> = text.chars().collect();
            for (i, chunk) in chars.chunks(CREATE_OPTIONS_CHUNK).enumerate() {
                let key = if i == 0 {
                    "createOptions".to_owned()
                } else {
                    format!("createOptions{i:02}")
                };
                settings.insert(key, Value::String(chunk.iter().collect()));
            }
        }
    }
    agent
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

/// The unix sockets an nginx configuration passes requests to (`proxy_pass http://unix:PATH:`).
pub fn unix_sockets(nginx: &str) -> Vec<String> {
    let mut sockets = Vec::new();
    for (at, _) in nginx.match_indices("http://unix:") {
        let rest = &nginx[at + "http://unix:".len()..];
        let end = rest
            .find(|c: char| c == ':' || c == ';' || c.is_whitespace())
            .unwrap_or(rest.len());
        let path = &rest[..end];
        if !path.is_empty() && !sockets.iter().any(|s| s == path) {
            sockets.push(path.to_owned());
        }
    }
    sockets
}

/// Two mount sources that share files: the same volume, or host paths one inside the other.
fn same_source(a: &str, b: &str) -> bool {
    if a.starts_with('/') && b.starts_with('/') {
        Path::new(a).starts_with(b) || Path::new(b).starts_with(a)
    } else {
        a == b
    }
}

fn parse_port_key(key: &str) -> Option<(u16, String)> {
    let (port, protocol) = key.split_once('/').unwrap_or((key, "tcp"));
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    matches!(protocol, "tcp" | "udp" | "sctp").then(|| (port, protocol.to_owned()))
}

fn is_route(text: &str) -> bool {
    let upper = text.trim().to_ascii_uppercase();
    upper.starts_with("FROM ") && upper.contains(" INTO ")
}

/// IoT Hub's rules for keys of twin documents.
fn check_twin_key(key: &str) -> Result<(), String> {
    if key.len() > TWIN_MAX_KEY {
        return Err(format!(
            "a key of {} bytes; twin keys are at most 1 KB",
            key.len()
        ));
    }
    if key.is_empty() {
        return Err("an empty key".to_owned());
    }
    if let Some(c) = key
        .chars()
        .find(|c| matches!(c, '.' | '$' | ' ') || c.is_control())
    {
        return Err(format!(
            "the key {key:?} holds {c:?}; twin keys may not contain '.', '$', spaces or control characters"
        ));
    }
    Ok(())
}

/// Module names: IoT Hub module identities, which are also twin keys in `$edgeAgent`.
fn check_module_name(name: &str) -> Result<(), String> {
    const SPECIAL: &str = "-+%_#*?!(),:=@'";
    if name.is_empty() || name.len() > 128 {
        return Err("a module name has 1 to 128 characters".to_owned());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || SPECIAL.contains(*c)))
    {
        return Err(format!("{c:?} is not allowed in a module name"));
    }
    Ok(())
}

/// An image reference as edgeAgent takes it: `$upstream:<port>/…` (nested devices), or
/// `[registry/]path[:tag][@digest]` with a lower-case path. Template placeholders (`${…}`)
/// are left to the tooling that replaces them.
fn check_image(image: &str) -> Result<(), String> {
    let image = image.trim();
    if image.contains("${") {
        return Ok(());
    }
    let rest = if let Some(rest) = image.strip_prefix("$upstream") {
        let Some(port_and_path) = rest.strip_prefix(':') else {
            return Err(format!(
                "{image:?}: $upstream must be followed by :<port>/ (e.g. $upstream:443/…)"
            ));
        };
        let (port, path) = port_and_path.split_once('/').unwrap_or((port_and_path, ""));
        if !port.starts_with(|c: char| ('1'..='9').contains(&c)) || port.parse::<u16>().is_err() {
            return Err(format!(
                "{image:?}: $upstream needs a port (e.g. $upstream:443/…)"
            ));
        }
        path
    } else if image.starts_with('$') {
        return Err(format!(
            "{image:?}: only $upstream:<port> may start an image (edgeAgent refuses other variables)"
        ));
    } else {
        image
    };
    let without_digest = rest.split('@').next().unwrap_or(rest);
    let mut parts: Vec<&str> = without_digest.split('/').collect();
    let last = parts.pop().unwrap_or_default();
    let (name, tag) = last.split_once(':').unwrap_or((last, ""));
    if name.is_empty() || (last.contains(':') && tag.is_empty()) {
        return Err(format!("{image:?} is not an image reference"));
    }
    // The first component is a registry when it looks like a host.
    let registry = parts
        .first()
        .is_some_and(|p| p.contains('.') || p.contains(':') || *p == "localhost")
        && !image.starts_with("$upstream");
    let path_parts = if registry { &parts[1..] } else { &parts[..] };
    for part in path_parts.iter().chain(std::iter::once(&name)) {
        let valid = !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if !valid {
            return Err(format!(
                "{image:?}: repository names are lower-case letters, digits and . _ - (Docker \
                 refuses {part:?})"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn edge_est_is_recognised_by_image_or_name() {
        assert!(is_edge_est(
            "x",
            Some("myacr.azurecr.io/edge-est:0.1.0-amd64")
        ));
        assert!(is_edge_est("x", Some("$upstream:443/edge-est:0.1.0-amd64")));
        assert!(is_edge_est("x", Some("${MODULES.edge-est}")));
        assert!(is_edge_est("x", Some("${MODULES.edge-est.arm64v8}")));
        assert!(is_edge_est("x", Some("reg:5000/edge-est@sha256:abcd")));
        assert!(is_edge_est("estproxy", Some("myacr.azurecr.io/other:1")));
        assert!(!is_edge_est("x", Some("myacr.azurecr.io/edge-est-tools:1")));
        assert!(!is_edge_est("x", Some("${MODULES.edge-estimator}")));
        assert!(!is_edge_est("x", None));
    }

    #[test]
    fn images_follow_edge_agents_rules() {
        for ok in [
            "mcr.microsoft.com/azureiotedge-hub:1.5",
            "$upstream:443/azureiotedge-agent:1.5",
            "registry:latest",
            "localhost:5000/edge-est",
            "${MODULES.edge-est}",
        ] {
            assert!(check_image(ok).is_ok(), "{ok}: {:?}", check_image(ok));
        }
        for bad in [
            "$upstream/edge-est:1",
            "$registry:443/edge-est:1",
            "myacr.azurecr.io/Edge-Est:1",
            "edge-est:",
        ] {
            assert!(check_image(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deployed_form_chunks_long_create_options() {
        let agent = json!({"modules": {"m": {"settings": {"createOptions": {"Env": ["A=".to_owned() + &"x".repeat(1200)]}}}}});
        let deployed = deployed_agent(agent.as_object().unwrap());
        let settings = &deployed["modules"]["m"]["settings"];
        assert_eq!(settings["createOptions"].as_str().unwrap().len(), 512);
        assert_eq!(settings["createOptions01"].as_str().unwrap().len(), 512);
        assert!(settings["createOptions02"].as_str().unwrap().len() < 512);
    }

    #[test]
    fn twin_keys_and_sockets() {
        assert!(check_twin_key("labels").is_ok());
        assert!(check_twin_key("a.b").is_err());
        assert!(check_twin_key("$version").is_err());
        assert_eq!(
            unix_sockets("proxy_pass http://unix:/var/run/edge-est/proxy.sock:;"),
            vec!["/var/run/edge-est/proxy.sock".to_owned()]
        );
    }
}
