//! Guest memory layout. Guest virtual addresses equal guest physical addresses.

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Size of a large page; big regions are aligned to it and mapped with 2 MiB pages.
pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;
/// Guest address of the [`ConsoleRing`](crate::ConsoleRing) header (user read-write).
pub const CONSOLE_RING_ADDR: u64 = 0x8000;
/// Guest address of the console ring's data bytes (user read-write).
pub const CONSOLE_DATA_ADDR: u64 = 0x9000;
/// Size of the console ring's data area (a power of two).
pub const CONSOLE_DATA_SIZE: u64 = 0x4000;
/// Guest physical address of the [`BootInfo`](crate::BootInfo) block (user read-only).
/// Argument, environment and memory-map data follow it in the same region.
pub const BOOT_INFO_ADDR: u64 = 0x1_0000;
/// End (exclusive) of the read-only boot-info region.
pub const BOOT_INFO_END: u64 = 0x4_0000;
/// Start of the device-ring area (user read-write): each device's rings live here.
pub const DEVICE_AREA_ADDR: u64 = 0x4_0000;
/// End (exclusive) of the device-ring area.
pub const DEVICE_AREA_END: u64 = 0x10_0000;
/// Lowest address a guest ELF segment may occupy: everything below belongs to the host
/// (null guard page, descriptor tables, ring-0 stub, boot info, page tables).
pub const GUEST_IMAGE_BASE: u64 = 0x20_0000;
/// Size of the guest stack (top of guest memory). A 2 MiB unmapped guard lies below it.
pub const STACK_SIZE: u64 = 0x20_0000;
/// Size of the unmapped guard region below the stack.
pub const STACK_GUARD_SIZE: u64 = 0x20_0000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_the_documented_ones() {
        // docs/ABI.md §2.
        assert_eq!(PAGE_SIZE, 0x1000);
        assert_eq!(LARGE_PAGE_SIZE, 0x20_0000);
        assert_eq!(CONSOLE_RING_ADDR, 0x8000);
        assert_eq!(CONSOLE_DATA_ADDR, 0x9000);
        assert_eq!(CONSOLE_DATA_SIZE, 16 * 1024);
        assert_eq!(BOOT_INFO_ADDR, 0x1_0000);
        assert_eq!(BOOT_INFO_END, 0x4_0000);
        assert_eq!(DEVICE_AREA_ADDR, 0x4_0000);
        assert_eq!(DEVICE_AREA_END, 0x10_0000);
        assert_eq!(GUEST_IMAGE_BASE, 0x20_0000);
        assert_eq!(STACK_SIZE, 2 * 1024 * 1024);
        assert_eq!(STACK_GUARD_SIZE, 2 * 1024 * 1024);
    }

    #[test]
    fn regions_are_ordered_and_do_not_overlap() {
        // docs/ABI.md §2, in address order: (what, start, end exclusive).
        let regions = [
            ("null guard page", 0, PAGE_SIZE),
            (
                "console ring header",
                CONSOLE_RING_ADDR,
                CONSOLE_RING_ADDR + PAGE_SIZE,
            ),
            (
                "console ring data",
                CONSOLE_DATA_ADDR,
                CONSOLE_DATA_ADDR + CONSOLE_DATA_SIZE,
            ),
            ("boot info", BOOT_INFO_ADDR, BOOT_INFO_END),
            ("device area", DEVICE_AREA_ADDR, DEVICE_AREA_END),
            ("page tables", DEVICE_AREA_END, GUEST_IMAGE_BASE),
        ];
        for (what, start, end) in regions {
            assert!(start < end, "{what}: {start:#x}..{end:#x} is empty");
        }
        for pair in regions.windows(2) {
            let ((a, _, a_end), (b, b_start, _)) = (pair[0], pair[1]);
            assert!(
                a_end <= b_start,
                "{a} ends at {a_end:#x}, after {b} starts at {b_start:#x}"
            );
        }
    }

    #[test]
    fn regions_are_page_aligned() {
        assert!(PAGE_SIZE.is_power_of_two());
        assert!(LARGE_PAGE_SIZE.is_power_of_two());
        assert!(LARGE_PAGE_SIZE.is_multiple_of(PAGE_SIZE));
        for (name, v) in [
            ("CONSOLE_RING_ADDR", CONSOLE_RING_ADDR),
            ("CONSOLE_DATA_ADDR", CONSOLE_DATA_ADDR),
            ("CONSOLE_DATA_SIZE", CONSOLE_DATA_SIZE),
            ("BOOT_INFO_ADDR", BOOT_INFO_ADDR),
            ("BOOT_INFO_END", BOOT_INFO_END),
            ("DEVICE_AREA_ADDR", DEVICE_AREA_ADDR),
            ("DEVICE_AREA_END", DEVICE_AREA_END),
        ] {
            assert!(
                v.is_multiple_of(PAGE_SIZE),
                "{name} = {v:#x} is not page aligned"
            );
        }
        // The image, the stack and its guard are mapped with 2 MiB pages.
        for (name, v) in [
            ("GUEST_IMAGE_BASE", GUEST_IMAGE_BASE),
            ("STACK_SIZE", STACK_SIZE),
            ("STACK_GUARD_SIZE", STACK_GUARD_SIZE),
        ] {
            assert!(
                v.is_multiple_of(LARGE_PAGE_SIZE),
                "{name} = {v:#x} is not 2 MiB aligned"
            );
        }
        assert!(CONSOLE_DATA_SIZE.is_power_of_two());
    }

    #[test]
    fn structs_fit_their_regions() {
        use core::mem::size_of;
        assert!(size_of::<crate::ConsoleRing>() as u64 <= CONSOLE_DATA_ADDR - CONSOLE_RING_ADDR);
        assert!(size_of::<crate::BootInfo>() as u64 <= BOOT_INFO_END - BOOT_INFO_ADDR);
    }
}
