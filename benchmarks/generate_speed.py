"""Image-token decoding speed: our engine vs recomputing without a KV cache vs HF `generate()`.

    python benchmarks/generate_speed.py                       # CPU, fp32, ~10 minutes on 2 cores
    python benchmarks/generate_speed.py --device cuda --dtype bf16 --compile
    python benchmarks/generate_speed.py --device cuda --dtype bf16 --preset qwen-7b --batch 1 4 16 \
        --skip-hf --skip-nocache

Every engine makes the same work: B images of `--tokens` image tokens each (256 = a 256 px image),
classifier-free guidance on (scale 4: B conditional + B unconditional rows in one batch), sampled at
temperature 1 with one generator per image, after a 16-token random prompt; all models hold random
weights.

(a) ours      `mars.generate.generate_image_tokens`: static KV cache, visual expert alone per step,
              logits for the image rows only, CFG combined on that slice, no host sync per token.
(b) no cache  the same model recomputing the whole sequence at every step (`use_cache=False`).
(c) HF        `transformers.Qwen2ForCausalLM` of the same dimensions (one expert per layer, the full
              multimodal vocabulary in its head) and `generate()` with a LogitsProcessor a user would
              write: keep the image rows, combine u + s (c - u), draw the code, and force that one
              token into both the conditional and the unconditional row (greedy over a one-hot).

At the large size it also prints the memory-bandwidth bound of a decode step: the bytes of the
visual-expert weights and the image rows of the head that every step must read, over the measured
copy bandwidth (read + write counted) and read-only bandwidth (a sum), and how close (a) comes.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import torch

from mars.config import SemVIEConfig, apply_overrides
from mars.generate import SampleConfig, generate_image_tokens, guide, make_generators, sample
from mars.model.dtypes import DTYPE_NAMES, torch_dtype
from mars.model.semvie import SemVIE

# Close to the built-in shapes-demo model: 8 layers of 384, a small BPE text vocabulary and the
# 4096-code shapes VQ-GAN; 256 px images -> 256 tokens.
SMALL = dict(num_layers=8, hidden_size=384, num_heads=6, num_kv_heads=6, head_dim=64, intermediate_size=1024,
             text_vocab_size=2048, image_vocab_size=4096, max_seq_len=512, text_tokenizer="bytes")
# ~300M parameters per expert (hidden 1024, 24 layers, no GQA), Qwen's text vocabulary + 8192 codes.
LARGE = dict(num_layers=24, hidden_size=1024, num_heads=16, num_kv_heads=16, head_dim=64, intermediate_size=2816,
             text_vocab_size=151936, image_vocab_size=8192, max_seq_len=1024, text_tokenizer="bytes")
PROMPT_TOKENS = 16
CFG = 4.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    wall: float  # seconds
    cpu: float  # seconds of CPU time of this process

    @property
    def seconds(self) -> float:
        """The clock the rates use: CPU time on a single-threaded CPU run (other jobs share the
        cores, and time spent descheduled is not ours), else wall time."""
        return self.cpu if CLOCK == "cpu" else self.wall


CLOCK = "wall"


def timed(fn, device: torch.device, repeats: int = 1) -> Timing:
    """The best of `repeats` calls."""
    best = None
    for _ in range(repeats):
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        t = Timing(time.perf_counter() - wall, time.process_time() - cpu)
        best = t if best is None or t.seconds < best.seconds else best
    return best


# --- models ------------------------------------------------------------------------------------


def build_ours(config: SemVIEConfig, device: torch.device, dtype: torch.dtype) -> SemVIE:
    """Random weights, built on the meta device and materialised in place (no fp32 copy of a 14B model)."""
    with torch.device("meta"):
        model = SemVIE(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_weights()
    return model.eval()


def build_hf(config: SemVIEConfig, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_config = Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False, pad_token_id=0, eos_token_id=None,
        bos_token_id=None)
    hf_config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


class CFGImageProcessor:
    """The HF LogitsProcessor for T2I with CFG: rows [cond; uncond], same token forced into both."""

    def __init__(self, image_ids: slice, scale: float, generators: list[torch.Generator]) -> None:
        self.image_ids, self.scale, self.generators = image_ids, scale, generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        guided = guide(scores[:, self.image_ids].float(), self.scale)  # (B, K)
        token = sample(guided, 1.0, generators=self.generators) + self.image_ids.start  # (B,)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, token.repeat(2)[:, None], 0.0)


# --- engines ---------------------------------------------------------------------------------------


def prompts_for(config: SemVIEConfig, batch: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, min(config.text_vocab_size, 256), (batch, PROMPT_TOKENS), generator=gen).tolist()


def run_ours(model, batch, tokens, device, repeats=1, **options) -> Timing:
    """Seconds for `batch` images; `options` go to `generate_image_tokens` (use_cache, compile, cuda_graph)."""
    prompts = prompts_for(model.config, batch)
    settings = SampleConfig(temperature=1.0, cfg_scale=CFG)

    def go(n):
        return generate_image_tokens(model, prompts, make_generators(range(batch), device), n, settings, **options)

    go(tokens if options.get("compile") else min(tokens, 8))  # warm up (compiles the full-length shape)
    return timed(lambda: go(tokens), device, repeats)


def run_hf(hf, config, batch, tokens, device, repeats=1) -> Timing:
    from transformers import LogitsProcessorList

    vocab_boi = config.text_vocab_size + config.image_vocab_size  # <img>
    prompts = prompts_for(config, batch)
    rows = [p + [vocab_boi] for p in prompts] + [[vocab_boi]] * batch
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=device)
    image_ids = slice(config.text_vocab_size, config.text_vocab_size + config.image_vocab_size)

    def go(n):
        processor = CFGImageProcessor(image_ids, CFG, make_generators(range(batch), device))
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, logits_processor=LogitsProcessorList([processor]))
        new = out[:, length:]  # (2B, n): image codes, the same in the cond and the uncond row
        assert new.shape[1] == n and torch.equal(new[:batch], new[batch:])
        assert bool(((new >= image_ids.start) & (new < image_ids.stop)).all())

    go(min(tokens, 8))
    return timed(lambda: go(tokens), device, repeats)


def memory_bandwidth(device: torch.device) -> tuple[float, float]:
    """(copy, read) bytes per second on a large tensor: a copy counts what it reads and writes; a
    sum only reads, like a decode step's weight reads."""
    src = torch.randn((1 << 30 if device.type == "cuda" else 1 << 28) // 4, device=device)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    rates = []
    for op, moved in ((lambda: dst.copy_(src), 2 * nbytes), (lambda: src.sum(), nbytes)):
        op()  # warm-up
        rates.append(moved / timed(op, device, repeats=5).seconds)
    return rates[0], rates[1]


def decode_step_bytes(model: SemVIE) -> int:
    """Weight bytes one image decode step reads: every visual expert + the image rows of the head."""
    experts = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".visual." in name)
    head = model.lm_head if model.lm_head is not None else model.embed
    image_rows = model.config.image_vocab_size * model.config.hidden_size * head.new_weight.element_size()
    return experts + image_rows


