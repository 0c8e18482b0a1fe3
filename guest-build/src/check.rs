//! The post-link check: a guest ELF that would need a dynamic linker is refused at build
//! time, naming the symbol and the crate that references it.
//!
//! The guest links with the stock `cc`/`rust-lld`, and a dependency that links the C
//! library (the `libc` crate's `-lc`, a `#[link(name = "c")]`) lets the linker resolve a
//! C function from `libc.so`: the link "succeeds" with a PLT entry that nothing will ever
//! fill, and the guest would jump to address 0. So after cargo builds the guest this
//! module reads the ELF (with the `object` crate, as the host's loader does) and refuses
//! undefined symbols, dynamic sections and segments, run-time relocations and a PLT. For
//! each undefined symbol it searches the object files of the build's rlibs for the crates
//! that reference it, so the message can say which dependency to change.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use object::elf;
use object::read::archive::ArchiveFile;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader, SectionHeader, Sym};
use object::{Endianness, Object, ObjectSymbol};

/// How many symbols a message names before "and N more".
const NAMED: usize = 4;

/// A library crate of the build: its crate name and rlib.
#[derive(Clone, Debug)]
pub struct Rlib {
    /// The crate name (`getrandom`, `my_dep`).
    pub krate: String,
    /// The package name and version, as cargo reports them (`getrandom 0.2.17`).
    pub package: String,
    /// Path of the `.rlib`.
    pub path: PathBuf,
}

/// What is wrong with a linked guest.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Problems {
    /// Undefined (non-weak) symbols.
    pub undefined: Vec<String>,
    /// Dynamic-linking sections and segments (`.dynamic`, `PT_INTERP`, `.plt`, `.rela.plt`).
    pub dynamic: Vec<String>,
}

impl Problems {
    fn is_empty(&self) -> bool {
        self.undefined.is_empty() && self.dynamic.is_empty()
    }
}

/// Reads the ELF at `path` and lists what would need a dynamic linker.
pub fn problems(path: &Path) -> Result<Problems> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    problems_in(&bytes).with_context(|| format!("cannot parse the ELF {}", path.display()))
}

fn problems_in(bytes: &[u8]) -> Result<Problems> {
    let file = ElfFile64::<Endianness>::parse(bytes)?;
    let endian = file.endian();
    let header = file.elf_header();
    let mut p = Problems::default();
    for table in [file.elf_symbol_table(), file.elf_dynamic_symbol_table()] {
        for sym in table.symbols().iter().skip(1) {
            if sym.is_undefined(endian) && sym.st_bind() != elf::STB_WEAK {
                let name = table.symbol_name(endian, sym).unwrap_or_default();
                let name = printable(name);
                if !name.is_empty() && !p.undefined.contains(&name) {
                    p.undefined.push(name);
                }
            }
        }
    }
    for ph in header.program_headers(endian, bytes)? {
        match ph.p_type(endian) {
            elf::PT_INTERP => p.dynamic.push("PT_INTERP".into()),
            elf::PT_DYNAMIC => p.dynamic.push("PT_DYNAMIC".into()),
            _ => {}
        }
    }
    let sections = file.elf_section_table();
    for sh in sections.iter() {
        let ty = sh.sh_type(endian);
        let alloc = sh.sh_flags(endian).0 & elf::SHF_ALLOC.0 != 0;
        let name = sections.section_name(endian, sh).unwrap_or_default();
        let name = printable(name);
        let plt = matches!(name.as_str(), ".plt" | ".plt.got" | ".plt.sec");
        if ty == elf::SHT_DYNAMIC
            || (alloc && matches!(ty, elf::SHT_RELA | elf::SHT_REL) && sh.sh_size(endian) > 0)
            || (alloc && plt && sh.sh_size(endian) > 0)
        {
            p.dynamic.push(format!("`{name}`"));
        }
    }
    Ok(p)
}

/// The crates (of `rlibs`) whose object files reference `symbol` without defining it.
pub fn referencing_crates(symbol: &str, rlibs: &[Rlib]) -> Vec<String> {
    let mut found = Vec::new();
    for rlib in rlibs {
        let Ok(data) = fs::read(&rlib.path) else {
            continue;
        };
        let Ok(archive) = ArchiveFile::parse(&*data) else {
            continue;
        };
        let refs = archive.members().flatten().any(|m| {
            let Ok(obj_data) = m.data(&*data) else {
                return false;
            };
            let Ok(obj) = object::File::parse(obj_data) else {
                return false; // lib.rmeta and other non-object members
            };
            obj.symbols()
                .any(|s| s.is_undefined() && s.name_bytes().map(printable).as_deref() == Ok(symbol))
        });
        if refs && !found.contains(&rlib.package) {
            found.push(rlib.package.clone());
        }
    }
    found
}

/// Refuses the guest ELF at `elf` if it would need a dynamic linker, naming the symbols
/// and (searching `rlibs`) the crates that reference them. `guest` is the guest package.
pub fn check_guest(elf: &Path, guest: &str, rlibs: &[Rlib]) -> Result<()> {
    let p = problems(elf)?;
    if p.is_empty() {
        return Ok(());
    }
    let what = if p.undefined.is_empty() {
        format!("has dynamic-linking parts ({})", p.dynamic.join(", "))
    } else {
        let named: Vec<String> = p
            .undefined
            .iter()
            .take(NAMED)
            .map(|s| {
                let crates = referencing_crates(s, rlibs);
                if crates.is_empty() {
                    format!("`{s}` (referenced by `{guest}`'s own code)")
                } else {
                    format!("`{s}` (referenced by {})", quoted(&crates))
                }
            })
            .collect();
        let more = p.undefined.len().saturating_sub(NAMED);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        let it = if p.undefined.len() == 1 { "it" } else { "them" };
        format!(
            "uses {}{more}, which no crate of the guest defines: the linker resolved {it} from the C library (`libc.so`), and pvrun guests have no C library or dynamic linker",
            named.join(", ")
        )
    };
    bail!(
        "guest `{guest}` {what}; turn off the feature of the crate that needs the C library (often `default-features = false`, or its `std` feature), use a crate with a no_std or custom backend, or define the symbol in the guest"
    )
}

/// Whether the ELF at `path` defines the symbol `name` (`None` when it has no symbol
/// table to tell, e.g. a stripped guest).
pub fn defines_symbol(path: &Path, name: &str) -> Result<Option<bool>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = ElfFile64::<Endianness>::parse(&*bytes)
        .with_context(|| format!("cannot parse the ELF {}", path.display()))?;
    let mut any = false;
    for sym in file.symbols() {
        any = true;
        if sym.name_bytes().ok() == Some(name.as_bytes()) && !sym.is_undefined() {
            return Ok(Some(true));
        }
    }
    Ok(if any { Some(false) } else { None })
}

fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A name from the file as text for a terminal: invalid UTF-8 replaced, control
/// characters escaped (`\u{1b}`).
fn printable(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
