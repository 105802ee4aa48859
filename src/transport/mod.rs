//! The listener: accept loop with a connection cap (overall and per client address), TLS
//! handshake with a deadline, HTTP/1.1 with header and idle timeouts, graceful drain on
//! shutdown. Knows nothing of EST.

pub mod proxy;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// What the handler learns of the connection a request came on.
#[derive(Debug)]
pub struct Connection {
    /// The client's address. On the API proxy's socket ([`proxy`]): the address the proxy
    /// forwarded, or `0.0.0.0:0` (the socket's one peer) when it forwarded none.
    pub remote: SocketAddr,
    /// The client's certificate chain, leaf first, if it presented one. On the API proxy's
    /// socket: the certificate the proxy forwarded for this request.
    pub peer_chain: Option<Vec<CertificateDer<'static>>>,
    /// Set on requests that came through the API proxy's socket, never on the TLS listener.
    pub forwarded: Option<proxy::Forwarded>,
}

/// Per-connection settings, read at accept time from the running configuration.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    /// Connections at once from one address (an IPv6 /64); 0: no per-address cap.
    pub max_per_address: usize,
}

/// Why a connection was closed right after accept.
pub use crate::metrics::RefusedBecause;

/// The application behind the listener.
pub trait Service: Send + Sync + 'static {
    fn tls_config(&self) -> Arc<ServerConfig>;
    fn connection_limits(&self) -> ConnectionLimits;
    /// Called after each completed TLS handshake.
    fn on_handshake(&self) {}
    /// Called when a connection is closed at accept.
    fn on_refused(&self, _because: RefusedBecause) {}
    /// Called when a connection is admitted, and when it ends.
    fn on_connection_open(&self) {}
    fn on_connection_close(&self) {}
    fn call(
        &self,
        request: Request<Incoming>,
        connection: Arc<Connection>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Reports the end of a connection when dropped.
struct OpenConnection<S: Service>(Arc<S>);

impl<S: Service> Drop for OpenConnection<S> {
    fn drop(&mut self) {
        self.0.on_connection_close();
    }
}

/// Connections open per client address. Entries exist only while a connection from the
/// address is open, so the map holds at most `max_connections` of them.
#[derive(Clone, Default)]
struct PerAddress(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One admitted connection of an address; gives its place back when dropped.
struct AddressSlot {
    map: PerAddress,
    key: IpAddr,
}

impl PerAddress {
    fn acquire(&self, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let key = crate::limits::address_key(ip);
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let open = map.entry(key).or_insert(0);
        if max > 0 && *open >= max {
            if *open == 0 {
                map.remove(&key);
            }
            return None;
        }
        *open += 1;
        Some(AddressSlot {
            map: self.clone(),
            key,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.map.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = map.get_mut(&self.key) {
            *open -= 1;
            if *open == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// How long in-flight requests get to finish after shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` until `shutdown` completes, then stops accepting and gives open
/// connections [`DRAIN_TIMEOUT`] to finish their requests.
pub async fn serve<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let per_address = PerAddress::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(5);
                    pair
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let limits = service.connection_limits();
        let Some(address_slot) = per_address.acquire(remote.ip(), limits.max_per_address) else {
            tracing::warn!(%remote, max_per_address = limits.max_per_address, "connection refused: too many connections from this address");
            service.on_refused(RefusedBecause::PerAddress);
            drop(tcp);
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, max_connections, "connection refused: too many connections");
            service.on_refused(RefusedBecause::Capacity);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        let mut stop = stop_rx.clone();
        service.on_connection_open();
        let open = OpenConnection(service.clone());
        tokio::spawn(async move {
            // Dropped last (declared first), whatever way the task ends.
            let _open = open;
            let _slot = slot;
            let _address_slot = address_slot;
            let acceptor = tokio_rustls::TlsAcceptor::from(service.tls_config());
            let tls =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
            service.on_handshake();
            let peer_chain = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect());
            let connection = Arc::new(Connection {
                remote,
                peer_chain,
                forwarded: None,
            });
            // The request's headers play no part here: a forwarded client certificate header
            // is read only on the API proxy's socket.
            serve_http(
                TokioIo::new(tls),
                service,
                limits.header_timeout,
                &remote.to_string(),
                &mut stop,
                move |_| connection.clone(),
            )
            .await;
        });
    }
    drop(listener);
    drain(stop_tx, slots, max_connections).await;
}

/// Serves HTTP/1.1 on one connection until it ends or `stop` turns true (then gracefully).
/// `connection` says, per request, what the handler learns of the connection.
async fn serve_http<S, IO, C>(
    io: IO,
    service: Arc<S>,
    header_timeout: Duration,
    remote: &str,
    stop: &mut watch::Receiver<bool>,
    connection: C,
) where
    S: Service,
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C: Fn(&Request<Incoming>) -> Arc<Connection> + Send + Sync + 'static,
{
    let handler = service_fn(move |request| {
        let service = service.clone();
        let connection = connection(&request);
        async move { Ok::<_, std::convert::Infallible>(service.call(request, connection).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(16 * 1024)
        .max_headers(64)
        .keep_alive(true)
        .serve_connection(io, handler);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        }
        () = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Tells open connections to finish and waits until they have (at most [`DRAIN_TIMEOUT`]).
async fn drain(stop_tx: watch::Sender<bool>, slots: Arc<Semaphore>, max_connections: usize) {
    let _ = stop_tx.send(true);
    // Every connection holds a slot: when all slots are back, all connections are closed.
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown: connections still open after the drain timeout");
    }
}
