//! `cargo pvrun test`'s runner. Running one test binary: boot it once into a function sandbox, list its tests, run each
//! selected test as one call from the same snapshot (over several sandboxes in parallel)
//! and print what libtest prints.
//!
//! Isolation comes from the sandbox machinery: before every call the sandbox is reset to
//! the snapshot taken after initialisation, so a test that panicked, crashed, ran past its
//! timeout or scribbled over memory leaves nothing behind for the next one.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::output::{StdStream, escape_controls};
use crate::{CallError, GuestImage, Sandbox, SandboxConfig};

pub mod list;

use list::{ShouldPanic, TestDesc};

/// Largest captured console output kept per test; the rest is counted and cut.
const CAPTURE_MAX: usize = 1 << 20;
/// Largest captured output kept for the report over all the tests of a binary; later
/// tests' output is dropped (with a note) so 1,000 chatty tests cannot exhaust the host.
const KEPT_MAX: usize = 64 << 20;

/// The libtest options that decide what runs and what is printed.
#[derive(Clone, Debug, Default)]
pub struct HarnessOptions {
    pub filters: Vec<String>,
    pub exact: bool,
    pub skip: Vec<String>,
    pub list: bool,
    pub nocapture: bool,
    pub show_output: bool,
    pub ignored: bool,
    pub include_ignored: bool,
    pub threads: usize,
    pub timeout: Duration,
}

/// Counts of one binary's run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub ignored: usize,
    pub filtered_out: usize,
}

/// Why a binary could not be run at all.
pub enum RunError {
    /// The host failed (KVM, a bad ELF): exit 125.
    Host(String),
    /// The test binary misbehaved before any test ran (did not initialise, returned a
    /// corrupt list): the target fails.
    Binary(String),
}

/// How one test ended.
enum Verdict {
    Ok,
    Failed(String),
    Ignored(String),
}

struct Done {
    pos: usize,
    verdict: Verdict,
    output: Vec<u8>,
}

/// A console sink that keeps up to [`CAPTURE_MAX`] bytes and counts the rest.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<(Vec<u8>, u64)>>);

impl Capture {
    fn take(&self) -> Vec<u8> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (buf, cut) = &mut *g;
        let mut out = std::mem::take(buf);
        if *cut > 0 {
            out.extend_from_slice(
                format!("\n[pvrun: {cut} more bytes of this test's output were cut]\n").as_bytes(),
            );
            *cut = 0;
        }
        out
    }
}

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (buf, cut) = &mut *g;
        let room = CAPTURE_MAX.saturating_sub(buf.len());
        let n = b.len().min(room);
        buf.extend_from_slice(&b[..n]);
        *cut += (b.len() - n) as u64;
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the report goes; a write error (a closed stdout) is ignored: the host never
/// panics on it, and the tests still run to give the exit status.
struct Out<'a>(&'a mut dyn Write);

impl Out<'_> {
    fn put(&mut self, s: &str) {
        self.put_bytes(s.as_bytes());
    }

    fn put_bytes(&mut self, b: &[u8]) {
        let _ = self.0.write_all(b);
        let _ = self.0.flush();
    }
}

/// Whether `name` passes the filters and skips, as libtest decides it.
fn selected(name: &str, o: &HarnessOptions) -> bool {
    let matches = |pat: &String| {
        if o.exact {
            name == pat
        } else {
            name.contains(pat.as_str())
        }
    };
    (o.filters.is_empty() || o.filters.iter().any(matches)) && !o.skip.iter().any(matches)
}

