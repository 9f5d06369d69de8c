"""Checks of peers/tlpo.py: the advantage and the loss against naive loops, the error position against balto.py's
log-probs, the greedy continuation against generate, and one in-process run. Run with the rest: python -m pytest -q
"""
import json

import pytest
import torch

import balto
import tlpo
from test_balto import SMOKE, grouped_batch, tiny, tiny_dir  # noqa: F401 (fixtures)


def naive_advantages(p, rewards):
    out = torch.zeros_like(p)
    for e in range(p.shape[0]):
        mu = sum(p[e, j] * rewards[e, j] for j in range(p.shape[1])) / sum(p[e])
        total = sum(p[e, k] * abs(rewards[e, k] - mu) for k in range(p.shape[1]))
        for j in range(p.shape[1]):
            out[e, j] = p[e, j] * (rewards[e, j] - mu) / total if total > 0 else 0.0
    return out


def test_advantages_match_the_paper_and_a_naive_loop():
    torch.testing.assert_close(tlpo.tlpo_advantages(torch.tensor([[.5, .3, .2]]), torch.tensor([[1., -1., 1.]])),
                               torch.tensor([[.3 / .84, -.42 / .84, .12 / .84]]))
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(5, 16, generator=gen) / 16
    rewards = torch.where(torch.rand(5, 16, generator=gen) > 0.5, 1.0, -1.0)
    rewards[3] = 1.0  # every candidate right: nothing to learn at that position
    ours = tlpo.tlpo_advantages(p, rewards)
    torch.testing.assert_close(ours, naive_advantages(p, rewards))
    assert torch.all(ours[3] == 0)
    mixed = [e for e in range(5) if e != 3]
    torch.testing.assert_close(ours[mixed].abs().sum(-1), torch.ones(4))  # each position moves one unit
    torch.testing.assert_close((ours[mixed] * 0 + ours[mixed]).sum(-1), torch.zeros(4), atol=1e-6, rtol=0)


