"""Show which tokens memory helps, and what they retrieved.

Reads the held-out documents of a `recipes.train --compare` run with both of
its trained models (the run's presets), token by token
(`keras_memtrans.analysis.DocumentScorer`), and writes to
`<run>/inspection/`:

- `summary.md`: the loss with and without memory by position in the
  document, and the tokens memory helped most, each with the earlier text
  its query retrieved;
- `gain_by_position.png`: the loss memory saves, by position in the document;
- `document.html`: one document, each token coloured by what memory saved
  on it (green) or cost (red); hover for the numbers.

    KERAS_BACKEND=jax python -m recipes.inspect_memory runs/quick-jax
"""

import argparse
import collections
import html
import io
import json
import pathlib
import platform
import sys

import matplotlib
import numpy as np

from keras_memtrans.analysis import DocumentScorer
from keras_memtrans.models import MemorizingTransformerCausalLM
from recipes.checkpointing import atomic_write
from recipes.common import split_corpus

matplotlib.use("Agg")
from matplotlib import pyplot  # noqa: E402  (after choosing the file backend)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "run", type=pathlib.Path, help="output directory of a --compare run"
    )
    parser.add_argument(
        "--document", help="name of the document to colour (default: the longest)"
    )
    parser.add_argument(
        "--top", type=int, default=20, help="tokens listed in summary.md"
    )
    return parser.parse_args(argv)


def load_run(run_dir):
    """The run's results.json, its two models and its validation documents."""
    results_file = run_dir / "results.json"
    if not results_file.exists():
        raise SystemExit(
            f"{run_dir} holds no results.json: not a recipes.train output."
        )
    results = json.loads(results_file.read_text())
    runs = sorted(r["run"] for r in results["results"])
    if runs != ["memory", "no_memory"]:
        raise SystemExit(
            f"{run_dir} has the runs {runs}; inspecting needs both "
            "models: train with --compare."
        )
    corpus_args = results["corpus"]
    python = platform.python_version()
    if corpus_args["source"] is None and corpus_args.get("python", python) != python:
        raise SystemExit(
            f"{run_dir} was trained on the standard library of Python "
            f"{corpus_args['python']}; this is Python {python}, whose standard "
            "library would give other validation documents."
        )
    # The recipe's layout, wherever the run directory now is.
    memory_lm = MemorizingTransformerCausalLM.from_preset(run_dir / "memory")
    baseline_lm = MemorizingTransformerCausalLM.from_preset(run_dir / "no_memory")
    _, _, validation = split_corpus(corpus_args)
    return memory_lm, baseline_lm, validation


def position_bins(segment_length, longest):
    """Bin edges 0, L, 2L, 4L, ...: the first segment has no memory yet."""
    edges = [0, segment_length]
    while edges[-1] < longest:
        edges.append(edges[-1] * 2)
    return edges


def position_table(memory_scores, baseline_scores, edges):
    """Rows `(begin, end, tokens, loss without, loss with)` per position bin."""
    rows = []
    for begin, end in zip(edges[:-1], edges[1:]):
        with_memory = np.concatenate([s["losses"][begin:end] for s in memory_scores])
        without = np.concatenate([s["losses"][begin:end] for s in baseline_scores])
        if with_memory.size:
            rows.append(
                (begin, end, with_memory.size, without.mean(), with_memory.mean())
            )
    return rows


def show(text):
    """Text for a markdown table cell, newlines and pipes made visible."""
    return "`" + text.replace("`", "'").replace("\n", "⏎").replace("|", "¦") + "`"


def retrieved_position(neighbors):
    """The position retrieved by most heads' top-k, or None."""
    counts = collections.Counter(int(p) for p in neighbors.reshape(-1) if p >= 0)
    return counts.most_common(1)[0][0] if counts else None


def top_tokens(names, memory_scores, baseline_scores, detokenize, count):
    lines = [
        "| document | text before | next token | loss without | loss with | "
        "retrieved (most heads) | tokens back |",
        "|---|---|---|---|---|---|---|",
    ]
    gains = [b["losses"] - m["losses"] for m, b in zip(memory_scores, baseline_scores)]
    documents = np.concatenate([np.full(g.size, d) for d, g in enumerate(gains)])
    offsets = np.concatenate([np.arange(g.size) for g in gains])
    best = np.argsort(-np.concatenate(gains), kind="stable")[:count]
    for d, i in zip(documents[best], offsets[best]):
        tokens = memory_scores[d]["token_ids"]
        # The query at position i predicts token i + 1; the top memory layer
        # is the one nearest the output.
        position = retrieved_position(memory_scores[d]["neighbors"][-1][i])
        retrieved, back = "-", "-"
        if position is not None:
            retrieved = show(detokenize(tokens[max(position - 8, 0) : position + 1]))
            back = str(i - position)
        lines.append(
            f"| {names[d]} | {show(detokenize(tokens[max(i - 8, 0) : i + 1]))} | "
            f"{show(detokenize(tokens[i + 1 : i + 2]))} | "
            f"{baseline_scores[d]['losses'][i]:.2f} | "
            f"{memory_scores[d]['losses'][i]:.2f} | {retrieved} | {back} |"
        )
    return lines


