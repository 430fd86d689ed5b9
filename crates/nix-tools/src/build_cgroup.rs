//! Each build in a control group of its own: a memory limit, and what the build used (peak
//! memory, CPU time, wall time, whether the kernel killed it for memory).
//!
//! A build runs in the process of the daemon serving its connection and in the builder that
//! process forks, so moving that process into a fresh group before `BuildDerivation` puts the
//! whole build there (children stay in their parent's group). The daemon pool finds that
//! process among its private daemon's children (the connection's peer credentials would name
//! the listening process, and Nix 2.8 runs no `pre-build-hook` for `BuildDerivation`). The
//! groups are made under the group this process is in, in a directory `nixspace-<pid>`: with
//! cgroup v2 where the memory and cpu controllers are enabled there, else with v1's `memory`
//! and `cpuacct` hierarchies (Debian's Nix 2.8 has no cgroup support of its own). The
//! daemon's process is counted from the move on (v1 does not move what it had charged).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why build groups are not available, or one could not be made or joined.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a cgroup v2 hierarchy with the memory controller nor v1's `memory` and
    /// `cpuacct` hierarchies are mounted.
    #[error("no cgroup hierarchy with memory and CPU accounting is mounted")]
    NotMounted,
    /// A cgroup file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Bytes in a mebibyte, as limits and usage are shown.
pub const MIB: u64 = 1024 * 1024;

/// What a build used, as its group counted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuildUsage {
    /// The most memory the build's processes held at once, in bytes (`None` where the kernel
    /// keeps no peak: cgroup v2 before Linux 5.19).
    pub peak_memory: Option<u64>,
    /// CPU time, user and system, of every process of the build.
    pub cpu_time: Duration,
    /// From making the group to reading it.
    pub wall_time: Duration,
    /// The kernel killed a process of the build for exceeding the group's memory limit.
    pub oom_killed: bool,
}

/// The cgroup hierarchies build groups are made in.
#[derive(Debug, Clone)]
enum Layout {
    /// One unified hierarchy: this directory.
    V2(PathBuf),
    /// v1: the `memory` and `cpuacct` hierarchies' directories.
    V1 { memory: PathBuf, cpuacct: PathBuf },
}

impl Layout {
    /// Its directories, one per hierarchy.
    fn dirs(&self) -> Vec<PathBuf> {
        match self {
            Layout::V2(dir) => vec![dir.clone()],
            Layout::V1 { memory, cpuacct } => vec![memory.clone(), cpuacct.clone()],
        }
    }

    /// The group `name` under this one.
    fn child(&self, name: &str) -> Layout {
        match self {
            Layout::V2(dir) => Layout::V2(dir.join(name)),
            Layout::V1 { memory, cpuacct } => Layout::V1 {
                memory: memory.join(name),
                cpuacct: cpuacct.join(name),
            },
        }
    }
}

/// Where this process makes its builds' groups.
#[derive(Debug, Clone)]
pub struct BuildCgroups {
    layout: Layout,
    /// The names of the groups of builds under way: [`BuildCgroups::start`] removes only
    /// the others (a group just made holds no process until its build enters it).
    live: Arc<Mutex<BTreeSet<String>>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(io(path))
}

fn write(path: &Path, text: &str) -> Result<(), CgroupError> {
    std::fs::write(path, text).map_err(io(path))
}

/// The value of `key` in a `key value` per line file (`memory.events`, `cpu.stat`,
/// v1's `memory.oom_control`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// The mount points of the cgroup hierarchies, from `/proc/self/mountinfo`: `(fs type,
/// super options, mount point)`.
fn cgroup_mounts(mountinfo: &str) -> Vec<(String, String, PathBuf)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            let fs = *fields.get(dash + 1)?;
            let options = *fields.get(dash + 3)?;
            let mount = *fields.get(4)?;
            (fs == "cgroup" || fs == "cgroup2")
                .then(|| (fs.to_owned(), options.to_owned(), PathBuf::from(mount)))
        })
        .collect()
}

/// This process's group in the hierarchy named `controller` (`""` for v2), from
/// `/proc/self/cgroup`.
fn own_group(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            "" => controllers.is_empty(),
            c => controllers.split(',').any(|x| x == c),
        };
        matches.then(|| path.trim_start_matches('/').to_owned())
    })
}

