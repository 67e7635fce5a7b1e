#!/usr/bin/env bash
# GPU check: first the training report (fast at 1024 px, batch 24: step time, MFU, graph breaks, top
# kernels, against diffusers and standard, memory per profile), then the decoder kernel variants at the
# MFU target case (with a compiled-kernel profile),
# GPU tests, `zturbo bench` for fast and standard at 512, 1024 and 2048 with eager fp32, bf16
# (NCHW and channels_last) and torch.compile, diffusers at 1024 bf16, serve-batch (encode and
# decode) and training memory benchmarks, an eager profiler summary of the fast decoder, and a short
# table last.
#
#   bash scripts/gpu_check.sh                  # on a GPU machine; needs no network (at most ~9 min)
#   ONLY=bench_serve,train-report bash scripts/gpu_check.sh   # only the steps whose names start so
#   bash scripts/gpu_check.sh --cpu-dry-run    # same steps on the CPU at toy sizes, to test the script
#
# Everything lands in $OUT (default ./gpu-out): log.txt, steps.tsv, bench-json.tar.gz (one JSON per
# bench step), profile.txt, summary.md. Each step runs under `timeout` and its status is recorded;
# a failing step never stops the ones after it. BUDGET (seconds, default 540) caps the whole script:
# a step gets at most what is left, and steps past the budget are recorded as skipped.
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD; fi
set -u

OUT=${OUT:-./gpu-out}
mkdir -p "$OUT/json"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
STEPS=$OUT/steps.tsv
: >"$LOG"
printf 'step\tstatus\tseconds\n' >"$STEPS"

DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1

BUDGET=${BUDGET:-540}
ONLY=${ONLY:-}
if [ "$DRY" = 1 ]; then
  DEV=cpu; R_MAIN=32; B_MAIN=1; R_BIG=32; R_MFU=32; B_MFU=2; REP=1; WARM=1; T=240; BUDGET=${BUDGET_DRY:-1800}
else
  DEV=cuda; R_MAIN=512,1024; B_MAIN=1,8; R_BIG=2048; R_MFU=1024; B_MFU=8; REP=4; WARM=2; T=80
fi
PY=python3
ZT="$PY -m zturbo"

# step NAME SECONDS COMMAND...: run with a time limit, append its output to the log, record status.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc left=$((BUDGET - SECONDS - 15))
  if [ -n "$ONLY" ] && [ "$name" != environment ]; then
    local want=0 prefix
    for prefix in ${ONLY//,/ }; do case $name in "$prefix"*) want=1 ;; esac; done
    if [ "$want" = 0 ]; then
      printf '%s\tskipped (not in ONLY)\t0\n' "$name" >>"$STEPS"
      return
    fi
  fi
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped (time budget spent)\t0\n' "$name" >>"$STEPS"
    echo "=== $name: skipped, time budget spent" | tee -a "$LOG"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local status=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then status="timeout(${limit}s)"
  elif [ "$name" = gpu-tests ] && [ $rc = 5 ]; then status="ok (no GPU tests collected)"
  elif [ $rc != 0 ]; then status="exit $rc"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$STEPS"
  echo "=== $name: $status in $((SECONDS - t0)) s" | tee -a "$LOG"
}

# bench NAME SECONDS FLAGS...: one `zturbo bench` run writing $OUT/json/NAME.json (rewritten per case).
bench() {
  local name=$1 limit=$2; shift 2
  step "bench-$name" "$limit" $ZT bench --device "$DEV" --repeats "$REP" --warmup "$WARM" \
    --json "$OUT/json/$name.json" --markdown "$OUT/json/$name.md" "$@"
}

step environment 60 bash -c "nvidia-smi 2>&1 | head -15; $ZT info"

# Training first (issue #15): the report's sections stop at TRAIN_BUDGET seconds (the step itself may
# overrun by one section), leaving the rest of BUDGET for everything below.
TRAIN_BUDGET=${TRAIN_BUDGET:-270}
if [ "$DRY" = 1 ]; then
  step train-report $T $PY benchmarks/bench_train.py --what gpu --device cpu --size 32 --batch 2 --repeats 1 \
    --budget 120 --json "$OUT/json/train-report.json"
