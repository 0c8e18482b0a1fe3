//! x86-64 specifics: the ring-0 structures and vCPU state, and the page tables.

pub mod cpu;
pub mod paging;
