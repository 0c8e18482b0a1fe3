//! The TAP interface behind a network device.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::NetConfig;
use crate::devices::worker::printable;
use crate::error::Error;

/// Checks a TAP interface name: 1-15 bytes, none of them NUL, `/`, `:`, white space or
/// another control character (what Linux accepts for an interface, less the odd ones).
pub fn check_tap_name(tap: &str) -> Result<(), String> {
    if tap.is_empty()
        || tap.len() > 15
        || tap
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '/' || c == ':')
    {
        return Err(format!(
            "`{}` is not an interface name (1-15 characters, no `/`, `:` or spaces)",
            printable(tap)
        ));
    }
    Ok(())
}

/// An opened TAP interface.
pub struct Tap {
    file: File,
    name: String,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

impl Tap {
    /// Opens TAP interface `name` (without packet-information headers, non-blocking).
    pub fn open(cfg: &NetConfig) -> Result<Tap, Error> {
        let fail = |why: String| Error::Net {
            name: printable(&cfg.name),
            tap: printable(&cfg.tap),
            why,
        };
        // The name goes into a 16-byte, NUL-terminated `ifr_name`.
        check_tap_name(&cfg.tap).map_err(fail)?;
        let create = format!(
            "create it with `sudo ip tuntap add dev {0} mode tap user $USER && sudo ip link set {0} up`",
            cfg.tap
        );
        // TUNSETIFF would create a missing interface (as root), which the guest would then
        // serve where nobody can reach it: the interface must exist already.
        let cname =
            std::ffi::CString::new(cfg.tap.as_str()).map_err(|_| fail("bad name".into()))?;
        // SAFETY: if_nametoindex reads a NUL-terminated name.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(fail(format!("no such interface; {create}")));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    fail("/dev/net/tun does not exist (load the `tun` kernel module)".into())
                }
                std::io::ErrorKind::PermissionDenied => {
                    fail(format!("no permission to open /dev/net/tun; {create}"))
                }
                _ => fail(format!("cannot open /dev/net/tun: {e}")),
            })?;
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            flags: libc::c_short,
            pad: [u8; 22],
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            pad: [0; 22],
        };
        req.name[..cfg.tap.len()].copy_from_slice(cfg.tap.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq-sized struct we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    fail(format!("no permission to use it; {create}"))
                }
                Some(libc::EBUSY) => fail("it is in use by another program".into()),
                Some(libc::EINVAL) => fail("it exists but is not a TAP device".into()),
                _ => fail(format!("cannot attach: {e}")),
            });
        }
        Ok(Tap {
            file,
            name: cfg.tap.clone(),
        })
    }
}

impl Tap {
    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Whether a read or write error on a TAP descriptor means the interface is gone (deleted,
/// or the descriptor detached from it) rather than a frame lost to a full queue or a
/// link that is down for now.
pub fn is_gone(e: &std::io::Error) -> bool {
    !matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::EINTR | libc::EIO | libc::ENOBUFS | libc::ENOMEM | libc::EINVAL)
    )
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}
