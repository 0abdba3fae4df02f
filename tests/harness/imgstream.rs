//! Running the `imgstream` binary under test: locating it, capturing its output, and refusing
//! any run that panicked.

use crate::tools::{self, Output};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// Where the binary is: `$IMGSTREAM_BIN`, else `<target>/debug/imgstream` where `<target>` is
/// `$CARGO_TARGET_DIR` (relative to the workspace if relative) or `<workspace>/target`.
pub fn resolve_binary(
    imgstream_bin: Option<OsString>,
    cargo_target_dir: Option<OsString>,
    workspace: &Path,
) -> PathBuf {
    if let Some(bin) = imgstream_bin.filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let target = match cargo_target_dir.filter(|d| !d.is_empty()) {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    target.join("debug").join("imgstream")
}

/// The workspace root: the parent of this package's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The binary under test, or an error telling how to build it.
pub fn binary() -> Result<PathBuf> {
    let bin = resolve_binary(
        std::env::var_os("IMGSTREAM_BIN"),
        std::env::var_os("CARGO_TARGET_DIR"),
        &workspace_root(),
    );
    if !bin.is_file() {
        bail!(
            "imgstream binary not found at {}: run `cargo build` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// Fails if a run of imgstream panicked or was killed: both are bugs whatever the input.
pub fn ensure_no_panic(out: &Output) -> Result<()> {
    if out.stderr.contains("panicked") {
        bail!("{} panicked:\n{}", out.command, out.describe());
    }
    if out.code.is_none() {
        bail!(
            "{} was killed by a signal:\n{}",
            out.command,
            out.describe()
        );
    }
    Ok(())
}

/// Runs `imgstream ARGS`; the result is an error if it panicked, whatever the exit code.
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Result<Output> {
    let out = tools::run(&binary()?, args)?;
    ensure_no_panic(&out)?;
    Ok(out)
}

/// Runs `imgstream ARGS` and requires exit code 0.
pub fn run_ok<S: AsRef<OsStr>>(args: &[S]) -> Result<Output> {
    run(args)?.ensure_success()
}

/// Runs `imgstream ARGS`, requires exit code 0 and parses stdout as JSON.
pub fn run_json<S: AsRef<OsStr>>(args: &[S]) -> Result<Value> {
    let out = run_ok(args)?;
    serde_json::from_str(&out.stdout)
        .with_context(|| format!("{} printed invalid JSON:\n{}", out.command, out.describe()))
}

/// `imgstream io FILE` in stdin mode: holds the image open until closed.
pub struct IoSession {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl IoSession {
    /// Starts `imgstream io [-f FMT] FILE` and returns once it has answered `read 0 512`, which
    /// proves the image is open. (A read is used rather than `flush`, whose qemu-io form
    /// prints nothing.)
    pub fn open(file: &Path, fmt: &str) -> Result<Self> {
        let mut child = Command::new(binary()?)
            .args(["io", "-f", fmt])
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start imgstream io")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("imgstream io stdout")?);
        let mut session = IoSession {
            child,
            stdin,
            stdout,
        };
        session.command_until("read 0 512", "read 512/512 bytes at offset 0")?;
        Ok(session)
    }

    /// Sends one command and reads lines until one contains `answer`.
    pub fn command_until(&mut self, command: &str, answer: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("session already closed")?;
        writeln!(stdin, "{command}").context("imgstream io closed its stdin")?;
        stdin.flush()?;
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line)? == 0 {
                bail!("imgstream io ended before answering `{command}`; it printed:\n{seen}");
            }
            seen.push_str(&line);
            if line.contains(answer) {
                return Ok(());
            }
        }
    }

    /// Closes stdin (end of commands) and requires a clean exit.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("imgstream io exited with {status} at end of input");
        }
        Ok(())
    }
}

impl Drop for IoSession {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imgstream_bin_overrides_the_target_directory() {
        let ws = Path::new("/ws");
        let bin = resolve_binary(Some("/opt/imgstream".into()), Some("/t".into()), ws);
        assert_eq!(bin, Path::new("/opt/imgstream"));
    }

    #[test]
    fn cargo_target_dir_is_honoured_and_relative_to_the_workspace() {
        let ws = Path::new("/ws");
        assert_eq!(
            resolve_binary(None, Some("/t".into()), ws),
            Path::new("/t/debug/imgstream")
        );
        assert_eq!(
            resolve_binary(None, Some("out".into()), ws),
            Path::new("/ws/out/debug/imgstream")
        );
        assert_eq!(
            resolve_binary(None, None, ws),
            Path::new("/ws/target/debug/imgstream")
        );
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }

    #[test]
    fn panics_in_stderr_are_reported_as_failures() {
        let out = tools::run(
            Path::new("/bin/sh"),
            &[
                "-c",
                "echo \"thread 'main' panicked at src/x.rs\" >&2; exit 101",
            ],
        )
        .unwrap();
        let msg = ensure_no_panic(&out).unwrap_err().to_string();
        assert!(msg.contains("panicked"), "{msg}");
    }
}
