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

/// An ELF note of type [`NOTE_TYPE_DEVICE`](pvrun_abi::NOTE_TYPE_DEVICE): a device the
/// guest requires. Built by [`require_device!`](crate::require_device).
#[doc(hidden)]
#[repr(C, align(4))]
pub struct DeviceNoteElf {
    namesz: u32,
    descsz: u32,
    ntype: u32,
    name: [u8; 8],
    desc: pvrun_abi::DeviceNote,
}

const _: () = assert!(core::mem::size_of::<DeviceNoteElf>() == 12 + 8 + 36);

impl DeviceNoteElf {
    /// The note for a device of `kind` named `name`; fails to compile (in a const) if the
    /// name is not 1-31 characters of `[A-Za-z0-9_.-]`, as the host requires.
    #[doc(hidden)]
    pub const fn new(kind: u32, name: &str) -> DeviceNoteElf {
        let bytes = name.as_bytes();
        assert!(
            !bytes.is_empty() && bytes.len() <= 31,
            "a device name must be 1-31 bytes"
        );
        let mut padded = [0u8; 32];
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            assert!(
                b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-',
                "a device name may only contain letters, digits, `_`, `.` and `-`"
            );
            padded[i] = b;
            i += 1;
        }
        DeviceNoteElf {
            namesz: 6,
            descsz: core::mem::size_of::<pvrun_abi::DeviceNote>() as u32,
            ntype: pvrun_abi::NOTE_TYPE_DEVICE,
            name: *b"pvrun\0\0\0",
            desc: pvrun_abi::DeviceNote {
                kind: kind.to_le(),
                name: padded,
            },
        }
    }
}

/// Declares a device the guest requires, as an ELF note the host checks before boot: it
/// refuses to start the guest unless a device of that kind and name is attached.
///
/// ```ignore
/// pvrun::require_device!(block, "data"); // needs `pvrun --disk data=IMAGE`
/// ```
#[macro_export]
macro_rules! require_device {
    (block, $name:expr) => {
        $crate::require_device!(@note $crate::abi::device::BLOCK, $name);
    };
    (net, $name:expr) => {
        $crate::require_device!(@note $crate::abi::device::NET, $name);
    };
    (@note $kind:expr, $name:expr) => {
        // A test binary (`cargo pvrun test`) boots without devices.
        #[cfg(not(test))]
        const _: () = {
            #[used]
            #[unsafe(link_section = ".note.pvrun")]
            static DEVICE_NOTE: $crate::__DeviceNoteElf = $crate::__DeviceNoteElf::new($kind, $name);
        };
    };
}
