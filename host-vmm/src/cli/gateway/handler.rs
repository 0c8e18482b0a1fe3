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
    /// The guests served, in the order given.
    pub guests: Vec<Guest>,
    /// Routes of several guests (`POST /GUEST/FN`) rather than the single guest's
    /// (`POST /FN`).
    pub multi: bool,
    /// Set once every guest's pool is built (`/readyz` is 200 from then on): `GET /` of a
    /// multi-guest gateway (the guests, one per line).
    pub ready: OnceLock<Bytes>,
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
    pub metrics: super::metrics::Metrics,
}

/// One guest of the gateway.
pub(super) struct Guest {
    /// Its name in URLs (multi-guest), metrics and the access log.
    pub name: String,
    /// Set once its pool is built.
    pub pool: OnceLock<Ready>,
    /// Its calls in flight (running or waiting for a sandbox) and their limit; calls
    /// beyond get 429.
    pub limit: Option<(Arc<Semaphore>, usize)>,
}

impl Guest {
    /// Calls in flight and the limit, for metrics.
    pub fn occupancy(&self) -> Option<(usize, usize)> {
        self.limit
            .as_ref()
            .map(|(sem, n)| (n.saturating_sub(sem.available_permits()), *n))
    }
}

/// The built pool and what requests need from it.
pub(super) struct Ready {
    pub pool: Arc<SandboxPool>,
    /// The largest input a call takes: the guest's input buffer minus the call header.
    pub max_input: u64,
    pub listing: Bytes,
    /// The queue of the guest's call threads.
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
    let started = Instant::now();
    // What the access log needs from the request, taken before it is consumed (only when
    // someone listens: a quiet server pays one relaxed load).
    let access = tracing::enabled!(target: ACCESS, tracing::Level::INFO)
        .then(|| (req.method().to_string(), req.uri().path().to_string()));
    let mut facts = Facts::default();
    let mut resp = route(&shared, &id, req, &mut facts).await;
    if !shared.multi && facts.guest.is_none() {
        // The single guest serves every request.
        facts.guest = shared.guests.first().map(|g| g.name.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    if let Some((method, path)) = access {
        access_event(&id, &method, &path, &resp, &facts, started);
    }
    Ok(resp)
}

/// What routing and the call learnt about a request, for the access log.
#[derive(Default)]
struct Facts {
    /// The guest and function it named (if it named one the gateway serves).
    guest: Option<String>,
    function: Option<String>,
    input_bytes: u64,
}

/// The `tracing` target of the per-request access log (`RUST_LOG=pvrun::access=info`,
/// also on with `-v`).
pub(super) const ACCESS: &str = "pvrun::access";

/// One access-log event: every text a client or guest chose is escaped (and cut at 200
/// characters) before it reaches the log.
fn access_event(id: &str, method: &str, path: &str, resp: &Resp, facts: &Facts, started: Instant) {
    let outcome = resp
        .headers()
        .get("x-pvrun-outcome")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let output_bytes = hyper::body::Body::size_hint(resp.body())
        .exact()
        .unwrap_or(0);
    tracing::info!(
        target: ACCESS,
        request_id = %id,
        guest = %log::escape(facts.guest.as_deref().unwrap_or("-"), 200),
        method = %log::escape(method, 20),
        path = %log::escape(path, 200),
        function = %log::escape(facts.function.as_deref().unwrap_or("-"), 200),
        status = resp.status().as_u16(),
        outcome = %log::escape(outcome, 40),
        latency_us = started.elapsed().as_micros() as u64,
        input_bytes = facts.input_bytes,
        output_bytes,
        "request"
    );
}

/// Where a request goes, from its method and path alone.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Health,
    /// `/readyz` (200 once the pools are built, 503 before).
    Readiness,
    /// `/metrics` (Prometheus text, also before the pools are built).
    Metrics,
    /// Anything but the health routes before the pools are built.
    Starting,
    /// `GET /`: the single guest's functions, or the guests.
    Listing,
    /// `GET /GUEST` of a multi-guest gateway: that guest's functions.
    GuestListing(usize),
    NotPost,
    /// A path that names no guest served (multi-guest only).
    UnknownGuest(&'a str),
    /// `POST` of a name guest `.0` does not export.
    Unknown(usize, &'a str),
    Call(usize, &'a str),
}

/// Routes a request. `guests` (names and functions) is `None` while the pools are being
/// built; with `multi`, paths are `/GUEST/FN`, otherwise `/FN` of guest 0.
fn route_of<'a>(
    method: &Method,
    path: &'a str,
    guests: Option<&[(&str, &[String])]>,
    multi: bool,
) -> Route<'a> {
    let is_get = method == Method::GET || method == Method::HEAD;
    if is_get {
        match path {
            "/healthz" => return Route::Health,
            "/readyz" => return Route::Readiness,
            "/metrics" => return Route::Metrics,
            _ => {}
        }
    }
    let Some(guests) = guests else {
        return Route::Starting;
    };
    if is_get && path == "/" {
        return Route::Listing;
    }
    let (g, name) = if multi {
        let rest = path.trim_start_matches('/');
        let (guest, function) = rest.split_once('/').unwrap_or((rest, ""));
        let Some(g) = guests.iter().position(|(n, _)| *n == guest) else {
            return Route::UnknownGuest(guest);
        };
        if is_get && function.is_empty() {
            return Route::GuestListing(g);
        }
        (g, function)
    } else {
        (0, path.trim_start_matches('/'))
    };
    if method != Method::POST {
        return Route::NotPost;
    }
    if guests
        .get(g)
        .is_some_and(|(_, fns)| fns.iter().any(|f| f == name))
    {
        Route::Call(g, name)
    } else {
        Route::Unknown(g, name)
    }
}

/// The 404 text for a name the guest does not export (the name escaped and cut short).
fn unknown_message(name: &str, functions: &[String]) -> String {
    format!(
        "no function named `{}`; this guest exports: {}\n",
        log::escape(name, 100),
        functions.join(", ")
    )
}

/// The 404 text for a path that names no guest served.
fn unknown_guest_message(name: &str, guests: &[Guest]) -> String {
    let names: Vec<&str> = guests.iter().map(|g| g.name.as_str()).collect();
    format!(
        "no guest named `{}`; this server serves: {} (POST /GUEST/FUNCTION)\n",
        log::escape(name, 100),
        names.join(", ")
    )
}

/// What a request body may hold of the `--max-buffered` budget, decided before a byte of
/// it is read.
#[derive(Debug, PartialEq, Eq)]
enum Share {
    /// Reserve this many bytes and read at most that many.
    Reserve(u64),
    /// The declared length is above what the function accepts (413).
    TooLarge(u64),
    /// The body could need more than the whole budget (413).
    OverBudget(u64),
}

/// The body's share: its length as hyper framed it (`Content-Length`, 0 for a request
/// with neither it nor `Transfer-Encoding`), or the most a body may be when it declares
/// none (chunked).
fn body_share(declared: Option<u64>, max_input: u64, max_buffered: usize) -> Share {
    if let Some(l) = declared.filter(|&l| l > max_input) {
        return Share::TooLarge(l);
    }
    let want = declared.unwrap_or(max_input.min(max_buffered as u64));
    if want > max_buffered as u64 {
        return Share::OverBudget(want);
    }
    Share::Reserve(want)
}

async fn route(shared: &Arc<Shared>, id: &str, req: Request<Incoming>, facts: &mut Facts) -> Resp {
    let all_ready = shared.ready.get();
    let views: Option<Vec<(&str, &[String])>> = all_ready.map(|_| {
        shared
            .guests
            .iter()
            .map(|g| {
                (
                    g.name.as_str(),
                    g.pool.get().map_or(&[][..], |r| r.pool.functions()),
                )
            })
            .collect()
    });
    let route = route_of(
        req.method(),
        req.uri().path(),
        views.as_deref(),
        shared.multi,
    );
    let ready_of = |g: usize| shared.guests.get(g).and_then(|x| x.pool.get());
    let (g, name) = match route {
        Route::Health => return text(200, "ok", "live\n"),
        Route::Metrics => {
            let mut r = text(200, "ok", shared.metrics.render(&shared.guests));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            return r;
        }
        Route::Readiness if all_ready.is_some() => return text(200, "ok", "ready\n"),
        Route::Readiness | Route::Starting => {
            return unavailable("starting", "starting: the sandboxes are being built\n");
        }
        Route::Listing => {
            return match (shared.multi, all_ready, ready_of(0)) {
                (true, Some(list), _) => text(200, "ok", list.clone()),
                (false, _, Some(ready)) => text(200, "ok", ready.listing.clone()),
                _ => unavailable("starting", "starting: the sandboxes are being built\n"),
            };
        }
        Route::GuestListing(g) => {
            facts.guest = Some(shared.guests[g].name.clone());
            return match ready_of(g) {
                Some(ready) => text(200, "ok", ready.listing.clone()),
                None => unavailable("starting", "starting: the sandboxes are being built\n"),
            };
        }
        Route::NotPost => {
            let msg = if shared.multi {
                "use POST /GUEST/FUNCTION with the input as body\n"
            } else {
                "use POST /FUNCTION with the input as body\n"
            };
            let mut r = text(405, "error", msg);
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return r;
        }
        Route::UnknownGuest(name) => {
            shared.metrics.call("-", "-", "unknown", None, 0);
            return text(404, "unknown", unknown_guest_message(name, &shared.guests));
        }
        Route::Unknown(g, name) => {
            let guest = &shared.guests[g];
            facts.guest = Some(guest.name.clone());
            facts.function = Some(name.to_string());
            shared.metrics.call(&guest.name, "-", "unknown", None, 0);
            let fns = guest.pool.get().map_or(&[][..], |r| r.pool.functions());
            return text(404, "unknown", unknown_message(name, fns));
        }
        Route::Call(g, name) => (g, name.to_string()),
    };
    let guest = &shared.guests[g];
    facts.guest = Some(guest.name.clone());
    facts.function = Some(name.clone());
    let Some(ready) = guest.pool.get() else {
        return unavailable("starting", "starting: the sandboxes are being built\n");
    };
    let mut call_facts = (None, 0);
    let resp = call(
        shared,
        id,
        guest,
        ready,
        &name,
        req,
        &mut call_facts,
        &mut facts.input_bytes,
    )
    .await;
    // The outcome header is set on every response below.
    let outcome = resp
        .headers()
        .get("x-pvrun-outcome")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("error");
    shared
        .metrics
        .call(&guest.name, &name, outcome, call_facts.0, call_facts.1);
    resp
}

/// A call to a known function: body, admission, the call, its response. `facts` gets the
/// call's latency (if it ran) and the pages its reset copied back.
#[allow(clippy::too_many_arguments)]
async fn call(
    shared: &Arc<Shared>,
    id: &str,
    guest: &Guest,
    ready: &Ready,
    name: &str,
    req: Request<Incoming>,
    facts: &mut (Option<f64>, usize),
    input_bytes: &mut u64,
) -> Resp {
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
    // The body's share of the byte budget, taken before a byte of it is read. Its length
    // is hyper's reading of the framing headers (the one it will enforce), not the raw
    // `Content-Length` value: a body-less POST holds nothing.
    let share = body_share(
        hyper::body::Body::size_hint(req.body()).exact(),
        ready.max_input,
        shared.max_buffered,
    );
    let want = match share {
        Share::Reserve(want) => want,
        Share::TooLarge(declared) => return too_large(Some(declared)),
        Share::OverBudget(want) => {
            return closing(text(
                413,
                "too-large",
                format!(
                    "input of {want} bytes is larger than the {} bytes this server buffers (--max-buffered)\n",
                    shared.max_buffered
                ),
            ));
        }
    };
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
        Ok(Ok(c)) => {
            let b = c.to_bytes();
            *input_bytes = b.len() as u64;
            b
        }
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

    // Admission: at most the guest's `concurrency` calls of it in flight (429 beyond:
    // this guest is at its limit), and at most `max_inflight` calls of all guests running
    // or queued for a sandbox (503 beyond: the server is).
    let guest_permit = match &guest.limit {
        None => None,
        Some((sem, limit)) => match sem.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                shared.busy_log.line(format_args!(
                    "pvrun: request {id}: POST /{}/{}: 429 limited ({limit} calls of the guest in flight)",
                    guest.name,
                    log::escape(&name, 100),
                ));
                let mut r = text(
                    429,
                    "limited",
                    format!(
                        "too many calls: guest `{}` has its limit of {limit} calls in flight; retry later\n",
                        guest.name
                    ),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return r;
            }
        },
    };
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
            pool.call_and_reset(&call_name, &input)
        }))
        .unwrap_or_else(|_| (Err(CallError::Host("the call panicked".into())), 0));
        drop(input);
        drop(body_held);
        drop(permit);
        drop(guest_permit);
        let _ = answer.send(r);
    });
    let (result, pages) = match ready.calls.send(job) {
        Ok(()) => answered
            .await
            .unwrap_or_else(|_| (Err(CallError::Host("the call thread ended".into())), 0)),
        Err(_) => (Err(CallError::Host("no call thread is running".into())), 0),
    };
    let took = started.elapsed().as_secs_f64();
    *facts = (Some(took), pages);
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

