#!/usr/bin/env python3
"""The served API under a hostile client and with Open WebUI in a browser (issue 25): the recorded result.

    python bench/server_hardening.py --out bench/results/server_hardening.json [--shots bench/results] [--no-open-webui]

Runs on this machine's CPUs, everything on 127.0.0.1 (the CPU harness, tests/server_api_app.py:
upstream's server interface on a small random Llama, the patched tree's API):

1. every case of tests/hostile_cases.py against a server with an API key; after each, a normal
   greedy request must return the fp32 reference's tokens (``reference_after_each``); a case is
   counted as a clear 4xx when it got the 4xx it should, in the API's error shape; a request
   that does not answer within 60 s is a hang;
2. the slowest ``/health`` answer while maximum-size (4 MiB) requests are read, parsed and
   refused (``event_loop_probe_max_s``; target under 0.5 s), and the status a body over the
   limit gets;
3. a browser-style preflight from a foreign origin, and a request without the key;
4. Open WebUI (PyPI, CPU torch) in Debian's chromium, as tests/test_open_webui.py: a chat on the
   OpenAI connection, one on the Ollama connection, one with a tool call through DeepSeek-V3's
   template, screenshots (PNG) next to the JSON; ``backend_errors`` counts 4xx/5xx for our
   endpoints in Open WebUI's log and ours; then a page of another origin in the same browser.

Every number in the JSON is computed here; nothing is written by hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import httpx  # noqa: E402

import hostile_cases  # noqa: E402
import server_harness  # noqa: E402

KEY = "bench-key-0123456789abcdef"
PROMPT = "Please write a quick sort function in python."


def log(msg: str) -> None:
    print(f"[server_hardening {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def reference_text(served: dict, model: Path, max_tokens: int) -> str:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model))
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    out = subprocess.run([str(served["python"]), str(server_harness.APP), "reference", "--model", str(model),
                          "--requests", json.dumps([{"ids": ids, "max_tokens": max_tokens}])],
                         capture_output=True, text=True, env=served["env"], timeout=600, check=True)
    tokens = json.loads(out.stdout.strip().splitlines()[-1])[0]
    return tok.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def reference_ok(base: str, want: str, max_tokens: int) -> bool:
    try:
        r = httpx.post(base + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"}, json={
            "model": hostile_cases.NAME, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": max_tokens})
        return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
    except httpx.HTTPError:
        return False


def hostile(server: dict, want: str) -> dict:
    results = []
    for case in hostile_cases.all_cases():
        out = hostile_cases.run_case(server["base"], KEY, case)
        after = reference_ok(server["base"], want, 4)
        results.append({"case": case.name, "status": out.status, "want": list(case.want),
                        "seconds": round(out.seconds, 3), "problems": out.problems, "reference_after": after})
        if out.problems or not after:
            log(f"case {case.name}: {out.problems} reference_after={after}")
    return {
        "cases": len(results),
        "clear_4xx": sum(1 for r in results if r["status"] and 400 <= r["status"] < 500 and not r["problems"]),
        "documented_200": sum(1 for r in results if r["status"] == 200 and not r["problems"]),
        "http_500": sum(1 for r in results if r["status"] and r["status"] >= 500),
        "hangs": sum(1 for r in results if r["status"] is None),
        "failing": [r for r in results if r["problems"] or not r["reference_after"]],
        "reference_after_each": all(r["reference_after"] for r in results),
        "slowest_case_s": max(r["seconds"] for r in results),
    }


def event_loop_probe(server: dict, limit: int) -> dict:
    """The slowest /health while maximum-size bodies are handled (tests/hostile_cases.py), and the
    status of a body one byte over the limit."""
    probe = hostile_cases.event_loop_probe(server["base"], KEY, hostile_cases.maximum_size_bodies(limit))
    over = httpx.post(server["base"] + "/v1/chat/completions", content=b"x" * (limit + 1),
                      headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"}, timeout=60)
    return {**probe, "event_loop_probe_max_s": probe["max_s"], "body_limit_status": over.status_code}


def guards(server: dict) -> dict:
    pre = httpx.options(server["base"] + "/v1/chat/completions", timeout=30, headers={
        "origin": "http://evil.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    anon = [httpx.get(server["base"] + "/v1/models", timeout=30).status_code,
            httpx.post(server["base"] + "/api/chat", timeout=30, json={"model": hostile_cases.NAME, "messages": [
                {"role": "user", "content": "hi"}]}).status_code,
            httpx.get(server["base"] + "/metrics", timeout=30).status_code]
    health = httpx.get(server["base"] + "/health", timeout=30).status_code
    return {"preflight_status": pre.status_code, "preflight_allow_origin": pre.headers.get("access-control-allow-origin"),
            "unauthenticated_statuses": anon, "health_without_key": health}


def open_webui(served: dict, shots: Path, root: Path) -> dict:
    import openwebui_driver as owui
    sys.path.insert(0, str(REPO / "tests"))
    import test_open_webui as t
    script_a, script_b = root / "script-a.json", root / "script-b.json"
    script_a.write_text(json.dumps([{"when": "OWUI-CHECK", "reply": t.REPLY}]), encoding="utf-8")
    script_b.write_text(json.dumps([{"when": "<｜tool▁output▁begin｜>", "reply": t.TOOL_REPLY},
                                    {"when": ["get_current_timestamp", "What time is it"], "reply": t.TOOL_CALL}]),
                        encoding="utf-8")
    pages = owui.PageServer()
    t0 = time.monotonic()
    python = owui.open_webui_python()
    venv_s = time.monotonic() - t0
    a = server_harness.start(served, "owui-plain", served["models"]["default"], {"KTLEGACY_API_KEY": t.KEY_A},
                             "--cache-lens", "8192", "--max-new-tokens", "128", "--script", str(script_a),
                             name="ktlegacy-test")
    b = server_harness.start(served, "owui-tools", served["models"]["deepseek-v3"],
                             {"KTLEGACY_API_KEY": t.KEY_B, "KTLEGACY_CORS_ORIGINS": pages.origin},
                             "--cache-lens", "32768", "--max-new-tokens", "128", "--script", str(script_b),
                             name="ktlegacy-tools")
    ui = owui.start_open_webui(python, root, server_harness.free_port(),
                               openai=[(a["base"] + "/v1", t.KEY_A), (b["base"] + "/v1", t.KEY_B)],
                               ollama=[(a["base"], t.KEY_A)])
    driver = owui.browser()
    out: dict = {"open_webui": owui.OPEN_WEBUI, "venv_ready_s": round(venv_s, 1), "start_s": round(ui["start_s"], 1)}
    try:
        token = owui.admin_token(ui["base"])
        runs = {"openai_chat": ("openai.ktlegacy-test", "OWUI-CHECK over the OpenAI connection", t.REPLY),
                "ollama_chat": ("ktlegacy-test", "OWUI-CHECK over the Ollama connection", t.REPLY),
                "tool_call": ("ktlegacy-tools", "What time is it?", t.TOOL_REPLY)}
        for key, (model, text, want) in runs.items():
            t1 = time.monotonic()
            try:
                got = owui.chat(driver, ui["base"], token, model, text, shot=shots / f"open_webui_{key}.png")
                ok = got["error"] is None and want in got["content"] and want in got["page_text"]
                if key == "tool_call":
                    ok = ok and "View Result from get_current_timestamp" in got["page_text"]
                out[key] = ok
                out[key + "_detail"] = {"model": model, "seconds": round(time.monotonic() - t1, 1),
                                        "answer": got["content"][-300:], "error": got["error"]}
            except owui.DriverError as exc:
                out[key], out[key + "_detail"] = False, {"model": model, "error": str(exc)}
        errors = owui.backend_errors(ui, [a, b])
        out["backend_errors"], out["backend_error_lines"] = len(errors), errors[:20]
        out["browser_foreign_origin"] = owui.browser_fetch(driver, pages, a["base"], t.KEY_A)
        out["browser_listed_origin"] = owui.browser_fetch(driver, pages, b["base"], t.KEY_B)
    finally:
        driver.quit()
        pages.close()
        owui.stop_open_webui(ui)
        server_harness.stop(a)
        server_harness.stop(b)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shots", type=Path, default=None, help="folder for the Open WebUI screenshots (default: --out's)")
    p.add_argument("--no-open-webui", action="store_true")
    args = p.parse_args()
    shots = args.shots or args.out.parent
    shots.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ktlegacy-hardening-"))
    t0 = time.monotonic()
    log("venv, patched tree, models")
    served = server_harness.prepare(root, server_harness.api_python())
    server = server_harness.start(served, "hostile", served["models"]["default"], {"KTLEGACY_API_KEY": KEY},
                                  "--cache-lens", "256", "--max-new-tokens", "200", "--token-delay", "0.02")
    result: dict = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                    "machine": f"{platform.node()}: {platform.processor() or platform.machine()}, "
                               f"{__import__('os').cpu_count()} CPUs (the CPU harness, 127.0.0.1)"}
    try:
        want = reference_text(served, served["models"]["default"], 4)
        log("hostile cases")
        cases = hostile(server, want)
        log(f"{cases['cases']} cases: {cases['clear_4xx']} clear 4xx, {cases['http_500']} HTTP 500, {cases['hangs']} hangs")
        log("event loop probe")
        probe = event_loop_probe(server, 4 * 1024 * 1024)
        g = guards(server)
    finally:
        server_harness.stop(server)
    summary = {"cases": cases["cases"], "clear_4xx": cases["clear_4xx"], "documented_200": cases["documented_200"],
               "http_500": cases["http_500"], "hangs": cases["hangs"],
               "reference_after_each": cases["reference_after_each"],
               "cors_foreign_origin_blocked": g["preflight_status"] == 403 and g["preflight_allow_origin"] is None,
               "unauthenticated_rejected": all(s == 401 for s in g["unauthenticated_statuses"]),
               "body_limit_status": probe["body_limit_status"],
               "event_loop_probe_max_s": probe["event_loop_probe_max_s"]}
    result["details"] = {"hostile": cases, "event_loop": probe, "guards": g}
    if not args.no_open_webui:
        log("Open WebUI in chromium")
        ow = open_webui(served, shots, root)
        summary["open_webui"] = {k: ow[k] for k in ("openai_chat", "ollama_chat", "tool_call", "backend_errors")}
        summary["cors_foreign_origin_blocked"] = summary["cors_foreign_origin_blocked"] and \
            ow["browser_foreign_origin"]["title"] == "blocked TypeError"
        result["details"]["open_webui"] = ow
    result["server_hardening"] = summary
    result["wall_s"] = round(time.monotonic() - t0, 1)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    log(f"wrote {args.out}: {json.dumps(summary)}")
    ok = (summary["http_500"] == 0 and summary["hangs"] == 0 and summary["reference_after_each"]
          and not cases["failing"] and summary["cors_foreign_origin_blocked"] and summary["unauthenticated_rejected"]
          and summary["body_limit_status"] == 413
          and all(summary.get("open_webui", {"x": True}).get(k, True) for k in ("openai_chat", "ollama_chat", "tool_call"))
          and summary.get("open_webui", {}).get("backend_errors", 0) == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
