#!/usr/bin/env bash
# Install secateur from its wheel into one Python environment: torch first (the build this machine needs, so the
# wheel's `torch>=2.4` is already satisfied and pip never swaps it), then the wheel with its pinned dependencies.
#
#   PYTHON=/opt/secateur/bin/python deploy/install.sh dist/secateur-0.1.0-py3-none-any.whl
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 deploy/install.sh secateur-0.1.0-py3-none-any.whl
#
# PYTHON           interpreter of the target environment (a venv's bin/python; default: python3)
# TORCH_SPEC       torch requirement (default: torch==2.13.0)
# TORCH_INDEX_URL  index torch comes from, e.g. PyTorch's CUDA one (default: pip's configured index)
set -euo pipefail

if [[ $# -ne 1 || ! -f $1 ]]; then
    echo "usage: [PYTHON=...] [TORCH_SPEC=...] [TORCH_INDEX_URL=...] $0 WHEEL (one existing .whl)" >&2
    exit 2
fi
wheel=$1
python=${PYTHON:-python3}
pip=("$python" -m pip install --prefer-binary --no-input)
torch_version() { "$python" -c "import torch; print(torch.__version__)"; }

"${pip[@]}" --upgrade pip
"${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
torch=$(torch_version)
"${pip[@]}" "$wheel"
"${pip[@]}" --no-deps --force-reinstall "$wheel"  # a rebuilt wheel of the same version replaces the installed one
if [[ $(torch_version) != "$torch" ]]; then
    echo "install.sh: installing $wheel replaced torch $torch with $(torch_version)" >&2
    exit 1
fi
"$python" -c "import flows.cli, torch; print('secateur installed; torch', torch.__version__, 'cuda', torch.version.cuda)"
