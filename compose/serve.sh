#!/bin/sh
# Entrypoint of the GPU profiles (compose.yaml mounts it read-only): start upstream's ktransformers
# server on the patched rule file named by KTLEGACY_RULES, with the model mounted at /models.
# Each refusal is one line naming what is wrong and how to fix it; the real preflight is
# `invoke doctor` on the host - this only catches what can only be seen inside the container.
# The settings and rule-file checks are ktlegacy/serving.py (the doctor's own), which compose
# mounts beside facts.py at ../ktlegacy/ relative to this file, as in the repository.
set -eu

fail() { echo "ktlegacy serve: error: $*" >&2; exit 2; }

lib="$(dirname "$0")/../ktlegacy/serving.py"
[ -f "$lib" ] || fail "$lib is missing: compose mounts it beside serve.sh (compose/compose.yaml); run serve.sh from a ktlegacy checkout"
models="${KTLEGACY_MODELS_MOUNT:-/models}"   # where compose mounts the model (tests point it elsewhere)

state="${KTLEGACY_STATE_DIR:-/var/lib/ktlegacy}"
mkdir -p "$state/logs" 2>/dev/null || fail "state dir $state is not writable by uid $(id -u): mount a writable tmpfs or volume there"

[ -f "$models/hf/config.json" ] || fail "no config.json in $models/hf: set KTLEGACY_MODEL_DIR in compose/.env to the model's Hugging Face config/tokenizer directory"
ls "$models"/gguf/*.gguf >/dev/null 2>&1 || fail "no *.gguf in $models/gguf: set KTLEGACY_GGUF_DIR in compose/.env to the directory holding the GGUF file(s)"

# Every KTLEGACY_* setting with a type or range (ktlegacy/core/facts.py SETTINGS), including those the
# patched engine reads on every long prompt: refused here in one line, not mid-request. On success
# it prints shell assignments of the server's settings (defaults filled in) and
# `set -- <KTLEGACY_SERVER_ARGS>`: split like a shell line, never glob-expanded, without any flag
# this script sets.
checked=$(python3 "$lib" settings) || exit 2
eval "$checked"

rules="${KTLEGACY_RULES:?KTLEGACY_RULES is empty: name a rule file (compose/.env)}"
case "$rules" in
  /*) ;;  # an absolute path: a rule file the user mounted
  *)
    rules_dir=$(python3 -c 'import os, ktransformers; print(os.path.join(os.path.dirname(ktransformers.__file__), "optimize", "optimize_rules"))') \
      || fail "python3 in this image cannot import ktransformers: is this a ktlegacy runtime image?"
    rules="$rules_dir/$rules"
    ;;
esac
[ -f "$rules" ] || fail "rule file $rules does not exist: set KTLEGACY_RULES to a file of the image's optimize_rules directory or an absolute path"
# sm70/sm75 have no Marlin or FP8 kernels; the image's overlays rewrote them to Torch ops. The
# rules are read as YAML: a commented-out Marlin line is no op.
python3 "$lib" rules "$rules" || exit 2

# Upstream's server builds its logger at import time from ~/.ktransformers/config.yaml (a copy of
# the package's configs/config.yaml), before any --log_dir is parsed, and logs into the package
# directory, which the image's non-root user cannot write. Seed that copy with writable paths.
python3 - "$state" <<'PY' || fail "cannot write ~/.ktransformers/config.yaml under HOME=$HOME: mount a writable tmpfs there"
import os, sys
import yaml, ktransformers
state = sys.argv[1]
with open(os.path.join(os.path.dirname(ktransformers.__file__), "configs", "config.yaml"), encoding="utf-8") as f:
    cfg = yaml.safe_load(f)
cfg.setdefault("log", {})["dir"] = os.path.join(state, "logs")
cfg.setdefault("db", {})["host"] = state
home = os.path.join(os.path.expanduser("~"), ".ktransformers")
os.makedirs(home, exist_ok=True)
with open(os.path.join(home, "config.yaml"), "w", encoding="utf-8") as f:
    yaml.safe_dump(cfg, f)
PY

# "$@" holds KTLEGACY_SERVER_ARGS; the server command goes in front, our flags after them (argparse
# keeps the last value, so none of them can be overridden even by an abbreviation serving.py missed)
if command -v ktransformers >/dev/null 2>&1; then
  set -- ktransformers "$@"
else
  set -- python3 -m ktransformers.server.main "$@"
fi
echo "ktlegacy serve: profile ${KTLEGACY_PROFILE:-?}, rules $rules, cpu_infer $KTLEGACY_CPU_INFER, max_new_tokens $KTLEGACY_MAX_NEW_TOKENS, cache_lens $KTLEGACY_CACHE_LENS, GPU experts from prompts of KTLEGACY_GPU_PREFILL_MIN_TOKENS=${KTLEGACY_GPU_PREFILL_MIN_TOKENS:-(the default)} tokens (auto: measured and logged at the first long prompt)" >&2
exec "$@" \
  --host 0.0.0.0 --port 10002 \
  --model_path "$models/hf" --gguf_path "$models/gguf" \
  --optimize_config_path "$rules" \
  --model_name "$KTLEGACY_MODEL_NAME" \
  --cpu_infer "$KTLEGACY_CPU_INFER" \
  --max_new_tokens "$KTLEGACY_MAX_NEW_TOKENS" \
  --cache_lens "$KTLEGACY_CACHE_LENS" \
  --log_dir "$state/logs" --db_host "$state"
