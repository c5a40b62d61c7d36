"""Estimate the VRAM each GPU needs for a GGUF model under a ktransformers rule file.

Model of the estimate (stated, not measured; the doctor prints it):

* **weights**: every tensor is owned by the deepest module of the Hugging Face module tree
  (``blk.3.attn_kv_a_mqa.weight`` -> ``model.layers.3.self_attn.kv_a_proj_with_mqa``). Its device
  is found the way upstream's optimizer places modules: walk from ``model`` down, the first rule
  whose ``match`` fits (``name`` by ``re.search`` on the module name, ``class`` by the kind of
  module) gives the module its ``generate_device``; ``recursive: False`` stops the walk there
  (the experts); a module no rule matches is placed on ``cuda:0``. The rules are read as the rule
  overlay leaves them (``ktlegacy.core.gpu_linear.patched_rules``: every GPU linear, lm_head included,
  is ``KLinearGGUF``). On a GPU, a weight of a KLinearGGUF linear costs its GGUF bytes under
  ``KTLEGACY_GPU_LINEAR=quant`` (the default) when its type is one the kernels decode; every other
  GPU tensor (``fp16`` mode, ``attn_kv_b``, which the attention reads as a dense weight, norms,
  float tensors) costs 2 bytes per element: an fp16 copy. Tensors on ``cpu`` (the routed experts,
  the embedding) cost no VRAM. Each GPU with KLinearGGUF weights also holds their prefill
  scratch: one fp16 buffer as large as the largest such weight, at most
  ``facts.GPU_LINEAR_SCRATCH_MIB`` (larger weights, lm_head, go through it in slices).
* **KV cache**: ``cache_lens`` tokens for each layer whose attention sits on the GPU, fp16; for
  MLA models (DeepSeek V2/V3: GGUF key ``<arch>.attention.kv_lora_rank``) a token costs
  ``(kv_lora_rank + rope dim) * 2`` bytes per layer, otherwise ``2 * kv_heads * head_dim * 2``.
* **prefill activations**: once per GPU that holds attention layers (0.2.1.post1 prefills a
  whole prompt layer by layer), one layer's tensors alive at the peak of an MLA prefill of a
  ``cache_lens``-token prompt in fp16, read off the patched attention (``forward_linux_triton``
  with ``ktlegacy_runtime.sdpa_prefill``), per token: the layer's input and residual
  (``2 * hidden``), ``q`` (``H*(nope+rope)``) and its rotated rope part (``H*rope``), the
  ``kv_b`` output (``H*(nope+v)``), ``query_states``, ``key_states``, the padded values and SDPA's
  output with its contiguous copy (five times ``H*(nope+rope)``); from the tensors' shapes that is
  ``2 * hidden + 7 * H*(nope+rope) + H*v``. DeepSeek-V3 at 8192 tokens: 3.09 GiB. Measured on the
  ``v3-dims`` preset (DeepSeek-V3's layer dimensions, an 8168-token prompt, H100 running Turing
  PTX): 3.23-3.42 GiB of allocations above weights, KV cache and scratch
  (bench/results/gpu_linear_h100.json); the rest is in the runtime term below.
* **routed experts of a long prompt on the GPU** (overlay 68, ``KTLEGACY_GPU_PREFILL_MIN_TOKENS``
  / ``_MIB``, defaults in ``ktlegacy/core/facts.py``): when a ``cache_lens``-token prompt reaches the
  threshold, each GPU whose MoE layers run it holds up to ``KTLEGACY_GPU_PREFILL_MIB`` of
  dequantised expert weights plus the prompt's hidden states (fp16 in, fp32 sum: 6 bytes per
  token and hidden unit) and the raw GGUF bytes of the ``STAGED_RUNS`` runs of experts in flight
  (a run's dequantised weights take 10 bytes per weight of one projection: three fp16 projections
  and one fp32 transient; its raw bytes 3 x the GGUF's bytes per weight). ``auto`` counts as on. This happens after the layer's attention, whose intermediates the
  allocator can reuse, so the estimate counts the larger of the two, not both. 0 tokens: not
  counted. DeepSeek-V3 (Q4_K_M) at 8192 tokens: about 1.7 GiB, below its 3.09 GiB of attention.
* **runtime**: :data:`GPU_RUNTIME_MIB` per GPU for the CUDA context, cuBLAS workspaces, the CUDA
  graph pool and allocator slack of the running server: measured 844-953 MiB above weights + KV
  cache per GPU on H200s (CUDA 13, torch 2.11, 1 and 2 GPUs, the server with CUDA graphs,
  bench/results/serve_proof_h200x2_0.2.1.post1.json); Turing/Volta under CUDA 11.8 have a
  smaller context, so this errs high there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .core import gpu_linear
from .core.errors import KtlegacyError
from .core.facts import GPU_LINEAR, GPU_PREFILL_MIB, GPU_PREFILL_MIN_TOKENS

GPU_RUNTIME_MIB = 1024
FP16_BYTES = 2
MIB = 1024 * 1024

# GGUF (llama.cpp) tensor name part -> Hugging Face module path under model.layers.N, and its kind.
_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm", "norm"),
    "ffn_norm": ("post_attention_layernorm", "norm"),
    "attn_q": ("self_attn.q_proj", "linear"),
    "attn_k": ("self_attn.k_proj", "linear"),
    "attn_v": ("self_attn.v_proj", "linear"),
    "attn_q_a": ("self_attn.q_a_proj", "linear"),
    "attn_q_a_norm": ("self_attn.q_a_layernorm", "norm"),
    "attn_q_b": ("self_attn.q_b_proj", "linear"),
    "attn_kv_a_mqa": ("self_attn.kv_a_proj_with_mqa", "linear"),
    "attn_kv_a_norm": ("self_attn.kv_a_layernorm", "norm"),
    "attn_kv_b": ("self_attn.kv_b_proj", "linear"),
    "attn_k_b": ("self_attn.kv_b_proj", "linear"),   # newer GGUFs split kv_b into k_b / v_b
    "attn_v_b": ("self_attn.kv_b_proj", "linear"),
    "attn_output": ("self_attn.o_proj", "linear"),
    "ffn_gate_inp": ("mlp.gate", "gate"),
    "exp_probs_b": ("mlp.gate", "gate"),
    "ffn_gate_exps": ("mlp.experts", "experts"),
    "ffn_up_exps": ("mlp.experts", "experts"),
    "ffn_down_exps": ("mlp.experts", "experts"),
    "ffn_gate_shexp": ("mlp.shared_experts.gate_proj", "linear"),
    "ffn_up_shexp": ("mlp.shared_experts.up_proj", "linear"),
    "ffn_down_shexp": ("mlp.shared_experts.down_proj", "linear"),
    "ffn_gate": ("mlp.gate_proj", "linear"),
    "ffn_up": ("mlp.up_proj", "linear"),
    "ffn_down": ("mlp.down_proj", "linear"),
}
_TOP_TENSORS = {
    "token_embd": ("model.embed_tokens", "embedding"),
    "output_norm": ("model.norm", "norm"),
    "output": ("lm_head", "linear"),
}


@dataclass(frozen=True)
class Tensor:
    name: str
    n_elements: int
    n_bytes: int
    ggml_type: str = "F16"   # GGUF type name (gguf-py's GGMLQuantizationType)


@dataclass
class GgufModel:
    files: list[Path]
    tensors: list[Tensor]
    metadata: dict            # scalar header fields we use
    total_bytes: int          # sum of the file sizes

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def meta(self, key: str, default=None):
        return self.metadata.get(f"{self.arch}.{key}", default)


def read_gguf(directory: Path) -> GgufModel:
    """The header of every ``*.gguf`` in ``directory`` (split GGUFs are several files)."""
    from gguf import GGUFReader   # numpy-heavy: import only when estimating

    directory = Path(directory)
    files = sorted(directory.glob("*.gguf")) if directory.is_dir() else []
    if not files:
        raise KtlegacyError(f"no *.gguf file in {directory}: set KTLEGACY_GGUF_DIR (or --gguf-dir) "
                            "to the directory holding the model's GGUF file(s)")
    tensors, metadata = [], {}
    for path in files:
        try:
            reader = GGUFReader(str(path), "r")
        except Exception as exc:  # a truncated or foreign file: say which
            raise KtlegacyError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                                "re-download it") from None
        for key, fld in reader.fields.items():
            if key not in metadata and len(fld.types) == 1 and fld.data:
                value = fld.parts[fld.data[0]]
                metadata[key] = (bytes(value).decode("utf-8", "replace") if fld.types[0].name == "STRING"
                                 else value.tolist()[0] if len(value) == 1 else None)
        tensors += [Tensor(t.name, int(t.n_elements), int(t.n_bytes), t.tensor_type.name) for t in reader.tensors]
    return GgufModel(files, tensors, metadata, sum(p.stat().st_size for p in files))


def module_for_tensor(name: str, moe_layers: set[int]) -> list[tuple[str, str]] | None:
    """The chain of (module name, kind) from ``model`` down to the tensor's owner, or None."""
    base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    if base in _TOP_TENSORS:
        path, kind = _TOP_TENSORS[base]
        if path == "lm_head":
            return [("lm_head", kind)]
        return [("model", "model"), (path, kind)]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if not m or m.group(2) not in _LAYER_TENSORS:
        return None
    layer, (sub, kind) = int(m.group(1)), _LAYER_TENSORS[m.group(2)]
    prefix = f"model.layers.{layer}"
    chain = [("model", "model"), ("model.layers", "layers"), (prefix, "decoder_layer")]
    parts = sub.split(".")
    kinds = {"self_attn": "attention", "mlp": "moe" if layer in moe_layers else "mlp",
             "shared_experts": "mlp"}
    for i, part in enumerate(parts[:-1]):
        chain.append((prefix + "." + ".".join(parts[:i + 1]), kinds.get(part, part)))
    chain.append((prefix + "." + sub, kind))
    return chain


