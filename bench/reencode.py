"""How often does re-encoding a sampled response give other ids than the policy drew?

    python bench/reencode.py [N_PROMPTS]

Before #35, rollout() decoded the sampled ids, stripped the text, re-encoded it and trained on the
re-encoded ids. This samples as training does (the untrained packaged policy, G 4, 64 tokens, the
first N_PROMPTS training prompts of the default settings, seed 0) and counts the responses whose
re-encoded ids differ from the sampled ones, and the tokens that differ.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402


def main(n_prompts: int) -> None:
    cfg = balto.Config()
    torch.manual_seed(0)
    train, _ = balto.load_settings(cfg.data, cfg.eval_size)
    prompts = train[:n_prompts]
    policy, tokenizer = balto.load_policy(cfg.model)
    policy.eval()
    differ = rows = tokens = changed = 0
    for start in range(0, len(prompts), 2):
        batch = balto.rollout(policy, tokenizer, prompts[start:start + 2], cfg.group_size, cfg,
                              torch.device("cpu"))
        eos = tokenizer.eos_token_id
        for row, text in enumerate(batch.texts):
            sampled = [i for i in batch.response_ids[row, :int(batch.mask[row].sum())].tolist()
                       if i != eos]
            again = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
            rows += 1
            tokens += len(sampled)
            if again != sampled:
                differ += 1
                changed += sum(a != b for a, b in zip(again, sampled))
                changed += abs(len(again) - len(sampled))
    print(f"{differ} of {rows} sampled responses re-encode to other ids "
          f"({changed} of {tokens} token positions differ)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32)
