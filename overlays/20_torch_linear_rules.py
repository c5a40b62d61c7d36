"""torch-linear-rules: Marlin and FP8 ops in the optimize rules become ops that run below sm80.

Marlin kernels (KLinearMarlin, VLinearMarlin, KExpertsMarlin) use sm80 tensor-core
instructions; KLinearFP8 needs fp8 GEMMs (sm89+). Below sm80 the rules must name ops that run
there: every GPU linear (Marlin, FP8, and KLinearTorch, which would hold an fp16 copy of a
quantized weight) becomes KLinearGGUF (overlay ``gguf-linear``: computes from the GGUF blocks,
or behaves as KLinearTorch with ``KTLEGACY_GPU_LINEAR=fp16`` and for unquantized tensors), and
KExpertsMarlin becomes KExpertsTorch. The edit is textual, anchored on the ``generate_op:`` /
``prefill_op:`` keys, so comments and layout stay as they were; the rule files parsed before and
after differ only in those op values, which the overlay checks. The Python defaults of the same
arguments (``generate_op="KLinearMarlin"``) change too.

``lm_head``: where a rule file leaves it a plain ``torch.nn.Linear`` on a GPU (no rule, or a
``class: "default"`` rule, the form every DeepSeek rule file uses), upstream loads it as fp16
(DeepSeek-V3: 1.8 GiB). The overlay puts one rule in front of the file that makes it a
KTransformersLinear with KLinearGGUF on the same devices, so its blocks stay quantized too; the
parsed file is then that rule followed by the original rules (checked).
"""

import re
from pathlib import Path

import yaml

from ktlegacy.core.gpu_linear import GPU_LINEAR_OP, SM80_ONLY, lm_head_devices, lm_head_rule
from ktlegacy.core.gpu_linear import PATCHED_OP as TORCH_EQUIVALENT  # op -> the op the patched rules name
from ktlegacy.core.overlay import Overlay

RULES_GLOBS = ("ktransformers/optimize/optimize_rules/**/*.yaml", "ktransformers/optimize/optimize_rules/**/*.yml")
OPS = "|".join(TORCH_EQUIVALENT)
# One block-style key per line: `generate_op: "KLinearMarlin"  # comment` (quotes optional).
RULE_LINE = re.compile(
    r"^(?P<pre>[ \t]*(?:-[ \t]+)?(?:generate_op|prefill_op)[ \t]*:[ \t]*)(?P<q>[\"']?)(?P<op>" + OPS
    + r")(?P=q)(?P<post>[ \t]*(?:#.*)?)$", re.M)
# Python keyword defaults: `generate_op: str| None = "KLinearMarlin",`
PY_DEFAULT = re.compile(r"(?P<pre>\b(?:generate_op|prefill_op)\s*:\s*str\s*\|\s*None\s*=\s*)(?P<q>[\"'])(?P<op>"
                        + OPS + r")(?P=q)")
PY_FILES = {  # file -> whether the ref must have such a default there
    "ktransformers/operators/linear.py": True,
    "ktransformers/operators/gate.py": False,
    "ktransformers/operators/experts.py": False,
}
REGISTRIES = {  # the ops we name must exist in the tree's op maps
    "ktransformers/operators/linear.py": r"^import ktransformers\.operators\.ktlegacy_gguf_linear\b",  # registers the op
    "ktransformers/operators/experts.py": r'"KExpertsTorch"\s*:\s*KExpertsTorch\b',
}


