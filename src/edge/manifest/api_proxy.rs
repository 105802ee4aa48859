//! The IoT Edge API proxy: its nginx configuration and the unix socket it shares with edge-est.

use super::*;

impl Checker {
    pub(super) fn api_proxy(
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
