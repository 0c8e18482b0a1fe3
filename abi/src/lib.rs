//! The pvrun guest/host ABI, shared by `host-vmm` and `guest-sdk` so the two can never drift.
//!
//! `docs/ABI.md` is the human-readable specification of exactly what this crate defines:
//! the memory layout a guest finds at entry, the boot-info block, the hypercall
//! convention and call numbers, the argument structs, the status codes and the ELF note
//! that marks a guest binary. Everything here is `#[repr(C)]` with explicit padding and
//! fixed-width fields so a guest in any language can use it.
//!
//! The definitions are split by subject into private modules and all re-exported here, so
//! every item is used from the crate root (`pvrun_abi::BootInfo`, `pvrun_abi::call::EXIT`,
//! ...); only [`layout`] is a module of its own.
#![no_std]

/// Test helper: asserts the size and alignment of a `#[repr(C)]` struct and the offset of
/// each field, and that the listed fields cover the whole struct (so no field may be left
/// out and the compiler inserted no padding of its own).
#[cfg(test)]
macro_rules! assert_layout {
    ($t:ty { size: $size:expr, align: $align:expr, $($field:ident: $off:expr),+ $(,)? }) => {{
        let name = stringify!($t);
        assert_eq!(core::mem::size_of::<$t>(), $size, "size of {name}");
        assert_eq!(core::mem::align_of::<$t>(), $align, "alignment of {name}");
        let mut covered = 0;
        $(
            assert_eq!(
                core::mem::offset_of!($t, $field),
                $off,
                "offset of {name}::{}",
                stringify!($field)
            );
            covered += crate::field_size(|v: &$t| &v.$field);
        )+
        assert_eq!(covered, $size, "the fields of {name} do not cover it");
    }};
}

mod block;
mod boot;
mod console;
mod exception;
mod function;
mod hypercall;
pub mod layout;
mod net;
mod note;
mod ring;

pub use block::*;
pub use boot::*;
pub use console::*;
pub use exception::*;
pub use function::*;
pub use hypercall::*;
pub use net::*;
pub use note::*;
pub use ring::*;

/// The ABI version this crate describes. A guest carries it in its `.note.pvrun` ELF note;
/// the host refuses a guest whose version it does not speak.
pub const ABI_VERSION: u32 = 4;

/// The oldest ABI version a host of this crate still runs: version 3 guests (no exitless
/// mailbox) boot and serve exit-based calls unchanged; their boot info says version 3.
pub const ABI_VERSION_OLDEST: u32 = 3;

/// The size of a field, for `assert_layout!`.
#[cfg(test)]
fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    core::mem::size_of::<F>()
}

#[cfg(test)]
mod tests {
    #[test]
    fn abi_version_is_4() {
        assert_eq!(super::ABI_VERSION, 4);
        assert_eq!(super::ABI_VERSION_OLDEST, 3);
    }
}
