"""How long `invoke publish` takes for the stand-in runtime image, against Debian's docker-registry
on 127.0.0.1: cold (nothing cached, empty registry: every layer gzipped and uploaded), again to
the same registry (layer cache: nothing compressed or uploaded), and to a fresh registry with
KTLEGACY_BLOB_STORE (compressed layers reused, uploaded again); and, as the baseline, a plain
`docker push` of the same image to an empty registry.

    .venv/bin/python bench/publish_speed.py [--image TAG]   # default: the stand-in runtime image

Writes bench/results/publish_speed.json. The stand-in image comes from ktlegacy/build.py
(`invoke build --arch sm75 --standin ...`, as the test fixture builds it): build it first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ktlegacy.docker import client  # noqa: E402

DEFAULT_IMAGE = "h3-ktlegacy/ktransformers:0.2.1.post1-cu118-sm75-avx2-standin"
SOURCE = "bench-publish/ktransformers"


def registry(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root.mkdir(parents=True)
    (root / "config.yml").write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                                     f"    rootdirectory: {root / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(root / "config.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise SystemExit("docker-registry did not start")


def timed_publish(host: str, env: dict) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "publish", "--registry", host, "--source-repository",
                           SOURCE, "--allow-standin", "--allow-dirty"], capture_output=True, text=True,
                          env=env, cwd=REPO)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.strip())
    return elapsed, proc.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    args = parser.parse_args()
    docker = client()
    info = json.loads(docker.run("image", "inspect", args.image).stdout)[0]
    tag = args.image.rsplit(":", 1)[1]
    docker.run("tag", args.image, f"{SOURCE}:{tag}")
    results = {"image": args.image, "size_bytes": info["Size"], "layers": len(info["RootFS"]["Layers"])}
    procs = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
            tmp = Path(tmp)
            env = dict(os.environ, KTLEGACY_CACHE=str(tmp / "cache"), DOCKER_CONFIG=str(tmp / "docker"))
            proc, host = registry(tmp / "r1")
            procs.append(proc)
            results["cold_s"], results["cold_line"] = timed_publish(host, env)
            results["again_same_registry_s"], results["again_line"] = timed_publish(host, env)
            proc, host2 = registry(tmp / "r2")
            procs.append(proc)
            env_store = dict(env, KTLEGACY_BLOB_STORE=str(tmp / "blobs"), KTLEGACY_CACHE=str(tmp / "cache2"))
            _, _ = timed_publish(host, env_store)  # fills the blob store (same registry: uploads nothing)
            results["fresh_registry_with_blob_store_s"], results["blob_store_line"] = timed_publish(host2, env_store)
            # baseline: docker push of the same image to an empty registry (dockerd compresses in Go)
            proc, host3 = registry(tmp / "r3")
            procs.append(proc)
            docker.run("tag", args.image, f"{host3}/ktransformers:{tag}")
            t0 = time.monotonic()
            docker.run("push", f"{host3}/ktransformers:{tag}")
            results["docker_push_cold_s"] = time.monotonic() - t0
            docker.run("rmi", f"{host3}/ktransformers:{tag}", check=False)
    finally:
        for proc in procs:
            proc.kill()
        docker.run("rmi", f"{SOURCE}:{tag}", check=False)
    results["machine"] = f"{platform.node()}: {os.cpu_count()} CPUs, docker {docker.run('version', '--format', '{{.Server.Version}}').stdout.decode().strip()}"
    out = REPO / "bench" / "results" / "publish_speed.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
