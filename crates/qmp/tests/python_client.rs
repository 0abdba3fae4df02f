//! Drives a whole stream with QEMU's own Python QMP library (`qemu.qmp`, from PyPI): the
//! proof that a client written for QEMU works unchanged. Then checks the image with
//! qemu-img: no backing file left, and consistent.

mod common;

use common::{daemon_for, make_chain, serve, BaseKind};
use std::process::Command;
use std::time::Duration;

const CLIENT: &str = r#"
import asyncio, sys
from qemu.qmp import EventListener, QMPClient

async def main(path):
    qmp = QMPClient('imgstream-test')
    await qmp.connect(path)
    listener = EventListener()
    with qmp.listen(listener):
        await qmp.execute('block-stream', {'device': 'top', 'job-id': 'py'})
        async def completed():
            async for event in listener:
                if event['event'] == 'BLOCK_JOB_COMPLETED':
                    return event
        event = await asyncio.wait_for(completed(), 60)
    assert event['data']['device'] == 'py', event
    assert 'error' not in event['data'], event
    assert event['data']['offset'] == event['data']['len'] == 64 << 20, event
    for _ in range(100):
        jobs = await qmp.execute('query-block-jobs')
        if jobs == []:
            break
        await asyncio.sleep(0.05)
    assert jobs == [], jobs
    await qmp.disconnect()
    print('python client: stream completed')

asyncio.run(main(sys.argv[1]))
"#;

fn qemu_qmp_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_python_library_streams_an_image() {
    assert!(
        qemu_qmp_installed(),
        "QEMU's Python QMP library is missing: run `pip install qemu.qmp` first"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    make_chain(dir.path(), BaseKind::Qcow2);
    let daemon = daemon_for(dir.path());
    let (path, stop, handle) = serve(&daemon, dir.path()).await;
    let output = tokio::process::Command::new("python3")
        .args(["-c", CLIENT])
        .arg(&path)
        .output()
        .await
        .expect("run python3");
    assert!(
        output.status.success(),
        "python client failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = stop.send(());
    let _ = handle.await;
    drop(daemon);

    let top = dir.path().join("top.qcow2");
    // The job thread lets go of the image right after `null`; retry until its lock is gone.
    let mut check = None;
    for _ in 0..100 {
        let out = Command::new("qemu-img")
            .arg("check")
            .arg(&top)
            .output()
            .expect("qemu-img check");
        if out.status.success() {
            check = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let check = check.expect("qemu-img check passes");
    assert!(String::from_utf8_lossy(&check.stdout).contains("No errors were found"));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&top)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info json");
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_eq!(info["virtual-size"], 64 << 20);
}
