//! The HTTP gateway of `pvrun serve`: `POST /NAME` with the input as body calls function
//! NAME in a pooled, snapshot-reset sandbox and answers with its output.
//!
//! | outcome | status |
//! |---|---|
//! | output | 200, the output as `application/octet-stream` |
//! | the function returned an error | 422, its message |
//! | no such function | 404 |
//! | input too large | 413 |
//! | output too large | 502 |
//! | the guest panicked or crashed | 500, the report |
//! | the call timed out | 504 |
//! | not `POST` (`GET /` lists the functions) | 405 |
//!
//! Every response carries `X-Pvrun-Outcome` (`ok`, `failed`, `unknown`, `too-large`,
//! `panic`, `fault`, `timeout`, `killed`, `error`).

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::{CallError, Error, SandboxPool};

/// A bound gateway, not yet serving.
pub struct Gateway {
    server: Arc<tiny_http::Server>,
    pool: Arc<SandboxPool>,
}

impl Gateway {
    /// Binds `listen` (e.g. `127.0.0.1:8080`; port 0 picks a free port).
    pub fn bind(listen: &str, pool: Arc<SandboxPool>) -> Result<Gateway, Error> {
        let server = tiny_http::Server::http(listen).map_err(|e| {
            let io = e.downcast_ref::<std::io::Error>();
            match io.map(|e| e.kind()) {
                Some(std::io::ErrorKind::AddrInUse) => Error::Config(format!(
                    "cannot listen on {listen}: the address is already in use (choose another --listen port)"
                )),
                Some(std::io::ErrorKind::AddrNotAvailable) => Error::Config(format!(
                    "cannot listen on {listen}: no such local address (use e.g. 127.0.0.1:8080)"
                )),
                _ => Error::Config(format!("cannot listen on {listen}: {e}")),
            }
        })?;
        Ok(Gateway {
            server: Arc::new(server),
            pool,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.server.server_addr().to_ip()
    }

    /// Serves requests with one worker thread per sandbox, until the process ends.
    pub fn serve(self) -> ! {
        let workers: Vec<_> = (0..self.pool.size())
            .map(|_| {
                let server = self.server.clone();
                let pool = self.pool.clone();
                std::thread::spawn(move || {
                    loop {
                        match server.recv() {
                            Ok(req) => handle(&pool, req),
                            Err(_) => continue,
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        std::process::exit(0)
    }
}

fn respond(req: tiny_http::Request, code: u16, outcome: &str, body: Vec<u8>, binary: bool) {
    let ctype = if binary {
        "application/octet-stream"
    } else {
        "text/plain; charset=utf-8"
    };
    let resp = tiny_http::Response::from_data(body)
        .with_status_code(code)
        .with_header(tiny_http::Header::from_bytes("Content-Type", ctype).expect("static header"))
        .with_header(
            tiny_http::Header::from_bytes("X-Pvrun-Outcome", outcome).expect("static header"),
        );
    let _ = req.respond(resp);
}

fn handle(pool: &SandboxPool, mut req: tiny_http::Request) {
    let path = req.url().split('?').next().unwrap_or("/").to_string();
    let name = path.trim_start_matches('/').to_string();
    if *req.method() == tiny_http::Method::Get && name.is_empty() {
        let list = pool.functions().join("\n") + "\n";
        return respond(req, 200, "ok", list.into_bytes(), false);
    }
    if *req.method() != tiny_http::Method::Post {
        return respond(
            req,
            405,
            "error",
            b"use POST /FUNCTION with the input as body\n".to_vec(),
            false,
        );
    }
    if !pool.functions().contains(&name) {
        let msg = format!(
            "no function named `{name}`; this guest exports: {}\n",
            pool.functions().join(", ")
        );
        return respond(req, 404, "unknown", msg.into_bytes(), false);
    }
    let mut input = Vec::new();
    // Read at most the largest input a guest buffer can take, plus one byte to detect more.
    let limit = crate::FN_DATA_MAX + 1;
    if req.as_reader().take(limit).read_to_end(&mut input).is_err() {
        return respond(
            req,
            400,
            "error",
            b"cannot read the request body\n".to_vec(),
            false,
        );
    }
    match pool.call(&name, &input) {
        Ok(out) => respond(req, 200, "ok", out, true),
        Err(e) => {
            let (code, outcome) = match &e {
                CallError::UnknownFunction(_) => (404, "unknown"),
                CallError::InputTooLarge { .. } => (413, "too-large"),
                CallError::OutputTooLarge { .. } => (502, "too-large"),
                CallError::Failed(_) => (422, "failed"),
                CallError::Panic(_) => (500, "panic"),
                CallError::Fault(_) | CallError::Exited(_) => (500, "fault"),
                CallError::Timeout(_) => (504, "timeout"),
                CallError::Killed => (503, "killed"),
                CallError::Host(_) => (500, "error"),
            };
            respond(req, code, outcome, format!("{e}\n").into_bytes(), false);
        }
    }
}
