//! The guest's NIC in the pod's network namespace, connected the way Kata Containers does
//! it: a TAP inside the namespace and a tc redirect in both directions between it and the
//! pod's interface (the veth a CNI plugin made), so every frame the pod receives goes to
//! the guest and every frame the guest sends leaves through the pod's interface. The
//! guest gets the interface's MAC, IPv4 address and default gateway, so it answers on
//! the pod IP. Nothing is needed from the CNI plugin.
//!
//! The work is done by `ip` and `tc` (iproute2) run inside the namespace with `nsenter`
//! (util-linux), as a person would; the guest process joins the namespace itself (setns
//! before exec), so it opens the TAP there.

use std::path::Path;
use std::process::Command;

/// One guest's connection to its pod's interface.
#[derive(Clone, Debug)]
pub struct PodNet {
    /// The network namespace (a path such as /var/run/netns/NAME or /proc/PID/ns/net).
    pub netns: String,
    /// The pod's interface (e.g. `eth0`).
    pub pod_if: String,
    /// Our TAP in the namespace.
    pub tap: String,
    /// `--net` for the guest: `NAME=tap:TAP,mac=...,ip=.../N[,gw=...]`.
    pub net_option: String,
}

fn run(netns: &str, tool: &str, args: &[&str]) -> Result<String, String> {
    use std::io::Read;
    let cant =
        |e: std::io::Error| format!("cannot run `{tool}` (install iproute2 and util-linux): {e}");
    let mut child = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .arg("--")
        .arg(tool)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(cant)?;
    let mut stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_end(&mut b);
        }
        b
    });
    let mut out = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_end(&mut out);
    }
    let err = err_reader.join().unwrap_or_default();
    // The shim's reaper (waitpid(-1) on SIGCHLD) may reap the child first: then its
    // status comes from the reaper's report.
    let code = match child.wait() {
        Ok(status) => status.code().unwrap_or(128),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
            crate::service::wait_reaped(child.id(), std::time::Duration::from_secs(10))
                .ok_or_else(|| format!("`{tool}` did not finish"))?
        }
        Err(e) => return Err(cant(e)),
    };
    if code != 0 {
        let err = String::from_utf8_lossy(&err);
        return Err(format!(
            "`{tool} {}` in the pod's network namespace failed: {}",
            args.join(" "),
            err.trim().replace('\n', " ")
        ));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn json(netns: &str, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = run(netns, "ip", args)?;
    serde_json::from_str(&out).map_err(|e| format!("cannot read `ip {}`: {e}", args.join(" ")))
}

/// The TAP's name for a container: `pvtap` and 8 hex digits of a hash of its id (fits
/// IFNAMSIZ; stable, so delete finds it).
fn tap_name(id: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("pvtap{h:08x}")
}

/// Connects a TAP to the pod's interface in `netns` for container `id`, whose guest
/// device is `guest_dev`. The pod's interface is the one with an IPv4 address that is not
/// loopback; it must be the only one.
pub fn connect(netns: &str, id: &str, guest_dev: &str) -> Result<PodNet, String> {
    if !Path::new(netns).exists() {
        return Err(format!(
            "the pod's network namespace {netns} does not exist"
        ));
    }
    let links = json(netns, &["-j", "-4", "addr", "show"])?;
    let candidates: Vec<&serde_json::Value> = links
        .as_array()
        .map(|a| a.iter().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l["ifname"] != "lo" && l["addr_info"].as_array().is_some_and(|a| !a.is_empty()))
        .filter(|l| !l["ifname"].as_str().unwrap_or("").starts_with("pvtap"))
        .collect();
    let link = match candidates.as_slice() {
        [one] => *one,
        [] => return Err("the pod's network namespace has no interface with an IPv4 address".into()),
        _ => return Err("the pod's network namespace has more than one interface with an IPv4 address; pvrun connects exactly one".into()),
    };
    let pod_if = link["ifname"].as_str().unwrap_or_default().to_string();
    let addr = &link["addr_info"][0];
    let (Some(ip), Some(prefix)) = (addr["local"].as_str(), addr["prefixlen"].as_u64()) else {
        return Err(format!("cannot read the address of {pod_if}"));
    };
    let details = json(netns, &["-j", "link", "show", "dev", &pod_if])?;
    let mac = details[0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mtu = details[0]["mtu"].as_u64().unwrap_or(1500);
    let routes = json(netns, &["-j", "-4", "route", "show", "default"])?;
    let gw = routes[0]["gateway"].as_str().map(str::to_string);

    let tap = tap_name(id);
    run(netns, "ip", &["tuntap", "add", "dev", &tap, "mode", "tap"])?;
    let setup = || -> Result<(), String> {
        run(
            netns,
            "ip",
            &["link", "set", "dev", &tap, "mtu", &mtu.to_string(), "up"],
        )?;
        run(netns, "tc", &["qdisc", "add", "dev", &pod_if, "ingress"]).map_err(|e| {
            format!("{e} (is another pvrun guest of this pod already connected to {pod_if}?)")
        })?;
        run(netns, "tc", &["qdisc", "add", "dev", &tap, "ingress"])?;
        for (from, to) in [(&pod_if, &tap), (&tap, &pod_if)] {
            run(
                netns,
                "tc",
                &[
                    "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                    "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
                ],
            )?;
        }
        Ok(())
    };
    let pn = PodNet {
        netns: netns.to_string(),
        pod_if: pod_if.clone(),
        tap: tap.clone(),
        net_option: format!(
            "{guest_dev}=tap:{tap},mac={mac},ip={ip}/{prefix}{}",
            gw.map(|g| format!(",gw={g}")).unwrap_or_default()
        ),
    };
    if let Err(e) = setup() {
        disconnect(&pn);
        return Err(e);
    }
    Ok(pn)
}

/// Undoes [`connect`] (best effort: the namespace may be gone already).
pub fn disconnect(pn: &PodNet) {
    if !Path::new(&pn.netns).exists() {
        return;
    }
    let _ = run(
        &pn.netns,
        "tc",
        &["qdisc", "del", "dev", &pn.pod_if, "ingress"],
    );
    let _ = run(&pn.netns, "ip", &["link", "del", "dev", &pn.tap]);
}

#[cfg(test)]
mod tests {
    #[test]
    fn tap_names_fit_ifnamsiz_and_are_stable() {
        let a = super::tap_name("a-container-id-that-is-very-long-indeed");
        assert!(a.len() <= 15, "{a}");
        assert_eq!(
            a,
            super::tap_name("a-container-id-that-is-very-long-indeed")
        );
        assert_ne!(a, super::tap_name("another"));
    }
}
