"""TPO beside BALTO: each token weighted by how much it leans on the context.

Gu et al. (2024), "Token Preference Optimization with Self-Calibrated Visual-Anchored Rewards for
Hallucination Mitigation", arXiv 2412.14487, adapted from its DPO to balto.py's policy gradient.
TPO needs no verifier labels. For each sampled token it compares the policy given the grounding
input with the policy given a corrupted one (paper Eq. 5):

    s[i, t] = log pi(y_t | x, C, y_<t) - log pi(y_t | x, C~, y_<t)

Here C is the context and C~ the same prompt with the context removed (the paper adds diffusion
noise to the image). The paper takes the difference of raw logits; we take log-probabilities:
a logit is defined only up to a constant that softmax ignores, so its difference mixes the
token's own lean on the context with the shift of the whole distribution, while the
log-probability difference is the token's pointwise mutual information with the context; and
it is balto.py's one log-prob function, called twice. Each token then gets a weight (Eq. 6),

    c[i, t] = a + sigmoid(s)      on a preferred response (g_i > 0)
              a + 1 - sigmoid(s)  on a dispreferred one (g_i < 0),   1 when g_i = 0,   a = 0.5

so a preferred response's tokens that lean on the context count more, and a dispreferred
response's tokens that do not lean on it count more. The paper multiplies each token's
probability by c inside DPO (Eqs. 7-11); here, in balto.py's clipped surrogate, the ratio becomes
rho * c_theta / c_old and the credit is GRPO's group advantage g_i (preferred and dispreferred
are its sign), matched in scale as balto.py's modes are:

    L = sum_{i,t} [ -min(r g_i, clip(r, 1 - eps, 1 + eps) g_i) + beta * k3 ] / (response tokens)
    r = rho * c_theta / c_old

c_theta is recomputed by the current policy at every step, with gradient (through both
forwards); c_old is the same before the step. The KL term is the policy's alone, as in TPO,
whose reference model gets no weight. What is the paper's: s from a corrupted input, c, a = 0.5,
c recomputed with gradient. What is ours: the removed context, log-probabilities, the policy
gradient in place of DPO, g_i for preference, matched scale.

    python peers/tpo.py [balto.py's options]     # --credit does not apply: the credit is g_i

The log shows s beside each logged token's verifier label (tools/report.py draws it).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402

A = 0.5  # the paper's a: c lies in (a, a + 1), and is 1 where the context changes nothing


def token_weights(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """TPO's c from each token's lean on the context s (B, T) and the group advantage g (B,).

    Example: s [[0, 2], [0, 2], [0, 2]], g [1, -1, 0]
             -> [[1.0, 1.381], [1.0, 0.619], [1.0, 1.0]]
    """
    lean = torch.sigmoid(s)  # (B, T)
    preferred = A + lean
    dispreferred = A + 1 - lean
    sign = g.sign().unsqueeze(-1)  # (B, 1)
    weights = torch.where(sign > 0, preferred, dispreferred)
    return torch.where(sign == 0, torch.ones_like(weights), weights)


def without_context(items: list[dict]) -> list[dict]:
    """C~: each item's prompt with its context removed, the question kept."""
    return [{**item, "context": ""} for item in items]


@dataclass
class TPOObjective:
    """TPO's loss for one rollout batch, in the shape balto.update() asks of an objective."""
    credit: torch.Tensor  # (B, R) g_i on every token, after matched scaling
    credit_rms: float  # its RMS before matched scaling (logged)
    g: torch.Tensor  # (B,) the group advantage: its sign says preferred or dispreferred
    mask: torch.Tensor  # (B, R)
    n_tokens: torch.Tensor  # the batch's response tokens, counted once
    free_ids: torch.Tensor  # (N, P~) the prompts without their context, left-padded
    free_mask: torch.Tensor  # (N, P~)
    temperature: float
    clip_eps: float
    kl_beta: float
    token_logs: dict  # {"s": (B, R)}, filled by loss(): what TPO sees, for the log

    def score(self, model, batch: balto.Rollout, rows: slice):
        """(log-probs with the context, log-probs without it), each (rows, R)."""
        logp = batch.logprobs(model, rows, self.temperature)
        free = dataclasses.replace(batch, prompt_ids=self.free_ids, prompt_mask=self.free_mask)
        return logp, free.logprobs(model, rows, self.temperature)

    def reference_score(self, model, batch: balto.Rollout, rows: slice) -> torch.Tensor:
        return batch.logprobs(model, rows, self.temperature)  # the KL needs no weights

    def response_logprobs(self, scores) -> torch.Tensor:
        return scores[0]  # with the context: the distribution that sampled

    def loss(self, scores, old_scores, ref_logp, rows: slice) -> tuple[torch.Tensor, dict]:
        logp, free = scores
        old_logp, old_free = old_scores
        self.token_logs["s"][rows] = old_logp - old_free
        log_c = torch.log(token_weights(logp - free, self.g[rows]))  # (rows, R), with gradient
        log_c_old = torch.log(token_weights(old_logp - old_free, self.g[rows]))
        # balto.policy_loss's ratio is exp(logp - old_logp); TPO's is rho * c / c_old, which is
        # exp((logp + log c) - (old_logp + log c_old)). The reference moves by the same log c, so
        # ref - logp, and with it the k3 KL, stays the policy's alone.
        return balto.policy_loss(logp + log_c, old_logp + log_c_old, ref_logp + log_c,
                                 self.credit[rows], self.mask[rows], self.clip_eps, self.kl_beta,
                                 self.n_tokens)


def tpo_objective(batch: balto.Rollout, verdict: balto.Judgement, rewards: torch.Tensor,
                  models: balto.Models, tokenizer, verifier, cfg: balto.Config) -> TPOObjective:
    """TPO for one batch: g_i from the verifier's response rewards, the context-free prompts."""
    g = balto.group_advantage(rewards, cfg.group_size)  # (B,)
    credit = balto.response_credit(rewards, batch.mask, cfg.group_size)  # (B, R)
    rms = float(balto.credit_rms(credit, batch.mask))
    credit = balto.match_scale(credit, batch.mask)
    distinct = batch.items[::cfg.group_size]  # rows n*G .. n*G+G-1 answer prompt n
    tokenizer.padding_side = "left"
    free = balto.tokenize_prompts(tokenizer, without_context(distinct), return_tensors="pt",
                                  padding=True).to(batch.mask.device)
    return TPOObjective(credit=credit, credit_rms=rms, g=g, mask=batch.mask,
                        n_tokens=batch.mask.sum(), free_ids=free.input_ids,
                        free_mask=free.attention_mask, temperature=cfg.temperature,
                        clip_eps=cfg.clip_eps, kl_beta=cfg.kl_beta,
                        token_logs={"s": torch.zeros_like(credit)})


tpo_objective.credit = "response"  # its credit is GRPO's g_i: groups of G >= 2


def main(argv: list[str] | None = None) -> dict:
    """python peers/tpo.py [options]: balto.py's loop and options (not --credit),
    TPO's objective."""
    return balto.main(argv, make_objective=tpo_objective)


if __name__ == "__main__":
    main()
