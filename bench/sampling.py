"""Decoding time a token: balto.sample (the eager loop) against StaticCacheSampler (a static cache and
a compiled decode step, what balto.py uses on CUDA), on the default work.

    python bench/sampling.py            # SmolLM2 in bfloat16 where the hardware has it, else float32

The work is one training step's sampling: 2 prompts, G = 4 samples each, 64 new tokens (EOS is never
drawn, so every repeat decodes all 64), temperature 0.7. Each sampler runs once to warm up (the
compiled one compiles then) and 3 times timed; the median is printed, in ms a decoded token.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402


def timed(function) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cfg = balto.Config()
    device = balto.pick_device(cfg.device)
    dtype = balto.pick_dtype(cfg.dtype, device)
    policy, tokenizer = balto.load_policy(cfg.model)
    model = policy.to(device, dtype).eval()
    tokenizer.padding_side = "left"
    items = balto.load_items(cfg.data[0])[:cfg.prompts_per_step]  # the written set
    enc = balto.tokenize_prompts(tokenizer, items, return_tensors="pt", padding=True).to(device)
    samplers = {"sample (eager loop)": balto.sample,
                "StaticCacheSampler": balto.StaticCacheSampler().sample}
    for name, sample_fn in samplers.items():
        def draw():
            sample_fn(model, enc.input_ids, enc.attention_mask, cfg.group_size, cfg.temperature,
                      cfg.max_new_tokens, -1)  # no EOS: every row decodes max_new_tokens
        warm_up = timed(draw)
        seconds = statistics.median(timed(draw) for _ in range(3))
        rows = cfg.prompts_per_step * cfg.group_size
        print(f"{name}: {1000 * seconds / cfg.max_new_tokens:.1f} ms a token for {rows} rows "
              f"({seconds:.2f} s for {cfg.max_new_tokens} tokens; first call {warm_up:.1f} s) "
              f"on {device} ({str(dtype)[6:]})", flush=True)


if __name__ == "__main__":
    main()