/// A guest-chosen multi-line text (a panic message) with each line escaped and every line
/// after the first indented by two spaces: readable, and unable to forge a result line
/// (`test result: ok. ...`) at the start of a line.
fn escape_lines(s: &str) -> String {
    s.lines()
        .map(|l| escape_controls(l).into_owned())
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// The verdict of a finished call for a test with these expectations.
fn judge(t: &TestDesc, r: Result<Vec<u8>, CallError>) -> Verdict {
    match (&t.should_panic, r) {
        (ShouldPanic::No, Ok(_)) => Verdict::Ok,
        (_, Ok(_)) => Verdict::Failed("note: test did not panic as expected".into()),
        (ShouldPanic::Yes, Err(CallError::Panic(_))) => Verdict::Ok,
        (ShouldPanic::Expected(want), Err(CallError::Panic(m))) => {
            // libtest compares the panic's message, not its location line.
            let msg = match m.strip_prefix("panicked") {
                Some(rest) => rest.split_once('\n').map_or("", |(_, msg)| msg),
                None => m.as_str(),
            };
            if msg.contains(want.as_str()) {
                Verdict::Ok
            } else {
                Verdict::Failed(format!(
                    "note: panic did not contain expected string\n      panic message: {:?}\n expected substring: {:?}",
                    escape_controls(msg),
                    escape_controls(want)
                ))
            }
        }
        (_, Err(e)) => Verdict::Failed(describe(e)),
    }
}

/// The report of a test that did not return normally.
fn describe(e: CallError) -> String {
    match e {
        CallError::Panic(m) if m.starts_with("panicked") => {
            format!("pvrun: guest {}", escape_lines(&m))
        }
        CallError::Panic(m) => format!("pvrun: guest aborted: {}", escape_lines(&m)),
        CallError::Fault(f) => format!("pvrun: guest crashed: {}", escape_lines(&f.to_string())),
        CallError::Timeout(t) => format!(
            "pvrun: test timed out after {:.3} s and was stopped (--test-timeout)",
            t.as_secs_f64()
        ),
        CallError::Failed(m) => escape_lines(&m),
        CallError::Exited(c) => format!("pvrun: the test exited the guest with status {c}"),
        other => format!("pvrun: {}", escape_lines(&other.to_string())),
    }
}

/// What a worker needs: the shared queue of selected tests and the template.
struct Work<'a> {
    next: &'a AtomicUsize,
    chosen: &'a [&'a TestDesc],
    template: &'a Arc<crate::Template>,
    o: &'a HarnessOptions,
    runs_ignored: bool,
}

impl Work<'_> {
    /// Takes tests off the queue until it is empty, each in this worker's own sandbox
    /// (made on its first test), and hands every result to `emit`.
    fn run(&self, emit: &mut dyn FnMut(Done)) {
        let capture = Capture::default();
        let sink = |c: &Capture| -> Box<dyn Write + Send> {
            if self.o.nocapture {
                Box::new(StdStream::stdout())
            } else {
                Box::new(c.clone())
            }
        };
        let mut sandbox = None;
        loop {
            let pos = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(t) = self.chosen.get(pos) else {
                return;
            };
            if t.ignore && !self.runs_ignored {
                emit(Done {
                    pos,
                    verdict: Verdict::Ignored(t.ignore_reason.clone()),
                    output: Vec::new(),
                });
                continue;
            }
            if sandbox.is_none() {
                match Sandbox::from_template_with_console(
                    self.template,
                    sink(&capture),
                    sink(&capture),
                ) {
                    Ok(sb) => sandbox = Some(sb),
                    Err(e) => {
                        emit(Done {
                            pos,
                            verdict: Verdict::Failed(format!(
                                "pvrun: host error: cannot create a sandbox: {e}"
                            )),
                            output: Vec::new(),
                        });
                        continue;
                    }
                }
            }
            let sb = sandbox.as_mut().expect("created above");
            capture.take();
            let r = sb.call(list::RUN_FUNCTION, &t.index.to_le_bytes());
            // A panic or a CPU exception: the test's call stack, as a crash report has it
            // (symbolized only for a failure, from the image's DWARF).
            let backtrace = match &r {
                Err(CallError::Panic(_)) => sb.crash(),
                Err(CallError::Fault(f)) if f.vector.is_some() => sb.crash(),
                _ => None,
            }
            .map(|c| c.backtrace.render(sb.image()));
            let mut verdict = judge(t, r);
            if let (Verdict::Failed(m), Some(bt)) = (&mut verdict, backtrace) {
                m.push_str("\nstack backtrace:\n");
                m.push_str(bt.trim_end());
            }
            emit(Done {
                pos,
                verdict,
                output: capture.take(),
            });
        }
    }
}

