//! Guest ELF images: a validated [`GuestImage`], loaded into guest memory and used to
//! name addresses in crash reports.
//!
//! A guest is a static `ET_EXEC` x86-64 ELF whose PT_LOAD segments lie above
//! [`GUEST_IMAGE_BASE`], are never both writable and executable, and which carries a
//! `pvrun` ABI-version note, and which needs no dynamic linker. The checks live in
//! [`elf`], the `.symtab` symbolizer in [`symbols`]. Loading copies exactly the segments
//! the checks accepted (file bytes through vm-memory's checked writes, then zeroed BSS);
//! the file is never parsed a second time.

pub mod debuginfo;
mod elf;
mod symbols;

use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use crate::error::Error;
use crate::layout::{GUEST_IMAGE_BASE, PAGE_SIZE, align_up};
use crate::memory::GuestRam;

use self::symbols::Symbols;

/// One PT_LOAD segment, page-rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Virtual address in the ELF.
    pub vaddr: u64,
    /// Offset of its file bytes in the ELF (`offset + filesz` is within the file).
    pub offset: u64,
    /// Bytes present in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is BSS).
    pub memsz: u64,
    /// First page (4 KiB aligned).
    pub page_start: u64,
    /// End of the last page (4 KiB aligned, exclusive).
    pub page_end: u64,
    /// [`pvrun_abi::perm`] bits.
    pub perm: u32,
}

/// A validated guest image, ready to load into any number of VMs.
pub struct GuestImage {
    bytes: Vec<u8>,
    /// Entry point (`_start`).
    pub entry: u64,
    /// PT_LOAD segments sorted by address.
    pub segments: Vec<Segment>,
    /// The ABI version from the guest's note.
    pub abi_version: u32,
    /// Devices the guest declares it needs: (kind, name).
    pub required_devices: Vec<(u32, String)>,
    /// The path it was loaded from (for messages).
    pub path: String,
    /// Read from `.symtab` (and demangled) the first time a report or tool needs a name:
    /// a boot needs none, and demangling a guest's symbols costs about as much as the rest
    /// of the `pvrun` process's own start-up.
    symbols: std::sync::OnceLock<Symbols>,
}

impl GuestImage {
    /// Reads and validates a guest ELF file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::ReadGuest {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_bytes(path, bytes)
    }

    /// Validates a guest ELF held in memory (`path` is only used in messages).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self, Error> {
        let (checked, _file) = elf::check(path, &bytes)?;
        tracing::debug!(
            path = %path.display(),
            entry = format_args!("{:#x}", checked.entry),
            abi = checked.abi_version,
            bytes = bytes.len(),
            "guest ELF validated"
        );
        for s in &checked.segments {
            tracing::debug!(
                vaddr = format_args!("{:#x}", s.vaddr),
                filesz = format_args!("{:#x}", s.filesz),
                memsz = format_args!("{:#x}", s.memsz),
                perm = %perm_string(s.perm),
                "ELF segment"
            );
        }
        Ok(GuestImage {
            entry: checked.entry,
            segments: checked.segments,
            abi_version: checked.abi_version,
            required_devices: checked.required_devices,
            path: path.display().to_string(),
            symbols: std::sync::OnceLock::new(),
            bytes,
        })
    }

    /// Whether this looks like a function guest (one that serves calls instead of running
    /// to an exit): its symbol table names the SDK's call loop `pvrun::function::serve*`.
    /// `None` for a stripped guest. Only a hint for tools (`cargo pvrun build`'s report);
    /// what decides is whether the guest reaches `FN_READY` when booted.
    pub fn looks_like_function_guest(&self) -> Option<bool> {
        if self.symbols().is_empty() {
            return None;
        }
        // `pvrun::export_functions!` defines this marker (every guest links the SDK's
        // `function::serve`, which also serves `cargo pvrun test`'s test binaries).
        Some(self.symbols().any_starts_with("__pvrun_function_guest"))
    }

    /// The symbol table, read on first use (the file passed the ELF check at load).
    fn symbols(&self) -> &Symbols {
        self.symbols.get_or_init(|| {
            object::read::elf::ElfFile64::<object::Endianness>::parse(&self.bytes[..])
                .map(|file| Symbols::from_file(&file))
                .unwrap_or_default()
        })
    }

    /// End of the highest segment (page aligned).
    pub fn image_end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.page_end)
            .max()
            .unwrap_or(GUEST_IMAGE_BASE)
    }

    /// The smallest guest memory this image boots in (a multiple of 2 MiB, at least the
    /// host's minimum): what `--mem` must be at least.
    pub fn min_mem_size(&self) -> u64 {
        let mut size = crate::layout::MIN_MEM_SIZE;
        loop {
            match crate::builder::Plan::new(self.image_end(), size) {
                Err(Error::DoesNotFit { needed, .. }) if needed > size => {
                    size = needed.next_multiple_of(crate::layout::LARGE_PAGE_SIZE);
                }
                _ => return size,
            }
        }
    }

    /// Copies the validated segments into guest memory and zeroes their BSS.
    pub fn load(&self, ram: &GuestRam) -> Result<(), Error> {
        if self.image_end() > ram.size() {
            return Err(Error::DoesNotFit {
                needed: self.image_end(),
                available: ram.size(),
            });
        }
        for s in &self.segments {
            let data = self
                .file_bytes(s, 0, s.filesz)
                .ok_or_else(|| Error::Layout("guest segment outside its file".into()))?;
            ram.mem()
                .write_slice(data, GuestAddress(s.vaddr))
                .map_err(|e| Error::Layout(format!("cannot load the guest image: {e}")))?;
            // Pages of a fresh VM are already zero, so only the partial page after the file
            // data is written (the memory is never reused between guests).
            let bss_start = s.vaddr + s.filesz;
            let bss_end =
                (s.vaddr + s.memsz).min(align_up(bss_start, PAGE_SIZE).unwrap_or(u64::MAX));
            if bss_end > bss_start {
                let zeros = vec![0u8; (bss_end - bss_start) as usize];
                ram.mem()
                    .write_slice(&zeros, GuestAddress(bss_start))
                    .map_err(|e| Error::Layout(format!("cannot clear BSS: {e}")))?;
            }
        }
        Ok(())
    }

    /// `len` file bytes of segment `s` from `skip` bytes into it, if they are in the file.
    fn file_bytes(&self, s: &Segment, skip: u64, len: u64) -> Option<&[u8]> {
        let start = usize::try_from(s.offset.checked_add(skip)?).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.bytes.get(start..end)
    }

    /// Names `addr` as `function+0xoffset` from the guest's symbol table, if it has one.
    pub fn symbolize(&self, addr: u64) -> Option<String> {
        self.symbols().symbolize(addr)
    }

    /// The name of the function containing `addr`, from the guest's symbol table.
    pub fn symbol_name(&self, addr: u64) -> Option<&str> {
        self.symbols().name(addr)
    }

    /// The image's DWARF, parsed now (for a report being printed), if it has any.
    pub fn debug_info(&self) -> Option<debuginfo::DebugInfo<'_>> {
        debuginfo::DebugInfo::load(&self.bytes)
    }

    /// An image known only by its memory layout, for a VM made from a snapshot file: no
    /// file bytes (reports then have no symbols or code bytes), and the segments the file
    /// lists (the caller validates them as the ELF check would).
    pub(crate) fn from_layout(path: String, entry: u64, segments: Vec<Segment>) -> Self {
        GuestImage {
            bytes: Vec::new(),
            entry,
            segments,
            abi_version: pvrun_abi::ABI_VERSION,
            required_devices: Vec::new(),
            path,
            symbols: std::sync::OnceLock::from(Symbols::default()),
        }
    }

    /// The ELF file's bytes (empty for an image made from a snapshot file).
    pub(crate) fn file(&self) -> &[u8] {
        &self.bytes
    }

    /// The guest's name: the file name of its path without the extension.
    pub fn name(&self) -> String {
        Path::new(&self.path)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "guest".into())
    }

    /// The bytes of the image's memory at `addr` (up to `len`), from the file, for
    /// describing a faulting instruction without trusting guest memory.
    pub fn code_at(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let s = self
            .segments
            .iter()
            .find(|s| addr >= s.vaddr && addr - s.vaddr < s.filesz)?;
        let skip = addr - s.vaddr;
        self.file_bytes(s, skip, (len as u64).min(s.filesz - skip))
    }
}

