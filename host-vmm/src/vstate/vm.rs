//! Creating a KVM VM over guest memory.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::error::Error;
use crate::memory::GuestRam;

/// Creates a KVM VM over `ram` (slot 0 at guest address 0, with dirty logging if asked) and
/// its one vCPU (wrap it in a [`super::vcpu::Vcpu`] once the CPU policy is known).
pub(crate) fn create(kvm: &Kvm, ram: &GuestRam, dirty_log: bool) -> Result<(VmFd, VcpuFd), Error> {
    keep_kvm_warm(kvm);
    let vm = kvm
        .create_vm()
        .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
    add_slot(&vm, ram, dirty_log)?;
    let fd = vm
        .create_vcpu(0)
        .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
    Ok((vm, fd))
}

/// From a process's second VM on, one VM with one vCPU (no memory) is kept for the life
/// of the process. KVM switches some kernel code paths on and off (static keys, patched
/// into the kernel's text on every CPU) when the first VM or vCPU of the machine appears
/// and the last one goes: on an otherwise idle host, each VM a long-lived process made
/// and dropped paid that patching twice (~16% of an in-process boot here). A one-shot
/// runner makes a single VM and keeps nothing.
fn keep_kvm_warm(kvm: &Kvm) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    static KEPT: std::sync::OnceLock<Option<(VmFd, VcpuFd)>> = std::sync::OnceLock::new();
    // A thread under the vCPU filter may not create VMs (and does not need to: a pool
    // creates its sandboxes before it confines its callers).
    if CREATED.fetch_add(1, Ordering::Relaxed) == 0
        || KEPT.get().is_some()
        || crate::seccomp::thread_confined()
    {
        return;
    }
    KEPT.get_or_init(|| {
        let vm = kvm.create_vm().ok()?;
        let vcpu = vm.create_vcpu(0).ok()?;
        Some((vm, vcpu))
    });
}

/// Registers `ram` as memory slot 0 at guest address 0 (with dirty logging if asked).
pub(crate) fn add_slot(vm: &VmFd, ram: &GuestRam, dirty_log: bool) -> Result<(), Error> {
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: if dirty_log {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base(),
    };
    // SAFETY: the region is our own mapping of exactly `ram.size()` bytes, and it outlives
    // the VM (field order of `Vm` and `VmShell`).
    unsafe { vm.set_user_memory_region(slot) }
        .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))
}

/// Removes memory slot 0: KVM frees what it keeps per slot (reverse maps, write
/// tracking, dirty bitmaps: about 3 KiB per MiB of guest memory on a shadow-paging host)
/// and every mapping of it. The guest must not run until [`add_slot`] puts it back.
pub(crate) fn remove_slot(vm: &VmFd) -> Result<(), Error> {
    let slot = kvm_userspace_memory_region {
        slot: 0,
        ..Default::default()
    };
    // SAFETY: a zero-sized region deletes the slot; no memory is handed to KVM.
    unsafe { vm.set_user_memory_region(slot) }
        .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))
}

/// The guest pages written since the last call (bit `i` = 4 KiB page `i`).
pub(crate) fn dirty_log(vm: &VmFd, size: u64) -> Result<Vec<u64>, Error> {
    vm.get_dirty_log(0, size as usize)
        .map_err(|e| Error::Kvm("KVM_GET_DIRTY_LOG", e))
}
