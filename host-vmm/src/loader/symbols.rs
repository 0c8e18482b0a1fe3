//! Function names from the guest's `.symtab`, for naming fault addresses in crash
//! reports. The table is optional: a stripped guest just gets bare addresses.

use object::read::elf::ElfFile64;
use object::{Endianness, Object, ObjectSymbol, SymbolKind};

use super::printable;

/// A function symbol.
#[derive(Clone, Debug)]
struct Symbol {
    addr: u64,
    size: u64,
    name: String,
}

/// The guest's function symbols, sorted by address.
#[derive(Clone, Debug, Default)]
pub(super) struct Symbols(Vec<Symbol>);

impl Symbols {
    /// Collects the (demangled) text symbols of `file`.
    pub(super) fn from_file(file: &ElfFile64<'_, Endianness>) -> Self {
        let mut symbols: Vec<Symbol> = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| {
                let name = s.name().ok()?;
                Some(Symbol {
                    addr: s.address(),
                    size: s.size(),
                    // Guest-chosen: escaped before it can reach a terminal.
                    name: printable(format!("{:#}", rustc_demangle::demangle(name)).as_bytes()),
                })
            })
            .collect();
        symbols.sort_by_key(|s| s.addr);
        Symbols(symbols)
    }

    /// Whether there are no symbols (a stripped guest).
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a function's (demangled) name starts with `prefix`.
    pub(super) fn any_starts_with(&self, prefix: &str) -> bool {
        self.0.iter().any(|s| s.name.starts_with(prefix))
    }

    /// Names `addr` as `function+0xoffset`, if a symbol covers it.
    pub(super) fn symbolize(&self, addr: u64) -> Option<String> {
        let i = self.0.partition_point(|s| s.addr <= addr);
        let s = self.0[..i].last()?;
        let off = addr - s.addr;
        if s.size != 0 && off >= s.size {
            return None;
        }
        Some(format!("{}+{:#x}", s.name, off))
    }

    /// The name of the function containing `addr`.
    pub(super) fn name(&self, addr: u64) -> Option<&str> {
        let i = self.0.partition_point(|s| s.addr <= addr);
        let s = self.0[..i].last()?;
        (s.size == 0 || addr - s.addr < s.size).then_some(s.name.as_str())
    }
}
