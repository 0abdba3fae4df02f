//! QED driver against QEMU as the oracle: images made by `qemu-img` map and read like
//! `qemu-img map` says, images we write pass `qemu-img check` and read back in `qemu-io`, and a
//! power cut at any point of a flush leaves an image both checkers accept.

use imgstream_format::qed::{self, Qed};
use imgstream_format::recording::{Operation, RecordingStorage};
use imgstream_format::{
    BackingRef, CreateOptions, Extent, FileStorage, ImageFormat, Mapping, OpenOptions, RepairMode,
};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Weak};

mod common;
use common::{on_another_thread, Guest, Model, RacingChange, RacingStorage};

const RW: OpenOptions = OpenOptions { writable: true };
const RO: OpenOptions = OpenOptions { writable: false };
const MIB: u64 = 1 << 20;

/// Runs a QEMU tool; these tests need it, so its absence is a failure, not a skip.
fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("'{tool}' is required by the QED interop tests (install qemu-utils): {e}")
    })
}

/// Runs a QEMU tool and fails the test, showing its output, unless it exits 0.
fn run_ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

fn open(path: &Path, options: OpenOptions) -> Qed {
    let storage = FileStorage::open(path, options.writable).unwrap();
    Qed::open(Arc::new(storage), options).unwrap()
}

