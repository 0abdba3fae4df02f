#!/bin/sh
# imgstream serve vs qemu-storage-daemon: stream time with and without guest I/O (fio over NBD)
# and fio alone, on the same 2 GiB chain, in one run. Writes bench/results/serve-<date>.md.
# Needs qemu-utils, qemu-system-common (qemu-storage-daemon), fio (with the nbd engine).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
target=${CARGO_TARGET_DIR:-$repo/target}
work=${WORK:-$(mktemp -d /var/tmp/imgstream-bench.XXXXXX)}
cargo build --release -p imgstream --manifest-path "$repo/Cargo.toml"
mkdir -p "$here/results"
out="$here/results/serve-$(date +%Y-%m-%d).md"
python3 "$here/serve.py" "$target/release/imgstream" "$work" "$out"
rm -rf "$work"
echo "results: $out"
