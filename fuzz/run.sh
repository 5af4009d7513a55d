#!/usr/bin/env bash
# Runs one fuzz target (or all) with libFuzzer through cargo-fuzz, from a seed corpus
# built from the real vLLM fixtures and the shipped configs.
#
#   fuzz/run.sh [inspect|metrics|config|all] [-runs=N | -max_total_time=S] [libFuzzer flags]
#
# Default: every target for 60 s. Needs the nightly toolchain (cargo-fuzz instruments with
# flags stable rustc refuses); installs cargo-fuzz if missing. Crashes land in
# fuzz/artifacts/TARGET/ and are printed with the input that reproduces them.
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd .. && pwd)
fixtures=$root/tests/fixtures/vllm-0.32
target=${1:-all}
shift || true
flags=("$@")
[ ${#flags[@]} -eq 0 ] && flags=(-max_total_time=60)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup run nightly rustc --version >/dev/null 2>&1 || {
    echo "fuzz/run.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
    exit 2
}

seed() {
    local t=$1 dir=corpus/$1
    mkdir -p "$dir"
    case $t in
    inspect)
        for f in chat-completion.json completion.json models.json; do
            [ -f "$fixtures/$f" ] && cp "$fixtures/$f" "$dir/fixture-$f"
        done
        for f in chat-stream.sse.txt completion-stream.sse.txt; do
            [ -f "$fixtures/$f" ] && cp "$fixtures/$f" "$dir/fixture-$f"
        done
        printf '%s' '{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":16}' >"$dir/chat"
        printf '%s' '{"model":"m","prompt":"Once upon","max_completion_tokens":7}' >"$dir/completion"
        printf '%s' '{"model":"m","input":["a","b"]}' >"$dir/embeddings"
        printf -- '--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--B\r\ncontent-disposition: form-data; name=stream\r\n\r\ntrue\r\n--B--\r\n' >"$dir/form"
        printf '%s' 'multipart/form-data; charset=utf-8; boundary="B"' >"$dir/form-content-type"
        ;;
    metrics)
        for f in "$fixtures"/metrics-*.txt; do
            [ -f "$f" ] && cp "$f" "$dir/$(basename "$f")"
        done
        ;;
    config)
        for f in "$root"/conf/*.yaml; do
            cp "$f" "$dir/$(basename "$f")"
        done
        ;;
    esac
}

run() {
    local t=$1
    seed "$t"
    echo "== fuzz target $t: ${flags[*]}"
    cargo +nightly fuzz run --sanitizer none "$t" "corpus/$t" -- "${flags[@]}" 2>&1 |
        tee "target/fuzz-$t.log" | grep -E "^(#[0-9]+.*(DONE|pulse)|==|Done|SUMMARY|artifact|panicked)" || true
    grep -E "^Done [0-9]+ runs|^#[0-9]+\s+DONE" "target/fuzz-$t.log" | tail -1
    if grep -q "crash-\|panicked" "target/fuzz-$t.log"; then
        echo "fuzz target $t found a crash: see fuzz/target/fuzz-$t.log and fuzz/artifacts/$t/" >&2
        return 1
    fi
}

mkdir -p target
if [ "$target" = all ]; then
    for t in inspect metrics config; do run "$t"; done
else
    run "$target"
fi