impl BuildCgroups {
    /// The hierarchies of this machine, and a directory `nixspace-<pid>` under this process's
    /// own group in each, made now.
    pub fn detect() -> Result<BuildCgroups, CgroupError> {
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        let proc_cgroup = read(Path::new("/proc/self/cgroup"))?;
        let mounts = cgroup_mounts(&mountinfo);
        let mine = format!("nixspace-{}", std::process::id());
        let under = |mount: &Path, controller: &str| {
            own_group(&proc_cgroup, controller).map(|own| mount.join(own).join(&mine))
        };
        let v2 = mounts
            .iter()
            .filter(|(fs, _, _)| fs == "cgroup2")
            .find_map(|(_, _, mount)| {
                let dir = under(mount, "")?;
                let parent = dir.parent()?;
                let controllers =
                    std::fs::read_to_string(parent.join("cgroup.subtree_control")).ok()?;
                let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
                (has("memory") && has("cpu")).then_some(dir)
            });
        let v1 = |controller: &str| {
            mounts.iter().find_map(|(fs, options, mount)| {
                (fs == "cgroup" && options.split(',').any(|o| o == controller))
                    .then(|| under(mount, controller))
                    .flatten()
            })
        };
        let layout = match (v2, v1("memory"), v1("cpuacct")) {
            (Some(dir), _, _) => Layout::V2(dir),
            (None, Some(memory), Some(cpuacct)) => Layout::V1 { memory, cpuacct },
            _ => return Err(CgroupError::NotMounted),
        };
        let cgroups = BuildCgroups {
            layout,
            live: Arc::default(),
        };
        for dir in cgroups.layout.dirs() {
            if let Some(parent) = dir.parent() {
                remove_those_of_gone_processes(parent);
            }
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(cgroups)
    }

    /// A new group `name` for one build, limited to `memory_limit` bytes if given. Groups
    /// left behind by earlier builds whose processes have all gone are removed first.
    pub fn start(&self, name: &str, memory_limit: Option<u64>) -> Result<BuildCgroup, CgroupError> {
        {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            for dir in self.layout.dirs() {
                remove_empty_groups_in(&dir, &live);
            }
            live.insert(name.to_owned());
        }
        // From here on, dropping the group takes its name out of the live ones again.
        let group = BuildCgroup {
            layout: self.layout.child(name),
            made: Instant::now(),
            name: name.to_owned(),
            live: Arc::clone(&self.live),
        };
        for dir in group.layout.dirs() {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        if let Some(limit) = memory_limit {
            let limit = limit.to_string();
            match &group.layout {
                Layout::V2(dir) => {
                    write(&dir.join("memory.max"), &limit)?;
                    // Swap would let a build past its limit without being killed.
                    let swap = dir.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                }
                Layout::V1 { memory, .. } => {
                    write(&memory.join("memory.limit_in_bytes"), &limit)?;
                    // Memory and swap together, where swap accounting is on.
                    let memsw = memory.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &limit)?;
                    }
                }
            }
        }
        Ok(group)
    }
}

