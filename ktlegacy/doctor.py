"""``invoke doctor``: can this host serve a compose profile? One table, a fix on every failing row.

The checks are pure functions of three inputs, so the same code runs against this host and
against hosts recorded in ``tests/fixtures/hosts``:

* :class:`~ktlegacy.hostfacts.HostFacts` - GPUs, container runtime, CPU flags, NUMA memory,
  image labels, ports in use;
* :class:`~ktlegacy.profiles.ServiceSpec` - what ``docker compose --profile P`` resolves to
  (image, GPU ids, rule file, model dirs, port);
* the model: the GGUF header (:mod:`ktlegacy.vram`) and the profile's rule file.

Before any of them, the settings of compose/.env are checked with :mod:`ktlegacy.serving`, the
same code serve.sh runs in the container; a bad value, or compose refusing the file, is a row of
its own and the profile's checks wait until it is fixed (they would judge other values).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from .core.arch import ARCHES
from .core.command import command
from .core.errors import KtlegacyError
from .core.facts import CPU_FLAGS  # the Linux CPU flags each CPU_INSTRUCT build compiles for; the smoke's copy agrees
from .hostfacts import Gpu, HostFacts
from .images import LABEL_ARCH, LABEL_CPU, LABEL_REF, parse_tag
from .profiles import (COMPOSE_DIR, PROFILES, REPO_ROOT, ComposeRejected, ServiceSpec, compose_config,
                       get_profile, read_settings, setting, spec_defaults, spec_from_config)
from .serving import RuleFileError, check_rules, validate
from .vram import GPU_RUNTIME_MIB, GgufModel, Estimate, estimate, load_rules, read_gguf

OK, FAIL, WARN, SKIP = "ok", "FAIL", "warn", "skip"
GIB = 1024 ** 3

# what the least demanding image (AVX2) needs, as "AVX + AVX2 + FMA + F16C"
_LEAST_CPU = " + ".join(flag.upper() for flag in min(CPU_FLAGS.values(), key=len))
# Which failure explains best why a profile cannot run here: the hardware first, then setup.
VERDICT_ORDER = ["GPUs", "GPU arch vs image", "NVIDIA container runtime", "CPU vs image", "RAM vs GGUF",
                 "VRAM per GPU", "settings", "compose config", "image", "rule file", "model dir", "GGUF", "port",
                 "API key"]
LOOPBACK = ("127.0.0.1", "::1", "localhost")
RUNTIME_FIX = ("install the NVIDIA Container Toolkit (nvidia-container-toolkit), run "
               "`nvidia-ctk runtime configure --runtime=docker` and restart dockerd")


@dataclass
class Row:
    check: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Report:
    rows: list[Row]

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == FAIL]

    def table(self) -> str:
        width = max(len(r.check) for r in self.rows)
        lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  {'-' * 40}"]
        for r in self.rows:
            lines.append(f"{r.check:<{width}}  {r.status:<6}  {r.detail}")
            if r.fix and r.status in (FAIL, WARN):
                lines.append(f"{'':<{width}}  {'':<6}  fix: {r.fix}")
        return "\n".join(lines)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB"


def _gpu_text(g: Gpu) -> str:
    return f"{g.index}: {g.name}, cc {g.cc_string}, {g.vram_mib} MiB"


def _profiles_for(arch_name: str) -> str:
    return " or ".join(p.name for p in PROFILES.values() if p.arch_name == arch_name)


# --- host rows ---------------------------------------------------------------------------------

def row_docker(facts: HostFacts) -> Row:
    if facts.docker_runtimes is None:
        return Row("NVIDIA container runtime", FAIL, f"no Docker daemon: {facts.docker_error}",
                   "install Docker (e.g. apt-get install docker.io) and start dockerd, then " + RUNTIME_FIX)
    if not facts.nvidia_runtime:
        return Row("NVIDIA container runtime", FAIL,
                   f"Docker has no NVIDIA runtime (runtimes: {', '.join(sorted(facts.docker_runtimes)) or 'none'}): "
                   "containers cannot get GPUs", RUNTIME_FIX)
    how = "nvidia" if "nvidia" in (facts.docker_runtimes or {}) else facts.nvidia_hook
    return Row("NVIDIA container runtime", OK, f"present ({how})")


def row_gpus_host(facts: HostFacts) -> Row:
    if facts.gpus is None:
        return Row("GPUs", FAIL, f"no NVIDIA GPU usable: {facts.gpu_error}",
                   "run on a host with a V100, T4 or RTX 2080 Ti and the NVIDIA driver installed")
    if not facts.gpus:
        return Row("GPUs", FAIL, "nvidia-smi lists no GPU", "check the driver (nvidia-smi) and the cards")
    return Row("GPUs", OK, f"{len(facts.gpus)}: " + "; ".join(_gpu_text(g) for g in facts.gpus))


def row_cpu_host(facts: HostFacts) -> Row:
    have = [name for name, flags in CPU_FLAGS.items() if set(flags) <= facts.cpu_flags]
    return Row("CPU", OK if have else FAIL,
               f"{facts.cpu_model or 'unknown CPU'}; image CPU sets it can run: {', '.join(have) or 'none'}",
               "" if have else f"ktransformers' CPU experts need at least {_LEAST_CPU}")


def row_ram_host(facts: HostFacts) -> Row:
    nodes = ", ".join(f"node{n} {_gib(kib * 1024)}" for n, kib in sorted(facts.numa_mem_kib.items()))
    return Row("RAM per NUMA node", OK, nodes or "unknown")


# --- profile rows ------------------------------------------------------------------------------

def row_gpus(spec: ServiceSpec, facts: HostFacts) -> tuple[Row, list[Gpu]]:
    p = spec.profile
    if facts.gpus is None or not facts.gpus:
        return row_gpus_host(facts), []
    if len(facts.gpus) < p.gpus:
        others = [q.name for q in PROFILES.values() if q.gpus <= len(facts.gpus)]
        return Row("GPUs", FAIL, f"profile {p.name} needs {p.gpus} GPUs, this host has {len(facts.gpus)} "
                   f"({'; '.join(_gpu_text(g) for g in facts.gpus)})",
                   f"use a profile for {len(facts.gpus)} GPU(s) ({', '.join(others) or 'none fits'}) "
                   f"or a host with {p.gpus} GPUs"), []
    chosen, missing = [], []
    for dev in spec.device_ids:
        gpu = next((g for g in facts.gpus if g.matches(dev)), None)
        if gpu is None:
            missing.append(dev)
        else:
            chosen.append(gpu)
    if missing:
        return Row("GPUs", FAIL, f"device id(s) {', '.join(missing)} name no GPU here "
                   f"(indexes 0-{len(facts.gpus) - 1})",
                   "set KTLEGACY_GPU_0.. in compose/.env to nvidia-smi indexes or UUIDs of this host"), chosen
    if len({g.index for g in chosen}) < len(chosen):
        return Row("GPUs", FAIL, f"device ids {', '.join(spec.device_ids)} name the same GPU twice",
                   "give each KTLEGACY_GPU_n a different GPU"), chosen
    return Row("GPUs", OK, f"{p.name} uses {len(chosen)} of {len(facts.gpus)}: "
               + "; ".join(_gpu_text(g) for g in chosen)), chosen


def image_arch_and_cpu(spec: ServiceSpec, labels: dict | None) -> tuple[str, str]:
    """The image's arch and CPU set: from its labels, else from its tag."""
    labels = labels or {}
    scheme = parse_tag(spec.image)
    arch = labels.get(LABEL_ARCH) or (scheme.arch if scheme else spec.profile.arch_name)
    cpu = labels.get(LABEL_CPU) or (scheme.cpu if scheme else "")
    return arch, cpu.upper()


