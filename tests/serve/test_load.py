"""A real uvicorn server on loopback: concurrent load is batched, a full queue answers 503, and a
client that goes away does not leave work behind. Also the `mars serve` command."""

from __future__ import annotations

import asyncio
import base64
import io
import statistics
import threading
import time

import httpx
import numpy as np
from PIL import Image

from mars.serve.app import create_app

from .conftest import RecordingPipeline, live_server

GEN = "/v1/images/generations"


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_32_concurrent_requests_are_batched_and_none_is_lost(tiny_pipeline):
    recording = RecordingPipeline(tiny_pipeline)
    app = create_app(recording, model_name="tiny", max_batch_size=8, max_queue=64, batch_wait_ms=20)
    # prompts of different lengths (left padding inside a batch) and a seed each
    requests = [{"prompt": f"{'big ' * (i % 5)}shape number {i}", "seed": 1000 + 37 * i} for i in range(32)]
    with live_server(app) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            client.post(GEN, json=requests[0]).raise_for_status()  # warm-up
            singles = []
            for body in requests[:3]:
                start = time.perf_counter()
                client.post(GEN, json=body).raise_for_status()
                singles.append(time.perf_counter() - start)
        single = statistics.median(singles)
        batches_before = len(recording.generate_calls)

        async def burst():
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                start = time.perf_counter()
                responses = await asyncio.gather(*(client.post(GEN, json=body) for body in requests))
                return responses, time.perf_counter() - start

        responses, total = asyncio.run(burst())

    assert [r.status_code for r in responses] == [200] * 32
    bodies = [r.json() for r in responses]
    for body, request in zip(bodies, requests):  # each answer belongs to its own request
        assert body["prompt"] == request["prompt"] and body["seeds"] == [request["seed"]]
        assert [d["seed"] for d in body["data"]] == [request["seed"]]
    images = [base64.b64decode(b["data"][0]["b64_json"]) for b in bodies]
    assert len(set(images)) == 32  # none duplicated
    batches = recording.generate_calls[batches_before:]
    # none lost or run twice
    assert sorted(p for batch in batches for p in batch) == sorted(r["prompt"] for r in requests)
    assert max(len(b) for b in batches) > 1 and all(len(b) <= 8 for b in batches)
    # batched images equal the same prompt and seed generated alone (the VQ decoder's convolutions
    # may round differently in a batch: +-1 grey level; another code changes a whole 16x16 patch)
    for request, data in zip(requests[::7], images[::7]):
        alone = tiny_pipeline.generate([request["prompt"]], seed=request["seed"])[0]
        served = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
        assert np.abs(served - np.asarray(alone, dtype=np.int16)).max() <= 1
    ratio = total / (32 * single)
    print(f"\n32 concurrent requests: {total:.2f} s; one request alone: {single * 1000:.0f} ms; "
          f"ratio total / (32 x single) = {ratio:.3f}; {len(batches)} batches, sizes {[len(b) for b in batches]}")
    assert ratio < 0.5


def test_overfull_queue_answers_503_with_retry_after(recording):
    app = create_app(recording, model_name="tiny", max_batch_size=2, max_queue=4, batch_wait_ms=0)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        recording.hold()  # the worker will sit inside the first batch
        results: dict[str, int] = {}

        def post(name: str) -> None:
            results[name] = client.post(GEN, json={"prompt": name, "seed": 1}).status_code

        threads = [threading.Thread(target=post, args=("running",))]
        threads[0].start()
        assert recording.inside.wait(10)
        for i in range(2):  # 2 requests x 2 images = 4 queued = max_queue
            threads.append(threading.Thread(
                target=lambda i=i: results.__setitem__(
                    f"queued{i}", client.post(GEN, json={"prompt": f"q{i}", "n": 2}).status_code)))
            threads[-1].start()
        wait_until(lambda: client.get("/health").json()["queue"]["queued"] == 4)

        start = time.perf_counter()
        refused = client.post(GEN, json={"prompt": "one too many"})
        assert time.perf_counter() - start < 5  # answered at once, not after the queue drains
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "queue_full"
        assert int(refused.headers["Retry-After"]) >= 1

        recording.gate.set()
        for t in threads:
            t.join(30)
        assert results == {"running": 200, "queued0": 200, "queued1": 200}
        assert client.post(GEN, json={"prompt": "after"}).status_code == 200  # room again


