//! `pvrun package` and `cargo pvrun package`: a guest ELF as an OCI image. The image
//! format is `pvrun-oci`'s; what the guest declares is read here with the loader, so an
//! ELF `pvrun` would refuse is never packaged.

use std::path::Path;

pub use pvrun_oci::cli::PackageArgs;
use pvrun_oci::{GuestInfo, GuestKind};

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

/// The guest kind the ELF's symbol table says: `function` when it has the
/// `__pvrun_function_guest` marker `pvrun::export_functions!` defines, else `program`;
/// `None` for a stripped ELF (no symbols) or one the loader refuses (the packager reports
/// that with its own error).
pub fn kind_from_elf(path: &Path, bytes: &[u8]) -> Option<GuestKind> {
    let image = GuestImage::from_bytes(path, bytes.to_vec()).ok()?;
    match image.looks_like_function_guest()? {
        true => Some(GuestKind::Function),
        false => Some(GuestKind::Program),
    }
}

/// Packages `elf`; prints the result line on stdout and exits 0, or a one-line error on
/// stderr and exits 125. Without `--kind`, the kind is what the ELF says
/// ([`kind_from_elf`]); a stripped ELF is packaged as a program, with a note on stderr.
pub fn package_and_exit(elf: &Path, mut args: PackageArgs) -> ! {
    if args.kind.is_none()
        && let Ok(bytes) = std::fs::read(elf)
    {
        args.kind = kind_from_elf(elf, &bytes);
        if args.kind.is_none() && GuestImage::from_bytes(elf, bytes).is_ok() {
            eprint_line(&format!(
                "pvrun package: note: `{}` has no symbol table (stripped?), so its kind is unknown; packaging it as a program guest (pass --kind function for a function guest)",
                crate::output::escape_controls(&elf.display().to_string())
            ));
        }
    }
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
