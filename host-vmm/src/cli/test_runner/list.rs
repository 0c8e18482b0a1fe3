//! The test list a test binary returns from `__pvrun_test_list` (format in the SDK's
//! `pvrun::testing` and in docs/ABI.md), parsed and validated on the host: it is guest
//! data, so every length is checked against the bytes actually received.

use anyhow::{Result, bail};

/// Magic at the start of the list.
pub const MAGIC: &[u8; 8] = b"PVTEST1\n";
/// Name of the export that lists the tests.
pub const LIST_FUNCTION: &str = "__pvrun_test_list";
/// Name of the export that runs one test.
pub const RUN_FUNCTION: &str = "__pvrun_test_run";
/// Environment variable that tells the SDK it runs under `cargo pvrun test`.
pub const HARNESS_ENV: &str = "PVRUN_TEST_HARNESS";
/// More tests than this in one binary is a corrupt list.
const MAX_TESTS: u32 = 1_000_000;
/// Longest name, reason or expected message accepted.
const MAX_STRING: u32 = 64 << 10;

/// What a test expects about panics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShouldPanic {
    No,
    Yes,
    Expected(String),
}

/// One test of a binary, as the binary declared it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestDesc {
    /// Position in the binary's list (the input of `__pvrun_test_run`).
    pub index: u32,
    /// `module::path::name`, without the crate name.
    pub name: String,
    pub ignore: bool,
    pub ignore_reason: String,
    pub should_panic: ShouldPanic,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            bail!(
                "the list ends inside {what} (at byte {} of {})",
                self.pos,
                self.buf.len()
            );
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u32(what)?;
        if len > MAX_STRING {
            bail!("{what} is {len} bytes long (at most {MAX_STRING})");
        }
        let b = self.take(len as usize, what)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => bail!("{what} is not UTF-8"),
        }
    }
}

/// Parses the list; any inconsistency is an error naming it.
pub fn parse(buf: &[u8]) -> Result<Vec<TestDesc>> {
    let mut r = Reader { buf, pos: 0 };
    if r.take(8, "the magic")? != MAGIC {
        bail!("it does not start with the test-list magic `PVTEST1`");
    }
    let count = r.u32("the test count")?;
    if count > MAX_TESTS {
        bail!("it claims {count} tests (at most {MAX_TESTS})");
    }
    let mut tests = Vec::with_capacity(count.min(4096) as usize);
    for index in 0..count {
        let flags = r.take(1, "a test's flags")?[0];
        if flags & !7 != 0 {
            bail!("test {index} has unknown flags {flags:#x}");
        }
        let name = r.string("a test name")?;
        if name.is_empty() {
            bail!("test {index} has an empty name");
        }
        let ignore_reason = r.string("an ignore reason")?;
        let expected = r.string("an expected panic message")?;
        let should_panic = match (flags & 2 != 0, flags & 4 != 0) {
            (false, false) => ShouldPanic::No,
            (true, false) => ShouldPanic::Yes,
            (true, true) => ShouldPanic::Expected(expected),
            (false, true) => bail!("test {index} expects a panic message but no panic"),
        };
        tests.push(TestDesc {
            index,
            name,
            ignore: flags & 1 != 0,
            ignore_reason,
            should_panic,
        });
    }
    if r.pos != buf.len() {
        bail!("{} bytes follow the last test", buf.len() - r.pos);
    }
    Ok(tests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(out: &mut Vec<u8>, flags: u8, name: &str, reason: &str, expected: &str) {
        out.push(flags);
        for s in [name, reason, expected] {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }

    fn list(entries: &[(u8, &str, &str, &str)]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (f, n, r, e) in entries {
            entry(&mut out, *f, n, r, e);
        }
        out
    }

    #[test]
    fn a_good_list_parses() {
        let t = parse(&list(&[
            (0, "a", "", ""),
            (1 | 2 | 4, "m::b", "slow", "boom"),
        ]))
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "a");
        assert_eq!(t[0].should_panic, ShouldPanic::No);
        assert!(t[1].ignore);
        assert_eq!(t[1].index, 1);
        assert_eq!(t[1].ignore_reason, "slow");
        assert_eq!(t[1].should_panic, ShouldPanic::Expected("boom".into()));
    }

    #[test]
    fn malformed_lists_are_errors_not_panics() {
        let good = list(&[(2, "name", "", "")]);
        // Every truncation of a good list is an error.
        for n in 0..good.len() {
            assert!(parse(&good[..n]).is_err(), "truncated at {n}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(parse(&trailing).unwrap_err().to_string().contains("follow"));
        assert!(
            parse(b"NOTALIST\0\0\0\0")
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&huge).unwrap_err().to_string().contains("claims"));
        // A length that points far past the end.
        let mut long = MAGIC.to_vec();
        long.extend_from_slice(&1u32.to_le_bytes());
        long.push(0);
        long.extend_from_slice(&(MAX_STRING - 1).to_le_bytes());
        assert!(
            parse(&long)
                .unwrap_err()
                .to_string()
                .contains("ends inside")
        );
        let mut too_long = MAGIC.to_vec();
        too_long.extend_from_slice(&1u32.to_le_bytes());
        too_long.push(0);
        too_long.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&too_long).is_err());
        assert!(parse(&list(&[(0x80, "a", "", "")])).is_err());
        assert!(parse(&list(&[(4, "a", "", "x")])).is_err());
        assert!(parse(&list(&[(0, "", "", "")])).is_err());
        let mut bad_utf8 = MAGIC.to_vec();
        bad_utf8.extend_from_slice(&1u32.to_le_bytes());
        bad_utf8.push(0);
        bad_utf8.extend_from_slice(&2u32.to_le_bytes());
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        assert!(parse(&bad_utf8).unwrap_err().to_string().contains("UTF-8"));
    }
}
