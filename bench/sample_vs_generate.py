"""balto.sample against Hugging Face's generate on the same work: wall time and whether they draw alike.

    python bench/sample_vs_generate.py            # SmolLM2 (the default policy), 3 repeats each

The work is one training step's rollout: the first step's 2 prompts, G = 4 samples each, at most 64
new tokens, temperature 0.7, no top-k / top-p. generate gets each prompt G times (num_return_sequences
does the same); balto.sample encodes each prompt once and copies its cache to the G rows. Both draw
from torch's global stream, seeded alike, so the tokens can be compared one to one.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402

cfg = balto.Config()
policy, tokenizer = balto.load_policy(cfg.model)
policy.eval()
train, _ = balto.split_items(balto.load_items(cfg.data[0]), cfg.eval_size, cfg.data[0])  # the written set
tokenizer.padding_side = "left"
enc = balto.tokenize_prompts(tokenizer, train[:cfg.prompts_per_step], return_tensors="pt", padding=True)
G, eos = cfg.group_size, tokenizer.eos_token_id


def ours():
    return balto.sample(policy, enc.input_ids, enc.attention_mask, G, cfg.temperature, cfg.max_new_tokens, eos)[0]


@torch.inference_mode()
def theirs():
    out = policy.generate(input_ids=enc.input_ids.repeat_interleave(G, 0),
                          attention_mask=enc.attention_mask.repeat_interleave(G, 0), do_sample=True,
                          temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                          pad_token_id=eos, eos_token_id=eos)
    return out[:, enc.input_ids.shape[1]:]


times, draws = {"balto.sample": [], "generate": []}, {}
for repeat in range(3):
    for name, fn in (("balto.sample", ours), ("generate", theirs)):
        torch.manual_seed(repeat)
        start = time.perf_counter()
        tokens = fn()
        times[name].append(time.perf_counter() - start)
        draws.setdefault(repeat, []).append(tokens)
same = all(a.shape == b.shape and torch.equal(a, b) for a, b in draws.values())
for name, ts in times.items():
    print(f"{name:>13}: median {statistics.median(ts):.2f} s over {len(ts)} rollouts "
          f"({', '.join(f'{t:.2f}' for t in ts)})")
print(f"same tokens, seed for seed: {same} (rows x tokens per rollout: "
      f"{', '.join(str(tuple(d[0].shape)) for d in draws.values())})")
