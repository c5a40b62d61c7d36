"""The `smoke` profile's entrypoint: run the image's no-GPU smoke tests, then serve the verdict.

CI has no GPU, so this profile proves the compose wiring the GPU profiles share - read-only
model mounts, environment, published port, healthcheck - around the runtime image's own smoke
tests. GET /healthz answers 200 with a JSON report when the smoke tests passed and the model
mounts are read-only, 503 otherwise; the healthcheck turns that into healthy / unhealthy.
Standard library only: it runs on whatever python3 the image has.
"""

import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = 10002
MOUNTS = ("/models/hf", "/models/gguf")
ENV_KEYS = ("KTLEGACY_PROFILE", "PYTORCH_CUDA_ALLOC_CONF", "KTLEGACY_CPU_INFER", "KTLEGACY_MAX_NEW_TOKENS",
            "KTLEGACY_CACHE_LENS", "KTLEGACY_MODEL_NAME", "KTLEGACY_GPU_PREFILL_MIN_TOKENS", "KTLEGACY_GPU_PREFILL_MIB",
            "HOME")


def mount_report(path: str) -> dict:
    """What the container sees at a model mount, and whether it is really read-only."""
    if not os.path.isdir(path):
        return {"present": False, "files": [], "read_only": None}
    probe = os.path.join(path, ".ktlegacy-write-probe")
    try:
        with open(probe, "w"):
            pass
        os.unlink(probe)
        read_only = False
    except OSError:
        read_only = True
    return {"present": True, "files": sorted(os.listdir(path)), "read_only": read_only}


def run_smoke(cmd: str) -> dict:
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip().splitlines()
    return {"command": cmd, "returncode": proc.returncode, "tail": output[-20:]}


def main() -> int:
    smoke = run_smoke(os.environ.get("KTLEGACY_SMOKE_CMD", "false"))
    mounts = {path: mount_report(path) for path in MOUNTS}
    state_dir = os.environ.get("KTLEGACY_STATE_DIR", "/var/lib/ktlegacy")
    report = {
        "smoke": smoke,
        "mounts": mounts,
        "state_dir_writable": os.access(state_dir, os.W_OK),
        "environment": {key: os.environ.get(key) for key in ENV_KEYS},
    }
    ok = (smoke["returncode"] == 0 and report["state_dir_writable"]
          and all(m["present"] and m["read_only"] for m in mounts.values()))
    report["ok"] = ok
    body = json.dumps(report, indent=1).encode()
    print(body.decode(), flush=True)
    print(f"smoke service: {'PASS' if ok else 'FAIL'}; serving the report on :{PORT}/healthz", flush=True)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/healthz":
                self.send_error(404)
                return
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # the healthcheck polls every few seconds: keep logs readable
            pass

    ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
