//! Errors that stop a guest from starting, each worded as one line a person can act on.

use thiserror::Error;

/// Why a VM could not be created or started. (What a running guest does is not an error:
/// see [`crate::Outcome`].)
#[derive(Debug, Error)]
pub enum Error {
    /// The KVM device is missing.
    #[error(
        "{0} does not exist: KVM is not available on this machine (enable virtualization in the BIOS or hypervisor, and load the kvm module)"
    )]
    NoKvm(String),
    /// The KVM device exists but may not be opened.
    #[error(
        "cannot open {0}: permission denied (add yourself to the `kvm` group, e.g. `sudo usermod -aG kvm $USER`, or run as root)"
    )]
    KvmPermission(String),
    /// Any other failure to open the KVM device.
    #[error("cannot open {0}: {1}")]
    KvmOpen(String, std::io::Error),
    /// A KVM ioctl failed.
    #[error("KVM call {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// The guest file could not be read.
    #[error("cannot read guest `{path}`: {source}")]
    ReadGuest {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The guest file is not a usable guest ELF.
    #[error("guest `{path}` {reason}")]
    BadElf {
        /// The file.
        path: String,
        /// What is wrong, as the end of a sentence.
        reason: String,
    },
    /// The guest speaks another ABI version.
    #[error(
        "guest `{path}` was built for pvrun ABI v{guest}, but this host speaks v{host}; rebuild it with this version's guest-sdk"
    )]
    AbiMismatch {
        /// The file.
        path: String,
        /// The guest's version.
        guest: u32,
        /// Ours.
        host: u32,
    },
    /// The image (plus heap and stack) does not fit the guest memory.
    #[error(
        "the guest needs at least {} of memory but has {}; raise --mem to {} or more",
        size(*needed),
        size(*available),
        size(needed.next_multiple_of(2 << 20))
    )]
    DoesNotFit {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A bad memory size.
    #[error(
        "guest memory size {} is out of range: it must be a multiple of 2M from {} to {}",
        size(*.0),
        size(crate::layout::MIN_MEM_SIZE),
        size(crate::layout::MAX_MEM_SIZE)
    )]
    BadMemSize(u64),
    /// Arguments or environment do not fit in the boot-info region.
    #[error("arguments and environment are too large ({0} bytes; at most 190 KiB fit)")]
    ArgsTooLarge(u64),
    /// Mapping guest memory failed.
    #[error("cannot allocate guest memory: {0}")]
    Mmap(std::io::Error),
    /// An internal layout problem (should not happen with a valid guest).
    #[error("guest memory layout: {0}")]
    Layout(String),
    /// A disk image could not be attached.
    #[error("disk `{name}` ({path}): {why}")]
    Disk {
        /// Device name.
        name: String,
        /// Image path.
        path: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// A TAP interface could not be attached.
    #[error("network `{name}` (TAP `{tap}`): {why}")]
    Net {
        /// Device name.
        name: String,
        /// TAP interface.
        tap: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// The guest declares a device that is not attached.
    #[error(
        "guest `{path}` needs a {kind} device named `{name}`, which is not attached (add `{flag} {name}=...`)"
    )]
    MissingDevice {
        /// The guest file.
        path: String,
        /// Device kind ("block", "net").
        kind: &'static str,
        /// Device name.
        name: String,
        /// The option that attaches one.
        flag: &'static str,
    },
    /// A snapshot file that cannot be used (see docs/SNAPSHOT.md).
    #[error("snapshot file `{path}` {reason}")]
    BadSnapshot {
        /// The file.
        path: String,
        /// What is wrong and what to do, as the end of a sentence.
        reason: String,
    },
    /// An invalid configuration (device names, counts).
    #[error("{0}")]
    Config(String),
    /// A host-side failure while the guest runs (writing its output, for instance).
    #[error("host I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A byte count the way `--mem` takes it: `64M`, `1G`, `12K`, or bytes.
pub fn size(bytes: u64) -> String {
    const K: u64 = 1 << 10;
    match bytes {
        0 => "0".into(),
        b if b % (K * K * K) == 0 => format!("{}G", b / (K * K * K)),
        b if b % (K * K) == 0 => format!("{}M", b / (K * K)),
        b if b % K == 0 => format!("{}K", b / K),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_like_the_option_that_set_them() {
        assert_eq!(super::size(3 << 20), "3M");
        assert_eq!(super::size(1 << 30), "1G");
        assert_eq!(super::size(4097), "4097 bytes");
        let e = super::Error::BadMemSize(3 << 20).to_string();
        assert!(e.contains("3M") && e.contains("14M"), "{e}");
    }
}
