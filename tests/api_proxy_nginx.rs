//! The API-proxy variant end to end with a real nginx: the `proxy_config` of
//! `deployment/middle-layer-api-proxy.nginx.conf` (rendered as the API proxy module renders
//! it: variables substituted, `#if_tag 0` blocks dropped, its file names pointed at the test
//! PKI), in front of edge-est's proxy socket. curl is the child. What it shows: the client
//! certificate nginx takes in its TLS handshake authenticates at edge-est; a header the client
//! forges itself never arrives; Basic passes through. Fails when nginx is not installed
//! (`apt-get install nginx-light`), unless `EDGE_EST_SKIP_MISSING_TOOLS=1`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::mqtt::free_port;
use common::{sh, standard_config, stdout, Pki};
use rustls::pki_types::pem::PemObject;
use tokio::sync::oneshot;

fn nginx() -> Option<PathBuf> {
    common::tool("nginx", "nginx-light")
}

/// `proxy_config` as the API proxy module renders it (its `config_parser.rs`): every
/// `${VAR}` takes the value given (`vars`), else the module's default (`NGINX_DEFAULT_PORT`
/// 8000, `NGINX_DEFAULT_TLS` TLSv1.2), else `0`; `boolean_expression[…]` is solved (`!`, `&`,
/// `|` over variables, non-`0` being true); then every `#if_tag 0` … `#endif_tag 0` is dropped.
fn api_proxy_render(template: &str, vars: &[(&str, &str)]) -> String {
    let value = |name: &str| -> String {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
            .or_else(|| match name {
                "NGINX_DEFAULT_PORT" => Some("8000".into()),
                "NGINX_DEFAULT_TLS" => Some("TLSv1.2".into()),
                _ => None,
            })
            .unwrap_or_else(|| "0".into())
    };
    let mut text = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        let end = rest[start..].find('}').expect("closed variable") + start;
        text.push_str(&rest[..start]);
        text.push_str(&value(&rest[start + 2..end]));
        rest = &rest[end + 1..];
    }
    text.push_str(rest);
    // boolean_expression[EXPR]: each operand (text between the operators and brackets) is 1
    // unless it is exactly 0.
    while let Some(start) = text.find("boolean_expression[") {
        let end = text[start..].find(']').expect("closed expression") + start;
        let expr = &text[start + "boolean_expression[".len()..end];
        let result = solve(expr);
        text.replace_range(start..=end, if result { "1" } else { "0" });
    }
    while let Some(start) = text.find("#if_tag 0") {
        let end = text[start..].find("#endif_tag 0").expect("closed") + start;
        text.replace_range(start..end + "#endif_tag 0".len(), "");
    }
    text
}

/// A boolean expression of the API proxy's `#if_tag`: `!(a)`, `&(a,b,…)`, `|(a,b,…)`.
fn solve(expr: &str) -> bool {
    let expr = expr.trim();
    let args = |inner: &str| -> Vec<bool> {
        let mut parts = Vec::new();
        let (mut depth, mut from) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(solve(&inner[from..i]));
                    from = i + 1;
                }
                _ => {}
            }
        }
        parts.push(solve(&inner[from..]));
        parts
    };
    let inner = |e: &str| e[2..e.len() - 1].to_owned();
    match expr.chars().next() {
        Some('!') => !args(&inner(expr))[0],
        Some('&') => args(&inner(expr)).iter().all(|v| *v),
        Some('|') => args(&inner(expr)).iter().any(|v| *v),
        _ => expr != "0",
    }
}

