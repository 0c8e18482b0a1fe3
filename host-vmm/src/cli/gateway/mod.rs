//! The HTTP gateway of `pvrun serve`: `POST /NAME` with the input as body calls function
//! NAME in a pooled, snapshot-reset sandbox and answers with its output. Serving several
//! guests ([`serve_guests`] with `multi`), the paths are `POST /GUEST/NAME`, `GET /GUEST`
//! lists a guest's functions and `GET /` the guests; each guest has its own pool, call
//! threads and queue, and its own concurrency limit.
//!
//! | outcome | status | `X-Pvrun-Outcome` |
//! |---|---|---|
//! | output | 200, the output as `application/octet-stream` | `ok` |
//! | the function returned an error | 422, its message | `failed` |
//! | no such function (or, serving several, no such guest) | 404 | `unknown` |
//! | input too large (refused by `Content-Length` before it is read) | 413 | `too-large` |
//! | output too large | 502 | `too-large` |
//! | the guest panicked (its message) or crashed (no addresses: see the log) | 500 | `panic`, `fault` |
//! | the call timed out | 504 | `timeout` |
//! | not `POST` (`GET /` lists the functions) | 405 | `error` |
//! | malformed request or body | 400 | `bad-request` (or no header: hyper's own 400) |
//! | the body did not arrive within `--body-timeout` | 408 | `body-timeout` |
//! | the guest has its `concurrency` calls in flight (running or queued) | 429 + `Retry-After` | `limited` |
//! | too many calls in flight, too many connections, too many bytes buffered (`--max-buffered`), or still starting | 503 + `Retry-After` | `busy`, `starting` |
//!
//! Every response carries `X-Request-Id`; the log line of a failed call (with the crash
//! report, which names guest addresses and symbols) carries the same id. `GET /healthz`
//! is 200 while the process serves; `GET /readyz` is 200 once the sandboxes are built.
//! `GET /metrics` reports calls, latencies, the pool, resets and sandbox creations in the
//! Prometheus text format (see `metrics.rs`).
//!
//! Why hyper 1.x on tokio: it is the HTTP/1.1 implementation the Rust ecosystem standardised
//! on (under axum, reqwest, tonic), its parser is fuzzed and hardened, and it has the knobs
//! a hostile client needs: a header read deadline that also bounds idle keep-alive
//! connections, a header size cap, pipelining, and graceful shutdown. tokio lets thousands
//! of idle or slow connections cost a task each, not a thread. We serve HTTP/1.1 only, so
//! the connection builder is hyper's `http1::Builder` (no h2 to harden); hyper-util
//! supplies the tokio glue (`TokioIo`, `TokioTimer`) and `GracefulShutdown`. The sandbox
//! calls stay synchronous: each runs on a blocking thread once its body is fully read, so
//! a slow client holds a connection, never a sandbox.

mod handler;
mod log;
mod metrics;
mod stall;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;

use crate::{EXIT_HOST_ERROR, Error, SandboxPool};
use handler::{Ready, Shared};
use log::RateLimited;

pub use log::GuestConsole;

/// Logs one line through the gateway's log queue: it never blocks the caller (a stalled
/// stderr drops lines, counted), and lines reach stderr in order.
pub fn log_line(line: &str) {
    log::line(format_args!("{line}"));
}

/// How the gateway treats its clients.
#[derive(Clone, Debug)]
pub struct Options {
    /// Address to listen on (port 0 picks a free port).
    pub listen: String,
    /// A request's headers (and an idle keep-alive connection's next request) must arrive
    /// within this; a client that stops reading its responses for this long is cut off.
    pub header_timeout: Duration,
    /// A request's body must arrive within this, counted from the end of its headers.
    pub body_timeout: Duration,
    /// Connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Calls running or waiting for a sandbox; more are answered 503.
    pub max_inflight: usize,
    /// Bytes of request bodies and call outputs held at once (a body from before it is
    /// read until its call ends, an output until it is sent); requests beyond are
    /// answered 503.
    pub max_buffered: u64,
    /// How long a shutdown waits for calls in flight.
    pub shutdown_timeout: Duration,
}

/// Connections beyond `max_connections` that are still being told 503 (each for at most
/// [`OVERFLOW_LINGER`]); past this they are closed at once.
const OVERFLOW_MAX: usize = 64;
const OVERFLOW_LINGER: Duration = Duration::from_secs(1);
/// File descriptors the process needs besides connections (KVM, eventfds, stdio, ...).
const FD_RESERVE: u64 = 64;