/// Boots `elf`, lists its tests and runs the selected ones, writing libtest's report to
/// `report` (`cargo pvrun test` passes stdout). With `nocapture` the tests' console output
/// goes to this process's stdout as it is written.
pub fn run_binary(
    elf: &Path,
    name: &str,
    o: &HarnessOptions,
    report: &mut dyn Write,
) -> Result<Summary, RunError> {
    let mut w = Out(report);
    let started = Instant::now();
    let image = GuestImage::from_file(elf)
        .map(Arc::new)
        .map_err(|e| RunError::Host(format!("cannot load test binary `{}`: {e}", elf.display())))?;
    let init_output = Capture::default();
    let config = SandboxConfig {
        args: vec![name.to_string()],
        env: vec![(list::HARNESS_ENV.to_string(), "1".to_string())],
        call_timeout: Some(o.timeout),
        console: Arc::new(Mutex::new(Box::new(init_output.clone()))),
        console_rate: 0,
        ..SandboxConfig::default()
    };
    let mut first = match Sandbox::from_image(image, config) {
        Ok(s) => s,
        Err(crate::Error::Config(m)) => {
            return Err(RunError::Binary(format!(
                "{} (a test binary is built by `cargo pvrun test` and serves its tests; did its initialisation fail?)",
                escape_controls(&m)
            )));
        }
        Err(e) => {
            return Err(RunError::Host(format!(
                "cannot boot test binary `{name}`: {e}"
            )));
        }
    };
    let raw = first
        .call(list::LIST_FUNCTION, &[])
        .map_err(|e| RunError::Binary(format!("listing its tests failed: {}", describe(e))))?;
    let tests = list::parse(&raw).map_err(|e| {
        RunError::Binary(format!(
            "it returned a malformed test list ({e}); was it built with the pvrun SDK's harness?"
        ))
    })?;
    let template = first.template().clone();
    drop(first);

    let total = tests.len();
    let chosen: Vec<&TestDesc> = tests
        .iter()
        .filter(|t| selected(&t.name, o))
        .filter(|t| !o.ignored || t.ignore)
        .collect();
    let filtered_out = total - chosen.len();

    if o.list {
        for t in &chosen {
            w.put(&format!("{}: test\n", escape_controls(&t.name)));
        }
        if !chosen.is_empty() {
            w.put("\n");
        }
        w.put(&format!("{} tests, 0 benchmarks\n", chosen.len()));
        return Ok(Summary {
            filtered_out,
            ..Summary::default()
        });
    }

    w.put(&format!(
        "\nrunning {} test{}\n",
        chosen.len(),
        if chosen.len() == 1 { "" } else { "s" }
    ));
    let runs_ignored = o.ignored || o.include_ignored;
    let next = AtomicUsize::new(0);
    let to_run = chosen.iter().filter(|t| runs_ignored || !t.ignore).count();
    let threads = o.threads.max(1).min(to_run.max(1));
    let mut results: Vec<Option<Done>> = (0..chosen.len()).map(|_| None).collect();
    let mut host_error = None;
    let mut kept = 0usize;
    // Prints a result line as it arrives and keeps what the report needs.
    let mut handle = |mut d: Done| {
        let t = chosen[d.pos];
        let name = escape_controls(&t.name);
        match &d.verdict {
            Verdict::Ok => w.put(&format!("test {name} ... ok\n")),
            Verdict::Failed(m) => {
                if m.starts_with("pvrun: host error") && host_error.is_none() {
                    host_error = Some(m.clone());
                }
                w.put(&format!("test {name} ... FAILED\n"))
            }
            Verdict::Ignored(r) if r.is_empty() => w.put(&format!("test {name} ... ignored\n")),
            Verdict::Ignored(r) => w.put(&format!(
                "test {name} ... ignored, {}\n",
                escape_controls(r)
            )),
        }
        // Only what the report prints is kept, within KEPT_MAX in all.
        let shown = matches!(d.verdict, Verdict::Failed(_)) || o.show_output;
        if !shown {
            d.output = Vec::new();
        } else if kept + d.output.len() > KEPT_MAX {
            d.output = format!(
                "[pvrun: {} bytes of output dropped: the report keeps at most {} MiB of output per test binary]\n",
                d.output.len(),
                KEPT_MAX >> 20
            )
            .into_bytes();
        }
        kept += d.output.len();
        let pos = d.pos;
        results[pos] = Some(d);
    };
    let work = Work {
        next: &next,
        chosen: &chosen,
        template: &template,
        o,
        runs_ignored,
    };
    if threads == 1 {
        // Like libtest with one thread: the tests run on this thread, no hand-offs.
        work.run(&mut handle);
    } else {
        let (tx, rx) = mpsc::channel::<Done>();
        std::thread::scope(|s| {
            for _ in 0..threads {
                let tx = tx.clone();
                let work = &work;
                s.spawn(move || {
                    work.run(&mut |d| {
                        let _ = tx.send(d);
                    })
                });
            }
            drop(tx);
            for d in rx {
                handle(d);
            }
        });
    }
    if let Some(e) = host_error {
        return Err(RunError::Host(e));
    }

    let mut sum = Summary {
        filtered_out,
        ..Summary::default()
    };
    let mut failures = Vec::new();
    let mut successes = Vec::new();
    for (t, d) in chosen.iter().zip(&results) {
        let Some(d) = d else { continue };
        match &d.verdict {
            Verdict::Ok => {
                sum.passed += 1;
                successes.push((t, d));
            }
            Verdict::Failed(_) => {
                sum.failed += 1;
                failures.push((t, d));
            }
            Verdict::Ignored(_) => sum.ignored += 1,
        }
    }
    let mut section = |title: &str, list: &[(&&TestDesc, &Done)], with_empty: bool| {
        let shown: Vec<_> = list
            .iter()
            .filter(|(_, d)| with_empty || !d.output.is_empty())
            .collect();
        if list.is_empty() {
            return;
        }
        w.put(&format!("\n{title}:\n\n"));
        for (t, d) in &shown {
            w.put(&format!("---- {} stdout ----\n", escape_controls(&t.name)));
            w.put_bytes(&d.output);
            if !d.output.is_empty() && !d.output.ends_with(b"\n") {
                w.put("\n");
            }
            if let Verdict::Failed(m) = &d.verdict {
                w.put(&format!("{m}\n"));
            }
            w.put("\n");
        }
        w.put(&format!("\n{title}:\n"));
        for (t, _) in list {
            w.put(&format!("    {}\n", escape_controls(&t.name)));
        }
    };
    if o.show_output && !o.nocapture {
        section("successes", &successes, false);
    }
    section("failures", &failures, true);
    w.put(&format!(
        "\ntest result: {}. {} passed; {} failed; {} ignored; 0 measured; {} filtered out; finished in {:.2}s\n\n",
        if sum.failed == 0 { "ok" } else { "FAILED" },
        sum.passed,
        sum.failed,
        sum.ignored,
        sum.filtered_out,
        started.elapsed().as_secs_f64()
    ));
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(sp: ShouldPanic) -> TestDesc {
        TestDesc {
            index: 0,
            name: "t".into(),
            ignore: false,
            ignore_reason: String::new(),
            should_panic: sp,
        }
    }

    #[test]
    fn filters_skips_and_exact_select_like_libtest() {
        let o = HarnessOptions {
            filters: vec!["tests::a".into()],
            skip: vec!["slow".into()],
            ..HarnessOptions::default()
        };
        assert!(selected("tests::abc", &o));
        assert!(!selected("tests::abc_slow", &o));
        assert!(!selected("tests::b", &o));
        let exact = HarnessOptions {
            filters: vec!["tests::a".into()],
            exact: true,
            ..HarnessOptions::default()
        };
        assert!(selected("tests::a", &exact));
        assert!(!selected("tests::abc", &exact));
        assert!(selected("x", &HarnessOptions::default()));
    }

    #[test]
    fn should_panic_is_judged_from_the_panic_message_not_its_location() {
        let p = |m: &str| Err(CallError::Panic(m.into()));
        let want = desc(ShouldPanic::Expected("src/lib.rs".into()));
        assert!(matches!(
            judge(&want, p("panicked at src/lib.rs:1:1:\nboom")),
            Verdict::Failed(_)
        ));
        let want = desc(ShouldPanic::Expected("boom".into()));
        assert!(matches!(
            judge(&want, p("panicked at src/lib.rs:1:1:\nboom\nmore")),
            Verdict::Ok
        ));
        assert!(matches!(judge(&want, Ok(vec![])), Verdict::Failed(_)));
        assert!(matches!(
            judge(&desc(ShouldPanic::Yes), p("panicked at x:1:1:\ny")),
            Verdict::Ok
        ));
        assert!(matches!(
            judge(&desc(ShouldPanic::No), p("panicked at x:1:1:\ny")),
            Verdict::Failed(_)
        ));
        // A guest-chosen message cannot put control characters on the terminal.
        let Verdict::Failed(m) = judge(
            &desc(ShouldPanic::No),
            p("panicked at x:1:1:\nfake\x1b[31m"),
        ) else {
            panic!("not a failure")
        };
        assert!(m.contains("\\u{1b}") && !m.contains('\x1b'), "{m}");
    }

    #[test]
    fn capture_keeps_a_bounded_amount() {
        let mut c = Capture::default();
        c.write_all(&vec![b'x'; CAPTURE_MAX + 10]).unwrap();
        let got = c.take();
        assert!(got.len() < CAPTURE_MAX + 100);
        assert!(String::from_utf8_lossy(&got).contains("10 more bytes"));
        assert!(c.take().is_empty());
    }
}
