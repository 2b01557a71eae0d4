// The MARS web page: talks to the JSON API of the same server (no libraries, works offline).
"use strict";

const $ = (id) => document.getElementById(id);

// Show a spinner and the elapsed seconds while `work` runs; returns work's result.
async function withProgress(progressId, elapsedId, button, work) {
  const started = performance.now();
  const tick = () => { $(elapsedId).textContent = ((performance.now() - started) / 1000).toFixed(1) + " s"; };
  tick();
  $(progressId).hidden = false;
  button.disabled = true;
  const timer = setInterval(tick, 100);
  try {
    return await work();
  } finally {
    clearInterval(timer);
    tick();
    $(progressId).hidden = true;
    button.disabled = false;
  }
}

// POST and parse the JSON answer; API errors come as {"error": {"message", "type"}}.
async function postJSON(url, init) {
  const response = await fetch(url, init);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.status + " " + response.statusText;
    const retry = response.headers.get("Retry-After");
    throw new Error(message + (retry ? " (retry in " + retry + " s)" : ""));
  }
  return body;
}

function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

// `data-state` (busy / done / error) lets scripts and tests tell when an answer has arrived.
function setStatus(text, state) {
  $("status").textContent = text;
  $("status").className = state === "error" ? "error" : "";
  $("status").dataset.state = state;
}

function showImages(result) {
  const gallery = $("gallery");
  for (const item of result.data.slice().reverse()) {
    const figure = document.createElement("figure");
    figure.className = "result";
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + item.b64_json;
    img.alt = result.prompt;
    img.dataset.seed = item.seed;
    img.width = item.width;
    img.height = item.height;
    const caption = document.createElement("figcaption");
    caption.textContent = "seed " + item.seed + " · " + result.prompt;
    figure.append(img, caption);
    gallery.prepend(figure);
  }
}

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = {
    prompt: $("prompt").value,
    n: numberField("n") ?? 1,
  };
  // sampling settings left empty take the model's defaults on the server
  for (const id of ["cfg_scale", "top_k", "top_p", "temperature", "rerank", "rerank_drawing_weight", "jacobi_window"]) {
    const value = numberField(id);
    if (value !== null) body[id] = value;
  }
  const seed = numberField("seed");
  if (seed !== null) body.seed = seed;
  const negative = $("negative_prompt").value.trim();
  if (negative) body.negative_prompt = negative;
  setStatus("", "busy");
  try {
    const result = await withProgress("progress", "elapsed", $("generate"), () =>
      postJSON("/v1/images/generations", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      }));
    showImages(result);
    const t = result.timings;
    setStatus("seeds " + result.seeds.join(", ") + " · queued " + t.queue_ms.toFixed(0) + " ms · generated in "
              + t.generation_ms.toFixed(0) + " ms (batch of " + t.batch_size + ")", "done");
  } catch (err) {
    setStatus(err.message, "error");
  }
});

$("caption-file").addEventListener("change", () => {
  const file = $("caption-file").files[0];
  const preview = $("caption-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !file;
  if (file) preview.src = URL.createObjectURL(file);
  $("caption-text").textContent = "";
});

$("caption-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("caption-file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  form.append("lang", $("caption-lang").value);
  // left empty: the model's own setting
  for (const [id, field] of [["caption-rerank", "rerank"], ["caption-refine", "refine"]]) {
    const value = numberField(id);
    if (value !== null) form.append(field, value);
  }
  const out = $("caption-text");
  out.className = "";
  out.textContent = "";
  out.dataset.state = "busy";
  $("caption-status").textContent = "";
  try {
    const result = await withProgress("caption-progress", "caption-elapsed", $("caption"), () =>
      postJSON("/v1/captions", { method: "POST", body: form }));
    out.textContent = result.caption;
    const s = result.settings;
    $("caption-status").textContent = "best of " + s.rerank + " · " + s.refine + " rounds of edits · guidance "
      + s.cfg_scale + " · generated in " + result.timings.generation_ms.toFixed(0) + " ms";
    out.dataset.state = "done";
  } catch (err) {
    out.textContent = err.message;
    out.className = "error";
    out.dataset.state = "error";
  }
});

// The served model's limits set the form's bounds.
fetch("/v1/models").then((r) => r.json()).then((models) => {
  const card = models.data[0];
  $("model-name").textContent = card.id + " · " + card.image_size + " px";
  $("n").max = card.max_images;
  $("rerank").max = card.max_rerank;
  $("caption-rerank").max = card.max_rerank;
  $("caption-refine").max = card.max_refine;
  $("caption-refine").value = card.caption_defaults.refine;
  $("prompt").maxLength = card.max_prompt_chars;
  for (const [id, value] of Object.entries(card.sampling_defaults)) $(id).value = value;  // the model's own
}).catch(() => {});
