#!/usr/bin/env bash
# The smoke set: tlfeat's two paths end to end, small, with the Python given (a venv holding another
# torch/torchvision, e.g. the oldest pyproject allows). Everything it writes goes to a temporary folder.
#   .ci/smoke.sh /tmp/venv-old/bin/python
set -euo pipefail
PY=${1:?usage: .ci/smoke.sh PYTHON}
cd "$(dirname "$0")/.."
WORK=$(mktemp -d /tmp/tlfeat-smoke-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export TLFEAT_CACHE_DIR=$WORK/cache TLFEAT_RESULTS_DIR=$WORK/results TLFEAT_MODEL_CACHE=$WORK/models
export TLFEAT_DATA_DIR=$WORK/data TLFEAT_OFFLINE=1
tlfeat() { "$PY" -m tlfeat_cli.main "$@"; }

"$PY" -c 'import torch, torchvision; print(f"smoke: torch {torch.__version__}, torchvision {torchvision.__version__}")'
# extract digits: real ImageNet MobileNetV2, ONNX Runtime (the export made with this torch), and torch, at 64 px
tlfeat extract --model mobilenet_v2 --data digits --limit 300 --test-limit 100 --image-size 64 -q
tlfeat extract --model mobilenet_v2 --data digits --limit 300 --test-limit 100 --image-size 64 --backend torch -q
tlfeat fit --clf logreg --model mobilenet_v2 --data digits
tlfeat finetune --model mobilenet_v2 --data digits --strategy head --epochs 1 --limit 100 --test-limit 50 \
    --image-size 32 --batch-size 16 -q
(cd "$WORK" && "$PY" -) <<'EOF'
import numpy as np
import tlfeat

train = tlfeat.load_features("mobilenet_v2", "digits", split="train", limit=300, image_size=64, backend="onnxruntime")
same = tlfeat.load_features("mobilenet_v2", "digits", split="train", limit=300, image_size=64, backend="torch")
assert train.X.shape == (300, 1280) and train.X.dtype == np.float32, train.X.shape
gap = float(np.abs(train.X - same.X).max() / np.abs(same.X).max())
assert gap <= 1e-4, f"ONNX Runtime and torch features differ by {gap:.2e}"
print(f"smoke: load_features {train.X.shape}, ONNX Runtime vs torch {gap:.1e}")
EOF
tlfeat compare --models resnet18:untrained --data digits --methods logreg,finetune:head --limit 60 --test-limit 30 \
    --image-size 32 --epochs 1 --out "$WORK/report" -q
test -s "$WORK/report/report.md"
start=$("$PY" -c 'import time; print(time.time())')
hit=$(tlfeat extract --model mobilenet_v2 --data digits --limit 300 --test-limit 100 --image-size 64 -q)
seconds=$("$PY" -c "import time; print(f'{time.time() - $start:.2f}')")
grep -q "cached, no work done" <<<"$hit"
echo "smoke: cache hit in $seconds s"
echo "smoke: passed"
