//! `pvrun package` and `cargo pvrun package`: a guest ELF as an OCI image. The image
//! format is `pvrun-oci`'s; what the guest declares is read here with the loader, so an
//! ELF `pvrun` would refuse is never packaged.

use std::path::Path;

use pvrun_oci::GuestInfo;
pub use pvrun_oci::cli::PackageArgs;

use crate::{EXIT_HOST_ERROR, GuestImage, StdStream, eprint_line};

/// Validates a guest ELF with the loader (every check `pvrun` makes before booting it) and
/// reads what it declares; the error is the loader's one-line reason.
pub fn inspect(path: &Path, bytes: &[u8]) -> Result<GuestInfo, String> {
    let image = GuestImage::from_bytes(path, bytes.to_vec()).map_err(|e| e.to_string())?;
    Ok(GuestInfo::new(
        image.abi_version,
        &image.required_devices,
        image.min_mem_size(),
    ))
}

/// Packages `elf`; prints the result line on stdout and exits 0, or a one-line error on
/// stderr and exits 125.
pub fn package_and_exit(elf: &Path, args: PackageArgs) -> ! {
    match pvrun_oci::cli::run(elf, args, &inspect) {
        Ok(line) => {
            let _ =
                std::io::Write::write_all(&mut StdStream::stdout(), format!("{line}\n").as_bytes());
            std::process::exit(0)
        }
        Err(e) => {
            eprint_line(&format!("pvrun package: error: {e}"));
            std::process::exit(EXIT_HOST_ERROR)
        }
    }
}

/// `pvrun package [OPTIONS] -o OUT GUEST [-- CMD...]` (`argv[0]` is `package`).
pub fn pvrun_package_main(argv: &[String]) -> ! {
    let (elf, args) = pvrun_oci::cli::parse_pvrun_package(argv);
    package_and_exit(&elf, args)
}
