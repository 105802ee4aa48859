//! `/metrics` on its own plain-HTTP listener: the exposition parses as Prometheus text (with
//! the `prometheus-parse` crate, and every line accounted for), every series carries the IoT
//! Edge labels, and the counters equal the requests this test sent. The listener answers only
//! `GET /metrics`, and cuts off slow or oversized requests.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::client::{basic, iot_edge_body, Answer, EstClient};
use common::{csr, standard_config, Pki, PASSWORD, USER};
use edge_est::demo::{self, Layer, CHILD_PASSWORD, CHILD_USER};
use prometheus_parse::{LineInfo, Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn enroll(
    client: &EstClient,
    auth: &[(&'static str, String)],
    path: &str,
    cn: &str,
) -> Answer {
    let mut headers = vec![("content-type", "application/pkcs10".to_owned())];
    headers.extend(auth.iter().cloned());
    client
        .request("POST", path, &headers, iot_edge_body(&csr(cn)))
        .await
}

/// One plain HTTP/1.1 exchange with `Connection: close`: (status line, headers, body).
async fn http(addr: SocketAddr, request: &str) -> (String, String, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_lowercase(), body.to_owned())
}

/// Parses an exposition strictly: every line must be a comment, a HELP, a TYPE or a sample
/// the parser understands; then the parser's view of it.
fn parse(text: &str) -> Scrape {
    for line in text.lines() {
        assert!(
            !matches!(LineInfo::parse(line), LineInfo::Ignored),
            "not Prometheus text: {line:?}"
        );
    }
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    for sample in &scrape.samples {
        assert!(sample.metric.starts_with("edgeest_"), "{}", sample.metric);
        for label in ["iothub", "edge_device", "instance_number"] {
            assert!(
                sample.labels.get(label).is_some(),
                "{} lacks {label}: {:?}",
                sample.metric,
                sample.labels
            );
        }
        assert_eq!(
            sample.labels.get("instance_number"),
            Some(edge_est::metrics::instance_number())
        );
        let base = sample
            .metric
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            scrape.docs.contains_key(base),
            "no HELP for {}",
            sample.metric
        );
    }
    scrape
}

/// The value of a counter or gauge whose labels include all of `labels`.
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{metric} is not a counter or gauge: {other:?}"),
        })
}

/// The observation count of a histogram series, after checking its buckets are cumulative
/// and end with +Inf equal to `_count`.
fn histogram_count(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let sample = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))?;
    let Value::Histogram(buckets) = &sample.value else {
        panic!("{metric} is not a histogram: {:?}", sample.value);
    };
    assert!(buckets
        .windows(2)
        .all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count));
    let last = buckets.last().unwrap();
    assert!(last.less_than.is_infinite());
    let count = value_of_suffix(scrape, &format!("{metric}_count"), labels);
    assert_eq!(Some(last.count), count, "+Inf bucket equals {metric}_count");
    count
}