/// The deployment's nginx configuration as the API proxy module would run it here, with the
/// module's variables `vars` (a top-layer-like device unless `IOTEDGE_PARENTHOSTNAME` is given).
fn render(dir: &Path, port: u16, socket: &Path, vars: &[(&str, &str)]) -> String {
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deployment/middle-layer-api-proxy.nginx.conf"
    ))
    .unwrap();
    let port = port.to_string();
    let mut all = vec![
        ("NGINX_DEFAULT_PORT", port.as_str()),
        ("IOTEDGE_MODULEID", "IoTEdgeAPIProxy"),
        ("TOKEN_VALIDITY_MINUTES", "10"),
        ("TOKEN_SERVER_PORT", "1"),
    ];
    all.extend_from_slice(vars);
    let text = api_proxy_render(&template, &all);
    assert!(!text.contains("${"), "every variable substituted: {text}");
    assert!(!text.contains("boolean_expression"), "{text}");
    let path = |name: &str| dir.join(name).display().to_string();
    let text = text
        .replace(
            "ssl_certificate server.crt;",
            &format!("ssl_certificate {};", path("server.pem")),
        )
        .replace(
            "ssl_certificate_key private_key_server.pem;",
            &format!("ssl_certificate_key {};", path("server.key")),
        )
        .replace(" trustedCA.crt;", &format!(" {};", path("root.pem")))
        .replace("/var/cache/nginx", &path("nginx/cache"))
        // Loopback only (a parent stand-in listens on another loopback address).
        .replace(
            &format!("listen {port} ssl"),
            &format!("listen 127.0.0.1:{port} ssl"),
        )
        .replace(
            "/var/run/edge-est/proxy.sock",
            &socket.display().to_string(),
        )
        .replace(
            "error_log /dev/stdout info;",
            &format!(
                "error_log {} info;\n  client_body_temp_path {};\n  proxy_temp_path {};",
                path("nginx/error.log"),
                path("nginx/body"),
                path("nginx/proxy")
            ),
        )
        .replace(
            "access_log /dev/stdout;",
            &format!("access_log {};", path("nginx/access.log")),
        );
    format!(
        "daemon off;\npid {};\nerror_log {} info;\n{text}",
        path("nginx/nginx.pid"),
        path("nginx/error.log")
    )
}

struct Nginx(Child);

