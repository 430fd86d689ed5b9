//! Pure implementations of Nix's data formats, as Nix 2.8 defines them.
//!
//! * [`nixbase32`]: Nix's base-32 text encoding.
//! * [`hash`]: hash algorithms and the textual forms of hashes.
//! * [`store_path`]: store directories, store paths and path computation.
//! * [`derivation`]: the `.drv` ATerm format, hashing modulo, output paths
//!   and resolution.
//! * [`nar`]: the NAR archive format (streaming writer and reader).
//! * [`narinfo`]: the `.narinfo` text format of binary caches.
//! * [`signature`]: ed25519 keys and signatures of store paths.
//! * [`drv_name`]: package names without their versions, as Nix's `parseDrvName`.
//!
//! Nothing here does I/O except through caller-supplied `std::io` readers
//! and writers (NAR) and the separate file system walker in
//! [`nar::fs`]. There is no async and no global state: the store
//! directory is always a [`store_path::StoreDir`] value.

#![warn(missing_docs)]

pub mod derivation;
pub mod drv_name;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod signature;
pub mod store_path;

pub use derivation::{
    BasicDerivation, Derivation, DerivationOutput, DrvHash, DrvHashKind, OutputFields,
};
pub use hash::{Hash, HashAlgo};
pub use narinfo::NarInfo;
pub use signature::{PublicKey, PublicKeys, SecretKey, Signature};
pub use store_path::{FileIngestionMethod, StoreDir, StorePath};
