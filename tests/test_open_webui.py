"""Open WebUI, unmodified, chats with the served API in a real browser, on both connections (issue 25).

Open WebUI 0.12.4 from PyPI (its own venv, CPU torch; cold install measured in docs/performance.md)
against two CPU harness servers, each behind its API key: the test model with the test chat
template (no tool-call format), and one with DeepSeek-V3's template. Debian's chromium drives
Open WebUI's page through Selenium with its default chat settings: native function calling,
its built-in tools sent with every chat. The servers' answers are forced (server_api_app.py
--script) so that what the browser shows can be compared byte for byte; the tool-call chat only
completes if Open WebUI parsed our tool_calls, ran its built-in tool and sent the result back
through our template (role: tool). Any 4xx/5xx for our endpoints, in Open WebUI's log or ours,
fails. Then a page of another origin tries the API from the same browser.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

import openwebui_driver as owui
import server_harness

pytestmark = pytest.mark.open_webui

KEY_A, KEY_B = "owui-plain-key-0123456789", "owui-tools-key-9876543210"
REPLY = "Über die OpenAI- und Ollama-Verbindung: naïve café, déjà vu — 5 €."
TOOL_REPLY = "The tool answered: TOOL-RESULT-SEEN."
TOOL_CALL = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_current_timestamp\n```json\n{}\n"
             "```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")


def _missing_browser():
    missing = [p for p in (owui.CHROMIUM, owui.CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (tests/host-setup does)")


@pytest.fixture(scope="module")
def stack(sdist_tree, tmp_path_factory):
    _missing_browser()
    root = tmp_path_factory.mktemp("open-webui")
    served = server_harness.prepare(root, server_harness.api_python(), sdist_tree)
    script_a, script_b = root / "script-a.json", root / "script-b.json"
    script_a.write_text(json.dumps([{"when": "OWUI-CHECK", "reply": REPLY}]), encoding="utf-8")
    script_b.write_text(json.dumps([
        {"when": "<｜tool▁output▁begin｜>", "reply": TOOL_REPLY},
        {"when": ["get_current_timestamp", "What time is it"], "reply": TOOL_CALL}]), encoding="utf-8")
    pages = owui.PageServer()   # the one origin server b lists
    servers = []
    try:
        servers.append(server_harness.start(served, "plain", served["models"]["default"], {"KTLEGACY_API_KEY": KEY_A},
                                            "--cache-lens", "8192", "--max-new-tokens", "128", "--script",
                                            str(script_a), name="ktlegacy-test"))
        # Open WebUI's 36 built-in tools render to ~18k tokens of this small tokenizer
        servers.append(server_harness.start(served, "tools", served["models"]["deepseek-v3"],
                                            {"KTLEGACY_API_KEY": KEY_B,
                                             "KTLEGACY_CORS_ORIGINS": pages.origin},
                                            "--cache-lens", "32768", "--max-new-tokens", "128", "--script",
                                            str(script_b), name="ktlegacy-tools"))
        a, b = servers
        ui = owui.start_open_webui(owui.open_webui_python(), root, server_harness.free_port(),
                                   openai=[(a["base"] + "/v1", KEY_A), (b["base"] + "/v1", KEY_B)],
                                   ollama=[(a["base"], KEY_A)])
    except (server_harness.HarnessError, owui.DriverError) as exc:
        for s in servers:
            server_harness.stop(s)
        pages.close()
        pytest.fail(str(exc))
    driver = owui.browser()
    yield {"a": a, "b": b, "ui": ui, "token": owui.admin_token(ui["base"]), "driver": driver, "root": root,
           "pages": pages}
    driver.quit()
    pages.close()
    owui.stop_open_webui(ui)
    for s in servers:
        server_harness.stop(s)
    for p in root.glob("*.png"):
        shutil.copy(p, tmp_path_factory.getbasetemp())


def _posts(server: dict, route: str) -> list[str]:
    return [line for line in server_harness.request_lines(server) if f"POST {route} " in line]


def test_chat_on_the_openai_connection(stack):
    before = len(_posts(stack["a"], "/v1/chat/completions"))
    out = owui.chat(stack["driver"], stack["ui"]["base"], stack["token"], "openai.ktlegacy-test",
                    "OWUI-CHECK over the OpenAI connection", shot=stack["root"] / "openai_chat.png")
    assert out["error"] is None and out["content"] == REPLY
    assert REPLY in out["page_text"]
    assert any("status=200" in line for line in _posts(stack["a"], "/v1/chat/completions")[before:])


def test_chat_on_the_ollama_connection(stack):
    before = len(_posts(stack["a"], "/api/chat"))
    out = owui.chat(stack["driver"], stack["ui"]["base"], stack["token"], "ktlegacy-test",
                    "OWUI-CHECK over the Ollama connection", shot=stack["root"] / "ollama_chat.png")
    assert out["error"] is None and out["content"] == REPLY
    assert REPLY in out["page_text"]
    assert any("status=200" in line for line in _posts(stack["a"], "/api/chat")[before:])
    # Open WebUI parses /api/version as dot-separated integers
    version = httpx.get(stack["ui"]["base"] + "/ollama/api/version",
                        headers={"Authorization": f"Bearer {stack['token']}"}, timeout=30)
    assert version.status_code == 200 and version.json()["version"] == "0.3.0"


def test_tool_call_through_the_deepseek_template(stack):
    """Open WebUI runs its built-in get_current_timestamp on our tool_calls and sends the result back."""
    before = len(_posts(stack["b"], "/v1/chat/completions"))
    out = owui.chat(stack["driver"], stack["ui"]["base"], stack["token"], "ktlegacy-tools", "What time is it?",
                    shot=stack["root"] / "tool_call.png")
    assert out["error"] is None and out["content"].endswith(TOOL_REPLY)
    assert "View Result from get_current_timestamp" in out["page_text"] and TOOL_REPLY in out["page_text"]
    lines = _posts(stack["b"], "/v1/chat/completions")[before:]
    assert any("finish=tool_calls" in line for line in lines) and any("finish=stop" in line for line in lines)


def test_no_errors_for_our_endpoints(stack):
    assert owui.backend_errors(stack["ui"], [stack["a"], stack["b"]]) == []


def test_a_foreign_page_cannot_use_the_api(stack):
    """The same browser on a page of another origin: blocked; the one origin the server lists: read."""
    blocked = owui.browser_fetch(stack["driver"], stack["pages"], stack["a"]["base"], KEY_A)
    assert blocked["title"] == "blocked TypeError", blocked
    allowed = owui.browser_fetch(stack["driver"], stack["pages"], stack["b"]["base"], KEY_B)
    assert allowed["title"] == "read 404" and "is not served here" in allowed["body"], allowed
