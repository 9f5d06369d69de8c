"""bfloat16 against float32 on one batch, and how far sampling drifts from scoring under bf16.

    python bench/dtype.py            # 2 prompts x 4 samples, 64 tokens, SmolLM2 on this machine

1. Step time on the same batch: the default step's parts (sample 64 tokens for 2 prompts x G 4, the
   frozen reference, the policy's forward and backward, AdamW, the bf16 copy's refresh), float32 and
   bfloat16 alternately, median of 3 each. EOS is never drawn, so both sample exactly 64 tokens.
2. Under bf16, the sampler (bf16 weights, token by token) and the scorer (float32 weights under bf16
   autocast, whole rows) are different numbers: the mean |log p_sampling - log p_scoring| per
   response token over the first steps of the default run.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_parts(policy, dtype, batch, cfg, optimizer) -> dict:
    sampler = policy if dtype == torch.float32 else copy.deepcopy(policy).to(dtype).requires_grad_(False)
    reference = copy.deepcopy(sampler).requires_grad_(False)
    rows = slice(0, len(batch.texts))

    def update():
        with torch.autocast("cpu", torch.bfloat16, enabled=sampler is not policy):
            logp = batch.logprobs(policy, rows, cfg.temperature)
        logp.sum().backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sampler is not policy:
            sampler.load_state_dict(policy.state_dict())

    with torch.no_grad():
        parts = {"sample": timed(lambda: balto.sample(sampler, batch.prompt_ids, batch.prompt_mask, cfg.group_size,
                                                      cfg.temperature, cfg.max_new_tokens, -1)),  # no EOS
                 "reference": timed(lambda: batch.logprobs(reference, rows, cfg.temperature))}
    parts["update"] = timed(update)
    return parts


def step_time() -> None:
    cfg = balto.Config()
    policy, tokenizer = balto.load_policy(cfg.model)
    policy.eval()
    items = balto.load_items(cfg.data[0])[:cfg.prompts_per_step]  # the written set
    torch.manual_seed(0)
    batch = balto.rollout(policy, tokenizer, items, cfg.group_size, cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0, fused=True)  # lr 0: the weights stay
    times = {torch.float32: [], torch.bfloat16: []}
    for _ in range(3):
        for dtype in times:
            times[dtype].append(step_parts(policy, dtype, batch, cfg, optimizer))
    tokens = int(batch.mask.sum())
    print(f"one batch: {len(batch.texts)} responses, {tokens} scored tokens, {cfg.max_new_tokens} sampled each")
    median = {}
    for dtype, runs in times.items():
        parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        median[dtype] = statistics.median(sum(r.values()) for r in runs)
        print(f"{str(dtype)[6:]:>9}: step {median[dtype]:.2f} s (" +
              ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) + ")")
    print(f"bf16 / float32: {median[torch.bfloat16] / median[torch.float32]:.2f}")


def sampling_gap(steps: int) -> None:
    """Record each sampled token's probability, then compare with the epoch-0 scoring log-probs."""
    drawn, gaps = [], []
    real_multinomial, real_rollout, real_loss = torch.multinomial, balto.rollout, balto.policy_loss

    def multinomial(probs, n, generator=None):
        token = real_multinomial(probs, n, generator=generator)
        drawn.append((token.squeeze(-1), probs.gather(-1, token).log().squeeze(-1)))
        return token

    def rollout(*args, **kwargs):
        drawn.clear()
        batch = real_rollout(*args, **kwargs)
        ids, logp = (torch.stack(x, 1) for x in zip(*drawn))  # (B, steps)
        batch.sampled = (ids, logp)
        rollout.batch = batch
        return batch

    def policy_loss(logp, old_logp, *args, **kwargs):
        batch, (ids, sampled) = rollout.batch, rollout.batch.sampled
        n = min(ids.shape[1], batch.response_ids.shape[1])
        same = (ids[:, :n] == batch.response_ids[:, :n]) | ~batch.mask[:, :n].bool()
        keep = batch.mask[:, :n].bool() & same.all(-1, keepdim=True)  # rows the re-encoding kept as drawn
        gaps.append((old_logp[:, :n] - sampled[:, :n]).abs()[keep])
        return real_loss(logp, old_logp, *args, **kwargs)

    torch.multinomial, balto.rollout, balto.policy_loss = multinomial, rollout, policy_loss
    balto.main(["--dtype", "bfloat16", "--steps", str(steps), "--no-eval-before", "--eval-size", "1",
                "--eval-samples", "1", "--show-every", "0", "--output-dir", "runs/dtype-gap"])
    gap = torch.cat(gaps)
    print(f"bf16 sampling against scoring, {steps} default steps, {len(gap)} tokens: mean |log p_sampling - "
          f"log p_scoring| {float(gap.mean()):.4f}, median {float(gap.median()):.4f}, max {float(gap.max()):.3f}")


if __name__ == "__main__":
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    step_time()
    sampling_gap(10)
