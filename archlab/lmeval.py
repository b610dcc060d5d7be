"""An archlab student as an lm-eval model (EleutherAI's lm-evaluation-harness 0.4, ``archlab[eval]``).

Importing this module registers the model ``archlab``: ``simple_evaluate(model="archlab",
model_args="run=DIR")``, or the harness's command line through ``python -m archlab.lmeval run --model
archlab --model_args run=DIR --tasks ...`` (lm-eval 0.4.13 finds models only among its own modules and
what the process imported: it reads no entry points, so a bare ``lm_eval --model archlab`` cannot see it).

Every request is answered by the student's own forward (any plugins, exportable or not):

- ``loglikelihood``: log p(continuation | context) = Σ_i log softmax(f(x_<i))[x_i] over the continuation's
  tokens, and whether each is the argmax. ``context + continuation`` is left-truncated to the last
  ``model.context + 1`` tokens (the harness's standard truncation); a continuation longer than the
  context is scored in disjoint chunks, each chunk by the ``model.context`` tokens that end before its
  last token, as the rolling windows below (``scoring_windows``). Batches are right-padded: causal, a
  row's scored positions never see its padding.
- ``loglikelihood_rolling``: the same windows for the document after the end-of-document token: the
  harness's disjoint rolling windows (``get_rolling_token_windows`` with ``context_len=1``), every token
  predicted exactly once.
- ``generate_until``: ``archlab.generate.decode`` through the KV cache, stopped as soon as every row's
  text holds one of its ``until`` strings (or the end-of-document token); the prompt keeps its last
  ``model.context - max_gen_toks`` tokens.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import lm_eval.models  # noqa: F401 - the harness's own models first: it loads them only into an empty registry
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from archlab import checkpoint
from archlab.errors import ArchlabError, ConfigError
from archlab.generate import decode, supports_kv_cache

#: One scoring request: (the harness's cache key or None, context tokens, continuation tokens).
from archlab.run_tokens import tokenizer_for
from archlab.trainer import resolve_device

#: One scoring request: (the harness's cache key or None, context tokens, continuation tokens).
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


def _positive(key: str, value: object, default: int) -> int:
    """``value`` (an int or its text; None for ``default``) as a positive int, else a ``ConfigError``."""
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ConfigError(key, value, "a positive integer")
    return number


def scoring_windows(
    context: list[int], continuation: list[int], size: int
) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) of the windows that score ``continuation`` after ``context`` (non-empty): targets
    are consecutive chunks of at most ``size`` tokens, each predicted by the last ``len(targets)`` logits
    of its inputs, the at most ``size`` tokens before its last target (full context, left-truncated).
    One window when ``context + continuation`` fits ``size + 1`` tokens: the harness's truncation
    ``(context + continuation)[-(size + 1):][:-1]``; for ``context=[EOT]`` exactly lm-eval's
    ``get_rolling_token_windows(continuation, EOT, size, 1)`` made disjoint."""
    tokens = context + continuation
    windows = []
    for first in range(len(context), len(tokens), size):
        end = min(first + size, len(tokens))
        windows.append((tokens[max(0, end - 1 - size) : end - 1], tokens[first:end]))
    return windows


