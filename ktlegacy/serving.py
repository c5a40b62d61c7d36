"""What serve.sh checks before it starts the server, one implementation for the host and the container.

* :func:`check_rules`: the ops a rule file selects, read as YAML (a commented-out line is no op):
  none of them may be an sm80+ op (``facts.SM80_ONLY_OPS``: Marlin, FP8).
* :func:`validate`: every ``KTLEGACY_*`` setting of ``facts.SETTINGS`` that is set, by its kind
  (whole numbers >= their minimum, the port in 1-65535, distinct GPU ids, ...), and
  ``KTLEGACY_SERVER_ARGS`` split like a shell line without glob expansion, refusing the flags
  serve.sh sets itself. A bad value is one :class:`SettingError` line naming the setting, the
  value and the fix.

The doctor imports this module (``ktlegacy.serving``) and validates compose/.env with it; in the
container compose mounts this file and ``facts.py`` side by side (compose/compose.yaml) and
compose/serve.sh runs it with the image's Python, which has PyYAML but not the ktlegacy library::

    python3 serving.py settings     # validate the environment; print shell assignments for eval
    python3 serving.py rules FILE   # refuse a rule file that selects an sm80+ op

Standard library and PyYAML only; the one ktlegacy module it needs, facts.py, is loaded from
beside it when it runs as a script.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import sys

try:
    from .core.facts import ARCHES, SETTINGS, SM80_ONLY_OPS
except ImportError:  # run as a script (the container): compose mounts facts.py beside this file
    from facts import ARCHES, SETTINGS, SM80_ONLY_OPS

ERROR_PREFIX = "ktlegacy serve: error: "   # serve.sh's refusals start with it too

# The upstream server flags serve.sh sets, and the setting to change instead (None: fixed by the
# profile). --model_dir is upstream's alias of --model_path.
OWN_FLAGS = {
    "--host": "KTLEGACY_BIND",
    "--port": "KTLEGACY_PORT",
    "--model_path": "KTLEGACY_MODEL_DIR",
    "--model_dir": "KTLEGACY_MODEL_DIR",
    "--gguf_path": "KTLEGACY_GGUF_DIR",
    "--optimize_config_path": "KTLEGACY_RULES",
    "--model_name": "KTLEGACY_MODEL_NAME",
    "--cpu_infer": "KTLEGACY_CPU_INFER",
    "--max_new_tokens": "KTLEGACY_MAX_NEW_TOKENS",
    "--cache_lens": "KTLEGACY_CACHE_LENS",
    "--log_dir": None,
    "--db_host": None,
}
_GPU_ID = re.compile(r"^(?:\d+|(?:GPU|MIG)-[0-9A-Za-z/_-]+)$")
_COUNT = re.compile(r"^[0-9]+$")


# --- refusals --------------------------------------------------------------------------------------

class Refusal(ValueError):
    """Why serve.sh must not start: ``problem`` (what and where) and ``fix``, one line together."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem, fix)
        self.problem, self.fix = problem, fix

    def __str__(self) -> str:
        return self.line

    @property
    def line(self) -> str:
        return f"{self.problem}: {self.fix}"


class RuleFileError(Refusal):
    """A rule file serve.sh must not start with."""


class SettingError(Refusal):
    """A bad setting: ``problem`` names the setting and its value."""


# --- rule files ------------------------------------------------------------------------------------

def load_rules(text: str, name: str) -> list:
    """The rules of a rule file: a YAML list of mappings (``match``, ``replace``, ...)."""
    import yaml
    try:
        rules = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RuleFileError(f"rule file {name} is not valid YAML{where} ({getattr(exc, 'problem', None) or exc})",
                            "fix the file or set KTLEGACY_RULES in compose/.env to another one") from None
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise RuleFileError(f"rule file {name} is not a list of rules (- match: ... replace: ...)",
                            "set KTLEGACY_RULES in compose/.env to an optimize-rule file")
    return rules


def selected_ops(rules: list) -> list[tuple[int, str, str]]:
    """(rule number from 1, where, op) for each op the rules select: the class each rule's
    ``replace`` names (where "class", its last dotted part) and every ``replace.kwargs`` value of a
    key ending in ``_op`` (where that key: ``generate_op``, ``prefill_op``)."""
    ops = []
    for i, rule in enumerate(rules, 1):
        replace = rule.get("replace")
        if not isinstance(replace, dict):
            continue
        cls = replace.get("class")
        if isinstance(cls, str):
            ops.append((i, "class", cls.rsplit(".", 1)[-1]))
        kwargs = replace.get("kwargs")
        if isinstance(kwargs, dict):
            ops.extend((i, str(k), v) for k, v in kwargs.items() if str(k).endswith("_op") and isinstance(v, str))
    return ops


def check_rules(text: str, name: str) -> list[tuple[int, str, str]]:
    """The ops the rule file selects (:func:`selected_ops`); :class:`RuleFileError` (one line) if
    one of them is an op sm70/sm75 cannot run."""
    ops = selected_ops(load_rules(text, name))
    bad = [(i, op) for i, _, op in ops if op in SM80_ONLY_OPS]
    if bad:
        names = ", ".join(sorted({op for _, op in bad}))
        raise RuleFileError(f"rule file {name} selects sm80+ op(s) {names} ({len(bad)}x, first in rule {bad[0][0]}), "
                            f"and {'/'.join(ARCHES)} have no Marlin or FP8 kernels",
                            "use the patched rule files of a ktlegacy image (`invoke patch` rewrites a tree's) and "
                            "set KTLEGACY_RULES in compose/.env to one of them")
    return ops


