//! The listener: accept loop with a connection cap (overall and per client address), TLS
//! handshake with a deadline, HTTP/1.1 with header and idle timeouts, graceful drain on
//! shutdown. Knows nothing of EST.

pub mod head_case;
pub mod listener;
pub mod proxy;
pub mod tls;

pub use self::listener::Listener;

use std::any::Any;
use std::cell::Cell;
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
    /// What the application keeps about the connection between its requests. On the API
    /// proxy's socket each request gets a fresh one: there every request is its own client.
    pub memo: Memo,
}

/// One value of the application's choosing, kept for a connection's lifetime (the transport
/// only holds it).
#[derive(Default)]
pub struct Memo(Mutex<Option<Arc<dyn Any + Send + Sync>>>);

impl Memo {
    /// The value kept, if there is one of type `T`.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        kept.and_then(|value| value.downcast::<T>().ok())
    }

    /// Keeps `value` in place of what was kept.
    pub fn set<T: Any + Send + Sync>(&self, value: Arc<T>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
    }
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memo")
    }
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
    /// Called when a connection is admitted: what it returns is kept until the connection's
    /// first request starts, or until the connection ends without one.
    fn until_first_request(&self) -> Option<Box<dyn Send + Sync>> {
        None
    }
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

/// What every connection thread of one listener shares.
struct Shared<S> {
    service: Arc<S>,
    /// One permit per open connection, `max_connections` in all.
    slots: Arc<Semaphore>,
    per_address: PerAddress,
    max_connections: usize,
    /// Turns true when open connections are to finish (graceful HTTP shutdown).
    stop: watch::Receiver<bool>,
    /// Turns false when the threads are to stop accepting.
    accepting: watch::Receiver<bool>,
    /// Turns true when the drain is over and the threads may end.
    done: watch::Receiver<bool>,
}

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Shared {
            service: self.service.clone(),
            slots: self.slots.clone(),
            per_address: self.per_address.clone(),
            max_connections: self.max_connections,
            stop: self.stop.clone(),
            accepting: self.accepting.clone(),
            done: self.done.clone(),
        }
    }
}

/// Serves `listener` until `shutdown` completes, then stops accepting and gives open
/// connections [`DRAIN_TIMEOUT`] to finish their requests. Each of the listener's sockets is
/// served by a thread of its own (see [`listener`]); the caller's runtime only waits.
pub async fn serve<S: Service>(
    listener: Listener,
    service: Arc<S>,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let (stop_tx, stop) = watch::channel(false);
    let (accepting_tx, accepting) = watch::channel(true);
    let (done_tx, done) = watch::channel(false);
    let shared = Shared {
        service,
        slots: slots.clone(),
        per_address: PerAddress::default(),
        max_connections,
        stop,
        accepting,
        done,
    };
    let mut threads = 0;
    for (i, socket) in listener.into_sockets().into_iter().enumerate() {
        let shared = shared.clone();
        // A thread that cannot start drops its socket: the kernel then stops routing
        // connections to it.
        match std::thread::Builder::new()
            .name(format!("edge-est-conn-{i}"))
            .spawn(move || connection_thread(i, socket, shared))
        {
            Ok(_) => threads += 1,
            Err(e) => tracing::error!(error = %e, "cannot start a connection thread"),
        }
    }
    if threads == 0 {
        tracing::error!("no connection thread started: not serving");
        return;
    }
    shutdown.await;
    let _ = accepting_tx.send(false);
    drain(stop_tx, slots, max_connections).await;
    let _ = done_tx.send(true);
}

/// The period of a connection thread's pacing timer. tokio wakes a thread's own driver (an
/// eventfd write, then an `epoll_wait` that returns at once) whenever a timer is armed earlier
/// than the one the thread last went to sleep for, or while it slept with none; every
/// connection arms a handshake, a header and a body timeout, so that happened about every
/// other enrollment (strace: 0.5 self-wakes per fresh-connection enrollment). With a timer
/// always due within a second, the timeouts (seconds, see `Limits`) come later than the next
/// planned wake and arm silently, for one wake-up a second per thread.
const PACER: Duration = Duration::from_secs(1);

thread_local! {
    /// Set on a connection thread: its number among the listener's threads.
    static CONNECTION_THREAD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The number of the connection thread this code runs on (0, 1, ... in the order the
/// listener's sockets were bound), `None` elsewhere. A task spawned here runs on this thread's
/// own runtime: what is kept per thread (an upstream connection pool) stays on it.
pub fn connection_thread_index() -> Option<usize> {
    CONNECTION_THREAD.with(Cell::get)
}

/// One connection thread: accepts on its socket and serves what it accepts, on a runtime of
/// its own, until told to stop accepting; then waits for the end of the drain.
fn connection_thread<S: Service>(index: usize, socket: std::net::TcpListener, shared: Shared<S>) {
    CONNECTION_THREAD.with(|slot| slot.set(Some(index)));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a connection thread's runtime");
            return;
        }
    };
    runtime.block_on(async move {
        // Keeps a timer due within PACER, for as long as the thread serves (see there).
        tokio::spawn(async {
            loop {
                tokio::time::sleep(PACER).await;
            }
        });
        match TcpListener::from_std(socket) {
            Ok(listener) => accept_loop(listener, &shared).await,
            Err(e) => tracing::error!(error = %e, "cannot use a listening socket"),
        }
        let mut done = shared.done.clone();
        let _ = done.wait_for(|d| *d).await;
    });
}

async fn accept_loop<S: Service>(listener: TcpListener, shared: &Shared<S>) {
    let mut accepting = shared.accepting.clone();
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
            _ = accepting.wait_for(|a| !*a) => return,
        };
        let service = &shared.service;
        let limits = service.connection_limits();
        let Some(address_slot) = shared
            .per_address
            .acquire(remote.ip(), limits.max_per_address)
        else {
            tracing::warn!(%remote, max_per_address = limits.max_per_address, "connection refused: too many connections from this address");
            service.on_refused(RefusedBecause::PerAddress);
            drop(tcp);
            continue;
        };
        let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, max_connections = shared.max_connections, "connection refused: too many connections");
            service.on_refused(RefusedBecause::Capacity);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        let mut stop = shared.stop.clone();
        service.on_connection_open();
        let open = OpenConnection(service.clone());
        let opening = Mutex::new(service.until_first_request());
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
                memo: Memo::default(),
            });
            // The request's headers play no part here: a forwarded client certificate header
            // is read only on the API proxy's socket.
            serve_http(
                tls,
                service,
                limits.header_timeout,
                &remote.to_string(),
                &mut stop,
                move |_| {
                    drop(opening.lock().unwrap_or_else(|e| e.into_inner()).take());
                    connection.clone()
                },
            )
            .await;
        });
    }
}

/// Serves HTTP/1.1 on one connection until it ends or `stop` turns true (then gracefully).
/// `connection` says, per request, what the handler learns of the connection. Response
/// header names go out in their conventional spelling ([`head_case`]).
async fn serve_http<S, IO, C>(
    io: IO,
    service: Arc<S>,
    header_timeout: Duration,
    remote: &str,
    stop: &mut watch::Receiver<bool>,
    connection: C,
) where
    S: Service,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    C: Fn(&Request<Incoming>) -> Arc<Connection> + Send + Sync + 'static,
{
    let methods = head_case::Methods::default();
    let io = TokioIo::new(head_case::HeadCase::new(io, methods.clone()));
    let handler = service_fn(move |request: Request<Incoming>| {
        methods.note(request.method());
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
