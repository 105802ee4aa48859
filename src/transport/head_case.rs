//! Conventional spelling of response header names on the wire.
//!
//! hyper writes header names in lower case (HTTP field names are case-insensitive), and its
//! one alternative, title case, spells `Www-Authenticate`. Deployed EST clients compare names
//! case-sensitively: Cisco libest (`estclient`, `estproxy`) looks for exactly `Content-Type`,
//! `Content-Length` and `WWW-Authenticate`, and without them refuses every answer (or never
//! sends its Basic credentials). [`HeadCase`] sits between hyper and the connection and
//! rewrites each response head in place, one name for a name of the same length
//! (`www-authenticate` → `WWW-Authenticate`, `content-type` → `Content-Type`, any other
//! lower-case name in title case). It follows HTTP/1.1 framing (status, `Content-Length`, the
//! request's method) so that bodies pass untouched; when it cannot tell where a body ends
//! (chunked or close-delimited, which this server never sends) it stops rewriting for the
//! rest of the connection rather than guess.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest response head rewritten; a longer one is passed on as it is.
const MAX_HEAD: usize = 64 * 1024;

/// The spelling of `lower` (a lower-case header name) on the wire.
pub fn conventional(lower: &str) -> String {
    match lower {
        "www-authenticate" => "WWW-Authenticate".to_owned(),
        "proxy-authenticate" => "Proxy-Authenticate".to_owned(),
        "content-md5" => "Content-MD5".to_owned(),
        "etag" => "ETag".to_owned(),
        "te" => "TE".to_owned(),
        _ => {
            let mut out = String::with_capacity(lower.len());
            let mut start = true;
            for c in lower.chars() {
                out.push(if start { c.to_ascii_uppercase() } else { c });
                start = c == '-';
            }
            out
        }
    }
}

/// The methods of the requests of one connection, in order, so that [`HeadCase`] knows which
/// responses answer a `HEAD` (they carry a `Content-Length` but no body). The service notes
/// each request before answering it; HTTP/1.1 answers in request order.
#[derive(Clone, Default)]
pub struct Methods(Arc<Mutex<VecDeque<bool>>>);

impl Methods {
    pub fn note(&self, method: &http::Method) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(method == http::Method::HEAD);
    }

    fn next_is_head(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .unwrap_or(false)
    }
}

#[derive(Debug, PartialEq)]
enum State {
    /// Gathering a response head.
    Head,
    /// Passing this many body bytes on.
    Body(u64),
    /// Framing unknown: everything passes as it is until the connection ends.
    Through,
}

/// A connection whose response heads get conventional header names; see the module docs.
pub struct HeadCase<IO> {
    inner: IO,
    methods: Methods,
    state: State,
    /// The head gathered so far (in [`State::Head`]).
    head: Vec<u8>,
    /// Bytes taken from the writer and not yet written to `inner`, from `written` on.
    pending: Vec<u8>,
    written: usize,
}

impl<IO> HeadCase<IO> {
    pub fn new(inner: IO, methods: Methods) -> HeadCase<IO> {
        HeadCase {
            inner,
            methods,
            state: State::Head,
            head: Vec::new(),
            pending: Vec::new(),
            written: 0,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.inner
    }

    /// A complete head: fix its names and learn how long its body is.
    fn finish_head(&mut self) {
        let mut head = std::mem::take(&mut self.head);
        fix_names(&mut head);
        self.state = match framing(&head) {
            Framing::None { informational } => {
                if !informational {
                    self.methods.next_is_head();
                }
                State::Head
            }
            Framing::Length(n) => match (self.methods.next_is_head(), n) {
                (true, _) | (false, 0) => State::Head,
                (false, n) => State::Body(n),
            },
            Framing::Unknown => {
                tracing::debug!("response framing not followed: header names left as written");
                self.methods.next_is_head();
                State::Through
            }
        };
        if self.pending.is_empty() {
            self.pending = head;
        } else {
            self.pending.extend_from_slice(&head);
        }
    }
}

impl<IO: AsyncWrite + Unpin> HeadCase<IO> {
    /// Writes what is pending; `Ready(Ok)` once all of it is out.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

enum Framing {
    /// No body: 1xx, 204, 304.
    None {
        informational: bool,
    },
    Length(u64),
    /// Chunked or close-delimited.
    Unknown,
}

fn framing(head: &[u8]) -> Framing {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if (100..200).contains(&status) {
        return Framing::None {
            informational: true,
        };
    }
    if status == 204 || status == 304 {
        return Framing::None {
            informational: false,
        };
    }
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Framing::Unknown;
        }
        if name.eq_ignore_ascii_case("content-length") {
            match (length, value.trim().parse::<u64>()) {
                (None, Ok(n)) => length = Some(n),
                _ => return Framing::Unknown,
            }
        }
    }
    length.map_or(Framing::Unknown, Framing::Length)
}

