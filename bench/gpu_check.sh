#!/usr/bin/env bash
# The CUDA checks in one prepared run, for a machine with one NVIDIA GPU; everything lands in one JSON,
# OUT_DIR/gpu_check.json (each part's log beside it):
#   checks   the trainer on the GPU under torchrun (NCCL, data on the GPU): straight, killed mid-step and
#            resumed, weights compared; evaluate.py on the GPU gives the logged accuracy; the GPU
#            checkpoint predicted on the CPU;
#   graphs   train.cuda_graphs=true against the eager step: two eager runs (the run-to-run noise of the
#            GPU's kernels), a graphed run, in fp32 and in bf16; and a graphed run resumed at an epoch
#            boundary against a straight one: weights compared (max abs difference, allclose at the tests'
#            tolerance, rtol 1e-3 atol 2e-4), test accuracy;
#   bench    bench/throughput.py for the cnn (project, project+graphs, limit, limit+eval, limit+graphs,
#            seed, lightning; 3 rounds) and vgg16 (project, limit, seed, lightning; 2 rounds), whole runs of
#            1 and 3 (vgg16: 1 and 2) epochs of CIFAR-10's size, and the limit by precision per model.
#
#     bash bench/gpu_check.sh [OUT_DIR]              # default OUT_DIR: bench/gpu_out; about 6 minutes on an H200
#     PARTS="graphs bench_vgg16" bash bench/gpu_check.sh OUT_DIR   # a rerun of some parts only
#
# Parts: checks, graphs, bench_cnn, bench_vgg16, each run under time limits (at most 175, 210, 170 and 220 s;
# expected about 50, 60, 120 and 170 s on an H200).
# A part that fails or runs out of time leaves the others' results; gpu_check.json merges what there is.
set -u
out=${1:-bench/gpu_out}
py=${PYTHON:-python3}
parts=${PARTS:-checks graphs bench_cnn bench_vgg16}
scale=${TIME_SCALE:-1}  # multiplies every part's time limit (a dry run on a slow CPU: TIME_SCALE=10)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d)

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.txt, record the exit code
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout $((limit * scale)) "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "{\"part\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - t0))}" >>"$out/parts.jsonl"
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    tail -n 8 "$out/$name.txt"
}
wants() { [[ " $parts " == *" $1 "* ]]; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
    $py -c "import lightning; print('lightning', lightning.__version__)" 2>/dev/null || echo "lightning not installed"
    nproc
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

if wants checks; then
    # torchrun, 1 process: NCCL, data on the GPU. Run a goes straight through; run b is killed with SIGKILL
    # mid-step at step 20 (last.pt saved every 8 steps), and the same command again resumes it.
    tr=($py -m torch.distributed.run --nproc_per_node=1 --master_port=29511 train/main.py
        --config configs/smoke.yaml log.progress=lines train.save_every_steps=8)
    part checks_straight 45 "${tr[@]}" log.run_dir="$work/a"
    SCAFFOLD_FAULT=step@20 part checks_killed 45 "${tr[@]}" log.run_dir="$work/b"
    part checks_resumed 45 "${tr[@]}" log.run_dir="$work/b"
    part checks_evaluate 20 $py infer/evaluate.py --checkpoint "$work/b/checkpoints/last.pt" --json
    $py -c "from PIL import Image; Image.new('RGBA', (50, 40), (200, 30, 30, 128)).save('$work/red.png')"
    part checks_predict_cpu 20 $py infer/predict.py --checkpoint "$work/b/checkpoints/last.pt" --device cpu "$work/red.png"
    $py - "$work" "$out" >"$out/checks.json" <<'EOF'
import json, sys, torch
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
def last(run):
    return torch.load(work / run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
def results():
    a, b = last("a"), last("b")
    logged = [json.loads(l) for l in (work / "b" / "metrics.jsonl").read_text().splitlines()][-1]
    text = (out / "checks_evaluate.txt").read_text()
    return {
        "killed_and_resumed_equal_straight": all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]),
        "max_abs_diff": max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"]),
        "progress_straight_and_resumed": [[c["progress"]["epoch"], c["progress"]["step"]] for c in (a, b)],
        "logged_test_acc": logged["test_acc"],
        "evaluate_accuracy": json.loads(text[text.index("{"):]).get("accuracy"),
        "predict_cpu": (out / "checks_predict_cpu.txt").read_text().strip().splitlines()[-1:],
    }
