//! The derivation `BuildDerivation` carries: `nixspace-nix-formats`' [`BasicDerivation`] (a
//! derivation without its input derivations), written and read as Nix's `writeDerivation` /
//! `readDerivation` do. There is no second model: outputs travel as the three
//! [`OutputFields`] a `.drv` file holds, and builder, arguments and environment as the byte
//! strings they are (Nix does not require them to be UTF-8), so a derivation crosses the wire
//! unchanged.
//!
//! The derivation's name is not on the wire: it comes from the `.drv` path sent before it,
//! so reading takes that path ([`read_basic_derivation`]).

use std::collections::BTreeMap;

use nixspace_nix_formats::derivation::{
    BasicDerivation, DerivationError, DerivationOutput, OutputFields,
};
use nixspace_nix_formats::store_path::StorePath;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::wire::{NixReader, NixSerialize, NixWriter, WireError};

/// Reads the derivation that `BuildDerivation` sends after `drv_path`, which names it.
pub async fn read_basic_derivation<R: AsyncRead + Unpin>(
    r: &mut NixReader<R>,
    drv_path: &StorePath,
) -> Result<BasicDerivation, WireError> {
    let name = drv_path
        .derivation_name()
        .ok_or_else(|| WireError::Derivation {
            what: "drvPath",
            source: DerivationError::NotADerivationPath(drv_path.clone()),
        })?
        .to_owned();
    let n = r.read_count("outputs").await?;
    let mut outputs = BTreeMap::new();
    for _ in 0..n {
        let output = r.read_string("output name").await?;
        let fields = OutputFields {
            path: r.read_string("output path").await?,
            hash_algo: r.read_string("output hashAlgo").await?,
            hash: r.read_string("output hash").await?,
        };
        let parsed = DerivationOutput::from_fields(r.store_dir(), &name, &output, &fields)
            .map_err(|source| WireError::Derivation {
                what: "output",
                source,
            })?;
        outputs.insert(output, parsed);
    }
    Ok(BasicDerivation {
        name,
        outputs,
        input_srcs: r.read_store_path_set("inputSrcs").await?,
        system: r.read_string("platform").await?,
        builder: r.read_bytes("builder").await?,
        args: r.read_byte_strings("args").await?,
        env: r.read_byte_map("env").await?,
    })
}

impl NixSerialize for BasicDerivation {
    /// Writes the derivation without its name (the `.drv` path before it carries that).
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        w.write_u64(self.outputs.len() as u64, "outputs").await?;
        for (name, output) in &self.outputs {
            let fields = output.to_fields(w.store_dir());
            w.write_str(name, "output name").await?;
            w.write_str(&fields.path, "output path").await?;
            w.write_str(&fields.hash_algo, "output hashAlgo").await?;
            w.write_str(&fields.hash, "output hash").await?;
        }
        w.write_store_paths(&self.input_srcs, "inputSrcs").await?;
        w.write_str(&self.system, "platform").await?;
        w.write_bytes(&self.builder, "builder").await?;
        w.write_strings(&self.args, "args").await?;
        w.write_string_map(&self.env, "env").await
    }
}
