"""The image's HEALTHCHECK: healthy when the server answers, or (no server configured) when
ktransformers and flash_attn import.

Set KTLEGACY_HEALTH_URL to check the server; any 2xx/3xx answer within the timeout is healthy.
Compose's services run this same script as their healthcheck, with the URL in their
environment (the server's /health, the smoke service's /healthz).
"""

import os
import sys
import urllib.request


def main() -> int:
    url = os.environ.get("KTLEGACY_HEALTH_URL")
    if url:
        try:
            with urllib.request.urlopen(url, timeout=15) as resp:
                return 0 if resp.status < 400 else 1
        except Exception as exc:  # any failure is "unhealthy"; say which
            print(f"unhealthy: {url}: {exc}", file=sys.stderr)
            return 1
    import flash_attn  # noqa: F401
    import ktransformers  # noqa: F401
    return 0


if __name__ == "__main__":
    sys.exit(main())
