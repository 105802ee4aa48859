//! `$edgeAgent`: schema, runtime, system and custom modules, createOptions, mounts, ports.

use super::*;

impl Checker {
    pub(super) fn edge_agent(&mut self, agent: &Map<String, Value>, path: &str) -> Vec<ModuleInfo> {
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
                if !self.layered {
                    self.err(format!("{path}.schemaVersion"), "missing (\"1.1\")");
                }
                "1.1".to_owned()
            }
        };
        if !self.layered || agent.contains_key("runtime") {
            self.runtime(agent.get("runtime"), &format!("{path}.runtime"));
        }

        let mut modules = Vec::new();
        match agent.get("systemModules") {
            Some(Value::Object(system)) => {
                for required in ["edgeAgent", "edgeHub"] {
                    if !self.layered && !system.contains_key(required) {
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
            None if self.layered => {}
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

    pub(super) fn runtime(&mut self, runtime: Option<&Value>, path: &str) {
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

    pub(super) fn module(
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
    pub(super) fn create_options(
        &mut self,
        settings: &Map<String, Value>,
        path: &str,
    ) -> Option<Value> {
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

    pub(super) fn mounts(&mut self, create: &Value, path: &str) -> Vec<Mount> {
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
                        read_only: parts
                            .get(2)
                            .is_some_and(|o| o.split(',').any(|o| o == "ro")),
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
                                read_only: mount.get("ReadOnly") == Some(&Value::Bool(true)),
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

    pub(super) fn bindings(&mut self, create: &Value, path: &str) -> Vec<Binding> {
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

    pub(super) fn port_conflicts(&mut self, modules: &[ModuleInfo]) {
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
}

/// `$edgeAgent`'s desired properties as edgeAgent receives them: createOptions given as
/// objects (template form) or long strings stringified and cut into 512-character chunks,
/// as iotedgedev does.
pub(super) fn deployed_agent(agent: &Map<String, Value>) -> Map<String, Value> {
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

fn parse_port_key(key: &str) -> Option<(u16, String)> {
    let (port, protocol) = key.split_once('/').unwrap_or((key, "tcp"));
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    matches!(protocol, "tcp" | "udp" | "sctp").then(|| (port, protocol.to_owned()))
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
pub(super) fn check_image(image: &str) -> Result<(), String> {
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
