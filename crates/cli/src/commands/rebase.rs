//! `imgstream rebase -u`: change the backing file recorded in the header, nothing else.

use anyhow::{bail, Result};
use imgstream_block::chain::{open_layer, resolve_backing};
use imgstream_block::BackingRef;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short = 'f')]
    format: Option<String>,
    /// Only rewrite the header (the only mode supported).
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// New backing file; '' drops it.
    #[arg(short = 'b')]
    backing: String,
    /// Format of the new backing file (probed when omitted and the file exists).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    file: PathBuf,
}

pub fn run(args: Args) -> Result<u8> {
    if !args.unsafe_mode {
        bail!("Only header rebases are supported: use -u (imgstream stream copies data)");
    }
    let disk = super::open_disk(&args.file, args.format.as_deref(), true, false, true)?;
    let top = disk.layers().remove(0);
    let backing = if args.backing.is_empty() {
        None
    } else {
        let format = match &args.backing_format {
            Some(name) => Some(super::parse_format(name)?.name().to_string()),
            None => {
                let path = resolve_backing(&args.file, &args.backing)?;
                open_layer(&path, &args.backing, None, false, true)
                    .ok()
                    .map(|layer| layer.format.name().to_string())
            }
        };
        Some(BackingRef {
            name: args.backing.clone(),
            format,
        })
    };
    top.image.set_backing(backing.as_ref())?;
    Ok(0)
}
