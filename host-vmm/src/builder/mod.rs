//! Building a VM from a validated image and a configuration, in order:
//! plan the memory map -> map and load memory -> system tables and page tables ->
//! KVM VM and vCPU -> boot info -> devices.
//!
//! Nothing here runs the guest; [`crate::Vm::run`] does.

pub(crate) mod boot_info;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pvrun_abi::{device, perm, region};

use crate::arch;
use crate::config::VmConfig;
use crate::devices::worker::check_device_name;
use crate::devices::{self, Devices, Planned};
use crate::error::Error;
use crate::function::FnContext;
use crate::hypercall::Console;
use crate::layout::*;
use crate::loader::GuestImage;
use crate::memory::{GuestRam, HOST_ONLY, MemoryMap, Region};
use crate::runtime::Vm;
use crate::runtime::control::RunControl;
use crate::runtime::notify::Notify;
use crate::vstate::kvm::{cpu_policy, cpu_policy_ready, kvm};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm as kvm_vm;

/// Where the heap and stack go for an image in `mem_size` bytes of memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// First heap byte (2 MiB aligned, after the image).
    pub heap_start: u64,
    /// End of the heap (the stack guard starts here).
    pub heap_end: u64,
    /// Lowest stack byte.
    pub stack_start: u64,
    /// Guest memory size (the top of the stack).
    pub mem_size: u64,
}

impl Plan {
    /// Lays out image, heap up to the guard, guard, and the stack at the top.
    pub fn new(image_end: u64, mem_size: u64) -> Result<Plan, Error> {
        if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&mem_size)
            || !mem_size.is_multiple_of(LARGE_PAGE_SIZE)
        {
            return Err(Error::BadMemSize(mem_size));
        }
        let heap_start = align_up(image_end, LARGE_PAGE_SIZE).unwrap_or(u64::MAX);
        let stack_start = mem_size - STACK_SIZE;
        let heap_end = stack_start - STACK_GUARD_SIZE;
        if heap_start.saturating_add(MIN_HEAP_SIZE) > heap_end {
            return Err(Error::DoesNotFit {
                needed: heap_start.saturating_add(MIN_HEAP_SIZE + STACK_GUARD_SIZE + STACK_SIZE),
                available: mem_size,
            });
        }
        Ok(Plan {
            heap_start,
            heap_end,
            stack_start,
            mem_size,
        })
    }
}

/// Every region of the guest's memory map: the host's own structures (supervisor-only),
/// console ring, boot info, the image's segments, heap, stack, and the device area.
pub(crate) fn memory_map(
    image: &GuestImage,
    plan: &Plan,
    device_area_end: u64,
) -> Result<MemoryMap, Error> {
    let host = |start, end, perm| Region {
        start,
        end,
        kind: HOST_ONLY,
        perm,
        user: false,
    };
    let user = |start, end, kind, perm| Region {
        start,
        end,
        kind,
        perm,
        user: true,
    };
    let mut regions = vec![
        host(GDT_ADDR, GDT_ADDR + PAGE_SIZE, perm::R | perm::W),
        host(IDT_ADDR, IDT_ADDR + PAGE_SIZE, perm::R),
        host(TSS_ADDR, TSS_ADDR + PAGE_SIZE, perm::R | perm::W),
        host(STUBS_ADDR, STUBS_ADDR + PAGE_SIZE, perm::R | perm::X),
        host(R0_STACK_BOTTOM, R0_STACK_TOP, perm::R | perm::W),
        user(
            CONSOLE_RING_ADDR,
            CONSOLE_DATA_ADDR + CONSOLE_DATA_SIZE,
            region::CONSOLE,
            perm::R | perm::W,
        ),
        user(BOOT_INFO_ADDR, BOOT_INFO_END, region::BOOT_INFO, perm::R),
    ];
    for s in &image.segments {
        let kind = if s.perm & perm::X != 0 {
            region::TEXT
        } else if s.perm & perm::W != 0 {
            region::DATA
        } else {
            region::RODATA
        };
        regions.push(user(s.page_start, s.page_end, kind, s.perm));
    }
    regions.push(user(
        plan.heap_start,
        plan.heap_end,
        region::HEAP,
        perm::R | perm::W,
    ));
    regions.push(user(
        plan.stack_start,
        plan.mem_size,
        region::STACK,
        perm::R | perm::W,
    ));
    if device_area_end > DEVICE_AREA_ADDR {
        regions.push(user(
            DEVICE_AREA_ADDR,
            device_area_end,
            region::DEVICES,
            perm::R | perm::W,
        ));
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        for r in &regions {
            tracing::debug!(
                start = format_args!("{:#x}", r.start),
                end = format_args!("{:#x}", r.end),
                kind = region_name(r.kind),
                perm = %crate::loader::perm_string(r.perm),
                guest = r.user,
                "memory map"
            );
        }
    }
    MemoryMap::new(regions)
}

/// A memory region kind's name, for log lines.
fn region_name(kind: u32) -> &'static str {
    match kind {
        region::TEXT => "text",
        region::RODATA => "rodata",
        region::DATA => "data",
        region::HEAP => "heap",
        region::STACK => "stack",
        region::BOOT_INFO => "boot-info",
        region::CONSOLE => "console",
        region::DEVICES => "devices",
        HOST_ONLY => "host-only",
        _ => "other",
    }
}

