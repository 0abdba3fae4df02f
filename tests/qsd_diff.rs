//! The differential harness: each scenario runs against `qemu-storage-daemon` and against
//! `imgstream serve`, started with the same arguments and driven by the same QMP commands;
//! replies, events, guest I/O and the final images must agree (see `harness/qsd.rs` for what
//! is normalised, and `docs/qmp.md` for the differences that remain).

#[path = "harness/qsd.rs"]
mod qsd;

use anyhow::Result;
use qsd::{
    compare, compare_startup_error, create, hide_progress, node_summary, write, Scenario, Step,
};
use serde_json::{json, Value};
use std::path::Path;

const QCOW2: &str = "qcow2";
/// The last event of a job: waiting for it keeps `quit` from racing the job's end.
const JOB_GONE: &str = "\"status\":\"null\"";

/// base.qcow2 <- mid.qcow2 <- top.qcow2, 4 MiB, each layer with its own data.
fn chain3(dir: &Path) -> Result<()> {
    create(dir, "base.qcow2", QCOW2, "4M", None)?;
    create(dir, "mid.qcow2", QCOW2, "4M", Some(("base.qcow2", QCOW2)))?;
    create(dir, "top.qcow2", QCOW2, "4M", Some(("mid.qcow2", QCOW2)))?;
    write(dir, "base.qcow2", QCOW2, 0x11, "0", "1M")?;
    write(dir, "base.qcow2", QCOW2, 0x22, "2M", "1M")?;
    write(dir, "mid.qcow2", QCOW2, 0x33, "1M", "1M")?;
    write(dir, "top.qcow2", QCOW2, 0x44, "3M", "512k")?;
    Ok(())
}

/// One image, no backing file.
fn single(dir: &Path) -> Result<()> {
    create(dir, "disk.qcow2", QCOW2, "4M", None)?;
    write(dir, "disk.qcow2", QCOW2, 0x5a, "0", "1M")
}

fn cmd(execute: &str, arguments: Value) -> Step {
    Step::Qmp(json!({"execute": execute, "arguments": arguments}))
}

fn query(execute: &str) -> Step {
    Step::Qmp(json!({"execute": execute}))
}

fn nodes() -> Step {
    Step::QmpProject(
        json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
        node_summary,
    )
}

fn jobs() -> Step {
    Step::QmpProject(json!({"execute": "query-block-jobs"}), hide_progress)
}

/// `blockdev-add` of a file node and a qcow2 node over it; `backing` as given (absent when
/// `None`).
fn add_qcow2(name: &str, file: &str, backing: Option<Value>) -> Vec<Step> {
    let mut format = json!({"driver": "qcow2", "node-name": name, "file": format!("{name}-file")});
    if let Some(backing) = backing {
        format["backing"] = backing;
    }
    vec![
        cmd(
            "blockdev-add",
            json!({"driver": "file", "node-name": format!("{name}-file"),
                   "filename": format!("$DIR/{file}")}),
        ),
        cmd("blockdev-add", format),
    ]
}

/// The whole chain added at run time, as QSD users name every node.
fn add_chain3() -> Vec<Step> {
    let mut steps = add_qcow2("base", "base.qcow2", Some(Value::Null));
    steps.extend(add_qcow2("mid", "mid.qcow2", Some(json!("base"))));
    steps.extend(add_qcow2("top", "top.qcow2", Some(json!("mid"))));
    steps
}

/// The same chain on the command line.
fn chain3_args() -> Vec<String> {
    let mut args = Vec::new();
    for (name, backing) in [("base", "null"), ("mid", "base"), ("top", "mid")] {
        args.push("--blockdev".into());
        args.push(format!(
            "driver=file,filename=$DIR/{name}.qcow2,node-name={name}-file"
        ));
        args.push("--blockdev".into());
        let backing = if backing == "null" {
            // keyval has no null: the JSON form says it.
            String::new()
        } else {
            format!(",backing={backing}")
        };
        args.push(format!(
            "driver=qcow2,file={name}-file,node-name={name}{backing}"
        ));
    }
    // base has no backing file, so leaving `backing` out opens the same chain.
    args
}

