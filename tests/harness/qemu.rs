//! QEMU's own tools as oracles: `qemu-img` (create, info, map, check, compare, convert, rebase)
//! and `qemu-io` (one-shot commands, or an interactive session that holds an image open).

use crate::tools::{self, Output};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// The Debian package that ships qemu-img, qemu-io, qemu-nbd and qemu-storage-daemon.
pub const QEMU_PACKAGE: &str = "qemu-utils";

fn qemu_img_path() -> Result<PathBuf> {
    tools::require("qemu-img", QEMU_PACKAGE)
}

fn qemu_io_path() -> Result<PathBuf> {
    tools::require("qemu-io", QEMU_PACKAGE)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs `qemu-img ARGS` and returns its output whatever the exit code.
pub fn qemu_img(args: &[String]) -> Result<Output> {
    tools::run(&qemu_img_path()?, args)
}

fn parse_json(out: &Output) -> Result<Value> {
    serde_json::from_str(&out.stdout)
        .with_context(|| format!("{} printed invalid JSON:\n{}", out.command, out.describe()))
}

/// `qemu-img create -f FMT [-o OPTIONS] [-b BACKING -F BACKING_FMT] FILE [SIZE]`.
pub fn create(
    file: &Path,
    fmt: &str,
    options: Option<&str>,
    backing: Option<(&str, &str)>,
    size: Option<&str>,
) -> Result<()> {
    let mut args = vec!["create".to_string(), "-q".into(), "-f".into(), fmt.into()];
    if let Some(o) = options {
        args.extend(["-o".into(), o.into()]);
    }
    if let Some((name, bfmt)) = backing {
        args.extend(["-b".into(), name.into(), "-F".into(), bfmt.into()]);
    }
    args.push(s(file));
    if let Some(size) = size {
        args.push(size.into());
    }
    qemu_img(&args)?.ensure_success()?;
    Ok(())
}

/// `qemu-img info --output=json [-f FMT] [--backing-chain] FILE`, parsed.
pub fn info(file: &Path, fmt: Option<&str>, backing_chain: bool) -> Result<Value> {
    let mut args = vec!["info".to_string(), "--output=json".into()];
    if let Some(f) = fmt {
        args.extend(["-f".into(), f.into()]);
    }
    if backing_chain {
        args.push("--backing-chain".into());
    }
    args.push(s(file));
    parse_json(&qemu_img(&args)?.ensure_success()?)
}

/// `qemu-img map --output=json [-f FMT] FILE`, parsed: a list of
/// `{start, length, depth, present, zero, data, compressed, offset?}`.
pub fn map(file: &Path, fmt: Option<&str>) -> Result<Value> {
    let mut args = vec!["map".to_string(), "--output=json".into()];
    if let Some(f) = fmt {
        args.extend(["-f".into(), f.into()]);
    }
    args.push(s(file));
    let v = parse_json(&qemu_img(&args)?.ensure_success()?)?;
    if !v.is_array() {
        bail!("qemu-img map did not print a JSON array: {v}");
    }
    Ok(v)
}

/// Result of `qemu-img check`: its exit code (0 clean, 2 corruptions, 3 leaks only, 63 no checks
/// for this format) and its JSON report when it printed one.
#[derive(Debug, Clone)]
pub struct Check {
    pub code: i32,
    pub report: Option<Value>,
    pub output: Output,
}

/// `qemu-img check --output=json [-f FMT] [-r leaks|all] FILE`.
pub fn check(file: &Path, fmt: Option<&str>, repair: Option<&str>) -> Result<Check> {
    let mut args = vec!["check".to_string(), "--output=json".into()];
    if let Some(f) = fmt {
        args.extend(["-f".into(), f.into()]);
    }
    if let Some(r) = repair {
        args.extend(["-r".into(), r.into()]);
    }
    args.push(s(file));
    let out = qemu_img(&args)?;
    let code = out
        .code
        .with_context(|| format!("{} was killed by a signal", out.command))?;
    let report = if out.stdout.trim().is_empty() {
        None
    } else {
        Some(parse_json(&out)?)
    };
    Ok(Check {
        code,
        report,
        output: out,
    })
}

/// Fails unless `qemu-img check` finds no errors, corruptions or leaks.
pub fn check_clean(file: &Path, fmt: &str) -> Result<()> {
    let c = check(file, Some(fmt), None)?;
    if c.code != 0 {
        bail!(
            "qemu-img check of {} is not clean:\n{}",
            file.display(),
            c.output.describe()
        );
    }
    Ok(())
}

/// `qemu-img compare -f FMT_A -F FMT_B A B`: `Ok(None)` when the guest-visible contents are
/// identical, `Ok(Some(qemu's explanation))` when they differ.
pub fn compare(a: &Path, fmt_a: &str, b: &Path, fmt_b: &str) -> Result<Option<String>> {
    let args = vec![
        "compare".to_string(),
        "-f".into(),
        fmt_a.into(),
        "-F".into(),
        fmt_b.into(),
        s(a),
        s(b),
    ];
    let out = qemu_img(&args)?;
    match out.code {
        Some(0) => Ok(None),
        Some(1) => Ok(Some(out.stdout.trim().to_string())),
        _ => bail!("{} could not compare:\n{}", out.command, out.describe()),
    }
}

/// `qemu-img convert [-f FMT] -O raw FILE OUT`.
pub fn convert_to_raw(file: &Path, fmt: Option<&str>, out: &Path) -> Result<()> {
    let mut args = vec!["convert".to_string()];
    if let Some(f) = fmt {
        args.extend(["-f".into(), f.into()]);
    }
    args.extend(["-O".into(), "raw".into(), s(file), s(out)]);
    qemu_img(&args)?.ensure_success()?;
    Ok(())
}

/// `qemu-img rebase -u -f FMT -b NAME -F BFMT FILE`, or `-b ''` to drop the backing file.
pub fn rebase_unsafe(file: &Path, fmt: &str, backing: Option<(&str, &str)>) -> Result<()> {
    let mut args = vec!["rebase".to_string(), "-u".into(), "-f".into(), fmt.into()];
    match backing {
        Some((name, bfmt)) => args.extend(["-b".into(), name.into(), "-F".into(), bfmt.into()]),
        None => args.extend(["-b".into(), String::new()]),
    }
    args.push(s(file));
    qemu_img(&args)?.ensure_success()?;
    Ok(())
}

/// `qemu-io -f FMT -c CMD... FILE`; fails if it exits non-zero or reports a failed command
/// (some qemu-io versions print "... failed: ..." and still exit 0).
pub fn io(file: &Path, fmt: &str, commands: &[String]) -> Result<Output> {
    let mut args = vec!["-f".to_string(), fmt.into()];
    for c in commands {
        args.extend(["-c".into(), c.clone()]);
    }
    args.push(s(file));
    let out = tools::run(&qemu_io_path()?, &args)?.ensure_success()?;
    if out.stdout.contains("failed") || out.stderr.contains("failed") {
        bail!("{} reported a failure:\n{}", out.command, out.describe());
    }
    Ok(out)
}

/// Runs `qemu-io -f FMT -c CMD... FILE` without judging the outcome.
pub fn io_unchecked(file: &Path, fmt: &str, commands: &[&str]) -> Result<Output> {
    let mut args = vec!["-f".to_string(), fmt.into()];
    for c in commands {
        args.extend(["-c".into(), c.to_string()]);
    }
    args.push(s(file));
    tools::run(&qemu_io_path()?, &args)
}

/// An interactive `qemu-io FILE` reading commands from a pipe: while it lives, QEMU holds the
/// image open (and locked) read-write.
pub struct QemuIoSession {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl QemuIoSession {
    /// Starts qemu-io and returns once it has answered a read, which proves the image is open.
    pub fn open(file: &Path, fmt: &str) -> Result<Self> {
        let mut child = Command::new(qemu_io_path()?)
            .args(["-f", fmt])
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start qemu-io")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("qemu-io stdout")?);
        let mut session = Self {
            child,
            stdin,
            stdout,
        };
        session.command_until("read 0 512", "read 512/512 bytes at offset 0")?;
        Ok(session)
    }

    /// Sends one command and reads lines until one contains `answer`.
    pub fn command_until(&mut self, command: &str, answer: &str) -> Result<()> {
        self.command_answer(command, &[answer]).map(drop)
    }

    /// Sends one command and reads lines until one contains any of `answers`; returns it.
    pub fn command_answer(&mut self, command: &str, answers: &[&str]) -> Result<String> {
        let stdin = self
            .stdin
            .as_mut()
            .context("qemu-io session already closed")?;
        writeln!(stdin, "{command}")?;
        stdin.flush()?;
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line)? == 0 {
                bail!("qemu-io ended before answering `{command}`; it printed:\n{seen}");
            }
            seen.push_str(&line);
            if answers.iter().any(|answer| line.contains(answer)) {
                return Ok(line.trim_end().to_string());
            }
        }
    }

    /// Sends `quit`, closes stdin and waits for qemu-io to exit, releasing the image.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    /// Like [`close`](Self::close), but returns qemu-io's exit code instead of failing on
    /// a non-zero one (qemu-io exits with 1 when its NBD server closed the connection).
    pub fn close_with_code(mut self) -> Result<Option<i32>> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        Ok(self.child.wait()?.code())
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!("qemu-io session exited with {status}");
        }
        Ok(())
    }
}

impl Drop for QemuIoSession {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.shutdown();
        }
    }
}
