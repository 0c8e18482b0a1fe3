//! One request: route it, read its body under a size cap and a deadline, run the call on
//! a blocking thread (never on the connection's task), and turn the result into a status,
//! an `X-Pvrun-Outcome` and a body that names no host address or symbol.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::log::{self, RateLimited, RequestIds};
use crate::{CallError, SandboxPool};

/// What every connection's requests share.
pub(super) struct Shared {
    /// Set once the pool is built (`/readyz` is 200 from then on).
    pub pool: OnceLock<Ready>,
    /// Calls admitted (running or waiting for a sandbox); each holds a permit.
    pub inflight: Arc<Semaphore>,
    pub max_inflight: usize,
    pub body_timeout: Duration,
    /// Bytes of request bodies and outputs in flight (`--max-buffered`); each holds as
    /// many permits as it has bytes.
    pub buffered: Arc<Semaphore>,
    pub max_buffered: usize,
    pub ids: RequestIds,
    pub call_log: RateLimited,
    pub busy_log: RateLimited,
}

/// The built pool and what requests need from it.
pub(super) struct Ready {
    pub pool: Arc<SandboxPool>,
    /// The largest input a call takes: the guest's input buffer minus the call header.
    pub max_input: u64,
    pub listing: Bytes,
    /// The queue of the call threads.
    pub calls: std::sync::mpsc::Sender<super::Job>,
}

/// A response body that holds its share of the `--max-buffered` budget (if any) until
/// it is dropped: sent to its end, or its connection closed.
pub(super) struct Body {
    data: Full<Bytes>,
    _held: Option<OwnedSemaphorePermit>,
}

impl Body {
    fn new(data: Bytes, held: Option<OwnedSemaphorePermit>) -> Body {
        Body {
            data: Full::new(data),
            _held: held,
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.get_mut().data).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.data.size_hint()
    }
}

type Resp = Response<Body>;

fn text(code: u16, outcome: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Body::new(body.into(), None));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert("x-pvrun-outcome", HeaderValue::from_static(outcome));
    r
}