def row_image(spec: ServiceSpec, facts: HostFacts) -> tuple[Row, dict | None]:
    labels = facts.image_labels(spec.image)
    if labels is None:
        return Row("image", FAIL, f"{spec.image} is not on this host",
                   f"build it: invoke build --arch {spec.profile.arch_name} (or docker pull it; "
                   "KTLEGACY_REF / KTLEGACY_CPU in compose/.env pick the tag)"), None
    arch, cpu = image_arch_and_cpu(spec, labels)
    return Row("image", OK, f"{spec.image} (arch {arch}, CPU {cpu}, ref {labels.get(LABEL_REF, '?')})"), labels


def row_arch(spec: ServiceSpec, gpus: list[Gpu], labels: dict | None) -> Row:
    arch_name, _ = image_arch_and_cpu(spec, labels)
    arch = ARCHES.get(arch_name)
    if arch is None:
        return Row("GPU arch vs image", FAIL, f"{spec.image} is built for {arch_name!r}, not {'/'.join(ARCHES)}",
                   f"use a ktlegacy image (invoke build --arch {'|'.join(ARCHES)})")
    if not gpus:
        return Row("GPU arch vs image", SKIP, f"image is {arch.name} (cc {arch.cc_string}); no GPU to compare")
    for g in gpus:
        if g.cc == (0, 0):
            return Row("GPU arch vs image", FAIL, f"GPU {g.index} ({g.name}): compute capability unknown "
                       "(driver too old to report it, card not in our table)",
                       "update the NVIDIA driver (520+ for CUDA 11.8), which also reports compute_cap")
        if g.cc >= (8, 0):
            return Row("GPU arch vs image", FAIL,
                       f"GPU {g.index} ({g.name}) is cc {g.cc_string}, Ampere or newer; ktlegacy images are for "
                       f"{'/'.join(ARCHES)} only", "use the upstream ktransformers images on this GPU")
        if g.cc != arch.compute_capability:
            want = next((a for a in ARCHES.values() if a.compute_capability == g.cc), None)
            fix = (f"use the {want.name} image: profile {_profiles_for(want.name)}" if want else
                   "ktlegacy supports " + " and ".join(f"cc {a.cc_string} ({a.gpus})" for a in ARCHES.values()) + " only")
            return Row("GPU arch vs image", FAIL,
                       f"GPU {g.index} ({g.name}) is cc {g.cc_string}, the image is {arch.name} (cc {arch.cc_string})",
                       fix)
    return Row("GPU arch vs image", OK, f"all {len(gpus)} GPU(s) cc {arch.cc_string} = image {arch.name}")


