"""The GPU architectures ktlegacy builds for, and what each one implies.

One table, used by the overlays, the image build, the doctor and the smoke tests, so an
arch means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import KtlegacyError


@dataclass(frozen=True)
class Arch:
    name: str                  # "sm70"
    compute_capability: tuple  # (7, 0)
    torch_cuda_arch_list: str  # what TORCH_CUDA_ARCH_LIST gets for a build of this arch
    cuobjdump_name: str        # how cuobjdump --list-elf names its cubins ("sm_70")
    shared_mem_per_block: int  # opt-in maximum dynamic shared memory per block, bytes
    gpus: str                  # the cards users have

    @property
    def cc_string(self) -> str:
        return "%d.%d" % self.compute_capability


# Shared memory: Volta lets a block opt in to 96 KiB, Turing to 64 KiB
# (CUDA C Programming Guide, "Compute Capabilities", table "Technical Specifications").
ARCHES = {
    "sm70": Arch("sm70", (7, 0), "7.0", "sm_70", 96 * 1024, "Tesla V100, Titan V"),
    "sm75": Arch("sm75", (7, 5), "7.5", "sm_75", 64 * 1024, "Tesla T4, RTX 2080 Ti, Quadro RTX"),
}


def get_arch(name: str) -> Arch:
    """Return the Arch for ``name`` or raise a one-line error saying what to use instead."""
    key = (name or "").strip().lower().replace("_", "")
    if key in ARCHES:
        return ARCHES[key]
    if key.startswith("sm") and key[2:].isdigit() and int(key[2:]) >= 80:
        raise KtlegacyError(
            f"arch {name!r} is Ampere or newer: ktlegacy only targets sm70 and sm75; "
            "use the upstream ktransformers images for it"
        )
    raise KtlegacyError(f"unknown arch {name!r}: use one of {', '.join(ARCHES)}")


def arches_for(name: str) -> list[Arch]:
    """``all`` means every arch we build; anything else is one arch."""
    if (name or "").strip().lower() == "all":
        return list(ARCHES.values())
    return [get_arch(name)]