/// Adds `Connection: close` (the body was not read to its end, or the client is too slow
/// to keep).
fn closing(mut r: Resp) -> Resp {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A 503 that tells the client when to come back.
fn unavailable(outcome: &'static str, body: &'static str) -> Resp {
    let mut r = text(503, outcome, body);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// `bytes` of the `--max-buffered` budget, if they are free now.
fn reserve(shared: &Shared, bytes: u64) -> Option<OwnedSemaphorePermit> {
    let n = u32::try_from(bytes).ok()?;
    shared.buffered.clone().try_acquire_many_owned(n).ok()
}

/// Serves one request; never fails (every problem is a response).
pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let id = shared.ids.next();
    let mut resp = route(&shared, &id, req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    Ok(resp)
}

async fn route(shared: &Arc<Shared>, id: &str, req: Request<Incoming>) -> Resp {
    let path = req.uri().path();
    let is_get = req.method() == Method::GET || req.method() == Method::HEAD;
    if is_get {
        match path {
            "/healthz" => return text(200, "ok", "live\n"),
            "/readyz" => {
                return match shared.pool.get() {
                    Some(_) => text(200, "ok", "ready\n"),
                    None => unavailable("starting", "starting: the sandboxes are being built\n"),
                };
            }
            _ => {}
        }
    }
    let Some(ready) = shared.pool.get() else {
        return unavailable("starting", "starting: the sandboxes are being built\n");
    };
    if is_get && path == "/" {
        return text(200, "ok", ready.listing.clone());
    }
    if req.method() != Method::POST {
        let mut r = text(405, "error", "use POST /FUNCTION with the input as body\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let name = path.trim_start_matches('/');
    if !ready.pool.functions().iter().any(|f| f == name) {
        let msg = format!(
            "no function named `{}`; this guest exports: {}\n",
            log::escape(name, 100),
            ready.pool.functions().join(", ")
        );
        return text(404, "unknown", msg);
    }
    let name = name.to_string();

    // The body: refused by its declared length before a byte is read, counted as it
    // arrives otherwise, and read to its end before any sandbox is involved.
    let too_large = |len: Option<u64>| {
        let what = len.map_or("the input".to_string(), |l| format!("input of {l} bytes"));
        closing(text(
            413,
            "too-large",
            format!(
                "{what} is larger than the {} bytes the function accepts\n",
                ready.max_input
            ),
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|l| l > ready.max_input) {
        return too_large(declared);
    }
    // The body's share of the byte budget, taken before a byte of it is read: its
    // declared length, or the most a body may be when it declares none (chunked).
    let want = declared.unwrap_or(ready.max_input.min(shared.max_buffered as u64));
    if want > shared.max_buffered as u64 {
        return closing(text(
            413,
            "too-large",
            format!(
                "input of {want} bytes is larger than the {} bytes this server buffers (--max-buffered)\n",
                shared.max_buffered
            ),
        ));
    }
    let Some(body_held) = reserve(shared, want) else {
        shared.busy_log.line(format_args!(
            "pvrun: request {id}: POST /{name}: 503 busy (--max-buffered {} bytes in flight)",
            shared.max_buffered
        ));
        return closing(unavailable(
            "busy",
            "busy: too many bytes of requests and responses in flight; retry later\n",
        ));
    };
    let limit = usize::try_from(want).unwrap_or(usize::MAX);
    let body = Limited::new(req.into_body(), limit);
    let input = match tokio::time::timeout(shared.body_timeout, body.collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(None),
        Ok(Err(_)) => {
            return closing(text(400, "bad-request", "cannot read the request body\n"));
        }
        Err(_) => {
            return closing(text(
                408,
                "body-timeout",
                format!(
                    "the request body did not arrive within {:.1} s\n",
                    shared.body_timeout.as_secs_f64()
                ),
            ));
        }
    };

    // Admission: at most `max_inflight` calls running or queued for a sandbox.
    let Ok(permit) = shared.inflight.clone().try_acquire_owned() else {
        shared.busy_log.line(format_args!(
            "pvrun: request {id}: POST /{name}: 503 busy ({} calls in flight)",
            shared.max_inflight
        ));
        return unavailable("busy", "busy: too many calls in flight; retry later\n");
    };
    let pool = ready.pool.clone();
    let call_name = name.clone();
    let started = Instant::now();
    // The permit moves into the job: a call whose client went away still counts until
    // it has really finished.
    let (answer, answered) = tokio::sync::oneshot::channel();
    let job: super::Job = Box::new(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.call(&call_name, &input)
        }))
        .unwrap_or_else(|_| Err(CallError::Host("the call panicked".into())));
        drop(input);
        drop(body_held);
        drop(permit);
        let _ = answer.send(r);
    });
    let result = match ready.calls.send(job) {
        Ok(()) => answered
            .await
            .unwrap_or_else(|_| Err(CallError::Host("the call thread ended".into()))),
        Err(_) => Err(CallError::Host("no call thread is running".into())),
    };
    let took = started.elapsed().as_secs_f64();
    let e = match result {
        Ok(out) => {
            // The output holds its bytes of the budget until it has been sent; one that
            // does not fit is dropped (a call has no effect beyond its answer: a retry
            // computes it again).
            let Some(held) = reserve(shared, out.len() as u64) else {
                shared.busy_log.line(format_args!(
                    "pvrun: request {id}: POST /{name}: 503 busy (an output of {} bytes does not fit --max-buffered {} bytes in flight)",
                    out.len(),
                    shared.max_buffered
                ));
                return unavailable(
                    "busy",
                    "busy: too many bytes of requests and responses in flight; retry later\n",
                );
            };
            let mut r = Response::new(Body::new(Bytes::from(out), Some(held)));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert("x-pvrun-outcome", HeaderValue::from_static("ok"));
            return r;
        }
        Err(e) => e,
    };
    let (code, outcome, body) = match &e {
        CallError::UnknownFunction(_) => (404, "unknown", format!("{e}\n")),
        CallError::InputTooLarge { .. } => (413, "too-large", format!("{e}\n")),
        CallError::OutputTooLarge { .. } => (502, "too-large", format!("{e}\n")),
        CallError::Failed(_) => (422, "failed", format!("{e}\n")),
        // The guest's own panic message (its text, not the host's).
        CallError::Panic(_) => (500, "panic", format!("{e}\n")),
        // The crash report names guest addresses and symbols: the log has it.
        CallError::Fault(f) => (
            500,
            "fault",
            match f.vector {
                Some(v) => format!(
                    "the guest crashed (CPU exception vector {v}); the server log has the details under request id {id}\n"
                ),
                None => format!(
                    "the guest crashed; the server log has the details under request id {id}\n"
                ),
            },
        ),
        CallError::Exited(_) => (500, "fault", format!("{e}\n")),
        CallError::Timeout(_) => (504, "timeout", format!("{e}\n")),
        CallError::Killed => (503, "killed", format!("{e}\n")),
        CallError::Host(_) => (
            500,
            "error",
            format!("internal error; the server log has the details under request id {id}\n"),
        ),
    };
    if code >= 500 {
        shared.call_log.line(format_args!(
            "pvrun: request {id}: POST /{name}: {code} {outcome} after {took:.3} s: {}",
            log::escape(&e.to_string(), 2000)
        ));
    }
    text(code, outcome, body)
}