else
  step train-report $((TRAIN_BUDGET + 60)) $PY benchmarks/bench_train.py --what gpu --repeats 3 \
    --budget "$TRAIN_BUDGET" --json "$OUT/json/train-report.json"
fi
[ -f "$OUT/json/train-report.json" ] && $PY benchmarks/bench_train.py --print-json "$OUT/json/train-report.json" \
  >"$OUT/train-table.md" 2>>"$LOG"

# Steps run in priority order; what the time budget leaves out is recorded as skipped.
# The MFU target case first: how the upsampling and attention kernels change fast decode at
# 1024 px b8 bf16, eager in both layouts and compiled, plus the compiled decoder's kernel profile.
if [ "$DRY" = 1 ]; then
  step decoder-variants $T $PY benchmarks/bench_decoder_variants.py --device cpu --resolution 32 --batch 1 \
    --precision fp32 --repeats 1 --warmup 1 --compile none --json "$OUT/json/decoder-variants.json"
else
  step decoder-variants 170 $PY benchmarks/bench_decoder_variants.py --device cuda --resolution $R_MFU \
    --batch $B_MFU --precision bf16 --repeats 5 --warmup 2 --compile baseline,both \
    --json "$OUT/json/decoder-variants.json"
fi
step gpu-tests 120 $PY -m pytest -q -m "gpu or tensorrt" tests/ --continue-on-collection-errors -p no:cacheprovider

# torch.compile with the default kernels: the decoder at the target case, against standard.
if [ "$DRY" = 1 ]; then
  printf 'bench-compile\tskipped (dry run: inductor on a small CPU takes minutes)\t0\n' >>"$STEPS"
else
  bench compile 150 --backend compile --against standard --what decode --precision bf16 --channels-last \
    --resolutions $R_MFU --batch-sizes $B_MFU
fi
# Distillation (#14): the [96,192,384,384] decoder in FLUX.1's latent space against FLUX.1's decoder,
# 1024 px, bf16, compiled; the speedup is printed next to the counted FLOP ratio.
if [ "$DRY" = 0 ]; then
  bench distill-compile 150 --profile flux-decoder-fast --backend compile --against standard --what decode \
    --precision bf16 --channels-last --resolutions 1024 --batch-sizes 1
fi
# Tiny students: the TAESD-class decoder for FLUX.1 latents against FLUX.1's decoder, bf16 eager,
# 1024 px, and against diffusers' AutoencoderTiny with the same weights.
bench tiny 90 --profile tiny-flux --against standard --what decode --precision bf16 --resolutions $R_MFU \
  --batch-sizes 1
bench tiny-diffusers 90 --profile tiny-flux --against diffusers --what decode --precision bf16 \
  --resolutions $R_MFU --batch-sizes 1
# bf16 in the default NCHW layout at the MFU target case, encode and decode, against standard.
bench bf16 $T --against standard --precision bf16 --resolutions $R_MFU --batch-sizes $B_MFU

# serve-batch end to end against compute only (reading in threads, the GPU's auto mode).
if [ "$DRY" = 1 ]; then
  for op in encode decode; do
    step "bench_serve-$op" $T $PY benchmarks/bench_serve.py --op $op --images 20 --repeats 1 --size 16 \
      --json "$OUT/json/serve-$op.json"
  done
else
  step bench_serve-encode 75 $PY benchmarks/bench_serve.py --gpu --images 768 --repeats 2 \
    --json "$OUT/json/serve-encode.json"
  step bench_serve-decode 90 $PY benchmarks/bench_serve.py --gpu --op decode --images 512 --repeats 2 \
    --json "$OUT/json/serve-decode.json"
fi
# serve-batch on this machine's CPU cores (the CPU preset): one compute loop with phased reading against
# compute streams, the default count and others, to check the streams default on a many-core host.
if [ "$DRY" = 0 ]; then
  for s in phased auto 2 8; do
    if [ "$s" = phased ] || [ "$s" = auto ]; then flags="--reading $s"; else flags="--reading streams --streams $s"; fi
    step "cpu-serve-$s" 60 $PY benchmarks/bench_serve.py --images 400 --repeats 5 $flags \
      --json "$OUT/json/cpu-serve-$s.json"
  done
