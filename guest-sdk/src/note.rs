//! The `.note.pvrun` ELF note that tells the host which ABI version the guest speaks.
//!
//! The linker script keeps the `.note.pvrun` section in the read-only segment and covers it
//! with a `PT_NOTE` program header; the host refuses a guest without a matching note.

use pvrun_abi::{ABI_VERSION, NOTE_TYPE_ABI_VERSION};

/// An ELF note with a 6-byte name (`"pvrun\0"`, padded to 8) and a 4-byte descriptor.
#[repr(C, align(4))]
struct AbiNote {
    namesz: u32,
    descsz: u32,
    ntype: u32,
    name: [u8; 8],
    desc: u32,
}

/// The ABI-version note.
#[used]
#[unsafe(link_section = ".note.pvrun")]
static ABI_NOTE: AbiNote = AbiNote {
    namesz: 6,
    descsz: 4,
    ntype: NOTE_TYPE_ABI_VERSION,
    name: *b"pvrun\0\0\0",
    desc: ABI_VERSION.to_le(),
};

const _: () = assert!(core::mem::size_of::<AbiNote>() == 24);

/// References the note from the start code so no linker can ever drop it.
#[inline(never)]
pub(crate) fn keep() {
    // SAFETY: a volatile read of a field of a live static.
    let _ = unsafe { core::ptr::read_volatile(&ABI_NOTE.desc) };
}