/// Remove the groups in `dir` that no process is in any more, but those named in `keep`
/// (a build's daemon process may outlive the build by a moment, so its group is not always
/// removed with it).
fn remove_empty_groups_in(dir: &Path, keep: &BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let kept = entry.file_name().to_str().is_some_and(|n| keep.contains(n));
        if !kept && entry.file_type().is_ok_and(|t| t.is_dir()) {
            // Fails, harmlessly, while a process is still in it.
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Remove the `nixspace-<pid>` groups in `dir` of processes that are gone, with the empty
/// build groups left in them (a group holding a process stays).
fn remove_those_of_gone_processes(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("nixspace-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        remove_empty_groups_in(&entry.path(), &BTreeSet::new());
        let _ = std::fs::remove_dir(entry.path());
    }
}

/// One build's group. Dropping it removes the group if no process is left in it (else the
/// next [`BuildCgroups::start`] does).
#[derive(Debug)]
pub struct BuildCgroup {
    layout: Layout,
    made: Instant,
    /// Its name among [`BuildCgroups`]' live groups, left when it is dropped.
    name: String,
    live: Arc<Mutex<BTreeSet<String>>>,
}

impl BuildCgroup {
    /// Move process `pid` (and so whatever it forks from now on) into the group.
    pub fn enter(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in self.layout.dirs() {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// What the group's processes used so far.
    pub fn usage(&self) -> BuildUsage {
        let wall_time = self.made.elapsed();
        let number = |path: PathBuf| read(&path).ok().and_then(|t| t.trim().parse::<u64>().ok());
        match &self.layout {
            Layout::V2(dir) => {
                let events = read(&dir.join("memory.events")).unwrap_or_default();
                let stat = read(&dir.join("cpu.stat")).unwrap_or_default();
                BuildUsage {
                    peak_memory: number(dir.join("memory.peak")),
                    cpu_time: Duration::from_micros(keyed(&stat, "usage_usec").unwrap_or(0)),
                    wall_time,
                    oom_killed: keyed(&events, "oom_kill").is_some_and(|n| n > 0),
                }
            }
            Layout::V1 { memory, cpuacct } => {
                let oom = read(&memory.join("memory.oom_control")).unwrap_or_default();
                BuildUsage {
                    peak_memory: number(memory.join("memory.max_usage_in_bytes")),
                    cpu_time: Duration::from_nanos(
                        number(cpuacct.join("cpuacct.usage")).unwrap_or(0),
                    ),
                    wall_time,
                    oom_killed: keyed(&oom, "oom_kill").is_some_and(|n| n > 0),
                }
            }
        }
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
        for dir in self.layout.dirs() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    #[test]
    fn mounts_and_own_groups_are_read_as_the_kernel_writes_them() {
        let mountinfo =
            "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n\
                         35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                         22 1 0:21 / /proc rw - proc proc rw\n";
        let mounts = cgroup_mounts(mountinfo);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1].1, "rw,memory");
        assert_eq!(mounts[2].0, "cgroup2");
        let proc_cgroup = "4:memory:/process_api/c38\n2:cpuacct:/\n0::/user.slice\n";
        assert_eq!(
            own_group(proc_cgroup, "memory").as_deref(),
            Some("process_api/c38")
        );
        assert_eq!(own_group(proc_cgroup, "cpuacct").as_deref(), Some(""));
        assert_eq!(own_group(proc_cgroup, "").as_deref(), Some("user.slice"));
        assert_eq!(
            keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"),
            Some(2)
        );
    }

    /// A shell moved into `group` that then allocates about `bytes` (a line of that many
    /// zero bytes held whole by `tail -n 1`); its exit status.
    fn build_in(group: &BuildCgroup, bytes: u64) -> std::process::ExitStatus {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "read go; /usr/bin/head -c {bytes} /dev/zero | /usr/bin/tail -n 1 > /dev/null"
            ))
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        group.enter(child.id()).unwrap();
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        child.wait().unwrap()
    }

    #[test]
    fn a_build_group_measures_its_processes_and_its_limit_kills_them() {
        let Ok(cgroups) = BuildCgroups::detect() else {
            // Not root, or no hierarchy mounted: the worker runs builds without groups then.
            assert!(
                !rustix::process::geteuid().is_root() || !Path::new("/proc/self/cgroup").exists()
            );
            return;
        };
        // Under the limit: measured, not killed.
        let roomy = cgroups.start("aaaa-roomy.drv", Some(256 * MIB)).unwrap();
        assert!(build_in(&roomy, 64 * MIB).success());
        let used = roomy.usage();
        assert!(!used.oom_killed, "{used:?}");
        assert!(used.cpu_time > Duration::ZERO, "{used:?}");
        if let Some(peak) = used.peak_memory {
            assert!(peak >= 60 * MIB, "{used:?}");
        }
        // The same allocation over a smaller limit: killed, and the group says why.
        let tight = cgroups.start("aaaa-tight.drv", Some(32 * MIB)).unwrap();
        // Making it removed none of the live groups: the first, empty now, still counts.
        assert_eq!(roomy.usage().cpu_time, used.cpu_time);
        assert!(!build_in(&tight, 64 * MIB).success());
        assert!(tight.usage().oom_killed, "{:?}", tight.usage());
    }
}