def document_html(name, memory_score, baseline_score, detokenize):
    tokens = memory_score["token_ids"]
    gain = baseline_score["losses"] - memory_score["losses"]
    spans = [html.escape(detokenize(tokens[:1]))]
    for i, saved in enumerate(gain):
        alpha = min(abs(float(saved)) / 4.0, 1.0)
        colour = "0,160,0" if saved > 0 else "220,0,0"
        title = (
            f"without {baseline_score['losses'][i]:.2f}, "
            f"with {memory_score['losses'][i]:.2f} nats"
        )
        spans.append(
            f'<span style="background: rgba({colour},{alpha:.2f})" '
            f'title="{title}">{html.escape(detokenize(tokens[i + 1 : i + 2]))}</span>'
        )
    return (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(name)}</title>"
        f"<h3>{html.escape(name)}: loss saved by memory (green) or added (red)</h3>"
        f"<pre>{''.join(spans)}</pre>"
    )


def plot(rows, path):
    labels = [f"{begin}-{end}" for begin, end, *_ in rows]
    saved = [without - with_memory for *_, without, with_memory in rows]
    figure, axes = pyplot.subplots(figsize=(7, 3.5))
    axes.bar(labels, saved)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel("token position in the document")
    axes.set_ylabel("loss saved by memory (nats)")
    axes.tick_params(axis="x", labelrotation=45)
    figure.tight_layout()
    png = io.BytesIO()
    try:
        figure.savefig(png, format="png", dpi=120)
    finally:
        pyplot.close(figure)
    atomic_write(path, png.getvalue())


def main(argv=None):
    args = parse_args(argv)
    memory_lm, baseline_lm, validation = load_run(args.run)
    preprocessor = memory_lm.preprocessor
    documents = preprocessor(validation.texts)
    names = validation.names
    if args.document is None:
        chosen = int(np.argmax([len(d) for d in documents]))
    elif args.document in names:
        chosen = names.index(args.document)
    else:
        raise SystemExit(
            f"No validation document named {args.document!r}; there are: {names}"
        )
    memory_scores = DocumentScorer(memory_lm)(documents)
    baseline_scores = DocumentScorer(baseline_lm)(documents)

    output_dir = args.run / "inspection"
    output_dir.mkdir(exist_ok=True)
    backbone = memory_lm.backbone
    longest = max(s["losses"].size for s in memory_scores)
    rows = position_table(
        memory_scores, baseline_scores, position_bins(backbone.segment_length, longest)
    )
    plot(rows, output_dir / "gain_by_position.png")
    atomic_write(
        output_dir / "document.html",
        document_html(
            names[chosen],
            memory_scores[chosen],
            baseline_scores[chosen],
            preprocessor.detokenize,
        ),
    )
    with_memory = np.concatenate([s["losses"] for s in memory_scores])
    without = np.concatenate([s["losses"] for s in baseline_scores])
    arguments = sys.argv[1:] if argv is None else argv
    summary = [
        f"# What memory does on {len(documents)} held-out documents of {args.run}",
        "",
        f"Command: `python -m recipes.inspect_memory {' '.join(arguments)}`",
        "",
        f"Mean loss per token: {without.mean():.4f} nats without memory, "
        f"{with_memory.mean():.4f} with a "
        f"{backbone.memory_layers[0].memory_size}-token memory "
        f"({with_memory.size} tokens; memory lowers the loss of "
        f"{(with_memory < without).mean():.1%} of them).",
        "",
        "| position in document | tokens | loss without | loss with | saved |",
        "|---|---|---|---|---|",
    ]
    for begin, end, tokens, loss_without, loss_with in rows:
        summary.append(
            f"| {begin}-{end} | {tokens} | {loss_without:.4f} | {loss_with:.4f} | "
            f"{loss_without - loss_with:+.4f} |"
        )
    summary += ["", f"## The {args.top} tokens memory helped most", ""]
    summary += top_tokens(
        names, memory_scores, baseline_scores, preprocessor.detokenize, args.top
    )
    atomic_write(output_dir / "summary.md", "\n".join(summary) + "\n")
    print("\n".join(summary[: 10 + len(rows)]))
    print(f"\nInspection in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
