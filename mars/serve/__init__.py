"""Serving: the HTTP API, the dynamic batcher and the web page (`mars serve`).

    from mars.serve.app import create_app     # FastAPI app around a MarsPipeline
    from mars.serve.batcher import Batcher    # one worker thread, bounded queue, batches by key

Needs the `serve` extra (fastapi, uvicorn, python-multipart); importing this package alone does not.
"""
