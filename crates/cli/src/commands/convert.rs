//! `imgstream convert -O raw`: the guest-visible content of an image as a raw file.

use anyhow::{bail, Context, Result};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Bytes read per step.
const CHUNK: u64 = 4 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format; only raw.
    #[arg(short = 'O', default_value = "raw")]
    output_format: String,
    #[arg(short = 'U', long)]
    force_share: bool,
    source: PathBuf,
    destination: PathBuf,
}

pub fn run(args: Args) -> Result<u8> {
    if args.output_format != "raw" {
        bail!("Only raw output is supported (-O raw)");
    }
    let disk = super::open_disk(
        &args.source,
        args.format.as_deref(),
        false,
        args.force_share,
        false,
    )?;
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&args.destination)
        .with_context(|| format!("Could not create '{}'", args.destination.display()))?;
    let size = disk.size();
    let mut buffer = vec![0u8; CHUNK as usize];
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(CHUNK) as usize;
        disk.read(offset, &mut buffer[..n])?;
        // Leave all-zero chunks as holes: the output is sparse like qemu-img's.
        if buffer[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buffer[..n], offset)?;
        }
        offset += n as u64;
    }
    out.set_len(size)?;
    out.sync_all()?;
    Ok(0)
}