fn nbd_start() -> Step {
    cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "$DIR/nbd.sock"}}}),
    )
}

fn chain_images() -> Vec<(&'static str, &'static str)> {
    vec![
        ("top.qcow2", QCOW2),
        ("mid.qcow2", QCOW2),
        ("base.qcow2", QCOW2),
    ]
}

fn scenario(
    name: &'static str,
    setup: fn(&Path) -> Result<()>,
    args: Vec<String>,
    steps: Vec<Step>,
    images: Vec<(&'static str, &'static str)>,
) -> Scenario {
    Scenario {
        name,
        setup,
        args,
        steps,
        images,
    }
}

#[test]
fn runtime_nodes_are_listed_as_qsd_lists_them() -> Result<()> {
    let mut steps = add_chain3();
    steps.push(nodes());
    steps.push(query("query-block"));
    compare(&scenario(
        "runtime_nodes",
        chain3,
        vec![],
        steps,
        chain_images(),
    ))
}

#[test]
fn command_line_nodes_are_listed_as_qsd_lists_them() -> Result<()> {
    compare(&scenario(
        "command_line_nodes",
        chain3,
        chain3_args(),
        vec![nodes()],
        chain_images(),
    ))
}

#[test]
fn blockdev_add_errors_match() -> Result<()> {
    let steps = vec![
        cmd(
            "blockdev-add",
            json!({"driver": "nosuch", "node-name": "x"}),
        ),
        cmd("blockdev-add", json!({"node-name": "x"})),
        cmd("blockdev-add", json!({"driver": "file", "node-name": "x"})),
        cmd(
            "blockdev-add",
            json!({"driver": "file", "filename": "$DIR/disk.qcow2"}),
        ),
        cmd(
            "blockdev-add",
            json!({"driver": "file", "filename": "$DIR/nonexistent", "node-name": "x"}),
        ),
        cmd(
            "blockdev-add",
            json!({"driver": "file", "filename": "$DIR/disk.qcow2", "node-name": "f", "read-only": "on"}),
        ),
        cmd(
            "blockdev-add",
            json!({"driver": "file", "filename": "$DIR/disk.qcow2", "node-name": "f"}),
        ),
        cmd(
            "blockdev-add",
            json!({"driver": "file", "filename": "$DIR/disk.qcow2", "node-name": "f"}),
        ),
        cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "file": "nosuch", "node-name": "d"}),
        ),
        cmd("blockdev-add", json!({"driver": "qcow2", "node-name": "d"})),
        cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "file": "f", "node-name": "d", "bogus": 1}),
        ),
        nodes(),
    ];
    compare(&scenario(
        "blockdev_add_errors",
        single,
        vec![],
        steps,
        vec![("disk.qcow2", QCOW2)],
    ))
}

#[test]
fn blockdev_del_refuses_nodes_in_use() -> Result<()> {
    let mut steps = add_chain3();
    steps.extend([
        cmd("blockdev-del", json!({"node-name": "mid"})),
        cmd("blockdev-del", json!({"node-name": "top-file"})),
        cmd("blockdev-del", json!({"node-name": "nosuch"})),
        cmd("blockdev-del", json!({"node-name": "top"})),
        cmd("blockdev-del", json!({"node-name": "top-file"})),
        cmd("blockdev-del", json!({"node-name": "mid"})),
        nodes(),
    ]);
    compare(&scenario(
        "blockdev_del",
        chain3,
        vec![],
        steps,
        chain_images(),
    ))
}

#[test]
fn nbd_server_start_and_stop_match() -> Result<()> {
    let steps = vec![
        cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk"}),
        ),
        query("nbd-server-stop"),
        nbd_start(),
        nbd_start(),
        query("nbd-server-stop"),
        query("nbd-server-stop"),
        nbd_start(),
    ];
    compare(&scenario(
        "nbd_server",
        single,
        single_args(),
        steps,
        vec![("disk.qcow2", QCOW2)],
    ))
}

