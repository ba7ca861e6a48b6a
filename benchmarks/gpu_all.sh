#!/usr/bin/env bash
# Every GPU check in one run (about 5-8 minutes on one H100/H200), for a machine lent for a few minutes:
#   1. benchmarks/gpu_check.py: fp32 parity with TF32 off, bf16 and fp8 agreement (parity and synthetic speech,
#      music, noise inputs), matmul peaks per dtype, throughput (bf16 and fp8, eager and compiled, bare-encoder
#      ceilings, fractions of the peaks), encoder variants (the optional sections stop at --budget-s);
#   2. benchmarks/files_gpu.py: `m2d2-embed embed` over a folder of 10-s WAVs against the in-memory path;
#   3. the CUDA tests (tests/test_cuda.py incl. fp8 on capability 8.9+, tests/test_fused_gelu.py);
#   4. benchmarks/decode_files.py: the decoding stage alone (8 workers, pinned, 8,192 files), with
#      DECODE_BEFORE=DIR against another checkout (one with files.start_decoding, e.g. 1b0d493), interleaved;
#      then unpinned (what the pin-memory thread's copy costs).
#
#   bash benchmarks/gpu_all.sh [--wheels DIR] [--reference PATH/TO/portable_m2d.py] [--rehearse]
#
# --wheels DIR: install the wheels in DIR first, offline (soundfile, soxr, cffi, nnAudio, ... for a machine
# without them). --reference: also time the upstream runtime (needs nnAudio, timm, einops). --rehearse: the same
# steps on the CPU with tiny counts (gpu_check --smoke --fp8-emulate, 32 files instead of 8,192 and 24,576), to
# check the script end to end before a GPU is lent.
# Results (markdown, JSON and logs) go to $OUT (default ./gpu_results). Each step has its own time limit, so
# one step that hangs does not lose the others, and the whole run stops by $DEADLINE seconds (default 560: the
# device tool allows 600 s per command); steps run in order of importance and a step that would start with less
# than 40 s left is skipped (its name is printed). STEPS="files8192 tests" runs only those steps (names: check,
# files8192, files24576, tests, decode), e.g. in a second call for what the first one skipped.
set -u
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
WHEELS=""
REF=""
REHEARSE=""
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) WHEELS=$2; shift 2 ;;
    --reference) REF=$2; shift 2 ;;
    --rehearse) REHEARSE=1; shift ;;
    *) echo "gpu_all.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
if [ -n "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl 2>&1 | tail -3
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export M2D2_BENCH_CACHE=${M2D2_BENCH_CACHE:-/tmp/m2d2_bench_cache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
start=$(date +%s)

DEADLINE=${DEADLINE:-560}
STEPS=${STEPS:-check files8192 files24576 tests decode}
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
limit() { local l; l=$(left); echo $(( $1 < l ? $1 : l )); }  # a step's own limit, cut to the time left
want() {  # run step $1? (asked for, and at least 40 s left)
  case " $STEPS " in *" $1 "*) ;; *) return 1 ;; esac
  if [ "$(left)" -lt 40 ]; then echo "== $1 skipped: $(left) s left of $DEADLINE"; return 1; fi
}

if want check; then
  echo "== gpu_check ($(( $(date +%s) - start )) s)"
  t=$(limit 320)
  timeout "$t" $PY benchmarks/gpu_check.py --budget-s $(( t > 70 ? t - 70 : t / 2 )) --work-dir "$M2D2_BENCH_CACHE" \
    ${REF:+--reference "$REF"} ${REHEARSE:+--smoke --device cpu --no-compile --fp8-emulate} --out "$OUT" \
    >"$OUT/gpu_check.log" 2>&1
  echo "gpu_check exit $?"; tail -5 "$OUT/gpu_check.log"
fi

for n in 8192 24576; do  # FILES_BEFORE=DIR: also the CLI of another checkout (start-up before -> after)
  want "files$n" || continue
  echo "== files_gpu $n ($(( $(date +%s) - start )) s)"
  timeout "$(limit $(( n < 10000 ? 150 : 240 )))" $PY benchmarks/files_gpu.py \
    ${REHEARSE:+--device cpu --workers 1} --files $([ -n "$REHEARSE" ] && echo 32 || echo $n) \
    --cache-dir "$M2D2_BENCH_CACHE" ${FILES_BEFORE:+--compare-src "$FILES_BEFORE"} --out "$OUT/files_$n" \
    >"$OUT/files_gpu_$n.log" 2>&1
  echo "files_gpu $n exit $?"; tail -32 "$OUT/files_gpu_$n.log"
done
if want tests; then
  echo "== CUDA tests"
  timeout "$(limit 140)" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_fused_gelu.py \
    >"$OUT/pytest_cuda.txt" 2>&1
  echo "pytest exit $?"; tail -15 "$OUT/pytest_cuda.txt"
fi

if want decode; then  # DECODE_BEFORE=DIR: also another checkout's decoding, interleaved (before -> after)
  echo "== decode_files ($(( $(date +%s) - start )) s)"
  timeout "$(limit 90)" $PY benchmarks/decode_files.py --json "$OUT/decode_files.json" --folder "$M2D2_BENCH_CACHE/wavs" \
    $([ -n "$REHEARSE" ] && echo "--device cpu --workers 1 --files 64 --rounds 1" \
      || echo "--device cuda --workers 8 --files 8192 --rounds 3") \
    ${DECODE_BEFORE:+--compare-src "$DECODE_BEFORE"} >"$OUT/decode_files.log" 2>&1
  echo "decode_files exit $?"; tail -6 "$OUT/decode_files.log"
  # the same without pinning: how much of the rate the pin-memory thread's copy costs
  timeout "$(limit 45)" $PY benchmarks/decode_files.py --json "$OUT/decode_files_unpinned.json" --device cpu \
    --folder "$M2D2_BENCH_CACHE/wavs" \
    $([ -n "$REHEARSE" ] && echo "--workers 1 --files 64 --rounds 1" || echo "--workers 8 --files 8192 --rounds 2") \
    >"$OUT/decode_files_unpinned.log" 2>&1
  echo "decode_files (unpinned) exit $?"; tail -3 "$OUT/decode_files_unpinned.log"
fi

echo "== done in $(( $(date +%s) - start )) s"