impl Drop for Nginx {
    /// SIGTERM (the master stops its workers too), SIGKILL if that takes over 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_enrolls_through_nginx_and_cannot_forge_the_header() {
    let Some(nginx_bin) = nginx() else { return };
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    // nginx's workers may run as another user: they must reach the socket's directory.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["run", "nginx", "nginx/cache", "nginx/body", "nginx/proxy"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
        std::fs::set_permissions(dir.join(d), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let pki = Pki::generate_p256(dir);

    // edge-est: the TLS listener and the proxy socket.
    let socket = dir.join("run/proxy.sock");
    let mut config = standard_config(&pki);
    config.proxy_socket = Some(socket.clone());
    let app = edge_est::app::build(&config, dir).unwrap();
    let listener = edge_est::transport::Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener_addr = listener.local_addr();
    let proxy = edge_est::app::bind_proxy_socket(&config).unwrap().unwrap();
    let (stop_tls, stopped_tls) = oneshot::channel::<()>();
    let (stop_proxy, stopped_proxy) = oneshot::channel::<()>();
    let tls_task = tokio::spawn(edge_est::app::run(listener, app.clone(), async {
        let _ = stopped_tls.await;
    }));
    let proxy_task = tokio::spawn(edge_est::app::run_proxy_socket(proxy, app.clone(), async {
        let _ = stopped_proxy.await;
    }));

    // nginx in front of it, with the deployment's configuration.
    let port = free_port();
    let conf = dir.join("nginx/nginx.conf");
    std::fs::write(&conf, render(dir, port, &socket, &[])).unwrap();
    let test = Command::new(&nginx_bin)
        .args(["-t", "-q", "-e"])
        .arg(dir.join("nginx/error.log"))
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&test.stderr)
    );
    let _nginx = Nginx(
        Command::new(&nginx_bin)
            .arg("-e")
            .arg(dir.join("nginx/error.log"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // The child: a device certificate from the issuing CA, a CSR, and curl.
    let tls_addr = listener_addr;
    let device = common::enrolled_at(tls_addr, &pki.root.cert_pem, "device-7").await;
    std::fs::write(dir.join("device.pem"), &device.cert_pem).unwrap();
    std::fs::write(dir.join("device.key"), &device.key_pem).unwrap();
    let other = common::enrolled_at(tls_addr, &pki.root.cert_pem, "device-8").await;
    let forged =
        percent_encoding::utf8_percent_encode(&other.cert_pem, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    std::fs::write(
        dir.join("forged-header"),
        format!("x-ms-edge-clientcert: {forged}"),
    )
    .unwrap();
    let csr = |cn: &str| {
        let out = sh(
            &format!(
                "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                 -keyout {cn}.csr.key -subj /CN={cn} -outform DER -out {cn}.csr.der 2>/dev/null"
            ),
            dir,
        );
        assert!(out.status.success());
        format!("{cn}.csr.der")
    };
    let curl = |args: &str| -> (String, String) {
        let out = sh(
            &format!(
                "curl -s --cacert root.pem --resolve localhost:{port}:127.0.0.1 \
                 -o answer -w '%{{http_code}}' {args}"
            ),
            dir,
        );
        let body = std::fs::read_to_string(dir.join("answer")).unwrap_or_default();
        (stdout(&out), body)
    };
    let url = |path: &str| format!("https://localhost:{port}/.well-known/est/{path}");

    // Positive: the certificate from the TLS handshake with nginx authenticates.
    let request = csr("device-7");
    let (status, body) = curl(&format!(
        "--cert device.pem --key device.key -H 'Content-Type: application/pkcs10' \
         --data-binary @{request} {}",
        url("strict/simpleenroll")
    ));
    assert_eq!(status, "200", "{body}");
    let journal = edge_est::journal::Journal::read_all(app.journal().path()).unwrap();
    assert_eq!(journal.len(), 3, "the two first enrollments, then this one");
    assert!(
        journal[2].identity.contains("CN=device-7") && journal[2].subject.contains("device-7"),
        "{:?}",
        journal[2]
    );

    // A client that forges the header itself (no certificate in TLS): nginx replaces it with
    // its (empty) variable, so nothing arrives and edge-est asks for authentication.
    let request = csr("device-8");
    let (status, body) = curl(&format!(
        "-H @forged-header -H 'Content-Type: application/pkcs10' --data-binary @{request} {}",
        url("strict/simpleenroll")
    ));
    assert_eq!(status, "401", "{body}");
    assert!(body.contains("authentication required"), "{body}");
    // Control: the very same curl command straight at the socket (where the proxy's header
    // is believed) does authenticate as the forged certificate's device-8.
    let out = sh(
        &format!(
            "curl -s --unix-socket run/proxy.sock -o answer -w '%{{http_code}}' \
             -H @forged-header -H 'Content-Type: application/pkcs10' --data-binary @{request} \
             http://localhost/.well-known/est/strict/simpleenroll"
        ),
        dir,
    );
    assert_eq!(stdout(&out), "200", "the header file reaches the server");
    // ... and with its own certificate, the forged one does not replace it.
    let (status, body) = curl(&format!(
        "--cert device.pem --key device.key -H @forged-header \
         -H 'Content-Type: application/pkcs10' --data-binary @{request} {}",
        url("strict/simpleenroll")
    ));
    assert_eq!(status, "403", "device-7 may not ask for device-8: {body}");

    // A certificate from a CA the label does not trust is validated like a TLS one.
    let foreign = pki.foreign.valid_client("device-7");
    std::fs::write(dir.join("foreign.pem"), &foreign.cert_pem).unwrap();
    std::fs::write(dir.join("foreign.key"), &foreign.key_pem).unwrap();
    let request = csr("device-7");
    let (status, body) = curl(&format!(
        "--cert foreign.pem --key foreign.key -H 'Content-Type: application/pkcs10' \
         --data-binary @{request} {}",
        url("strict/simpleenroll")
    ));
    assert_eq!(status, "401", "{body}");
    assert!(body.contains("client certificate rejected"), "{body}");

    // Basic and anonymous cacerts pass through as well.
    let request = csr("basic-1");
    let (status, body) = curl(&format!(
        "-u estuser:estpass -H 'Content-Type: application/pkcs10' --data-binary @{request} {}",
        url("simpleenroll")
    ));
    assert_eq!(status, "200", "{body}");
    let (status, _) = curl(&url("cacerts"));
    assert_eq!(status, "200");
    assert_eq!(
        edge_est::journal::Journal::read_all(app.journal().path())
            .unwrap()
            .len(),
        5
    );

    let _ = stop_tls.send(());
    let _ = stop_proxy.send(());
    let _ = tls_task.await;
    let _ = proxy_task.await;
}

/// Starts nginx on `conf` after `nginx -t`, and waits for `port`.
fn start_nginx(bin: &Path, dir: &Path, conf: &Path, port: u16) -> Nginx {
    let test = Command::new(bin)
        .args(["-t", "-q", "-e"])
        .arg(dir.join("nginx/error.log"))
        .arg("-c")
        .arg(conf)
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "nginx -t: {}\n{}",
        String::from_utf8_lossy(&test.stderr),
        std::fs::read_to_string(conf).unwrap()
    );
    let nginx = Nginx(
        Command::new(bin)
            .arg("-e")
            .arg(dir.join("nginx/error.log"))
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    nginx
}

/// An HTTP server (TLS with `tls`) on `addr` answering every request with `NAME REQUEST-LINE`.
async fn echo(
    name: &'static str,
    addr: SocketAddr,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        name: &str,
        mut stream: S,
    ) {
        let mut request = Vec::new();
        let mut chunk = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        let text = String::from_utf8_lossy(&request);
        let body = format!("{name} {}", text.lines().next().unwrap_or_default());
        let _ = stream
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        let _ = stream.shutdown().await;
    }
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(config) => {
                        if let Ok(stream) =
                            tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                        {
                            answer(name, stream).await;
                        }
                    }
                    None => answer(name, tcp).await,
                }
            });
        }
    })
}

