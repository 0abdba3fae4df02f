//! Helpers the block layer's integration tests share: running the QEMU tools that build and
//! check their fixtures.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs a QEMU tool and fails the test with its output unless it exits 0; returns its stdout.
pub fn run_ok(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("'{tool}' is required by this test (qemu-utils): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Creates `top`, a qcow2 overlay of the qcow2 image `base`, with `qemu-img create`.
pub fn create_overlay(base: &Path, top: &Path) {
    create_qcow2_overlay(base, "qcow2", top, &[]);
}

/// Creates `top`, a qcow2 overlay of `base` (in `base_format`), with `qemu-img create` and
/// `extra` arguments (`-o compat=0.10`, say).
pub fn create_qcow2_overlay(base: &Path, base_format: &str, top: &Path, extra: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.extend(["-b", s(base), "-F", base_format, s(top)]);
    run_ok("qemu-img", &args);
}

/// A temporary path as the `&str` the tools' arguments need.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}
