"""What a build checks before it runs anything: that the torch wheel it will install is there.

The product image installs the torch pin (``facts.TORCH_VERSION``) from PyTorch's index (or
``--torch-index-url``, or ``--wheelhouse DIR``). A build that cannot get it used to fail deep in
the toolchain stage, after the bases were made; here it fails first, in one line, naming
``--torch-index-url`` and ``--wheelhouse``. :func:`torch_wheel` says what will be installed and
from where (``build --dry-run`` prints it); :func:`check_torch_wheel` reads the index's PEP 503
page for the torch project (or the wheelhouse) and looks for a wheel of that version for the
image's Python and platform. A TLS-intercepting proxy shows up here first too: the certificate
check fails, and the line says to pass ``--ca-cert``.
"""

from __future__ import annotations

import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .core import facts
from .core.errors import KtlegacyError

PLATFORM = "x86_64"   # the images are linux/amd64


@dataclass(frozen=True)
class TorchWheel:
    version: str          # the pin, facts.TORCH_VERSION unless --torch-version
    python: str | None    # "3.11": the image's CPython (None: a base we do not know)
    index: str | None     # the index pip reads it from (None: the wheelhouse)
    wheelhouse: Path | None

    @property
    def python_tag(self) -> str | None:
        return "cp" + self.python.replace(".", "") if self.python else None

    def describe(self) -> str:
        where = f"the wheelhouse {self.wheelhouse}" if self.wheelhouse else self.index
        py = f"CPython {self.python}" if self.python else "the base image's CPython"
        return f"torch=={self.version} ({py}, linux {PLATFORM}) from {where}"


def torch_wheel(request, default_index: str = facts.TORCH_INDEX_URL) -> TorchWheel | None:
    """The torch the build's images install (None for builds that install another: the stand-in's CPU
    torch, CI's stand-in torch)."""
    if request.standin or request.ci_torch:
        return None
    if request.debian_bases:
        python = facts.DEBIAN_BASE_PYTHON
    elif not request.base_image or request.base_image == facts.BASE_IMAGE:
        python = facts.BASE_IMAGE_PYTHON
    else:
        python = None
    wheelhouse = Path(request.wheelhouse).resolve() if request.wheelhouse else None
    return TorchWheel(request.torch_version or facts.TORCH_VERSION, python,
                      None if wheelhouse else (request.torch_index_url or default_index), wheelhouse)


def check_torch_cuda(version: str, standin: bool = False) -> None:
    """A torch pin built for another CUDA major than the toolkit cannot take our extensions: torch's
    extension builder refuses nvcc 11.8 for it (and a CPU or ROCm build has no CUDA at all)."""
    local = version.partition("+")[2]
    if standin or not local:
        return
    m = re.fullmatch(r"cu(\d+)(\d)", local)
    toolkit = facts.CUDA_VERSION.split(".")[0]
    if m is None:
        raise KtlegacyError(f"--torch-version {version} is not a CUDA build; the image compiles CUDA {facts.CUDA_VERSION} "
                            f"extensions against torch: use a +{facts.CUDA_TAG} build, e.g. {facts.TORCH_VERSION}")
    if m.group(1) != toolkit:
        raise KtlegacyError(f"--torch-version {version} is built for CUDA {m.group(1)}.{m.group(2)}, the image's toolkit "
                            f"is CUDA {facts.CUDA_VERSION}: torch refuses to build extensions with an nvcc of another "
                            f"major; use a CUDA {toolkit} build, e.g. {facts.TORCH_VERSION}")


_WHEEL = re.compile(r"^torch-(?P<version>[^-]+)-(?:\d[^-]*-)?(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def _matches(filename: str, wheel: TorchWheel) -> bool:
    m = _WHEEL.match(filename)
    if not m or m["version"] != wheel.version:
        return False
    if wheel.python_tag and wheel.python_tag not in m["py"].split("."):
        return False
    if not wheel.python_tag and not m["py"].startswith("cp3"):
        return False
    return any(p.startswith(("linux_", "manylinux")) and p.endswith(PLATFORM) for p in m["plat"].split("."))


def _fetch(url: str, ca_cert: Path | None, timeout: float) -> str:
    context = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    req = urllib.request.Request(url, headers={"Accept": "text/html", "User-Agent": "ktlegacy-preflight"})
    with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
        return resp.read().decode("utf-8", "replace")


def _unreachable(index: str, exc: Exception, ca_cert: Path | None) -> KtlegacyError:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        host = urllib.parse.urlsplit(index).hostname
        if ca_cert:
            return KtlegacyError(f"TLS to {host} fails certificate verification even with --ca-cert {ca_cert} "
                                 f"({getattr(reason, 'verify_message', reason)}): pass your proxy's CA bundle with --ca-cert")
        return KtlegacyError(f"TLS to {host} fails certificate verification ({getattr(reason, 'verify_message', reason)}): "
                             "behind a TLS-intercepting proxy pass its CA bundle, e.g. "
                             "--ca-cert /etc/ssl/certs/ca-certificates.crt")
    return KtlegacyError(f"cannot reach the torch index {index} ({reason}): pass --torch-index-url with a mirror "
                         "that serves the pin, or --wheelhouse DIR holding its wheel")


def check_torch_wheel(wheel: TorchWheel, ca_cert: Path | None = None, timeout: float = 30) -> str:
    """The file name of a wheel that satisfies ``wheel``; else one line naming the fix."""
    fix = "pass --torch-index-url with an index that serves it, or --wheelhouse DIR holding its wheel"
    for_ = f"CPython {wheel.python}" if wheel.python else "CPython 3"
    if wheel.wheelhouse is not None:
        names = sorted(p.name for p in wheel.wheelhouse.glob("torch-*.whl"))
        found = [n for n in names if _matches(n, wheel)]
        if not found:
            raise KtlegacyError(f"the wheelhouse {wheel.wheelhouse} has no torch=={wheel.version} wheel for {for_} "
                                f"linux {PLATFORM} ({', '.join(names[:3]) or 'no torch wheel'}): put it there "
                                "(pip download -d DIR torch==VERSION --index-url INDEX), or drop --wheelhouse")
        return found[0]
    page_url = wheel.index.rstrip("/") + "/torch/"
    try:
        page = _fetch(page_url, ca_cert, timeout)
    except urllib.error.HTTPError as exc:
        raise KtlegacyError(f"the torch index {wheel.index} has no torch project page ({page_url}: HTTP {exc.code}): "
                            f"{fix}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _unreachable(wheel.index, exc, ca_cert) from None
    names = [urllib.parse.unquote(urllib.parse.urlsplit(h).path.rsplit("/", 1)[-1])
             for h in re.findall(r"""href\s*=\s*["']([^"']+)["']""", page, re.I)]
    found = [n for n in names if _matches(n, wheel)]
    if found:
        return found[0]
    same_version = sorted({n for n in names if n.startswith(f"torch-{wheel.version}-")})
    seen = (f"it has torch=={wheel.version} only as {', '.join(same_version[:3])}" if same_version else
            f"it lists {len([n for n in names if n.endswith('.whl')])} torch wheels, none of version {wheel.version}")
    raise KtlegacyError(f"the torch index {wheel.index} serves no torch=={wheel.version} wheel for {for_} linux "
                        f"{PLATFORM} ({seen}): {fix}")
