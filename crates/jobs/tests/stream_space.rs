//! The stream reserves the space its copies will take in the top's file before it makes them,
//! and the image gives back what is left of it past the end of the file when it is closed.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes the file has allocated beyond its length (negative when it has holes).
fn allocated_past_end(path: &Path) -> i64 {
    let meta = std::fs::metadata(path).expect("stat");
    (meta.blocks() * 512) as i64 - meta.len() as i64
}

#[test]
fn a_stream_reserves_space_ahead_and_closing_the_image_gives_back_the_rest() {
    for fmt in ["qcow2", "qed"] {
        let f = Fixture::new(fmt, 32);
        let before = allocated_past_end(&f.top);
        let disk = f.open();
        let setup = JobSetup {
            auto_finalize: false,
            ..Default::default()
        };
        let (job, events) = stream_until_pending(&disk, setup);
        // All of it copied, and the slack of the reservation (64 MiB) still unused.
        let reserved = allocated_past_end(&f.top);
        assert!(
            reserved >= before + (32 << 20),
            "{fmt}: {reserved} bytes allocated past the end of the top after the copy \
             ({before} before the stream): the stream reserved nothing"
        );
        job.finalize().expect("finalize");
        assert_eq!(job.wait_concluded(), None, "{fmt}");
        wait_until(&job, &events, "null", || job.is_finished());
        close(disk);
        let after = allocated_past_end(&f.top);
        assert!(
            after < (1 << 20),
            "{fmt}: {after} bytes still allocated past the end of the closed image"
        );
        assert_eq!(backing_of(&f.top, fmt), None, "{fmt}");
        assert_check_clean(&f.top, fmt, fmt);
        assert_same_as_raw(&f.top, fmt, &f.before, fmt);
    }
}
