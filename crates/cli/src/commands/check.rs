//! `imgstream check`: metadata consistency, with qemu-img check's report and exit codes
//! (0 clean, 2 corruptions, 3 leaked clusters only, 63 format without checks).

use super::Output;
use anyhow::Result;
use imgstream_block::{ErrorKind, RepairMode};
use serde_json::{json, Map, Value};
use std::path::PathBuf;

/// qemu-img check's exit codes.
const EXIT_CORRUPT: u8 = 2;
const EXIT_LEAKS: u8 = 3;
const EXIT_UNSUPPORTED: u8 = 63;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short = 'f')]
    format: Option<String>,
    /// Repair: `leaks` frees leaked clusters, `all` also fixes wrong refcounts.
    #[arg(short = 'r')]
    repair: Option<String>,
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    #[arg(short = 'U', long)]
    force_share: bool,
    #[arg(short = 'q')]
    quiet: bool,
    file: PathBuf,
}

pub fn run(args: Args) -> Result<u8> {
    let repair = match args.repair.as_deref() {
        None => RepairMode::None,
        Some("leaks") => RepairMode::Leaks,
        Some("all") => RepairMode::All,
        Some(other) => anyhow::bail!("Unknown repair mode '{other}' (leaks or all)"),
    };
    let disk = super::open_disk(
        &args.file,
        args.format.as_deref(),
        repair != RepairMode::None,
        args.force_share && repair == RepairMode::None,
        true,
    )?;
    let layer = disk.layers().remove(0);
    let report = match layer.image.check(repair) {
        Ok(report) => report,
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            if !args.quiet {
                eprintln!("qemu-img: This image format does not support checks");
            }
            return Ok(EXIT_UNSUPPORTED);
        }
        Err(e) => return Err(e.into()),
    };
    let code = if report.corruptions > 0 {
        EXIT_CORRUPT
    } else if report.leaks > 0 {
        EXIT_LEAKS
    } else {
        0
    };
    match args.output {
        Output::Json => {
            let mut out = Map::new();
            if let Some(end) = report.image_end_offset {
                out.insert("image-end-offset".into(), json!(end));
            }
            out.insert("total-clusters".into(), json!(report.total_clusters));
            out.insert("check-errors".into(), json!(0));
            for (key, value) in [
                ("leaks", report.leaks),
                ("corruptions", report.corruptions),
                ("leaks-fixed", report.leaks_fixed),
                ("corruptions-fixed", report.corruptions_fixed),
                ("fragmented-clusters", report.fragmented_clusters),
                ("compressed-clusters", report.compressed_clusters),
            ] {
                if value > 0 {
                    out.insert(key.into(), json!(value));
                }
            }
            out.insert(
                "allocated-clusters".into(),
                json!(report.allocated_clusters),
            );
            out.insert("filename".into(), json!(args.file.to_string_lossy()));
            out.insert("format".into(), json!(layer.format.name()));
            println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
        }
        Output::Human if !args.quiet => {
            for message in &report.messages {
                eprintln!("{message}");
            }
            if report.leaks_fixed + report.corruptions_fixed > 0 {
                println!(
                    "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n",
                    report.leaks_fixed, report.corruptions_fixed
                );
            }
            if report.corruptions > 0 {
                println!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                    report.corruptions
                );
            }
            if report.leaks > 0 {
                println!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                    report.leaks
                );
            }
            if report.corruptions == 0 && report.leaks == 0 {
                println!("No errors were found on the image.");
            }
            let total = report.total_clusters.max(1) as f64;
            println!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                report.allocated_clusters,
                report.total_clusters,
                report.allocated_clusters as f64 * 100.0 / total,
                report.fragmented_clusters as f64 * 100.0 / report.allocated_clusters.max(1) as f64,
                report.compressed_clusters as f64 * 100.0 / report.allocated_clusters.max(1) as f64,
            );
            if let Some(end) = report.image_end_offset {
                println!("Image end offset: {end}");
            }
        }
        Output::Human => {}
    }
    Ok(code)
}