/// One guest for [`serve`]: its name, how to build its pool, and its concurrency limit.
pub struct GuestBuild {
    /// Its name in URLs (several guests), metrics and the access log.
    pub name: String,
    /// What the banner says it serves from (its path).
    pub from: String,
    /// Calls in flight beyond which calls get 429 (None: only `--max-inflight`).
    pub concurrency: Option<usize>,
    /// Builds its pool (on a thread that is not confined yet).
    pub build: Box<dyn FnOnce() -> Result<SandboxPool, Error> + Send>,
}

/// [`serve_guests`] of one guest (`POST /FN`): `guest` is its path (the banner's), its
/// file name the guest name of metrics and the access log.
pub fn serve<F>(opts: Options, guest: String, build: F) -> !
where
    F: FnOnce() -> Result<SandboxPool, Error> + Send + 'static,
{
    let name = std::path::Path::new(&guest)
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "guest".into());
    serve_guests(
        opts,
        false,
        vec![GuestBuild {
            name,
            from: guest,
            concurrency: None,
            build: Box::new(build),
        }],
    )
}

/// Binds `opts.listen`, then builds each guest's sandbox pool (the port answers
/// `/healthz` meanwhile), prints `pvrun: serving ... on http://ADDR/ ...` when all are
/// ready, and serves until SIGTERM or SIGINT. With `multi`, calls are `POST /GUEST/FN`;
/// otherwise there is one guest and calls are `POST /FN`. Then it stops accepting, lets
/// calls in flight finish (up to `opts.shutdown_timeout`) and exits 0 (1 if calls were
/// still running). Failing to bind or to build a pool is one `pvrun: error:` line and
/// status 125.
pub fn serve_guests(opts: Options, multi: bool, guests: Vec<GuestBuild>) -> ! {
    let fail = |e: &dyn std::fmt::Display| -> ! {
        log::line(format_args!("pvrun: error: {e}"));
        log::exit(EXIT_HOST_ERROR, Duration::from_secs(1))
    };
    let max_inflight = opts.max_inflight.max(1);
    let max_buffered = usize::try_from(opts.max_buffered)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS);
    // Every thread starts before anything is confined: a confined thread cannot start one.
    log::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Nothing here uses tokio's blocking pool (calls run on our own threads); a
        // worker that tried to start a thread would be stopped by its filter.
        .max_blocking_threads(1)
        .thread_name("pvrun-gateway")
        // The workers serve connections and nothing else: confine each as it starts.
        .on_thread_start(|| crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Gateway))
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("cannot start the gateway's runtime: {e}")));
    let code = rt.block_on(async move {
        let listener = bind(&opts.listen).unwrap_or_else(|e| fail(&e));
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or(opts.listen.clone());
        check_fd_limit(opts.max_connections);
        // Before anything is announced, so a signal right after the banner is handled.
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            _ => fail(&"cannot install the SIGTERM/SIGINT handlers"),
        };
        let mut builds = Vec::new();
        let mut entries = Vec::new();
        for g in guests {
            entries.push(handler::Guest {
                name: g.name.clone(),
                pool: OnceLock::new(),
                limit: g.concurrency.map(|n| (Arc::new(Semaphore::new(n.max(1))), n.max(1))),
            });
            builds.push((g.from, g.build));
        }
        let shared = Arc::new(Shared {
            guests: entries,
            multi,
            ready: OnceLock::new(),
            inflight: Arc::new(Semaphore::new(max_inflight)),
            max_inflight,
            body_timeout: opts.body_timeout,
            buffered: Arc::new(Semaphore::new(max_buffered)),
            max_buffered,
            ids: log::RequestIds::new(),
            call_log: RateLimited::new(20),
            busy_log: RateLimited::new(1),
            metrics: metrics::Metrics::new(),
        });
        // The pools are built on a thread of its own (the port answers `/healthz`
        // meanwhile), which then becomes one of the first guest's call threads.
        let building = shared.clone();
        let started = std::thread::Builder::new()
            .name("pvrun-call".into())
            .spawn(move || {
                let mut first_calls = None;
                let mut banner = Vec::new();
                for (i, (from, build)) in builds.into_iter().enumerate() {
                    let guest = &building.guests[i];
                    let pool = Arc::new(build().unwrap_or_else(|e| {
                        if multi {
                            fail(&format!("guest `{}`: {e}", guest.name))
                        } else {
                            fail(&e)
                        }
                    }));
                    // One call thread per sandbox the pool may have: calls beyond wait in
                    // this guest's own queue, never holding a thread another guest needs.
                    let limits = pool.limits();
                    let calls = Callers::start(limits.max, i == 0)
                        .unwrap_or_else(|e| fail(&format!("cannot start the call threads: {e}")));
                    let functions = pool.functions().join(", ");
                    banner.push(if multi {
                        let sizes = if limits.min == limits.max {
                            format!("{} sandboxes", limits.max)
                        } else {
                            format!("{}-{} sandboxes", limits.min, limits.max)
                        };
                        format!("{} ({functions} from {from}, {sizes})", guest.name)
                    } else {
                        format!("{functions} from {from} on http://{addr}/ with {} sandboxes", limits.min)
                    });
                    let listing = Bytes::from(pool.functions().join("\n") + "\n");
                    let max_input = pool.max_input();
                    let _ = guest.pool.set(Ready {
                        pool,
                        max_input,
                        listing,
                        calls: calls.sender(),
                    });
                    if i == 0 {
                        first_calls = Some(calls);
                    }
                }
                if let Err(e) = crate::function::sandbox::confine_caller() {
                    fail(&e)
                }
                let names: Vec<&str> = building.guests.iter().map(|g| g.name.as_str()).collect();
                let _ = building.ready.set(Bytes::from(names.join("\n") + "\n"));
                if multi {
                    log::line(format_args!(
                        "pvrun: serving {} guests on http://{addr}/: {}",
                        banner.len(),
                        banner.join("; ")
                    ));
                } else {
                    log::line(format_args!("pvrun: serving {}", banner.join("")));
                }
                if let Some(calls) = first_calls {
                    calls.serve();
                }
            });
        if let Err(e) = started {
            fail(&format!("cannot start the call threads: {e}"))
        }
        // From here on this thread only accepts connections and waits for signals.
        crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Gateway);

        // Pipelined requests are answered in order either way. `pipeline_flush(true)` is
        // left off on purpose: with it, hyper 1.x never flushes its automatic 400 for a
        // garbage request line and closes the connection without an answer.
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(opts.header_timeout)
            .keep_alive(true)
            .max_buf_size(64 * 1024)
            .max_header_size(16 * 1024);
        let graceful = GracefulShutdown::new();
        let conns = Arc::new(Semaphore::new(opts.max_connections.max(1)));
        let overflow = Arc::new(Semaphore::new(OVERFLOW_MAX));
        let full_log = RateLimited::new(1);
        let mut accept_failing = false;
        let mut backoff = Duration::from_millis(10);
        let signo = loop {
            let accepted = tokio::select! {
                _ = term.recv() => break libc::SIGTERM,
                _ = int.recv() => break libc::SIGINT,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, _peer)) => {
                    if accept_failing {
                        log::line(format_args!("pvrun: accepting connections again"));
                        accept_failing = false;
                    }
                    backoff = Duration::from_millis(10);
                    let Ok(permit) = conns.clone().try_acquire_owned() else {
                        full_log.line(format_args!(
                            "pvrun: {} connections open (--max-connections): answering 503 to new ones",
                            opts.max_connections
                        ));
                        turn_away(stream, &overflow);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let svc = service_fn(move |req| handler::handle(shared.clone(), req));
                    let io = TokioIo::new(stall::WriteDeadline::new(stream, opts.header_timeout));
                    let conn = graceful.watch(http.serve_connection(io, svc));
                    tokio::spawn(async move {
                        // Errors here are the client's (reset, timeout, bad request): the
                        // connection just ends.
                        let _ = conn.await;
                        drop(permit);
                    });
                }
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the listener is fine, the process or
                    // machine is out of something. Back off (the kernel keeps the pending
                    // connections queued) and try again; say so once per burst.
                    if !accept_failing {
                        log::line(format_args!(
                            "pvrun: cannot accept connections ({e}); retrying with back-off"
                        ));
                        accept_failing = true;
                    }
                    tokio::select! {
                        _ = term.recv() => break libc::SIGTERM,
                        _ = int.recv() => break libc::SIGINT,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        };

        // Shutdown: stop accepting, let the calls in flight finish, then exit.
        drop(listener);
        let open = graceful.count();
        log::line(format_args!(
            "pvrun: got signal {signo}; stopped accepting, finishing {} calls in flight on {open} connections (up to {:.0} s)",
            max_inflight - shared.inflight.available_permits(),
            opts.shutdown_timeout.as_secs_f64()
        ));
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            log::line(format_args!("pvrun: second signal: exiting now"));
            log::exit(1, Duration::from_secs(1));
        });
        let drained = async {
            graceful.shutdown().await;
            // Calls whose client went away still run on their blocking threads.
            let _ = shared.inflight.acquire_many(max_inflight as u32).await;
        };
        match tokio::time::timeout(opts.shutdown_timeout, drained).await {
            Ok(()) => {
                log::line(format_args!("pvrun: shut down cleanly"));
                0
            }
            Err(_) => {
                log::line(format_args!(
                    "pvrun: calls still running after {:.0} s; exiting anyway",
                    opts.shutdown_timeout.as_secs_f64()
                ));
                1
            }
        }
    });
    // Not `drop(rt)`: that would wait for blocking threads still inside a call.
    log::exit(code, Duration::from_secs(1))
}