fn single_args() -> Vec<String> {
    vec![
        "--blockdev".into(),
        "driver=file,filename=$DIR/disk.qcow2,node-name=disk-file".into(),
        "--blockdev".into(),
        "driver=qcow2,file=disk-file,node-name=disk".into(),
    ]
}

#[test]
fn exports_are_added_listed_and_deleted_with_an_event() -> Result<()> {
    let steps = vec![
        nbd_start(),
        cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk", "writable": true}),
        ),
        cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk"}),
        ),
        cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "nosuch"}),
        ),
        query("query-block-exports"),
        Step::GuestIo("disk", vec!["read -P 0x5a 0 1M", "write -P 0x66 2M 64k"]),
        cmd("block-export-del", json!({"id": "nosuch"})),
        cmd("block-export-del", json!({"id": "e"})),
        Step::WaitEvent("BLOCK_EXPORT_DELETED"),
        query("query-block-exports"),
        cmd("block-export-del", json!({"id": "e"})),
    ];
    compare(&scenario(
        "exports",
        single,
        single_args(),
        steps,
        vec![("disk.qcow2", QCOW2)],
    ))
}

#[test]
fn command_line_export_serves_guest_io() -> Result<()> {
    let mut args = single_args();
    args.extend([
        "--nbd-server".into(),
        "addr.type=unix,addr.path=$DIR/nbd.sock".into(),
        "--export".into(),
        "type=nbd,id=export,node-name=disk,name=vda,writable=on".into(),
    ]);
    let steps = vec![
        query("query-block-exports"),
        Step::GuestIo(
            "vda",
            vec![
                "read -P 0x5a 0 1M",
                "write -P 0x77 1M 1M",
                "read -P 0 2M 2M",
            ],
        ),
        query("nbd-server-stop"),
        Step::WaitEvent("BLOCK_EXPORT_DELETED"),
        query("query-block-exports"),
    ];
    compare(&scenario(
        "command_line_export",
        single,
        args,
        steps,
        vec![("disk.qcow2", QCOW2)],
    ))
}

#[test]
fn stream_into_a_runtime_node_without_base() -> Result<()> {
    let mut steps = add_chain3();
    steps.extend([
        cmd("block-stream", json!({"job-id": "s", "device": "top"})),
        Step::WaitEvent(JOB_GONE),
        nodes(),
    ]);
    compare(&scenario(
        "stream_no_base",
        chain3,
        vec![],
        steps,
        chain_images(),
    ))
}

#[test]
fn stream_with_base_node_added_at_run_time() -> Result<()> {
    let mut steps = add_chain3();
    steps.extend([
        cmd(
            "block-stream",
            json!({"job-id": "s", "device": "top", "base-node": "base"}),
        ),
        Step::WaitEvent(JOB_GONE),
        nodes(),
    ]);
    compare(&scenario(
        "stream_base_node",
        chain3,
        vec![],
        steps,
        chain_images(),
    ))
}

#[test]
fn stream_with_guest_io_over_nbd() -> Result<()> {
    let mut steps = vec![nbd_start()];
    steps.push(cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "top", "writable": true}),
    ));
    steps.extend([
        cmd(
            "block-stream",
            json!({"job-id": "s", "device": "top", "base-node": "base", "speed": 1}),
        ),
        Step::GuestIo(
            "top",
            vec![
                "write -P 0x99 1M 64k",
                "read -P 0x11 0 64k",
                "read -P 0x99 1M 64k",
            ],
        ),
        cmd("block-job-set-speed", json!({"device": "s", "speed": 0})),
        Step::WaitEvent(JOB_GONE),
        Step::GuestIo(
            "top",
            vec!["read -P 0x33 1088k 64k", "read -P 0x44 3M 512k"],
        ),
    ]);
    compare(&scenario(
        "stream_guest_io",
        chain3,
        chain3_args(),
        steps,
        chain_images(),
    ))
}