fi
# The peer users would otherwise pick: diffusers' AutoencoderKL, same config, weights, inputs, precision.
bench diffusers $T --against diffusers --precision bf16 --resolutions $R_MFU --batch-sizes 1,$B_MFU
# The training input pipeline: 1024 px JPEGs through the loader, CPU decode against nvJPEG.
if [ "$DRY" = 1 ]; then
  step bench-input $T $PY benchmarks/bench_input.py --size 64 --images 8 --batch 2 --workers 1 --repeats 1 \
    --json "$OUT/json/input.json"
else
  step bench-input 90 $PY benchmarks/bench_input.py --gpu --images 96 --batch 24 --repeats 2 --json "$OUT/json/input.json"
fi
# Tiled decode (issue #17): max allocated, untiled against exact and exact with recompute, each in
# its own process, and their times side by side at 2048 px.
if [ "$DRY" = 1 ]; then
  step tiling $T bash -c "$PY benchmarks/bench_tiling.py memory --sizes 64 --tile 32 --extrapolate \
    > $OUT/json/tiling-memory.json && $PY benchmarks/bench_tiling.py speed --size 64 --tile 32 --recompute \
    --repeats 1 --warmup 0 > $OUT/json/tiling-speed.json"
else
  step tiling 150 bash -c "$PY benchmarks/bench_tiling.py memory --device cuda --sizes 2048 4096 --tile 512 \
    --extrapolate > $OUT/json/tiling-memory.json && $PY benchmarks/bench_tiling.py speed --device cuda \
    --size 2048 --tile 512 --recompute --repeats 3 > $OUT/json/tiling-speed.json"
fi

# Eager fp32 (cuDNN uses TF32) and bf16 channels_last: fast against standard, interleaved.
bench fp32 $T --against standard --precision fp32 --resolutions $R_MAIN --batch-sizes $B_MAIN
bench bf16-cl $T --against standard --precision bf16 --channels-last --resolutions $R_MAIN --batch-sizes $B_MAIN

# Where the fast decoder's time goes in eager mode, in both layouts.
step profile-decoder 90 bash -c "for layout in '' --channels-last; do $PY benchmarks/bench_cli_profile.py \
  --device $DEV --profile fast --resolution $R_MFU --batch $B_MFU --precision bf16 \$layout --top 12; done \
  | tee $OUT/profile.txt"

# 2048 px, batch 1, as far as the budget goes.
bench bf16-2048 $T --against standard --precision bf16 --resolutions $R_BIG --batch-sizes 1
bench fp32-2048 $T --against standard --precision fp32 --resolutions $R_BIG --batch-sizes 1
if [ "$DRY" = 0 ]; then
  bench compile-2048 100 --backend compile --precision bf16 --channels-last --resolutions $R_BIG --batch-sizes 1
fi

tar -czf "$OUT/bench-json.tar.gz" -C "$OUT" json 2>>"$LOG" && rm -rf "$OUT/json"

# Short table last: the figures that matter, from the JSON just written.
$PY - "$OUT" "$STEPS" <<'EOF' 2>>"$LOG" | tee "$OUT/summary.md"
import io, json, sys, tarfile
out, steps = sys.argv[1], sys.argv[2]
reports = {}
try:
    with tarfile.open(f"{out}/bench-json.tar.gz") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".json") and not m.name.endswith("profile.json"):
                reports[m.name.split("/")[-1][:-5]] = json.load(tar.extractfile(m))
except (OSError, tarfile.TarError) as exc:
    print(f"no bench JSON: {exc}")
print("## gpu_check summary\n")
try:
    print("### training\n" + open(f"{out}/train-table.md").read())
except OSError:
    print("### training: no report\n")
