//! Source locations from the guest ELF's DWARF: `function at file:line:col` for an
//! address, inlined frames included (innermost first), through the `addr2line` crate.
//!
//! Nothing here runs at boot: [`DebugInfo::load`] is called when a report is printed,
//! and addr2line parses only the compilation units the looked-up addresses fall in.

use std::borrow::Cow;

use addr2line::gimli::{self, EndianSlice, RunTimeEndian};
use object::read::elf::ElfFile64;
use object::{Endianness, Object, ObjectSection};

/// The most inlined frames reported for one address.
const MAX_INLINED: usize = 32;

/// One (possibly inlined) frame of an address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceFrame {
    /// The demangled function name (without the hash), if DWARF names it.
    pub function: Option<String>,
    /// `file:line[:col]`, if the line table covers the address.
    pub location: Option<String>,
}

/// The DWARF of a guest image, borrowed from its bytes.
pub struct DebugInfo<'a> {
    ctx: addr2line::Context<EndianSlice<'a, RunTimeEndian>>,
    /// Prefix removed from file names (the host's working directory), to print them
    /// relative like cargo does.
    strip: Option<String>,
}

impl<'a> DebugInfo<'a> {
    /// Reads the DWARF sections of ELF `bytes`; `None` if it has none (or they are
    /// compressed, or malformed).
    pub fn load(bytes: &'a [u8]) -> Option<DebugInfo<'a>> {
        let file = ElfFile64::<Endianness>::parse(bytes).ok()?;
        let info = file.section_by_name(".debug_info")?;
        if info.size() == 0 {
            return None;
        }
        let mut compressed = false;
        let dwarf = gimli::Dwarf::load(|id| -> Result<_, gimli::Error> {
            let data = match file.section_by_name(id.name()) {
                Some(s) => {
                    if s.compressed_file_range()
                        .is_ok_and(|r| r.format != object::CompressionFormat::None)
                    {
                        compressed = true;
                    }
                    s.data().unwrap_or(&[])
                }
                None => &[],
            };
            Ok(EndianSlice::new(data, RunTimeEndian::Little))
        })
        .ok()?;
        if compressed {
            return None;
        }
        let ctx = addr2line::Context::from_dwarf(dwarf).ok()?;
        let strip = std::env::current_dir()
            .ok()
            .map(|d| format!("{}/", d.display()));
        Some(DebugInfo { ctx, strip })
    }

    /// The frames of `addr`, innermost (most inlined) first; empty when DWARF does not
    /// cover it.
    pub fn frames(&self, addr: u64) -> Vec<SourceFrame> {
        let mut out = Vec::new();
        let Ok(mut iter) = self.ctx.find_frames(addr).skip_all_loads() else {
            return out;
        };
        while let Ok(Some(f)) = iter.next() {
            if out.len() >= MAX_INLINED {
                break;
            }
            let function = f
                .function
                .as_ref()
                .and_then(|n| n.raw_name().ok())
                .map(|raw| format!("{:#}", rustc_demangle::demangle(&raw)));
            let location = f.location.as_ref().and_then(|l| {
                let file = l.file?;
                let file = match &self.strip {
                    Some(p) => file.strip_prefix(p.as_str()).unwrap_or(file),
                    None => file,
                };
                let file: Cow<'_, str> = file.into();
                Some(match (l.line, l.column) {
                    (Some(line), Some(col)) => format!("{file}:{line}:{col}"),
                    (Some(line), None) => format!("{file}:{line}"),
                    _ => file.into_owned(),
                })
            });
            out.push(SourceFrame { function, location });
        }
        out
    }
}
