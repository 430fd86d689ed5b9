//! The part of a path's closure a fetch must add, as other stores claim it: bounded in paths
//! and bytes (a peer may claim anything), checked for reference cycles (Nix's store graph has
//! none but self-references) and put in dependency order, without recursion however deep the
//! claimed references go.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use nixspace_nix_formats::store_path::StorePath;
use nixspace_protocol::store;

/// How much of a closure a store takes from other stores' claims in one fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosureLimits {
    /// Paths missing here, the fetched path included.
    pub paths: usize,
    /// Bytes of their claimed path-infos (paths, references, hashes, derivers, content
    /// addresses, signatures).
    pub info_bytes: usize,
}

impl Default for ClosureLimits {
    /// 100,000 paths (a large system's closure is a few thousand), 256 MiB of path-infos.
    fn default() -> ClosureLimits {
        ClosureLimits {
            paths: 100_000,
            info_bytes: 256 << 20,
        }
    }
}

/// A claim past a [`ClosureLimits`] bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "its closure is larger than this store takes from other stores' claims \
     (at most {} paths and {} bytes of path-infos)",
    .0.paths,
    .0.info_bytes
)]
pub struct ClosureTooLarge(pub ClosureLimits);

/// The missing paths of a closure with the references each is claimed with (its
/// self-reference left out), counted against limits as they are added.
pub(crate) struct Claimed {
    limits: ClosureLimits,
    bytes: usize,
    references: HashMap<StorePath, BTreeSet<StorePath>>,
}

impl Claimed {
    /// Nothing claimed yet.
    pub(crate) fn new(limits: ClosureLimits) -> Claimed {
        Claimed {
            limits,
            bytes: 0,
            references: HashMap::new(),
        }
    }

    /// Whether `path` is claimed already.
    pub(crate) fn contains(&self, path: &StorePath) -> bool {
        self.references.contains_key(path)
    }

    /// Whether `more` further paths stay within the limits.
    pub(crate) fn room_for(&self, more: usize) -> Result<(), ClosureTooLarge> {
        if self.references.len().saturating_add(more) > self.limits.paths {
            return Err(ClosureTooLarge(self.limits));
        }
        Ok(())
    }