def row_cpu(spec: ServiceSpec, facts: HostFacts, labels: dict | None) -> Row:
    _, cpu = image_arch_and_cpu(spec, labels)
    if cpu == "NATIVE":
        return Row("CPU vs image", WARN, "image built with CPU_INSTRUCT=NATIVE: it runs only on CPUs with its "
                   "build host's flags", "use the portable avx2 image (KTLEGACY_CPU=avx2) unless you built it here")
    if not cpu:
        return Row("CPU vs image", SKIP, f"{spec.image} has no {LABEL_CPU} label and no ktlegacy tag: CPU set unknown")
    need = CPU_FLAGS.get(cpu)
    if need is None:
        return Row("CPU vs image", FAIL, f"unknown CPU_INSTRUCT {cpu!r} on {spec.image}",
                   "use an image of the ktlegacy tag scheme")
    lacking = [f for f in need if f not in facts.cpu_flags]
    if lacking:
        can = [n.lower() for n, flags in CPU_FLAGS.items() if set(flags) <= facts.cpu_flags]
        return Row("CPU vs image", FAIL, f"CPU ({facts.cpu_model or '?'}) lacks {', '.join(lacking)}, needed by the "
                   f"image's {cpu} build", f"use an image built for {can[-1]} (KTLEGACY_CPU={can[-1]})" if can
                   else f"this CPU cannot run ktransformers' CPU kernels (needs {_LEAST_CPU})")
    return Row("CPU vs image", OK, f"CPU has every flag of the image's {cpu} build ({', '.join(need)})")


