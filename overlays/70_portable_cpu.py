"""portable-cpu: the C++ extension is compiled for the CPU_INSTRUCT asked for, not for the build host.

Images are built on one machine and run on others, so nothing the build host has may leak in.
Upstream's setup.py maps CPU_INSTRUCT (NATIVE, FANCY, AVX512, AVX2) to LLAMA_* CMake options,
but any other value (a typo, lower case) silently becomes NATIVE (-march=native); the overlay
normalises the value and refuses unknown ones. From v0.3.1 the extension's CMakeLists also
probes ``lscpu`` and turns on AVX512 and AMX code whenever the *build host* has them, whatever
was asked; the overlay lets that probe count only for NATIVE builds and otherwise derives it
from the requested LLAMA_AVX512 option (AMX stays off: no CPU_INSTRUCT value asks for it).
"""

from ktlegacy.overlay import ALL_REFS, Overlay

SETUP = "setup.py"
CHOICE = '    CPU_INSTRUCT = os.getenv("CPU_INSTRUCT", "NATIVE")\n'
CHECKED_CHOICE = (
    '    CPU_INSTRUCT = os.getenv("CPU_INSTRUCT", "NATIVE").strip().upper()\n'
    '    if CPU_INSTRUCT not in ("NATIVE", "FANCY", "AVX512", "AVX2"):  # ktlegacy: no silent -march=native\n'
    '        raise ValueError("CPU_INSTRUCT=%r: use one of NATIVE, FANCY, AVX512, AVX2" % CPU_INSTRUCT)\n')

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


class PortableCpuOverlay(Overlay):
    name = "portable-cpu"
    summary = "C++ build: CPU_INSTRUCT validated; host lscpu AVX512/AMX probe only for NATIVE builds"
    refs = ALL_REFS

    def apply(self, tree, ctx):
        tree.replace(SETUP, CHOICE, CHECKED_CHOICE, what="CPU_INSTRUCT normalised, unknown values refused")
        if ctx.ref.name in ("v0.3.1", "v0.3.2"):
            tree.replace(EXT_CMAKE, PROBE, PROBE_GATED, what="lscpu AVX512/AMX probe only for NATIVE builds")


OVERLAY = PortableCpuOverlay()
