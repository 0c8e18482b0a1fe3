//! How a VM is set up: [`VmConfig`].

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use crate::devices::block::DiskConfig;
use crate::devices::net::NetConfig;
use crate::function::{FN_DATA_MAX, HostFn};
use crate::layout::DEFAULT_MEM_SIZE;

/// How a VM is set up.
pub struct VmConfig {
    /// Guest memory in bytes (a multiple of 2 MiB).
    pub mem_size: u64,
    /// Arguments, including `argv[0]`.
    pub args: Vec<String>,
    /// Environment, as (key, value).
    pub env: Vec<(String, String)>,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// Where guest stdout goes.
    pub stdout: Box<dyn Write + Send>,
    /// Where guest stderr goes.
    pub stderr: Box<dyn Write + Send>,
    /// Disks to attach.
    pub disks: Vec<DiskConfig>,
    /// Network interfaces to attach.
    pub nets: Vec<NetConfig>,
    /// Functions the guest may call by name (`HOST_CALL`).
    pub host_functions: Arc<HashMap<String, HostFn>>,
    /// Largest output a function call may return.
    pub max_output: u64,
    /// Serve doorbells through KVM ioeventfds (true) or as exits to the run loop (false;
    /// slower, for measurement).
    pub ioeventfd: bool,
    /// Track which guest pages are written (KVM dirty logging), for snapshot restore.
    pub dirty_log: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: DEFAULT_MEM_SIZE,
            args: vec!["guest".into()],
            env: Vec::new(),
            timeout: None,
            stdout: Box::new(crate::output::StdStream::stdout()),
            stderr: Box::new(crate::output::StdStream::stderr()),
            disks: Vec::new(),
            nets: Vec::new(),
            host_functions: Arc::default(),
            max_output: FN_DATA_MAX,
            ioeventfd: true,
            dirty_log: false,
        }
    }
}
