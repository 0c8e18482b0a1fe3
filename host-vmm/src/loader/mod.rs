//! Guest ELF images: a validated [`GuestImage`], loaded into guest memory and used to
//! name addresses in crash reports.
//!
//! A guest is a static `ET_EXEC` x86-64 ELF whose PT_LOAD segments lie above
//! [`GUEST_IMAGE_BASE`], are never both writable and executable, and which carries a
//! `pvrun` ABI-version note. The checks live in [`elf`], the `.symtab` symbolizer in
//! [`symbols`]. Loading copies the segments with linux-loader (which checks neither the
//! type nor the machine, hence the checks here) and zeroes BSS.

mod elf;
mod symbols;

use std::io::Cursor;
use std::path::Path;

use linux_loader::loader::{KernelLoader, elf::Elf as ElfLoader};
use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Endianness, elf as abi_elf};
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
    symbols: Symbols,
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
        let (checked, file) = elf::check(path, &bytes)?;
        let symbols = Symbols::from_file(&file);
        Ok(GuestImage {
            entry: checked.entry,
            segments: checked.segments,
            abi_version: checked.abi_version,
            required_devices: checked.required_devices,
            path: path.display().to_string(),
            symbols,
            bytes,
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

    /// Copies the segments into guest memory and zeroes their BSS.
    pub fn load(&self, ram: &GuestRam) -> Result<(), Error> {
        if self.image_end() > ram.size() {
            return Err(Error::DoesNotFit {
                needed: self.image_end(),
                available: ram.size(),
            });
        }
        ElfLoader::load(ram.mem(), None, &mut Cursor::new(&self.bytes[..]), None)
            .map_err(|e| Error::Layout(format!("cannot load the guest image: {e}")))?;
        for s in &self.segments {
            // linux-loader copies `filesz` bytes only; clear the rest of the segment. Pages of
            // a fresh VM are already zero, so only the partial page after the file data is
            // written (the memory is never reused between guests).
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

    /// Names `addr` as `function+0xoffset` from the guest's symbol table, if it has one.
    pub fn symbolize(&self, addr: u64) -> Option<String> {
        self.symbols.symbolize(addr)
    }

    /// The bytes of the image's memory at `addr` (up to `len`), from the file, for
    /// describing a faulting instruction without trusting guest memory.
    pub fn code_at(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let file = ElfFile64::<Endianness>::parse(&self.bytes[..]).ok()?;
        let endian = file.endian();
        for ph in file.elf_program_headers() {
            if ph.p_type(endian) != abi_elf::PT_LOAD {
                continue;
            }
            let v = ph.p_vaddr(endian);
            let fs = ph.p_filesz(endian);
            if addr >= v && addr < v + fs {
                let off = (ph.p_offset(endian) + (addr - v)) as usize;
                let n = len.min((v + fs - addr) as usize);
                return self.bytes.get(off..off + n);
            }
        }
        None
    }
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
