"""The GPU architectures ktlegacy builds for, and what each one implies.

One table (``ARCHES``, in :mod:`ktlegacy.core.facts`), used by the overlays, the image build, the
doctor and the smoke tests, so an arch means the same thing everywhere.
"""

from __future__ import annotations

from .errors import KtlegacyError
from .facts import ARCHES, Arch  # noqa: F401  (the table lives in ktlegacy/core/facts.py; re-exported)


def get_arch(name: str) -> Arch:
    """Return the Arch for ``name`` or raise a one-line error saying what to use instead."""
    key = (name or "").strip().lower().replace("_", "")
    if key in ARCHES:
        return ARCHES[key]
    if key.startswith("sm") and key[2:].isdigit() and int(key[2:]) >= 80:
        raise KtlegacyError(
            f"arch {name!r} is Ampere or newer: ktlegacy only targets {' and '.join(ARCHES)}; "
            "use the upstream ktransformers images for it"
        )
    raise KtlegacyError(f"unknown arch {name!r}: use one of {', '.join(ARCHES)}")


def arches_for(name: str) -> list[Arch]:
    """``all`` means every arch we build; anything else is one arch (its error names ``all`` too)."""
    if (name or "").strip().lower() == "all":
        return list(ARCHES.values())
    try:
        return [get_arch(name)]
    except KtlegacyError as exc:
        raise KtlegacyError(str(exc).replace(f"use one of {', '.join(ARCHES)}",
                                             f"use {', '.join(ARCHES)} or all")) from None
