"""The OpenAI-compatible server on a tiny random-weight model: batching of concurrent requests,
streaming, stop strings, bad requests (malformed body, over-long prompt), the serve command."""
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import make_tiny_model  # noqa: E402

from gorilla_jax.serve import GorillaServer, load_backend  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model_dir):
    backend = load_backend(str(model_dir), model_id="tiny")
    srv = GorillaServer(backend, port=0, max_batch=8, batch_wait=0.05, stream_tokens=4,
                        max_body_bytes=64 << 10).start()
    yield srv
    srv.close()


def call(server, path, body=None, raw=None, method=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def direct(server, prompt_ids, n):
    """What the generator gives for one prompt on its own (greedy)."""
    b = server.backend
    out = b.generate([prompt_ids], n, temperature=0.0, top_p=1.0, seed=0, stop=())[0]
    ids = [t for t in out[:n]]
    if any(t in b.eos_ids for t in ids):
        ids = ids[:min(ids.index(e) for e in b.eos_ids if e in ids)]
    return b.decode(ids)


def test_models_and_routes(server):
    status, _, body = call(server, "/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
    assert call(server, "/nothing")[0] == 404
    status, _, body = call(server, "/completions")
    assert status == 405 and "POST" in body["error"]["message"]


def test_completion_equals_the_generator(server):
    prompt = "Generate evenly spaced numbers"
    status, headers, body = call(server, "/completions", {"model": "tiny", "prompt": prompt,
                                                          "max_tokens": 12, "temperature": 0})
    assert status == 200 and body["object"] == "text_completion"
    ids = server.backend.encode(prompt)
    choice = body["choices"][0]
    assert choice["text"] == direct(server, ids, 12)
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] <= 12 and choice["finish_reason"] in ("length", "stop")
    assert headers["X-Batch-Size"] == "1"


def test_concurrent_requests_are_batched(server):
    # a server that waits (up to 60 s) until 4 requests are there: batching is deterministic
    batching = GorillaServer(server.backend, port=0, max_batch=4, batch_wait=60.0).start()
    try:
        _concurrent(batching, server)
    finally:
        batching.close()


def _concurrent(batching, server):
    prompts = [f"request number {i} asks for an API" for i in range(4)]
    results = [None] * 4

    def go(i):
        results[i] = call(batching, "/chat/completions", {
            "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": 10, "temperature": 0})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert batching.batcher.stats()["batch_sizes"] == [4]  # all four ran in one generator call
    for i, (status, headers, body) in enumerate(results):
        assert status == 200 and headers["X-Batch-Size"] == "4"
        msg = body["choices"][0]["message"]
        assert msg["role"] == "assistant" and body["object"] == "chat.completion"
        ids = server.backend.chat_ids([{"role": "user", "content": prompts[i]}])
        assert msg["content"] == direct(server, ids, 10)  # batched == alone


def test_streaming_matches_non_streaming(server):
    body = {"messages": [{"role": "user", "content": "stream me some tokens"}], "max_tokens": 14,
            "temperature": 0}
    _, _, full = call(server, "/chat/completions", body)
    req = urllib.request.Request(server.url + "/chat/completions",
                                 data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        for line in r:
            line = line.decode().strip()
            if line:
                assert line.startswith("data: ")
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) >= 2  # several rounds


def test_stop_strings_cut_the_text(server):
    _, _, full = call(server, "/completions", {"prompt": "The quick brown fox", "max_tokens": 24,
                                               "temperature": 0})
    text = full["choices"][0]["text"]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1) if text[i:i + 2].strip())
    _, _, cut = call(server, "/completions", {"prompt": "The quick brown fox", "max_tokens": 24,
                                              "temperature": 0, "stop": [stop]})
    assert cut["choices"][0]["text"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_multiple_prompts_and_sampling(server):
    status, _, body = call(server, "/completions", {"prompt": ["one", "two", "three"],
                                                    "max_tokens": 5, "temperature": 0.8, "seed": 3})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    again = call(server, "/completions", {"prompt": ["one", "two", "three"], "max_tokens": 5,
                                          "temperature": 0.8, "seed": 3})[2]
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]]


@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": "x", "max_tokens": "many"}, 400, "'max_tokens' must be a positive integer"),
    ({"prompt": "x", "temperature": 7}, 400, "'temperature' must be in [0.0, 2.0]"),
    ({"prompt": "x", "n": 3}, 400, "'n'=3 is not supported"),
    ({"prompt": 5}, 400, "'prompt' must be a string"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop'"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model 'gpt-4' does not exist"),
    ({"prompt": [1, 99999]}, 400, "token ids must be in"),
])
def test_bad_completion_requests(server, body, status, needle):
    got, _, err = call(server, "/completions", body)
    assert got == status and needle in err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"


def test_malformed_bodies(server):
    status, _, err = call(server, "/chat/completions", raw=b'{"messages": [')
    assert status == 400 and "not valid JSON" in err["error"]["message"]
    assert err["error"]["code"] == "invalid_json"
    status, _, err = call(server, "/chat/completions", raw=b'[1, 2]')
    assert status == 400 and "must be a JSON object" in err["error"]["message"]
    status, _, err = call(server, "/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]})
    assert status == 400 and err["error"]["param"] == "messages[0].role"
    status, _, err = call(server, "/chat/completions", {"messages": []})
    assert status == 400 and "'messages'" in err["error"]["message"]
    status, _, err = call(server, "/completions", raw=json.dumps({"prompt": "x" * (70 << 10)}).encode())
    assert status == 413 and "larger than the limit" in err["error"]["message"]


def test_over_long_prompts_are_rejected_not_truncated(server):
    limit = server.backend.max_context
    rounds = server.batcher.stats()["rounds"]
    long_text = " ".join(f"word{i}" for i in range(limit))
    status, _, err = call(server, "/completions", {"prompt": long_text, "max_tokens": 4})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    n = len(server.backend.encode(long_text))
    assert f"maximum context length is {limit} tokens; the prompt has {n} tokens" in err["error"]["message"]
    ids = [5] * (limit - 10)  # fits, but not with 20 new tokens
    status, _, err = call(server, "/completions", {"prompt": ids, "max_tokens": 20})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    assert call(server, "/completions", {"prompt": ids, "max_tokens": 10, "temperature": 0})[0] == 200
    assert server.batcher.stats()["rounds"] == rounds + 1  # the rejected ones never reached the model


def test_serve_command(model_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "gorilla_jax.cli", "serve", "--model", str(model_dir),
                             "--port", "0", "--model-id", "cli-tiny"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving cli-tiny at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ", 1)[1].split(" ", 1)[0]
        with urllib.request.urlopen(url + "/models", timeout=60) as r:
            assert json.loads(r.read())["data"][0]["id"] == "cli-tiny"
        req = urllib.request.Request(url + "/completions", data=json.dumps(
            {"prompt": "hi", "max_tokens": 3}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] <= 3
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    bad = subprocess.run([sys.executable, "-m", "gorilla_jax.cli", "serve", "--model", str(model_dir),
                          "--port", "0", "--cache-windows", "0"], capture_output=True, text=True,
                         env=env, cwd=str(REPO), timeout=300)
    assert bad.returncode == 2 and "cache_windows must be >= 1" in bad.stderr
