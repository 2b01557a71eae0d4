"""Fixtures for the server tests: the tiny pipeline, an observable wrapper, a live uvicorn server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from mars.pipeline import MarsPipeline
from mars.serve.app import create_app


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir) -> MarsPipeline:
    return MarsPipeline.from_pretrained(tiny_model_dir)


class RecordingPipeline:
    """The real pipeline, plus a record of every batch it ran and a gate that can hold the worker
    inside `generate` (to pile up a queue, or to disconnect a client while its job waits)."""

    def __init__(self, pipeline: MarsPipeline) -> None:
        self._pipeline = pipeline
        self.generate_calls: list[list[str]] = []
        self.caption_calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.inside = threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def generate(self, prompts, **kwargs):
        self.generate_calls.append(list(prompts))
        self.inside.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self._pipeline.generate(prompts, **kwargs)

    def caption(self, images, **kwargs):
        self.caption_calls.append(len(images))
        return self._pipeline.caption(images, **kwargs)

    def hold(self) -> None:
        self.gate.clear()
        self.inside.clear()


@pytest.fixture
def recording(tiny_pipeline) -> RecordingPipeline:
    return RecordingPipeline(tiny_pipeline)


@pytest.fixture
def client(recording):
    with TestClient(create_app(recording, model_name="tiny")) as c:
        yield c


@contextlib.contextmanager
def live_server(app):
    """Run `app` under a real uvicorn server on 127.0.0.1 (ephemeral port) in a thread; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
