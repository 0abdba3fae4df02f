#!/usr/bin/env bash
# Runs fuzz targets for a while each: fuzz/run.sh [SECONDS] [TARGET...] (default 120 s, all).
# New inputs go to fuzz/work/<target> (ignored by git); the seeds in fuzz/corpus/<target> are
# only read. Crashes land in fuzz/artifacts/<target>/.
#
# cargo-fuzz wants a nightly compiler for its sanitizer flags; RUSTC_BOOTSTRAP=1 lets the
# stable compiler accept them (AddressSanitizer works, see README.md).
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-120}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
    targets=(qcow2_header qcow2_open qed_header qed_open chain_probe)
fi
export RUSTC_BOOTSTRAP=1
status=0
for target in "${targets[@]}"; do
    mkdir -p "work/$target"
    echo "== $target: $seconds s"
    # -rss_limit_mb: an input that makes a driver allocate absurd memory is a finding.
    if ! cargo fuzz run "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1; then
        status=1
    fi
done
exit $status