def _cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the form cpuset and numactl take)."""
    parts, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            parts.append(f"{start}-{c}" if c != start else str(c))
            start = None
    return ",".join(parts)


def row_cpu_threads(spec: ServiceSpec, facts: HostFacts, model: GgufModel | None) -> Row:
    """KTLEGACY_CPU_INFER and thread placement from the host's topology. The CPU experts' pool spins
    between jobs, and the engine's CUDA-callback and Python threads need cores of their own: one
    node's physical cores minus 2 (measured: all 16 of 16 cores stalled whole layers,
    docs/performance.md). On two or more NUMA nodes the threads should stay on one node with the
    memory they stream, the node the GPUs hang off (PCIe from the far node: ~4 vs ~12 GB/s)."""
    nodes = facts.numa_cpus
    if not nodes:
        return Row("CPU threads", SKIP, "lscpu gave no NUMA CPU lists: cannot advise KTLEGACY_CPU_INFER")
    cores = {n: max(1, len(c) // facts.threads_per_core) for n, c in sorted(nodes.items())}
    have = int(setting(spec.environment, "KTLEGACY_CPU_INFER"))
    if len(nodes) == 1:
        (node, n_cores), = cores.items()
        advice = max(1, n_cores - 2)
        text = f"1 NUMA node, {n_cores} physical cores: KTLEGACY_CPU_INFER={advice} advised, {have} set"
        if have > advice:
            return Row("CPU threads", WARN, text + ": the experts' spinning threads then compete with the engine's own",
                       f"set KTLEGACY_CPU_INFER={advice} in compose/.env")
        return Row("CPU threads", OK, text)
    node = 0
    n_cores = cores[node]
    advice = max(1, n_cores - 2)
    cpus = _cpu_list(sorted(nodes[node]))
    fits = model is None or facts.numa_mem_kib.get(node, 0) * 1024 >= model.total_bytes
    text = (f"{len(nodes)} NUMA nodes of {', '.join(str(c) for c in cores.values())} physical cores: keep the "
            f"experts' threads and the memory they stream on the GPUs' node (nvidia-smi topo -m; node{node} "
            f"here): KTLEGACY_CPU_INFER={advice} advised, {have} set, and the container on node{node}'s CPUs "
            f"({cpus}) with its memory there")
    if not fits:
        text += (f"; the GGUF ({_gib(model.total_bytes)}) does not fit node{node}'s RAM, so its pages spread over "
                 f"the nodes whatever you pin: start with numactl --interleave=all")
    fix = (f"set KTLEGACY_CPU_INFER={advice} in compose/.env and add cpuset: \"{cpus}\" to the profile's service "
           f"(a compose.override.yaml), or start it under numactl --cpunodebind={node} --membind={node}")
    if have > advice:
        text += f"; {have} threads spill onto the other node"
    return Row("CPU threads", WARN, text, fix)   # advice to act on: the doctor cannot see a cpuset


def row_model_dir(spec: ServiceSpec) -> Row:
    d = spec.model_dir
    fix = ("set KTLEGACY_MODEL_DIR in compose/.env (or --model-dir) to the model's Hugging Face directory "
           "(config.json + tokenizer)")
    if not d.is_dir():
        return Row("model dir", FAIL, f"{d} does not exist", fix)
    if not any(d.iterdir()):
        return Row("model dir", FAIL, f"{d} is empty", fix)
    if not (d / "config.json").is_file():
        return Row("model dir", FAIL, f"{d} has no config.json", fix)
    return Row("model dir", OK, f"{d} (config.json present)")


def row_gguf(spec: ServiceSpec) -> tuple[Row, GgufModel | None]:
    try:
        model = read_gguf(spec.gguf_dir)
    except KtlegacyError as exc:
        return Row("GGUF", FAIL, str(exc).split(":")[0],
                   "set KTLEGACY_GGUF_DIR in compose/.env (or --gguf-dir) to the directory of the GGUF file(s)"), None
    return Row("GGUF", OK, f"{spec.gguf_dir}: {len(model.files)} file(s), {_gib(model.total_bytes)}, "
               f"arch {model.arch or '?'}, {len(model.tensors)} tensors"), model


def row_ram(model: GgufModel | None, facts: HostFacts) -> Row:
    if model is None:
        return Row("RAM vs GGUF", SKIP, "no GGUF to compare")
    if not facts.numa_mem_kib:
        return Row("RAM vs GGUF", WARN, "NUMA memory unknown", "check /sys/devices/system/node")
    node, kib = max(facts.numa_mem_kib.items(), key=lambda kv: kv[1])
    if kib * 1024 < model.total_bytes:
        return Row("RAM vs GGUF", FAIL, f"the GGUF ({_gib(model.total_bytes)}) does not fit in one NUMA node's RAM "
                   f"(largest: node{node}, {_gib(kib * 1024)})",
                   "use a smaller quantization of the model or a host with more RAM per NUMA node")
    return Row("RAM vs GGUF", OK, f"GGUF {_gib(model.total_bytes)} fits in node{node} ({_gib(kib * 1024)})")


def row_vram(spec: ServiceSpec, model: GgufModel | None, rules: RuleText,
             gpus: list[Gpu]) -> tuple[Row, Estimate | None]:
    rules_text, rules_note = rules.text, rules.note
    if model is None:
        return Row("VRAM per GPU", SKIP, "no GGUF to estimate from"), None
    if rules_text is None:
        return Row("VRAM per GPU", WARN, f"cannot read rule file {spec.rules}: {rules_note}",
                   "pass --rules FILE, or build/pull the image so its rule file can be read"), None
    min_tokens = setting(spec.environment, "KTLEGACY_GPU_PREFILL_MIN_TOKENS")
    budget = int(setting(spec.environment, "KTLEGACY_GPU_PREFILL_MIB"))
    linear = setting(spec.environment, "KTLEGACY_GPU_LINEAR").strip().lower()
    est = estimate(model, load_rules(rules_text, spec.rules), spec.cache_lens, min_tokens, budget, linear)
    devs = est.gpu_devices
    parts = []
    for dev in devs:
        need = est.need_mib(dev)
        k = int(dev.split(":")[1])
        have = gpus[k] if k < len(gpus) else None
        parts.append(f"{dev} {need / 1024:.1f}" + (f"/{have.vram_mib / 1024:.1f} GiB" if have else " GiB"))
    weights = ("GPU weights as GGUF blocks (KTLEGACY_GPU_LINEAR=quant) + their prefill scratch" if linear == "quant"
               else "GPU weights as fp16 (KTLEGACY_GPU_LINEAR=fp16)")
    detail = (f"{spec.rules} ({rules_note}), cache_lens {spec.cache_lens}: " + "; ".join(parts)
              + f" ({weights} + KV cache + a {spec.cache_lens}-token prefill's activations"
              + (f" or its routed experts on the GPU ({budget} MiB + hidden states), the larger,"
                 if est.experts_prefill_mib else "")
              + f" + {GPU_RUNTIME_MIB} MiB runtime each)")
    if est.unplaced:
        detail += f"; {len(est.unplaced)} unknown tensor(s) counted on cuda:0"
    if not gpus:
        return Row("VRAM per GPU", SKIP, detail + "; no GPU to compare"), est
    if len(devs) > len(gpus):
        return Row("VRAM per GPU", FAIL, f"{spec.rules} places modules on {len(devs)} GPUs ({', '.join(devs)}), "
                   f"profile {spec.profile.name} reserves {len(gpus)}",
                   f"use a rule file for {len(gpus)} GPU(s) (KTLEGACY_RULES in compose/.env)"), est
    short = [(dev, gpus[int(dev.split(':')[1])]) for dev in devs
             if est.need_mib(dev) > gpus[int(dev.split(':')[1])].vram_mib]
    if short:
        dev, g = short[0]
        return Row("VRAM per GPU", FAIL, f"{dev} needs ~{est.need_mib(dev) / 1024:.1f} GiB under {spec.rules}, "
                   f"GPU {g.index} ({g.name}) has {g.vram_mib / 1024:.1f} GiB; " + "; ".join(parts),
                   ("spread the layers over more GPUs (another rule file / profile), use a smaller model, "
                    "or lower KTLEGACY_CACHE_LENS") + ("" if linear == "quant" else
                                                      "; KTLEGACY_GPU_LINEAR=quant keeps the weights quantized")), est
    return Row("VRAM per GPU", OK, detail), est


def row_port(spec: ServiceSpec, facts: HostFacts) -> Row:
    where = f"{spec.bind}:{spec.port}"
    if facts.port_taken(spec.bind, spec.port):
        return Row("port", FAIL, f"{where} is already in use",
                   "set KTLEGACY_PORT in compose/.env to a free port, or stop what listens there "
                   "(`docker compose --profile P down` if it is ktlegacy)")
    if spec.bind not in LOOPBACK:
        return Row("port", OK, f"{where} free (reachable from the network: see the API key row)")
    return Row("port", OK, f"{where} free (loopback only)")


def api_keys_configured(spec: ServiceSpec) -> tuple[int, str]:
    """(keys found, why none) from the service's KTLEGACY_API_KEY and its key-file secret. The
    server checks each key's form when it starts; here a key is any non-comment word."""
    keys = [k for k in str(spec.environment.get("KTLEGACY_API_KEY") or "").replace(",", " ").split() if k]
    path = spec.api_key_file
    if path is not None and str(path) != "/dev/null":
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            return len(keys), f"KTLEGACY_API_KEY_FILE {path} cannot be read ({getattr(exc, 'strerror', None) or exc})"
        keys += [k for line in lines if line.strip() and not line.strip().startswith("#")
                 for k in line.replace(",", " ").split()]
    return len(keys), ""


