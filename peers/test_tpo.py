"""Checks of peers/tpo.py: the token weights and the loss against naive loops, its scores against balto.py's
full-row log-probs with and without the context, and one in-process run. Run with the rest: python -m pytest -q
"""
import json

import pytest
import torch

import balto
import tpo
from test_balto import SMOKE, tiny, tiny_dir  # noqa: F401 (fixtures)


def test_token_weights_match_the_paper_and_a_naive_loop():
    s = torch.tensor([[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    weights = tpo.token_weights(s, torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.3808], [1.0, 0.6192], [1.0, 1.0]]), atol=1e-4,
                               rtol=0)
    g = torch.randn(6, generator=torch.Generator().manual_seed(0))
    g[2] = 0.0
    s = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)) * 3
    expected = torch.ones(6, 5)
    for i in range(6):
        for t in range(5):
            sigmoid = 1 / (1 + torch.exp(-s[i, t]))
            if g[i] > 0:
                expected[i, t] = 0.5 + sigmoid
            elif g[i] < 0:
                expected[i, t] = 0.5 + 1 - sigmoid
    torch.testing.assert_close(tpo.token_weights(s, g), expected)


def naive_tpo_loss(logp, free, old_logp, old_free, ref_logp, g, credit, mask, eps, beta):
    """TPO's clipped surrogate written out token by token: ratio rho * c / c_old, KL on the policy alone."""
    total, n = 0.0, mask.sum()
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            c = tpo.token_weights((logp[i, t] - free[i, t]).view(1, 1), g[i].view(1))[0, 0]
            c_old = tpo.token_weights((old_logp[i, t] - old_free[i, t]).view(1, 1), g[i].view(1))[0, 0]
            ratio = torch.exp(logp[i, t] - old_logp[i, t]) * c / c_old
            surrogate = -torch.min(ratio * credit[i, t], torch.clamp(ratio, 1 - eps, 1 + eps) * credit[i, t])
            kl = torch.exp(ref_logp[i, t] - logp[i, t]) - (ref_logp[i, t] - logp[i, t]) - 1
            total = total + surrogate + beta * kl
    return total / n


def test_tpo_loss_and_its_gradient_equal_a_naive_per_token_loop():
    gen = torch.Generator().manual_seed(2)
    shape = (4, 6)
    logp = (-torch.rand(shape, generator=gen) * 3).requires_grad_()
    free = (-torch.rand(shape, generator=gen) * 3).requires_grad_()
    old_logp = (logp + 0.3 * torch.randn(shape, generator=gen)).detach()  # a second epoch: the ratio is not 1
    old_free = (free + 0.3 * torch.randn(shape, generator=gen)).detach()
    ref_logp = -torch.rand(shape, generator=gen) * 3
    g = torch.tensor([1.2, -0.7, 0.0, 0.4])
    credit = g[:, None].expand(shape).clone()
    mask = torch.ones(shape)
    mask[1, 4:] = 0
    objective = tpo.TPOObjective(credit=credit, credit_rms=1.0, g=g, mask=mask, n_tokens=mask.sum(),
                                 free_ids=None, free_mask=None, temperature=1.0, clip_eps=0.2, kl_beta=0.1,
                                 token_logs={"s": torch.zeros(shape)})
    loss, _ = objective.loss((logp, free), (old_logp, old_free), ref_logp, slice(0, 4))
    grads = torch.autograd.grad(loss, (logp, free))
    naive = naive_tpo_loss(logp, free, old_logp, old_free, ref_logp, g, credit, mask, 0.2, 0.1)
    naive_grads = torch.autograd.grad(naive, (logp, free))
    torch.testing.assert_close(loss, naive)
    for ours, theirs in zip(grads, naive_grads):
        torch.testing.assert_close(ours, theirs)
    assert grads[1][0].abs().sum() > 0 and torch.all(grads[1][2] == 0)  # c has gradient; g = 0 gives c = 1
    torch.testing.assert_close(objective.token_logs["s"], old_logp - old_free)


def test_tpo_scores_are_full_row_log_probs_with_and_without_the_context(tiny):
    model, tokenizer = tiny
    items = [{"context": "The bridge has 12 lanes.", "question": "How many lanes?", "id": "a"},
             {"context": "Ana Ruiz opened the new wing in March.", "question": "Who opened it?", "id": "b"}]
    cfg = balto.Config(group_size=2, max_new_tokens=6)
    torch.manual_seed(0)
    batch = balto.rollout(model, tokenizer, items, 2, cfg, torch.device("cpu"))
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    objective = tpo.tpo_objective(batch, None, rewards, None, tokenizer, None, cfg)
    with torch.no_grad():
        logp, free = objective.score(model, batch, slice(0, 4))
    tokenizer.padding_side = "left"
    for prompts, ours in ((items, logp), (tpo.without_context(items), free)):
        enc = balto.tokenize_prompts(tokenizer, prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = balto.token_logprobs(model, enc.input_ids, enc.attention_mask, batch.prompt_of,
                                            batch.response_ids, batch.mask, cfg.temperature)
        kept = batch.mask.bool()
        torch.testing.assert_close(ours[kept], expected[kept], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logp[kept], free[kept])  # the context matters to the policy
    torch.testing.assert_close(objective.g, balto.group_advantage(rewards, 2))
    assert all("12 lanes" not in tokenizer.decode(row) for row in objective.free_ids)


def test_tpo_runs_in_balto_loop_and_logs_s_beside_the_labels(tiny_dir, tmp_path):
    metrics = tpo.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path), *SMOKE])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["objective"] == "tpo_objective" and log[0]["credit"] == "response"
    steps = [r for r in log if r["event"] == "step"]
    assert len(steps) == 2 and metrics["after"]["data_sample"]["responses"] == 4
    for record in steps:
        example = record["example"]
        assert len(example["s"]) == len(example["labels"]) == len(example["tokens"])
    assert any(abs(v) > 0 for record in steps for v in record["example"]["s"])


def test_tpo_refuses_a_credit_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tpo.main(["--credit", "balanced"])
    assert exit_info.value.code == 2 and "--credit does not apply to" in capsys.readouterr().err


def test_the_report_shows_s_beside_the_labels(tiny_dir, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("report", Path(balto.__file__).parent / "tools" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    tpo.main(["--model", str(tiny_dir), "--output-dir", str(tmp_path), *SMOKE])
    page = report.main([str(tmp_path)]).read_text()
    assert "objective <b>tpo_objective</b>" in page and "What TPO sees" in page
    assert 'data-mode="tpo-s"' in page and "data-s=" in page