/// A call for a call thread: it runs it, then answers on the call's own channel.
pub(super) type Job = Box<dyn FnOnce() + Send>;

/// The threads that run sandbox calls, one per sandbox (a call waits in their queue, not
/// on a thread, for a sandbox). Each runs under the vCPU seccomp filter. They are our own
/// threads rather than tokio's blocking pool, because the pool starts threads on demand
/// from the (confined) workers, and a thread inherits its creator's filter.
struct Callers {
    tx: std::sync::mpsc::Sender<Job>,
    rx: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<Job>>>,
}

impl Callers {
    /// Starts `n` call threads, or `n - 1` with `caller_serves` (the caller is the n-th,
    /// see [`Callers::serve`]).
    fn start(n: usize, caller_serves: bool) -> std::io::Result<Callers> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let callers = Callers {
            tx,
            rx: Arc::new(std::sync::Mutex::new(rx)),
        };
        for _ in usize::from(caller_serves)..n.max(1) {
            let rx = callers.rx.clone();
            std::thread::Builder::new()
                .name("pvrun-call".into())
                .spawn(move || {
                    if let Err(e) = crate::function::sandbox::confine_caller() {
                        log::line(format_args!("pvrun: error: {e}"));
                        log::exit(EXIT_HOST_ERROR, Duration::from_secs(1))
                    }
                    run_calls(&rx)
                })?;
        }
        Ok(callers)
    }

    fn sender(&self) -> std::sync::mpsc::Sender<Job> {
        self.tx.clone()
    }

    /// Runs calls on this thread (which must be confined already) for good.
    fn serve(self) {
        let rx = self.rx.clone();
        drop(self);
        run_calls(&rx)
    }
}