def rule_kind(cls: str) -> str | None:
    """The kind of module a rule's ``match.class`` selects (None: a class we cannot place)."""
    last = cls.rsplit(".", 1)[-1]
    for suffix, kind in (("MoEGate", "gate"), ("MoE", "moe"), ("MLP", "mlp"), ("RotaryEmbedding", "rotary"),
                         ("Attention", "attention"), ("RMSNorm", "norm"), ("Embedding", "embedding"),
                         ("DecoderLayer", "decoder_layer"), ("Model", "model")):
        if last.endswith(suffix):
            return kind
    return "linear" if last == "Linear" else None


def load_rules(text: str, where: str = "rule file") -> list[dict]:
    try:
        rules = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KtlegacyError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(rules, list) or not all(isinstance(r, dict) and "match" in r for r in rules):
        raise KtlegacyError(f"{where} is not a ktransformers rule list (each item needs match/replace)")
    return rules


def _device(d) -> str:
    d = str(d or "cuda:0")
    return "cuda:0" if d == "cuda" else d


def placement(chain: list[tuple[str, str]], rules: list[dict]) -> tuple[str, str | None]:
    """(generate device, generate op) of the module that owns a tensor (see the module
    docstring); the op is the owner's own rule's ``generate_op`` when that rule injects it as a
    KTransformersLinear, else None."""
    device, op = "cuda:0", None
    for i, (name, kind) in enumerate(chain):
        device, op, stop = "cuda:0", None, False
        for rule in rules:
            match = rule["match"]
            if "class" in match and rule_kind(match["class"]) != kind:
                continue
            if "name" in match and re.search(match["name"], name) is None:
                continue
            replace = rule.get("replace") or {}
            kwargs = replace.get("kwargs") or {}
            device = _device(kwargs.get("generate_device"))
            if i == len(chain) - 1 and replace.get("class") == gpu_linear.LINEAR_CLASS:
                op = kwargs.get("generate_op")
            stop = rule.get("recursive") is False
            break
        if stop:
            break
    return device, op


