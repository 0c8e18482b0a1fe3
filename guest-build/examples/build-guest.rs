//! Builds the guest crate at the given manifest path and prints the ELF path (a dev tool).
fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let manifest = args
        .next()
        .expect("usage: build-guest MANIFEST [--release] [--bin NAME]");
    let mut req = guest_build::BuildRequest {
        manifest_path: Some(manifest.into()),
        ..Default::default()
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--release" => req.release = true,
            "--bin" => req.bin = args.next(),
            "-p" => req.package = args.next(),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let built = guest_build::build(&req)?;
    println!("{}", built.elf.display());
    Ok(())
}