try:
    print(json.dumps(results()))
except (OSError, ValueError, KeyError) as e:  # a run that failed: its log says why
    print(json.dumps({"error": str(e)[:200]}))
EOF
    cat "$out/checks.json"
fi

if wants graphs; then
    # eager twice, graphed once (fp32, the cnn's default on CUDA); the same in bf16; a graphed run resumed at
    # an epoch boundary. A step schedule, so that train.epochs=1 then 2 plans the same rates as 2 at once.
    g=($py train/main.py --config configs/smoke.yaml data.augment=[crop,flip] optim.schedule=step optim.step_epochs=1
       optim.gamma=0.5 log.progress=lines log.graph=false)
    part graphs_eager1 30 "${g[@]}" log.run_dir="$work/e1"
    part graphs_eager2 30 "${g[@]}" log.run_dir="$work/e2"
    part graphs_graphed 30 "${g[@]}" train.cuda_graphs=true log.run_dir="$work/g"
    part graphs_bf16_eager 30 "${g[@]}" train.amp=bf16 log.run_dir="$work/be"
    part graphs_bf16_graphed 30 "${g[@]}" train.amp=bf16 train.cuda_graphs=true log.run_dir="$work/bg"
    part graphs_resume_1 30 "${g[@]}" train.cuda_graphs=true train.epochs=1 log.run_dir="$work/r"
    part graphs_resume_2 30 "${g[@]}" train.cuda_graphs=true log.run_dir="$work/r"
    $py - "$work" >"$out/graphs.json" <<'EOF'
import json, sys, torch
from pathlib import Path
work = Path(sys.argv[1])
def weights(run):
    return torch.load(work / run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
def acc(run):
    return [json.loads(l)["test_acc"] for l in (work / run / "metrics.jsonl").read_text().splitlines()]
def compare(x, y):
    try:
        a, b = weights(x), weights(y)
        return {
            "max_abs_diff": max((a[k].float() - b[k].float()).abs().max().item() for k in a),
            "allclose": all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=2e-4) for k in a),
            "test_acc": [acc(x), acc(y)],
        }
    except (OSError, ValueError, KeyError) as e:  # a run that failed: its log says why
        return {"error": str(e)[:200]}
print(json.dumps({
    "fp32 eager vs eager (noise)": compare("e1", "e2"),
    "fp32 eager vs graphed": compare("e1", "g"),
    "bf16 eager vs graphed": compare("be", "bg"),
    "graphed straight vs resumed at epoch 1": compare("g", "r"),
}))
EOF
    cat "$out/graphs.json"
    grep -h "running on:" "$out/graphs_graphed.txt" || true
fi

if wants bench_cnn; then
    part bench_cnn 170 $py bench/throughput.py --models cnn --epochs 1,3 --rounds 3 --baseline-rounds 1 \
        --variants project,project+graphs,limit,limit+eval,limit+graphs,seed,lightning \
        --precision --precision-steps 200 --json "$out/bench_cnn.json"
fi
if wants bench_vgg16; then
    part bench_vgg16 220 $py bench/throughput.py --models vgg16 --epochs 1,2 --rounds 2 --baseline-rounds 1 \
        --variants project,limit,seed,lightning --precision --precision-steps 50 --json "$out/bench_vgg16.json"
fi

$py - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {"env": (out / "env.txt").read_text().splitlines()}
if (out / "parts.jsonl").exists():
    merged["parts"] = [json.loads(l) for l in (out / "parts.jsonl").read_text().splitlines()]
for name in ("checks", "graphs", "bench_cnn", "bench_vgg16"):
    f = out / f"{name}.json"
    try:
        merged[name] = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        merged[name] = {"missing": str(e)[:200]}
(out / "gpu_check.json").write_text(json.dumps(merged, indent=1))
print(f"written {out / 'gpu_check.json'}")
EOF
rm -rf "$work"