def place(chain: list[tuple[str, str]], rules: list[dict]) -> str:
    """The generate device of the module that owns a tensor (see the module docstring)."""
    return placement(chain, rules)[0]


def rule_devices(rules: list[dict]) -> set[str]:
    """Every cuda device a rule file names."""
    out = set()
    for rule in rules:
        kwargs = (rule.get("replace") or {}).get("kwargs") or {}
        for key in ("generate_device", "prefill_device", "out_device"):
            if str(kwargs.get(key, "")).startswith("cuda"):
                out.add(_device(kwargs[key]))
        for dev in (kwargs.get("transfer_map") or {}).values():
            out.add(_device(dev))
    return out


@dataclass
class Estimate:
    weights_mib: dict[str, float] = field(default_factory=dict)   # device -> MiB of weights (GGUF blocks or fp16)
    kv_mib: dict[str, float] = field(default_factory=dict)        # device -> MiB of KV cache
    prefill_mib: dict[str, float] = field(default_factory=dict)   # device -> MiB of prefill activations
    experts_prefill_mib: dict[str, float] = field(default_factory=dict)  # device -> MiB of the GPU experts path
    scratch_mib: dict[str, float] = field(default_factory=dict)   # device -> MiB of KLinearGGUF's prefill scratch
    fp16_weights_mib: dict[str, float] = field(default_factory=dict)  # device -> MiB the weights take as fp16
    linear_mode: str = GPU_LINEAR                                 # KTLEGACY_GPU_LINEAR the estimate assumed
    cpu_bytes: int = 0                                            # bytes that stay in host RAM
    unplaced: list[str] = field(default_factory=list)             # tensor names we could not map
    devices_in_rules: set[str] = field(default_factory=set)

    def prefill_peak_mib(self, device: str) -> float:
        """A long prompt's transient memory: the attention's or the GPU experts path's, the larger."""
        return max(self.prefill_mib.get(device, 0.0), self.experts_prefill_mib.get(device, 0.0))

    def need_mib(self, device: str) -> float:
        return (self.weights_mib.get(device, 0.0) + self.kv_mib.get(device, 0.0) + self.scratch_mib.get(device, 0.0)
                + self.prefill_peak_mib(device) + GPU_RUNTIME_MIB)

    @property
    def gpu_devices(self) -> list[str]:
        devs = set(self.weights_mib) | set(self.kv_mib) | self.devices_in_rules
        return sorted((d for d in devs if d.startswith("cuda")), key=lambda d: int(d.split(":")[1]))


