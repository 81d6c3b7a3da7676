"""Graceful shutdown of `tensorfleet serve`: on SIGTERM it refuses new requests (503,
`/health` too) while a running stream finishes with its last token and [DONE], then stops
the workers and its simulated cluster, and exits 0 leaving no process behind."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from tests.servers import free_port

pytestmark = pytest.mark.slow
MODEL = "tiny"
MAX_TOKENS = 300  # seconds of decoding: still running when the drain begins


def test_sigterm_drains_running_streams_then_exits(chat_model_dir, tmp_path):
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"model: {chat_model_dir}\nserved_model_name: {MODEL}\ndtype: float32\n"
        "parallel: {tensor_parallel_size: 1, pipeline_parallel_size: 1, device: cpu}\n"
        "engine: {max_model_len: 512, num_kv_blocks: 64}\n"
        f"serve: {{host: 127.0.0.1, port: {port}, graceful_shutdown_s: 120}}\n")
    # its own session: every process it starts (raylets, workers) can be found afterwards
    cli = os.path.join(os.path.dirname(sys.executable), "tensorfleet")
    server = subprocess.Popen([cli, "serve", str(config), "--simulate", "1x1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(server.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while not any("ready in" in line for line in log):
            assert server.poll() is None and time.monotonic() < deadline, "".join(log)[-3000:]
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        events: list[str] = []
        streaming = threading.Event()

        def stream() -> None:
            body = {"model": MODEL, "prompt": "def f():\n", "max_tokens": MAX_TOKENS, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        streaming.set()

        client = threading.Thread(target=stream)
        client.start()
        assert streaming.wait(60)
        server.send_signal(signal.SIGTERM)
        sent, at_signal = time.monotonic(), len(events)
        while (health := httpx.get(f"{url}/health")).status_code == 200:  # the drain has not begun yet
            assert time.monotonic() < sent + 30, "/health still 200 30 s after SIGTERM"
            time.sleep(0.05)
        refused_at = len(events)
        refused = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
        client.join(120)
        finished = time.monotonic() - sent
        assert server.wait(120) == 0, "".join(log)[-3000:]
        exited = time.monotonic() - sent
        print(f"\nSIGTERM after {at_signal} events: /health {health.status_code} after {refused_at} events, then a "
              f"new request {refused.status_code}; the running stream ended {finished:.1f}s later after "
              f"{len(events) - 1} events; exit 0 after {exited:.1f}s")
        assert health.status_code == 503
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert "data: [DONE]" not in events[:refused_at], "the stream must still run when new requests are refused"
        assert len(events) > refused_at + 1, "the stream must keep sending after the drain began"
        assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-3]
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == MAX_TOKENS
        deadline = time.monotonic() + 15
        while left := [p for p in psutil.process_iter(["pid"]) if _session(p) == server.pid]:
            assert time.monotonic() < deadline, f"left running: {[p.cmdline() for p in left]}"
            time.sleep(0.5)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def _session(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None
