//! [`BuildMode`]: how a build request (`BuildPaths`, `BuildDerivation`, …) treats outputs
//! that already exist.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::wire::{NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};

/// How a build request treats existing outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u64)]
pub enum BuildMode {
    /// Build what is missing.
    #[default]
    Normal = 0,
    /// Rebuild and replace corrupted outputs (trusted users only).
    Repair = 1,
    /// Rebuild and compare with the existing outputs.
    Check = 2,
}

impl NixDeserialize for BuildMode {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        match r.read_u64("buildMode").await? {
            0 => Ok(Self::Normal),
            1 => Ok(Self::Repair),
            2 => Ok(Self::Check),
            value => Err(WireError::InvalidValue {
                what: "buildMode",
                value,
            }),
        }
    }
}

impl NixSerialize for BuildMode {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        w.write_u64(*self as u64, "buildMode").await
    }
}