/// Property fuzzing of the pure parts of request handling (the whole gateway is fuzzed
/// over sockets by `host-vmm/tests/gateway_fuzz.rs`).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::{Rng, run};

    const FUNCTIONS: &[&str] = &["upper", "sha256", "json-transform", "a/b", ""];

    fn functions() -> Vec<String> {
        FUNCTIONS.iter().map(|s| s.to_string()).collect()
    }

    fn method(rng: &mut Rng) -> Method {
        const STD: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];
        if rng.below(4) == 0 {
            // An extension method: any token bytes.
            let token: Vec<u8> = (0..1 + rng.below(12))
                .map(|_| b"ABCXYZ!#$%&'*+-.^_`|~019"[rng.below(24) as usize])
                .collect();
            Method::from_bytes(&token).unwrap_or(Method::PATCH)
        } else {
            Method::from_bytes(STD[rng.below(STD.len() as u64) as usize].as_bytes()).unwrap()
        }
    }

    fn path(rng: &mut Rng) -> String {
        const PIECES: &[&str] = &[
            "/",
            "//",
            "upper",
            "healthz",
            "readyz",
            "/healthz",
            "/metrics",
            "metrics",
            "/readyz",
            "%2F",
            "..",
            "?",
            "\u{0}",
            "\u{1b}[31m",
            "\u{7f}",
            "\u{85}",
            "\u{202e}",
            "é",
            "\\",
            "\n",
            "a/b",
            "sha256",
            " ",
        ];
        let mut p = String::new();
        for _ in 0..rng.below(6) {
            match rng.below(5) {
                0 => p
                    .extend((0..rng.below(300)).map(|_| {
                        char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('\u{fffd}')
                    })),
                _ => p.push_str(PIECES[rng.below(PIECES.len() as u64) as usize]),
            }
        }
        p
    }

    #[test]
    fn fuzz_route_of() {
        let fns = functions();
        run("gateway route_of", 20_000, |rng| {
            let m = method(rng);
            let p = path(rng);
            let ready = rng.below(5) != 0;
            let views = [("g", &fns[..])];
            let r = route_of(&m, &p, ready.then_some(&views[..]), false);
            let get = m == Method::GET || m == Method::HEAD;
            match r {
                Route::Health => assert!(get && p == "/healthz", "{m} {p:?}"),
                Route::Readiness => assert!(get && p == "/readyz", "{m} {p:?}"),
                Route::Metrics => assert!(get && p == "/metrics", "{m} {p:?}"),
                Route::Starting => assert!(!ready, "{m} {p:?}"),
                Route::Listing => assert!(ready && get && p == "/"),
                Route::NotPost => assert!(
                    ready
                        && m != Method::POST
                        && !(get && ["/", "/healthz", "/readyz", "/metrics"].contains(&p.as_str())),
                    "{m} {p:?}"
                ),
                Route::GuestListing(_) | Route::UnknownGuest(_) => {
                    panic!("a multi-guest route for one guest: {m} {p:?} -> {r:?}")
                }
                Route::Unknown(g, n) | Route::Call(g, n) => {
                    assert_eq!(g, 0);
                    assert!(ready && m == Method::POST, "{m} {p:?}");
                    // The name is the path without its leading slashes, nothing else.
                    assert!(!n.starts_with('/'), "{p:?} -> {n:?}");
                    assert!(p.ends_with(n) && p[..p.len() - n.len()].bytes().all(|b| b == b'/'));
                    let known = fns.iter().any(|f| f == n);
                    assert_eq!(known, matches!(r, Route::Call(..)), "{p:?} -> {r:?}");
                }
            }
            if !ready && !(get && (p == "/healthz" || p == "/readyz" || p == "/metrics")) {
                assert_eq!(r, Route::Starting, "{m} {p:?}");
            }
        });
    }

    #[test]
    fn fuzz_route_of_several_guests() {
        let fns = functions();
        let other = ["upper".to_string(), "x".to_string()];
        let names = ["upper", "b-1"];
        run("gateway route_of (several guests)", 20_000, |rng| {
            let m = method(rng);
            let mut p = path(rng);
            if rng.below(3) == 0 {
                // A path that names a guest, often followed by one of its functions.
                let g = names[rng.below(2) as usize];
                let f = fns[rng.below(fns.len() as u64) as usize].clone();
                p = format!("/{g}/{f}");
            }
            let views = [(names[0], &fns[..]), (names[1], &other[..])];
            let r = route_of(&m, &p, Some(&views[..]), true);
            let get = m == Method::GET || m == Method::HEAD;
            let rest = p.trim_start_matches('/');
            let (guest, function) = rest.split_once('/').unwrap_or((rest, ""));
            match r {
                Route::Health | Route::Readiness | Route::Metrics => assert!(get),
                Route::Starting => panic!("ready"),
                Route::Listing => assert!(get && p == "/"),
                Route::GuestListing(g) => {
                    assert!(get && names[g] == guest && function.is_empty(), "{p:?}")
                }
                Route::UnknownGuest(n) => {
                    assert_eq!(n, guest);
                    assert!(!names.contains(&n), "{p:?}");
                }
                Route::NotPost => assert!(m != Method::POST && names.contains(&guest)),
                Route::Unknown(g, n) | Route::Call(g, n) => {
                    assert!(
                        m == Method::POST && names[g] == guest && n == function,
                        "{p:?}"
                    );
                    let known = views[g].1.iter().any(|f| f == n);
                    assert_eq!(known, matches!(r, Route::Call(..)), "{p:?} -> {r:?}");
                }
            }
        });
    }

    #[test]
    fn fuzz_unknown_message() {
        let fns = functions();
        run("gateway unknown_message", 20_000, |rng| {
            let name = path(rng);
            let msg = unknown_message(&name, &fns);
            let body = msg.strip_suffix('\n').expect("ends in a newline");
            assert!(
                !body.chars().any(crate::output::needs_escape)
                    && !body.contains(['\n', '\r', '\t']),
                "unescaped in {msg:?}"
            );
            // At most 100 characters of the name, each at most `\u{10ffff}`.
            assert!(
                msg.len() <= 200 + 100 * 10 + fns.join(", ").len(),
                "{}",
                msg.len()
            );
            assert!(msg.ends_with(&format!("{}\n", fns.join(", "))));
            let plain = !name
                .chars()
                .any(|c| crate::output::needs_escape(c) || "\\\n\r\t".contains(c));
            if plain && name.chars().count() <= 100 {
                assert!(msg.contains(&format!("`{name}`")), "{msg:?}");
            }
        });
    }

    #[test]
    fn fuzz_body_share() {
        run("gateway body_share", 50_000, |rng| {
            let max_input = rng.edgy();
            let max_buffered = rng.edgy() as usize;
            let declared = match rng.below(5) {
                0 => None,
                1 => Some(max_input.wrapping_add(rng.below(3)).wrapping_sub(1)),
                2 => Some(
                    (max_buffered as u64)
                        .wrapping_add(rng.below(3))
                        .wrapping_sub(1),
                ),
                _ => Some(rng.edgy()),
            };
            match body_share(declared, max_input, max_buffered) {
                Share::Reserve(w) => {
                    assert!(
                        w <= max_input && w <= max_buffered as u64,
                        "{w} {max_input} {max_buffered}"
                    );
                    assert_eq!(w, declared.unwrap_or(max_input.min(max_buffered as u64)));
                    // The reservation fits a body limit.
                    assert!(usize::try_from(w).is_ok());
                }
                Share::TooLarge(l) => assert!(declared == Some(l) && l > max_input),
                Share::OverBudget(w) => {
                    assert!(w > max_buffered as u64 && w <= max_input && declared == Some(w));
                }
            }
        });
    }
}