STAGED_RUNS = 2   # overlay 68's staging: the run being computed and the next one (or the next layer's first)


def estimate(model: GgufModel, rules: list[dict], cache_lens: int, gpu_prefill_min_tokens=GPU_PREFILL_MIN_TOKENS,
             gpu_prefill_mib: int = GPU_PREFILL_MIB, linear_mode: str = GPU_LINEAR) -> Estimate:
    """The VRAM each GPU needs (see the module docstring); ``linear_mode``: KTLEGACY_GPU_LINEAR."""
    rules = gpu_linear.patched_rules(rules)
    est = Estimate(devices_in_rules=rule_devices(rules), linear_mode=linear_mode)
    names = [t.name for t in model.tensors]
    moe_layers = {int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.ffn_\w+_exps\.", n))}
    attn_device: dict[int, str] = {}
    for t in model.tensors:
        chain = module_for_tensor(t.name, moe_layers)
        op = None
        if chain is None:
            # unknown to us: assume the worst (it lands on cuda:0 in fp16) and say so
            est.unplaced.append(t.name)
            device = "cuda:0"
        else:
            device, op = placement(chain, rules)
            if len(chain) > 3 and chain[3][1] == "attention":
                attn_device.setdefault(int(chain[2][0].rsplit(".", 1)[1]), device)
        if device.startswith("cuda"):
            size = gpu_linear.weight_bytes(t.n_elements, t.n_bytes, t.ggml_type, op, linear_mode)
            est.weights_mib[device] = est.weights_mib.get(device, 0.0) + size / MIB
            est.fp16_weights_mib[device] = est.fp16_weights_mib.get(device, 0.0) + t.n_elements * FP16_BYTES / MIB
            if size != t.n_elements * FP16_BYTES:  # a KLinearGGUF weight kept as blocks: it needs the scratch
                est.scratch_mib[device] = max(est.scratch_mib.get(device, 0.0),
                                              gpu_linear.scratch_bytes(t.n_elements) / MIB)
        else:
            est.cpu_bytes += t.n_bytes
    # "auto" may pick any length (the estimate assumes the GPU path); raw bytes per expert weight
    threshold = 1 if str(gpu_prefill_min_tokens).strip().lower() == "auto" else int(gpu_prefill_min_tokens)
    experts = [t for t in model.tensors if re.match(r"blk\.\d+\.ffn_\w+_exps\.", t.name)]
    raw_per_value = sum(t.n_bytes for t in experts) / max(1, sum(t.n_elements for t in experts))
    per_token = _kv_bytes_per_token_per_layer(model)
    hidden = int(model.meta("embedding_length", 0) or 0)
    for layer, device in attn_device.items():
        if device.startswith("cuda"):
            est.kv_mib[device] = est.kv_mib.get(device, 0.0) + cache_lens * per_token / MIB
            act = cache_lens * _prefill_elements_per_token(model, layer) * FP16_BYTES / MIB
            est.prefill_mib[device] = max(est.prefill_mib.get(device, 0.0), act)
            if layer in moe_layers and 0 < threshold <= cache_lens:
                est.experts_prefill_mib[device] = (gpu_prefill_mib * (1 + STAGED_RUNS * 3 * raw_per_value / 10)
                                                   + cache_lens * hidden * 6 / MIB)
    return est


def _prefill_elements_per_token(model: GgufModel, layer: int) -> int:
    """fp16 elements one prompt token needs in one layer's attention during prefill."""
    prefix = f"blk.{layer}."
    n = {t.name[len(prefix):].split(".")[0]: t.n_elements for t in model.tensors if t.name.startswith(prefix)}
    hidden = int(model.meta("embedding_length", 0) or 0)
    rank = int(model.meta("attention.kv_lora_rank", 0) or 0)
    if rank and "attn_kv_b" in n and hidden:
        kv_b_rows = n["attn_kv_b"] // rank                              # H * (nope + v)
        if "attn_q_b" in n and n.get("attn_q_a_norm"):
            q_rows = n["attn_q_b"] // n["attn_q_a_norm"]                # H * (nope + rope)
        else:
            q_rows = n.get("attn_q", 0) // hidden
        o_in = n.get("attn_output", 0) // hidden                        # H * v
        rope = q_rows - (kv_b_rows - o_in)                              # H * rope
        # input + residual, q, rotated q_pe, kv_b output, query/key/padded value states, SDPA out + copy
        return 2 * hidden + q_rows + rope + kv_b_rows + 5 * q_rows
    return 4 * hidden                                                   # q, k, v, output


def _kv_bytes_per_token_per_layer(model: GgufModel) -> int:
    rank = model.meta("attention.kv_lora_rank")
    if rank:
        return (int(rank) + int(model.meta("rope.dimension_count", 64))) * FP16_BYTES
    heads = int(model.meta("attention.head_count", 1) or 1)
    kv_heads = int(model.meta("attention.head_count_kv", heads) or heads)
    head_dim = int(model.meta("attention.key_length", 0) or int(model.meta("embedding_length", 0)) // heads)
    return 2 * kv_heads * head_dim * FP16_BYTES
