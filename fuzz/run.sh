#!/usr/bin/env bash
# Fuzzes Container::from_bytes for a bounded time (default 180 s):
#   fuzz/run.sh [seconds]
# Seeds the corpus with a small real container (and truncated copies of it), then runs
# cargo-fuzz on the nightly toolchain. Crashes land in fuzz/artifacts/open_container/;
# keep each one as a regression test by copying it into crates/bitstack-format/tests/fuzz_inputs/
# (tests/fuzz_regressions.rs runs every file there, also with its checksums re-stamped,
# because fuzzing builds ignore the manifest and fixed-part checksums on open).
set -euo pipefail
secs="${1:-180}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
corpus="$here/corpus/open_container"
mkdir -p "$corpus"
seed="$corpus/seed.bitstack"
(cd "$root" && cargo run -q -p bitstack-format --example write_sample -- "$seed")
len=$(stat -c %s "$seed")
for cut in 4 60 $((len / 2)) $((len - 7)); do
    head -c "$cut" "$seed" > "$corpus/seed-cut-$cut.bitstack"
done
cd "$here"
# cargo-fuzz needs nightly (-Zsanitizer); the repository pins stable in rust-toolchain.toml.
cargo +nightly fuzz run open_container "$corpus" -- \
    -max_total_time="$secs" -max_len=65536 -timeout=10 -print_final_stats=1
