"""Request and response bodies of the HTTP API, and the server's limits.

Requests are strict: wrong types (`"n": "2"`, `"n": 1.5`, `"n": true`), unknown fields (a typo like
`"cfg"` would otherwise be silently ignored), NaN/inf and out-of-range numbers are rejected with a
422 that names the field. Limits that depend on the model (prompt tokens, n, top_k) are checked
in app.py against `ServeLimits`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**31 - 1  # fits every client's integer type (JavaScript numbers included)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for. `max_images` is at most the batch size: a request runs in one batch."""

    max_prompt_chars: int = 2000
    max_images: int = 8
    max_rerank: int = 8  # candidates per image a request may ask to choose from (each costs one generation)
    max_refine: int = 4  # rounds of caption edits a request may ask for (each costs tens of forwards)
    max_upload_bytes: int = 10 * 2**20
    max_upload_pixels: int = 4096 * 4096  # Pillow decodes lazily; refuse decompression bombs before decoding
    upload_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")

    @property
    def max_json_bytes(self) -> int:
        """Largest generation request body: the longest prompt fully escaped (an astral character
        is 12 bytes of `\\uXXXX\\uXXXX`) plus room for the settings."""
        return 12 * self.max_prompt_chars + 4096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerationRequest(_Strict):
    prompt: str = Field(min_length=1, description="What to draw (English or Chinese).")
    n: int = Field(1, ge=1, description="Number of images; image i uses seed + i.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="Seed of the first image; omitted: the server picks one.")
    # Sampling settings left out take the model's defaults (its generation_config.json).
    cfg_scale: float | None = Field(None, ge=0.0, le=50.0, allow_inf_nan=False,
                                    description="Classifier-free guidance; 1 = off, 0 = unconditional.")
    top_k: int | None = Field(None, ge=0, le=2**31 - 1, description="Keep the k most likely codes; 0 = off.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling; 1 = off.")
    temperature: float | None = Field(None, ge=0.0, le=10.0, allow_inf_nan=False, description="0 = greedy.")
    negative_prompt: str | None = Field(None, description="What to steer away from: it replaces the null prompt "
                                                          "in guidance (needs cfg_scale != 1).")
    rerank: int = Field(1, ge=1, description="Best of this many candidates per image: the one kept is the one "
                                             "under which the model, reading it back, finds the prompt the "
                                             "likeliest caption, with the model's drawing term (the \"rerank\" "
                                             "entry of its generation_config.json; costs this many generations; "
                                             "1 = off).")
    rerank_drawing_weight: float | None = Field(None, ge=0.0, le=1000.0, allow_inf_nan=False,
                                                description="With rerank > 1: the weight of the drawing term "
                                                            "log p(codes | prompt) beside the reading term "
                                                            "(0 = reading alone); omitted: the model's.")
    jacobi_window: int = Field(0, ge=0, le=16, description="Speculative Jacobi decoding with this many drafted "
                                                           "codes per forward: images of the same distribution "
                                                           "(not the same images for a seed) from fewer forwards, "
                                                           "each image at its own pace; faster single images on a CPU "
                                                           "(3 for the built-in model); 0 = one code per forward.")


class GeneratedImage(BaseModel):
    b64_json: str = Field(description="The PNG file, base64-encoded.")
    seed: int
    width: int
    height: int


class Timings(BaseModel):
    queue_ms: float = Field(description="From arrival to the start of the batch that ran the request.")
    generation_ms: float = Field(description="Run time of that batch (shared with the other requests in it).")
    total_ms: float = Field(description="From arrival to the response (includes PNG encoding).")
    batch_size: int = Field(description="Images or captions in that batch, this request's and others'.")


class GenerationSettings(BaseModel):
    cfg_scale: float
    top_k: int
    top_p: float
    temperature: float
    rerank: int = 1
    rerank_drawing_weight: float = Field(0.0, description="The drawing term's weight in judging candidates "
                                                          "(used when rerank > 1).")
    jacobi_window: int = Field(0, description="Drafted codes per forward (speculative Jacobi decoding; 0 = off).")


class GenerationResponse(BaseModel):
    created: int
    model: str
    prompt: str
    negative_prompt: str | None = None
    seeds: list[int]
    settings: GenerationSettings
    data: list[GeneratedImage]
    timings: Timings


class CaptionSettings(BaseModel):
    cfg_scale: float = Field(description="Guidance by the image against the text model alone; 1 = off.")
    plausibility: float = Field(description="With guidance, the least probability of a chosen word relative to "
                                            "the best one's.")
    rerank: int = Field(1, description="Captions drawn to keep the best of (1 = off).")
    refine: int = Field(0, description="Rounds of one-word edits after that (0 = off).")


class CaptionResponse(BaseModel):
    created: int
    model: str
    lang: str
    caption: str
    settings: CaptionSettings
    timings: Timings


class QueueStatus(BaseModel):
    queued: int = Field(description="Images and captions waiting for a batch.")
    max_queue: int
    max_batch_size: int
    batch_wait_ms: float
    batches_run: int


class HealthResponse(BaseModel):
    status: str
    model: str
    device: str
    queue: QueueStatus


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    image_size: int = Field(description="Width and height of generated images, in pixels.")
    max_prompt_tokens: int
    max_prompt_chars: int
    max_images: int
    max_rerank: int
    max_refine: int
    sampling_defaults: GenerationSettings = Field(description="What a request gets for the settings it leaves out "
                                                              "(the model's generation_config.json).")
    caption_defaults: CaptionSettings = Field(description="What a caption request gets for the settings it leaves "
                                                          "out (the \"caption\" entry of generation_config.json).")
    caption_languages: list[str]
    upload_formats: list[str]
    max_upload_bytes: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str


class ErrorResponse(BaseModel):
    error: ErrorBody