def test_a_client_that_disconnects_leaves_no_work_behind(recording):
    app = create_app(recording, model_name="tiny", max_batch_size=1, max_queue=8, batch_wait_ms=0)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        recording.hold()
        status: dict[str, int] = {}
        first = threading.Thread(target=lambda: status.__setitem__(
            "first", client.post(GEN, json={"prompt": "first"}).status_code))
        first.start()
        assert recording.inside.wait(10)

        # queued behind "first", then the client gives up: the job must leave the queue unrun
        with httpx.Client(base_url=url, timeout=0.5) as impatient:
            try:
                impatient.post(GEN, json={"prompt": "abandoned"})
                raise AssertionError("expected a timeout")
            except httpx.ReadTimeout:
                pass
        wait_until(lambda: client.get("/health").json()["queue"]["queued"] == 0)

        recording.gate.set()
        first.join(30)
        assert status == {"first": 200}
        recording.hold()
        # mid-batch: the batch finishes, its result is dropped, the server goes on
        with httpx.Client(base_url=url, timeout=0.5) as impatient:
            running = threading.Thread(target=lambda: _post_ignoring_timeout(impatient, "mid-batch"))
            running.start()
            assert recording.inside.wait(10)
            running.join(10)
        recording.gate.set()
        assert client.post(GEN, json={"prompt": "third"}).status_code == 200
    assert recording.generate_calls == [["first"], ["mid-batch"], ["third"]]


def _post_ignoring_timeout(client: httpx.Client, prompt: str) -> None:
    try:
        client.post(GEN, json={"prompt": prompt})
    except httpx.ReadTimeout:
        pass


def test_mars_serve_command(tiny_model_dir, monkeypatch, capsys):
    """The CLI wiring: flags -> pipeline -> app -> uvicorn.run (caught here, then the app is served
    by TestClient; a real uvicorn serving the same app is tested above)."""
    import uvicorn
    from fastapi.testclient import TestClient

    from mars.cli import main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    argv = ["serve", "--model", str(tiny_model_dir), "--port", "8123", "--max-batch-size", "4",
            "--max-queue", "16", "--batch-wait-ms", "5", "--device", "cpu"]
    assert main(argv) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8123  # loopback unless asked otherwise
    assert f"serving {tiny_model_dir} on http://127.0.0.1:8123/" in capsys.readouterr().err
    with TestClient(served["app"]) as client:
        health = client.get("/health").json()
        assert health["model"] == tiny_model_dir.name  # the folder's name, not its path
        queue = health["queue"]
        assert (queue["max_batch_size"], queue["max_queue"], queue["batch_wait_ms"]) == (4, 16, 5.0)
        r = client.post(GEN, json={"prompt": "a red circle", "n": 4, "seed": 3})
        assert r.status_code == 200 and r.json()["seeds"] == [3, 4, 5, 6]
        assert client.post(GEN, json={"prompt": "a", "n": 5}).status_code == 422  # n <= max batch size
    assert main([*argv, "--host", "0.0.0.0"]) == 0
    assert "reachable from other machines" in capsys.readouterr().err


def test_mars_serve_rejects_bad_settings(capsys):
    from mars.cli import main

    assert main(["serve", "--max-batch-size", "8", "--max-queue", "4"]) == 2
    assert "--max-queue (4) must be >= --max-batch-size (8)" in capsys.readouterr().err
    assert main(["serve", "--model", "/nonexistent/model"]) == 2
    assert "model not found" in capsys.readouterr().err