def test_first_errors_find_the_first_unsupported_token():
    labels = torch.tensor([[1, 1, -1, -1], [1, 0, 0, 0], [0, -1, 0, 1], [0, 0, 0, -1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    assert tlpo.first_errors(labels, mask) == [(0, 2), (2, 1)]  # row 3's only -1 is padding


def rollout_with_errors(tiny):
    model, tokenizer = tiny
    prompt_ids, prompt_mask, prompt_of, response_ids, response_mask = grouped_batch(tokenizer)
    items = [{"context": "The bridge has 12 lanes.", "question": "How many lanes?", "id": str(i)} for i in range(6)]
    return balto.Rollout(items=items, texts=[""] * 6, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                         prompt_of=prompt_of, response_ids=response_ids, mask=response_mask,
                         offsets=[[] for _ in range(6)], finished=[True] * 6,
                         sampler_logprobs=torch.zeros(response_ids.shape))


def test_the_error_position_scores_what_balto_scores_there(tiny):
    """The prefix ends right before the error: its next-token log-prob of the sampled token is the response's
    own log-prob at the error (balto.shared_prompt_logprobs, left padding and all)."""
    model, tokenizer = tiny
    batch = rollout_with_errors(tiny)
    errors = [(0, 3), (1, 0), (4, 5)]
    ids, mask = tlpo.prefixes(batch, errors)
    with torch.no_grad():
        logits, _ = tlpo.next_token_logits(model, ids, mask)
        full = balto.shared_prompt_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.prompt_of,
                                            batch.response_ids, batch.mask, 0.7)
    logp = torch.log_softmax(logits / 0.7, -1)
    for e, (row, t) in enumerate(errors):
        torch.testing.assert_close(logp[e, batch.response_ids[row, t]], full[row, t], atol=1e-5, rtol=1e-4)


def test_greedy_continuation_equals_generate_without_the_shared_cache(tiny):
    model, tokenizer = tiny
    batch = rollout_with_errors(tiny)
    errors = [(0, 3), (4, 5)]
    ids, mask = tlpo.prefixes(batch, errors)
    candidates = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.inference_mode():
        _, cache = tlpo.next_token_logits(model, ids, mask)
        ours = tlpo.continue_greedily(model, tokenizer, ids, mask, cache, candidates)
        full_ids = torch.cat([ids.repeat_interleave(3, 0), candidates.reshape(-1, 1)], 1)
        full_mask = torch.cat([mask.repeat_interleave(3, 0), torch.ones(6, 1, dtype=torch.long)], 1)
        theirs = model.generate(input_ids=full_ids, attention_mask=full_mask, do_sample=False,
                                max_new_tokens=tlpo.CONTINUATION, stop_strings=tlpo.CLAUSE_ENDS, tokenizer=tokenizer,
                                pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    assert torch.equal(ours, theirs[:, ids.shape[1]:])
    assert torch.equal(ours[:, 0], candidates.reshape(-1))  # each continuation starts with its candidate


def test_candidate_rewards_punish_unsupported_claims_only():
    item = {"context": "The bridge has 12 lanes and opened in 2018.", "question": "How many lanes?"}
    claims = ["The bridge has 12 lanes.", "The bridge has 14 lanes.", "The context does not say.", ""]
    rewards = tlpo.candidate_rewards(balto.RuleVerifier(), [item] * 4, claims, 0.35)
    assert rewards.tolist() == [1.0, -1.0, 1.0, 1.0]


def naive_tlpo_loss(logp, old_logp, ref_logp, advantages, eps, beta, n_pairs):
    total = 0.0
    for e in range(logp.shape[0]):
        for j in range(logp.shape[1]):
            ratio = torch.exp(logp[e, j] - old_logp[e, j])
            a = advantages[e, j]
            surrogate = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
            kl = torch.exp(ref_logp[e, j] - logp[e, j]) - (ref_logp[e, j] - logp[e, j]) - 1
            total = total + surrogate + beta * kl
    return total / n_pairs


def test_tlpo_loss_of_a_micro_batch_is_its_share_of_a_naive_loop():
    gen = torch.Generator().manual_seed(4)
    logp = (-torch.rand(3, 16, generator=gen) * 4).requires_grad_()
    old_logp = (logp + 0.3 * torch.randn(3, 16, generator=gen)).detach()
    ref_logp = -torch.rand(3, 16, generator=gen) * 4
    advantages = tlpo.tlpo_advantages(torch.rand(3, 16, generator=gen),
                                      torch.where(torch.rand(3, 16, generator=gen) > 0.5, 1.0, -1.0))
    objective = tlpo.TLPOObjective(error_rows=torch.tensor([0, 2, 5]), prefix_ids=None, prefix_mask=None,
                                   candidates=None, advantages=advantages, n_pairs=64, credit=None,
                                   credit_rms=1.0, temperature=1.0, clip_eps=0.2, kl_beta=0.1)
    rows = slice(0, 4)  # error rows 0 and 2 of the three
    assert objective.in_rows(rows).tolist() == [True, True, False]
    loss, _ = objective.loss(logp[:2], old_logp[:2], ref_logp[:2], rows)
    naive = naive_tlpo_loss(logp[:2], old_logp[:2], ref_logp[:2], advantages[:2], 0.2, 0.1, 64)
    torch.testing.assert_close(loss, naive)
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(naive, logp)[0])


def test_a_batch_without_errors_trains_nothing_and_logs_zeros():
    empty = torch.zeros((0, 16))
    objective = tlpo.TLPOObjective(error_rows=torch.zeros(0, dtype=torch.long), prefix_ids=None, prefix_mask=None,
                                   candidates=None, advantages=empty, n_pairs=0, credit=None, credit_rms=0.0,
                                   temperature=1.0, clip_eps=0.2, kl_beta=0.1)
    logp = torch.zeros((0, 16), requires_grad=True)
    loss, stats = objective.loss(logp, logp.detach(), logp.detach(), slice(0, 8))
    loss.backward()
    assert float(loss.detach()) == 0.0 and stats == {"kl": 0.0, "clipfrac": 0.0}


def test_tlpo_runs_in_balto_loop(tiny_dir, tmp_path):
    smoke = SMOKE[:]
    smoke[smoke.index("--max-new-tokens") + 1] = "16"  # long enough for claims and errors
    smoke[smoke.index("--steps") + 1] = "3"
    metrics = tlpo.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path), *smoke])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["objective"] == "tlpo_objective"
    steps = [r for r in log if r["event"] == "step"]
    assert len(steps) == 3 and metrics["after"]["data_sample"]["responses"] == 4
    for record in steps:  # credit only at an error position, on a token labelled unsupported
        example = record["example"]
        marked = [t for t, c in enumerate(example["credit"]) if c != 0]
        assert len(marked) <= 1 and all(example["labels"][t] == balto.MINUS for t in marked)


def test_tlpo_refuses_a_credit_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tlpo.main(["--credit", "token"])
    assert exit_info.value.code == 2 and "--credit does not apply to" in capsys.readouterr().err