#[test]
fn stream_pause_and_resume() -> Result<()> {
    let steps = vec![
        cmd(
            "block-stream",
            json!({"job-id": "s", "device": "top", "speed": 1}),
        ),
        cmd("block-job-pause", json!({"device": "s"})),
        Step::WaitEvent("\"status\":\"paused\""),
        jobs(),
        cmd("block-job-resume", json!({"device": "s"})),
        cmd("block-job-set-speed", json!({"device": "s", "speed": 0})),
        Step::WaitEvent(JOB_GONE),
        jobs(),
    ];
    compare(&scenario(
        "stream_pause_resume",
        chain3,
        chain3_args(),
        steps,
        chain_images(),
    ))
}

#[test]
fn stream_cancel_leaves_the_chain() -> Result<()> {
    let steps = vec![
        cmd(
            "block-stream",
            json!({"job-id": "s", "device": "top", "base-node": "base", "speed": 1}),
        ),
        cmd("block-job-cancel", json!({"device": "s"})),
        Step::WaitEvent(JOB_GONE),
        jobs(),
        nodes(),
    ];
    compare(&scenario(
        "stream_cancel",
        chain3,
        chain3_args(),
        steps,
        vec![("mid.qcow2", QCOW2), ("base.qcow2", QCOW2)],
    ))
}

#[test]
fn blockdev_del_of_a_node_in_a_job_fails() -> Result<()> {
    let steps = vec![
        cmd(
            "block-stream",
            json!({"job-id": "s", "device": "top", "speed": 1}),
        ),
        cmd("blockdev-del", json!({"node-name": "top"})),
        cmd("block-job-cancel", json!({"device": "s"})),
        Step::WaitEvent(JOB_GONE),
    ];
    compare(&scenario(
        "del_in_job",
        chain3,
        chain3_args(),
        steps,
        vec![("base.qcow2", QCOW2)],
    ))
}

#[test]
fn blockdev_del_of_an_exported_node_fails() -> Result<()> {
    let steps = vec![
        nbd_start(),
        cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "top"}),
        ),
        cmd("blockdev-del", json!({"node-name": "top"})),
        cmd("block-export-del", json!({"id": "e", "mode": "hard"})),
        Step::WaitEvent("BLOCK_EXPORT_DELETED"),
        cmd("blockdev-del", json!({"node-name": "top"})),
        nodes(),
    ];
    compare(&scenario(
        "del_exported",
        chain3,
        chain3_args(),
        steps,
        chain_images(),
    ))
}

#[test]
fn absent_backing_opens_the_recorded_chain() -> Result<()> {
    let mut steps = add_qcow2("top", "top.qcow2", None);
    steps.extend([
        cmd("block-stream", json!({"job-id": "s", "device": "top"})),
        Step::WaitEvent(JOB_GONE),
        nodes(),
    ]);
    compare(&scenario(
        "absent_backing",
        chain3,
        vec![],
        steps,
        chain_images(),
    ))
}

#[test]
fn null_backing_opens_the_top_alone() -> Result<()> {
    let mut steps = add_qcow2("top", "top.qcow2", Some(Value::Null));
    steps.extend([
        nodes(),
        cmd("block-stream", json!({"job-id": "s", "device": "top"})),
    ]);
    compare(&scenario(
        "null_backing",
        chain3,
        vec![],
        steps,
        chain_images(),
    ))
}

#[test]
fn stream_errors_on_runtime_nodes_match() -> Result<()> {
    let mut steps = add_chain3();
    steps.extend([
        cmd("block-stream", json!({"job-id": "s", "device": "nosuch"})),
        cmd(
            "block-stream",
            json!({"job-id": "s", "device": "mid", "base-node": "top"}),
        ),
        cmd(
            "block-stream",
            json!({"job-id": "s", "device": "top", "base-node": "nosuch"}),
        ),
        cmd(
            "block-stream",
            json!({"job-id": "s", "device": "top", "base-node": "top"}),
        ),
    ]);
    compare(&scenario(
        "stream_errors",
        chain3,
        vec![],
        steps,
        chain_images(),
    ))
}

