#!/usr/bin/env bash
# The CUDA checks in one prepared run, for a machine with one NVIDIA GPU:
#   1. the trainer end to end on the GPU under torchrun (NCCL process group, GPU-resident data,
#      bf16 autocast): straight through, and killed mid-step then resumed, weights compared;
#      evaluate.py on the GPU must give the accuracy the trainer logged; the GPU checkpoint
#      predicted on the CPU;
#   2. the README's first command (synthetic data, the defaults) on the GPU;
#   3. bench/throughput.py for cnn and vgg16, eager and with torch.compile.
#
#     bash bench/gpu_check.sh [OUT_DIR]        # default OUT_DIR: bench/gpu_out
#
# Each part has its own time limit and writes its log to OUT_DIR as it goes, so a part that
# fails or runs long leaves the others' results.
set -u
out=${1:-bench/gpu_out}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
work=$(mktemp -d)

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.txt, report the exit code
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    tail -n 12 "$out/$name.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0))"
    nproc
} 2>&1 | tee "$out/env.txt"

# 1. torchrun, 1 process: NCCL, bf16, data on the GPU. Run a goes straight through; run b is
#    killed with SIGKILL mid-step at step 20 (last.pt saved every 8 steps), and the same command
#    again resumes it.
tr=($py -m torch.distributed.run --nproc_per_node=1 --master_port=29511 train/main.py
    --config configs/smoke.yaml log.progress=lines train.save_every_steps=8)
part torchrun_straight 120 "${tr[@]}" log.run_dir="$work/a"
SCAFFOLD_FAULT=step@20 part torchrun_killed 120 "${tr[@]}" log.run_dir="$work/b"
part torchrun_resumed 120 "${tr[@]}" log.run_dir="$work/b"
$py - "$work" <<'EOF' 2>&1 | tee "$out/smoke_checks.txt"
import json, sys, torch
from pathlib import Path
work = Path(sys.argv[1])
for run in ("a", "b"):
    lines = [json.loads(l) for l in (work / run / "metrics.jsonl").read_text().splitlines()]
    print(run, "epochs logged:", [(m["epoch"], m["step"], round(m["test_acc"], 4)) for m in lines])
a, b = (torch.load(work / r / "checkpoints" / "last.pt", map_location="cpu", weights_only=True) for r in ("a", "b"))
diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
same = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
print(f"straight vs killed+resumed: weights equal {same}, max abs diff {diff:.3g}")
print("progress:", b["progress"]["epoch"], b["progress"]["step"])
from PIL import Image
Image.new("RGBA", (50, 40), (200, 30, 30, 128)).save(work / "red.png")
EOF
part evaluate_gpu 120 $py infer/evaluate.py --checkpoint "$work/b/checkpoints/last.pt" --json
part predict_cpu 120 $py infer/predict.py --checkpoint "$work/b/checkpoints/last.pt" --device cpu "$work/red.png"
grep -o '"test_acc": [0-9.]*' "$work/b/metrics.jsonl" | tail -1 | tee -a "$out/summary.txt"
grep -o '"accuracy": [0-9.]*' "$out/evaluate_gpu.txt" | head -1 | tee -a "$out/summary.txt"

# 2. the README's first command, on the GPU
part readme_train 150 $py train/main.py data.name=synthetic log.run_dir="$work/readme" log.progress=lines log.graph=false

# 3. throughput: eager, then compiled
part bench_eager 170 $py bench/throughput.py --models cnn,vgg16 --rounds 4 --ddp-epochs 0 --json "$out/gpu_eager.json"
part bench_compile 220 $py bench/throughput.py --models cnn,vgg16 --rounds 3 --ddp-epochs 0 --compile --json "$out/gpu_compile.json"
cat "$out/summary.txt"
