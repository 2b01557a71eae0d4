"""The HTTP API and the web page: a FastAPI app around one `MarsPipeline` and one `Batcher`.

    POST /v1/images/generations   JSON -> base64 PNGs, the seeds used, timings
    POST /v1/captions             multipart image upload (+ lang, cfg_scale, plausibility, rerank, refine) -> caption
    GET  /health                  liveness + queue state
    GET  /v1/models               the served model and its limits
    GET  /                        the web page (static/, no CDN)
    GET  /openapi.json, /docs     FastAPI's schema and its viewer

Batching: requests with the same sampling settings (cfg_scale, top_k, top_p, temperature) share a
batch — the sampler takes one setting per batch — and every image carries its own seed, so an
image is the same whether it ran alone or beside others. Captions batch by language and guidance.

Every error answers `{"error": {"message": ..., "type": ...}}`: 4xx for anything a client can
cause (validation 422, bad upload 400/413/415, full queue 503 + Retry-After), never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time
from collections.abc import Hashable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mars.data.images import UnusableImage, load_image
from mars.errors import MarsError
from mars.generate import CaptionConfig, SampleConfig
from mars.rerank import check_fits
from mars.serve.batcher import Batcher, BatcherStopped, JobResult, QueueFull
from mars.serve.schemas import (
    MAX_SEED, CaptionResponse, CaptionSettings, ErrorResponse, GeneratedImage, GenerationRequest, GenerationResponse,
    GenerationSettings, HealthResponse, ModelCard, ModelList, QueueStatus, ServeLimits, Timings,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
CAPTION_LANGS = ("en", "zh")
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small fields beside the image
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 499, 503)
}


class ApiError(Exception):
    """A client-caused failure, answered as `{"error": {"message", "type"}}` with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type, headers


def error_response(status: int, message: str, type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type}}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------
# The model side: what runs on the batcher's worker thread
# ---------------------------------------------------------------------------------------------


def run_batch(pipeline, key: Hashable, rows: list[Any], compile: bool = False, batch_size: int = 8) -> list[Any]:
    """One batch on the worker thread: ("generate", cfg, top_k, top_p, temperature, rerank, drawing weight,
    Jacobi window) with rows (prompt, seed, negative prompt or "") -> PIL images; ("caption", lang, cfg_scale,
    plausibility, rerank, refine) with rows PIL images -> strings. `compile`: the decode step runs compiled
    (each new batch size compiles once, the first time it occurs), except with a Jacobi window, which
    decodes eagerly. `batch_size`: most images drawn at once (the server's max_batch_size), so that with
    rerank the rows' candidates are drawn together."""
    if key[0] == "generate":
        _, cfg_scale, top_k, top_p, temperature, rerank, drawing_weight, jacobi_window = key
        prompts = [prompt for prompt, _, _ in rows]
        seeds = [seed for _, seed, _ in rows]
        negatives = [negative for _, _, negative in rows]
        return pipeline.generate(prompts, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p,
                                 temperature=temperature, seed=seeds, batch_size=batch_size,
                                 compile=compile and not jacobi_window,
                                 negative_prompt=negatives if any(negatives) else None, rerank=rerank,
                                 rerank_drawing_weight=drawing_weight, jacobi_window=jacobi_window)
    if key[0] == "caption":
        _, lang, cfg_scale, plausibility, rerank, refine = key
        return pipeline.caption(rows, lang=lang, cfg_scale=cfg_scale, plausibility=plausibility, rerank=rerank,
                                refine=refine)
    raise ValueError(f"unknown batch kind {key[0]!r}")


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def max_prompt_tokens(pipeline) -> int:
    """Prompt tokens that fit the context beside `<img>`, one image's codes and `</img>`."""
    config = pipeline.model.config
    return config.max_seq_len - config.image_tokens - 2