/// Checks what a library caller put in the configuration (the command line's parsers
/// check the same, but the fields are public): names, TAP names, MTU and prefix ranges, so
/// no configuration can make the host index out of bounds or allocate without limit.
fn check_config(config: &VmConfig) -> Result<(), Error> {
    for d in &config.disks {
        check_device_name(&d.name).map_err(Error::Config)?;
    }
    for n in &config.nets {
        check_device_name(&n.name).map_err(Error::Config)?;
        if n.tap.is_empty() || n.tap.len() >= libc::IFNAMSIZ || n.tap.contains(['/', '\0']) {
            return Err(Error::Config(format!(
                "network `{}`: TAP name `{}` must be 1-15 bytes without `/`",
                n.name,
                crate::output::escape_controls(&n.tap)
            )));
        }
        if !(68..=65_521).contains(&n.mtu) {
            return Err(Error::Config(format!(
                "network `{}`: MTU {} is out of range (68 to 65521)",
                n.name, n.mtu
            )));
        }
        if n.ip.is_some_and(|(_, prefix)| prefix > 32) {
            return Err(Error::Config(format!(
                "network `{}`: an IPv4 prefix is at most /32",
                n.name
            )));
        }
    }
    Ok(())
}

/// Refuses a guest whose ELF declares a device that the configuration does not attach.
fn check_required_devices(image: &GuestImage, config: &VmConfig) -> Result<(), Error> {
    for (kind, name) in &image.required_devices {
        let attached = (*kind == device::BLOCK && config.disks.iter().any(|d| &d.name == name))
            || (*kind == device::NET && config.nets.iter().any(|n| &n.name == name));
        if !attached {
            let (kind, flag) = match *kind {
                device::BLOCK => ("block", "--disk"),
                device::NET => ("network", "--net"),
                _ => ("unknown", "--disk"),
            };
            return Err(Error::MissingDevice {
                path: image.path.clone(),
                kind,
                name: name.clone(),
                flag,
            });
        }
    }
    Ok(())
}

/// Creates the VM, loads the image, writes boot info and sets the vCPU at the entry.
pub(crate) fn build(image: Arc<GuestImage>, config: VmConfig) -> Result<Vm, Error> {
    let plan = Plan::new(image.image_end(), config.mem_size)?;
    check_config(&config)?;
    let kvm = kvm()?;
    // The first VM of a process asks KVM for its CPUID table (~0.3 ms on PVM hosts);
    // do that on another thread while this one creates the VM and loads memory.
    let cpu_pending = if cpu_policy_ready() {
        None
    } else {
        Some(std::thread::spawn(move || cpu_policy(kvm).map(|_| ())))
    };

    // Devices: open the images and lay out their rings before anything is mapped.
    check_required_devices(&image, &config)?;
    let planned: Planned = devices::plan(&config.disks, &config.nets)?;
    let map = memory_map(&image, &plan, planned.area_end)?;

    let ram = GuestRam::new(plan.mem_size)?;
    // Host huge pages pay off where a guest touches memory in bulk (a large heap), but
    // zeroing a whole 2 MiB chunk on first touch costs more than the few 4 KiB pages a
    // small guest touches in its image, stack and first heap chunk: measured here,
    // huge pages everywhere made `hello` boot 1.3 ms slower.
    let bulk_heap = plan.heap_start + LARGE_PAGE_SIZE;
    if plan.heap_end > bulk_heap {
        ram.advise_huge(bulk_heap, plan.heap_end - bulk_heap);
    }
    image.load(&ram)?;
    arch::write_system_tables(&ram)?;
    let cr3 = arch::build_page_tables(&ram, &map)?;

    let (vm, vcpu_fd) = kvm_vm::create(kvm, &ram, config.dirty_log)?;
    if let Some(pending) = cpu_pending {
        pending
            .join()
            .map_err(|_| Error::Layout("CPUID probe thread panicked".into()))??;
    }
    let policy = cpu_policy(kvm)?;
    let vcpu = Vcpu::new(vcpu_fd, policy);
    let cpu = &policy.setup;
    cpu.setup_vcpu(vcpu.fd(), cr3, image.entry, plan.mem_size, BOOT_INFO_ADDR)?;

    // Clock calibration: the guest TSC now, and the host clocks at the same instant.
    let tsc_hz = vcpu.tsc_hz()?;
    let tsc_at_boot = vcpu.tsc()?;
    let boot_instant = Instant::now();
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let facts = boot_info::BootFacts {
        tsc_hz,
        tsc_at_boot,
        wall_ns_at_boot: wall,
        features: cpu.features,
        abi_version: image.abi_version,
    };
    boot_info::write(
        &ram,
        &map,
        boot_info::Ranges {
            heap: (plan.heap_start, plan.heap_end),
            stack: (plan.stack_start, plan.mem_size),
        },
        &config.args,
        &config.env,
        &planned.infos,
        &facts,
    )?;
    let notify = Arc::new(Notify::new()?);
    let devices = Devices::start(planned, &vm, ram.mem(), &map, &notify, config.ioeventfd)?;
    tracing::debug!(
        mem = plan.mem_size,
        heap = format_args!("{:#x}..{:#x}", plan.heap_start, plan.heap_end),
        stack = format_args!("{:#x}..{:#x}", plan.stack_start, plan.mem_size),
        tsc_hz,
        devices = devices.counters().len(),
        ioeventfd = devices.ioeventfd,
        "VM built"
    );

    Ok(Vm {
        devices,
        vcpu,
        vm,
        ram,
        map,
        image,
        console: Console::new(config.stdout, config.stderr),
        control: RunControl::new(notify),
        timeout: config.timeout,
        boot_instant,
        tsc_hz,
        tsc_at_boot,
        exits: 0,
        counts: Default::default(),
        fns: FnContext {
            host_fns: config.host_functions,
            max_output: config.max_output,
            host_writes: Vec::new(),
            ..FnContext::default()
        },
        crash: None,
        slot_removed: false,
    })
}