reports.pop("train-report", None)
other = {k: reports.pop(k) for k in list(reports) if "cases" not in reports[k]}
variants = other.pop("decoder-variants", None)
if variants:
    print(f"### decoder kernel variants: {variants['title']}\n")
    print("| variant | layout | backend | median ms | img/s | GFLOP/img | TFLOP/s | MFU | baseline-FLOP MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in variants["rows"]:
        pct = lambda key: f"{v[key] * 100:.1f}%" if key in v else "-"
        print(f"| {v['variant']} | {v['layout']} | {v['backend']} | {v['median_ms']:.2f} | {v['images_per_s']:.1f} | "
              f"{v['gflop_per_image']:.0f} | {v['tflops']:.1f} | {pct('mfu')} | {pct('baseline_flop_mfu')} |")
    prof = variants.get("compiled_profile")
    if prof:
        print(f"\ncompiled kernels, {prof['ms_per_call']:.1f} ms per call: " + ", ".join(
            f"{k} {v['ms']:.1f} ms ({v['share'] * 100:.0f}%)" for k, v in prof["kinds"].items()))
    print()
for name, r in other.items():
    if "end_to_end_vs_compute" in r:
        extra = f", / one-stream loop = {r['end_to_end_vs_compute_one_stream']:.3f} ({r['compute_streams']})" if r.get("compute_streams") else ""
        print(f"- {name} ({r.get('op', 'encode')}){extra}: {r['images']} images at {r['size']} px, batch {r['batch_size']}, {r['precision']}, reading "
              f"{r.get('reading')}: end to end / compute = {r['end_to_end_vs_compute']:.3f}, / naive = "
              f"{r['end_to_end_vs_naive']:.2f}x, img/s {r['images_per_second']}")
    elif "one_core_images_per_s" in r:
        loaders = ", ".join(f"{w} workers {v['images_per_s']:.0f}" for w, v in r.get("loader_uint8", {}).items())
        gpu = ", ".join(f"{w} workers {v['images_per_s']:.0f}" for w, v in r.get("loader_gpu_decode", {}).items())
        print(f"- input at {r['size']} px ({r['cores']} cores): one core {r['one_core_images_per_s']:.1f} img/s; "
              f"loader uint8 {loaders}; GPU decode {gpu or '-'}; nvJPEG alone {r.get('nvjpeg_batch_images_per_s', 0):.0f}"
              f"; data.decode auto picks {r.get('decode_auto', '-')}")
print()
for name, r in reports.items():
    peak = r.get("peak") or {}
    env = r.get("environment", {})
    print(f"device: {(env.get('gpus') or [env.get('cpu')])[0]}, torch {env.get('torch')}, "
          f"matmul peak {peak.get('tflops', 0):.1f} TFLOP/s ({peak.get('dtype')})\n")
    break
print("| run | case | median ms | img/s | TFLOP/s | MFU | speedup (FLOP ratio) |")
print("|---|---|---|---|---|---|---|")
seen = set()
for name, r in reports.items():
    comps = {(c["what"], c["resolution"], c["batch"]): c for c in r.get("comparisons", [])}
    for c in r["cases"]:
        if c["role"] != "ours" and name != "diffusers":
            continue
        if c["status"] != "ok":
            said = (name, c["subject"], c["backend"], c["reason"])
            if said not in seen:
                seen.add(said)
                print(f"| {name} | {c['key']} (and alike) | {c['status']}: {c['reason']} | | | | |")
            continue
        comp = comps.get((c["what"], c["resolution"], c["batch"])) if c["role"] == "ours" else None
        sp = f"{comp['speedup']:.2f}x ({comp['flop_ratio']:.2f}x)" if comp else ""
        mfu = f"{c['mfu'] * 100:.1f}%" if c.get("mfu") is not None else "-"
        print(f"| {name} | {c['key']} | {c['median_ms']:.2f} | {c['images_per_s']:.1f} | {c['tflops']:.1f} | "
              f"{mfu} | {sp} |")
    for comp in r.get("comparisons", []):
        if comp["what"] == "encode+decode":
            print(f"| {name} | {comp['ours']} vs {comp['against']} encode+decode {comp['resolution']}px "
                  f"b{comp['batch']} | {comp['ours_ms']:.2f} vs {comp['against_ms']:.2f} | | | | "
                  f"{comp['speedup']:.2f}x ({comp['flop_ratio']:.2f}x) |")
print("\n| step | status | s |\n|---|---|---|")
for line in open(steps).read().splitlines()[1:]:
    print("| " + " | ".join(line.split("\t")) + " |")
EOF