/// `qemu-img check` must find no corruption; leaks are reported separately.
fn assert_qemu_check_clean(path: &Path, leaks_allowed: bool) {
    let out = run("qemu-img", &["check", "-f", "qed", path_str(path)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => {}
        Some(3) if leaks_allowed => {}
        code => panic!(
            "qemu-img check of {} exited {code:?}:\n{text}",
            path.display()
        ),
    }
}

/// Checks guest ranges with `qemu-io -c 'read -P pattern offset length'`.
fn assert_qemu_reads(path: &Path, reads: &[(u64, u64, u8)]) {
    for chunk in reads.chunks(200) {
        let mut args = vec!["-f".to_string(), "qed".into()];
        for (offset, length, pattern) in chunk {
            args.push("-c".into());
            args.push(format!("read -P 0x{pattern:02x} {offset} {length}"));
        }
        args.push(path_str(path).into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_ok("qemu-io", &args);
        assert!(
            !out.contains("Pattern verification failed"),
            "qemu-io read back wrong data:\n{out}"
        );
    }
}

/// One record of `qemu-img map --output=json`.
#[derive(Debug)]
struct QemuExtent {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
    zero: bool,
    data: bool,
    offset: Option<u64>,
}

/// Parses the flat JSON array `qemu-img map` prints, one object per line.
fn qemu_map(path: &Path) -> Vec<QemuExtent> {
    let out = run_ok(
        "qemu-img",
        &["map", "--output=json", "-f", "qed", path_str(path)],
    );
    let field = |object: &str, key: &str| -> Option<String> {
        let at = object.find(&format!("\"{key}\":"))? + key.len() + 3;
        let rest = &object[at..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim().to_string())
    };
    out.split('{')
        .filter(|object| object.contains("\"start\""))
        .map(|object| {
            let number = |key| field(object, key).unwrap().parse::<u64>().unwrap();
            let flag = |key| field(object, key).unwrap() == "true";
            QemuExtent {
                start: number("start"),
                length: number("length"),
                depth: number("depth"),
                present: flag("present"),
                zero: flag("zero"),
                data: flag("data"),
                offset: field(object, "offset").map(|o| o.parse().unwrap()),
            }
        })
        .collect()
}

/// What QEMU's extent says about the top layer at `guest` (`depth > 0` is the backing file).
fn qemu_mapping(extent: &QemuExtent, guest: u64) -> Mapping {
    if extent.depth > 0 || !extent.present {
        Mapping::Unallocated
    } else if extent.data {
        Mapping::Data {
            host_offset: extent.offset.expect("data extents have an offset") + guest - extent.start,
            in_place: true,
        }
    } else {
        assert!(extent.zero, "present extents are data or zero: {extent:?}");
        Mapping::Zero { host_offset: None }
    }
}

/// Walks our `map` over the whole disk and compares it with `qemu-img map`, byte for byte.
fn assert_map_agrees_with_qemu(qed: &Qed, path: &Path) {
    let extents = qemu_map(path);
    assert_eq!(
        extents.iter().map(|e| e.length).sum::<u64>(),
        qed.virtual_size(),
        "qemu-img map does not cover the disk: {extents:?}"
    );
    for extent in &extents {
        let mut guest = extent.start;
        while guest < extent.start + extent.length {
            let ours: Extent = qed
                .map(guest, extent.start + extent.length - guest)
                .unwrap();
            assert_eq!(
                ours.mapping,
                qemu_mapping(extent, guest),
                "at guest offset {guest}: qemu-img map says {extent:?}"
            );
            guest += ours.length;
        }
    }
}

/// The host offset of the guest byte at `guest`, which must be mapped to data.
fn host_offset(qed: &Qed, guest: u64) -> u64 {
    match qed.map(guest, 1).unwrap().mapping {
        Mapping::Data { host_offset, .. } => host_offset,
        other => panic!("guest offset {guest} maps to {other:?}, expected data"),
    }
}

fn read_host(qed: &Qed, offset: u64, length: u64) -> Vec<u8> {
    let mut buf = vec![0; length as usize];
    qed.storage().read_at(offset, &mut buf).unwrap();
    buf
}

#[test]
fn qemu_made_images_map_like_qemu_img_map_and_read_the_written_pattern() {
    for cluster_size in [4096u64, 65536, 2 * MIB] {
        for backing_format in [None, Some("raw"), Some("qed")] {
            let dir = tempfile::tempdir().unwrap();
            let top = dir.path().join("top.qed");
            let cluster_opt = format!("cluster_size={cluster_size}");
            let mut args = vec!["create", "-q", "-f", "qed", "-o", &cluster_opt];
            let base_name = backing_format.map(|format| format!("base.{format}"));
            if let (Some(format), Some(name)) = (backing_format, &base_name) {
                let base = dir.path().join(name);
                run_ok(
                    "qemu-img",
                    &["create", "-q", "-f", format, path_str(&base), "64M"],
                );
                run_ok(
                    "qemu-io",
                    &["-f", format, "-c", "write -P 0x11 0 8M", path_str(&base)],
                );
                args.extend(["-b", name.as_str(), "-F", format]);
            }
            args.extend([path_str(&top), "64M"]);
            run_ok("qemu-img", &args);
            run_ok(
                "qemu-io",
                &[
                    "-f",
                    "qed",
                    "-c",
                    "write -P 0xab 1M 64k",
                    "-c",
                    "write -z 2M 128k",
                    path_str(&top),
                ],
            );

            let qed = open(&top, RO);
            let what = format!("cluster {cluster_size}, backing {backing_format:?}");
            assert_eq!(qed.cluster_size(), cluster_size, "{what}");
            assert_eq!(qed.virtual_size(), 64 * MIB, "{what}");
            let expected_backing = base_name.map(|name| BackingRef {
                name,
                format: (backing_format == Some("raw")).then(|| "raw".to_string()),
            });
            assert_eq!(qed.backing(), expected_backing, "{what}");
            assert_map_agrees_with_qemu(&qed, &top);
            let data = read_host(&qed, host_offset(&qed, MIB), 64 * 1024);
            assert!(
                data.iter().all(|&b| b == 0xab),
                "{what}: pattern not at host offset"
            );
            let report = qed.check(RepairMode::None).unwrap();
            assert_eq!(
                (report.corruptions, report.leaks),
                (0, 0),
                "{what}: {report:?}"
            );
        }
    }
}

/// Writes `pattern` into newly allocated clusters and maps them, as the block layer does.
fn write_clusters(qed: &Qed, guest: u64, count: u64, pattern: u8) {
    let host = qed.allocate_clusters(count).unwrap();
    let data = vec![pattern; (count * qed.cluster_size()) as usize];
    qed.storage().write_at(host, &data).unwrap();
    qed.map_clusters(guest, host, count).unwrap();
}

fn create_image(path: &Path, options: &CreateOptions) {
    qed::create(&FileStorage::create(path).unwrap(), options).unwrap();
}

#[test]
fn images_we_write_pass_qemu_img_check_and_read_back_in_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xcd; (64 * MIB) as usize]).unwrap();
    let path = dir.path().join("top.qed");
    let backing = BackingRef {
        name: "base.raw".into(),
        format: Some("raw".into()),
    };
    create_image(
        &path,
        &CreateOptions {
            cluster_size: Some(4096),
            backing: Some(backing.clone()),
            ..CreateOptions::new(64 * MIB)
        },
    );

    let qed = open(&path, RW);
    // With 4 KiB clusters an L2 table covers 8 MiB: these writes need 7 L2 tables, and the
    // 3-cluster write straddles the boundary between the first two.
    let mut reads = Vec::new();
    for (i, guest) in [
        0,
        3 * MIB,
        8 * MIB - 4096,
        17 * MIB,
        33 * MIB,
        40 * MIB,
        50 * MIB,
        63 * MIB,
    ]
    .into_iter()
    .enumerate()
    {
        let count = if i == 2 { 3 } else { 1 };
        write_clusters(&qed, guest, count, 0xab);
        reads.push((guest, count * 4096, 0xab));
    }
    assert!(qed.zero_clusters(20 * MIB, 16).unwrap());
    reads.push((20 * MIB, 16 * 4096, 0));
    reads.push((10 * MIB, 4096, 0xcd));
    qed.flush().unwrap();
    drop(qed);

    assert_qemu_check_clean(&path, false);
    let info = run_ok("qemu-img", &["info", "--output=json", path_str(&path)]);
    for expected in [
        "\"virtual-size\": 67108864",
        "\"format\": \"qed\"",
        "\"backing-filename\": \"base.raw\"",
        "\"backing-filename-format\": \"raw\"",
        "\"cluster-size\": 4096",
    ] {
        assert!(
            info.contains(expected),
            "qemu-img info lacks {expected}:\n{info}"
        );
    }
    assert_qemu_reads(&path, &reads);
    let qed = open(&path, RO);
    assert_map_agrees_with_qemu(&qed, &path);
    drop(qed);

    // Dropping the backing file makes unallocated clusters read as zeroes.
    let qed = open(&path, RW);
    qed.set_backing(None).unwrap();
    drop(qed);
    let info = run_ok("qemu-img", &["info", "--output=json", path_str(&path)]);
    assert!(
        !info.contains("backing-filename"),
        "backing still named:\n{info}"
    );
    assert_qemu_check_clean(&path, false);
    assert_qemu_reads(&path, &[(10 * MIB, 4096, 0), (0, 4096, 0xab)]);

    // A QED backing file is probed (no NO_PROBE bit), and QEMU reads through it.
    let base2 = dir.path().join("base2.qed");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qed", path_str(&base2), "64M"],
    );
    run_ok(
        "qemu-io",
        &["-f", "qed", "-c", "write -P 0x5a 10M 4k", path_str(&base2)],
    );
    let qed = open(&path, RW);
    qed.set_backing(Some(&BackingRef {
        name: "base2.qed".into(),
        format: Some("qed".into()),
    }))
    .unwrap();
    drop(qed);
    let info = run_ok("qemu-img", &["info", "--output=json", path_str(&path)]);
    assert!(
        info.contains("\"backing-filename\": \"base2.qed\""),
        "{info}"
    );
    assert_qemu_check_clean(&path, false);
    assert_qemu_reads(
        &path,
        &[(10 * MIB, 4096, 0x5a), (0, 4096, 0xab), (20 * MIB, 4096, 0)],
    );
}