# ---------------------------------------------------------------------------------------------
# Waiting for a job without leaking work when the client goes away
# ---------------------------------------------------------------------------------------------


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_job(batcher: Batcher, request: Request, key: Hashable, rows: list[Any]) -> JobResult:
    """Queue a job and await it; if the client disconnects first, cancel the job (dropped from the
    queue when not yet started) and answer 499."""
    try:
        job = batcher.submit(key, rows)
    except QueueFull as full:
        raise ApiError(503, str(full), "queue_full", {"Retry-After": str(full.retry_after)}) from None
    except BatcherStopped as err:
        raise ApiError(503, str(err), "unavailable", {"Retry-After": "5"}) from None
    result = asyncio.wrap_future(job.future)
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({result, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if result not in done:
            raise ApiError(499, "the client closed the request", "client_closed")
        try:
            return result.result()
        except BatcherStopped as err:
            raise ApiError(503, str(err), "unavailable", {"Retry-After": "5"}) from None
    finally:
        disconnect.cancel()
        result.cancel()  # no-op when done; otherwise cancels job.future (see Batcher)


def caption_settings(guidance: CaptionConfig, rerank: int = 1) -> CaptionSettings:
    """The caption settings a response or the model card shows: the caption decoding and best-of."""
    return CaptionSettings(cfg_scale=guidance.cfg_scale, plausibility=guidance.plausibility, rerank=rerank,
                           refine=guidance.refine)


def timings(result: JobResult, arrived: float) -> Timings:
    return Timings(queue_ms=round(result.queue_s * 1000, 2), generation_ms=round(result.run_s * 1000, 2),
                   total_ms=round((time.perf_counter() - arrived) * 1000, 2), batch_size=result.batch_rows)


# ---------------------------------------------------------------------------------------------
# Input checks that need the model
# ---------------------------------------------------------------------------------------------


def check_generation(req: GenerationRequest, tokenizer, limits: ServeLimits, token_limit: int,
                     guided: bool) -> None:
    if not req.prompt.strip():
        raise ApiError(422, "prompt: must not be blank")
    for field, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt or "")):
        if len(text) > limits.max_prompt_chars:
            raise ApiError(422, f"{field}: {len(text)} characters, at most {limits.max_prompt_chars} allowed")
        tokens = len(tokenizer.encode(text))
        if tokens > token_limit:
            raise ApiError(422, f"{field}: {tokens} tokens, the model's context leaves room for {token_limit}")
    if req.negative_prompt and not guided:
        raise ApiError(422, "negative_prompt: works through guidance; set cfg_scale to something other than 1")
    if req.n > limits.max_images:
        raise ApiError(422, f"n: at most {limits.max_images} images per request, got {req.n}")
    if req.rerank > limits.max_rerank:
        raise ApiError(422, f"rerank: at most {limits.max_rerank} candidates per image, got {req.rerank}")


def decode_upload(data: bytes, limits: ServeLimits) -> Image.Image:
    """Uploaded bytes -> RGB image, refusing what is too big, of another format, or broken."""
    if not data:
        raise ApiError(400, "image: the upload is empty")
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, f"image: {len(data)} bytes, at most {limits.max_upload_bytes} allowed", "payload_too_large")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            fmt, (width, height) = probe.format, probe.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        fmt, width, height = None, 0, 0
    allowed = ", ".join(limits.upload_formats)
    if fmt not in limits.upload_formats:
        raise ApiError(415, f"image: not a {allowed} file", "unsupported_media_type")
    if width * height > limits.max_upload_pixels:
        raise ApiError(413, f"image: {width}x{height} pixels, at most {limits.max_upload_pixels} allowed",
                       "payload_too_large")
    try:
        return load_image(data)
    except UnusableImage as err:
        raise ApiError(400, f"image: cannot use this {fmt} file: {err}") from None


