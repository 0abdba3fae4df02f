//! Shared helpers of the integration tests: fixtures built with qemu-img, oracles, the imgstream binary.