#[test]
fn our_create_matches_the_layout_of_qemu_img_create() {
    let dir = tempfile::tempdir().unwrap();
    for (backing, qemu_backing_args) in [
        (None, vec![]),
        (
            Some(("base.raw", "raw")),
            vec!["-b", "base.raw", "-F", "raw"],
        ),
        (
            Some(("base.qed", "qed")),
            vec!["-b", "base.qed", "-F", "qed"],
        ),
    ] {
        let theirs = dir.path().join("theirs.qed");
        let mut args = vec!["create", "-q", "-f", "qed", "-u"];
        args.extend(qemu_backing_args);
        args.extend([path_str(&theirs), "100M"]);
        run_ok("qemu-img", &args);
        let ours = dir.path().join("ours.qed");
        create_image(
            &ours,
            &CreateOptions {
                backing: backing.map(|(name, format)| BackingRef {
                    name: name.into(),
                    format: Some(format.into()),
                }),
                ..CreateOptions::new(100 * MIB)
            },
        );
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "backing {backing:?}"
        );
    }
}

/// The pattern byte of guest cluster `cluster` in the concurrency and crash tests.
fn pattern(cluster: u64) -> u8 {
    (cluster % 251) as u8 + 1
}

#[test]
fn eight_threads_allocating_and_mapping_at_once_leave_a_clean_image() {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("concurrent.qed");
    create_image(
        &path,
        &CreateOptions {
            cluster_size: Some(4096),
            ..CreateOptions::new(256 * MIB)
        },
    );
    let storage = Arc::new(FileStorage::open(&path, true).unwrap());
    // A 4-table cache for 30-odd tables: evictions race with allocations and flushes.
    let qed = Arc::new(Qed::open_with_cache(storage, RW, 4).unwrap());
    // Cluster k of thread t is guest cluster (k * THREADS + t) * 97: spread over many tables.
    let guest_cluster = |t: u64, k: u64| (k * THREADS + t) * 97;
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let qed = &qed;
            scope.spawn(move || {
                for k in 0..PER_THREAD {
                    let cluster = guest_cluster(t, k);
                    write_clusters(qed, cluster * 4096, 1, pattern(cluster));
                    if k % 16 == 15 {
                        qed.flush().unwrap();
                    }
                }
            });
        }
    });
    qed.flush().unwrap();
    let report = qed.check(RepairMode::None).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    assert_eq!(report.allocated_clusters, THREADS * PER_THREAD);
    drop(qed);

    assert_qemu_check_clean(&path, false);
    let reads: Vec<(u64, u64, u8)> = (0..THREADS)
        .flat_map(|t| (0..PER_THREAD).map(move |k| (t, k)))
        .map(|(t, k)| {
            let cluster = guest_cluster(t, k);
            (cluster * 4096, 4096, pattern(cluster))
        })
        .collect();
    assert_qemu_reads(&path, &reads);
}

