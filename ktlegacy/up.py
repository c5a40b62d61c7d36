"""``invoke up --profile P``: run the doctor, refuse on a failing check, then ``docker compose up -d``.

``--force`` starts anyway (the failing rows are still printed), for cases the doctor cannot
judge - a custom rule file whose placement it estimates wrongly, a GPU it does not know.
"""

from __future__ import annotations

from .core.command import command
from .core.errors import KtlegacyError
from .profiles import PROFILES, REPO_ROOT, get_profile


def up(profile: str, force: bool = False) -> None:
    from .docker import daemon_client
    from .doctor import doctor

    get_profile(profile)
    report = doctor(profile)
    print(report.table())
    failed = report.failed
    if failed and not force:
        first = failed[0]
        raise KtlegacyError(f"not starting profile {profile}: {len(failed)} doctor check(s) failed, first "
                            f"{first.check}: {first.detail}; fix them (see the table) or pass --force")
    docker = daemon_client()
    args = ["--profile", profile, "up", "-d"]
    print("+ " + " ".join(docker.cmd("compose", *args)), flush=True)
    proc = docker.compose(*args, cwd=REPO_ROOT)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
        raise KtlegacyError(f"docker compose --profile {profile} up failed: {err}")
    print(f"profile {profile} started; follow it with: docker compose --profile {profile} logs -f")


def _up_args(p) -> None:
    p.add_argument("--profile", required=True, help=f"compose profile to start: {', '.join(PROFILES)}")
    p.add_argument("--force", action="store_true", help="start even if a doctor check fails")


@command("up", "run the doctor, then `docker compose --profile P up -d` (refuses on a failing check)", _up_args)
def up_command(args) -> int:
    up(args.profile, args.force)
    return 0