#[test]
fn json_blockdev_and_inline_file_child() -> Result<()> {
    let args = vec![
        "--blockdev".into(),
        r#"{"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"$DIR/top.qcow2"}}"#.into(),
    ];
    let steps = vec![
        nodes(),
        cmd("block-stream", json!({"job-id": "s", "device": "top"})),
        Step::WaitEvent(JOB_GONE),
    ];
    compare(&scenario(
        "json_inline_file",
        chain3,
        args,
        steps,
        chain_images(),
    ))
}

#[test]
fn startup_errors_match_qsd_messages_and_exit_code() -> Result<()> {
    let file = "driver=file,filename=$DIR/disk.qcow2,node-name=f";
    for args in [
        vec!["--bogus"],
        vec!["--blockdev"],
        vec!["--blockdev", "driver=nosuch"],
        vec!["--blockdev", "driver=file"],
        vec!["--blockdev", "driver=file,filename=$DIR/nonexistent"],
        vec![
            "--blockdev",
            "driver=file,filename=$DIR/x,node-name=f,bogus=1",
        ],
        vec!["--blockdev", r#"{"driver":"file"}"#],
        vec!["--blockdev", "driver=qcow2,file=nosuch,node-name=q"],
        vec!["--export", "type=nbd,id=e,node-name=x"],
        vec!["--nbd-server", "addr.type=unix"],
        vec!["--blockdev", file, "--export", "type=nbd,id=e,node-name=f"],
        vec!["--monitor", "chardev=nosuch"],
        // QSD applies its options in command-line order.
        vec![
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
            "--export",
            "type=nbd,id=e,node-name=f",
            "--blockdev",
            file,
        ],
        vec![
            "--monitor=chardev=m",
            "--chardev",
            "socket,id=m,path=$DIR/m.sock,server=on,wait=off",
        ],
    ] {
        compare_startup_error(&args)?;
    }
    Ok(())
}

/// qemu-storage-daemon's documentation: "Export raw image file disk.img over NBD UNIX domain
/// socket nbd.sock", and the same for a qcow2 image (its file node and qcow2 node as in the
/// documentation's qcow2 example), served to `qemu-io` and `nbdinfo`.
#[test]
fn documentation_examples_serve_qemu_io_and_nbdinfo() -> Result<()> {
    fn raw(dir: &Path) -> Result<()> {
        create(dir, "disk.img", "raw", "4M", None)?;
        write(dir, "disk.img", "raw", 0x3c, "0", "64k")
    }
    let raw_args = [
        "--blockdev",
        "driver=file,node-name=disk,filename=disk.img",
        "--nbd-server",
        "addr.type=unix,addr.path=nbd.sock",
        "--export",
        "type=nbd,id=export,node-name=disk,writable=on",
    ];
    compare(&scenario(
        "documentation_raw",
        raw,
        raw_args.iter().map(|a| a.to_string()).collect(),
        vec![
            Step::NbdInfo("disk"),
            Step::GuestIo("disk", vec!["read -P 0x3c 0 64k", "write -P 0x4d 1M 64k"]),
        ],
        vec![("disk.img", "raw")],
    ))?;
    let qcow2_args = [
        "--blockdev",
        "driver=file,node-name=file,filename=disk.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=qcow2,file=file",
        "--nbd-server",
        "addr.type=unix,addr.path=nbd.sock",
        "--export",
        "type=nbd,id=export,node-name=qcow2,writable=on",
    ];
    compare(&scenario(
        "documentation_qcow2",
        single,
        qcow2_args.iter().map(|a| a.to_string()).collect(),
        vec![
            Step::NbdInfo("qcow2"),
            Step::GuestIo("qcow2", vec!["read -P 0x5a 0 1M", "write -P 0x4d 2M 64k"]),
            query("query-block-exports"),
        ],
        vec![("disk.qcow2", QCOW2)],
    ))
}

/// base.qed <- top.qed, and a raw image beside them.
fn qed_and_raw(dir: &Path) -> Result<()> {
    create(dir, "base.qed", "qed", "4M", None)?;
    create(dir, "top.qed", "qed", "4M", Some(("base.qed", "qed")))?;
    write(dir, "base.qed", "qed", 0x21, "0", "1M")?;
    write(dir, "top.qed", "qed", 0x42, "2M", "64k")?;
    create(dir, "plain.img", "raw", "1M", None)?;
    write(dir, "plain.img", "raw", 0x17, "0", "4k")
}

#[test]
fn qed_and_raw_nodes_at_run_time() -> Result<()> {
    let file = |name: &str, path: &str| {
        cmd(
            "blockdev-add",
            json!({"driver": "file", "node-name": name, "filename": format!("$DIR/{path}")}),
        )
    };
    let steps = vec![
        file("base-file", "base.qed"),
        cmd(
            "blockdev-add",
            json!({"driver": "qed", "node-name": "base", "file": "base-file", "backing": null}),
        ),
        file("top-file", "top.qed"),
        cmd(
            "blockdev-add",
            json!({"driver": "qed", "node-name": "top", "file": "top-file", "backing": "base"}),
        ),
        cmd(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "plain", "file": {"driver": "file", "filename": "$DIR/plain.img"}}),
        ),
        cmd(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "bad", "file": "top-file", "backing": "base"}),
        ),
        nodes(),
        nbd_start(),
        cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "p", "node-name": "plain"}),
        ),
        Step::GuestIo("plain", vec!["read -P 0x17 0 4k", "write -P 1 8k 4k"]),
        cmd("block-stream", json!({"job-id": "s", "device": "top"})),
        Step::WaitEvent(JOB_GONE),
        nodes(),
    ];
    compare(&scenario(
        "qed_and_raw",
        qed_and_raw,
        vec![],
        steps,
        vec![
            ("top.qed", "qed"),
            ("base.qed", "qed"),
            ("plain.img", "raw"),
        ],
    ))
}

