"""ktlegacy.generate: the files that cannot import ktlegacy/core/facts.py are written from it.

CI runs ``python -m ktlegacy.generate --check`` through the first test; the others change the
table (monkeypatched) or a file on a copy in tmp, never the checkout.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

from ktlegacy import generate
from ktlegacy.core import facts

REPO = Path(__file__).resolve().parent.parent


def _copy(tmp_path: Path) -> Path:
    for rel in {r.path for r in generate.rules()}:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    return tmp_path


def test_generated_files_are_current():
    proc = subprocess.run([sys.executable, "-m", "ktlegacy.generate", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_changed_table_value_makes_check_fail_and_write_fix_it(tmp_path, monkeypatch):
    root = _copy(tmp_path)
    monkeypatch.setattr(facts, "TORCH_VERSION", "2.5.2+cu118")
    monkeypatch.setattr(facts, "SERVER_PORT", 10003)
    monkeypatch.setattr(facts, "DEFAULT_CPU_INSTRUCT", "AVX512")
    monkeypatch.setitem(facts.SETTINGS, "KTLEGACY_CACHE_LENS",
                        dataclasses.replace(facts.SETTINGS["KTLEGACY_CACHE_LENS"], default="4096"))
    stale = generate.run(root, write=False)
    assert sorted(line.split(":")[0] for line in stale) == [
        "compose/.env.example", "compose/compose.yaml", "compose/serve.sh", "compose/smoke_service.py",
        "images/Dockerfile"]
    assert all("run `python -m ktlegacy.generate --write`" in line for line in stale)
    assert generate.run(root, write=True) == [] and generate.run(root, write=False) == []
    dockerfile = (root / "images/Dockerfile").read_text()
    assert dockerfile.count("ARG TORCH_VERSION=2.5.2+cu118\n") == 2 and "2.5.1+cu118\n" not in dockerfile
    assert dockerfile.count("ARG CPU_INSTRUCT=AVX512\n") == 3
    assert "#   CPU_INSTRUCT         AVX2 | AVX512 (portable default) | FANCY | NATIVE (NATIVE:" in dockerfile
    compose = (root / "compose/compose.yaml").read_text()
    assert '"${KTLEGACY_CACHE_LENS:-4096}"' in compose and "127.0.0.1:10003/healthz" in compose
    assert "--port 10003 " in (root / "compose/serve.sh").read_text()
    assert "KTLEGACY_CACHE_LENS=4096\n" in (root / "compose/.env.example").read_text()
    # the checkout's files are untouched, and stale against the changed table only
    monkeypatch.undo()
    assert len(generate.run(root, write=False)) == 5 and generate.run(REPO, write=False) == []


def test_check_exits_1_with_one_line_per_stale_file(tmp_path):
    root = _copy(tmp_path)
    env_example = root / "compose/.env.example"
    env_example.write_text(env_example.read_text().replace("KTLEGACY_PORT=10002", "KTLEGACY_PORT=8080"))
    dockerfile = root / "images/Dockerfile"   # a place moved: the rule that wrote it finds nothing
    dockerfile.write_text(dockerfile.read_text().replace("KTLEGACY_IMAGE_CUDA=", "KTLEGACY_IMAGE_CUDA_VERSION="))
    proc = subprocess.run([sys.executable, "-m", "ktlegacy.generate", "--check", "--root", str(root)],
                          cwd=REPO, capture_output=True, text=True)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 2, proc.stderr
    assert lines[0].startswith("images/Dockerfile: the generator finds no place for")
    assert lines[1].startswith("compose/.env.example: stale (1 line(s), e.g. '-KTLEGACY_PORT=8080' -> "
                               "'+KTLEGACY_PORT=10002')")