/// The API proxy's documented variables keep working with the deployment's `proxy_config`:
/// `BLOB_UPLOAD_ROUTE_ADDRESS` (requests with `x-ms-version`), `DOCKER_REQUEST_ROUTE_ADDRESS`
/// (`/v2`), `CONNECTED_ACR_ROUTE_ADDRESS` (`/v2`, `/acr`), the parent (`/v2` and blob uploads
/// forwarded to `IOTEDGE_PARENTHOSTNAME` when there is no local route, its name checked as
/// `IOTEDGE_MODULEID`), `NGINX_DEFAULT_TLS` / `NGINX_DEFAULT_CIPHERS`; EST keeps its route in
/// every combination. Real nginx, stand-ins answering with their name and the request line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_proxy_variables_keep_their_routes() {
    let Some(nginx_bin) = nginx() else { return };
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["run", "nginx", "nginx/cache", "nginx/body", "nginx/proxy"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
        std::fs::set_permissions(dir.join(d), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let pki = Pki::generate_p256(dir);
    let socket = dir.join("run/proxy.sock");
    let mut config = standard_config(&pki);
    config.proxy_socket = Some(socket.clone());
    let app = edge_est::app::build(&config, dir).unwrap();
    let proxy = edge_est::app::bind_proxy_socket(&config).unwrap().unwrap();
    let (stop_proxy, stopped_proxy) = oneshot::channel::<()>();
    let proxy_task = tokio::spawn(edge_est::app::run_proxy_socket(proxy, app.clone(), async {
        let _ = stopped_proxy.await;
    }));

    // Stand-ins: blob storage, the registry module, a connected registry (plain HTTP), and
    // the parent's API proxy (TLS as IoTEdgeAPIProxy, on 127.0.0.2 at the same port).
    let port = free_port();
    let (blob, registry, acr) = (free_port(), free_port(), free_port());
    let _blob = echo("blob", ([127, 0, 0, 1], blob).into(), None).await;
    let _registry = echo("registry", ([127, 0, 0, 1], registry).into(), None).await;
    let _acr = echo("acr", ([127, 0, 0, 1], acr).into(), None).await;
    let parent_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["IoTEdgeAPIProxy".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "gw-top");
    let parent_cert = params.signed_by(&parent_key, &pki.issuing.issuer).unwrap();
    let parent_tls = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![
                parent_cert.der().clone(),
                rustls::pki_types::CertificateDer::from_pem_slice(pki.issuing.cert_pem.as_bytes())
                    .unwrap(),
            ],
            rustls::pki_types::PrivateKeyDer::from_pem_slice(parent_key.serialize_pem().as_bytes())
                .unwrap(),
        )
        .unwrap(),
    );
    let _parent = echo("parent", ([127, 0, 0, 2], port).into(), Some(parent_tls)).await;

    let blob_addr = format!("127.0.0.1:{blob}");
    let registry_addr = format!("127.0.0.1:{registry}");
    let acr_addr = format!("127.0.0.1:{acr}");
    let path_of = |path: &str, extra: &str| -> String {
        let out = sh(
            &format!(
                "curl -s --cacert root.pem --resolve localhost:{port}:127.0.0.1 {extra} \
                 https://localhost:{port}{path}"
            ),
            dir,
        );
        stdout(&out)
    };
    // (what, the module's variables, [(path, curl options, the stand-in's answer)])
    type Route<'a> = (&'a str, &'a str, &'a str);
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<Route<'a>>);
    let cases: Vec<Case> = vec![
        (
            "blob and registry modules on this layer",
            vec![
                ("BLOB_UPLOAD_ROUTE_ADDRESS", &blob_addr),
                ("DOCKER_REQUEST_ROUTE_ADDRESS", &registry_addr),
            ],
            vec![
                (
                    "/container/b1?comp=block",
                    "-H 'x-ms-version: 2020-04-08'",
                    "blob GET /container/b1?comp=block HTTP/1.1",
                ),
                (
                    "/v2/edge-est/manifests/0.1.0-amd64",
                    "",
                    "registry GET /v2/edge-est/manifests/0.1.0-amd64 HTTP/1.1",
                ),
            ],
        ),
        (
            "a connected registry",
            vec![("CONNECTED_ACR_ROUTE_ADDRESS", &acr_addr)],
            vec![
                ("/v2/", "", "acr GET /v2/ HTTP/1.1"),
                ("/acr/v1/_tokens", "", "acr GET /acr/v1/_tokens HTTP/1.1"),
            ],
        ),
        (
            "a middle layer: everything from the parent",
            vec![("IOTEDGE_PARENTHOSTNAME", "127.0.0.2")],
            vec![
                (
                    "/v2/azureiotedge-agent/manifests/1.5",
                    "",
                    "parent GET /v2/azureiotedge-agent/manifests/1.5 HTTP/1.1",
                ),
                (
                    "/container/b2",
                    "-H 'x-ms-version: 2020-04-08'",
                    "parent GET /container/b2 HTTP/1.1",
                ),
            ],
        ),
        (
            "a middle layer with its own blob module",
            vec![
                ("IOTEDGE_PARENTHOSTNAME", "127.0.0.2"),
                ("BLOB_UPLOAD_ROUTE_ADDRESS", &blob_addr),
            ],
            vec![
                (
                    "/container/b3",
                    "-H 'x-ms-version: 2020-04-08'",
                    "blob GET /container/b3 HTTP/1.1",
                ),
                ("/v2/", "", "parent GET /v2/ HTTP/1.1"),
            ],
        ),
    ];
    for (what, vars, routes) in cases {
        let conf = dir.join("nginx/nginx.conf");
        std::fs::write(&conf, render(dir, port, &socket, &vars)).unwrap();
        let nginx = start_nginx(&nginx_bin, dir, &conf, port);
        for (path, extra, want) in routes {
            assert_eq!(path_of(path, extra), want, "{what}: {path}");
        }
        // EST keeps its route whatever the variables.
        assert_eq!(
            path_of("/.well-known/est/cacerts", "-o /dev/null -w '%{http_code}'"),
            "200",
            "{what}"
        );
        drop(nginx);
    }

    // ssl_protocols follows NGINX_DEFAULT_TLS (TLSv1.2 by default), ssl_ciphers
    // NGINX_DEFAULT_CIPHERS.
    let status = |extra: &str| {
        path_of(
            "/.well-known/est/cacerts",
            &format!("-o /dev/null -w '%{{http_code}}' {extra}"),
        )
    };
    for (vars, tls12, tls13) in [
        (vec![], "200", "000"),
        (vec![("NGINX_DEFAULT_TLS", "TLSv1.3")], "000", "200"),
        (vec![("NGINX_DEFAULT_TLS", "TLSv1.2 TLSv1.3")], "200", "200"),
    ] {
        let conf = dir.join("nginx/nginx.conf");
        std::fs::write(&conf, render(dir, port, &socket, &vars)).unwrap();
        let nginx = start_nginx(&nginx_bin, dir, &conf, port);
        assert_eq!(status("--tlsv1.2 --tls-max 1.2"), tls12, "{vars:?}");
        assert_eq!(status("--tlsv1.3"), tls13, "{vars:?}");
        drop(nginx);
    }
    let conf = dir.join("nginx/nginx.conf");
    let ciphers = render(
        dir,
        port,
        &socket,
        &[("NGINX_DEFAULT_CIPHERS", "ECDHE-ECDSA-AES256-GCM-SHA384")],
    );
    assert!(ciphers.contains("ssl_ciphers ECDHE-ECDSA-AES256-GCM-SHA384;"));
    std::fs::write(&conf, ciphers).unwrap();
    let nginx = start_nginx(&nginx_bin, dir, &conf, port);
    assert_eq!(
        status("--tls-max 1.2 --ciphers ECDHE-ECDSA-AES256-GCM-SHA384"),
        "200"
    );
    assert_eq!(
        status("--tls-max 1.2 --ciphers ECDHE-ECDSA-AES128-GCM-SHA256"),
        "000"
    );
    drop(nginx);
    assert!(!render(dir, port, &socket, &[]).contains("ssl_ciphers"));

    let _ = stop_proxy.send(());
    let _ = proxy_task.await;
}