# --- report ----------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def report(name: str, batch: int, tokens: int, timing: Timing, ours_rate: float | None = None, note: str = "") -> float:
    rate = batch * tokens / timing.seconds
    ratio = f"{ours_rate / rate:.2f}x" if ours_rate else ""
    print(f"| {name:<27} | {batch:>5} | {tokens:>6} | {rate:>11.2f} | {timing.seconds / batch:>9.3f} "
          f"| {timing.wall / batch:>9.3f} | {ratio:>9} | {note}", flush=True)
    return rate


def bench_size(label: str, config: SemVIEConfig, args, device: torch.device, dtype: torch.dtype) -> None:
    print(f"\n### {label}: {config.num_layers} layers x {config.hidden_size}, {config.num_heads} heads "
          f"({config.num_kv_heads} kv) x {config.head_dim}, FFN {config.intermediate_size}, vocabulary "
          f"{config.vocab_size:,} ({config.image_vocab_size} image codes)", flush=True)
    torch.manual_seed(0)
    model = build_ours(config, device, dtype)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".visual." in n)
    line = f"visual expert {experts / 1e6:.1f}M parameters, whole SemVIE {model.num_parameters() / 1e6:.1f}M"
    hf = None if args.skip_hf else build_hf(config, device, dtype)
    if hf is not None:
        line += f", HF Qwen2 {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M"
    print(line + "\n")
    print("| engine                      | batch | tokens | image tok/s | s / image | wall s/im | ours / it | note")
    print("|-----------------------------|-------|--------|-------------|-----------|-----------|-----------|-----")
    best = {}
    for batch in args.batch:
        ours = report("(a) ours", batch, args.tokens, run_ours(model, batch, args.tokens, device, args.repeats))
        best[batch] = ours
        if device.type == "cuda":
            seconds = run_ours(model, batch, args.tokens, device, args.repeats, cuda_graph=True)
            best[batch] = max(ours, report("(a) ours + CUDA graph", batch, args.tokens, seconds))
        if args.compile:
            seconds = run_ours(model, batch, args.tokens, device, args.repeats, compile=True,
                               cuda_graph=device.type == "cuda")
            best[batch] = max(best[batch], report("(a) ours + torch.compile", batch, args.tokens, seconds))
        if not args.skip_nocache:
            n = min(args.nocache_tokens if label == "small" else args.nocache_tokens_large, args.tokens)
            seconds = run_ours(model, batch, n, device, args.repeats, use_cache=False)
            note = f"first {n} tokens only (gets slower with length)" if n < args.tokens else ""
            report("(b) same model, no KV cache", batch, n, seconds, best[batch], note)
        if hf is not None:
            seconds = run_hf(hf, config, batch, args.tokens, device, args.repeats)
            report("(c) HF generate + CFG", batch, args.tokens, seconds, best[batch])
    if label != "small":
        copy, read = memory_bandwidth(device)
        step = decode_step_bytes(model)
        print(f"\nmemory-bandwidth bound: {step / 1e6:.0f} MB of visual-expert + image-head weights read per decode "
              f"step (KV-cache reads not counted); copy bandwidth {copy / 1e9:.1f} GB/s (read + write) -> at most "
              f"{copy / step:.1f} steps/s; read-only bandwidth (a sum) {read / 1e9:.1f} GB/s -> {read / step:.1f} steps/s")
        for batch, rate in best.items():
            copy_bound, read_bound = batch * copy / step, batch * read / step
            print(f"  batch {batch:>3}: bounds {copy_bound:.1f} (copy) / {read_bound:.1f} (read) image tok/s; "
                  f"ours {rate:.1f} = {rate / copy_bound:.0%} / {rate / read_bound:.0%} of them")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--sizes", nargs="+", choices=("small", "large"), default=["small", "large"])
    parser.add_argument("--small", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the small config (default: 8 layers x 384, see SMALL)")
    parser.add_argument("--preset", help="benchmark a named preset (e.g. qwen-7b) instead of --sizes")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=256, help="image tokens per image (default 256)")
    parser.add_argument("--nocache-tokens", type=int, default=64,
                        help="image tokens for the no-cache baseline at the small size (default 64: it is slow)")
    parser.add_argument("--nocache-tokens-large", type=int, default=8,
                        help="image tokens for the no-cache baseline at the large size / preset (default 8)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per point; the best counts")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on shared cores, more threads spin and slow everyone; "
                             "with 1 thread the rates use CPU time, which other jobs on the machine do not inflate)")
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-nocache", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch_dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    print(f"## generate_speed on {machine(device)}, {str(dtype).replace('torch.', '')}")
    print(f"CFG {CFG} (2 rows per image), temperature 1, {PROMPT_TOKENS}-token prompt, random weights. "
          f"tok/s counts the image tokens of the B images (not CFG rows), prefill included; rates and "
          f"s / image use {'the CPU time of this single-threaded process' if CLOCK == 'cpu' else 'wall time'}"
          f"{', wall s/im the wall time' if CLOCK == 'cpu' else ''}.")
    if args.preset:
        config = SemVIEConfig.from_name(args.preset)
        bench_size(args.preset, config, args, device, dtype)
        return
    for size in args.sizes:
        if size == "small":
            config = apply_overrides(SemVIEConfig(name="small", **SMALL), args.small)
        else:
            config = SemVIEConfig(name="large", **LARGE)
        bench_size(size, config, args, device, dtype)


if __name__ == "__main__":
    main()
