//! Package names as Nix's `parseDrvName` reads them: a derivation's name without its version.

/// The name `full` without its version, as Nix's `parseDrvName` splits it: the version starts
/// after the first `-` that is followed by a character other than an ASCII letter
/// (`hello-2.12` → `hello`, `gtk+-3.24` → `gtk+`, `python3.11-numpy-1.26` →
/// `python3.11-numpy`); a name without one is all name.
pub fn package_name(full: &str) -> &str {
    let bytes = full.as_bytes();
    bytes
        .windows(2)
        .position(|pair| pair[0] == b'-' && !pair[1].is_ascii_alphabetic())
        .map_or(full, |at| &full[..at])
}

/// The name of the derivation at `drv_path` (`/nix/store/<hash>-<name>.drv`) without its
/// version (see [`package_name`]), or `None` if the path does not look like a derivation's.
pub fn package_of_drv_path(drv_path: &str) -> Option<&str> {
    let base = drv_path.rsplit('/').next()?;
    let (_hash, name) = base.split_once('-')?;
    Some(package_name(name.strip_suffix(".drv")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_starts_at_the_first_dash_before_a_non_letter() {
        for (full, name) in [
            ("hello-2.12.1", "hello"),
            ("gtk+-3.24.38", "gtk+"),
            ("python3.11-numpy-1.26.4", "python3.11-numpy"),
            ("nix-prefetch-git", "nix-prefetch-git"),
            ("foo-bar-unstable-2024-01-01", "foo-bar-unstable"),
            ("trailing-", "trailing-"),
            ("x-1", "x"),
            ("", ""),
        ] {
            assert_eq!(package_name(full), name, "{full}");
        }
    }

    #[test]
    fn a_derivation_path_gives_its_package() {
        assert_eq!(
            package_of_drv_path("/nix/store/00000000000000000000000000000000-hello-2.12.drv"),
            Some("hello")
        );
        assert_eq!(package_of_drv_path("/nix/store/abc-hello-2.12"), None);
    }
}
