#!/usr/bin/env bash
# GPU checks of issue 15 (docs/SPEED.md, docs/DISTRIBUTED.md): `fewstep bench` of CD on a DiT-B/2-size student at
# the token count of 256x256 latents, bf16, without and with torch.compile (images/s, step-time split, peak
# memory, MFU), then a 2-GPU DDP run when two GPUs are present, then the peak memory of DMD2-LoRA on an
# SDXL-architecture UNet (issue 12). Writes JSON reports and a Markdown table into $OUT.
# With two GPUs it ends with the sharded engines (docs/DISTRIBUTED.md): the digits CD recipe with a target network
# for a few fp32 steps under DDP, FSDP2 and DeepSpeed ZeRO-3 (skipped without the deepspeed package), same seed
# and global batch; every per-step loss must agree with DDP's (relative 1e-3: fp32 differs only in summation
# order), and each run must write a checkpoint and an export.
#
#   bash examples/gpu_checks.sh            # on a GPU machine, from the repository root
#   FSDP=0 bash examples/gpu_checks.sh     # without the sharded-engine parity runs
#   SMOKE=1 bash examples/gpu_checks.sh    # a tiny model on the CPU: checks that the script itself runs
set -euo pipefail
OUT=${OUT:-runs/gpu_checks}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
BATCH=${BATCH:-64}
mkdir -p "$OUT"
if [[ "${SMOKE:-0}" == 1 ]]; then
  python examples/make_dit_b2_teacher.py "$OUT" --layers 1 --heads 1 --size 8 --num 64
  BATCH=4 STEPS=1 WARMUP=1 PRECISIONS="no" COMPILE="false"
  EXTRA=(--set train.cpu=true)
else
  python examples/make_dit_b2_teacher.py "$OUT"
  PRECISIONS=${PRECISIONS:-bf16}
  COMPILE=${COMPILE:-"false true"}
  EXTRA=()
fi
cat > "$OUT/cd_dit_b2.yaml" <<YAML
# CD on a random DiT-B/2-size teacher: speed only (examples/gpu_checks.sh)
method: {name: cd, num_scales: 18, solver: heun}
teacher: {pretrained: teacher}
data: {source: data.npz}
train: {total_nimg: 100000, batch_size: $BATCH, log_every_nimg: 100000}
validation: {teacher_steps: null}
YAML
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
for mp in $PRECISIONS; do
  for compile in $COMPILE; do
    fewstep bench "$OUT/cd_dit_b2.yaml" --steps "$STEPS" --warmup "$WARMUP" "${EXTRA[@]}" \
      --set "train.mixed_precision='$mp'" --set train.compile="$compile" --out "$OUT/bench_${mp}_compile-${compile}.json"
  done
done
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [[ "$GPUS" -ge 2 ]]; then
  accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 -m fewstep.cli bench \
    "$OUT/cd_dit_b2.yaml" --steps "$STEPS" --warmup "$WARMUP" --set train.mixed_precision=bf16 \
    --set train.batch_size=$((2 * BATCH)) --out "$OUT/bench_bf16_2gpu.json"
else
  echo "fewer than 2 GPUs: no 2-process run"
fi
ls -l "$OUT"/bench_*.json
# Issue 12 (docs/MEMORY.md): DMD2-LoRA, generator and critic adapters on one frozen base, on an SDXL-architecture
# UNet (random weights, 2.57 B parameters), bf16, 128x128 latents (the latent size of 1024x1024 images), batch 1:
# peak GPU memory allocated, without and with gradient checkpointing (goal: fits in 80 GB).
if [[ "${SMOKE:-0}" == 1 ]]; then SDXL=(--width 0.1 --latent 16 --precision no); else SDXL=(--width 1 --latent 128 --precision bf16); fi
python examples/memory_bench.py --family sdxl "${SDXL[@]}" --batch 1 --methods dmd2 --modes lora lora+gc \
  --out "$OUT/memory_sdxl_dmd2_lora.md"
# Issue 15 item 2 (docs/DISTRIBUTED.md): loss parity of FSDP2 and ZeRO-3 against DDP on two GPUs.
if [[ "$GPUS" -ge 2 && "${FSDP:-1}" == 1 && "${SMOKE:-0}" != 1 ]]; then
  PARITY_STEPS=${PARITY_STEPS:-5}
  # CD with a target (student, target and EMA all sharded under FSDP2), one log line per step, fp32
  PARITY=(recipes/digits/cd.yaml --set method.target_ema=0.9 --set train.batch_size=32
          --set train.total_nimg=$((32 * PARITY_STEPS)) --set train.log_every_nimg=32 --set train.mixed_precision=no)
  declare -A ENGINE_FLAGS=([ddp]="--multi_gpu" [fsdp2]="--use_fsdp --fsdp_version 2"
                           [zero3]="--use_deepspeed --zero_stage 3")
  ENGINES="ddp fsdp2"
  if python -c "import deepspeed" 2>/dev/null; then ENGINES="$ENGINES zero3"; else echo "no deepspeed: no ZeRO-3 run"; fi
  for engine in $ENGINES; do
    rm -rf "$OUT/parity_$engine"
    # shellcheck disable=SC2086  # the flags are separate words
    accelerate launch ${ENGINE_FLAGS[$engine]} --num_processes 2 --num_machines 1 --mixed_precision no \
      -m fewstep.cli distill "${PARITY[@]}" --run-dir "$OUT/parity_$engine"
  done
  # shellcheck disable=SC2086
  python - "$OUT" $ENGINES <<'PY'
import json
import sys
from pathlib import Path

out, engines = Path(sys.argv[1]), sys.argv[2:]


def losses(engine):
    rows = [json.loads(line) for line in (out / f"parity_{engine}" / "metrics.jsonl").read_text().splitlines()]
    return [(r["nimg"], r["student/loss"]) for r in rows if "student/loss" in r]


ddp = losses("ddp")
assert ddp, "the DDP run logged no student/loss"
failed = False
for engine in engines[1:]:
    got, run = losses(engine), out / f"parity_{engine}"
    worst = max((abs(a - b) / max(abs(b), 1e-12) for (_, a), (_, b) in zip(got, ddp)), default=float("inf"))
    ok = [n for n, _ in got] == [n for n, _ in ddp] and worst <= 1e-3
    ok = ok and any(run.glob("checkpoints/step-*")) and any((run / "export").iterdir())
    print(f"{engine}: {len(got)} steps, largest relative loss difference to DDP {worst:.2e}: {'OK' if ok else 'FAILED'}")
    failed |= not ok
(out / "parity.json").write_text(json.dumps({e: losses(e) for e in engines}, indent=1))
sys.exit(1 if failed else 0)
PY
fi