/// Guest clusters of the power-loss image: 32 MiB of 4 KiB clusters.
const CRASH_CLUSTERS: u64 = 32 * MIB / 4096;

/// Writes one guest cluster's pattern to a new host cluster and maps it.
fn crash_write(qed: &Qed, model: &Model, cluster: u64) {
    let cluster_size = qed.cluster_size();
    let host = qed.allocate_clusters(1).unwrap();
    let data = vec![pattern(cluster); cluster_size as usize];
    qed.storage().write_at(host, &data).unwrap();
    qed.map_clusters(cluster * cluster_size, host, 1).unwrap();
    model.set(cluster, 1, Guest::Data);
}

fn crash_zero(qed: &Qed, model: &Model, first: u64, count: u64) {
    qed.zero_clusters(first * qed.cluster_size(), count)
        .unwrap();
    model.set(first, count, Guest::Zero);
}

fn crash_unmap(qed: &Qed, model: &Model, first: u64, count: u64) {
    qed.unmap_clusters(first * qed.cluster_size(), count)
        .unwrap();
    model.set(first, count, Guest::Unallocated);
}

fn crash_flush(qed: &Qed, racing: Option<&RacingStorage>) {
    match racing {
        Some(racing) => racing.during(|| qed.flush()),
        None => qed.flush(),
    }
    .unwrap();
}

/// A workload touching several L2 tables through a 2-table cache (so dirty tables get evicted),
/// with zeroing, unmapping, a backing change and flushes in between; the last writes are never
/// flushed.
fn crash_workload(qed: &Qed, model: &Model, racing: Option<&RacingStorage>) {
    // With 4 KiB clusters and 2-cluster tables, an L2 table covers 1024 clusters (4 MiB).
    for round in 0..3 {
        for table in 0..5 {
            crash_write(qed, model, table * 1024 + round * 7);
        }
        crash_zero(qed, model, 600 + round, 2);
        crash_unmap(qed, model, round * 7, 1);
        crash_flush(qed, racing);
    }
    qed.set_backing(Some(&BackingRef {
        name: "base.raw".into(),
        format: Some("raw".into()),
    }))
    .unwrap();
    for cluster in [5, 2060, 4095, 3000] {
        crash_write(qed, model, cluster);
    }
    crash_flush(qed, racing);
    crash_write(qed, model, 100);
    crash_write(qed, model, 3600);
}

/// The change made during each sync of a write-back: a cluster written (often in a table not
/// cached, so the full cache must make room while the write-back runs), zeroed or unmapped.
fn crash_racing_change(qed: Weak<Qed>, model: Arc<Model>) -> RacingChange {
    let mut round = 0u64;
    Box::new(move || {
        let Some(qed) = qed.upgrade() else {
            return;
        };
        round += 1;
        let cluster = (round * 1031) % CRASH_CLUSTERS;
        let model = model.clone();
        on_another_thread(move || match round % 4 {
            0 => crash_zero(&qed, &model, cluster, 1),
            1 => crash_unmap(&qed, &model, cluster, 1),
            _ => crash_write(&qed, &model, cluster),
        });
    })
}

