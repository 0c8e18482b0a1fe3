//! KVM state: the process-wide KVM handle and CPU policy ([`kvm`]), creating a VM over
//! guest memory ([`vm`]), and the vCPU with every register access in one place ([`vcpu`]).

pub(crate) mod kvm;
pub(crate) mod vcpu;
pub(crate) mod vm;
