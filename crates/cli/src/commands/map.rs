//! `imgstream map`: where each guest range is defined, as `qemu-img map` prints it.

use super::Output;
use anyhow::Result;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short = 'f')]
    format: Option<String>,
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
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
        false,
    )?;
    let runs = disk.map_all()?;
    match args.output {
        Output::Json => {
            // Byte-for-byte the layout qemu-img prints, so text diffs work too.
            let lines: Vec<String> = runs
                .iter()
                .map(|r| {
                    let offset = r
                        .offset
                        .map(|o| format!(", \"offset\": {o}"))
                        .unwrap_or_default();
                    format!(
                        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}{offset}}}",
                        r.start, r.length, r.depth, r.present, r.zero, r.data, r.compressed
                    )
                })
                .collect();
            println!("[{}]", lines.join(",\n"));
        }
        Output::Human => {
            let layers = disk.layers();
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for run in runs.iter().filter(|r| r.data && r.offset.is_some()) {
                let file = layers
                    .get(run.depth)
                    .map(|l| l.recorded_name.clone())
                    .unwrap_or_default();
                println!(
                    "{:<16}{:<16}{:<16}{file}",
                    c_hex(run.start),
                    c_hex(run.length),
                    c_hex(run.offset.unwrap_or(0))
                );
            }
        }
    }
    Ok(0)
}

/// Hexadecimal as C's `%#x` prints it: `0` for zero, `0x...` otherwise.
fn c_hex(value: u64) -> String {
    if value == 0 {
        "0".to_string()
    } else {
        format!("{value:#x}")
    }
}
