//! Finding the external programs the tests need and running them with captured output.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Finds `program` on `PATH`; a missing tool is an error naming the Debian package to install,
/// never a reason to skip a test.
pub fn require(program: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    bail!("`{program}` not found in PATH: install the `{package}` package (apt-get install -y {package})")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// What a finished process left behind.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for error messages.
    pub command: String,
    /// Exit code; `None` when the process was killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Fails with the command line, exit code and both streams unless the process exited 0.
    pub fn ensure_success(self) -> Result<Self> {
        if !self.success() {
            bail!("{} failed:\n{}", self.command, self.describe());
        }
        Ok(self)
    }

    /// Exit code and both streams, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `program` with `args` to completion with stdin closed, capturing stdout and stderr.
pub fn run<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> Result<Output> {
    let command = command_line(program, args);
    let out = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot start {command}"))?;
    Ok(Output {
        command,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A printable shell-like command line.
pub fn command_line<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> String {
    let mut line = program.display().to_string();
    for arg in args {
        let arg = arg.as_ref().to_string_lossy();
        if arg.is_empty() || arg.contains([' ', '\'', '"']) {
            line.push_str(&format!(" '{}'", arg.replace('\'', "'\\''")));
        } else {
            line.push(' ');
            line.push_str(&arg);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_error_names_the_package_to_install() {
        let err = require("imgstream-no-such-tool", "some-package").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("imgstream-no-such-tool"), "{msg}");
        assert!(msg.contains("apt-get install -y some-package"), "{msg}");
    }

    #[test]
    fn present_tool_is_found_on_path() {
        let sh = require("sh", "dash").unwrap();
        assert!(sh.is_absolute());
    }

    #[test]
    fn failed_command_reports_exit_code_and_stderr() {
        let out = run(Path::new("/bin/sh"), &["-c", "echo oops >&2; exit 3"]).unwrap();
        assert_eq!(out.code, Some(3));
        let msg = out.ensure_success().unwrap_err().to_string();
        assert!(msg.contains("oops") && msg.contains("Some(3)"), "{msg}");
    }
}
