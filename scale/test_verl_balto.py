"""Seam tests: verl 0.9.1's own functions against balto.py's on the same inputs. CPU only, no ray cluster.

Run in an environment with verl's pins (README "Scaling out"); in balto.py's own environment they skip.

    python -m pytest -q scale
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos, ray_trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402
from scale import verl_balto  # noqa: E402

LABELS = torch.tensor([[1, 1, -1, 0, 1, 0], [-1, -1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
UID = np.array(["a", "a", "b", "b"], dtype=object)  # verl's group index: rows of one prompt share a uid


def batch(token_level_rewards, extra=None):
    non_tensors = {"uid": UID, **(extra or {})}
    return DataProto.from_dict(tensors={"token_level_rewards": token_level_rewards.float(), "response_mask": MASK},
                               non_tensors=non_tensors)


def test_verl_compute_advantage_with_the_registered_estimators_equals_balto_credit():
    verl_compute_advantage = ray_trainer.compute_advantage.__wrapped__  # verl's own, labels already in place
    out = verl_compute_advantage(batch(LABELS * MASK), adv_estimator="balto", config=AlgoConfig())
    torch.testing.assert_close(out.batch["advantages"], balto.balanced_credit(LABELS, MASK))
    out = verl_compute_advantage(batch(LABELS * MASK), adv_estimator="balto_token", config=AlgoConfig())
    torch.testing.assert_close(out.batch["advantages"], balto.token_credit(LABELS, MASK))


def test_labels_in_reward_extra_info_reach_the_estimator_and_scores_stay_the_reward():
    """verl writes r_i at each response's last token; the wrapped compute_advantage puts the labels in its place."""
    rewards = torch.tensor([0.5, 0.0, 1.0, 0.5])
    last = MASK.sum(-1) - 1
    scalar = torch.zeros(MASK.shape)
    scalar[torch.arange(4), last] = rewards
    strings = np.array([" ".join(str(v) for v in row[:int(n)].tolist()) for row, n in zip(LABELS, MASK.sum(-1))],
                       dtype=object)
    data = batch(scalar, {"balto_labels": strings})
    out = ray_trainer.compute_advantage(data, adv_estimator="balto", config=AlgoConfig())
    torch.testing.assert_close(out.batch["advantages"], balto.balanced_credit(LABELS, MASK))
    # verl's own GRPO on the same batch ignores the labels and sees r_i; it equals balto's response credit
    # up to the constant that keeps a flat group at zero (verl 1e-6, balto 1e-4)
    grpo = ray_trainer.compute_advantage(batch(scalar, {"balto_labels": strings}), adv_estimator="grpo",
                                         config=AlgoConfig())
    torch.testing.assert_close(grpo.batch["advantages"], balto.response_credit(rewards, MASK, 2), atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="reward_manager.name=balto"):
        ray_trainer.compute_advantage(batch(scalar), adv_estimator="balto", config=AlgoConfig())


def test_wrapping_is_idempotent():
    assert ray_trainer.compute_advantage.carries_balto_labels
    assert not getattr(ray_trainer.compute_advantage.__wrapped__, "carries_balto_labels", False)


ACTOR = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0,
                          "global_batch_info": {}})


def verl_loss(logp, old_logp, ref_logp, advantages, mask, kl_coef):
    """What verl's actor minimises with loss_agg_mode=token-mean, use_kl_loss=True, kl_loss_type=low_var_kl."""
    pg_loss, _ = core_algos.compute_policy_loss_vanilla(old_logp, logp, advantages, mask, "token-mean", config=ACTOR)
    kl = core_algos.agg_loss(core_algos.kl_penalty(logp, ref_logp, "low_var_kl"), mask, "token-mean")
    return pg_loss + kl_coef * kl


def losses_and_grads(ratio_spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    old_logp = -torch.rand(4, 6, generator=g) * 3
    logp = (old_logp + (torch.rand(4, 6, generator=g) - 0.5) * ratio_spread).requires_grad_()
    ref_logp = old_logp + (torch.rand(4, 6, generator=g) - 0.5)
    advantages = balto.balanced_credit(LABELS, MASK) + 0.3 * torch.randn(4, 6, generator=g) * MASK
    ours, _ = balto.policy_loss(logp, old_logp, ref_logp, advantages, MASK, clip_eps=0.2, kl_beta=0.05)
    theirs = verl_loss(logp, old_logp, ref_logp, advantages, MASK.float(), kl_coef=0.05)
    return ours, theirs, torch.autograd.grad(ours, logp)[0], torch.autograd.grad(theirs, logp)[0]


def test_verl_token_mean_loss_with_low_var_kl_equals_balto_policy_loss():
    """Ratios inside exp(+-1): verl's dual clip (ratio 3) and its clamps (|log ratio| 20, k3 10) never act."""
    ours, theirs, our_grad, their_grad = losses_and_grads(ratio_spread=2.0)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)


