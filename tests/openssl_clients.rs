//! EST over the wire with stock tools only: curl sends every request, `openssl req` makes the
//! keys and CSRs, and `openssl base64 / pkcs7 / x509 / verify / asn1parse / pkey / s_client`
//! read every answer. Nothing here trusts the server's own codecs.

mod common;

use std::path::Path;

use common::{
    curl, openssl_verify, sh, start_standard, stderr, stdout, TestServer, PASSWORD, USER,
};

/// A curl answer with its headers (from `-D`; the last header block when there are several).
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// curl through the harness, also recording the answer's headers in `<tag>.hdr`.
fn curl_full(server: &TestServer, tag: &str, args: &[&str]) -> Reply {
    let header_file = format!("{tag}.hdr");
    let mut all = vec!["-D", header_file.as_str()];
    all.extend_from_slice(args);
    let (status, body) = curl(server, &all);
    let raw = std::fs::read_to_string(server.dir.join(&header_file)).unwrap_or_default();
    let last_block = raw.rsplit("HTTP/").next().unwrap_or_default();
    let headers = last_block
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body,
    }
}

/// Runs a shell script in `dir`, panicking with its output unless it succeeds.
fn must(script: &str, dir: &Path) -> String {
    let out = sh(script, dir);
    assert!(
        out.status.success(),
        "`{script}` failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn basic_user() -> String {
    format!("{USER}:{PASSWORD}")
}

/// A key and a PEM CSR for `/CN=<cn>` made by `openssl req`: `<name>.key`, `<name>.csr`.
fn openssl_csr(dir: &Path, name: &str, cn: &str, newkey: &str) {
    must(
        &format!("openssl req -new -newkey {newkey} -nodes -keyout {name}.key -subj '/CN={cn}' -out {name}.csr"),
        dir,
    );
}

/// Decodes a base64 certs-only answer saved as `<name>.b64` into `<name>.pem` (first
/// certificate only) and returns the `-print_certs` text of all of them.
fn decode_certs_only(dir: &Path, name: &str, body: &str) -> String {
    std::fs::write(dir.join(format!("{name}.b64")), body).unwrap();
    let all = must(
        &format!("openssl base64 -d -in {name}.b64 | openssl pkcs7 -inform DER -print_certs"),
        dir,
    );
    must(&format!("openssl base64 -d -in {name}.b64 | openssl pkcs7 -inform DER -print_certs -out {name}.all.pem"), dir);
    // The first certificate alone.
    must(
        &format!("openssl x509 -in {name}.all.pem -out {name}.pem"),
        dir,
    );
    all
}

fn subjects(print_certs: &str) -> Vec<String> {
    print_certs
        .lines()
        .filter_map(|l| l.strip_prefix("subject="))
        .map(|s| s.trim().to_owned())
        .collect()
}

/// GET cacerts, checked, and saved as `chain.pem` (issuing CA, then root).
fn fetch_chain(server: &TestServer) {
    let reply = curl_full(server, "cacerts", &[&server.url("cacerts")]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/pkcs7-mime"));
    let printed = decode_certs_only(&server.dir, "cacerts", &reply.body);
    assert_eq!(
        subjects(&printed),
        ["CN = edge-est test issuing CA", "CN = edge-est test root"],
        "{printed}"
    );
    std::fs::write(server.dir.join("chain.pem"), printed).unwrap();
}

/// Checks an enrollment answer and the certificate in it: the media type, `openssl verify`
/// against the root with the cacerts chain, the subject CN and EKU clientAuth. Leaves the
/// certificate in `<name>.pem`.
fn check_issued(server: &TestServer, reply: &Reply, name: &str, cn: &str) {
    assert_eq!(reply.status, 200, "{name}: {}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/pkcs7-mime; smime-type=certs-only"),
        "{name}"
    );
    let printed = decode_certs_only(&server.dir, name, &reply.body);
    assert_eq!(
        subjects(&printed).len(),
        1,
        "{name}: only the issued certificate: {printed}"
    );
    assert!(
        openssl_verify(&server.dir, "root.pem", "chain.pem", &format!("{name}.pem")),
        "{name} must verify"
    );
    let subject = must(
        &format!("openssl x509 -in {name}.pem -noout -subject"),
        &server.dir,
    );
    assert_eq!(subject.trim(), format!("subject=CN = {cn}"), "{name}");
    let text = must(
        &format!("openssl x509 -in {name}.pem -noout -text"),
        &server.dir,
    );
    let eku = text
        .split("X509v3 Extended Key Usage")
        .nth(1)
        .unwrap_or_else(|| panic!("{name} has no EKU: {text}"));
    assert!(
        eku.lines()
            .nth(1)
            .unwrap_or_default()
            .contains("TLS Web Client Authentication"),
        "{name}: {text}"
    );
    assert!(
        text.contains("CA:FALSE") || !text.contains("CA:TRUE"),
        "{name} is no CA: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cacerts_is_the_issuing_ca_then_the_root() {
    let (_dir, _pki, server) = start_standard().await;
    fetch_chain(&server);
    // The issuing CA is signed by the root, which is self-signed.
    assert!(
        openssl_verify(&server.dir, "root.pem", "root.pem", "chain.pem"),
        "the issuing CA verifies"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simpleenroll_with_openssl_csrs_in_every_body_encoding() {
    let (_dir, _pki, server) = start_standard().await;
    let dir = server.dir.clone();
    fetch_chain(&server);
    for (alg, newkey) in [
        ("ec", "ec -pkeyopt ec_paramgen_curve:P-256"),
        ("rsa", "rsa:2048"),
    ] {
        let base = format!("dev-{alg}");
        openssl_csr(&dir, &base, &base, newkey);
        must(
            &format!("openssl req -in {base}.csr -outform DER -out {base}.der"),
            &dir,
        );
        // Plain base64 of the DER in 64-column lines, and the same on one line without newline.
        must(
            &format!("openssl base64 -in {base}.der -out {base}.b64lines"),
            &dir,
        );
        must(
            &format!("openssl base64 -A -in {base}.der -out {base}.b64one"),
            &dir,
        );
        let one_line = std::fs::read(dir.join(format!("{base}.b64one"))).unwrap();
        assert!(
            !one_line.contains(&b'\n') && one_line.len() > 64,
            "one line without newlines"
        );
        for body in ["csr", "b64lines", "b64one"] {
            let file = format!("@{base}.{body}");
            let reply = curl_full(
                &server,
                &format!("{base}-{body}"),
                &[
                    "-u",
                    &basic_user(),
                    "-H",
                    "Content-Type: application/pkcs10",
                    "--data-binary",
                    &file,
                    &server.url("simpleenroll"),
                ],
            );
            check_issued(&server, &reply, &format!("{base}-{body}-cert"), &base);
            // The certificate certifies the CSR's key.
            let csr_key = must(&format!("openssl req -in {base}.csr -noout -pubkey"), &dir);
            let cert_key = must(
                &format!("openssl x509 -in {base}-{body}-cert.pem -noout -pubkey"),
                &dir,
            );
            assert_eq!(csr_key, cert_key, "{base} {body}");
        }
    }
    assert_eq!(server.journal().len(), 6);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simplereenroll_with_the_issued_certificate_as_curl_client_certificate() {
    let (_dir, _pki, server) = start_standard().await;
    let dir = server.dir.clone();
    fetch_chain(&server);
    let p256 = "ec -pkeyopt ec_paramgen_curve:P-256";
    openssl_csr(&dir, "dev9", "dev9", p256);
    let reply = curl_full(
        &server,
        "enroll",
        &[
            "-u",
            &basic_user(),
            "-H",
            "Content-Type: application/pkcs10",
            "--data-binary",
            "@dev9.csr",
            &server.url("simpleenroll"),
        ],
    );
    check_issued(&server, &reply, "dev9-cert", "dev9");

    // Renewal: new key, same subject, the issued certificate and its key as TLS client
    // certificate, no password.
    openssl_csr(&dir, "renew", "dev9", p256);
    let as_device = [
        "--cert",
        "dev9-cert.pem",
        "--key",
        "dev9.key",
        "-H",
        "Content-Type: application/pkcs10",
    ];
    let mut args = as_device.to_vec();
    let url = server.url("simplereenroll");
    args.extend(["--data-binary", "@renew.csr", url.as_str()]);
    let reply = curl_full(&server, "reenroll", &args);
    check_issued(&server, &reply, "renewed", "dev9");
    let old = must("openssl x509 -in dev9-cert.pem -noout -serial", &dir);
    let new = must("openssl x509 -in renewed.pem -noout -serial", &dir);
    assert_ne!(old, new, "a new certificate");

    // The same with a CSR for another subject: refused, saying so.
    openssl_csr(&dir, "moved", "dev10", p256);
    let mut args = as_device.to_vec();
    args.extend(["--data-binary", "@moved.csr", url.as_str()]);
    let reply = curl_full(&server, "reenroll-moved", &args);
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert!(reply
        .header("content-type")
        .unwrap_or_default()
        .starts_with("text/plain"));
    assert!(
        reply.body.contains("simplereenroll must keep the subject")
            && reply.body.contains("CN=dev10")
            && reply.body.contains("CN=dev9"),
        "{}",
        reply.body
    );
    assert_eq!(
        server.journal().len(),
        2,
        "the refused renewal issued nothing"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csrattrs_lists_the_configured_oids_and_strict_has_none() {
    let (_dir, _pki, server) = start_standard().await;
    let reply = curl_full(&server, "csrattrs", &[&server.url("csrattrs")]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/csrattrs"));
    std::fs::write(server.dir.join("csrattrs.b64"), &reply.body).unwrap();
    must(
        "openssl base64 -d -in csrattrs.b64 -out csrattrs.der",
        &server.dir,
    );
    let parsed = must(
        "openssl asn1parse -inform DER -in csrattrs.der",
        &server.dir,
    );
    let objects: Vec<&str> = parsed
        .lines()
        .filter_map(|l| l.split("OBJECT").nth(1))
        .map(|o| o.trim_start_matches([' ', ':']))
        .collect();
    // SEQUENCE { ecdsa-with-SHA256, SEQUENCE { ecPublicKey, SET { prime256v1 } } }
    assert_eq!(
        objects,
        ["ecdsa-with-SHA256", "id-ecPublicKey", "prime256v1"],
        "{parsed}"
    );
    assert!(parsed.contains("SET"), "{parsed}");

    // Label `strict` asks for nothing: 204 with no body (and no authentication needed).
    let reply = curl_full(
        &server,
        "strict-csrattrs",
        &[&server.url("strict/csrattrs")],
    );
    assert_eq!(reply.status, 204, "{}", reply.body);
    assert!(reply.body.is_empty(), "{}", reply.body);
    server.stop().await;
}

/// The parts of a multipart/mixed body: (headers, content), in order.
fn multipart_parts(content_type: &str, body: &str) -> Vec<(Vec<(String, String)>, String)> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .unwrap_or_else(|| panic!("no boundary in {content_type}"))
        .trim_matches('"');
    let delimiter = format!("--{boundary}");
    let (_, rest) = body.split_once(&delimiter).expect("first delimiter");
    let (parts, _) = rest
        .split_once(&format!("{delimiter}--"))
        .expect("close delimiter");
    parts
        .split(&delimiter)
        .map(|part| {
            let part = part.trim_start_matches("\r\n");
            let (head, content) = part.split_once("\r\n\r\n").expect("part headers end");
            let headers = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            (headers, content.replace('\r', ""))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serverkeygen_returns_a_pkcs8_key_and_its_certificate() {
    let (_dir, _pki, server) = start_standard().await;
    let dir = server.dir.clone();
    fetch_chain(&server);
    openssl_csr(&dir, "kg", "dev-kg", "ec -pkeyopt ec_paramgen_curve:P-256");
    let reply = curl_full(
        &server,
        "serverkeygen",
        &[
            "-u",
            &basic_user(),
            "-H",
            "Content-Type: application/pkcs10",
            "--data-binary",
            "@kg.csr",
            &server.url("serverkeygen"),
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let content_type = reply.header("content-type").unwrap_or_default().to_owned();
    assert!(
        content_type.starts_with("multipart/mixed; boundary="),
        "{content_type}"
    );
    let parts = multipart_parts(&content_type, &reply.body);
    assert_eq!(parts.len(), 2, "{}", reply.body);
    let part_type = |i: usize| {
        parts[i]
            .0
            .iter()
            .find(|(n, _)| n == "content-type")
            .map(|(_, v)| v.clone())
    };
    assert_eq!(part_type(0).as_deref(), Some("application/pkcs8"));
    assert!(
        part_type(1)
            .unwrap_or_default()
            .starts_with("application/pkcs7-mime"),
        "{:?}",
        part_type(1)
    );

    std::fs::write(dir.join("genkey.b64"), &parts[0].1).unwrap();
    must("openssl base64 -d -in genkey.b64 -out genkey.der", &dir);
    must(
        "openssl pkey -inform DER -in genkey.der -out genkey.pem",
        &dir,
    );
    let check = must("openssl pkey -in genkey.pem -noout -text", &dir);
    assert!(
        check.contains("prime256v1") || check.contains("P-256"),
        "an EC P-256 key: {check}"
    );

    let printed = decode_certs_only(&dir, "kgcert", &parts[1].1);
    assert_eq!(subjects(&printed), ["CN = dev-kg"], "{printed}");
    assert!(openssl_verify(&dir, "root.pem", "chain.pem", "kgcert.pem"));
    let key_pub = must("openssl pkey -in genkey.pem -pubout", &dir);
    let cert_pub = must("openssl x509 -in kgcert.pem -pubkey -noout", &dir);
    let csr_pub = must("openssl req -in kg.csr -pubkey -noout", &dir);
    assert_eq!(
        key_pub, cert_pub,
        "the certificate certifies the returned key"
    );
    assert_ne!(cert_pub, csr_pub, "and not the CSR's key");
    assert_eq!(server.journal().len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_below_1_2_is_refused() {
    let (_dir, _pki, server) = start_standard().await;
    let connect = format!("127.0.0.1:{}", server.addr.port());
    let s_client = |version: &str| {
        let out = sh(
            &format!(
                "openssl s_client -connect {connect} -servername localhost -CAfile root.pem {version} -cipher DEFAULT@SECLEVEL=0 </dev/null"
            ),
            &server.dir,
        );
        (
            out.status.success(),
            format!("{}{}", stdout(&out), stderr(&out)),
        )
    };
    for (flag, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, text) = s_client(flag);
        assert!(ok, "{flag} must handshake: {text}");
        assert!(
            text.contains(&format!("New, {name}, Cipher is")),
            "{flag}: {text}"
        );
        // The session summary (printed for TLS 1.3 only once a ticket arrived) agrees.
        for protocol in text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Protocol  :"))
        {
            assert_eq!(protocol.trim(), name, "{flag}: {text}");
        }
        assert!(
            text.contains("Verify return code: 0 (ok)"),
            "{flag}: {text}"
        );
    }
    let (ok, text) = s_client("-tls1_1");
    assert!(!ok, "TLS 1.1 must not handshake: {text}");
    // The server answers the TLS 1.1 ClientHello with an alert: no certificate, no cipher.
    assert!(text.contains("New, (NONE), Cipher is (NONE)"), "{text}");
    assert!(text.contains("no peer certificate available"), "{text}");
    assert!(
        text.contains("SSL alert number"),
        "the server sent an alert: {text}"
    );
    server.stop().await;
}
