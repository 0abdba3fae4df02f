//! Guessing an image's format from its first bytes, for images whose chain records no format.
//!
//! Security: probing a guest-writable raw image is dangerous. A guest can write a qcow2 header
//! into its own disk; if that disk is later probed, the guest chooses what file the host opens
//! as its "backing file". Callers must only probe where no format is recorded, and never when
//! the chain says the file is raw.

use crate::FormatKind;

/// qcow2's magic, "QFI\xfb" (qcow2.txt: `magic`).
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// QED's magic, "QED\0" (qed_spec.txt: `magic`).
pub const QED_MAGIC: [u8; 4] = *b"QED\0";

/// Returns the format whose magic `head` starts with; anything else is raw.
pub fn probe_format(head: &[u8]) -> FormatKind {
    if head.starts_with(&QCOW2_MAGIC) {
        FormatKind::Qcow2
    } else if head.starts_with(&QED_MAGIC) {
        FormatKind::Qed
    } else {
        FormatKind::Raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_recognises_magics_and_defaults_to_raw() {
        assert_eq!(probe_format(b"QFI\xfb\0\0\0\x03"), FormatKind::Qcow2);
        assert_eq!(probe_format(b"QED\0\0\0\x01\0"), FormatKind::Qed);
        assert_eq!(probe_format(b"\0\0\0\0"), FormatKind::Raw);
        assert_eq!(probe_format(b"QF"), FormatKind::Raw);
    }
}
