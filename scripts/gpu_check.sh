#!/usr/bin/env bash
# GPU check: GPU tests, then `zturbo bench` for fast and standard at 512, 1024 and 2048 with
# eager fp32, bf16 channels_last and torch.compile, diffusers at 1024 bf16, a profiler summary of
# the fast decoder, the other parts' GPU benchmarks where present, and a short table last.
#
#   bash scripts/gpu_check.sh                  # on a GPU machine; needs no network (at most ~7.5 min)
#   bash scripts/gpu_check.sh --cpu-dry-run    # same steps on the CPU at toy sizes, to test the script
#
# Everything lands in $OUT (default ./gpu-out): log.txt, steps.tsv, bench-json.tar.gz (one JSON per
# bench step), profile.txt, summary.md. Each step runs under `timeout` and its status is recorded;
# a failing step never stops the ones after it. BUDGET (seconds, default 450) caps the whole script:
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

BUDGET=${BUDGET:-450}
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
step gpu-tests 120 $PY -m pytest -q -m "gpu or tensorrt" tests/ --continue-on-collection-errors -p no:cacheprovider

# Steps run in priority order; what the time budget leaves out is recorded as skipped.
# Eager fp32 (cuDNN uses TF32) and bf16 channels_last: fast against standard, interleaved.
bench fp32 $T --against standard --precision fp32 --resolutions $R_MAIN --batch-sizes $B_MAIN
bench bf16-cl $T --against standard --precision bf16 --channels-last --resolutions $R_MAIN --batch-sizes $B_MAIN
# bf16 in the default NCHW layout at the MFU target case (eager GroupNorm has no NHWC kernel).
bench bf16 $T --against standard --precision bf16 --resolutions $R_MFU --batch-sizes $B_MFU
# The peer users would otherwise pick: diffusers' AutoencoderKL, same config, weights, inputs, precision.
bench diffusers $T --against diffusers --precision bf16 --resolutions $R_MFU --batch-sizes 1,$B_MFU

# Where the fast decoder's time goes, in both layouts.
step profile-decoder 90 bash -c "for layout in '' --channels-last; do $PY benchmarks/bench_cli_profile.py \
  --device $DEV --profile fast --resolution $R_MFU --batch $B_MFU --precision bf16 \$layout --top 12; done \
  | tee $OUT/profile.txt"

# torch.compile: one graph per shape and part, so only the case that matters most here.
if [ "$DRY" = 1 ]; then
  printf 'bench-compile\tskipped (dry run: inductor on a small CPU takes minutes)\t0\n' >>"$STEPS"
else
  bench compile 180 --backend compile --against standard --precision bf16 --channels-last \
    --resolutions $R_MFU --batch-sizes $B_MFU
fi

# Other parts' GPU benchmarks, where this checkout has them.
for part in train export serve; do
  if [ -f "benchmarks/bench_$part.py" ]; then
    if [ "$DRY" = 1 ]; then
      printf 'bench_%s.py\tskipped (dry run)\t0\n' "$part" >>"$STEPS"
    else
      step "bench_$part.py" 75 $PY "benchmarks/bench_$part.py" --gpu
    fi
  fi
done

# 2048 px, batch 1, as far as the budget goes.
bench bf16-cl-2048 $T --against standard --precision bf16 --channels-last --resolutions $R_BIG --batch-sizes 1
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
