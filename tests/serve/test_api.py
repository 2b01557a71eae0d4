"""Every endpoint and every validation error, through FastAPI's TestClient and the tiny model.

Generated images are checked against the pipeline called directly (the server must give the
same pixels as `pipeline.generate` for the same prompt, seed and settings), captions likewise.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mars.data.images import load_image
from mars.serve.app import create_app
from mars.serve.schemas import MAX_SEED, ServeLimits

GEN = "/v1/images/generations"
CAP = "/v1/captions"


def png_image(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def assert_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type"}
    for word in words:
        assert word in body["error"]["message"], body
    return body["error"]


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


# --- generation -----------------------------------------------------------------------------


def test_generate_returns_the_pipelines_images_with_their_seeds(client, tiny_pipeline):
    body = {"prompt": "a red circle", "n": 2, "seed": 7,
            "cfg_scale": 3.0, "top_k": 50, "top_p": 0.9, "temperature": 0.8}
    r = client.post(GEN, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seeds"] == [7, 8] and [d["seed"] for d in out["data"]] == [7, 8]
    assert out["prompt"] == "a red circle" and out["model"] == "tiny"
    assert out["settings"] == {"cfg_scale": 3.0, "top_k": 50, "top_p": 0.9, "temperature": 0.8, "rerank": 1,
                               "rerank_drawing_weight": 0.0,  # the tiny model judges by reading alone
                               "jacobi_window": 0}
    size = tiny_pipeline.model.config.image_size
    expected = tiny_pipeline.generate(["a red circle"] * 2, cfg_scale=3.0, top_k=50, top_p=0.9, temperature=0.8, seed=7)
    for item, want in zip(out["data"], expected):
        image = png_image(item["b64_json"])
        assert image.size == (size, size) == (item["width"], item["height"])
        np.testing.assert_array_equal(pixels(image), pixels(want))
    first, second = (pixels(png_image(d["b64_json"])) for d in out["data"])
    assert not np.array_equal(first, second)
    t = out["timings"]
    assert t["queue_ms"] >= 0 and t["generation_ms"] > 0 and t["total_ms"] >= t["generation_ms"]
    assert t["batch_size"] == 2


@pytest.mark.slow  # compiling takes ~30 s on a CPU
def test_compiled_server_returns_the_same_images(recording, tiny_pipeline):
    with TestClient(create_app(recording, model_name="tiny", compile=True)) as compiled:
        out = compiled.post(GEN, json={"prompt": "a red circle", "n": 2, "temperature": 0.0}).json()
    expected = tiny_pipeline.generate(["a red circle"] * 2, temperature=0.0)
    for item, want in zip(out["data"], expected):
        np.testing.assert_array_equal(pixels(png_image(item["b64_json"])), pixels(want))


def test_negative_prompt_reaches_the_pipeline_and_batches_beside_plain_requests(client, tiny_pipeline):
    body = {"prompt": "a red circle", "seed": 3, "cfg_scale": 3.0, "negative_prompt": "a green star"}
    out = client.post(GEN, json=body).json()
    assert out["negative_prompt"] == "a green star"
    (want,) = tiny_pipeline.generate("a red circle", cfg_scale=3.0, seed=3, negative_prompt="a green star")
    np.testing.assert_array_equal(pixels(png_image(out["data"][0]["b64_json"])), pixels(want))
    # a batch that mixes requests with and without one: each row keeps its own
    from mars.serve.app import run_batch
    key = ("generate", 3.0, 0, 1.0, 1.0, 1, 0.0, 0)
    mixed = run_batch(tiny_pipeline, key, [("a red circle", 3, "a green star"), ("a red circle", 3, "")])
    (plain,) = tiny_pipeline.generate("a red circle", cfg_scale=3.0, top_k=0, top_p=1.0, temperature=1.0, seed=3)
    (away,) = tiny_pipeline.generate("a red circle", cfg_scale=3.0, top_k=0, top_p=1.0, temperature=1.0, seed=3,
                                     negative_prompt="a green star")
    np.testing.assert_array_equal(pixels(mixed[0]), pixels(away))
    np.testing.assert_array_equal(pixels(mixed[1]), pixels(plain))


def test_server_picks_a_seed_that_reproduces_the_image(client):
    first = client.post(GEN, json={"prompt": "一个蓝色的正方形"}).json()
    (seed,) = first["seeds"]
    assert 0 <= seed <= MAX_SEED
    again = client.post(GEN, json={"prompt": "一个蓝色的正方形", "seed": seed}).json()
    assert again["data"][0]["b64_json"] == first["data"][0]["b64_json"]


def test_settings_reach_the_sampler(client):
    def image(**kw):
        return client.post(GEN, json={"prompt": "a square", **kw}).json()["data"][0]["b64_json"]

    # greedy decoding ignores the seed; sampling does not
    assert image(temperature=0.0, seed=1) == image(temperature=0.0, seed=2)
    assert image(seed=1) != image(seed=2)
    assert image(seed=1, cfg_scale=1.0) != image(seed=1, cfg_scale=4.0)


@pytest.mark.parametrize("body, words", [
    ({}, ["prompt", "Field required"]),
    ({"prompt": ""}, ["prompt", "at least 1 character"]),
    ({"prompt": "   "}, ["prompt", "blank"]),
    ({"prompt": "x" * 2001}, ["prompt", "2001 characters"]),
    ({"prompt": "x" * 300}, ["prompt", "300 tokens"]),  # bytes tokenizer: 1 token per ASCII char
    ({"prompt": 5}, ["prompt", "valid string"]),
    ({"prompt": "a", "n": 0}, ["n", "greater than or equal to 1"]),
    ({"prompt": "a", "n": 9}, ["n", "at most 8"]),
    ({"prompt": "a", "n": "2"}, ["n", "valid integer"]),
    ({"prompt": "a", "n": 1.5}, ["n", "valid integer"]),
    ({"prompt": "a", "n": True}, ["n", "valid integer"]),
    ({"prompt": "a", "seed": -1}, ["seed"]),
    ({"prompt": "a", "seed": MAX_SEED + 1}, ["seed"]),
    ({"prompt": "a", "cfg_scale": -0.5}, ["cfg_scale"]),
    ({"prompt": "a", "cfg_scale": 51}, ["cfg_scale"]),
    ({"prompt": "a", "top_k": -1}, ["top_k"]),
    ({"prompt": "a", "top_k": 2**31}, ["top_k"]),
    ({"prompt": "a", "top_p": 0}, ["top_p"]),
    ({"prompt": "a", "top_p": 1.01}, ["top_p"]),
    ({"prompt": "a", "temperature": -0.1}, ["temperature"]),
    ({"prompt": "a", "temperature": 11}, ["temperature"]),
    ({"prompt": "a", "cfg": 2}, ["cfg", "Extra inputs"]),
    ({"prompt": "a", "negative_prompt": "x" * 300}, ["negative_prompt", "300 tokens"]),
    ({"prompt": "a", "negative_prompt": "b", "cfg_scale": 1.0}, ["negative_prompt", "cfg_scale"]),
])
def test_generation_validation_errors(client, recording, body, words):
    error = assert_error(client.post(GEN, json=body), 422, *words)
    assert error["type"] == "invalid_request_error"
    assert recording.generate_calls == []  # nothing reached the model


@pytest.mark.parametrize("content, words", [
    (b'{"prompt": "a", "temperature": NaN}', ["temperature", "finite"]),
    (b'{"prompt": "a", "top_p": Infinity}', ["top_p", "finite"]),
    (b'{"prompt": "a",', ["JSON"]),
    (b'["a red circle"]', ["valid dictionary"]),
    (b"", ["Field required"]),
])
def test_malformed_json_bodies(client, content, words):
    assert_error(client.post(GEN, content=content, headers={"content-type": "application/json"}), 422, *words)


def test_oversized_bodies_are_refused_before_parsing(client, recording):
    # an escaped prompt at the character limit still gets its informative 422 ...
    cjk = json.dumps({"prompt": "一" * 2000})  # 12 kB of \\u4e00 escapes
    assert_error(client.post(GEN, content=cjk, headers={"content-type": "application/json"}), 422, "tokens")
    # ... a body far beyond any valid request is cut off at once, with or without Content-Length
    huge = json.dumps({"prompt": "x" * 100_000}).encode()
    r = client.post(GEN, content=huge, headers={"content-type": "application/json"})
    assert assert_error(r, 413, "larger than")["type"] == "payload_too_large"
    chunked = (huge[i:i + 8192] for i in range(0, len(huge), 8192))
    assert_error(client.post(GEN, content=chunked, headers={"content-type": "application/json"}), 413)
    assert recording.generate_calls == []


def test_wrong_method_and_unknown_path_answer_json(client):
    assert assert_error(client.get(GEN), 405)["type"] == "method_not_allowed"
    assert assert_error(client.get("/v1/nothing"), 404)["type"] == "not_found"


def test_prompt_at_the_token_limit_is_accepted(client):
    limit = client.get("/v1/models").json()["data"][0]["max_prompt_tokens"]
    assert client.post(GEN, json={"prompt": "x" * limit, "seed": 0}).status_code == 200
    assert_error(client.post(GEN, json={"prompt": "x" * (limit + 1)}), 422, "tokens")


# --- captions -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_caption_matches_the_pipeline(client, tiny_pipeline, picture, fmt, mime):
    data = encoded(picture, fmt)
    r = client.post(CAP, files={"image": (f"x.{fmt.lower()}", data, mime)}, data={"lang": "en"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["lang"] == "en" and out["model"] == "tiny" and out["timings"]["batch_size"] == 1
    assert out["caption"] == tiny_pipeline.caption([load_image(data)], lang="en")[0]


def test_caption_guidance_defaults_to_the_models_and_can_be_set(client, tiny_pipeline, picture):
    data = encoded(picture, "PNG")
    image = load_image(data)
    out = client.post(CAP, files={"image": ("x.png", data, "image/png")}, data={"lang": "zh"}).json()
    assert out["settings"] == {"cfg_scale": 1.0, "plausibility": 0.1, "rerank": 1, "refine": 0}  # the tiny model's
    out = client.post(CAP, files={"image": ("x.png", data, "image/png")},
                      data={"lang": "zh", "cfg_scale": "3", "plausibility": "0.05", "rerank": "3", "refine": "2"}).json()
    assert out["settings"] == {"cfg_scale": 3.0, "plausibility": 0.05, "rerank": 3, "refine": 2}
    assert out["caption"] == tiny_pipeline.caption([image], lang="zh", cfg_scale=3.0, plausibility=0.05, rerank=3,
                                                   refine=2)[0]
    for field, value in (("cfg_scale", "-1"), ("plausibility", "1"), ("cfg_scale", "nan"), ("rerank", "0"),
                         ("rerank", "9"), ("refine", "-1"), ("refine", "5")):
        r = client.post(CAP, files={"image": ("x.png", data, "image/png")}, data={field: value})
        assert_error(r, 422, field)


def test_caption_refine_reaches_the_edits(client, picture, edit_recorder):
    data = encoded(picture, "PNG")
    out = client.post(CAP, files={"image": ("x.png", data, "image/png")}, data={"refine": "3"}).json()
    assert out["caption"] == "edited 3" and [rounds for *_, rounds in edit_recorder] == [3]


def test_caption_in_chinese(client, tiny_pipeline, picture):
    data = encoded(picture, "PNG")
    out = client.post(CAP, files={"image": ("x.png", data, "image/png")}, data={"lang": "zh"}).json()
    assert out["lang"] == "zh"
    assert out["caption"] == tiny_pipeline.caption([load_image(data)], lang="zh")[0]


def test_caption_upload_errors(client, recording, picture):
    def post(data, name="x.png", mime="image/png", lang="en"):
        return client.post(CAP, files={"image": (name, data, mime)}, data={"lang": lang})

    png = encoded(picture, "PNG")
    assert_error(post(encoded(picture, "GIF"), "x.gif", "image/gif"), 415, "PNG, JPEG, WEBP")
    assert_error(post(b"hello, not an image"), 415)
    assert_error(post(png[: len(png) // 2]), 400, "cannot use")  # truncated
    assert_error(post(b""), 400, "empty")
    assert_error(post(encoded(Image.new("RGB", (4, 4)), "PNG")), 400, "too small")
    assert_error(post(png, lang="fr"), 422, "lang")
    assert_error(client.post(CAP, data={"lang": "en"}), 422, "image", "Field required")
    assert_error(client.post(CAP, json={"image": "abc"}), 422, "image")
    assert recording.caption_calls == []


def test_upload_size_and_pixel_limits(recording, picture):
    limits = ServeLimits(max_upload_bytes=20_000, max_upload_pixels=100 * 100)
    app = create_app(recording, model_name="tiny", limits=limits)
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 90, 3), dtype=np.uint8))
    big = encoded(noise, "PNG")  # ~24 kB: over the file limit, under the form limit
    huge = big * 5  # over the form limit: refused before it is parsed
    wide = encoded(Image.new("RGB", (200, 60)), "PNG")  # 12,000 pixels in a small file
    with TestClient(app) as c:
        for data, words in [(big, ["bytes"]), (huge, ["request body larger"]), (wide, ["200x60 pixels"])]:
            r = c.post(CAP, files={"image": ("x.png", data, "image/png")})
            assert assert_error(r, 413, *words)["type"] == "payload_too_large"
        assert c.post(CAP, files={"image": ("x.png", encoded(picture, "PNG"), "image/png")}).status_code == 200


# --- the rest -------------------------------------------------------------------------------


def test_health(client):
    out = client.get("/health").json()
    assert out["status"] == "ok" and out["model"] == "tiny" and out["device"] == "cpu"
    assert out["queue"] == {"queued": 0, "max_queue": 64, "max_batch_size": 8, "batch_wait_ms": 10.0, "batches_run": 0}


def test_models_lists_the_limits(client, tiny_pipeline):
    config = tiny_pipeline.model.config
    (card,) = client.get("/v1/models").json()["data"]
    assert card["id"] == "tiny" and card["image_size"] == config.image_size
    assert card["max_prompt_tokens"] == config.max_seq_len - config.image_tokens - 2
    assert card["max_images"] == 8 and card["caption_languages"] == ["en", "zh"]


def test_openapi_schema_describes_the_api(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/captions", "/health", "/v1/models"} <= set(schema["paths"])
    request = schema["components"]["schemas"]["GenerationRequest"]
    assert request["required"] == ["prompt"]
    assert {"prompt", "n", "seed", "cfg_scale", "top_k", "top_p", "temperature", "negative_prompt", "rerank",
            "rerank_drawing_weight", "jacobi_window"} == set(request["properties"])
    assert "422" in schema["paths"][GEN]["post"]["responses"]
    assert "multipart/form-data" in schema["paths"][CAP]["post"]["requestBody"]["content"]


def test_web_page_and_its_files_are_served_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="prompt"', 'id="generate"', 'id="gallery"', 'id="seed"', 'id="caption-file"', 'id="elapsed"'):
        assert element in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text
    assert "https://" not in page.text and "http://" not in page.text  # no CDN
    # the page fills a form field from each of the model card's sampling defaults, by id
    card = client.get("/v1/models").json()["data"][0]
    assert all(f'id="{name}"' in page.text for name in card["sampling_defaults"])


def test_create_app_checks_its_settings(recording):
    from mars.errors import MarsError

    with pytest.raises(MarsError, match="max_queue"):
        create_app(recording, max_batch_size=8, max_queue=4)
    with pytest.raises(MarsError, match="max_images"):
        create_app(recording, max_batch_size=2, limits=ServeLimits(max_images=4))


def test_rerank_reaches_the_pipeline_and_is_bounded(client, tiny_pipeline):
    body = {"prompt": "a red circle", "seed": 4, "top_k": 20, "rerank": 3}
    out = client.post(GEN, json=body).json()
    assert out["settings"]["rerank"] == 3
    (want,) = tiny_pipeline.generate("a red circle", seed=4, top_k=20, rerank=3)
    np.testing.assert_array_equal(pixels(png_image(out["data"][0]["b64_json"])), pixels(want))
    too_many = client.post(GEN, json={**body, "rerank": 9})
    assert too_many.status_code == 422 and "rerank: at most 8" in too_many.json()["error"]["message"]
    assert client.post(GEN, json={**body, "rerank": 0}).status_code == 422


def test_a_requests_candidates_are_drawn_together(client, tiny_pipeline, drawn_batches):
    out = client.post(GEN, json={"prompt": "a red circle", "seed": 4, "top_k": 20, "rerank": 3}).json()
    assert drawn_batches == [3]  # not three batches of one
    (want,) = tiny_pipeline.generate("a red circle", seed=4, top_k=20, rerank=3)
    np.testing.assert_array_equal(pixels(png_image(out["data"][0]["b64_json"])), pixels(want))


def test_a_request_asks_for_jacobi_decoding_and_batches_apart(client, tiny_pipeline, monkeypatch):
    import mars.pipeline

    want = tiny_pipeline.generate(["a red circle"] * 2, seed=4, top_k=20, jacobi_window=3)
    windows = []
    decode = mars.pipeline.generate_image_tokens_jacobi
    monkeypatch.setattr(mars.pipeline, "generate_image_tokens_jacobi",
                        lambda *a, **k: windows.append(a[5]) or decode(*a, **k))
    body = {"prompt": "a red circle", "seed": 4, "top_k": 20, "n": 2}
    out = client.post(GEN, json={**body, "jacobi_window": 3}).json()
    assert windows == [3] and out["settings"]["jacobi_window"] == 3
    for got, image in zip(out["data"], want):
        np.testing.assert_array_equal(pixels(png_image(got["b64_json"])), pixels(image))
    plain = client.post(GEN, json=body).json()
    assert windows == [3] and plain["settings"]["jacobi_window"] == 0  # its own batch, one code per forward
    bad = [client.post(GEN, json={**body, "jacobi_window": w}) for w in (-1, 17, 2.5)]
    assert all(r.status_code == 422 and "jacobi_window" in r.json()["error"]["message"] for r in bad)


def test_a_request_sets_the_drawing_weight_of_rerank(tiny_pipeline, monkeypatch):
    body = {"prompt": "a red circle", "seed": 4, "top_k": 20, "rerank": 4}
    (reading,) = tiny_pipeline.generate("a red circle", seed=4, top_k=20, rerank=4, rerank_drawing_weight=0.0)
    (drawing,) = tiny_pipeline.generate("a red circle", seed=4, top_k=20, rerank=4, rerank_drawing_weight=1000.0)
    assert not np.array_equal(pixels(reading), pixels(drawing))  # the weight picks another candidate here
    monkeypatch.setattr(tiny_pipeline, "rerank_config", dataclasses.replace(tiny_pipeline.rerank_config,
                                                                            drawing_weight=1000.0))
    with TestClient(create_app(tiny_pipeline, model_name="tiny")) as client:
        card = client.get("/v1/models").json()["data"][0]
        default = client.post(GEN, json=body).json()
        given = client.post(GEN, json={**body, "rerank_drawing_weight": 0}).json()
        bad = [client.post(GEN, json={**body, "rerank_drawing_weight": w}) for w in (-1, "nan", 1e9)]
    assert card["sampling_defaults"]["rerank_drawing_weight"] == 1000.0  # the model's, for the page
    assert default["settings"]["rerank_drawing_weight"] == 1000.0
    np.testing.assert_array_equal(pixels(png_image(default["data"][0]["b64_json"])), pixels(drawing))
    assert given["settings"]["rerank_drawing_weight"] == 0.0
    np.testing.assert_array_equal(pixels(png_image(given["data"][0]["b64_json"])), pixels(reading))
    assert all(r.status_code == 422 and "rerank_drawing_weight" in r.json()["error"]["message"] for r in bad)


def test_model_card_gives_the_sampling_defaults_the_page_starts_from(client, tiny_pipeline):
    card = client.get("/v1/models").json()["data"][0]
    assert card["sampling_defaults"] == {**tiny_pipeline.sampling_settings(), "rerank": 1, "rerank_drawing_weight": 0.0,
                                         "jacobi_window": 0}
    assert card["max_rerank"] == 8 and card["max_refine"] == 4


def test_model_card_gives_the_models_caption_defaults(tiny_pipeline, monkeypatch):
    monkeypatch.setattr(tiny_pipeline, "caption_config",
                        dataclasses.replace(tiny_pipeline.caption_config, cfg_scale=1.5, refine=2))
    with TestClient(create_app(tiny_pipeline, model_name="tiny")) as client:
        card = client.get("/v1/models").json()["data"][0]
    assert card["caption_defaults"] == {"cfg_scale": 1.5, "plausibility": 0.1, "rerank": 1, "refine": 2}
