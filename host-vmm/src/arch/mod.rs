//! Architecture-specific code (x86-64 only): the ring-0 structures, the vCPU state and
//! the page tables.
//!
//! The rest of the host uses only the names re-exported here.

pub(crate) mod x86_64;

pub(crate) use self::x86_64::interrupts::{FRAME_WORDS, RESUME_ADDR};
pub(crate) use self::x86_64::paging::build as build_page_tables;
pub(crate) use self::x86_64::{CpuSetup, USER_CS, VcpuState, write_system_tables};
