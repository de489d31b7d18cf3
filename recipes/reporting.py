"""What the training recipe reports: held-out scores, curves and tables."""

import importlib.metadata
import math
import os
import pathlib
import platform

import keras
from keras import ops


def perplexity(nll):
    """`exp(nll)`, or `None` where it is not a finite number (a diverged
    model: JSON has no infinity, and `exp` overflows past ~709 nats)."""
    if not math.isfinite(nll) or nll > 700:
        return None
    return math.exp(nll)


def json_safe(value):
    """`value` with every non-finite float replaced by `None`, for
    `json.dumps(..., allow_nan=False)`."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# The packages whose versions can move a run's last digits.
RECORDED_PACKAGES = (
    "keras",
    "keras-hub",
    "numpy",
    "jax",
    "jaxlib",
    "tensorflow",
    "torch",
    "scann",
)


def run_environment():
    """The machine and package versions a run's numbers come from.

    XLA's CPU code differs between processors, and so can the order of
    float sums: the same code has given 23.997 and 24.041 in two sessions
    whose machines and packages were not recorded (docs/results.md).
    """
    packages = {}
    for name in RECORDED_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "processor": processor_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "packages": packages,
    }


def processor_name():
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform`
    knows of it."""
    try:
        cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment_line(environment):
    """`environment` (`run_environment`) as one line of a results table's
    header."""
    packages = ", ".join(f"{n} {v}" for n, v in environment["packages"].items())
    return (
        f"Machine: {environment['processor']}, {environment['cpu_count']} CPUs; "
        f"Python {environment['python']}; {packages}"
    )


def held_out_scores(causal_lm, stream, global_logs=None):
    """Perplexity and accuracy on `stream`, and each memory layer's gates.

    The inference state is emptied first, so the scores depend on the
    weights alone, not on what an earlier evaluation left (a ScaNN memory's
    trees depend on where its ring buffer starts writing). `global_logs`
    (`recipes.processes.Processes.global_logs` of the model) turns one
    process's scores into those of every process's lanes.
    """
    causal_lm.reset_state(training=False)
    scores = causal_lm.evaluate(stream, return_dict=True, verbose=0)
    if global_logs is not None:
        scores = global_logs(scores)
    gates = [
        [round(float(g), 3) for g in ops.convert_to_numpy(ops.sigmoid(layer.gate_bias))]
        for layer in causal_lm.backbone.memory_layers
    ]
    return {
        "validation_nll": scores["token_nll"],
        "validation_perplexity": perplexity(scores["token_nll"]),
        "validation_accuracy": scores["accuracy"],
        "gates": gates,
    }


class HeldOutCurve(keras.callbacks.Callback):
    """Held-out perplexity and memory gates every `every` steps and at the end.

    A learning curve, evaluated at the end of the epochs (of
    `steps_per_epoch` steps) that reach a multiple of `every`; the gates
    are `sigmoid(b)` of each memory layer's heads, the share of memory in
    each head's output.
    """

    def __init__(self, stream, steps_per_epoch, steps, every, global_logs=None):
        super().__init__()
        self.stream, self.steps_per_epoch, self.steps = stream, steps_per_epoch, steps
        self.every, self.global_logs = every, global_logs
        self.rows = []

    def on_epoch_end(self, epoch, logs=None):
        step = min((epoch + 1) * self.steps_per_epoch, self.steps)
        if step % self.every and step < self.steps:
            return
        scores = held_out_scores(self.model, self.stream, self.global_logs)
        row = {"step": step, **scores}
        self.rows.append(row)
        print(
            f"step {step}: held-out NLL {row['validation_nll']:.4f}, "
            f"gates {row['gates']}",
            flush=True,
        )


def markdown_table(results, header):
    lines = [
        header,
        "",
        "| run | memory | validation perplexity | validation accuracy "
        "| train seconds |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        memory = f"{r['memory_size']} tokens" if r["memory_layers"] else "none"
        lines.append(
            f"| {r['run']} | {memory} | {_number(r['validation_perplexity'])} | "
            f"{r['validation_accuracy']:.3f} | {r['train_seconds']} |"
        )
    curves = [r for r in results if r["curve"]]
    if curves:
        names = " | ".join(f"perplexity, {r['run']}" for r in curves)
        ratio = " ratio |" if len(curves) == 2 else ""
        lines += ["", f"| step | {names} |{ratio} gates |"]
        lines.append("|---" * (len(curves) + 2 + bool(ratio)) + "|")
        for rows in zip(*(r["curve"] for r in curves)):
            values = [row["validation_perplexity"] for row in rows]
            cells = " | ".join(_number(v) for v in values)
            if ratio:
                finite = None not in values
                cells += f" | {_number(values[0] / values[1] if finite else None)}"
            gates = "; ".join(
                " ".join(f"{g:.2f}" for g in layer)
                for row in rows
                for layer in row["gates"]
            )
            lines.append(f"| {rows[0]['step']} | {cells} | {gates} |")
    return "\n".join(lines) + "\n"


def _number(value):
    """A table cell: 3 decimals, or "diverged" for a missing perplexity."""
    return "diverged" if value is None else f"{value:.3f}"