def row_api_key(spec: ServiceSpec) -> Row:
    """A port published beyond loopback needs an API key: the server answers anyone who reaches it."""
    count, problem = api_keys_configured(spec)
    if problem:
        return Row("API key", FAIL, problem, "fix KTLEGACY_API_KEY_FILE in compose/.env (a file of keys, one per line)")
    if count:
        return Row("API key", OK, f"{count} key(s): every route but /health needs Authorization: Bearer <key>")
    if spec.bind in LOOPBACK:
        return Row("API key", OK, f"none; the API is published on {spec.bind} only")
    return Row("API key", FAIL, f"KTLEGACY_BIND={spec.bind} publishes the API to the network without an API key: "
               "anyone who reaches the port can use the model",
               "set KTLEGACY_API_KEY (or KTLEGACY_API_KEY_FILE) in compose/.env, or KTLEGACY_BIND=127.0.0.1; "
               "`invoke up --force` starts it anyway")


# --- rule files --------------------------------------------------------------------------------

@dataclass
class RuleText:
    """A profile's rule file as the doctor could read it."""
    text: str | None
    note: str            # where it came from, or why it could not be read
    patched: bool = True  # False: upstream's pristine copy (its ops are not what the image has)
    missing: bool = False  # the image was asked and has no such file


def read_rules(spec: ServiceSpec, labels: dict | None, docker, rules_file: Path | None = None,
               upstream: bool = True) -> RuleText:
    """The profile's rule file: --rules, an absolute path, the image's copy, or (``upstream``)
    upstream's sdist.

    The placement of modules (what the estimate needs) is the same in the patched and the
    pristine file: the overlays only change ops, never devices. The ops are checked only in
    the image's (patched) copy or a file the user names.
    """
    if rules_file is not None:
        return RuleText(Path(rules_file).read_text(), f"from {rules_file}")
    if spec.rules.startswith("/"):
        p = Path(spec.rules)
        return (RuleText(p.read_text(), "from the host") if p.is_file() else
                RuleText(None, f"{p} does not exist on this host", missing=True))
    if labels is not None and docker is not None:
        script = ("import os, sys, ktransformers; p = os.path.join(os.path.dirname(ktransformers.__file__), "
                  f"'optimize', 'optimize_rules', {spec.rules!r}); "
                  "sys.exit(3) if not os.path.isfile(p) else sys.stdout.write(open(p).read())")
        proc = docker.run("run", "--rm", "--pull", "never", "--network", "none", "--entrypoint", "python3",
                          spec.image, "-c", script, check=False)
        if proc.returncode == 0:
            return RuleText(proc.stdout.decode("utf-8", "replace"), "from the image")
        if proc.returncode == 3:
            return RuleText(None, f"{spec.image} has no rule file {spec.rules} in its optimize_rules directory",
                            missing=True)
    if not upstream:
        return RuleText(None, "the image is not here to read it from", patched=False)
    from .core.refs import REFS, DEFAULT_REF
    from .core.source import download_sdist
    ref = REFS.get((labels or {}).get(LABEL_REF) or _ref_from_tag(spec.image) or DEFAULT_REF)
    if ref is None or ref.kind != "sdist":
        return RuleText(None, "not readable from the image, and its ref is not the PyPI sdist")
    try:
        archive = download_sdist(ref)
    except KtlegacyError as exc:
        return RuleText(None, str(exc))
    with tarfile.open(archive) as tar:
        member = f"ktransformers-{ref.version}/ktransformers/optimize/optimize_rules/{spec.rules}"
        try:
            return RuleText(tar.extractfile(member).read().decode(), f"from upstream {ref.name}", patched=False)
        except KeyError:
            return RuleText(None, f"no rule file {spec.rules} in upstream {ref.name}", missing=True)


