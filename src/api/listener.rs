//! Serving HTTP connections with the bounds an open port needs. A client can otherwise
//! hold a connection forever by sending half a header, or never sending the next
//! request, and enough such connections exhaust the server's sockets:
//!
//! - a connection cap: over it, a new connection is answered 503 with `Retry-After`
//!   and closed;
//! - a header deadline: once a request's first byte arrives, its headers must be
//!   complete within `header_read_timeout`;
//! - an idle deadline: a connection with no request in flight and no new byte for
//!   `keep_alive_timeout` is closed.
//!
//! A request in flight (its headers read, its response not yet fully sent) is never cut
//! by these; `HttpConfig::request_timeout` bounds it instead.

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Connection bounds (`serve --max-connections`, `--header-read-timeout`,
/// `--keep-alive-timeout`).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(60),
        }
    }
}

/// What the deadlines of one connection look at.
#[derive(Debug)]
struct Activity {
    /// Requests whose headers were read and whose response body is not finished.
    in_flight: AtomicUsize,
    times: Mutex<Times>,
}

#[derive(Debug)]
struct Times {
    /// When the connection last became idle (accepted, or its last response finished).
    idle_since: Instant,
    /// The first byte read while idle: a request's headers are arriving.
    first_byte: Option<Instant>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            times: Mutex::new(Times {
                idle_since: Instant::now(),
                first_byte: None,
            }),
        }
    }
    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let mut t = self.times();
            t.first_byte.get_or_insert_with(Instant::now);
        }
    }
    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }
    fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut t = self.times();
            t.idle_since = Instant::now();
            t.first_byte = None;
        }
    }
    /// When the connection is to be closed if nothing changes (`None`: a request is in
    /// flight).
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let t = self.times();
        Some(match t.first_byte {
            Some(first) => first + limits.header_read_timeout,
            None => t.idle_since + limits.keep_alive_timeout,
        })
    }
}

/// The socket, noting each read.
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A response body that marks its request finished when hyper drops it (sent whole, or
/// the client left).
struct TrackedBody {
    body: Body,
    _guard: RequestGuard,
}

struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

impl http_body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The answer to a connection over the cap.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 127\r\n\r\n{\"error\":{\"message\":\"too many open connections; retry later\",\"type\":\"server_error\",\"param\":null,\"code\":\"too_many_connections\"}}";

/// Serves `app` on `listener` within `limits` until `shutdown` resolves; then stops
/// accepting, lets each connection finish its requests, and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let (app, limits, stop) = (app.clone(), limits.clone(), stop_rx.clone());
                tokio::spawn(async move {
                    serve_connection(stream, app, &limits, stop).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let mut stream = stream;
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(OVER_CAPACITY)).await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    }
    let _ = stop_tx.send(true);
    // Every connection holds a slot until it closes.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    limits: &ConnectionLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        io: stream,
        activity: activity.clone(),
    });
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let app = app.clone();
        let activity = service_activity.clone();
        activity.request_started();
        let guard = RequestGuard(activity);
        async move {
            let resp = app.oneshot(req.map(Body::new)).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Body::new(TrackedBody { body, _guard: guard })))
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    // Once asked to close (server stopping, or a deadline passed with nothing in
    // flight), the connection closes gracefully (HTTP/2 clients get a GOAWAY); a client
    // that holds it open even then is cut off after `header_read_timeout` of no request.
    // When the close began, if it has.
    let mut closing: Option<Instant> = None;
    let mut stop_seen = false;
    loop {
        // Closing: the connection gets `header_read_timeout` from the later of the
        // close and its last response (hyper may still be flushing that) to go.
        let cut_off = |since: Instant| since.max(activity.times().idle_since) + limits.header_read_timeout;
        let deadline = activity.deadline(limits).map(|idle| match closing {
            Some(since) => cut_off(since),
            None => idle,
        });
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                // A request is in flight: look again once it could have finished.
                None => tokio::time::sleep(limits.keep_alive_timeout.min(limits.header_read_timeout)).await,
            }
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = sleep => {
                let now = Instant::now();
                match closing {
                    // Still open with nothing in flight: dropping it closes the socket.
                    Some(since) if activity.deadline(limits).is_some() && cut_off(since) <= now => return,
                    Some(_) => {}
                    None if activity.deadline(limits).is_some_and(|d| d <= now) => {
                        closing = Some(now);
                        conn.as_mut().graceful_shutdown();
                    }
                    None => {}
                }
            }
            changed = stop.changed(), if !stop_seen => {
                if changed.is_err() || *stop.borrow() {
                    stop_seen = true;
                    if closing.is_none() {
                        closing = Some(Instant::now());
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_capacity_answer_declares_its_body_length() {
        let text = std::str::from_utf8(OVER_CAPACITY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let declared: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(declared, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
    }

    #[test]
    fn deadlines_follow_what_the_connection_is_doing() {
        let limits = ConnectionLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(60),
        };
        let a = Activity::new();
        let idle = a.times().idle_since;
        assert_eq!(a.deadline(&limits), Some(idle + limits.keep_alive_timeout));
        a.bytes_read();
        let first = a.times().first_byte.unwrap();
        assert_eq!(a.deadline(&limits), Some(first + limits.header_read_timeout));
        a.request_started();
        assert_eq!(a.deadline(&limits), None);
        // Body bytes of a request in flight start no header deadline.
        a.bytes_read();
        a.request_finished();
        let t = a.times();
        assert!(t.first_byte.is_none() && t.idle_since >= first);
    }
}
