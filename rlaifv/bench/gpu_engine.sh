#!/usr/bin/env bash
# Issue 18's GPU measurements in one run: `rlaifv bench engine` on the LLaVA-1.5-7B and Qwen2-VL-7B shapes
# (random weights built from configs on the device, bf16, 128-token answers, N = 1, 4, 8, 16, naive at N = 8,
# the LoRA pair, 8 concurrent best-of-8 requests). docs/performance.md, "GPU", says how to run it.
#
#   rlaifv/bench/gpu_engine.sh prepare   # here, with a registry: wheels of our pinned transformers & co into
#                                        # .cache/gpu-wheels (the GPU machine has transformers 5.17, no registry)
#   rlaifv/bench/gpu_engine.sh check     # anywhere: the same code path on tiny shapes (CPU is fine), ~1 minute
#   rlaifv/bench/gpu_engine.sh run       # on the GPU machine: results in $OUT (or runs/gpu-engine)
#
# With the `run` tool: carry [".cache/gpu-wheels"], timeout_s 600, command "rlaifv/bench/gpu_engine.sh run".
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=.cache/gpu-wheels
MODE=${1:-run}
PY=${PYTHON:-python3}
# The GPU machine's python runs `run` (its CUDA torch); prepare and check use ours where there is one.
[ -x .venv/bin/python ] && [ "$MODE" != run ] && PY=.venv/bin/python
# transformers 5.23 (ours; 5.17 lacks what the tiny families and processors here rely on) and a hub both accept.
# A pin without a version is installed only where the package is missing.
PINNED=(transformers==5.23.0 huggingface_hub==1.33.0 tokenizers==0.23.3 safetensors==0.8.0 peft==0.21.2
        pydantic==2.14.4 pydantic-core==2.50.5 typing-extensions==4.16.0 typing-inspection annotated-types
        typer==0.29.2 rich==15.0.0 click shellingham markdown-it-py mdurl pygments annotated-doc accelerate)

case "$MODE" in
prepare)
  rm -rf "$WHEELS"  # a changed pin must not leave two versions of a package for pip to choose between
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps -d "$WHEELS" "${PINNED[@]}"
  for v in 3.10 3.11 3.12 3.13; do  # compiled per Python version (tokenizers and safetensors are abi3)
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$v" --platform manylinux2014_x86_64 \
      -d "$WHEELS" pydantic-core==2.50.5
  done
  du -sh "$WHEELS"
  ;;
check)
  PYTHONPATH=. "$PY" -m rlaifv.bench.engine --shape llava-tiny,qwen2-vl-tiny --device cpu --dtype bfloat16 \
    --threads 1 --n 1,8 --answer-tokens 16 --repeats 1 --naive-repeats 1 --concurrency 2 --output "${OUT:-runs/gpu-engine-check}/engine.json"
  ;;
run)
  out=${OUT:-runs/gpu-engine}
  mkdir -p "$out"
  site=$(mktemp -d)
  # Install, beside the machine's own packages, each pinned wheel whose version differs or is missing.
  "$PY" - "$WHEELS" "$site" "${PINNED[@]}" <<'EOF' 2>&1 | tee "$out/setup.log"
import importlib.metadata as md, pathlib, subprocess, sys
wheels, site, pins = sys.argv[1], sys.argv[2], sys.argv[3:]
need = []
for pin in pins:
    name, _, version = pin.partition("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or (version and have != version):
        need.append(name)
print("python", sys.version.split()[0], "installing beside the system packages:", need or "nothing")
tag = f"-cp{sys.version_info.major}{sys.version_info.minor}-"
files = [str(p) for p in pathlib.Path(wheels).glob("*.whl")
         if any(p.name.lower().startswith(n.lower().replace("-", "_") + "-") for n in need)
         and ("-cp3" not in p.name or tag in p.name or "-abi3-" in p.name)]
if files:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site, *files])
EOF
  export PYTHONPATH="$site:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  # Everything the benchmark imports, from where the run will import it (the pinned transformers must win).
  "$PY" - <<'EOF' 2>&1 | tee -a "$out/setup.log" || echo "WARNING: an import failed; measuring anyway" | tee -a "$out/setup.log"
import peft, pydantic, PIL, torch, transformers, rlaifv.bench.engine
if transformers.__version__ != "5.23.0":
    print("WARNING: not the pinned transformers 5.23.0:", transformers.__file__)
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "pydantic", pydantic.__version__, torch.cuda.get_device_name())
EOF
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/setup.log" || true
  # One shape per process: a crash in one leaves the other's results. Budget: ~4 minutes each on an H100/H200.
  for shape in llava-7b qwen2-vl-7b; do
    timeout 270 "$PY" -m rlaifv.bench.engine --shape "$shape" --device cuda --repeats 2 --naive-repeats 1 \
      --concurrency 8 --no-claims --output "$out/$shape.json" 2>&1 | grep --line-buffered -v "Loading weights" \
      | tee "$out/$shape.log" || true
  done
  ;;
*)
  echo "usage: $0 prepare|check|run" >&2
  exit 2
  ;;
esac