def row_rules(spec: ServiceSpec, rules: RuleText) -> Row:
    """The ops the rule file selects, read as YAML by ktlegacy.serving (what serve.sh runs)."""
    fix = ("set KTLEGACY_RULES in compose/.env to a rule file of the image's optimize_rules directory "
           "or an absolute path you mount")
    if rules.text is None:
        if rules.missing:
            return Row("rule file", FAIL, f"{spec.rules}: {rules.note}", fix)
        return Row("rule file", SKIP, f"{spec.rules} not checked: {rules.note}")
    if not rules.patched:
        return Row("rule file", SKIP, f"{spec.rules} read {rules.note}, before the image's overlays: serve.sh "
                   "checks the image's copy")
    try:
        ops = check_rules(rules.text, spec.rules)
    except RuleFileError as exc:
        return Row("rule file", FAIL, exc.problem, exc.fix)
    chosen = sorted({op for _, where, op in ops if where != "class"})
    return Row("rule file", OK, f"{spec.rules} ({rules.note}): no sm80+ op; selects {', '.join(chosen) or 'no op'}")


def _ref_from_tag(image: str) -> str | None:
    parts = parse_tag(image)
    return parts.ref if parts else None


# --- the doctor --------------------------------------------------------------------------------

def check_profile(spec: ServiceSpec, facts: HostFacts, docker=None,
                  rules_file: Path | None = None) -> Report:
    gpu_row, gpus = row_gpus(spec, facts)
    rows = [gpu_row, row_docker(facts)]
    image_row, labels = row_image(spec, facts)
    rows += [image_row, row_arch(spec, gpus, labels), row_cpu(spec, facts, labels), row_model_dir(spec)]
    gguf_row, model = row_gguf(spec)
    rows += [gguf_row, row_ram(model, facts), row_cpu_threads(spec, facts, model)]
    # upstream's sdist (a download) only when there is a model to estimate VRAM for
    rules = read_rules(spec, labels, docker, rules_file, upstream=model is not None)
    rows.append(row_rules(spec, rules))
    rows.append(row_vram(spec, model, rules, gpus)[0])
    rows.append(row_port(spec, facts))
    rows.append(row_api_key(spec))
    return Report(rows)


