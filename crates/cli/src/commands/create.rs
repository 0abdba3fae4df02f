//! `imgstream create`: a new empty image, optionally over a backing file.

use crate::size::parse_size;
use anyhow::{bail, Context, Result};
use imgstream_block::chain::{open_layer, resolve_backing};
use imgstream_block::BackingRef;
use imgstream_format::{create_format, CreateOptions, FileStorage};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the new image: qcow2, qed or raw.
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Backing file, recorded as given (relative names are relative to the image's folder).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Format of the backing file (probed when omitted).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Options: cluster_size=N, compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=N.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Quiet (accepted for compatibility with qemu-img; create prints nothing anyway).
    #[arg(short = 'q')]
    quiet: bool,
    file: PathBuf,
    /// Virtual size (k, M, G, T suffixes); defaults to the backing file's.
    size: Option<String>,
}

pub fn run(args: Args) -> Result<u8> {
    let _ = args.quiet;
    let kind = super::parse_format(&args.format)?;
    let mut backing = None;
    let mut backing_size = None;
    if let Some(name) = &args.backing {
        let path = resolve_backing(&args.file, name)?;
        let format = args
            .backing_format
            .as_deref()
            .map(super::parse_format)
            .transpose()?;
        let layer = open_layer(&path, name, format, false, true)
            .with_context(|| format!("Could not open backing file '{name}'"))?;
        backing_size = Some(layer.image.virtual_size());
        backing = Some(BackingRef {
            name: name.clone(),
            format: Some(layer.format.name().to_string()),
        });
    } else if args.backing_format.is_some() {
        bail!("-F needs a backing file (-b)");
    }
    let size = match (&args.size, backing_size) {
        (Some(text), _) => parse_size(text)?,
        (None, Some(size)) => size,
        (None, None) => bail!("Image size must be specified (or a backing file given)"),
    };
    let mut options = CreateOptions::new(size);
    options.backing = backing;
    for option in args.options.iter().flat_map(|o| o.split(',')) {
        let (key, value) = option
            .split_once('=')
            .with_context(|| format!("Invalid option '{option}' (expected key=value)"))?;
        match key {
            "cluster_size" => options.cluster_size = Some(parse_size(value)?),
            "compat" => {
                options.qcow2_version = Some(match value {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    other => bail!("Invalid compat value '{other}' (0.10 or 1.1)"),
                })
            }
            "lazy_refcounts" => options.lazy_refcounts = parse_switch(key, value)?,
            "refcount_bits" => options.refcount_bits = Some(value.parse()?),
            "backing_file" => bail!("Use -b for the backing file"),
            other => bail!("Invalid option '{other}' for format '{}'", args.format),
        }
    }
    let storage = FileStorage::create(&args.file)?;
    if let Err(error) = create_format(kind, &storage, &options) {
        drop(storage);
        let _ = std::fs::remove_file(&args.file);
        return Err(error.into());
    }
    Ok(0)
}

fn parse_switch(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        other => bail!("Invalid value '{other}' for {key} (on or off)"),
    }
}