/// Rewrites the lower-case header names of a response head in place (same lengths).
fn fix_names(head: &mut [u8]) {
    let mut line_start = match find(head, b"\r\n", 0) {
        Some(end) => end + 2,
        None => return,
    };
    while let Some(end) = find(head, b"\r\n", line_start) {
        if end == line_start {
            break;
        }
        let line = &mut head[line_start..end];
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = &mut line[..colon];
            if name
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            {
                let spelled = conventional(std::str::from_utf8(name).unwrap_or_default());
                if spelled.len() == name.len() {
                    name.copy_from_slice(spelled.as_bytes());
                }
            }
        }
        line_start = end + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadCase<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        match this.state {
            State::Through => Pin::new(&mut this.inner).poll_write(cx, buf),
            State::Body(left) => {
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..take]))?;
                let left = left - n as u64;
                this.state = if left == 0 {
                    State::Head
                } else {
                    State::Body(left)
                };
                Poll::Ready(Ok(n))
            }
            State::Head => {
                let start = this.head.len();
                this.head.extend_from_slice(buf);
                let taken = match find(&this.head, b"\r\n\r\n", start.saturating_sub(3)) {
                    Some(end) => {
                        this.head.truncate(end + 4);
                        let mut taken = end + 4 - start;
                        this.finish_head();
                        // The body that came with the head (hyper writes both at once) goes
                        // out with it: one TLS record and one write instead of two.
                        if let State::Body(left) = this.state {
                            let rest = &buf[taken..];
                            let more = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                            this.pending.extend_from_slice(&rest[..more]);
                            taken += more;
                            let left = left - more as u64;
                            this.state = if left == 0 {
                                State::Head
                            } else {
                                State::Body(left)
                            };
                        }
                        taken
                    }
                    None if this.head.len() > MAX_HEAD => {
                        this.state = State::Through;
                        this.pending = std::mem::take(&mut this.head);
                        buf.len()
                    }
                    None => buf.len(),
                };
                // Start writing; what the connection does not take now goes with the next
                // write or flush (hyper flushes after every message).
                if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(taken))
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for HeadCase<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn names_take_their_conventional_spelling() {
        for (lower, spelled) in [
            ("content-type", "Content-Type"),
            ("content-length", "Content-Length"),
            ("content-transfer-encoding", "Content-Transfer-Encoding"),
            ("www-authenticate", "WWW-Authenticate"),
            ("retry-after", "Retry-After"),
            ("allow", "Allow"),
            ("connection", "Connection"),
            ("date", "Date"),
            ("x-edge-est-x1", "X-Edge-Est-X1"),
        ] {
            assert_eq!(conventional(lower), spelled);
        }
    }

    /// Writes `chunks` through a [`HeadCase`] and returns what reached the other end.
    async fn through(chunks: &[&[u8]], methods: &[http::Method]) -> Vec<u8> {
        let (near, mut far) = tokio::io::duplex(64);
        let noted = Methods::default();
        for m in methods {
            noted.note(m);
        }
        let mut writer = HeadCase::new(near, noted);
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let write = tokio::spawn(async move {
            for chunk in chunks {
                writer.write_all(&chunk).await.unwrap();
            }
            writer.shutdown().await.unwrap();
        });
        let mut out = Vec::new();
        far.read_to_end(&mut out).await.unwrap();
        write.await.unwrap();
        out
    }

    #[tokio::test]
    async fn heads_are_rewritten_and_bodies_are_not_whatever_the_splits() {
        let body = b"content-type: text/plain\r\n\r\nwww-authenticate: x\r\n";
        let first = format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: text/plain\r\nwww-authenticate: Basic realm=\"x\"\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let second = "HTTP/1.1 204 No Content\r\ndate: now\r\n\r\n";
        let third = "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n";
        let mut all = first.as_bytes().to_vec();
        all.extend_from_slice(body);
        all.extend_from_slice(second.as_bytes());
        all.extend_from_slice(third.as_bytes()); // answers a HEAD: no body follows
        all.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        all.extend_from_slice(b"HTTP/1.1 200 OK\r\nretry-after: 1\r\ncontent-length: 3\r\n\r\nabc");
        let expected = {
            let mut e = first
                .replace("content-type", "Content-Type")
                .replace("www-authenticate", "WWW-Authenticate")
                .replace("content-length", "Content-Length")
                .into_bytes();
            e.extend_from_slice(body);
            e.extend_from_slice(b"HTTP/1.1 204 No Content\r\nDate: now\r\n\r\n");
            e.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n");
            e.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            e.extend_from_slice(
                b"HTTP/1.1 200 OK\r\nRetry-After: 1\r\nContent-Length: 3\r\n\r\nabc",
            );
            e
        };
        let methods = [
            http::Method::POST,
            http::Method::GET,
            http::Method::HEAD,
            http::Method::POST,
        ];
        // In one piece, and split at every byte.
        assert_eq!(through(&[&all], &methods).await, expected);
        for split in 1..all.len() {
            let (a, b) = all.split_at(split);
            assert_eq!(
                through(&[a, b], &methods).await,
                expected,
                "split at {split}"
            );
        }
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(through(&bytes, &methods).await, expected);
    }

    /// Records every write it is given, whole.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_head_and_its_body_written_at_once_go_out_in_one_write() {
        // Over TLS each write to the connection is a record and a system call.
        let methods = Methods::default();
        methods.note(&http::Method::POST);
        methods.note(&http::Method::GET);
        let mut writer = HeadCase::new(Writes::default(), methods);
        let one = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        writer.write_all(one).await.unwrap();
        writer.flush().await.unwrap();
        assert_eq!(
            writer.get_ref().0,
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec()]
        );
        // A body longer than what came with its head: the rest follows as it comes, and the
        // next head is rewritten again.
        let mut writer = HeadCase::new(Writes::default(), Methods::default());
        writer
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nhell")
            .await
            .unwrap();
        writer
            .write_all(b"o!!!HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n")
            .await
            .unwrap();
        writer.flush().await.unwrap();
        assert_eq!(
            writer.get_ref().0.concat(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nhello!!!HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n"
        );
        assert_eq!(writer.get_ref().0.len(), 3);
    }

    #[tokio::test]
    async fn unknown_framing_passes_everything_as_it_is() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let out = through(&[chunked], &[http::Method::GET, http::Method::GET]).await;
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"));
        assert!(text.ends_with("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
    }
}