def host_rows(facts: HostFacts) -> list[Row]:
    return [row_gpus_host(facts), row_docker(facts), row_cpu_host(facts), row_ram_host(facts)]


def check_host(facts: HostFacts, specs: list[ServiceSpec], docker=None,
               blocked: dict[str, list[Row]] | None = None) -> Report:
    """No profile named: the host, then one verdict per profile (its first failing check).
    ``blocked``: profiles whose settings must be fixed before they can be checked, with the rows
    that say why (shown once above the verdicts)."""
    blocked = blocked or {}
    rows = host_rows(facts)
    for row in [r for rs in blocked.values() for r in rs]:
        # compose checks the whole file for any profile (it may quote another problem each time): once
        if not any(r.check == row.check and (r.detail == row.detail or r.check == "compose config") for r in rows):
            rows.append(row)
    verdicts = {}
    for spec in specs:
        report = check_profile(spec, facts, docker)
        failed = sorted(report.failed, key=lambda r: VERDICT_ORDER.index(r.check))
        if failed:
            first = failed[0]
            verdicts[spec.profile.name] = Row(
                f"profile {spec.profile.name}", FAIL, f"cannot run here: {first.check}: {first.detail}"
                + (f" (also failing: {', '.join(r.check for r in failed[1:])})" if len(failed) > 1 else ""), first.fix)
        else:
            verdicts[spec.profile.name] = Row(f"profile {spec.profile.name}", OK, f"can run ({spec.profile.cards})")
    for name, why in blocked.items():
        first = why[0]
        verdicts[name] = Row(f"profile {name}", FAIL, f"not checked: {first.check}: {first.detail}", first.fix)
    rows += [verdicts[name] for name in PROFILES if name in verdicts]
    return Report(rows)


def docker_or_none():
    """A client that reaches a daemon (serving needs no BuildKit), or (None, why)."""
    from .docker import daemon_client
    try:
        return daemon_client(), ""
    except KtlegacyError as exc:
        return None, str(exc)


NO_COMPOSE_FIX = "install the compose v2 plugin (docker compose version) and fix what it reports in compose/.env"