def test_verl_dual_clip_is_the_one_difference():
    """With ratios far above 3 on negative advantages verl's dual clip caps the loss where balto's does not."""
    ours, theirs, _, _ = losses_and_grads(ratio_spread=6.0, seed=1)
    assert not torch.isclose(ours, theirs)


# ------------------------------------------------------------------------------------------------
# The label path on a tiny tokenizer: what the reward manager computes is what balto.judge computes
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [line for line in (Path(balto.__file__).parent / "data_sample.jsonl").read_text().splitlines()]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


CONTEXT = "Vantor Steel cut 1,400 jobs in 2023 after demand from car makers fell by 12 percent."
QUESTION = "How many jobs did Vantor Steel cut?"
RESPONSES = ["Vantor Steel cut 1,400 jobs in 2023. The cuts were made in Graz.",
             "Demand fell by 12 percent; the context does not say more.",
             "Thanks!"]


def balto_labels(tokenizer, text):
    """balto.py's own path: rollout()'s spans of the sampled ids, then judge()."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text, offsets = balto.token_spans(tokenizer, ids)
    rollout = balto.Rollout(items=[{"context": CONTEXT, "question": QUESTION}], texts=[text], prompt_ids=torch.zeros(1, 1, dtype=torch.long),
                            prompt_mask=torch.ones(1, 1, dtype=torch.long), prompt_of=torch.zeros(1, dtype=torch.long),
                            response_ids=torch.tensor([ids]), mask=torch.ones(1, len(ids), dtype=torch.long),
                            offsets=[offsets], finished=[True], sampler_logprobs=torch.zeros(1, len(ids)))
    verdict = balto.judge(balto.RuleVerifier(), rollout, balto.Config.support_threshold, balto.Config.reward)
    return ids, verdict.labels[0].tolist(), float(balto.response_rewards(verdict.verdicts, balto.Config.reward)[0])


@pytest.mark.parametrize("text", RESPONSES)
def test_reward_manager_labels_equal_balto_judge(tokenizer, text):
    ids, expected, expected_reward = balto_labels(tokenizer, text)
    labels, reward = verl_balto.response_labels(tokenizer, ids, {"context": CONTEXT, "question": QUESTION},
                                                balto.RuleVerifier())
    assert labels == expected and reward == expected_reward
    assert any(labels) or text == "Thanks!"  # the first two have claims, so the comparison is not all zeros


def test_spans_of_ids_that_re_encoding_would_not_give(tokenizer):
    text = RESPONSES[0]  # ASCII: one byte per character
    byte_level = "".join(tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]))
    ids = [tokenizer.convert_tokens_to_ids(c) for c in byte_level]  # one token per byte: the same text, other ids
    assert tokenizer.decode(ids) == text and ids != tokenizer(text)["input_ids"]
    assert balto.token_spans(tokenizer, ids) == (text, [(k, k + 1) for k in range(len(text))])


def test_reward_manager_run_single_returns_r_i_and_the_labels(tokenizer):
    verl_balto.BaltoRewardManager.verifier = balto.RuleVerifier()  # no encoder weights in this test
    manager = verl_balto.BaltoRewardManager(config=None, tokenizer=tokenizer)
    ids, expected, expected_reward = balto_labels(tokenizer, RESPONSES[0])
    responses = torch.tensor([ids + [0, 0]])  # right-padded to the batch's response length
    attention = torch.tensor([[1, 1] + [1] * len(ids) + [0, 0]])  # a 2-token prompt, then the response
    data = DataProto.from_dict(tensors={"responses": responses, "attention_mask": attention},
                               non_tensors={"extra_info": np.array([{"context": CONTEXT, "question": QUESTION}],
                                                                   dtype=object)})
    out = manager.loop.run_until_complete(manager.run_single(data))
    assert out["reward_score"] == expected_reward
    assert [int(v) for v in out["reward_extra_info"]["balto_labels"].split()] == expected


def test_parquet_rows_carry_the_context_and_keep_balto_split(tmp_path):
    import pandas as pd

    verl_balto.write_parquet(str(Path(balto.__file__).parent / "data_sample.jsonl"), str(tmp_path))
    train, val = pd.read_parquet(tmp_path / "train.parquet"), pd.read_parquet(tmp_path / "val.parquet")
    items = balto.load_items(str(Path(balto.__file__).parent / "data_sample.jsonl"))
    _, held_out = balto.split_items(items, balto.Config.eval_size, "data_sample.jsonl")
    assert len(val) == len(held_out) and len(train) + len(val) == len(items)
    assert list(val["extra_info"].map(lambda e: e["id"])) == [item["id"] for item in held_out]
    assert val["extra_info"][0]["context"] in val["prompt"][0][0]["content"]
    assert val["extra_info"][0]["question"] in val["prompt"][0][0]["content"]
