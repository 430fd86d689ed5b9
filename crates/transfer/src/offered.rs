//! Text files a store offers to the dataspace from memory, without holding them in its Nix
//! store: a frontend's resolved derivations, whose references (the inputs' outputs) are in the
//! stores of the workers that built them, not in the frontend's. Each is served as a one-file
//! NAR with a `text:sha256:…` content address, so a store that fetches it checks it against
//! its path and takes it without signatures, as it takes any content-addressed path.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use nixspace_nix_formats::nar::{NarError, NarWriter};
use nixspace_nix_formats::store_path::{ContentAddress, StoreDir, StorePath, StorePathError};
use nixspace_nix_formats::Hash;
use nixspace_protocol::store;
use tokio::io::AsyncWriteExt;

use crate::nar_stream::NarSender;
use crate::source::{BoxFuture, PathSource, SourceError};

/// Why a text could not be offered.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    /// Its path could not be computed (a name no store path may have).
    #[error("cannot offer {name}: {source}")]
    Path {
        /// The name asked for.
        name: String,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// Its NAR could not be written.
    #[error("cannot offer {name}: {source}")]
    Nar {
        /// The name asked for.
        name: String,
        /// Why.
        #[source]
        source: NarError,
    },
}

/// One offered path: what it is registered with, and its NAR.
struct OfferedPath {
    info: store::PathInfo,
    nar: Arc<Vec<u8>>,
}

/// The texts a store offers from memory, by printed path. Each stays offered until the
/// store is dropped: a build offers at most one per step it resolves.
#[derive(Default)]
pub(crate) struct Offered {
    paths: Mutex<BTreeMap<String, OfferedPath>>,
}

impl Offered {
    /// Offer `text` as the store path `name` with `references` would be added with
    /// `AddTextToStore`; returns that path.
    pub(crate) fn text(
        &self,
        store_dir: &StoreDir,
        name: &str,
        text: &[u8],
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, OfferError> {
        let hash = Hash::sha256(text);
        let path = store_dir
            .make_text_path(name, &hash, references)
            .map_err(|source| OfferError::Path {
                name: name.to_owned(),
                source,
            })?;
        let nar_error = |source| OfferError::Nar {
            name: name.to_owned(),
            source,
        };
        let mut writer = NarWriter::new(Vec::new()).map_err(nar_error)?;
        writer
            .regular(false, text.len() as u64, &mut &text[..])
            .map_err(nar_error)?;
        let (nar, summary) = writer.finish().map_err(nar_error)?;
        let info = store::PathInfo {
            nar_hash: summary.sha256.to_prefixed_base16(),
            nar_size: (summary.size as i64).into(),
            references: references.iter().map(|r| store_dir.print(r)).collect(),
            deriver: String::new(),
            ca: ContentAddress::Text(hash).to_string(),
            signatures: Vec::new(),
        };
        if let Ok(mut paths) = self.paths.lock() {
            paths.insert(
                store_dir.print(&path),
                OfferedPath {
                    info,
                    nar: Arc::new(nar),
                },
            );
        }
        Ok(path)
    }

    /// What `path` (printed) is offered with, and its NAR, if it is offered.
    fn get(&self, path: &str) -> Option<(store::PathInfo, Arc<Vec<u8>>)> {
        let paths = self.paths.lock().ok()?;
        let offered = paths.get(path)?;
        Some((offered.info.clone(), Arc::clone(&offered.nar)))
    }
}

/// A store's source with its offered texts first.
pub(crate) struct WithOffered {
    /// The texts offered from memory.
    pub(crate) offered: Arc<Offered>,
    /// The store itself.
    pub(crate) store: Arc<dyn PathSource>,
}

impl PathSource for WithOffered {
    fn path_info<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Option<store::PathInfo>> {
        match self.offered.get(path) {
            Some((info, _)) => Box::pin(async move { Some(info) }),
            None => self.store.path_info(path),
        }
    }

    fn write_nar<'a>(
        &'a self,
        path: &'a str,
        out: &'a mut NarSender,
    ) -> BoxFuture<'a, Result<u64, SourceError>> {
        match self.offered.get(path) {
            Some((_, nar)) => Box::pin(async move {
                out.write_all(&nar).await.map_err(SourceError::Stream)?;
                Ok(nar.len() as u64)
            }),
            None => self.store.write_nar(path, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offered_text_has_the_path_and_address_add_text_to_store_gives_it() {
        let store_dir = StoreDir::default();
        let reference = store_dir
            .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-input")
            .unwrap();
        let references = BTreeSet::from([reference]);
        let offered = Offered::default();
        let text = b"Derive([])";
        let path = offered
            .text(&store_dir, "x.drv", text, &references)
            .unwrap();
        let hash = Hash::sha256(text);
        assert_eq!(
            path,
            store_dir
                .make_text_path("x.drv", &hash, &references)
                .unwrap()
        );
        let (info, nar) = offered.get(&store_dir.print(&path)).unwrap();
        assert_eq!(info.ca, format!("text:{hash}"));
        assert_eq!(
            info.references,
            vec!["/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-input".to_owned()]
        );
        assert_eq!(info.nar_hash, Hash::sha256(&nar[..]).to_prefixed_base16());
        // Nothing else is offered.
        assert!(offered.get("/nix/store/other").is_none());
    }
}