fn value_of_suffix(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let config = standard_config(&pki);
    let app = edge_est::app::build(&config, dir.path()).unwrap();
    app.set_config_version(17);
    let listener = edge_est::transport::Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, metrics_addr) = (
        listener.local_addr(),
        metrics_listener.local_addr().unwrap(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(edge_est::app::serve(
        listener,
        Some(metrics_listener),
        app.clone(),
        async {
            let _ = stopped.await;
        },
    ));

    // What this test sends; each request on a connection of its own (one TLS handshake).
    let client = EstClient::new(addr, &pki.root.cert_pem, None);
    let mut expected: HashMap<(&str, &str, &str), f64> = HashMap::new();
    let mut expect = |label: &'static str, op: &'static str, status: &'static str| {
        *expected.entry((label, op, status)).or_default() += 1.0;
    };
    for _ in 0..3 {
        assert_eq!(
            client
                .request("GET", "cacerts", &[], Vec::new())
                .await
                .status,
            200
        );
        expect("(unlabeled)", "cacerts", "200");
    }
    for i in 0..2 {
        let answer = enroll(
            &client,
            &[basic(USER, PASSWORD)],
            "simpleenroll",
            &format!("m{i}"),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        expect("(unlabeled)", "simpleenroll", "200");
    }
    assert_eq!(
        enroll(&client, &[basic(USER, "wrong")], "simpleenroll", "m9")
            .await
            .status,
        401
    );
    expect("(unlabeled)", "simpleenroll", "401");
    assert_eq!(
        client
            .request("GET", "nolabel/cacerts", &[], Vec::new())
            .await
            .status,
        404
    );
    expect("-", "cacerts", "404");
    assert_eq!(
        client
            .request("GET", "simpleenroll", &[], Vec::new())
            .await
            .status,
        405
    );
    expect("(unlabeled)", "simpleenroll", "405");
    assert_eq!(
        client
            .request("GET", "csrattrs", &[], Vec::new())
            .await
            .status,
        200
    );
    expect("(unlabeled)", "csrattrs", "200");
    assert_eq!(
        client
            .request("GET", "strict/cacerts", &[], Vec::new())
            .await
            .status,
        200
    );
    expect("strict", "cacerts", "200");

    // Connections end on the server's side a moment after the client is done.
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.metrics().active_connections() != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (status, headers, body) = http(
        metrics_addr,
        "GET /metrics HTTP/1.1\r\nhost: edgeest:9600\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    let scrape = parse(&body);

    let mut total = 0.0;
    for sample in scrape
        .samples
        .iter()
        .filter(|s| s.metric == "edgeest_requests_total")
    {
        let key = (
            sample.labels.get("label").unwrap(),
            sample.labels.get("operation").unwrap(),
            sample.labels.get("status").unwrap(),
        );
        let Value::Counter(n) = sample.value else {
            panic!("requests_total is a counter");
        };
        assert_eq!(expected.get(&key).copied(), Some(n), "{key:?} in\n{body}");
        total += n;
    }
    assert_eq!(total, expected.values().sum::<f64>());
    assert_eq!(total, 10.0);
    assert_eq!(
        value(&scrape, "edgeest_tls_handshakes_total", &[]),
        Some(10.0)
    );
    assert_eq!(
        histogram_count(
            &scrape,
            "edgeest_issuance_duration_seconds",
            &[("label", "(unlabeled)"), ("backend", "local")]
        ),
        Some(2.0)
    );
    assert_eq!(value(&scrape, "edgeest_active_connections", &[]), Some(0.0));
    for scope in ["address", "identity"] {
        assert_eq!(
            value(&scrape, "edgeest_rate_limited_total", &[("scope", scope)]),
            Some(0.0)
        );
    }
    assert_eq!(
        value(
            &scrape,
            "edgeest_connections_refused_total",
            &[("reason", "capacity")]
        ),
        Some(0.0)
    );
    assert_eq!(value(&scrape, "edgeest_config_version", &[]), Some(17.0));
    let year = 365.0 * 86_400.0;
    let server_left = value(&scrape, "edgeest_server_certificate_expiry_seconds", &[]).unwrap();
    // (The test PKI's server certificate has rcgen's default validity: until 4096.)
    assert!(server_left > year, "{server_left}");
    for label in ["(unlabeled)", "strict"] {
        let left = value(
            &scrape,
            "edgeest_issuer_expiry_seconds",
            &[("label", label)],
        )
        .unwrap();
        assert!(left > 9.0 * year, "{label}: {left}");
    }
    // No upstream on this server: the cache counters exist and are 0.
    assert_eq!(
        value(&scrape, "edgeest_cacerts_cache_hits_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(&scrape, "edgeest_cacerts_cache_misses_total", &[]),
        Some(0.0)
    );

    // Only GET /metrics.
    let (status, headers, _) = http(
        metrics_addr,
        "POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(headers.contains("allow: get"), "{headers}");
    let (status, _, _) = http(
        metrics_addr,
        "GET /.well-known/est/cacerts HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    // Oversized headers are refused, not buffered.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nhost: x\r\nx-big: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut tcp = TcpStream::connect(metrics_addr).await.unwrap();
    let _ = tcp.write_all(huge.as_bytes()).await;
    let mut raw = Vec::new();
    // Answered or closed at once: a listener that hangs on it fails here (a reset counts as
    // closed).
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut raw))
        .await
        .expect("oversized headers left hanging, neither answered nor closed");
    let answer = String::from_utf8_lossy(&raw);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer}"
    );
    // A scraper that trickles its request is cut off after the listener's header timeout.
    let mut slow = TcpStream::connect(metrics_addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /met").await.unwrap();
    let mut one = [0u8; 64];
    let cut = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match slow.read(&mut one).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the slow scraper was not cut off");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The scrape itself is no EST request: the EST counters did not move.
    let again = parse(&app.render_metrics());
    assert_eq!(
        value(&again, "edgeest_tls_handshakes_total", &[]),
        Some(10.0)
    );

    let _ = stop.send(());
    task.await.unwrap();
    // Shut down: the metrics listener is gone too.
    assert!(TcpStream::connect(metrics_addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_layer_reports_upstream_latency_failures_and_cache_use() {
    let dir = tempfile::tempdir().unwrap();
    demo::write_pki(dir.path()).unwrap();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let top = Layer::start("top", dir.path(), &demo::top_config(), any)
        .await
        .unwrap();
    let bottom_config = demo::forward_config("bottom", top.addr.port(), "layer2-ra", None);
    let bottom = Layer::start("bottom", dir.path(), &bottom_config, any)
        .await
        .unwrap();
    let root = std::fs::read_to_string(dir.path().join("root.pem")).unwrap();
    let child = EstClient::new(bottom.addr, &root, None);
    let password = [basic(CHILD_USER, CHILD_PASSWORD)];

    for i in 0..2 {
        let answer = enroll(&child, &password, "simpleenroll", &format!("fw{i}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    for _ in 0..2 {
        assert_eq!(
            child
                .request("GET", "cacerts", &[], Vec::new())
                .await
                .status,
            200
        );
    }
    top.stop().await;
    let away = enroll(&child, &password, "simpleenroll", "fw-away").await;
    assert_eq!(away.status, 503, "{}", away.text());

    let scrape = parse(&bottom.app.render_metrics());
    let upstream = ("upstream", "parent");
    assert_eq!(
        histogram_count(
            &scrape,
            "edgeest_upstream_request_duration_seconds",
            &[upstream, ("operation", "simpleenroll")]
        ),
        Some(3.0)
    );
    assert_eq!(
        histogram_count(
            &scrape,
            "edgeest_upstream_request_duration_seconds",
            &[upstream, ("operation", "cacerts")]
        ),
        Some(1.0),
        "the second cacerts came from cache"
    );
    assert_eq!(
        value(&scrape, "edgeest_cacerts_cache_misses_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(&scrape, "edgeest_cacerts_cache_hits_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &scrape,
            "edgeest_upstream_failures_total",
            &[upstream, ("reason", "unreachable")]
        ),
        Some(1.0)
    );
    assert_eq!(
        histogram_count(
            &scrape,
            "edgeest_issuance_duration_seconds",
            &[("label", "(unlabeled)"), ("backend", "upstream")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &scrape,
            "edgeest_requests_total",
            &[("operation", "simpleenroll"), ("status", "503")]
        ),
        Some(1.0)
    );
    // The upstream's issuing CA, known from the cached cacerts, is ten years from expiry.
    let left = value(
        &scrape,
        "edgeest_issuer_expiry_seconds",
        &[("label", "(unlabeled)")],
    )
    .unwrap();
    assert!(left > 9.0 * 365.0 * 86_400.0, "{left}");
    bottom.stop().await;
}
