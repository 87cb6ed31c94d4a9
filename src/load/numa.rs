//! Where a GPU load's reader threads run: on the CPUs of the destination GPU's NUMA node, so
//! the staging buffers they fill (and make: first touch) sit on the memory the GPU's DMA reads
//! from, and a rank of a tensor-parallel group does not copy across the socket link.
//!
//! The topology comes from sysfs: the PCI device's `numa_node`
//! (`<sysfs>/bus/pci/devices/<bus id>/numa_node`, the bus id from the driver) and the node's
//! `cpulist` (`<sysfs>/devices/system/node/nodeN/cpulist`). The root is a parameter so tests
//! can hand a fake tree. Hosts with one node, GPUs without a node (`-1`), and anything
//! unreadable leave the readers where the scheduler puts them.
use std::path::Path;

/// Where reader threads should run, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The GPU's NUMA node, when sysfs names one.
    pub node: Option<u32>,
    /// The CPUs to pin reader threads to: the node's, within the process's own affinity;
    /// `None`: no pinning (one node, unknown node, or nothing in common).
    pub cpus: Option<Vec<usize>>,
}

/// Parse a kernel CPU list (`"0-7,16-23"`, `"3"`, `""`); `None` if malformed.
pub fn parse_cpulist(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 1 << 16 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some(out)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The NUMA node of the PCI device `bus_id` (`"0000:1B:00.0"`, as `cuDeviceGetPCIBusId` gives
/// it; sysfs spells it in lower case).
pub fn pci_node(sysfs: &Path, bus_id: &str) -> Option<u32> {
    let id = bus_id.trim().to_ascii_lowercase();
    if id.is_empty() || id.contains('/') {
        return None;
    }
    let n: i64 = read(&sysfs.join("bus/pci/devices").join(&id).join("numa_node"))?.trim().parse().ok()?;
    u32::try_from(n).ok()
}

/// How many NUMA nodes are online (1 where sysfs does not say).
pub fn online_nodes(sysfs: &Path) -> usize {
    read(&sysfs.join("devices/system/node/online"))
        .and_then(|s| parse_cpulist(&s))
        .map_or(1, |nodes| nodes.len().max(1))
}

/// The CPUs of node `node`.
pub fn node_cpus(sysfs: &Path, node: u32) -> Option<Vec<usize>> {
    read(&sysfs.join(format!("devices/system/node/node{node}/cpulist"))).and_then(|s| parse_cpulist(&s))
}

/// Where readers loading to the GPU at PCI `bus_id` run, given the CPUs this process may use
/// (`allowed`; `None`: unknown, take the node's as they are).
pub fn placement(sysfs: &Path, bus_id: Option<&str>, allowed: Option<&[usize]>) -> Placement {
    let node = bus_id.and_then(|id| pci_node(sysfs, id));
    let Some(n) = node else { return Placement::default() };
    if online_nodes(sysfs) < 2 {
        return Placement { node, cpus: None };
    }
    let cpus = node_cpus(sysfs, n).map(|mut c| {
        if let Some(allowed) = allowed {
            c.retain(|cpu| allowed.contains(cpu));
        }
        c
    });
    Placement { node, cpus: cpus.filter(|c| !c.is_empty()) }
}

/// The CPUs the calling thread may run on (`sched_getaffinity`).
pub fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; an out-parameter call for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some((0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect())
    }
}

/// Restrict the calling thread to `cpus`; false where the kernel refused (the thread then
/// runs where it did).
pub fn pin_current_thread(cpus: &[usize]) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET is bounded below; the call
    // changes only this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs: two nodes of four CPUs each, GPU 0000:1b:00.0 on node 1, one without a
    /// node.
    fn two_nodes() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let put = |rel: &str, text: &str| {
            let p = root.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        put("devices/system/node/online", "0-1\n");
        put("devices/system/node/node0/cpulist", "0-3\n");
        put("devices/system/node/node1/cpulist", "4-7\n");
        put("bus/pci/devices/0000:1b:00.0/numa_node", "1\n");
        put("bus/pci/devices/0000:9a:00.0/numa_node", "-1\n");
        root
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpulist("").unwrap(), Vec::<usize>::new());
        assert!(
            parse_cpulist("3-1").is_none() && parse_cpulist("a").is_none() && parse_cpulist("0-99999999").is_none()
        );
    }

    #[test]
    fn readers_go_to_the_gpus_node() {
        let sys = two_nodes();
        let root = sys.path();
        // The driver's upper-case bus id finds sysfs's lower-case one.
        let p = placement(root, Some("0000:1B:00.0"), None);
        assert_eq!(p, Placement { node: Some(1), cpus: Some(vec![4, 5, 6, 7]) });
        // Only the CPUs this process may use.
        let p = placement(root, Some("0000:1b:00.0"), Some(&[0, 1, 5, 7]));
        assert_eq!(p.cpus, Some(vec![5, 7]));
        // None of them: no pinning.
        assert_eq!(placement(root, Some("0000:1b:00.0"), Some(&[0, 1])).cpus, None);
        // No node, an unknown device, no bus id, a hostile id: nothing.
        for id in [Some("0000:9a:00.0"), Some("0000:00:00.0"), None, Some("../../x")] {
            assert_eq!(placement(root, id, None), Placement::default(), "{id:?}");
        }
        // One node online: the node is known, nothing to choose.
        std::fs::write(root.join("devices/system/node/online"), "0\n").unwrap();
        assert_eq!(placement(root, Some("0000:1b:00.0"), None), Placement { node: Some(1), cpus: None });
        // No sysfs at all.
        assert_eq!(placement(Path::new("/nonexistent"), Some("0000:1b:00.0"), None), Placement::default());
    }

    #[test]
    fn a_thread_can_be_pinned_and_reads_its_cpus_back() {
        let allowed = allowed_cpus().expect("sched_getaffinity works on Linux");
        assert!(!allowed.is_empty());
        let first = allowed[0];
        std::thread::spawn(move || {
            assert!(pin_current_thread(&[first]));
            assert_eq!(allowed_cpus().unwrap(), vec![first]);
        })
        .join()
        .unwrap();
    }
}
