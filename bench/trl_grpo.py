"""The work of `python balto.py --model DIR --steps 8 --eval-size 2 --eval-samples 1`, done by TRL's GRPOTrainer.

Same model, training prompts (balto's split and prompt template), G = 4 samples for each of 2 prompts
per step, at most 64 new tokens, temperature 0.7 with no top-k / top-p, KL weight 0.2 (balto.py's default),
learning rate 2e-5, one update per rollout, gradient checkpointing and bf16 as asked; the reward is
balto's own claims + MiniLM verifier (share of supported claims). Prints each step's wall time and
the median. Run it from the repository root, in a virtual environment of its own (bench/README.md):
TRL is never a dependency of balto.py. On a CUDA machine it trains on the GPU, as balto.py does.

    python bench/trl_grpo.py runs/smollm2-f32 [--bf16] [--gradient-checkpointing]

--bf16 is TRL's (the Trainer's) mixed precision: bfloat16 autocast on float32 master weights.
"""
import statistics
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402  (only its data, prompt, claims and verifier functions)

model_dir = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
train, _ = balto.split_items(balto.load_items("data_sample.jsonl"), 2, "data_sample.jsonl")
prompts = Dataset.from_list([{"prompt": balto.build_prompt(tokenizer, item), "context": item["context"],
                              "question": item["question"]} for item in train])
verifier = balto.make_verifier("minilm", balto.pick_device("auto"))  # where balto.py puts it


def supported_share(completions, context, question, **_):
    """balto's response reward r_i: the share of the response's claims that the verifier supports."""
    items = [{"context": c, "question": q} for c, q in zip(context, question)]
    verdict = balto.judge_responses(verifier, items, completions, [[] for _ in completions],  # no token labels
                                    balto.Config.support_threshold, "supported")
    return balto.response_rewards(verdict.verdicts, "supported").tolist()


class StepTimer(TrainerCallback):
    def __init__(self):
        self.start, self.seconds = 0.0, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


config = GRPOConfig(output_dir="runs/trl-bench", max_steps=8, per_device_train_batch_size=8, num_generations=4,
                    gradient_accumulation_steps=1, max_completion_length=64, temperature=0.7, top_p=1.0, top_k=0,
                    beta=0.2, learning_rate=2e-5, num_iterations=1, logging_steps=1, report_to="none",
                    save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16="--bf16" in sys.argv, seed=0,
                    gradient_checkpointing="--gradient-checkpointing" in sys.argv)  # TRL's default: on
timer = StepTimer()
GRPOTrainer(model=model_dir, reward_funcs=supported_share, args=config, train_dataset=prompts,
            processing_class=tokenizer, callbacks=[timer]).train()
print("trl step seconds:", [round(s, 2) for s in timer.seconds])
print(f"trl median step: {statistics.median(timer.seconds):.2f} s over {len(timer.seconds)} steps")
