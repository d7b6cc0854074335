#!/usr/bin/env bash
# Installs the PyTorch + PEFT peer of bench/trainer into a venv, CPU only, from PyPI:
#   ${PETL_CACHE_DIR:-~/.cache/petl}/venv-bench
# PyPI's Linux torch wheel is a CUDA build whose dependencies are ~2.5 GB of nvidia-* wheels,
# and it cannot even be imported without their .so files. The smallest install that imports and
# runs on CPU: the torch wheel alone (--no-deps, 539 MB) plus inert stand-ins for the CUDA
# libraries it links against (scripts/setup/torch_cuda_stubs.py writes them, ~1 MB); with them
# torch.cuda.is_available() is False and every CPU op is the real one.
# The torch wheel is kept in ${PETL_CACHE_DIR:-~/.cache/petl}/wheels-torch, so rebuilding the venv
# does not download it again.
# Idempotent: a venv whose marker file exists is left as it is; an unfinished one is completed
# (every step below can run again). Needs python3 (3.11 for the pinned wheels), readelf, cc.
set -euo pipefail

cache="${PETL_CACHE_DIR:-$HOME/.cache/petl}"
venv="$cache/venv-bench"
wheels="$cache/wheels-torch"
marker="$venv/.petl-torch-ready"
here="$(cd "$(dirname "$0")" && pwd)"
torch_version="2.15.0"

if [ -f "$marker" ]; then
  echo "torch: venv ready at $venv"
  exit 0
fi

python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --quiet --disable-pip-version-check "$@"; }
pip install --upgrade "pip>=24" "setuptools>=77.0.3"
# Everything that requires torch goes in with --no-deps, or pip would resolve torch's CUDA
# requirements again; their other requirements are listed explicitly below.
mkdir -p "$wheels"
if ! compgen -G "$wheels/torch-$torch_version-*.whl" >/dev/null; then
  pip download --no-deps --dest "$wheels" "torch==$torch_version"
fi
pip install --no-deps --find-links "$wheels" "torch==$torch_version" "peft==0.21.2" "accelerate==1.15.0"
# torch's pure-Python requirements (its Requires-Dist minus the nvidia/cuda/triton wheels), then
# transformers and what peft and accelerate need besides torch.
pip install "filelock" "typing-extensions>=4.13.0" "sympy>=1.13.3" "networkx>=2.5.1" "jinja2" \
  "fsspec>=0.8.5" "numpy" \
  "transformers==5.23.0" "safetensors==0.8.0" "tokenizers==0.23.3" \
  "psutil" "pyyaml" "packaging" "tqdm" "huggingface-hub"

lib="$("$venv/bin/python" -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("torch").origin), "lib"))')"
python3 "$here/torch_cuda_stubs.py" "$lib" "$lib"

"$venv/bin/python" - <<'EOF'
import torch, peft, transformers
assert not torch.cuda.is_available()
x = torch.randn(64, 64, requires_grad=True)
(x @ x).sum().backward()
print(f"torch {torch.__version__} (CPU, {torch.get_num_threads()} threads), "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
EOF
du -sh "$venv" | awk '{print "torch: venv size " $1}'
touch "$marker"