pub(crate) use crate::output::needs_escape;

/// A guest-chosen name (symbol, section, device) made safe to print on one line: invalid
/// UTF-8 and the characters [`needs_escape`] picks are escaped, and it is cut to 96
/// characters.
pub(crate) fn printable(bytes: &[u8]) -> String {
    const MAX: usize = 96;
    let mut out = String::new();
    let mut n = 0;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if n == MAX {
                out.push_str("...");
                return out;
            }
            if needs_escape(c) {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
            n += 1;
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
            n += 1;
        }
    }
    out
}

/// `rwx`-style permission bits, for log lines.
pub(crate) fn perm_string(p: u32) -> String {
    use pvrun_abi::perm;
    [(perm::R, 'r'), (perm::W, 'w'), (perm::X, 'x')]
        .iter()
        .map(|&(bit, c)| if p & bit != 0 { c } else { '-' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{EXIT_LOOP, RAW_TEXT, RawElf, elf};

    fn image(opts: RawElf) -> GuestImage {
        GuestImage::from_bytes(Path::new("t.elf"), elf(EXIT_LOOP, opts)).unwrap()
    }

    #[test]
    fn loading_copies_the_code_and_clears_bss() {
        let img = image(RawElf {
            bss: 64,
            ..RawElf::default()
        });
        let ram = GuestRam::new(8 << 20).unwrap();
        let bss = GuestAddress(RAW_TEXT + EXIT_LOOP.len() as u64);
        ram.mem().write_slice(&[0xaa; 64], bss).unwrap();
        img.load(&ram).unwrap();
        let mut code = vec![0; EXIT_LOOP.len()];
        ram.mem()
            .read_slice(&mut code, GuestAddress(RAW_TEXT))
            .unwrap();
        assert_eq!(code, EXIT_LOOP);
        let mut cleared = [0xffu8; 64];
        ram.mem().read_slice(&mut cleared, bss).unwrap();
        assert_eq!(cleared, [0; 64]);
        assert_eq!(img.code_at(RAW_TEXT + 4, 16), Some(&EXIT_LOOP[4..]));
    }

    #[test]
    fn a_segment_past_the_end_of_memory_is_refused() {
        let img = image(RawElf {
            bss: 16 << 20,
            ..RawElf::default()
        });
        let ram = GuestRam::new(8 << 20).unwrap();
        match img.load(&ram) {
            Err(Error::DoesNotFit { needed, available }) => {
                assert_eq!(available, 8 << 20);
                assert!(needed > available);
            }
            other => panic!("expected DoesNotFit, got {:?}", other.err()),
        }
    }
}