def _sm80_values(node, path=()):
    """Paths of every scalar in a parsed rule file that names an sm80-only op."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _sm80_values(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _sm80_values(value, path + (i,))
    elif isinstance(node, str) and node in SM80_ONLY:
        yield path


LM_HEAD_RULE = (
    "# ktlegacy: lm_head keeps its GGUF blocks on the GPU too (KLinearGGUF: the last token's logits are a matvec)\n"
    "- match:\n"
    "    name: \"^lm_head$\"\n"
    "    class: torch.nn.Linear\n"
    "  replace:\n"
    "    class: ktransformers.operators.linear.KTransformersLinear\n"
    "    kwargs:\n"
    "      generate_device: \"{generate}\"\n"
    "      prefill_device: \"{prefill}\"\n"
    f"      generate_op: \"{GPU_LINEAR_OP}\"\n"
    f"      prefill_op: \"{GPU_LINEAR_OP}\"\n")


def _only_ops_changed(before, after) -> bool:
    """True if ``after`` is ``before`` with sm80 op values replaced by their equivalents."""
    if isinstance(before, dict):
        return (isinstance(after, dict) and list(before) == list(after)
                and all(_only_ops_changed(before[k], after[k]) for k in before))
    if isinstance(before, list):
        return isinstance(after, list) and len(before) == len(after) and all(
            _only_ops_changed(b, a) for b, a in zip(before, after))
    if isinstance(before, str) and before in TORCH_EQUIVALENT:
        return after == TORCH_EQUIVALENT[before]
    return before == after and type(before) is type(after)


class TorchLinearRulesOverlay(Overlay):
    name = "torch-linear-rules"
    summary = "optimize rules: Marlin/FP8/KLinearTorch linears -> KLinearGGUF (lm_head too), KExpertsMarlin -> KExpertsTorch"

    def shipped_files(self):
        # the op table and the lm_head rule come from the library: a change there changes what this writes
        from ktlegacy.core import gpu_linear
        return [Path(gpu_linear.__file__)]

    def apply(self, tree, ctx):
        for rel, anchor in REGISTRIES.items():
            if not re.search(anchor, tree.read(rel), re.M):
                raise tree.drift(rel, f"the op map entry /{anchor}/")
        rules = sorted({rel for pattern in RULES_GLOBS for rel in tree.glob(pattern)})
        if not rules:
            raise tree.drift("ktransformers/optimize/optimize_rules", "optimize-rule YAML files")
        for rel in rules:
            self._rule_file(tree, rel)
        for rel, required in PY_FILES.items():
            self._python_defaults(tree, rel, required)

    def _rule_file(self, tree, rel):
        text = tree.read(rel)
        try:
            before = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise tree.drift(rel, f"valid YAML ({str(exc).splitlines()[0]})") from None
        counts = {}

        def swap(m):
            counts[m["op"]] = counts.get(m["op"], 0) + 1
            return f'{m["pre"]}{m["q"]}{TORCH_EQUIVALENT[m["op"]]}{m["q"]}{m["post"]}'

        new = RULE_LINE.sub(swap, text)
        after = list(yaml.safe_load_all(new))
        left = [p for doc in after for p in _sm80_values(doc)]
        if left:
            where = "/".join(str(x) for x in left[0])
            raise tree.drift(rel, f"sm80 ops only as block-style generate_op:/prefill_op: values, found one at {where}")
        head = None
        if len(after) == 1 and isinstance(after[0], list):
            devices = lm_head_devices(after[0])
            if devices is not None:
                head = LM_HEAD_RULE.format(generate=devices[0], prefill=devices[1])
                if yaml.safe_load(head) != [lm_head_rule(*devices)]:
                    raise RuntimeError("LM_HEAD_RULE does not parse to ktlegacy.core.gpu_linear.lm_head_rule")
                new = head + new
                after = list(yaml.safe_load_all(new))
                if after[0][:1] != [lm_head_rule(*devices)]:
                    raise tree.drift(rel, "a top-level rule list the lm_head rule can go in front of")
                after = [after[0][1:]]
        if not _only_ops_changed(before, after):
            raise tree.drift(rel, "an edit that changes only op values (the parsed rules differ elsewhere)")
        if counts or head:
            what = ", ".join(f"{op} -> {TORCH_EQUIVALENT[op]} x{n}" for op, n in sorted(counts.items()))
            if head:
                what = (what + "; " if what else "") + f"lm_head -> {GPU_LINEAR_OP} on {devices[0]}"
            tree.write(rel, new, what)

    def _python_defaults(self, tree, rel, required):
        if not tree.exists(rel):
            if required:
                tree.read(rel)  # raises Drift naming the file
            return
        text = tree.read(rel)
        counts = {}

        def swap(m):
            counts[m["op"]] = counts.get(m["op"], 0) + 1
            return f'{m["pre"]}{m["q"]}{TORCH_EQUIVALENT[m["op"]]}{m["q"]}'

        new = PY_DEFAULT.sub(swap, text)
        if counts:
            what = "default " + ", ".join(f"{op} -> {TORCH_EQUIVALENT[op]} x{n}" for op, n in sorted(counts.items()))
            tree.write(rel, new, what)
        elif required and not re.search(r'\bgenerate_op\s*:\s*str\s*\|\s*None\s*=\s*"' + GPU_LINEAR_OP + '"', text):
            raise tree.drift(rel, f'a generate_op default of "KLinearMarlin" (or the patched "{GPU_LINEAR_OP}")')


OVERLAY = TorchLinearRulesOverlay()
