#!/usr/bin/env bash
# Installs the node into ./.venv on a Debian machine (run as root, or with sudo rights for apt).
#   ./install.sh          the node and what it needs to run (DCMTK for the demo's sender)
#   ./install.sh --test   also what the test suite drives: Orthanc (with DICOMweb), dicom3tools,
#                         GDCM, PostgreSQL, Chromium, pytest, ruff, mypy
# Without an NVIDIA GPU it installs the CPU build of torch, never the multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")"

with_test=0
[[ "${1:-}" == "--test" ]] && with_test=1

apt_packages=(dcmtk)
if ((with_test)); then
    apt_packages+=(orthanc orthanc-dicomweb dicom3tools libgdcm-tools openssl postgresql chromium)
fi
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # Debian starts Orthanc's and PostgreSQL's system services on install; the node and the tests
    # run their own instances on loopback ports, so the system ones are not needed.
    for svc in orthanc postgresql; do
        $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || $sudo service "$svc" stop >/dev/null 2>&1 || true
    done
fi

python=$(command -v python3.11 || command -v python3)
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "install.sh: Python 3.11 or newer is needed ($python is older)" >&2; exit 1; }
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q)

torch_version=2.13.0
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" "torch==$torch_version"              # PyPI's build includes CUDA
    elif .venv/bin/python -m pip download -q --no-deps --no-index -d "$(mktemp -d)" \
            "torch==$torch_version" >/dev/null 2>&1; then
        "${pip[@]}" "torch==$torch_version"              # a CPU wheel this machine keeps locally
    else                                                  # PyTorch's CPU-only index
        "${pip[@]}" "torch==$torch_version+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
    fi
fi
if ((with_test)); then
    "${pip[@]}" -e ".[test]"
else
    "${pip[@]}" -e .
fi