def resolve_checked(name: str, docker, settings: dict) -> tuple[ServiceSpec | None, list[Row]]:
    """The profile as compose resolves it, after its settings pass ktlegacy.serving.validate (the
    check serve.sh runs in the container). A bad setting or compose refusing the file: no spec, and
    the rows that say so (compose's own reason quoted). No compose to ask: the profile's defaults,
    and a row saying why."""
    profile = get_profile(name)
    _, errors = validate(settings)
    rows = [Row("settings", FAIL, e.problem, e.fix) for e in errors]
    if docker is None:
        return (None, rows) if rows else (spec_defaults(profile), [])
    try:
        config = compose_config(name, docker)
    except ComposeRejected as exc:
        rows.append(Row("compose config", FAIL, f"docker compose rejected the settings: {exc.reason}",
                        "fix what it names in compose/.env (or the shell variable of that name)"))
        return None, rows
    except KtlegacyError as exc:   # no compose v2 here
        if rows:
            return None, rows
        return spec_defaults(profile), [Row("compose config", FAIL, f"{exc} (checked the profile's defaults "
                                            "instead)", NO_COMPOSE_FIX)]
    if rows:
        return None, rows
    return spec_from_config(profile, config), []


ENV_FILE = COMPOSE_DIR / ".env"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"


def env_file_first(report: Report, env_file: Path | None = None) -> Report:
    """Fixes that say "set X in compose/.env" start with copying the example when there is no .env yet."""
    env_file = env_file or ENV_FILE
    if env_file.exists():
        return report
    first = f"cp {ENV_EXAMPLE.relative_to(REPO_ROOT)} {ENV_FILE.relative_to(REPO_ROOT)} (there is none yet), then "
    for row in report.rows:
        if "compose/.env" in row.fix and not row.fix.startswith(first):
            row.fix = first + row.fix
    return report


def doctor(profile: str | None = None, model_dir=None, gguf_dir=None, image=None,
           rules_file=None, facts: HostFacts | None = None) -> Report:
    if profile is not None:
        get_profile(profile)   # unknown profile: one line, before probing anything
    settings = read_settings()
    docker, docker_error = docker_or_none()
    facts = facts or HostFacts.probe(docker, docker_error)
    names = [profile] if profile else list(PROFILES)
    resolved = {n: resolve_checked(n, docker, settings) for n in names}
    specs = [spec.with_overrides(model_dir, gguf_dir, image) for spec, _ in resolved.values() if spec is not None]
    blocked = {n: rows for n, (spec, rows) in resolved.items() if spec is None}
    # a row about compose itself (no compose v2: the defaults were checked), once
    notes = [rows[0] for spec, rows in resolved.values() if spec is not None and rows][:1]
    if profile and profile in blocked:
        report = Report(blocked[profile] + host_rows(facts))
    elif profile:
        report = check_profile(specs[0], facts, docker, rules_file)
    else:
        report = check_host(facts, specs, docker, blocked)
    report.rows[:0] = notes
    return env_file_first(report)


def _doctor_args(p) -> None:
    p.add_argument("--profile", default=None,
                   help=f"check one compose profile ({', '.join(PROFILES)}); default: every profile")
    p.add_argument("--model-dir", default=None, type=Path,
                   help="the model's Hugging Face directory (default: KTLEGACY_MODEL_DIR of compose/.env)")
    p.add_argument("--gguf-dir", default=None, type=Path,
                   help="the GGUF directory (default: KTLEGACY_GGUF_DIR of compose/.env)")
    p.add_argument("--image", default=None, help="check this image instead of the profile's tag")
    p.add_argument("--rules", default=None, type=Path,
                   help="rule file to estimate VRAM with (default: the profile's, read from the image)")
    p.add_argument("--host-facts", default=None, type=Path,
                   help="use host facts recorded by tests/fixtures/hosts/record.sh instead of probing")


@command("doctor", "check that this host can serve a compose profile: one table, a fix on each failing row",
         _doctor_args)
def doctor_command(args) -> int:
    facts = HostFacts.load(args.host_facts) if args.host_facts else None
    report = doctor(args.profile, args.model_dir, args.gguf_dir, args.image, args.rules, facts)
    print(report.table())
    return 1 if report.failed else 0
