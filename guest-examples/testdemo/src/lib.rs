//! A guest library whose tests exercise `cargo pvrun test`: passing, failing, panicking,
//! faulting, looping, scribbling, `should_panic` and ignored tests.
#![no_std]
#![cfg_attr(test, no_main)]

/// Adds two numbers (used by the integration test).
pub fn add(a: u64, b: u64) -> u64 {
    a + b
}

#[cfg(test)]
mod tests {
    extern crate alloc;
    use alloc::vec::Vec;
    use core::sync::atomic::{AtomicU64, Ordering};
    use pvrun::println;

    /// Data the scribbling test overwrites; every test must see it pristine.
    static STATE: AtomicU64 = AtomicU64::new(7);

    #[pvrun::test]
    fn passes() {
        println!("output of passes");
        assert_eq!(super::add(2, 2), 4);
    }

    #[pvrun::test]
    fn fails() {
        println!("output of fails");
        assert_eq!(super::add(1, 1), 3, "one and one");
    }

    #[pvrun::test]
    fn panics() {
        panic!("boom from panics");
    }

    #[pvrun::test]
    fn faults() {
        // SAFETY: none: this test dereferences a null pointer on purpose.
        let v = unsafe { core::ptr::read_volatile(core::ptr::null::<u64>()) };
        println!("never printed {v}");
    }

    #[pvrun::test]
    fn loops() {
        println!("output of loops");
        loop {
            core::hint::spin_loop();
        }
    }

    #[pvrun::test]
    fn returns_an_error() -> Result<(), &'static str> {
        Err("it went wrong")
    }

    #[pvrun::test]
    #[should_panic]
    fn should_panic_panics() {
        panic!("expected");
    }

    #[pvrun::test]
    #[should_panic(expected = "out of range")]
    fn should_panic_with_the_message() {
        let v: Vec<u8> = Vec::new();
        if v.is_empty() {
            panic!("index 3 out of range");
        }
    }

    #[pvrun::test]
    #[should_panic(expected = "another message")]
    fn should_panic_with_another_message() {
        panic!("the wrong message");
    }

    #[pvrun::test]
    #[should_panic]
    fn should_panic_but_does_not() {}

    #[pvrun::test]
    #[ignore]
    fn ignored() {
        panic!("an ignored test ran");
    }

    #[pvrun::test]
    #[ignore = "needs a disk"]
    fn ignored_with_reason() {}

    #[pvrun::test]
    fn scribble_a_first() {
        // Overwrite data and a lot of heap, then crash: the next test must not notice.
        STATE.store(0xdead, Ordering::Relaxed);
        let mut junk: Vec<u8> = Vec::with_capacity(1 << 20);
        junk.resize(1 << 20, 0xcc);
        core::mem::forget(junk);
        // SAFETY: none: a wild write into unmapped memory, on purpose.
        unsafe { core::ptr::write_volatile(0x7fff_0000_0000 as *mut u64, 1) };
    }

    #[pvrun::test]
    fn scribble_b_next_test_starts_clean() {
        assert_eq!(
            STATE.load(Ordering::Relaxed),
            7,
            "state leaked from the scribbler"
        );
        STATE.store(8, Ordering::Relaxed);
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
    }
}
