"""A small client for the Registry HTTP API v2 (the OCI distribution API): what ``publish`` needs.

``docker push`` can only push a tag, so it cannot give "push by digest, then tag". This client
uploads blobs and a manifest by digest (nothing visible under any tag), then puts the same
manifest under each tag, and can undo those tags. It speaks to any v2 registry: GHCR, Harbor,
cloud mirrors, Debian's ``docker-registry``.

Credentials are the ones ``docker login`` stored (``$DOCKER_CONFIG/config.json``: ``auths``,
``credHelpers``, ``credsStore``); they are only sent to the registry or to the token realm it
names, never printed, logged or written anywhere. Every failure is a one-line KtlegacyError.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import KtlegacyError

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (
    MANIFEST_V2,
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)
DOCKER_HUB = "docker.io"
_HUB_API = "registry-1.docker.io"
_HUB_AUTH_KEY = "https://index.docker.io/v1/"
TIMEOUT_S = 60
UPLOAD_TIMEOUT_S = 600   # a multi-GB layer PUT: the registry may hash it before it answers
UPLOAD_ATTEMPTS = 3


class RegistryUnreachable(KtlegacyError):
    """The registry did not answer (refused, reset, timed out, DNS)."""


class AuthRefused(KtlegacyError):
    """The registry (or its token service) refused our credentials or their absence."""


@dataclass(frozen=True)
class Target:
    """Where images go: ``[scheme://]host[:port][/namespace...]`` plus the image name."""
    host: str          # as users write it (docker.io, ghcr.io, 127.0.0.1:5000)
    namespace: str     # "" or "owner" or "group/sub"
    scheme: str        # https, or http for loopback registries and explicit http://

    @property
    def api_host(self) -> str:
        return _HUB_API if self.host == DOCKER_HUB else self.host

    def repository(self, name: str) -> str:
        """The repository path inside the registry (what /v2/<path>/... uses)."""
        path = f"{self.namespace}/{name}" if self.namespace else name
        if self.host == DOCKER_HUB and "/" not in path:
            path = "library/" + path
        return path

    def reference(self, name: str) -> str:
        """How docker names the repository (``docker pull <reference>:<tag>``)."""
        return f"{self.host}/{self.namespace}/{name}" if self.namespace else f"{self.host}/{name}"


_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$")


def parse_target(value: str) -> Target:
    """Parse ``--registry``: ``ghcr.io/owner``, ``127.0.0.1:5000``, ``http://harbor.lan/proj``."""
    raw = (value or "").strip().rstrip("/")
    scheme = None
    if "://" in raw:
        scheme, raw = raw.split("://", 1)
        if scheme not in ("http", "https"):
            raise KtlegacyError(f"--registry {value!r}: only http:// or https:// may prefix a registry")
    host, _, namespace = raw.partition("/")
    if not host or not _HOST.match(host) or ("." not in host and ":" not in host and host != "localhost"):
        raise KtlegacyError(f"--registry {value!r} does not start with a registry host "
                            "(e.g. ghcr.io/OWNER, registry.example.com:5000/project, 127.0.0.1:5000)")
    for part in filter(None, namespace.split("/")):
        if not _REPO_COMPONENT.match(part):
            raise KtlegacyError(f"--registry {value!r}: {part!r} is not a valid repository path component "
                                "(lower case letters, digits and . _ - only)")
    if scheme is None:
        scheme = "http" if _is_loopback(host) else "https"
    return Target(host=host, namespace=namespace.strip("/"), scheme=scheme)


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback(host: str) -> bool:
    # dockerd treats 127.0.0.0/8 (and ::1) registries as insecure by default; so do we.
    name = _hostname(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# --- credentials from docker login -------------------------------------------------------------

def docker_config_dir() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")


def docker_credentials(host: str) -> tuple[str, str] | None:
    """(username, secret) that ``docker login HOST`` stored, or None. Never printed."""
    path = docker_config_dir() / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise KtlegacyError(f"cannot read docker's {path} ({type(exc).__name__}); fix or remove it and "
                            "run docker login again") from None
    keys = [_HUB_AUTH_KEY, DOCKER_HUB, "index.docker.io"] if host == DOCKER_HUB else \
        [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]
    helper = next((config.get("credHelpers", {}).get(k) for k in keys if k in config.get("credHelpers", {})), None)
    if helper:
        return _from_helper(helper, keys[0])
    auths = config.get("auths", {}) or {}
    entry = next((auths[k] for k in keys if k in auths), None)
    if entry:
        if entry.get("auth"):
            try:
                user, _, secret = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
            except ValueError:
                raise KtlegacyError(f"docker's {path} holds an unreadable login for {host}; "
                                    f"run docker login {host} again") from None
            return user, secret
        if entry.get("username") and entry.get("password"):
            return entry["username"], entry["password"]
    if config.get("credsStore"):
        return _from_helper(config["credsStore"], keys[0])
    return None


def _from_helper(helper: str, server: str) -> tuple[str, str] | None:
    exe = f"docker-credential-{helper}"
    try:
        proc = subprocess.run([exe, "get"], input=server.encode(), capture_output=True, timeout=60)
    except FileNotFoundError:
        raise KtlegacyError(f"docker's config names credential helper {exe}, which is not on PATH; "
                            "install it or run docker login again") from None
    if proc.returncode != 0:
        return None  # the helper has no entry for this server ("credentials not found")
    try:
        data = json.loads(proc.stdout)
        return data["Username"], data["Secret"]
    except (ValueError, KeyError):
        raise KtlegacyError(f"credential helper {exe} gave an unreadable answer for {server}") from None


# --- the HTTP client ---------------------------------------------------------------------------

class _NoRedirectOnWrite(urllib.request.HTTPRedirectHandler):
    """Follow redirects of reads only (blob storage); the Authorization header is never carried
    across one (it is an unredirected header), so storage hosts never see our token."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if req.get_method() in ("GET", "HEAD"):
            return super().redirect_request(req, fp, code, msg, headers, newurl)
        return None


class Response:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> str:
        return self.headers.get(name, "") if self.headers is not None else ""


class RegistryClient:
    """One repository in one registry, with the pull+push rights that docker login gives."""

    def __init__(self, target: Target, repository: str, credentials: tuple[str, str] | None = None,
                 use_docker_login: bool = True):
        self.target = target
        self.repository = repository
        self.base = f"{target.scheme}://{target.api_host}"
        self._credentials = credentials if credentials is not None or not use_docker_login \
            else docker_credentials(target.host)
        self._auth_header: str | None = None
        handlers = [_NoRedirectOnWrite()]
        if _is_loopback(target.host):
            handlers.append(urllib.request.ProxyHandler({}))  # never send loopback through a proxy
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def where(self) -> str:
        return f"{self.target.host}/{self.repository}"

    # low level ------------------------------------------------------------------------------
    def _send(self, method: str, url: str, headers: dict, body=None, length: int | None = None,
              timeout: float = TIMEOUT_S):
        req = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
        if length is not None:
            req.add_header("Content-Length", str(length))
        if self._auth_header:
            req.add_unredirected_header("Authorization", self._auth_header)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                return Response(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as exc:
            data = exc.read() if exc.fp else b""
            return Response(exc.code, exc.headers, data)
        except (urllib.error.URLError, OSError, socket.timeout) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryUnreachable(f"registry {self.target.host} is unreachable ({_why(reason)}); "
                                      "check the address and that it is up") from None

    def request(self, method: str, path_or_url: str, headers: dict | None = None,
                body: bytes | BinaryIO | None = None, length: int | None = None,
                timeout: float = TIMEOUT_S) -> Response:
        """Send one request, authenticating on a 401 challenge (and once more if a token expired)."""
        url = path_or_url if "://" in path_or_url else self.base + path_or_url
        for attempt in range(2):
            if hasattr(body, "seek"):
                body.seek(0)
            resp = self._send(method, url, headers or {}, body, length, timeout)
            if resp.status != 401 or attempt == 1:
                break
            self._authenticate(resp.header("WWW-Authenticate"))
        if resp.status in (401, 403):
            raise self._refused(resp)
        return resp

    def _refused(self, resp: Response) -> AuthRefused:
        how = "with the login docker has for it" if self._credentials else "without a login"
        return AuthRefused(f"registry {self.target.host} refused to let us push to {self.repository} {how} "
                           f"(HTTP {resp.status}{_registry_error(resp)}); run docker login {self.target.host} "
                           "with an account that may push there")

    def _authenticate(self, challenge: str) -> None:
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            if not self._credentials:
                raise AuthRefused(f"registry {self.target.host} asks for a login and docker has none for it; "
                                  f"run docker login {self.target.host}")
            user, secret = self._credentials
            self._auth_header = "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
            return
        if scheme != "bearer" or "realm" not in params:
            raise AuthRefused(f"registry {self.target.host} asks for an authentication we do not speak "
                              f"({challenge.split(' ', 1)[0] or 'no challenge'})")
        query = {"scope": f"repository:{self.repository}:pull,push"}
        if params.get("service"):
            query["service"] = params["service"]
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urllib.parse.urlencode(query)
        headers = {}
        if self._credentials:
            user, secret = self._credentials
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
        req = urllib.request.Request(url, headers=headers)
        try:
            with self._opener.open(req, timeout=TIMEOUT_S) as resp:
                data = json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            how = "the login docker has for it" if self._credentials else "an anonymous request"
            raise AuthRefused(f"the token service of {self.target.host} refused {how} (HTTP {exc.code}); "
                              f"run docker login {self.target.host} with an account that may push to "
                              f"{self.repository}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RegistryUnreachable(f"the token service of {self.target.host} did not answer "
                                      f"({_why(getattr(exc, 'reason', exc))})") from None
        token = data.get("token") or data.get("access_token")
        if not token:
            raise AuthRefused(f"the token service of {self.target.host} answered without a token")
        self._auth_header = "Bearer " + token

    def _expect(self, resp: Response, ok: tuple, what: str) -> Response:
        if resp.status not in ok:
            raise KtlegacyError(f"registry {self.target.host} refused to {what} in {self.repository} "
                                f"(HTTP {resp.status}{_registry_error(resp)})")
        return resp

    # API ------------------------------------------------------------------------------------
    def ping(self) -> None:
        """Check the registry answers as a v2 registry and lets us push, before any upload."""
        resp = self.request("GET", "/v2/")
        if resp.status != 200:
            raise KtlegacyError(f"{self.base} does not answer as a container registry (GET /v2/: HTTP "
                                f"{resp.status}); check --registry")
        # token registries grant per-repository scopes: asking for pull,push here makes a refusal
        # come before the first upload
        self._expect(self.request("GET", f"/v2/{self.repository}/tags/list"), (200, 404), "list tags")

    def has_blob(self, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{self.repository}/blobs/{digest}")
        return resp.status == 200

    def upload_blob(self, digest: str, body: BinaryIO | bytes, size: int) -> None:
        """Monolithic upload (POST, then PUT with the whole blob), as the distribution spec allows;
        retried on a dropped connection or a 5xx, as docker push does."""
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                resp = self._expect(self.request("POST", f"/v2/{self.repository}/blobs/uploads/", length=0),
                                    (202,), "start a blob upload")
                location = urllib.parse.urljoin(self.base + "/", resp.header("Location"))
                sep = "&" if "?" in location else "?"
                resp = self.request("PUT", f"{location}{sep}digest={digest}",
                                    {"Content-Type": "application/octet-stream"}, body, size,
                                    timeout=UPLOAD_TIMEOUT_S)
                if resp.status >= 500 and attempt + 1 < UPLOAD_ATTEMPTS:
                    time.sleep(2 ** attempt)
                    continue
                self._expect(resp, (201, 204), f"store blob {digest[:19]}")
                return
            except RegistryUnreachable:
                if attempt + 1 == UPLOAD_ATTEMPTS:
                    raise
                time.sleep(2 ** attempt)

    def get_manifest(self, reference: str) -> tuple[bytes, str, str] | None:
        """(bytes, media type, digest) of a manifest by tag or digest, or None if absent."""
        resp = self.request("GET", f"/v2/{self.repository}/manifests/{reference}",
                            {"Accept": ", ".join(MANIFEST_TYPES)})
        if resp.status == 404:
            return None
        self._expect(resp, (200,), f"read manifest {reference}")
        digest = resp.header("Docker-Content-Digest") or "sha256:" + hashlib.sha256(resp.body).hexdigest()
        return resp.body, resp.header("Content-Type").split(";")[0].strip(), digest

    def has_manifest(self, reference: str) -> bool:
        resp = self.request("HEAD", f"/v2/{self.repository}/manifests/{reference}",
                            {"Accept": ", ".join(MANIFEST_TYPES)})
        return resp.status == 200

    def put_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        """Store a manifest under a digest or a tag; return the digest the registry reports."""
        resp = self._expect(self.request("PUT", f"/v2/{self.repository}/manifests/{reference}",
                                         {"Content-Type": media_type}, body, len(body)),
                            (200, 201, 204), f"store manifest {reference}")
        return resp.header("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()

    def delete_manifest(self, reference: str) -> bool:
        """DELETE a tag or a digest; False where the registry does not support it."""
        resp = self.request("DELETE", f"/v2/{self.repository}/manifests/{reference}")
        return resp.status in (200, 202, 204)

    def tags(self) -> list[str]:
        resp = self.request("GET", f"/v2/{self.repository}/tags/list?n=10000")
        if resp.status == 404:
            return []
        self._expect(resp, (200,), "list tags")
        return sorted(json.loads(resp.body or b"{}").get("tags") or [])


def _parse_challenge(header: str) -> tuple[str, dict]:
    scheme, _, rest = (header or "").strip().partition(" ")
    params = dict((k.lower(), v) for k, v in re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


def _registry_error(resp: Response) -> str:
    """The registry's own error code (": DENIED"), never the body wholesale."""
    try:
        errors = json.loads(resp.body or b"{}").get("errors") or []
        codes = [str(e.get("code")) for e in errors if e.get("code")]
        return ": " + ", ".join(codes) if codes else ""
    except (ValueError, AttributeError):
        return ""


def _why(reason) -> str:
    if isinstance(reason, ssl.SSLError):
        return (f"TLS failed: {getattr(reason, 'reason', None) or reason}; for a plain-HTTP registry "
                "write --registry http://HOST/...")
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    text = str(reason).strip() or type(reason).__name__
    return text.replace("\n", " ")[:160]
