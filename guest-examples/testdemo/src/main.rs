//! The binary of the test demo: prints a sum; its unit test runs with `cargo pvrun test --bins`.
#![no_std]
#![no_main]

pvrun::entry!(main);

fn main() {
    pvrun::println!("2 + 3 = {}", testdemo::add(2, 3));
}

#[cfg(test)]
mod tests {
    #[pvrun::test]
    fn bin_test_passes() {
        assert_eq!(testdemo::add(2, 3), 5);
    }
}
