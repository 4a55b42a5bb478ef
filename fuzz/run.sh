#!/usr/bin/env bash
# Fuzzes every target for a bounded time each (default 60 s per target):
#   fuzz/run.sh [seconds-per-target] [target ...]
# Targets (all by default):
#   open_container  Container::from_bytes and every accessor of a container that opens
#   load_stack      the runtime on containers with arbitrary blocks: StackFile, LoadedStack
#                   at several budgets, every product path, resize
#   load_model      a tiny checkpoint built from the input (shapes, dtypes, missing
#                   tensors, values): CausalLm::load and a forward pass, data-free compress,
#                   the stack loaded and run
#   resume_state    compress --resume (calibrated and best pipelines of a tiny Llama) on
#                   progress records rewritten from the input and sealed with valid CRCs
#   load_config     bitstack-model's config.json parser (ModelConfig::from_json_bytes)
#   load_tokenizer  TextTokenizer::from_bytes, then encode/decode a short text
# Corpora are seeded with real files: a small container written by the format crate (and
# truncated copies of it); fixtures/tiny-qwen2/{config,tokenizer}.json, the same files of
# ../shared/models/small-llama when present, and the small hand-written files in
# fuzz/seeds/<target>/. cargo-fuzz runs on the nightly toolchain.
#
# Crashes land in fuzz/artifacts/<target>/; keep each one as a regression test:
# - open_container: copy it into crates/bitstack-format/tests/fuzz_inputs/
#   (tests/fuzz_regressions.rs runs every file there, also with its checksums re-stamped,
#   because fuzzing builds ignore the manifest and fixed-part checksums on open);
# - load_stack / load_model / resume_state: rerun it with `cargo +nightly fuzz run TARGET FILE` (the
#   container or checkpoint is built from the input); a fix gets a test of its own;
# - load_config / load_tokenizer: copy it to crates/bitstack-model/tests/fuzz_inputs/ as
#   config-<what>.json / tokenizer-<what>.json (tests/fuzz_regressions.rs runs them).
set -euo pipefail
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(open_container load_stack load_model resume_state load_config load_tokenizer)
fi
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
shared_model="$root/../shared/models/small-llama"

seed_open_container() {
    local corpus="$1" seed="$1/seed.bitstack"
    (cd "$root" && cargo run -q -p bitstack-format --example write_sample -- "$seed")
    local len
    len=$(stat -c %s "$seed")
    for cut in 4 60 $((len / 2)) $((len - 7)); do
        head -c "$cut" "$seed" > "$corpus/seed-cut-$cut.bitstack"
    done
}

# Copies $2 (if it exists) into corpus $1 as $3.
seed_file() {
    if [ -f "$2" ]; then
        cp "$2" "$1/$3"
    fi
}

seed_model_files() {
    local corpus="$1" name="$2"
    seed_file "$corpus" "$root/fixtures/tiny-qwen2/$name" "seed-tiny-qwen2-$name"
    seed_file "$corpus" "$shared_model/$name" "seed-small-llama-$name"
}

for target in "${targets[@]}"; do
    corpus="$here/corpus/$target"
    mkdir -p "$corpus"
    case "$target" in
        open_container)
            seed_open_container "$corpus"
            opts=(-max_len=65536)
            ;;
        load_stack)
            # Structured: the input drives shapes, kinds, parameters and values.
            opts=(-max_len=8192)
            ;;
        load_model)
            # Structured: the input drives the architecture, the tensors and their values.
            opts=(-max_len=8192)
            ;;
        resume_state)
            # Structured: the input picks a pipeline and a record, and rewrites it.
            opts=(-max_len=4096 -len_control=0)
            ;;
        load_config)
            seed_model_files "$corpus" config.json
            opts=(-max_len=65536 -dict="$here/dicts/config.dict")
            ;;
        load_tokenizer)
            seed_model_files "$corpus" tokenizer.json
            # The real tokenizer.json files are ~0.5 MB: allow inputs up to 4 MB.
            opts=(-max_len=4194304 -dict="$here/dicts/tokenizer.dict")
            ;;
        *)
            echo "unknown target $target" >&2
            exit 2
            ;;
    esac
    if [ -d "$here/seeds/$target" ]; then
        cp "$here/seeds/$target"/* "$corpus/"
    fi
    echo "== $target: ${secs}s" >&2
    # cargo-fuzz needs nightly (-Zsanitizer); the repository pins stable in
    # rust-toolchain.toml.
    (cd "$here" && cargo +nightly fuzz run "$target" "$corpus" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
        "${opts[@]}")
done
