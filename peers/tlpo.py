"""TLPO beside BALTO: correct the first error, at the error.

arXiv 2604.26553 (TLPO), adapted to balto.py's loop. Where BALTO spreads credit over every labelled
token, TLPO trains one position per response: the first token of its first unsupported claim.
There it takes the K = 16 tokens the sampling policy ranks highest, with their probabilities p_j,
continues each greedily to the end of the claim, and verifies the claim each one makes: R_j = +1
when it is supported (or is no claim at all), -1 when it is not. Each candidate's advantage is

    mu = sum_j p_j R_j / sum_j p_j,        A_j = p_j (R_j - mu) / sum_k p_k |R_k - mu|

(0 when every candidate gets the same R), and the loss is the clipped surrogate with a k3 KL at
that position only, averaged over the (position, candidate) pairs of the batch:

    L = sum_{(i, j)} [ -min(r A_j, clip(r, 1 - eps, 1 + eps) A_j) + beta * k3 ] / (pairs)
    r = pi(c_j | x, y_i<t) / pi_old(c_j | x, y_i<t)

No other token gets a gradient; a response without an unsupported claim trains nothing. What
is the paper's: the error position, K = 16 candidates, greedy continuation, R = +1 / -1, A, the
clipped loss with k3 at that position. What is ours: the error is the verifier's first
unsupported claim (the paper's task detects a wrong-language word); the continuation runs to the
end of the claim, at most CONTINUATION tokens (the paper's runs 3); p is the sampling
distribution (softmax of logits / temperature); matched scale divides A by its RMS over the
batch's pairs, as balto.py's modes are divided; beta is --kl-beta, as for every mode compared.

    python peers/tlpo.py [balto.py's options]     # --credit does not apply
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402

K = 16  # candidates at each error position
CONTINUATION = 24  # greedy tokens at most after a candidate; the claim usually ends sooner
CLAUSE_ENDS = [".", "!", "?", ";", "\n"]  # where balto.segment ends a claim


def tlpo_advantages(p: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """TLPO's A_j from candidate probabilities p (E, K) and rewards R (E, K) -> (E, K).

    Example: p [[.5, .3, .2]], R [[1, -1, 1]] -> mu .4 -> [[.357, -.5, .143]]
    """
    mu = (p * rewards).sum(-1, keepdim=True) / p.sum(-1, keepdim=True)  # (E, 1)
    weighted = p * (rewards - mu)  # (E, K)
    total = weighted.abs().sum(-1, keepdim=True)  # (E, 1)
    return torch.where(total > 0, weighted / total.clamp(min=1e-12), weighted)


def first_errors(labels: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, int]]:
    """(row, token) of each response's first unsupported token: the first token of its first
    unsupported claim (claims come in order). Rows without one are left out.

    Example: labels [[1, 1, -1, -1], [1, 0, 0, 0], [0, -1, 0, 1]] -> [(0, 2), (2, 1)]
    """
    errors = []
    for row in range(len(labels)):
        unsupported = ((labels[row] == balto.MINUS) & mask[row].bool()).nonzero()
        if len(unsupported):
            errors.append((row, int(unsupported[0])))
    return errors


def prefixes(batch: balto.Rollout, errors: list[tuple[int, int]]):
    """Each error's prompt and the response tokens before the error, left-padded so that every
    row ends at its error: (E, L) ids and mask."""
    sequences = []
    for row, t in errors:
        prompt_row = batch.prompt_of[row]
        prompt = batch.prompt_ids[prompt_row][batch.prompt_mask[prompt_row].bool()]
        sequences.append(torch.cat([prompt, batch.response_ids[row, :t]]))
    width = max(len(sequence) for sequence in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long, device=batch.mask.device)
    mask = torch.zeros_like(ids)
    for e, sequence in enumerate(sequences):
        ids[e, width - len(sequence):] = sequence
        mask[e, width - len(sequence):] = 1
    return ids, mask


def next_token_logits(model, ids: torch.Tensor, mask: torch.Tensor):
    """The logits after each left-padded prefix: (E, L) -> (E, V), and the prefixes' KV cache."""
    return balto.encode_prompts(model, mask, input_ids=ids)