fn run_calls(rx: &std::sync::Mutex<std::sync::mpsc::Receiver<Job>>) {
    loop {
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

/// Binds a listener with a backlog long enough for bursts of connections.
fn bind(listen: &str) -> Result<TcpListener, Error> {
    let addrs: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|e| {
            Error::Config(format!(
                "cannot listen on {listen}: {e} (use e.g. 127.0.0.1:8080)"
            ))
        })?
        .collect();
    let mut last = None;
    for addr in addrs {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        };
        let r = socket.and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(4096)
        });
        match r {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(match last.as_ref().map(|e| e.kind()) {
        Some(std::io::ErrorKind::AddrInUse) => Error::Config(format!(
            "cannot listen on {listen}: the address is already in use (choose another --listen port)"
        )),
        Some(std::io::ErrorKind::AddrNotAvailable) => Error::Config(format!(
            "cannot listen on {listen}: no such local address (use e.g. 127.0.0.1:8080)"
        )),
        Some(_) => Error::Config(format!(
            "cannot listen on {listen}: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )),
        None => Error::Config(format!("cannot listen on {listen}: no address")),
    })
}

/// Accept errors that concern one connection (it went away before we took it).
fn is_per_connection(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::EINTR)
    )
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, and warns if connections could still
/// run the process out of descriptors (accepting then backs off until some close).
fn check_fd_limit(max_connections: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let need = max_connections as u64 + OVERFLOW_MAX as u64 + FD_RESERVE;
    if lim.rlim_cur < need {
        log::line(format_args!(
            "pvrun: warning: --max-connections {max_connections} needs about {need} file descriptors but RLIMIT_NOFILE is {}; accepting will pause when they run out",
            lim.rlim_cur
        ));
    }
}

/// Answers a connection beyond the cap with a 503 and closes it, without reading its
/// request: a short-lived task (at most [`OVERFLOW_MAX`] of them), closed at once beyond.
fn turn_away(stream: TcpStream, overflow: &Arc<Semaphore>) {
    let Ok(permit) = overflow.clone().try_acquire_owned() else {
        return; // dropped: closed
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        const BODY: &str = "busy: too many connections; retry later\n";
        let busy = format!(
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nX-Pvrun-Outcome: busy\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
            BODY.len()
        );
        let _ = tokio::time::timeout(OVERFLOW_LINGER, async {
            stream.write_all(busy.as_bytes()).await?;
            stream.shutdown().await?;
            // Read (and drop) what the client sends until it closes, so our close is not
            // a reset that could destroy the 503 before the client reads it.
            let mut buf = [0u8; 4096];
            while stream.read(&mut buf).await? > 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
    });
}
