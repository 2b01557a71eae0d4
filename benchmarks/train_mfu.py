"""Training step time and model FLOP utilisation (MFU) of a ~1B-backbone SemVIE, T2I stage-I step.

    python benchmarks/train_mfu.py --peak-tflops 989            # H100/H200 SXM dense bf16
    python benchmarks/train_mfu.py --peak-tflops 989 --compile --activation-checkpointing
    python benchmarks/train_mfu.py --tiny                        # CPU smoke run of the same code

The step is the trainer's own: `set_trainable(model, "stage1")`, `build_optimizer`, bf16 autocast,
`mars.train.losses.t2i_loss` (text prefix without autograd into a KV cache, full-vocabulary
loss), gradient clipping, AdamW. Batches are random ids in the real T2I layout (a P-token prompt,
`<img>`, 256 codes, `</img>`), so no tokenizer or data is needed.

Model FLOPs are those the step must do (activation recomputation not counted): the prefix runs
forward only (2 FLOPs per weight per token, plus causal attention), the visual suffix forward and
backward (3x forward), and the head at each target position forward, input-gradient and
new-row-gradient. `--full-forward` times the plain full forward (prefix with autograd) against
the SAME useful FLOPs, so its lower MFU is the price of not skipping the prefix.
"""

from __future__ import annotations

import argparse
import time

import torch

from mars.config import SemVIEConfig
from mars.data.sequences import build_t2i, collate_t2i
from mars.model.semvie import SemVIE
from mars.train import parallel
from mars.train.config import TrainConfig
from mars.train.losses import t2i_loss
from mars.train.stages import set_trainable
from mars.train.trainer import build_optimizer

# A Qwen v1 layout with a ~1.2B backbone (12 x 2048, SwiGLU 5504, Qwen's 151,936 text rows);
# with its visual experts 1.9B parameters, 0.64B of them trainable.
MFU_1B = SemVIEConfig(name="mfu-1b", num_layers=12, hidden_size=2048, num_heads=16, num_kv_heads=16, head_dim=128,
                      intermediate_size=5504, qkv_bias=True, text_vocab_size=151936, image_vocab_size=8192,
                      max_seq_len=1024, image_size=256, image_downsample=16, text_tokenizer="qwen")
TINY = SemVIEConfig.from_name("debug")


def step_flops(cfg: SemVIEConfig, batch: int, prefix: int, suffix: int, targets: int) -> float:
    """Useful FLOPs of one T2I step with a no-grad prefix of `prefix` and a trained `suffix`."""
    C, H, Hkv, D, F, L = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                          cfg.num_layers)
    weights = C * (H + 2 * Hkv) * D + H * D * C + 3 * C * F  # matmul weights of one expert, one layer

    def attn(q0: int, q1: int) -> int:  # causal QK^T + AV of queries [q0, q1), one layer
        return 4 * H * D * sum(t + 1 for t in range(q0, q1))

    prefix_fwd = batch * L * (2 * weights * prefix + attn(0, prefix))
    suffix_fwd = batch * L * (2 * weights * suffix + attn(prefix, prefix + suffix))
    vocab, new_rows = cfg.vocab_size, cfg.image_vocab_size + cfg.num_special_tokens
    head = targets * 2 * C * (2 * vocab + new_rows)
    return prefix_fwd + 3 * suffix_fwd + head


def random_batch(cfg: SemVIEConfig, model: SemVIE, batch: int, prompt_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    text_ids = min(cfg.text_vocab_size, 151643)  # ordinary text ids (Qwen's specials start at 151643)
    seqs = [build_t2i(model.vocab, torch.randint(0, text_ids, (prompt_len,), generator=g).tolist(),
                      torch.randint(0, cfg.image_vocab_size, (cfg.image_tokens,), generator=g)) for _ in range(batch)]
    return collate_t2i(seqs, pad_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--tiny", action="store_true", help="the tiny debug preset (CPU smoke run)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--full-forward", action="store_true", help="prefix with autograd (no KV-cache trick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    cfg = TINY if args.tiny else MFU_1B
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = SemVIE(cfg)
    set_trainable(model, "stage1")
    if args.activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    if args.compile:
        parallel.apply_compile(model)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    optimizer = build_optimizer(model, TrainConfig(model="debug", lr=1e-4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = random_batch(cfg, model, args.batch, args.prompt_len, 0).to(device)
    prefix, suffix = batch.prefix_len, batch.input_ids.shape[1] - batch.prefix_len
    targets = int((batch.targets != -100).sum())

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ce_sum, n = t2i_loss(model, batch, prefix_no_grad=not args.full_forward, cache_dtype=torch.bfloat16)
        (ce_sum / n).backward()
        parallel.clip_grad_norm(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(ce_sum.detach() / n)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps

    flops = step_flops(cfg, args.batch, prefix, suffix, targets)
    total = sum(p.numel() for p in model.parameters())
    mode = "full forward" if args.full_forward else "no-grad prefix"
    print(f"model {cfg.name}: {total / 1e9:.3f}B params, {sum(p.numel() for p in trainable) / 1e9:.3f}B trainable; "
          f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"batch {args.batch} x (prefix {prefix} + suffix {suffix}) tokens, {targets} targets; {mode}; "
          f"compile={args.compile} ac={args.activation_checkpointing}; loss {loss:.3f}")
    print(f"| step ms | tokens/s | model TFLOP/step | achieved TFLOP/s | MFU (peak {args.peak_tflops:.0f}) | peak mem GiB |")
    print("|---|---|---|---|---|---|")
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    achieved = flops / seconds / 1e12
    print(f"| {seconds * 1e3:.1f} | {args.batch * (prefix + suffix) / seconds:,.0f} | {flops / 1e12:.2f} | "
          f"{achieved:.1f} | {100 * achieved / args.peak_tflops:.1f}% | {memory:.1f} |")


if __name__ == "__main__":
    main()