# --- settings --------------------------------------------------------------------------------------

def _fix(s, extra: str = "") -> str:
    default = f" (default {s.default})" if s.default else ""
    return f"set {s.name} in compose/.env to {s.what}{default}{extra}"


def server_args(text: str) -> list[str]:
    """``KTLEGACY_SERVER_ARGS`` as the words upstream's server gets: split like a shell line (quotes
    group words) with no glob, variable or command expansion; a flag serve.sh sets, or an
    abbreviation argparse would take for one, is refused."""
    name = "KTLEGACY_SERVER_ARGS"
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise SettingError(f"{name}={text!r} cannot be split into flags ({exc})",
                           "fix its quotes in compose/.env") from None
    for word in words:
        flag = word.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        own = [f for f in OWN_FLAGS if f == flag] or [f for f in OWN_FLAGS if f.startswith(flag)]
        if len(own) != 1:       # no flag of ours, or ambiguous (argparse refuses it, or it is upstream's own)
            continue
        (ours,) = own
        what = "a flag" if flag == ours else f"which argparse takes for {ours}, a flag"
        instead = OWN_FLAGS[ours]
        fix = (f"remove it from {name} and set {instead} in compose/.env instead" if instead else
               f"remove it from {name}; the compose profile fixes {ours}")
        raise SettingError(f"{name} has {word!r}, {what} ktlegacy sets itself", fix)
    return words


def check_value(name: str, value: str) -> str:
    """One setting's value, checked by the table; returns it normalised (whole numbers without
    sign or padding). Raises :class:`SettingError`."""
    s = SETTINGS[name]
    text = value.strip()
    if s.kind == "count" and text.lower() in s.words:
        return text.lower()
    if s.kind in ("count", "port"):
        number = int(text) if _COUNT.match(text) else None
        if s.kind == "port" and (number is None or not 1 <= number <= 65535):
            raise SettingError(f"{name}={value!r} is not a TCP port (1-65535)", _fix(s))
        if number is None or number < s.minimum:
            raise SettingError(f"{name}={value!r} is not " + " or ".join([*s.words, f"a whole number >= {s.minimum}"]),
                              _fix(s))
        return str(number)
    if s.kind == "address":
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise SettingError(f"{name}={value!r} is not an IP address", _fix(s)) from None
        return text
    if s.kind == "gpu":
        if not _GPU_ID.match(text):
            raise SettingError(f"{name}={value!r} is not a GPU index or UUID", _fix(s, "; nvidia-smi -L lists them"))
        return text
    if s.kind == "choice":
        if text not in s.choices:
            raise SettingError(f"{name}={value!r} is not one of {' | '.join(s.choices)}", _fix(s))
        return text
    if s.kind == "args":
        server_args(value)
        return value
    return value


def validate(env) -> tuple[dict, list[SettingError]]:
    """Check every setting of the table that ``env`` sets (an empty value means the default, as in
    compose). The GPU ids KTLEGACY_GPU_0.. must all differ, whichever profile starts: compose
    checks every service's device list, so a repeat refuses the whole file. Returns (every table
    setting's value, normalised or its default; the errors)."""
    values, errors = {}, []
    for name, s in SETTINGS.items():
        raw = env.get(name)
        if raw is None or raw == "":
            values[name] = s.default
            continue
        try:
            values[name] = check_value(name, raw)
        except SettingError as exc:
            errors.append(exc)
            values[name] = s.default
    gpus = [name for name, s in SETTINGS.items() if s.kind == "gpu"]
    seen: dict[str, str] = {}
    for name in gpus:
        if any(e.problem.startswith(name + "=") for e in errors):
            continue
        gpu = values[name]
        if gpu in seen:
            errors.append(SettingError(f"{name}={gpu!r} names the same GPU as {seen[gpu]}",
                                       f"give each of {gpus[0]}..{len(gpus) - 1} in compose/.env a different GPU, "
                                       "also those the profile does not use (compose checks every profile's list; "
                                       "nvidia-smi -L lists the GPUs)"))
        else:
            seen[gpu] = name
    return values, errors


# --- serve.sh's front ------------------------------------------------------------------------------

SERVER_SETTINGS = ("KTLEGACY_CPU_INFER", "KTLEGACY_MAX_NEW_TOKENS", "KTLEGACY_CACHE_LENS", "KTLEGACY_MODEL_NAME")


def main(argv: list[str], environ) -> int:
    if argv[:1] == ["settings"] and len(argv) == 1:
        values, errors = validate(environ)
        if errors:
            print(ERROR_PREFIX + errors[0].line, file=sys.stderr)
            return 2
        # what serve.sh evals: the values it passes on, and KTLEGACY_SERVER_ARGS as "$@"
        for name in SERVER_SETTINGS:
            print(f"{name}={shlex.quote(values[name])}")
        print("set -- " + shlex.join(server_args(values["KTLEGACY_SERVER_ARGS"])))
        return 0
    if argv[:1] == ["rules"] and len(argv) == 2:
        try:
            with open(argv[1], encoding="utf-8") as f:
                check_rules(f.read(), argv[1])
        except RuleFileError as exc:
            print(ERROR_PREFIX + exc.line, file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"{ERROR_PREFIX}cannot read rule file {argv[1]} ({exc.strerror}): set KTLEGACY_RULES in "
                  "compose/.env to a readable rule file", file=sys.stderr)
            return 2
        return 0
    print(f"usage: {sys.argv[0]} settings | rules FILE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    import os
    sys.exit(main(sys.argv[1:], os.environ))
