//! Long-running daemons under test (`imgstream serve`, `qemu-storage-daemon`): started with a
//! pid file whose appearance proves both sockets listen, always killed when the guard drops,
//! and driven over QMP with `imgstream ctl`.

use crate::imgstream;
use crate::tools::{self, Output};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// How often and how long to look for the pid file before giving up (10 s in all).
const READY_POLL: Duration = Duration::from_millis(10);
const READY_TRIES: u32 = 1000;

/// A running daemon; killed with SIGKILL on drop unless it was stopped already.
pub struct Daemon {
    child: Option<Child>,
    /// The QMP control socket.
    pub qmp: PathBuf,
    /// The NBD unix socket (when served on one).
    pub nbd: PathBuf,
    pub pid_file: PathBuf,
    stderr: PathBuf,
    what: String,
}

/// Sockets and files of one daemon, all inside `dir`, named after `tag`.
fn paths(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    (
        dir.join(format!("{tag}-qmp.sock")),
        dir.join(format!("{tag}-nbd.sock")),
        dir.join(format!("{tag}.pid")),
        dir.join(format!("{tag}.stderr")),
    )
}

impl Daemon {
    /// `imgstream serve --qmp --nbd unix: --pid-file EXTRA... NODE=IMAGE...` in `dir`.
    pub fn serve(dir: &Path, nodes: &[(&str, &Path)], extra: &[&str]) -> Result<Daemon> {
        let (qmp, nbd, pid_file, stderr) = paths(dir, "serve");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--qmp".into(),
            qmp.display().to_string(),
            "--pid-file".into(),
            pid_file.display().to_string(),
        ];
        if !extra.contains(&"--nbd") {
            args.extend(["--nbd".into(), format!("unix:{}", nbd.display())]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend(
            nodes
                .iter()
                .map(|(name, path)| format!("{name}={}", path.display())),
        );
        Daemon::start(&imgstream::binary()?, &args, qmp, nbd, pid_file, stderr)
    }

    /// qemu-storage-daemon serving a qcow2 chain the way the reference measurements did: every
    /// image a file node plus a format node, the top exported writable over NBD as `export`.
    /// `chain` is top first: (node name, path, format).
    pub fn qsd(dir: &Path, chain: &[(&str, &Path, &str)], export: &str) -> Result<Daemon> {
        Daemon::qsd_with(dir, chain, export, &[])
    }

    /// [`Daemon::qsd`] with `extra` arguments after the others (a second `--monitor`, say: a
    /// QSD monitor serves one client at a time, the next waits for it to leave).
    pub fn qsd_with(
        dir: &Path,
        chain: &[(&str, &Path, &str)],
        export: &str,
        extra: &[&str],
    ) -> Result<Daemon> {
        let program = tools::require("qemu-storage-daemon", "qemu-system-common")?;
        let (qmp, nbd, pid_file, stderr) = paths(dir, "qsd");
        let mut args: Vec<String> = Vec::new();
        for (i, (node, path, format)) in chain.iter().enumerate().rev() {
            args.push("--blockdev".into());
            args.push(format!(
                "driver=file,filename={},node-name={node}-file,aio=threads",
                path.display()
            ));
            let backing = match chain.get(i + 1) {
                Some((below, _, _)) => format!(",backing={below}"),
                None => String::new(),
            };
            args.push("--blockdev".into());
            args.push(format!(
                "driver={format},file={node}-file,node-name={node}{backing}"
            ));
        }
        args.extend([
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", nbd.display()),
            "--export".into(),
            format!("type=nbd,id=e,node-name={export},name={export},writable=on"),
            "--chardev".into(),
            format!("socket,path={},server=on,wait=off,id=m", qmp.display()),
            "--monitor".into(),
            "chardev=m".into(),
            "--pidfile".into(),
            pid_file.display().to_string(),
        ]);
        args.extend(extra.iter().map(|a| a.to_string()));
        Daemon::start(&program, &args, qmp, nbd, pid_file, stderr)
    }

    fn start(
        program: &Path,
        args: &[String],
        qmp: PathBuf,
        nbd: PathBuf,
        pid_file: PathBuf,
        stderr: PathBuf,
    ) -> Result<Daemon> {
        let what = tools::command_line(program, args);
        // A daemon killed earlier leaves its pid file: only a new one may signal readiness.
        let _ = std::fs::remove_file(&pid_file);
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let mut daemon = Daemon {
            child: Some(child),
            qmp,
            nbd,
            pid_file,
            stderr,
            what,
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    /// Waits for the pid file, which the daemon writes only once its sockets listen; fails
    /// early if the daemon exits first.
    fn wait_ready(&mut self) -> Result<()> {
        for _ in 0..READY_TRIES {
            if let Ok(text) = std::fs::read_to_string(&self.pid_file) {
                if text.ends_with('\n') {
                    return Ok(());
                }
            }
            if let Some(status) = self.child_mut()?.try_wait()? {
                bail!(
                    "{} exited with {status} before it was ready:\n{}",
                    self.what,
                    self.stderr_text()
                );
            }
            std::thread::sleep(READY_POLL);
        }
        bail!("{} never wrote its pid file", self.what)
    }

    fn child_mut(&mut self) -> Result<&mut Child> {
        self.child
            .as_mut()
            .context("the daemon was already stopped")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// What the daemon printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// `nbd+unix:///EXPORT?socket=...`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd.display())
    }

    /// `imgstream ctl QMP ARGS...` (any exit code; a panic is an error).
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["ctl".to_string(), self.qmp.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        imgstream::run(&all)
    }

    /// `imgstream ctl QMP ARGS...`, requiring success.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<Output> {
        self.ctl(args)?.ensure_success()
    }

    /// Sends one QMP command and returns its `return` value.
    pub fn qmp(&self, command: &str, arguments: Value) -> Result<Value> {
        let request = serde_json::json!({ "execute": command, "arguments": arguments });
        let out = self.ctl_ok(&["qmp", &request.to_string()])?;
        let reply: Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("ctl qmp printed invalid JSON:\n{}", out.describe()))?;
        reply
            .get("return")
            .cloned()
            .with_context(|| format!("{command}: no return in {reply}"))
    }

    /// The one block job's `query-block-jobs` entry, or `None` if there is no job.
    pub fn job(&self) -> Result<Option<Value>> {
        let jobs = self.qmp("query-block-jobs", serde_json::json!({}))?;
        let jobs = jobs.as_array().context("query-block-jobs: not a list")?;
        ensure!(jobs.len() <= 1, "several jobs: {jobs:?}");
        Ok(jobs.first().cloned())
    }

    /// Polls `query-block-jobs` (bounded) until the job has made progress, returning the entry.
    pub fn wait_for_progress(&self) -> Result<Value> {
        for _ in 0..READY_TRIES {
            let job = self
                .job()?
                .context("the job ended before it made progress")?;
            if job["offset"].as_u64().unwrap_or(0) > 0 {
                return Ok(job);
            }
            std::thread::sleep(READY_POLL);
        }
        bail!("the job made no progress")
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let kill = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()?;
        ensure!(kill.success(), "kill -{signal} {} failed", self.pid());
        Ok(())
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(self) -> Result<ExitStatus> {
        self.signal_and_wait("TERM")
    }

    /// Sends `signal` (`"TERM"`, `"INT"`...), then waits for the exit.
    pub fn signal_and_wait(mut self, signal: &str) -> Result<ExitStatus> {
        self.signal(signal)?;
        let status = self.child_mut()?.wait()?;
        self.child = None;
        Ok(status)
    }

    /// SIGTERM and requires exit code 0.
    pub fn stop(self) -> Result<()> {
        let what = self.what.clone();
        let stderr = self.stderr.clone();
        let status = self.terminate()?;
        ensure!(
            status.success(),
            "{what} exited with {status} on SIGTERM:\n{}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
        Ok(())
    }

    /// SIGKILL, as a crash: nothing is flushed by the daemon.
    pub fn crash(mut self) -> Result<()> {
        self.signal("KILL")?;
        self.child_mut()?.wait()?;
        self.child = None;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