#[test]
fn daemonize_returns_once_the_daemon_listens() -> Result<()> {
    for daemon in [qsd::Daemon::Qsd, qsd::Daemon::Imgstream] {
        qsd::daemonized_session(daemon)?;
    }
    Ok(())
}

#[test]
fn export_del_safe_mode_waits_for_clients_hard_mode_does_not() -> Result<()> {
    let steps = vec![
        nbd_start(),
        cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk", "writable": true}),
        ),
        Step::Connect("disk"),
        cmd("block-export-del", json!({"id": "e"})),
        cmd("block-export-del", json!({"id": "e", "mode": "safe"})),
        query("query-block-exports"),
        Step::Disconnect,
        cmd("block-export-del", json!({"id": "e"})),
        Step::WaitEvent("\"id\":\"e\""),
        cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "disk", "writable": true}),
        ),
        Step::Connect("disk"),
        Step::ClientRead,
        cmd("block-export-del", json!({"id": "e2", "mode": "hard"})),
        Step::WaitEvent("\"id\":\"e2\""),
        // The server closed the client's connection.
        Step::ClientRead,
        Step::Disconnect,
        query("query-block-exports"),
    ];
    compare(&scenario(
        "export_del_modes",
        single,
        single_args(),
        steps,
        vec![("disk.qcow2", QCOW2)],
    ))
}

#[test]
fn file_options_and_read_only_nodes() -> Result<()> {
    let args = vec![
        "--blockdev".to_string(),
        "driver=file,filename=$DIR/top.qcow2,aio=threads,locking=off,auto-read-only=on,node-name=top-file".to_string(),
        "--blockdev".to_string(),
        "driver=qcow2,file=top-file,read-only=on,node-name=top".to_string(),
    ];
    let steps = vec![
        nodes(),
        nbd_start(),
        cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "top", "writable": true}),
        ),
        cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "top"}),
        ),
        Step::GuestIo("top", vec!["read -P 0x44 3M 512k"]),
        cmd(
            "blockdev-add",
            json!({"driver": "file", "node-name": "f2", "filename": "$DIR/mid.qcow2", "aio": "bogus"}),
        ),
        cmd(
            "blockdev-add",
            json!({"driver": "file", "node-name": "f2", "filename": "$DIR/mid.qcow2", "locking": "maybe"}),
        ),
    ];
    compare(&scenario(
        "file_options",
        chain3,
        args,
        steps,
        chain_images(),
    ))
}
