//! `imgstream info`: what an image is, in the field names of `qemu-img info --output=json`.

use super::Output;
use crate::size::human_size;
use anyhow::Result;
use imgstream_block::{FormatKind, FormatSpecific, Layer};
use serde_json::{json, Map, Value};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short = 'f')]
    format: Option<String>,
    /// Describe every image of the backing chain, top first.
    #[arg(long)]
    backing_chain: bool,
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Inspect an image another process is writing (takes no lock), like qemu-img -U.
    #[arg(short = 'U', long)]
    force_share: bool,
    file: PathBuf,
}

pub fn run(args: Args) -> Result<u8> {
    let disk = super::open_disk(
        &args.file,
        args.format.as_deref(),
        false,
        args.force_share,
        !args.backing_chain,
    )?;
    let layers = disk.layers();
    let described: Vec<Value> = layers
        .iter()
        .take(if args.backing_chain { layers.len() } else { 1 })
        .map(|layer| describe(layer))
        .collect::<Result<_>>()?;
    match args.output {
        Output::Json if args.backing_chain => {
            println!("{}", serde_json::to_string_pretty(&described)?)
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(&described[0])?),
        Output::Human => {
            for (i, info) in described.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_human(info);
            }
        }
    }
    Ok(0)
}

/// One image's description as `qemu-img info --output=json` names the fields.
pub fn describe(layer: &Layer) -> Result<Value> {
    let image = &layer.image;
    let mut info = Map::new();
    info.insert("filename".into(), json!(layer.path.to_string_lossy()));
    info.insert("format".into(), json!(layer.format.name()));
    info.insert("virtual-size".into(), json!(image.virtual_size()));
    let actual = std::fs::metadata(&layer.path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    info.insert("actual-size".into(), json!(actual));
    if layer.format != FormatKind::Raw {
        info.insert("cluster-size".into(), json!(image.cluster_size()));
    }
    if let Some(backing) = image.backing() {
        let full = imgstream_block::chain::resolve_backing(&layer.path, &backing.name)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| backing.name.clone());
        info.insert("backing-filename".into(), json!(backing.name));
        info.insert("full-backing-filename".into(), json!(full));
        if let Some(format) = backing.format {
            info.insert("backing-filename-format".into(), json!(format));
        }
    }
    info.insert("dirty-flag".into(), json!(false));
    match image.format_specific() {
        FormatSpecific::Qcow2 {
            compat,
            compression_type,
            lazy_refcounts,
            refcount_bits,
            corrupt,
            extended_l2,
        } => {
            let mut data = Map::new();
            data.insert("compat".into(), json!(compat));
            if compat != "0.10" {
                data.insert("compression-type".into(), json!(compression_type));
                data.insert("lazy-refcounts".into(), json!(lazy_refcounts));
            } else {
                data.insert("compression-type".into(), json!(compression_type));
            }
            data.insert("refcount-bits".into(), json!(refcount_bits));
            if compat != "0.10" {
                data.insert("corrupt".into(), json!(corrupt));
                data.insert("extended-l2".into(), json!(extended_l2));
            }
            info.insert(
                "format-specific".into(),
                json!({"type": "qcow2", "data": Value::Object(data)}),
            );
        }
        FormatSpecific::Qed | FormatSpecific::Raw => {}
    }
    Ok(Value::Object(info))
}

fn print_human(info: &Value) {
    let text = |key: &str| info.get(key).and_then(Value::as_str).unwrap_or("");
    let number = |key: &str| info.get(key).and_then(Value::as_u64).unwrap_or(0);
    println!("image: {}", text("filename"));
    println!("file format: {}", text("format"));
    println!(
        "virtual size: {} ({} bytes)",
        human_size(number("virtual-size")),
        number("virtual-size")
    );
    println!("disk size: {}", human_size(number("actual-size")));
    if info.get("cluster-size").is_some() {
        println!("cluster_size: {}", number("cluster-size"));
    }
    if info.get("backing-filename").is_some() {
        let name = text("backing-filename");
        let full = text("full-backing-filename");
        if name == full {
            println!("backing file: {name}");
        } else {
            println!("backing file: {name} (actual path: {full})");
        }
        if info.get("backing-filename-format").is_some() {
            println!("backing file format: {}", text("backing-filename-format"));
        }
    }
    if let Some(data) = info
        .pointer("/format-specific/data")
        .and_then(Value::as_object)
    {
        println!("Format specific information:");
        for (key, value) in data {
            let shown = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("    {}: {shown}", key.replace('-', " "));
        }
    }
}
