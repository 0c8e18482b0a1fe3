//! Says, on every plain `cargo build` of a guest crate, that it is building a host
//! program: `cargo pvrun` (guest-build) passes `--cfg pvrun_guest`, which cargo shows this
//! script as `CARGO_CFG_PVRUN_GUEST`; a plain `cargo build` does not.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_CFG_PVRUN_GUEST").is_none() {
        println!(
            "cargo::warning=built for the host, not as a pvrun guest: a guest crate built this way only says to use `cargo pvrun`; build and run guests with `cargo pvrun`"
        );
    }
}
