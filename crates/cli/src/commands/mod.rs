//! The subcommands and their arguments, in the style of `qemu-img`.

mod bench;
mod check;
mod convert;
mod create;
mod ctl;
mod demo;
mod info;
mod io;
mod map;
mod rebase;
mod serve;
mod stream;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use imgstream_block::{ChainOptions, Disk, FormatKind};
use std::path::Path;

#[derive(Debug, Parser)]
#[command(
    name = "imgstream",
    version,
    about = "Live streaming of copy-on-write VM disk images (qcow2, QED, raw)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Output styles of the inspection commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an image (like qemu-img create).
    Create(create::Args),
    /// Describe an image (like qemu-img info).
    Info(info::Args),
    /// Show where each guest range of an image is defined (like qemu-img map).
    Map(map::Args),
    /// Check an image's metadata and repair leaks or errors (like qemu-img check).
    Check(check::Args),
    /// Write the guest-visible content of an image to a raw file (like qemu-img convert -O raw).
    Convert(convert::Args),
    /// Change the backing file recorded in an image's header (like qemu-img rebase -u).
    Rebase(rebase::Args),
    /// Run guest I/O commands on an image (like qemu-io).
    Io(io::Args),
    /// Run the main job on local files: build a chain, serve it, stream it live, verify.
    Demo(demo::Args),
    /// Serve images over NBD with a QMP control socket (the storage daemon).
    Serve(serve::Args),
    /// Drive a running daemon over QMP (stream, jobs, pause, resume, cancel, watch...).
    Ctl(ctl::Args),
    /// Copy into an image what it borrows from its backing chain, then drop the chain.
    Stream(stream::Args),
    /// Measure I/O throughput on an image (like qemu-img bench).
    Bench(bench::Args),
}

/// Runs the command; the returned code is the process exit code.
pub fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Create(args) => create::run(args),
        Command::Info(args) => info::run(args),
        Command::Map(args) => map::run(args),
        Command::Check(args) => check::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Rebase(args) => rebase::run(args),
        Command::Io(args) => io::run(args),
        Command::Stream(args) => stream::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

/// Parses a `-f`/`-F` format name.
pub fn parse_format(name: &str) -> Result<FormatKind> {
    match name {
        "qcow2" => Ok(FormatKind::Qcow2),
        "qed" => Ok(FormatKind::Qed),
        "raw" => Ok(FormatKind::Raw),
        other => bail!("Unknown format '{other}' (supported: qcow2, qed, raw)"),
    }
}

/// Opens an image with its chain for inspection or I/O.
pub fn open_disk(
    path: &Path,
    format: Option<&str>,
    writable: bool,
    force_share: bool,
    no_backing: bool,
) -> Result<Disk> {
    let options = ChainOptions {
        writable,
        format: format.map(parse_format).transpose()?,
        force_share,
        no_backing,
    };
    Ok(Disk::open(path, &options)?)
}
