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
use tokio::sync::oneshot;

fn nginx() -> Option<PathBuf> {
    common::tool("nginx", "nginx-light")
}

/// The deployment's nginx configuration as the API proxy module would run it here.
fn render(dir: &Path, port: u16, socket: &Path) -> String {
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deployment/middle-layer-api-proxy.nginx.conf"
    ))
    .unwrap();
    // A top-layer-like device: no parent, so the #if_tag ${IOTEDGE_PARENTHOSTNAME} block goes.
    let mut text = template
        .replace("${NGINX_DEFAULT_PORT}", &port.to_string())
        .replace("${IOTEDGE_PARENTHOSTNAME}", "0")
        .replace("${IOTEDGE_MODULEID}", "IoTEdgeAPIProxy")
        .replace("${TOKEN_VALIDITY_MINUTES}", "10")
        .replace("${TOKEN_SERVER_PORT}", "1");
    while let Some(start) = text.find("#if_tag 0") {
        let end = text[start..].find("#endif_tag 0").expect("closed") + start;
        text.replace_range(start..end + "#endif_tag 0".len(), "");
    }
    assert!(!text.contains("${"), "every variable substituted: {text}");
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
    fn drop(&mut self) {
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
    std::fs::write(&conf, render(dir, port, &socket)).unwrap();
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
    let device = pki.issuing.valid_client("device-7");
    std::fs::write(dir.join("device.pem"), &device.cert_pem).unwrap();
    std::fs::write(dir.join("device.key"), &device.key_pem).unwrap();
    let other = pki.issuing.valid_client("device-8");
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
    assert_eq!(journal.len(), 1);
    assert!(
        journal[0].identity.contains("CN=device-7") && journal[0].subject.contains("device-7"),
        "{:?}",
        journal[0]
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
        3
    );

    let _ = stop_tls.send(());
    let _ = stop_proxy.send(());
    let _ = tls_task.await;
    let _ = proxy_task.await;
}
