//! `imgstream io`: guest I/O commands on an image, in the style of qemu-io (read/write with
//! patterns, zeroes, discard, flush), from `-c` arguments or one per line on stdin.

use crate::size::parse_size;
use anyhow::{bail, Context, Result};
use imgstream_block::Disk;
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short = 'f')]
    format: Option<String>,
    /// Open read-only.
    #[arg(short = 'r')]
    read_only: bool,
    /// Commands to run; without any, commands are read from stdin, one per line.
    #[arg(short = 'c')]
    commands: Vec<String>,
    file: PathBuf,
}

pub fn run(args: Args) -> Result<u8> {
    let disk = super::open_disk(
        &args.file,
        args.format.as_deref(),
        !args.read_only,
        false,
        false,
    )?;
    let mut failed = false;
    if args.commands.is_empty() {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let line = line?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if line == "quit" || line == "q" {
                break;
            }
            failed |= !execute(&disk, line);
            std::io::stdout().flush()?;
        }
    } else {
        for command in &args.commands {
            failed |= !execute(&disk, command);
        }
    }
    disk.flush()?;
    Ok(if failed { 1 } else { 0 })
}

/// Runs one command, printing its result; false if it failed.
fn execute(disk: &Disk, command: &str) -> bool {
    match run_command(disk, command) {
        Ok(message) => {
            println!("{message}");
            true
        }
        Err(error) => {
            println!("{error:#}");
            false
        }
    }
}

fn run_command(disk: &Disk, command: &str) -> Result<String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let Some((&verb, rest)) = words.split_first() else {
        bail!("empty command");
    };
    let mut pattern = None;
    let mut zeroes = false;
    let mut positional = Vec::new();
    let mut iter = rest.iter();
    while let Some(&word) = iter.next() {
        match word {
            "-P" => {
                let value = iter.next().context("-P needs a pattern")?;
                pattern = Some(parse_pattern(value)?);
            }
            "-z" => zeroes = true,
            "-u" | "-q" => {}
            other => positional.push(parse_size(other)?),
        }
    }
    let range = || -> Result<(u64, u64)> {
        match positional.as_slice() {
            [offset, length] => Ok((*offset, *length)),
            _ => bail!("{verb}: expected OFFSET LENGTH"),
        }
    };
    match verb {
        "read" => {
            let (offset, length) = range()?;
            let mut buffer = vec![0u8; length as usize];
            disk.read(offset, &mut buffer)?;
            if let Some(pattern) = pattern {
                if let Some(bad) = buffer.iter().position(|&b| b != pattern) {
                    bail!(
                        "Pattern verification failed at offset {}, {length} bytes",
                        offset + bad as u64
                    );
                }
            }
            Ok(format!("read {length}/{length} bytes at offset {offset}"))
        }
        "write" if zeroes => {
            let (offset, length) = range()?;
            disk.write_zeroes(offset, length, false)?;
            Ok(format!("wrote {length}/{length} bytes at offset {offset}"))
        }
        "write" => {
            let (offset, length) = range()?;
            let buffer = vec![pattern.unwrap_or(0xcd); length as usize];
            disk.write(offset, &buffer, false)?;
            Ok(format!("wrote {length}/{length} bytes at offset {offset}"))
        }
        "discard" => {
            let (offset, length) = range()?;
            disk.discard(offset, length)?;
            Ok(format!(
                "discard {length}/{length} bytes at offset {offset}"
            ))
        }
        "flush" => {
            disk.flush()?;
            Ok("flush done".to_string())
        }
        other => bail!("{other}: unknown command (read, write, discard, flush, quit)"),
    }
}

fn parse_pattern(text: &str) -> Result<u8> {
    let value = if let Some(hex) = text.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        text.parse()
    }
    .with_context(|| format!("Invalid pattern '{text}'"))?;
    u8::try_from(value).with_context(|| format!("Pattern '{text}' does not fit in a byte"))
}
