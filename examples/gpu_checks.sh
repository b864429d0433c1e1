#!/usr/bin/env bash
# GPU checks of issue 15 (docs/SPEED.md, docs/DISTRIBUTED.md): `fewstep bench` of CD on a DiT-B/2-size student at
# the token count of 256x256 latents, bf16, without and with torch.compile (images/s, step-time split, peak
# memory, MFU), then a 2-GPU DDP run when two GPUs are present, then the peak memory of DMD2-LoRA on an
# SDXL-architecture UNet (issue 12). Writes JSON reports and a Markdown table into $OUT.
#
#   bash examples/gpu_checks.sh            # on a GPU machine, from the repository root
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
