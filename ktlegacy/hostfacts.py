"""What the doctor knows about a host: GPUs, container runtime, CPU, NUMA memory, images, ports.

Every probe goes through :class:`HostFacts`, which is built either live (:meth:`HostFacts.probe`)
or from files recorded on another machine (:meth:`HostFacts.load`, the format that
``tests/fixtures/hosts/record.sh`` writes), so the doctor's checks run the same against a real
host and against a recorded V100, T4 or H100 host. Recorded files, one per probe:

``nvidia-smi.csv``   ``nvidia-smi --query-gpu=index,uuid,name,compute_cap,memory.total --format=csv``
                     (``nvidia-smi.err`` instead: why there is none)
``lscpu.txt``        ``lscpu``
``numa/nodeN.meminfo``  copies of ``/sys/devices/system/node/nodeN/meminfo``
``docker-runtimes.json``  ``docker info --format '{{json .Runtimes}}'`` (``docker.err`` instead: why none)
``nvidia-hook.txt``  path of ``nvidia-container-runtime-hook`` / CDI spec, empty if none
``images.json``      optional: {tag: labels} of the images present
``listening.txt``    optional: ``ss -ltnH`` (ports in use)
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

NVIDIA_SMI_QUERY = ["--query-gpu=index,uuid,name,compute_cap,memory.total", "--format=csv"]
NVIDIA_HOOKS = ("nvidia-container-runtime-hook", "nvidia-container-runtime", "nvidia-ctk")
CDI_SPECS = ("/etc/cdi/nvidia.yaml", "/etc/cdi/nvidia.json", "/var/run/cdi/nvidia.yaml", "/var/run/cdi/nvidia.json")


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    cc: tuple          # compute capability, (7, 5)
    vram_mib: int

    @property
    def cc_string(self) -> str:
        return "%d.%d" % self.cc

    def matches(self, device_id: str) -> bool:
        """A compose device id is an nvidia-smi index or a UUID."""
        return device_id == str(self.index) or device_id == self.uuid


@dataclass
class HostFacts:
    gpus: list[Gpu] | None              # None: no NVIDIA driver usable (see gpu_error)
    gpu_error: str
    cpu_flags: frozenset
    cpu_model: str
    numa_mem_kib: dict[int, int]        # NUMA node -> MemTotal (KiB)
    docker_runtimes: dict | None        # None: no Docker daemon reachable (see docker_error)
    docker_error: str
    nvidia_hook: str                    # path of the NVIDIA hook / CDI spec, "" if none
    images: dict[str, dict | None] = field(default_factory=dict)   # tag -> labels (None: absent)
    listening: set = field(default_factory=set)                    # {(ip, port)} in use
    source: str = "live"
    image_probe: Callable[[str], dict | None] | None = None
    port_probe: Callable[[str, int], bool] | None = None
    numa_cpus: dict = field(default_factory=dict)                  # NUMA node -> [cpu ids] (lscpu)
    threads_per_core: int = 1                                      # SMT siblings per physical core

    # --- derived ----------------------------------------------------------------------------
    @property
    def nvidia_runtime(self) -> bool:
        return bool(self.docker_runtimes and "nvidia" in self.docker_runtimes) or bool(self.nvidia_hook)

    def image_labels(self, tag: str) -> dict | None:
        if tag not in self.images and self.image_probe is not None:
            self.images[tag] = self.image_probe(tag)
        return self.images.get(tag)

    def port_taken(self, ip: str, port: int) -> bool:
        if self.port_probe is not None:
            return self.port_probe(ip, port)
        wild = {"0.0.0.0", "::", "*", "[::]"}
        return any(p == port and (i == ip or i in wild or ip in wild) for i, p in self.listening)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path) -> "HostFacts":
        """Facts recorded by tests/fixtures/hosts/record.sh on some host."""
        d = Path(directory)

        def text(name: str) -> str | None:
            p = d / name
            return p.read_text() if p.exists() else None

        smi = text("nvidia-smi.csv")
        gpus, gpu_error = (parse_nvidia_smi(smi), "") if smi is not None else (None, (text("nvidia-smi.err") or "nvidia-smi not recorded").strip())
        flags, model = parse_lscpu(text("lscpu.txt") or "")
        numa_cpus, smt = parse_cpu_topology(text("lscpu.txt") or "")
        numa = {int(m.group(1)): parse_meminfo(p.read_text())
                for p in sorted((d / "numa").glob("node*.meminfo")) if (m := re.match(r"node(\d+)", p.name))}
        runtimes_text = text("docker-runtimes.json")
        runtimes = json.loads(runtimes_text) if runtimes_text is not None else None
        docker_error = "" if runtimes is not None else (text("docker.err") or "docker not recorded").strip()
        images = json.loads(text("images.json") or "{}")
        listening = parse_ss(text("listening.txt") or "")
        return cls(gpus=gpus, gpu_error=gpu_error, cpu_flags=flags, cpu_model=model, numa_mem_kib=numa,
                   docker_runtimes=runtimes, docker_error=docker_error,
                   nvidia_hook=(text("nvidia-hook.txt") or "").strip(), images=images,
                   listening=listening, source=str(d), numa_cpus=numa_cpus, threads_per_core=smt)

    @classmethod
    def probe(cls, docker=None, docker_error: str = "") -> "HostFacts":
        """Facts of this host, now. ``docker`` (a :class:`ktlegacy.docker.DockerClient`) None: no
        Docker (``docker_error`` says why)."""
        gpus, gpu_error = probe_gpus()
        lscpu = _run_text(["lscpu"])
        flags, model = parse_lscpu(lscpu or _read("/proc/cpuinfo"))
        numa_cpus, smt = parse_cpu_topology(lscpu or "")
        numa = {}
        for p in sorted(Path("/sys/devices/system/node").glob("node[0-9]*/meminfo")):
            numa[int(p.parent.name[4:])] = parse_meminfo(p.read_text())
        if not numa:   # no NUMA sysfs (some containers): the whole machine is one node
            numa = {0: parse_meminfo(_read("/proc/meminfo"))}
        runtimes = None
        if docker is not None:
            runtimes, why = docker.runtimes()
            docker_error = why or docker_error
        hook = next((p for p in (shutil.which(h) for h in NVIDIA_HOOKS) if p), "") or \
            next((p for p in CDI_SPECS if os.path.exists(p)), "")

        def image_probe(tag: str) -> dict | None:
            return docker.labels(tag) if docker is not None else None

        return cls(gpus=gpus, gpu_error=gpu_error, cpu_flags=flags, cpu_model=model, numa_mem_kib=numa,
                   docker_runtimes=runtimes, docker_error=docker_error, nvidia_hook=hook,
                   source="live", image_probe=image_probe, port_probe=port_in_use, numa_cpus=numa_cpus,
                   threads_per_core=smt)


# --- parsers (also used on recorded files) -----------------------------------------------------

# Drivers before the 510 series have no compute_cap query field; then the name tells it.
# (CUDA C Programming Guide, "CUDA-Enabled GPUs"; first match wins, so specific names come first.)
CC_BY_NAME = (
    ("V100", (7, 0)), ("TITAN V", (7, 0)), ("GV100", (7, 0)),
    ("T4", (7, 5)), ("RTX 20", (7, 5)), ("TITAN RTX", (7, 5)), ("Quadro RTX", (7, 5)), ("GTX 16", (7, 5)),
    ("A100", (8, 0)), ("A30", (8, 0)), ("RTX 30", (8, 6)), ("A40", (8, 6)), ("A10", (8, 6)),
    ("L40", (8, 9)), ("L4", (8, 9)), ("RTX 40", (8, 9)), ("H100", (9, 0)), ("H200", (9, 0)), ("H20", (9, 0)),
    ("P100", (6, 0)), ("P40", (6, 1)), ("P4", (6, 1)), ("GTX 10", (6, 1)),
)


def cc_from_name(name: str) -> tuple:
    """Compute capability from a card name; (0, 0) if we do not know the card."""
    return next((cc for key, cc in CC_BY_NAME if key.lower() in name.lower()), (0, 0))


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """``nvidia-smi --query-gpu=index,uuid,name,compute_cap,memory.total --format=csv`` output
    (with or without header / units), or the same without ``compute_cap`` (old drivers)."""
    gpus = []
    for row in csv.reader(io.StringIO(text.strip())):
        cells = [c.strip() for c in row]
        if len(cells) < 4 or not cells[0].isdigit():
            continue   # header or blank
        if len(cells) >= 5:
            major, _, minor = cells[3].partition(".")
            cc = (int(major), int(minor or 0))
        else:
            cc = cc_from_name(cells[2])
        vram = int(re.match(r"\d+", cells[-1]).group(0))
        gpus.append(Gpu(int(cells[0]), cells[1], cells[2], cc, vram))
    return gpus


def parse_lscpu(text: str) -> tuple[frozenset, str]:
    """CPU flags and model name from ``lscpu`` (or /proc/cpuinfo) output."""
    flags, model = set(), ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name",) and not model:
            model = value.strip()
    return frozenset(flags), model


def parse_cpu_list(text: str) -> list[int]:
    """"0-19,40-59" -> [0, ..., 19, 40, ..., 59]."""
    cpus = []
    for part in text.split(","):
        part = part.strip()
        if part:
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def parse_cpu_topology(text: str) -> tuple[dict, int]:
    """({NUMA node: [cpu ids]}, threads per core) from ``lscpu``; ({}, 1) where it does not say."""
    nodes, smt = {}, 1
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if m := re.fullmatch(r"NUMA node(\d+) CPU\(s\)", key):
            nodes[int(m.group(1))] = parse_cpu_list(value)
        elif key == "Thread(s) per core" and value.strip().isdigit():
            smt = max(1, int(value))
    return nodes, smt


def parse_meminfo(text: str) -> int:
    """MemTotal in KiB from a NUMA node's meminfo (``Node 0 MemTotal: N kB``) or /proc/meminfo."""
    m = re.search(r"MemTotal:\s+(\d+)\s*kB", text)
    return int(m.group(1)) if m else 0