@torch.inference_mode()
def continue_greedily(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, cache,
                      candidates: torch.Tensor) -> torch.Tensor:
    """Each prefix (E, L) followed by each of its candidates (E, K), continued greedily until the
    clause ends: (E * K, <= 1 + CONTINUATION) new tokens, the candidate first. The prefixes'
    cache is repeated K times, so each prefix is encoded once."""
    cache.batch_repeat_interleave(candidates.shape[1])
    rows = candidates.numel()
    repeated_ids = ids.repeat_interleave(candidates.shape[1], 0)
    repeated_mask = mask.repeat_interleave(candidates.shape[1], 0)
    forced = candidates.reshape(rows, 1)
    full_ids = torch.cat([repeated_ids, forced], 1)  # (E * K, L + 1)
    full_mask = torch.cat([repeated_mask, torch.ones_like(forced)], 1)
    out = model.generate(input_ids=full_ids, attention_mask=full_mask, do_sample=False,
                         max_new_tokens=CONTINUATION, stop_strings=CLAUSE_ENDS,
                         tokenizer=tokenizer, pad_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         **{balto.cache_argument(type(model)): cache})
    return out[:, ids.shape[1]:]


def candidate_claims(tokenizer, batch: balto.Rollout, errors: list[tuple[int, int]],
                     continued: torch.Tensor) -> list[str]:
    """The clause each candidate makes: the response up to the error, the candidate and its
    continuation, decoded; the clause that the error starts or continues."""
    claims = []
    k_per_error = len(continued) // len(errors)
    for e, (row, t) in enumerate(errors):
        before = batch.response_ids[row, :t].tolist()
        start = len(tokenizer.decode(before, skip_special_tokens=True).rstrip())
        for new in continued[e * k_per_error:(e + 1) * k_per_error]:
            text = tokenizer.decode(before + new.tolist(), skip_special_tokens=True)
            spans = [(s, end) for s, end in balto.segment(text) if end > start]
            claims.append(text[spans[0][0]:spans[0][1]] if spans else "")
    return claims


def candidate_rewards(verifier, items: list[dict], claims: list[str],
                      threshold: float) -> torch.Tensor:
    """R = -1 for a candidate clause that is a claim the verifier does not support, else +1."""
    checks = []
    which = []
    for i, (item, claim) in enumerate(zip(items, claims)):
        if balto.extract_claims(claim):
            checks.append((item["context"], item["question"], claim))
            which.append(i)
    rewards = torch.ones(len(claims))
    for i, score in zip(which, verifier.score(checks)):
        if score < threshold:
            rewards[i] = -1.0
    return rewards


