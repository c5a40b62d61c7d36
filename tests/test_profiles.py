"""ktlegacy.profiles reads the profiles from compose/compose.yaml's services, the one place they are
defined: no Docker needed (tests/test_compose.py resolves them with the real compose)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ktlegacy.core.errors import KtlegacyError
from ktlegacy.profiles import COMPOSE_FILE, PROFILES, Profile, load_profiles

REPO = Path(__file__).resolve().parent.parent


def test_the_profiles_are_compose_yamls_gpu_services():
    # what the hand-kept table in profiles.py said before compose.yaml became the one place
    assert {name: PROFILES[name] for name in ("v100", "t4x4", "2080ti-x2")} == {
        "v100": Profile("v100", 1, "sm70", "DeepSeek-V3-Chat.yaml"),
        "t4x4": Profile("t4x4", 4, "sm75", "DeepSeek-V3-Chat-multi-gpu-4.yaml"),
        "2080ti-x2": Profile("2080ti-x2", 2, "sm75", "DeepSeek-V3-Chat-multi-gpu.yaml"),
    }
    assert "smoke" not in PROFILES   # no GPU reservation: not a GPU profile
    assert {p.arch.name for p in PROFILES.values()} <= {"sm70", "sm75"}


def _compose_with(tmp_path, service: str) -> Path:
    """compose.yaml with one more service (compose.yaml ends in its services: block)."""
    path = tmp_path / "compose.yaml"
    path.write_text(COMPOSE_FILE.read_text() + "\n" + service)
    return path


def _service_copy(name: str, new: str) -> str:
    """Service ``name``'s block of compose.yaml, renamed ``new``."""
    text = COMPOSE_FILE.read_text()
    block = text[text.index(f"\n  {name}:\n"):]
    block = block[:block.index("\n\n")]
    return block.replace(f"{name}:", f"{new}:").replace(f"[{name}]", f"[{new}]").replace(f" {name}\n", f" {new}\n")


# the "add a profile" walk's service: a copy of 2080ti-x2's, under a name no profile has
WALK_X2 = _service_copy("2080ti-x2", "walk-x2")


def test_a_new_service_is_a_new_profile(tmp_path):
    """The "add a profile" walk (docs/architecture.md): one service in compose.yaml is the profile."""
    profiles = load_profiles(_compose_with(tmp_path, WALK_X2))
    assert list(profiles) == [*PROFILES, "walk-x2"]
    assert profiles["walk-x2"] == Profile("walk-x2", 2, "sm75", "DeepSeek-V3-Chat-multi-gpu.yaml")


def test_a_gpu_service_without_its_facts_is_refused(tmp_path):
    image = next(line for line in WALK_X2.splitlines() if line.strip().startswith("image:"))
    path = _compose_with(tmp_path, WALK_X2.replace("walk-x2", "odd").replace(image, "    image: busybox"))
    with pytest.raises(KtlegacyError, match="service odd reserves GPUs but its image is no ktlegacy tag"):
        load_profiles(path)
