//! What this machine offers its builds: its memory, read from `/proc/meminfo`.

/// The machine's total memory in bytes (`MemTotal` of `/proc/meminfo`), if it can be read.
pub fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    mem_total(&text)
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes (the kernel writes it in KiB).
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_read_in_kib() {
        let text = "MemTotal:       24596868 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(text), Some(24596868 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots\n"), None);
        assert!(total_memory().is_some_and(|m| m > 0));
    }
}
