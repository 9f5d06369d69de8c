"""BALTO credit on verl 0.9.1, through its public extension points. Tested at the seam on CPU only.

balto.py stays the one place where the method lives: this module imports its claims, verifier,
projection and credit, and adds only what verl needs to call them. verl imports it in each of its
processes when `VERL_USE_EXTERNAL_MODULES=scale.verl_balto` is set (README "Scaling out").

- Advantage estimators `balto` (balanced credit, `balto.balanced_credit`) and `balto_token` (the
  unbalanced baseline, `balto.token_credit`), chosen with `algorithm.adv_estimator=balto`. They read the
  token labels (+1 / 0 / -1) from `token_level_rewards`. The response-level baseline is verl's own
  `grpo` with the reward below.
- Reward manager `balto` (`reward.reward_manager.name=balto`): for each response, balto's claims ->
  verifier -> projection onto the response's own token ids; its reward_score is balto's response reward
  r_i, and the labels ride along in reward_extra_info["balto_labels"].
- The one override: verl 0.9.1 writes one scalar per response (at its last token) into the reward
  tensor. `carry_labels` wraps `ray_trainer.compute_advantage` so that, for the balto estimators only,
  `token_level_rewards` becomes the labels carried in reward_extra_info; `token_level_scores`, and with
  them verl's reward metrics, stay r_i. Put the KL in the loss (`actor.use_kl_loss=True`), not in the
  reward (`algorithm.use_kl_in_reward=False`): the labels replace the reward tensor.
"""
import functools
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402

from verl.experimental.reward_loop.reward_manager import register as register_reward_manager  # noqa: E402
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase  # noqa: E402
from verl.trainer.ppo import core_algos, ray_trainer  # noqa: E402

ESTIMATORS = ("balto", "balto_token")


# ------------------------------------------------------------------------------------------------
# Labels: balto's steps 3-5 on the token ids verl sampled
# ------------------------------------------------------------------------------------------------
def response_labels(tokenizer, ids: list[int], item: dict, verifier,
                    threshold: float = balto.Config.support_threshold,
                    reward: str = balto.Config.reward) -> tuple[list[int], float]:
    """(token labels of the response ids, response reward r_i): balto.judge_responses and balto.response_rewards.

    item holds the context and the question the response answers (a bare answer is checked with its question).
    """
    text, offsets = balto.token_spans(tokenizer, ids)  # the same spans as balto.rollout() reads
    verdict = balto.judge_responses(verifier, [item], [text], [offsets], threshold, reward)
    return verdict.labels[0, :len(ids)].tolist(), float(balto.response_rewards(verdict.verdicts, reward)[0])


@register_reward_manager("balto")
class BaltoRewardManager(RewardManagerBase):
    """One response per call, as verl's naive manager; the context and question come from the row's extra_info."""

    verifier = None  # one per process, loaded on first use

    def __init__(self, config, tokenizer, compute_score=None, **kwargs):
        super().__init__(config, tokenizer, compute_score)
        if BaltoRewardManager.verifier is None:
            BaltoRewardManager.verifier = balto.make_verifier(os.environ.get("BALTO_VERIFIER", "minilm"),
                                                              torch.device("cpu"))

    async def run_single(self, data) -> dict:
        item = data[-1]
        response = item.batch["responses"]
        length = int(item.batch["attention_mask"][-response.shape[-1]:].sum())
        extra = item.non_tensor_batch["extra_info"]
        asked = {"context": extra["context"], "question": extra.get("question", "")}
        labels, reward = await self.loop.run_in_executor(
            None, response_labels, self.tokenizer, response[:length].tolist(), asked, self.verifier)
        # a string, not a list: verl stacks reward_extra_info into a numpy array, and responses differ in length
        return {"reward_score": reward, "reward_extra_info": {"balto_labels": " ".join(map(str, labels))}}


# ------------------------------------------------------------------------------------------------
# Credit: balto's functions as verl advantage estimators
# ------------------------------------------------------------------------------------------------
@core_algos.register_adv_est("balto")
def balanced_advantage(token_level_rewards, response_mask, config=None, index=None, **kwargs):
    """BALTO's balanced credit on the labels in token_level_rewards: (advantages, returns), both (B, T)."""
    credit = balto.balanced_credit(token_level_rewards.round().long(), response_mask)
    return credit, credit


@core_algos.register_adv_est("balto_token")
def token_advantage(token_level_rewards, response_mask, config=None, index=None, **kwargs):
    """The unbalanced token-level baseline: each token's label is its advantage."""
    credit = balto.token_credit(token_level_rewards.round().long(), response_mask)
    return credit, credit


def labels_tensor(strings: np.ndarray, response_mask: torch.Tensor) -> torch.Tensor:
    """reward_extra_info["balto_labels"] strings -> (B, T) labels, 0 past each response's labels."""
    labels = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    for i, row in enumerate(strings):
        values = [int(v) for v in str(row).split()][:labels.shape[1]]
        labels[i, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return labels * response_mask


def carry_labels(compute_advantage):
    """Wrap verl's compute_advantage: for the balto estimators, token_level_rewards := the carried labels."""

    @functools.wraps(compute_advantage)
    def with_labels(data, adv_estimator, *args, **kwargs):
        if adv_estimator in ESTIMATORS:
            if "balto_labels" not in data.non_tensor_batch:
                raise ValueError(f"adv_estimator={adv_estimator} needs reward.reward_manager.name=balto "
                                 "(no balto_labels in the batch)")
            data.batch["token_level_rewards"] = labels_tensor(data.non_tensor_batch["balto_labels"],
                                                              data.batch["response_mask"])
        return compute_advantage(data, adv_estimator, *args, **kwargs)

    with_labels.carries_balto_labels = True
    return with_labels


if not getattr(ray_trainer.compute_advantage, "carries_balto_labels", False):  # import twice, wrap once
    ray_trainer.compute_advantage = carry_labels(ray_trainer.compute_advantage)


# ------------------------------------------------------------------------------------------------
# Data: balto's JSONL and held-out split as verl's parquet rows
# ------------------------------------------------------------------------------------------------
def verl_row(item: dict) -> dict:
    """One balto item as a verl RL row: chat prompt (balto's instruction), the context and question in extra_info."""
    body = f"{balto.INSTRUCTION}\n\nContext: {item['context']}\nQuestion: {item['question']}"
    return {"data_source": "balto", "prompt": [{"role": "user", "content": body}],
            "reward_model": {"style": "rule", "ground_truth": item.get("answer", "")},
            "extra_info": {"context": item["context"], "question": item["question"], "id": item["id"]}}


def write_parquet(data: str, out_dir: str, eval_size: int = balto.Config.eval_size) -> None:
    """train.parquet and val.parquet from a balto JSONL file, with balto.py's fixed held-out split."""
    import pandas as pd

    train, held_out = balto.split_items(balto.load_items(data), eval_size, data)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name, items in (("train", train), ("val", held_out)):
        pd.DataFrame([verl_row(item) for item in items]).to_parquet(Path(out_dir) / f"{name}.parquet")
        print(f"{Path(out_dir) / name}.parquet: {len(items)} rows")


if __name__ == "__main__":  # python scale/verl_balto.py data_sample.jsonl data/balto
    write_parquet(sys.argv[1], sys.argv[2])
