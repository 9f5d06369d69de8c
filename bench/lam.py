"""lambda of balanced-group, by README's rule 3: neither part of its credit dominates.

    python bench/lam.py bench/dev.jsonl [REWARD]

On prompts the comparison does not report, the untrained policy's G samples per prompt (default
sampling, seed 0) are judged as in training. balanced-group is a transfer part (lam / N+- on labelled
tokens) plus the group part g_i / L_i; the transfer part is proportional to lambda, so lambda =
RMS(group part) / RMS(transfer part at lambda 1), the RMS over every response token, as matched scale
takes it. Printed to two significant digits. (Rule 3 also gave zero-sum, removed by the rule after its
runs, lambda 1.6: this script at commit b8bccb0.) --lam's default, 0.69, was measured at commit
d7e7929 under v3's reward (`python bench/lam.py bench/dev.jsonl supported` today); REWARD defaults
to balto.py's default reward, under which rule 10 measured its lambda (docs/results.md).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402


def main(data: str, reward: str) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cfg = balto.Config()
    device = balto.pick_device(cfg.device)
    torch.manual_seed(0)
    policy, tokenizer = balto.load_policy(cfg.model)
    policy.to(device).eval()
    dtype = balto.pick_dtype(cfg.dtype, device)  # sampled as training samples: the bf16 copy where native
    sampler = policy if dtype == torch.float32 else policy.to(dtype)
    verifier = balto.make_verifier(cfg.verifier, device)
    items = balto.load_items(data)
    group_sq = transfer_sq = 0.0  # sums of squares over response tokens
    for start in range(0, len(items), 8):
        batch = balto.rollout(sampler, tokenizer, items[start:start + 8], cfg.group_size, cfg, device)
        verdict = balto.judge(verifier, batch, cfg.support_threshold, reward)
        rewards = balto.response_rewards(verdict.verdicts, reward)
        labels, mask = verdict.labels.to(device), batch.mask
        group = balto.balanced_group_credit(labels, mask, rewards, cfg.group_size, 0.0)  # lam 0: g_i / L_i
        transfer = balto.balanced_credit(labels, mask)  # balanced-group's other part, at lam 1
        group_sq += float((group * mask).pow(2).sum())
        transfer_sq += float((transfer * mask).pow(2).sum())
    lam = math.sqrt(group_sq / transfer_sq)
    print(f"balanced-group: lambda {float(f'{lam:.2g}')} (RMS ratio {lam:.4f}; "
          f"{len(items)} prompts x {cfg.group_size}; reward {reward})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else balto.Config().reward)