/// Opens a disk state read-only and checks that it is consistent and that every data entry
/// points at the data written for that guest cluster.
fn assert_consistent(bytes: Vec<u8>, what: &str) {
    let storage = Arc::new(RecordingStorage::in_memory(bytes, "recording.qed"));
    let qed = Qed::open(storage, RO).unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
    let report = qed.check(RepairMode::None).unwrap();
    assert_eq!(report.corruptions, 0, "{what}: {:?}", report.messages);
    let cluster_size = qed.cluster_size();
    let mut guest = 0;
    while guest < qed.virtual_size() {
        let extent = qed.map(guest, u64::MAX).unwrap();
        if let Mapping::Data { host_offset, .. } = extent.mapping {
            for i in 0..extent.length / cluster_size {
                let cluster = guest / cluster_size + i;
                let data = read_host(&qed, host_offset + i * cluster_size, cluster_size);
                assert!(
                    data.iter().all(|&b| b == pattern(cluster)),
                    "{what}: guest cluster {cluster} points at data never written for it"
                );
            }
        }
        guest += extent.length;
    }
}

#[test]
fn power_loss_at_any_point_leaves_a_consistent_image() {
    power_loss_at_any_point(false);
}

/// The flush writes tables back without the metadata lock, from a copy: a change made during
/// every sync of every write-back must be kept, and every cut must still be consistent.
#[test]
fn changes_during_every_sync_of_a_flush_are_kept_and_power_loss_anywhere_is_consistent() {
    power_loss_at_any_point(true);
}

fn power_loss_at_any_point(raced: bool) {
    let created = RecordingStorage::in_memory(Vec::new(), "recording.qed");
    qed::create(
        &created,
        &CreateOptions {
            cluster_size: Some(4096),
            ..CreateOptions::new(32 * MIB)
        },
    )
    .unwrap();
    // table_size 2 keeps tables small, so that the workload spans several of them (QEMU 10
    // cannot open table_size 1 images: it mistakes a one-cluster table for an overflow).
    let mut initial = created.bytes().unwrap();
    let mut header = qed::parse_header(&initial).unwrap();
    header.table_size = 2;
    initial[..64].copy_from_slice(&header.to_bytes());
    initial.truncate(3 * 4096);

    let storage = Arc::new(RecordingStorage::in_memory(
        initial.clone(),
        "recording.qed",
    ));
    let racing = Arc::new(RacingStorage::new(storage.clone()));
    let model = Arc::new(Model::new(CRASH_CLUSTERS));
    let qed = Arc::new(Qed::open_with_cache(racing.clone(), RW, 2).unwrap());
    racing.set_change(crash_racing_change(Arc::downgrade(&qed), model.clone()));
    crash_workload(&qed, &model, raced.then_some(&*racing));
    drop(qed);
    let events = storage.operations();
    let closed = RecordingStorage::in_memory(storage.bytes().unwrap(), "closed.qed");
    model.assert_matches(&Qed::open(Arc::new(closed), RO).unwrap());
    assert!(
        events.len() > 50,
        "workload too small: {} events",
        events.len()
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cut.qed");
    // qemu-img check opens the backing file the workload names.
    std::fs::File::create(dir.path().join("base.raw"))
        .and_then(|base| base.set_len(32 * MIB))
        .unwrap();
    let mut durable = initial.clone();
    let mut durable_upto = 0;
    for cut in 0..=events.len() {
        // Power fails after `cut` operations. Either they all reached the disk in order...
        let mut in_order = durable.clone();
        for event in &events[durable_upto..cut] {
            event.apply(&mut in_order);
        }
        // ...or only the flushed ones plus the very last, which overtook the others.
        let mut reordered = durable.clone();
        if cut > durable_upto {
            events[cut - 1].apply(&mut reordered);
        }
        for (state, model) in [(in_order, "in order"), (reordered, "reordered")] {
            let what = format!("cut after {cut} of {} operations ({model})", events.len());
            assert_consistent(state.clone(), &what);
            std::fs::write(&file, &state).unwrap();
            assert_qemu_check_clean(&file, true);
        }
        if let Some(Operation::Flush) = events.get(cut) {
            for event in &events[durable_upto..cut] {
                event.apply(&mut durable);
            }
            durable_upto = cut;
        }
    }
}
