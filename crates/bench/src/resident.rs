//! A process's resident memory as the kernel counts it (`/proc/PID/status`): now, and its
//! peak since the last reset.

use crate::error::BenchError;

/// The process whose memory is read: this one, or a child by its process id.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Process {
    /// This process.
    Own,
    /// Another process (a child started by the benchmark).
    Id(u32),
}

impl Process {
    fn proc_dir(self) -> String {
        match self {
            Process::Own => "/proc/self".to_owned(),
            Process::Id(pid) => format!("/proc/{pid}"),
        }
    }

    /// Reset the kernel's record of the process's peak resident set to its current size and
    /// return that size, in bytes.
    pub(crate) fn resident_peak_reset(self) -> Result<u64, BenchError> {
        // "5" resets the peak resident set size (VmHWM) to the current one.
        let clear = format!("{}/clear_refs", self.proc_dir());
        std::fs::write(&clear, "5").map_err(|source| BenchError::Doing {
            what: format!("cannot reset the peak resident set ({clear})"),
            source,
        })?;
        self.status_kib("VmRSS:").map(|k| k * 1024)
    }

    /// The peak resident set since the last reset, in bytes.
    pub(crate) fn peak_resident(self) -> Result<u64, BenchError> {
        self.status_kib("VmHWM:").map(|k| k * 1024)
    }

    fn status_kib(self, field: &'static str) -> Result<u64, BenchError> {
        let status = std::fs::read_to_string(format!("{}/status", self.proc_dir()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or(BenchError::ProcStatus(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_resident_set_grows_with_an_allocation() {
        let base = Process::Own.resident_peak_reset().unwrap();
        // Filled with ones, so every page is touched; kept opaque, so it is not optimised out.
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        let peak = Process::Own.peak_resident().unwrap();
        assert!(peak >= base + (60 << 20), "{base} → {peak}");
        drop(std::hint::black_box(block));
    }
}
