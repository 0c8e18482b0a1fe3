//! The `.note.pvrun` ELF notes that mark a guest binary: its ABI version and the devices
//! it requires.

/// ELF note owner name (`n_name`) of the ABI-version note, without the trailing NUL.
pub const NOTE_NAME: &[u8] = b"pvrun";
/// ELF note type (`n_type`) of the ABI-version note; its descriptor is one little-endian `u32`.
pub const NOTE_TYPE_ABI_VERSION: u32 = 1;
/// ELF note type of a device the guest requires; its descriptor is a [`DeviceNote`].
pub const NOTE_TYPE_DEVICE: u32 = 2;

/// Descriptor of a [`NOTE_TYPE_DEVICE`] note: the host refuses to boot the guest unless a
/// device of this kind and name is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceNote {
    /// A [`device`](crate::device) kind.
    pub kind: u32,
    /// The device name, UTF-8, NUL-padded.
    pub name: [u8; 32],
}

/// Section the SDK places the ABI note in.
pub const NOTE_SECTION: &str = ".note.pvrun";

// Layout checks: these sizes are part of the ABI.
const _: () = assert!(core::mem::size_of::<DeviceNote>() == 36);

// With the `vm-memory` feature (the host's), this struct can be read from and written to
// guest memory through vm-memory's checked accessors.
// SAFETY: `#[repr(C)]` plain old data with explicit padding fields, no references and no
// invalid bit patterns.
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for DeviceNote {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_note_has_the_documented_layout() {
        // docs/ABI.md §1: `{ u32 kind; u8 name[32] }`, `n_descsz = 36`.
        assert_layout!(DeviceNote {
            size: 36,
            align: 4,
            kind: 0,
            name: 4
        });
    }

    #[test]
    fn note_identifiers_are_the_documented_ones() {
        assert_eq!(NOTE_NAME, b"pvrun");
        assert_eq!(NOTE_TYPE_ABI_VERSION, 1);
        assert_eq!(NOTE_TYPE_DEVICE, 2);
        assert_eq!(NOTE_SECTION, ".note.pvrun");
    }
}