def parse_ss(text: str) -> set:
    """{(ip, port)} from ``ss -ltnH`` output."""
    out = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            addr, _, port = parts[3].rpartition(":")
            if port.isdigit():
                out.add((addr.strip("[]").split("%")[0] or "*", int(port)))
    return out


# --- live probes -------------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _run_text(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def probe_gpus() -> tuple[list[Gpu] | None, str]:
    """GPUs via NVML (pynvml, if installed) or nvidia-smi; (None, why) when there are none."""
    try:
        import pynvml  # optional
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                gpus = []
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    name, uuid = pynvml.nvmlDeviceGetName(h), pynvml.nvmlDeviceGetUUID(h)
                    name, uuid = (v.decode() if isinstance(v, bytes) else v for v in (name, uuid))
                    cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
                    vram = pynvml.nvmlDeviceGetMemoryInfo(h).total // (1024 * 1024)
                    gpus.append(Gpu(i, uuid, name, cc, int(vram)))
                return gpus, ""
            finally:
                pynvml.nvmlShutdown()
        except Exception:  # NVML present but no driver: fall through to nvidia-smi's own words
            pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None, "nvidia-smi not found: no NVIDIA driver on this host"
    try:
        proc = subprocess.run([smi, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None, "nvidia-smi hung for 60 s: the NVIDIA driver is not healthy"
    if proc.returncode != 0 and "compute_cap" in proc.stdout + proc.stderr:
        # driver older than the 510 series: ask without compute_cap (the name tells it)
        query = [q.replace("compute_cap,", "") for q in NVIDIA_SMI_QUERY]
        proc = subprocess.run([smi, *query], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        why = ((proc.stdout + proc.stderr).strip().splitlines() or ["exit %d" % proc.returncode])[-1]
        return None, f"nvidia-smi failed: {why}"
    return parse_nvidia_smi(proc.stdout), ""


def port_in_use(ip: str, port: int) -> bool:
    """True if something already listens on ip:port (we try to bind it ourselves)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, port))
        except OSError as exc:
            # EACCES (privileged port) or EADDRNOTAVAIL: not a sign that someone holds the port
            return exc.errno == errno.EADDRINUSE
    return False