@dataclass
class TLPOObjective:
    """TLPO's loss for one rollout batch, in the shape balto.update() asks of an objective."""
    error_rows: torch.Tensor  # (E,) the response row of each error position
    prefix_ids: torch.Tensor  # (E, L) prompt and response before the error, left-padded
    prefix_mask: torch.Tensor  # (E, L)
    candidates: torch.Tensor  # (E, K) token ids
    advantages: torch.Tensor  # (E, K) A_j, after matched scaling
    n_pairs: int  # (position, candidate) pairs in the batch, counted once
    credit: torch.Tensor  # (B, R) for the log: the sampled token's A at its error, else 0
    credit_rms: float  # A's RMS over the pairs before matched scaling (logged)
    temperature: float
    clip_eps: float
    kl_beta: float
    token_logs: dict = field(default_factory=dict)

    def score(self, model, batch: balto.Rollout, rows: slice) -> torch.Tensor:
        """log pi(candidate | prefix) of the errors among `rows`: (E_rows, K)."""
        chosen = self.in_rows(rows)
        if not chosen.any():  # nothing to train here: an empty score that backward accepts
            return torch.zeros((0, K), device=self.candidates.device, requires_grad=True)
        logits, _ = next_token_logits(model, self.prefix_ids[chosen], self.prefix_mask[chosen])
        logp = torch.log_softmax(logits.float() / self.temperature, -1)  # (E_rows, V)
        return logp.gather(-1, self.candidates[chosen])

    reference_score = score

    def response_logprobs(self, scores) -> None:
        return None  # candidates at error positions, not the sampled tokens: no drift to log

    def loss(self, logp, old_logp, ref_logp, rows: slice) -> tuple[torch.Tensor, dict]:
        advantages = self.advantages[self.in_rows(rows)]  # (E_rows, K)
        n_pairs = torch.tensor(float(max(self.n_pairs, 1)))  # no pairs at all: 0, not 0 / 0
        return balto.policy_loss(logp, old_logp, ref_logp, advantages, torch.ones_like(advantages),
                                 self.clip_eps, self.kl_beta, n_pairs)

    def in_rows(self, rows: slice) -> torch.Tensor:
        """(E,) which error positions belong to the response rows `rows`."""
        start, stop = rows.start, rows.stop
        return (self.error_rows >= start) & (self.error_rows < stop)


def tlpo_objective(batch: balto.Rollout, verdict: balto.Judgement, rewards: torch.Tensor,
                   models: balto.Models, tokenizer, verifier, cfg: balto.Config) -> TLPOObjective:
    """TLPO for one batch: error positions, candidates, continuations, their rewards, A."""
    device = batch.mask.device
    errors = first_errors(verdict.labels, batch.mask.cpu())
    credit = torch.zeros(batch.mask.shape, device=device)
    common = dict(temperature=cfg.temperature, clip_eps=cfg.clip_eps, kl_beta=cfg.kl_beta)
    if not errors:
        empty = torch.zeros((0, K), dtype=torch.long, device=device)
        return TLPOObjective(error_rows=torch.zeros(0, dtype=torch.long, device=device),
                             prefix_ids=empty, prefix_mask=empty, candidates=empty,
                             advantages=empty.float(), n_pairs=0, credit=credit, credit_rms=0.0,
                             **common)
    ids, mask = prefixes(batch, errors)
    with torch.inference_mode():
        logits, cache = next_token_logits(models.sampler, ids, mask)
        p = torch.softmax(logits.float() / cfg.temperature, -1)  # the sampling distribution
        p, candidates = p.topk(K, dim=-1)  # (E, K)
        continued = continue_greedily(models.sampler, tokenizer, ids, mask, cache, candidates)
    claims = candidate_claims(tokenizer, batch, errors, continued)
    items = [batch.items[row] for row, _ in errors for _ in range(K)]
    rewards_j = candidate_rewards(verifier, items, claims, cfg.support_threshold).view(-1, K)
    advantages = tlpo_advantages(p.cpu(), rewards_j).to(device)  # (E, K)
    pairs = torch.ones_like(advantages)
    rms = float(balto.credit_rms(advantages, pairs))
    advantages = balto.match_scale(advantages, pairs)
    for e, (row, t) in enumerate(errors):
        sampled = candidates[e] == batch.response_ids[row, t]
        credit[row, t] = advantages[e][sampled].sum()  # 0 if the sampled token is no candidate
    error_rows = torch.tensor([row for row, _ in errors], device=device)
    return TLPOObjective(error_rows=error_rows, prefix_ids=ids, prefix_mask=mask,
                         candidates=candidates.clone(), advantages=advantages,
                         n_pairs=advantages.numel(), credit=credit, credit_rms=rms, **common)


def main(argv: list[str] | None = None) -> dict:
    """python peers/tlpo.py [options]: balto.py's loop and options (not --credit),
    TLPO's objective."""
    return balto.main(argv, make_objective=tlpo_objective)


if __name__ == "__main__":
    main()
