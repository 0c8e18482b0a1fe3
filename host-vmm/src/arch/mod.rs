//! x86-64 specifics: the ring-0 structures and vCPU state, and the page tables.
//!
//! The rest of the host uses only the names re-exported here.

pub(crate) mod cpu;
pub(crate) mod paging;

pub(crate) use cpu::{CpuSetup, USER_CS, VcpuState, write_system_tables};
pub(crate) use paging::build as build_page_tables;
