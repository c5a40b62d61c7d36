"""Open WebUI, unmodified, against the served API, driven in a real browser (issue 25).

Open WebUI (PyPI ``open-webui``, in a venv of its own with a CPU torch) runs on 127.0.0.1 with an
OpenAI connection and an Ollama connection to the CPU harness (tests/server_api_app.py), each with
the server's API key; Debian's ``chromium`` and ``chromium-driver`` drive its page through
Selenium: pick a model in the model selector, type into the chat box, press Enter, wait for the
answer. Chat settings stay Open WebUI's defaults (native function calling, its built-in tools
sent with every chat). Used by tests/test_open_webui.py and bench/server_hardening.py; nothing
leaves 127.0.0.1.
"""

from __future__ import annotations

import http.server
import itertools
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx

OPEN_WEBUI = "open-webui==0.12.4"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ADMIN = {"name": "Admin", "email": "admin@example.com", "password": "pw-0123456789"}


class DriverError(Exception):
    pass


def open_webui_python() -> Path:
    from cached_venv import TORCH_CPU, cached_venv
    return cached_venv("open-webui-0.12.4", [TORCH_CPU, OPEN_WEBUI])


def start_open_webui(python: Path, root: Path, port: int, openai: list[tuple[str, str]],
                     ollama: list[tuple[str, str]], timeout: float = 300) -> dict:
    """``open-webui serve`` with OpenAI connections [(base URL, key)] (the first with the model-id
    prefix "openai.", so the same model on both connections can be told apart) and Ollama ones."""
    data = root / "open-webui-data"
    data.mkdir(parents=True, exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "OLLAMA", "KTLEGACY"))},
           "DATA_DIR": str(data), "HOME": str(root / "home"), "WEBUI_SECRET_KEY": "ktlegacy-test-secret",
           "OPENAI_API_BASE_URLS": ";".join(u for u, _ in openai), "OPENAI_API_KEYS": ";".join(k for _, k in openai),
           "OPENAI_API_CONFIGS": json.dumps({str(i): {"enable": True, **({"prefix_id": "openai"} if i == 0 else {})}
                                             for i in range(len(openai))}),
           "OLLAMA_BASE_URLS": ";".join(u for u, _ in ollama),
           "OLLAMA_API_CONFIGS": json.dumps({str(i): {"enable": True, "key": k} for i, (_, k) in enumerate(ollama)}),
           # no network here: no model downloads, update checks or telemetry
           "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false", "RAG_RERANKING_MODEL_AUTO_UPDATE": "false",
           "WHISPER_MODEL_AUTO_UPDATE": "false", "ENABLE_VERSION_UPDATE_CHECK": "false",
           "ANONYMIZED_TELEMETRY": "false", "SCARF_NO_ANALYTICS": "true", "DO_NOT_TRACK": "true"}
    log_path = root / "open-webui.log"
    log = log_path.open("w")
    proc = subprocess.Popen([str(python.parent / "open-webui"), "serve", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise DriverError(f"open-webui exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return {"base": base, "proc": proc, "log": log_path, "logf": log, "start_s": time.monotonic() - t0}
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise DriverError(f"open-webui did not answer /health within {timeout} s")


def stop_open_webui(ui: dict) -> None:
    ui["proc"].terminate()
    try:
        ui["proc"].wait(timeout=30)
    except subprocess.TimeoutExpired:
        ui["proc"].kill()
        ui["proc"].wait()
    ui["logf"].close()


def admin_token(base: str) -> str:
    """The first account Open WebUI creates is its admin (what its sign-up page does)."""
    r = httpx.post(base + "/api/v1/auths/signup", json=ADMIN, timeout=60)
    if r.status_code != 200:
        r = httpx.post(base + "/api/v1/auths/signin", json={k: ADMIN[k] for k in ("email", "password")}, timeout=60)
    if r.status_code != 200:
        raise DriverError(f"open-webui sign-up failed: {r.status_code} {r.text[:300]}")
    return r.json()["token"]


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _wait(fn, timeout: float, what: str, step: float = 0.25):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            value = fn()
        except Exception:  # noqa: BLE001 - the page is still rendering
            value = None
        if value:
            return value
        time.sleep(step)
    raise DriverError(f"timed out after {timeout:.0f} s waiting for {what}")


def chat(driver, base: str, token: str, model: str, text: str, shot: Path | None = None, timeout: float = 600) -> dict:
    """A new chat in the browser: pick ``model`` in the selector, type ``text``, Enter; wait until
    Open WebUI has stored the finished answer. Returns the answer as Open WebUI stored it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    driver.get(base + "/auth")
    driver.execute_script("localStorage.token = arguments[0]", token)
    driver.get(base + "/")
    selector = _wait(lambda: driver.find_element(By.ID, "model-selector-model-button"), 120, "the model selector")
    for button in driver.find_elements(By.XPATH, "//button[contains(., \"Okay, Let's Go!\")]"):
        if button.is_displayed():
            button.click()  # the release notes shown on a first visit
    selector.click()
    option = _wait(lambda: driver.find_element(By.CSS_SELECTOR, f'button[data-value="{model}"]'), 60,
                   f"model {model} in the selector")
    option.click()
    _wait(lambda: driver.find_element(By.ID, "model-selector-model-button").text.strip() == model, 30,
          f"model {model} selected")
    box = driver.find_element(By.ID, "chat-input")
    box.click()
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    chat_id = _wait(lambda: re.search(r"/c/([0-9a-f-]+)", driver.current_url).group(1), 120, "the chat's page")
    headers = {"Authorization": f"Bearer {token}"}

    def finished():
        body = httpx.get(f"{base}/api/v1/chats/{chat_id}", headers=headers, timeout=30).json()
        messages = body["chat"]["history"]["messages"]
        last = messages[body["chat"]["history"]["currentId"]]
        if last.get("role") == "assistant" and (last.get("done") or last.get("error")):
            return body, last
        return None
    body, last = _wait(finished, timeout, f"the answer of {model}", step=1.0)
    time.sleep(1.5)  # the page renders the stored answer
    page = driver.find_element(By.TAG_NAME, "body").text
    if shot is not None:
        driver.save_screenshot(str(shot))
    return {"chat_id": chat_id, "content": last.get("content") or "", "error": last.get("error"),
            "message": last, "page_text": page, "messages": body["chat"]["history"]["messages"]}


class _Page(http.server.BaseHTTPRequestHandler):
    pages: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        html = self.pages.get(self.path.lstrip("/"))
        self.send_response(200 if html is not None else 404)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("cache-control", "no-store")
        self.end_headers()
        self.wfile.write(html or b"")

    def log_message(self, *args):
        pass


class PageServer:
    """Web pages of another origin (127.0.0.1 on a port of its own), one server for all of them.

    One server for the whole run, each page on a path of its own: a page server shut down and
    bound again on the same port left Chrome's next navigation there hanging (it kept showing the
    previous page, whose title the next check then read: 11 of 20 pairs locally, once in CI)."""

    def __init__(self):
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Page", (_Page,), {"pages": {}}))
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._count = itertools.count()
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add(self, html: str) -> tuple[str, str]:
        mark = f"p{next(self._count)}"
        self._server.RequestHandlerClass.pages[mark] = html.replace("{mark}", mark).encode()
        return mark, f"{self.origin}/{mark}"

    def close(self):
        self._server.shutdown()
        self._server.server_close()


def browser_fetch(driver, pages: PageServer, api_base: str, key: str) -> dict:
    """A page of ``pages``' origin calls the API with fetch(), as an attacker's page would in the
    user's browser: what the page's script could read (title "read STATUS") or that the browser
    blocked it (title "blocked TypeError"). Each call's page and title carry a mark of their own,
    so an earlier page's title is never taken for this one's answer."""
    script = f"""<!doctype html><title>{{mark}} pending</title><script>
fetch({json.dumps(api_base + '/v1/chat/completions')}, {{method: "POST",
  headers: {{"Authorization": "Bearer {key}", "Content-Type": "application/json"}},
  body: JSON.stringify({{model: "x", messages: [{{role: "user", content: "hi"}}]}})}})
 .then(r => r.text().then(t => {{ document.title = "{{mark}} read " + r.status; document.body.innerText = t; }}))
 .catch(e => {{ document.title = "{{mark}} blocked " + e.name; }});
</script>"""
    mark, url = pages.add(script)
    driver.get(url)
    title = _wait(lambda: driver.title if driver.title.startswith(mark + " ") and
                  not driver.title.endswith(" pending") else None, 30, f"the fetch of page {url}")
    return {"origin": pages.origin, "title": title[len(mark) + 1:],
            "body": driver.find_element("tag name", "body").text[:300]}


def backend_errors(ui: dict, servers: list[dict]) -> list[str]:
    """Open WebUI's log lines about our endpoints that report an error, and every request our
    servers answered with 4xx/5xx (Open WebUI is their only client in this run)."""
    import server_harness
    ports = [str(s["port"]) for s in servers]
    bad = []
    for line in ui["log"].read_text(errors="replace").splitlines():
        if any(f"127.0.0.1:{p}" in line for p in ports) and re.search(r"\b(ERROR|[45]\d\d\b)", line):
            bad.append("open-webui: " + line[:300])
    for s in servers:
        bad += [f"{s['name']}: {line[:300]}" for line in server_harness.request_lines(s)
                if re.search(r"status=[45]\d\d", line)]
    return bad
