"""The serving profiles of compose/compose.yaml, and what one resolves to on this host.

compose/compose.yaml is the one place a profile is defined: :data:`PROFILES` is read from its
services (every service that reserves NVIDIA GPUs is a profile; what it *is* - how many GPUs,
which image arch, which rule file by default - is that service's device list, image tag and
``KTLEGACY_RULES`` default). :func:`resolve` asks ``docker compose config`` for the resolved
service, so the doctor checks exactly what ``docker compose --profile P up`` would start; where
compose is not available (a GPU host without Docker) it falls back to those defaults.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .core.arch import Arch, get_arch
from .core.errors import KtlegacyError
from .core.facts import SERVER_PORT, SETTINGS
from .images import DEFAULT_CPU_INSTRUCT, image_tag, parse_tag
from .core.refs import DEFAULT_REF
from .serving import SettingError, check_value

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO_ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
CONTAINER_PORT = SERVER_PORT  # the server's port inside the container (serve.sh)
# compose/.env defaults, from the settings table (ktlegacy/core/facts.py)
DEFAULT_HOST_PORT = int(SETTINGS["KTLEGACY_PORT"].default)
DEFAULT_BIND = SETTINGS["KTLEGACY_BIND"].default            # the server has no authentication
DEFAULT_CACHE_LENS = int(SETTINGS["KTLEGACY_CACHE_LENS"].default)   # upstream config.yaml's cache_lens


@dataclass(frozen=True)
class Profile:
    name: str
    gpus: int          # GPUs the profile reserves
    arch_name: str     # image arch
    rules: str         # default rule file (a name in the image's optimize_rules directory)

    @property
    def arch(self) -> Arch:
        return get_arch(self.arch_name)


def _gpu_ids(service: dict) -> list:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    return [i for d in devices or [] if d.get("driver") == "nvidia" for i in d.get("device_ids") or []]


def with_defaults(value: str) -> str:
    """A compose.yaml value as compose resolves it with an empty .env: every ``${VAR:-default}``
    (nested too) takes its default."""
    while True:
        new = re.sub(r"\$\{[A-Z0-9_]+:-([^${}]*)\}", r"\1", value)
        if new == value:
            return new
        value = new


def load_profiles(path: Path = COMPOSE_FILE) -> dict[str, Profile]:
    """The GPU profiles of a compose file, in its order: each service that reserves NVIDIA GPUs
    (its name is its profile's), with its GPU count, the arch of its default image tag and the
    default of its ``KTLEGACY_RULES``."""
    import yaml
    profiles = {}
    for name, service in yaml.safe_load(Path(path).read_text())["services"].items():
        ids = _gpu_ids(service)
        if not ids:
            continue
        tag = parse_tag(with_defaults(str(service.get("image", ""))))
        rules = with_defaults(str((service.get("environment") or {}).get("KTLEGACY_RULES") or ""))
        if not (tag and rules):
            raise KtlegacyError(f"{path}: service {name} reserves GPUs but its image is no ktlegacy tag "
                                "or it sets no KTLEGACY_RULES")
        profiles[str(name)] = Profile(str(name), len(ids), tag.arch, rules)
    return profiles


PROFILES = load_profiles()
SMOKE_PROFILE = "smoke"   # no GPU: CI's end-to-end check of the compose wiring


def get_profile(name: str) -> Profile:
    if name in PROFILES:
        return PROFILES[name]
    raise KtlegacyError(f"unknown profile {name!r}: use one of {', '.join(PROFILES)}")


@dataclass(frozen=True)
class ServiceSpec:
    """What a GPU profile's service resolves to: the inputs of the doctor's checks."""
    profile: Profile
    image: str
    device_ids: tuple[str, ...]
    rules: str
    model_dir: Path
    gguf_dir: Path
    bind: str
    port: int
    cache_lens: int
    environment: dict = field(default_factory=dict, hash=False, compare=False)
    source: str = "compose"   # "compose" (resolved by docker compose) or "defaults"
    api_key_file: Path | None = None  # the host file of the secret ktlegacy_api_key (KTLEGACY_API_KEY_FILE)

    def with_overrides(self, model_dir=None, gguf_dir=None, image=None) -> "ServiceSpec":
        return replace(self,
                       model_dir=Path(model_dir).resolve() if model_dir else self.model_dir,
                       gguf_dir=Path(gguf_dir).resolve() if gguf_dir else self.gguf_dir,
                       image=image or self.image)


class ComposeRejected(KtlegacyError):
    """``docker compose config`` ran and refused the project: ``reason`` is its last line."""

    def __init__(self, profile: str, reason: str):
        super().__init__(f"docker compose rejected profile {profile}: {reason}")
        self.reason = reason


# what docker says when it has no compose v2 plugin
_NO_COMPOSE = ("is not a docker command", "unknown command", "unknown shorthand flag")


def compose_config(profile: str, docker, env: dict | None = None) -> dict:
    """``docker compose --profile P config --format json`` run from the repository root.
    Raises :class:`ComposeRejected` when compose refuses the settings, KtlegacyError when there is
    no compose to ask."""
    proc = docker.compose("--profile", profile, "config", "--format", "json", cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
        if any(s in proc.stderr for s in _NO_COMPOSE):
            raise KtlegacyError(f"docker compose could not resolve profile {profile}: {err}")
        raise ComposeRejected(profile, err)
    return json.loads(proc.stdout)


ENV_FILE = COMPOSE_DIR / ".env"


def read_settings(environ=None, env_files=None) -> dict[str, str]:
    """The KTLEGACY_* values compose interpolates compose.yaml with when run from the repository
    root: compose/.env, overridden by a root .env, overridden by the shell environment."""
    import os

    from dotenv import dotenv_values
    files = env_files if env_files is not None else [ENV_FILE, REPO_ROOT / ".env"]
    values: dict[str, str] = {}
    for path in files:
        if Path(path).is_file():
            values.update({k: v or "" for k, v in dotenv_values(path).items() if k.startswith("KTLEGACY_")})
    environ = os.environ if environ is None else environ
    values.update({k: v for k, v in environ.items() if k.startswith("KTLEGACY_")})
    return values


def setting(env: dict, name: str) -> str:
    """A setting's value in a service environment (its default when unset), checked by the table."""
    try:
        return check_value(name, str(env.get(name) or SETTINGS[name].default))
    except SettingError as exc:
        raise KtlegacyError(exc.line) from None


def spec_from_config(profile: Profile, config: dict) -> ServiceSpec:
    service = config["services"][profile.name]
    env = service.get("environment") or {}
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    ids = tuple(str(i) for d in devices for i in (d.get("device_ids") or []))
    port = next(p for p in service["ports"] if int(p["target"]) == CONTAINER_PORT)
    mounts = {v["target"]: Path(v["source"]) for v in service["volumes"] if v["type"] == "bind"}
    return ServiceSpec(
        profile=profile, image=service["image"], device_ids=ids,
        rules=env.get("KTLEGACY_RULES") or profile.rules,
        model_dir=mounts["/models/hf"], gguf_dir=mounts["/models/gguf"],
        bind=port.get("host_ip") or "0.0.0.0", port=int(port["published"]),
        cache_lens=int(setting(env, "KTLEGACY_CACHE_LENS")),
        environment=dict(env), source="compose",
        api_key_file=_secret_file(config, "ktlegacy_api_key"))


def _secret_file(config: dict, name: str) -> Path | None:
    source = ((config.get("secrets") or {}).get(name) or {}).get("file")
    return Path(source) if source else None


def spec_defaults(profile: Profile) -> ServiceSpec:
    """The service as compose.yaml resolves it with an empty .env (tests keep the two equal)."""
    return ServiceSpec(
        profile=profile, image=image_tag(DEFAULT_REF, profile.arch, DEFAULT_CPU_INSTRUCT),
        device_ids=tuple(str(i) for i in range(profile.gpus)), rules=profile.rules,
        model_dir=(REPO_ROOT / "models" / "hf"), gguf_dir=(REPO_ROOT / "models" / "gguf"),
        bind=DEFAULT_BIND, port=DEFAULT_HOST_PORT, cache_lens=DEFAULT_CACHE_LENS, source="defaults")


def resolve(profile_name: str, docker) -> ServiceSpec:
    """The profile's service as compose resolves it here (``docker``: a DockerClient), or its
    defaults without Docker (``docker`` None)."""
    profile = get_profile(profile_name)
    if docker is None:
        return spec_defaults(profile)
    return spec_from_config(profile, compose_config(profile.name, docker))
