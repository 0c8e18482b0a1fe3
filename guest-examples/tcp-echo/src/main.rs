#![no_std]
#![no_main]
use pvrun::net::{self, TcpListener};

pvrun::require_device!(net, "eth0");
pvrun::entry!(main);

fn main() -> net::Result<()> {
    let config = net::init()?; // the address from `--net ...,ip=` or DHCP
    let listener = TcpListener::bind(7)?;
    pvrun::println!("echo on {}:7", config.address);
    loop {
        let (mut conn, _peer) = listener.accept()?;
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = conn.read(&mut buf) {
            conn.write_all(&buf[..n])?;
        }
    }
}