@register_model("archlab")
class ArchlabLM(TemplateLM):
    """The student of run ``run`` (a run dir, its checkpoints/ dir or one checkpoint dir), frozen, on
    ``device`` (``auto``: CUDA where available), scoring ``batch_size`` sequences per forward.
    ``max_batch_size`` is what the harness passes for its ``batch_size=auto``, which this model does
    not offer (``batch_size`` must be a number); it is accepted and unused."""

    def __init__(
        self,
        run: str,
        device: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        max_gen_toks: int | str = 256,
    ) -> None:
        super().__init__()
        self.batch_size = _positive("batch_size", batch_size, 8)
        self.max_gen_toks = _positive("max_gen_toks", max_gen_toks, 256)
        self.checkpoint = checkpoint.find(run, key="run")
        self._device = resolve_device(device or "auto", key="device")
        self.model = checkpoint.load_student(self.checkpoint, self._device)
        self.tok = tokenizer_for(checkpoint.saved_config(self.checkpoint))
        self.context = self.model.dims.context

    @property
    def eot_token_id(self) -> int:
        """The tokenizer's end-of-document token: what it appends to an empty document."""
        return int(self.tok.encode_documents([b""])[-1])

    @property
    def max_length(self) -> int:
        return self.context

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def get_model_info(self) -> dict:
        """What the harness records in its results' ``config``."""
        step = checkpoint.step_of(self.checkpoint)
        return {"archlab_checkpoint": str(self.checkpoint), "archlab_step": step}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(Σ log p(continuation token), all of them greedy) per request, from the disjoint windows of
        ``scoring_windows``, scored in batches of ``batch_size`` windows, longest first."""
        windows = [
            (n, *w) for n, (_, c, x) in enumerate(requests) for w in scoring_windows(c, x, self.context)
        ]
        windows.sort(key=lambda w: -len(w[1]))
        totals, greedy = [0.0] * len(requests), [True] * len(requests)
        batches = range(0, len(windows), self.batch_size)
        for start in tqdm(batches, desc="archlab loglikelihood", disable=disable_tqdm):
            batch = windows[start : start + self.batch_size]
            inputs = torch.zeros(len(batch), len(batch[0][1]), dtype=torch.long)
            for row, (_, tokens, _) in enumerate(batch):
                inputs[row, : len(tokens)] = torch.tensor(tokens)
            logprobs = self.model(inputs.to(self.device)).float().log_softmax(-1).cpu()
            for row, (n, tokens, targets) in enumerate(batch):
                scored = logprobs[row, len(tokens) - len(targets) : len(tokens)]
                target = torch.tensor(targets)
                totals[n] += float(scored.gather(-1, target[:, None]).sum())
                greedy[n] &= bool((scored.argmax(-1) == target).all())
        answers = list(zip(totals, greedy, strict=True))
        for (key, _, _), answer in zip(requests, answers, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log p(document | end-of-document token), every token predicted once (the module docstring)."""
        asked = [
            (None, [self.prefix_token_id], self.tok_encode(text)) for (text,) in (r.args for r in requests)
        ]
        totals = [total for total, _ in self._loglikelihood_tokens(asked, disable_tqdm)]
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuations until a stop string; requests with equal settings and prompt length share a batch
        (the student has no padding mask, so a batch's prompts must be equally long)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        prompts, settings = [], []
        for n, (context, gen_kwargs) in enumerate(req.args for req in requests):
            settings.append(self._generation_settings(gen_kwargs))
            keep = self.context - settings[n]["max_new_tokens"]
            prompts.append((self.tok_encode(context) or [self.prefix_token_id])[-keep:])
            groups[(len(prompts[n]), repr(sorted(settings[n].items())))].append(n)
        answers = [""] * len(requests)
        for members in tqdm(groups.values(), desc="archlab generate", disable=disable_tqdm):
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                texts = self._generate_batch([prompts[n] for n in batch], settings[batch[0]])
                for n, text in zip(batch, texts, strict=True):
                    answers[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return answers

    def _generation_settings(self, gen_kwargs: dict) -> dict:
        """The harness's generation kwargs as ``decode``'s, with the stop strings (``until``)."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        wanted = _positive("max_gen_toks", gen_kwargs.get("max_gen_toks"), self.max_gen_toks)
        sample = bool(gen_kwargs.get("do_sample", False))
        return {
            "until": (*until, self.tok_decode([self.eot_token_id])),
            "max_new_tokens": min(wanted, self.context - 1),  # at least one prompt token stays
            "temperature": float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
            "top_k": int(gen_kwargs.get("top_k") or 0),
            "top_p": float(gen_kwargs.get("top_p") or 1.0),
        }

    def _generate_batch(self, prompts: list[list[int]], settings: dict) -> list[str]:
        """Decode equally long ``prompts`` until each row's text holds a stop string; each text is cut
        before its first stop string."""
        until = settings["until"]
        prompt = torch.tensor(prompts, device=self.device)
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        steps = decode(
            self.model,
            prompt,
            settings["max_new_tokens"],
            temperature=settings["temperature"],
            top_k=settings["top_k"],
            top_p=settings["top_p"],
            use_cache=supports_kv_cache(self.model),
        )
        for tokens in steps:
            for r, token in enumerate(tokens.tolist()):
                if not done[r]:
                    new[r].append(token)
                    done[r] = any(stop in self.tok_decode(new[r]) for stop in until)
            if all(done):
                break
        texts = [self.tok_decode(ids) for ids in new]
        return [min((t.split(stop)[0] for stop in until), key=len) for t in texts]


def main(argv: list[str] | None = None) -> int:
    """lm-eval's own command line, with the ``archlab`` model registered; archlab's errors (a missing
    run, a device this machine lacks: the harness's default is ``cuda:0``) as one line, exit 2."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except ArchlabError as exc:
        print(f"archlab: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
