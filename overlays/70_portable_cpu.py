"""portable-cpu: the C++ extension is compiled for the CPU_INSTRUCT asked for, not for the build host.

Images are built on one machine and run on others, so nothing the build host has may leak in.
Upstream's setup.py maps CPU_INSTRUCT (NATIVE, FANCY, AVX512, AVX2) to LLAMA_* CMake options,
but any other value (a typo, lower case) silently becomes NATIVE (-march=native); the overlay
normalises the value and refuses unknown ones. From v0.3.1 (indented one level more from v0.4.1) the extension's CMakeLists also
probes ``lscpu`` and turns on AVX512 and AMX code whenever the *build host* has them, whatever
was asked; the overlay lets that probe count only for NATIVE builds and otherwise derives it
from the requested LLAMA_AVX512 option (AMX stays off: no CPU_INSTRUCT value asks for it).
From v0.2.4post1 the optional balance_serve extension (USE_BALANCE_SERVE=1) hard-codes
``-march=native`` in three CMakeLists; setup.py hands it the same LLAMA_* options, so the
overlay makes its flag follow them too.
"""

import re

from ktlegacy.core.facts import CPU_FLAGS, CPU_INSTRUCTS
from ktlegacy.core.overlay import Overlay

SETUP = "setup.py"
CHOICE = '    CPU_INSTRUCT = os.getenv("CPU_INSTRUCT", "NATIVE")\n'
_VALUES = tuple(reversed(CPU_INSTRUCTS))   # in upstream's order: NATIVE, FANCY, AVX512, AVX2
_QUOTED = ", ".join(f'"{value}"' for value in _VALUES)
CHECKED_CHOICE = (
    '    CPU_INSTRUCT = os.getenv("CPU_INSTRUCT", "NATIVE").strip().upper()\n'
    f'    if CPU_INSTRUCT not in ({_QUOTED}):  # ktlegacy: no silent -march=native\n'
    f'        raise ValueError("CPU_INSTRUCT=%r: use one of {", ".join(_VALUES)}" % CPU_INSTRUCT)\n')

EXT_CMAKE = "csrc/ktransformers_ext/CMakeLists.txt"
PROBE = ("    execute_process(\n"
         "        COMMAND lscpu\n"
         "        OUTPUT_VARIABLE LSCPU_OUTPUT\n"
         "        OUTPUT_STRIP_TRAILING_WHITESPACE\n"
         "    )\n")
PROBE_GATED = PROBE + (
    "    # ktlegacy: the host probe decides only for a NATIVE build; otherwise the requested\n"
    "    # instruction set does (AVX512 from LLAMA_AVX512, AMX never).\n"
    "    if (NOT LLAMA_NATIVE)\n"
    "        if (LLAMA_AVX512)\n"
    "            set(LSCPU_OUTPUT \"avx512\")\n"
    "        else()\n"
    "            set(LSCPU_OUTPUT \"\")\n"
    "        endif()\n"
    "    endif()\n")



def _deeper(block: str) -> str:
    return "".join("    " + line if line.strip() else line for line in block.splitlines(keepends=True))


BALANCE_ROOT = "csrc/balance_serve/CMakeLists.txt"
BALANCE_PROJECT = r"^project\(balance_serve\b.*\)$"


def march(instruct: str) -> str:
    """The gcc flags of an instruction set's code: -m + each CPU flag of ktlegacy/core/facts.py without "_"."""
    return " ".join("-m" + flag.replace("_", "") for flag in CPU_FLAGS[instruct])


MARCH_VAR = (
    "# ktlegacy: -march=native only for a NATIVE build; otherwise the instruction set setup.py\n"
    "# asked for (it passes the same LLAMA_* options to every extension).\n"
    "if (NOT DEFINED LLAMA_NATIVE OR LLAMA_NATIVE)\n"
    "    set(KTLEGACY_MARCH \"-march=native\")\n"
    "elseif (LLAMA_AVX512)\n"
    f"    set(KTLEGACY_MARCH \"{march('AVX512')}\")\n"
    "else()\n"
    f"    set(KTLEGACY_MARCH \"{march('AVX2')}\")\n"
    "endif()")
# An active (uncommented) `set(CMAKE_CXX_FLAGS "... -march=native ...")`.
NATIVE_FLAGS = r'^([ \t]*set\(CMAKE_CXX_FLAGS "[^"\n]*?)-march=native([^"\n]*"\))'


class PortableCpuOverlay(Overlay):
    name = "portable-cpu"
    summary = "C++ build: CPU_INSTRUCT validated; host lscpu AVX512/AMX probe only for NATIVE builds"

    def apply(self, tree, ctx):
        tree.replace(SETUP, CHOICE, CHECKED_CHOICE, what="CPU_INSTRUCT normalised, unknown values refused")
        if ctx.ref.name in ("v0.3.1", "v0.3.2"):
            tree.replace(EXT_CMAKE, PROBE, PROBE_GATED, what="lscpu AVX512/AMX probe only for NATIVE builds")
        elif ctx.ref.name not in ("0.2.1.post1", "v0.2.4post1"):  # no probe there
            # v0.4.1, v0.7.0 and a ref newer than the table knew: the same probe, one level deeper
            # (inside an x86 test); a tree without it is refused
            tree.replace(EXT_CMAKE, _deeper(PROBE), _deeper(PROBE_GATED),
                         what="lscpu AVX512/AMX probe only for NATIVE builds")
        if ctx.ref.name != "0.2.1.post1":
            self._balance_serve(tree)

    def _balance_serve(self, tree):
        tree.insert_line(BALANCE_ROOT, MARCH_VAR, after=BALANCE_PROJECT,
                         what="KTLEGACY_MARCH from the requested instruction set")
        for rel in tree.glob("csrc/balance_serve/**/CMakeLists.txt"):
            if re.search(NATIVE_FLAGS, tree.read(rel), flags=re.M):
                tree.sub(rel, NATIVE_FLAGS, r"\1${KTLEGACY_MARCH}\2",
                         what="-march=native -> ${KTLEGACY_MARCH}")


OVERLAY = PortableCpuOverlay()