class BodyLimit:
    """ASGI middleware: a request body larger than its path's limit gets a 413 before it is parsed
    (Starlette would otherwise read any size into memory, or spool an upload to disk). Bodies
    without a Content-Length (chunked) are counted as they arrive."""

    def __init__(self, app, limits: dict[str, int]) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        max_bytes = self.limits.get(scope["path"]) if scope["type"] == "http" else None
        if max_bytes is None:
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"request body larger than {max_bytes} bytes", "payload_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return await too_big(scope, receive, send)
        messages, size = [], 0
        while True:  # read the (bounded) body now, then replay it to the app
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > max_bytes:
                return await too_big(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(pipeline, model_name: str = "mars", max_batch_size: int = 8, max_queue: int = 64,
               batch_wait_ms: float = 10.0, limits: ServeLimits | None = None, compile: bool = False) -> FastAPI:
    """The FastAPI app serving `pipeline` (a `MarsPipeline`); its worker thread runs while the app
    runs (FastAPI lifespan: use `with TestClient(app)` in tests). `compile` runs image decoding
    compiled (`MarsPipeline.generate(compile=True)`)."""
    if max_batch_size < 1 or max_queue < max_batch_size:
        raise MarsError(f"need max_batch_size >= 1 and max_queue >= max_batch_size, got {max_batch_size}, {max_queue}")
    limits = limits or ServeLimits(max_images=max_batch_size)
    if limits.max_images > max_batch_size:
        raise MarsError(f"max_images ({limits.max_images}) cannot exceed max_batch_size ({max_batch_size})")
    token_limit = max_prompt_tokens(pipeline)
    config = pipeline.model.config
    device = str(pipeline.device)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(lambda key, rows: run_batch(pipeline, key, rows, compile, max_batch_size), max_batch_size,
                          max_queue, batch_wait_ms)
        batcher.start()
        app.state.batcher = batcher
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="MARS", version="0.1.0", lifespan=lifespan,
                  description="Text-to-image and image captioning with a MARS model, batched under load.")
    app.state.pipeline = pipeline
    app.add_middleware(BodyLimit, limits={"/v1/captions": limits.max_upload_bytes + FORM_OVERHEAD_BYTES,
                                          "/v1/images/generations": limits.max_json_bytes})

    # --- errors: always {"error": {"message", "type"}} ---------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(err.status, err.message, err.type, err.headers)

    @app.exception_handler(MarsError)
    async def _mars_error(request: Request, err: MarsError):
        return error_response(400, str(err), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"] if p != "body") or "body"
            problems.append(f"{where}: {e['msg']}")
        return error_response(422, "; ".join(problems), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return error_response(err.status_code, str(err.detail), kinds.get(err.status_code, "invalid_request_error"),
                              getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        return error_response(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    # --- endpoints ----------------------------------------------------------------------------
    @app.post("/v1/images/generations", response_model=GenerationResponse, responses=ERROR_RESPONSES)
    async def generate_images(body: GenerationRequest, request: Request) -> GenerationResponse:
        """Generate `n` images for one prompt; image i uses `seed + i`."""
        arrived = time.perf_counter()
        chosen = pipeline.sampling_settings(body.cfg_scale, body.top_k, body.top_p, body.temperature)
        check_generation(body, pipeline.tokenizer, limits, token_limit, SampleConfig(**chosen).guided)
        if body.rerank > 1:
            try:
                check_fits(pipeline.model, pipeline.tokenizer, [body.prompt], config.image_tokens)
            except MarsError as err:
                raise ApiError(422, f"rerank: {err}") from None
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - limits.max_images + 2)
        seeds = [seed + i for i in range(body.n)]
        drawing_weight = pipeline.rerank_settings(body.rerank_drawing_weight).drawing_weight
        key = ("generate", chosen["cfg_scale"], chosen["top_k"], chosen["top_p"], chosen["temperature"], body.rerank,
               drawing_weight, body.jacobi_window)
        negative = body.negative_prompt or ""
        result = await run_job(request.app.state.batcher, request, key, [(body.prompt, s, negative) for s in seeds])
        encoded = await run_in_threadpool(lambda: [png_base64(img) for img in result.outputs])
        data = [GeneratedImage(b64_json=b64, seed=s, width=img.width, height=img.height)
                for b64, s, img in zip(encoded, seeds, result.outputs)]
        settings = GenerationSettings(**chosen, rerank=body.rerank, rerank_drawing_weight=drawing_weight,
                                      jacobi_window=body.jacobi_window)
        return GenerationResponse(created=int(time.time()), model=model_name, prompt=body.prompt,
                                  negative_prompt=body.negative_prompt, seeds=seeds,
                                  settings=settings, data=data, timings=timings(result, arrived))

    @app.post("/v1/captions", response_model=CaptionResponse, responses=ERROR_RESPONSES)
    async def caption_image(
        request: Request,
        image: UploadFile = File(description="PNG, JPEG or WebP"),
        lang: Literal["en", "zh"] = Form("en"),
        cfg_scale: float | None = Form(None, ge=0.0, le=50.0, allow_inf_nan=False,
                                       description="Guidance by the image; 1 = off (default: the model's)."),
        plausibility: float | None = Form(None, ge=0.0, lt=1.0, allow_inf_nan=False,
                                          description="With guidance, the least probability of a chosen word "
                                                      "relative to the best one's (default: the model's)."),
        rerank: int = Form(1, ge=1, description="Best of this many captions: the one under which the model, "
                                                "drawing, finds the image likeliest (1 = off)."),
        refine: int | None = Form(None, ge=0, description="Then this many rounds of one-word edits, each kept when "
                                                          "drawing and reading both find it likelier (0 = off; "
                                                          "default: the model's)."),
    ) -> CaptionResponse:
        """Describe an uploaded image in English or Chinese."""
        arrived = time.perf_counter()
        if rerank > limits.max_rerank:
            raise ApiError(422, f"rerank: at most {limits.max_rerank} captions per image, got {rerank}")
        guidance = pipeline.caption_settings(cfg_scale, plausibility, refine)
        if guidance.refine > limits.max_refine:
            raise ApiError(422, f"refine: at most {limits.max_refine} rounds of edits, got {guidance.refine}")
        settings = caption_settings(guidance, rerank)
        data = await image.read(limits.max_upload_bytes + 1)
        picture = await run_in_threadpool(decode_upload, data, limits)
        # one batch per setting
        key = ("caption", lang, settings.cfg_scale, settings.plausibility, rerank, settings.refine)
        result = await run_job(request.app.state.batcher, request, key, [picture])
        return CaptionResponse(created=int(time.time()), model=model_name, lang=lang, caption=result.outputs[0],
                               settings=settings, timings=timings(result, arrived))

    @app.get("/health", response_model=HealthResponse)
    async def health(request: Request) -> HealthResponse:
        batcher: Batcher = request.app.state.batcher
        queue = QueueStatus(queued=batcher.queued_rows, max_queue=batcher.max_queue,
                            max_batch_size=batcher.max_batch_size, batch_wait_ms=batcher.batch_wait_s * 1000,
                            batches_run=batcher.batches_run)
        return HealthResponse(status="ok", model=model_name, device=device, queue=queue)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        card = ModelCard(id=model_name, image_size=config.image_size, max_prompt_tokens=token_limit,
                         max_prompt_chars=limits.max_prompt_chars, max_images=limits.max_images,
                         max_rerank=limits.max_rerank, max_refine=limits.max_refine,
                         sampling_defaults=GenerationSettings(**pipeline.sampling_settings(),
                                                              rerank_drawing_weight=pipeline.rerank_settings().drawing_weight),
                         caption_defaults=caption_settings(pipeline.caption_settings()),
                         caption_languages=list(CAPTION_LANGS), upload_formats=list(limits.upload_formats),
                         max_upload_bytes=limits.max_upload_bytes)
        return ModelList(data=[card])

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
