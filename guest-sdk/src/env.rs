//! Program arguments and environment variables, as the host passed them in the boot info.
//!
//! Both live in the read-only boot-info region for the whole run, so they are handed out as
//! `&'static str` without copying. `args()` includes argument 0, the program name.

use pvrun_abi::Str;

use crate::boot_info;

/// Returns the `count` [`Str`] entries at guest address `addr` (empty if there are none).
fn table(addr: u64, count: u64) -> &'static [Str] {
    if addr == 0 || count == 0 || addr % core::mem::align_of::<Str>() as u64 != 0 {
        return &[];
    }
    // SAFETY: the host writes `count` entries at `addr` inside the read-only boot-info
    // region, which stays mapped and unchanged for the whole run.
    unsafe { core::slice::from_raw_parts(addr as *const Str, count as usize) }
}

/// Converts one [`Str`] entry to a string (the valid UTF-8 prefix if it is not UTF-8).
fn to_str(s: &Str) -> &'static str {
    if s.ptr == 0 || s.len == 0 {
        return "";
    }
    // SAFETY: as in `table`: the bytes live in the immutable boot-info region.
    let bytes: &'static [u8] =
        unsafe { core::slice::from_raw_parts(s.ptr as *const u8, s.len as usize) };
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// An iterator over strings of a boot-info table.
#[derive(Clone, Debug)]
pub struct Strings {
    inner: core::slice::Iter<'static, Str>,
}

impl Iterator for Strings {
    type Item = &'static str;

    fn next(&mut self) -> Option<&'static str> {
        self.inner.next().map(to_str)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl ExactSizeIterator for Strings {}

impl DoubleEndedIterator for Strings {
    fn next_back(&mut self) -> Option<&'static str> {
        self.inner.next_back().map(to_str)
    }
}

/// The program arguments, starting with the program name.
pub fn args() -> Strings {
    let bi = boot_info();
    Strings {
        inner: table(bi.argv, bi.argc).iter(),
    }
}

/// An iterator over `(key, value)` environment pairs.
#[derive(Clone, Debug)]
pub struct Vars {
    inner: Strings,
}

impl Iterator for Vars {
    type Item = (&'static str, &'static str);

    fn next(&mut self) -> Option<Self::Item> {
        self.inner
            .next()
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

/// All environment variables as `(key, value)` pairs.
pub fn vars() -> Vars {
    let bi = boot_info();
    Vars {
        inner: Strings {
            inner: table(bi.envp, bi.envc).iter(),
        },
    }
}

/// The value of environment variable `key`, if it is set (the last setting wins).
pub fn var(key: &str) -> Option<&'static str> {
    vars().filter(|(k, _)| *k == key).map(|(_, v)| v).last()
}
