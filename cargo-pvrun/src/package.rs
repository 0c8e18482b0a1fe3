//! `cargo pvrun package`: build a guest crate (release unless `--profile` says otherwise),
//! then package its ELF as an OCI image (the same image `pvrun package` makes from it).

use host_vmm::cli::package::{PackageArgs, package_and_exit};

use crate::{BuildOpts, build_guest};

#[derive(clap::Args)]
pub struct PackageCmd {
    #[command(flatten)]
    build: BuildOpts,
    #[command(flatten)]
    image: PackageArgs,
    /// Default arguments for the guest (the image's Cmd, after `--`).
    #[arg(last = true)]
    cmd: Vec<String>,
}

/// Builds, packages, prints the image's reference and digest; exits 0 (125 on errors).
pub fn run(p: PackageCmd, verbose: u8) -> ! {
    let mut build = p.build;
    if build.profile.is_none() {
        build.release = true;
    }
    let built = build_guest(&build, verbose);
    let mut image = p.image;
    image.cmd = p.cmd;
    package_and_exit(&built.elf, image)
}
