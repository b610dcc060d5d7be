"""Write the data of archlab's two local lm-eval tasks (``archlab/eval_tasks/*.jsonl``) from the held-out
documents of the ``stdlib`` corpus: those ``archlab.data`` puts in validation at the default
``data.val_fraction``, so a student trained on the stdlib corpus never saw them.

- ``stdlib_choice.jsonl``: which of four continuations is the real next line of a stdlib ``.py`` file? The
  other three: the same line with its characters shuffled, the same line reversed, and a line of about the
  same length from another held-out file (real code, wrong place).
- ``stdlib_heldout.jsonl``: held-out text for ``loglikelihood_rolling`` perplexity.

Deterministic: the same interpreter's stdlib gives the same files (``python scripts/make_eval_tasks.py``).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from archlab.baselines.corpus import StdlibCorpus
from archlab.config import DataConfig
from archlab.data import _is_val  # noqa: PLC2701 - the split rule itself, so the tasks stay held out

OUT = Path(__file__).resolve().parents[1] / "archlab" / "eval_tasks"
SEED, N_CHOICE, N_TEXTS, TEXT_BYTES, CONTEXT_BYTES = 0, 80, 16, 2048, 240


def held_out() -> list[tuple[str, str]]:
    """(id, text) of the stdlib documents in the default validation split, in corpus order."""
    fraction = DataConfig().val_fraction
    corpus = StdlibCorpus(StdlibCorpus.Config())
    return [(i, d.decode("utf-8")) for i, d in corpus.documents() if _is_val(i, fraction) and d.isascii()]


def whole_lines(text: str, most: int) -> str:
    """The longest prefix of ``text`` of whole lines within ``most`` characters (at least one line)."""
    cut = text.rfind("\n", 0, most + 1)
    return text[: cut + 1] if cut > 0 else text[:most]


def choice_items(docs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """``N_CHOICE`` items {context, choices, label, source}; the real line's place among them is random."""
    lines = {i: t.splitlines() for i, t in docs if i.endswith(".py")}
    pool = [(i, n) for i, ls in lines.items() for n in range(8, len(ls)) if len(ls[n].strip()) >= 24]
    everywhere = [(i, line) for i, ls in lines.items() for line in ls if len(line.strip()) >= 24]
    items = []
    for doc_id, n in rng.sample(pool, len(pool)):
        line = lines[doc_id][n]
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        shuffled = "".join(rng.sample(body, len(body)))
        other = min(
            (o for o in rng.sample(everywhere, 200) if o[0] != doc_id),
            key=lambda o: abs(len(o[1]) - len(line)),
        )[1]
        wrong = [indent + shuffled, indent + body[::-1], other]
        context = "\n".join(lines[doc_id][:n]).rstrip()[-CONTEXT_BYTES:]
        choices = [line, *wrong]
        if len(set(choices)) < 4 or not context:
            continue
        order = rng.sample(range(4), 4)
        item = {"context": context, "choices": ["\n" + choices[k] for k in order], "label": order.index(0)}
        items.append({**item, "source": f"{doc_id}:{n + 1}"})
        if len(items) == N_CHOICE:
            return items
    raise SystemExit(f"only {len(items)} items from {len(lines)} held-out .py files")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"{path}: {len(rows)} rows", file=sys.stderr)


def main() -> None:
    docs = held_out()
    rng = random.Random(SEED)
    write_jsonl(OUT / "stdlib_choice.jsonl", choice_items(docs, rng))
    texts = [(i, whole_lines(t, TEXT_BYTES)) for i, t in rng.sample(docs, N_TEXTS)]
    write_jsonl(OUT / "stdlib_heldout.jsonl", [{"text": t, "source": i} for i, t in texts])


if __name__ == "__main__":
    main()