    /// Count `path`, claimed as `wire` with `references`; its other references are returned
    /// (those not claimed yet may be missing too).
    pub(crate) fn add(
        &mut self,
        path: &StorePath,
        printed: &str,
        wire: &store::PathInfo,
        references: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, ClosureTooLarge> {
        self.room_for(1)?;
        let size = printed.len()
            + wire.nar_hash.len()
            + wire.deriver.len()
            + wire.ca.len()
            + wire.references.iter().map(String::len).sum::<usize>()
            + wire.signatures.iter().map(String::len).sum::<usize>();
        self.bytes = self.bytes.saturating_add(size);
        if self.bytes > self.limits.info_bytes {
            return Err(ClosureTooLarge(self.limits));
        }
        let others: BTreeSet<StorePath> =
            references.iter().filter(|r| *r != path).cloned().collect();
        self.references.insert(path.clone(), others.clone());
        Ok(others)
    }

    /// The claimed paths, each after the claimed paths it refers to; or, if their references
    /// form a cycle, one such cycle (each path refers to the next, the last to the first).
    pub(crate) fn dependency_order(&self) -> Result<Vec<StorePath>, Vec<StorePath>> {
        // Kahn's algorithm: a path is ready once every claimed path it refers to is placed.
        let mut waiting_on: HashMap<&StorePath, usize> = HashMap::new();
        let mut referrers: HashMap<&StorePath, Vec<&StorePath>> = HashMap::new();
        for (path, references) in &self.references {
            let claimed: Vec<&StorePath> = references.iter().filter(|r| self.contains(r)).collect();
            waiting_on.insert(path, claimed.len());
            for reference in claimed {
                referrers.entry(reference).or_default().push(path);
            }
        }
        let mut ready: VecDeque<&StorePath> = waiting_on
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(p, _)| *p)
            .collect();
        let mut order = Vec::with_capacity(self.references.len());
        while let Some(path) = ready.pop_front() {
            order.push(path.clone());
            for referrer in referrers.get(path).into_iter().flatten() {
                if let Some(n) = waiting_on.get_mut(referrer) {
                    *n -= 1;
                    if *n == 0 {
                        ready.push_back(referrer);
                    }
                }
            }
        }
        if order.len() == self.references.len() {
            return Ok(order);
        }
        // Every path left refers to another path left: walk until one comes back.
        let left: HashSet<&StorePath> = waiting_on
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(p, _)| *p)
            .collect();
        let mut walk: Vec<&StorePath> = Vec::new();
        let mut seen: HashMap<&StorePath, usize> = HashMap::new();
        let mut at = left.iter().copied().min();
        while let Some(path) = at {
            if let Some(start) = seen.get(path) {
                return Err(walk[*start..].iter().map(|p| (*p).clone()).collect());
            }
            seen.insert(path, walk.len());
            walk.push(path);
            at = self.references[path].iter().find(|r| left.contains(r));
        }
        Err(walk.into_iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixspace_nix_formats::hash::Hash;
    use nixspace_nix_formats::store_path::StoreDir;

    fn path(i: usize) -> StorePath {
        let digest = Hash::sha256(i.to_string());
        StorePath::new(
            digest.as_bytes()[..20].try_into().unwrap(),
            &format!("p{i}"),
        )
        .unwrap()
    }

    /// Claims of `edges[i]` as path `i`'s references.
    fn claimed(edges: &[&[usize]], limits: ClosureLimits) -> Result<Claimed, ClosureTooLarge> {
        let mut claimed = Claimed::new(limits);
        for (i, references) in edges.iter().enumerate() {
            let references: BTreeSet<StorePath> = references.iter().map(|r| path(*r)).collect();
            let wire = store::PathInfo {
                nar_hash: String::new(),
                nar_size: 0.into(),
                references: references
                    .iter()
                    .map(|r| StoreDir::default().print(r))
                    .collect(),
                deriver: String::new(),
                ca: String::new(),
                signatures: Vec::new(),
            };
            claimed.add(
                &path(i),
                &StoreDir::default().print(&path(i)),
                &wire,
                &references,
            )?;
        }
        Ok(claimed)
    }

    #[test]
    fn references_come_first_and_self_references_are_no_cycle() {
        let claimed = claimed(&[&[0, 1, 2], &[2], &[2]], ClosureLimits::default()).unwrap();
        assert_eq!(
            claimed.dependency_order().unwrap(),
            [path(2), path(1), path(0)]
        );
    }

    #[test]
    fn a_cycle_is_named() {
        let claimed = claimed(&[&[1], &[2], &[0], &[0]], ClosureLimits::default()).unwrap();
        let mut cycle = claimed.dependency_order().unwrap_err();
        cycle.sort();
        let mut expected = vec![path(0), path(1), path(2)];
        expected.sort();
        assert_eq!(cycle, expected);
    }

    #[test]
    fn a_chain_of_100000_is_ordered_without_recursion() {
        let order = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(|| {
                let edges: Vec<[usize; 1]> = (0..100_000).map(|i| [i + 1]).collect();
                let edges: Vec<&[usize]> = edges.iter().map(|e| &e[..]).collect();
                claimed(&edges, ClosureLimits::default())
                    .unwrap()
                    .dependency_order()
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(order.first(), Some(&path(99_999)));
        assert_eq!(order.last(), Some(&path(0)));
    }

    #[test]
    fn claims_past_the_limits_are_refused() {
        let few = ClosureLimits {
            paths: 2,
            info_bytes: 1 << 20,
        };
        assert!(claimed(&[&[1], &[2], &[]], few).is_err());
        let small = ClosureLimits {
            paths: 10,
            info_bytes: 100,
        };
        assert!(claimed(&[&[1], &[2], &[]], small).is_err());
        assert!(claimed(&[&[1], &[2], &[]], ClosureLimits::default()).is_ok());
    }
}
