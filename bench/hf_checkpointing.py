"""The planner against Hugging Face's own activation checkpointing, measured side by side on the CPU.

    python -m bench.hf_checkpointing                  # GPT-2 6x256 and LLaMA 4x256 (writes bench/hf_checkpointing.json
                                                      # and bench/tradeoff_hf_checkpointing_{gpt2,llama}.png)
    python -m bench.hf_checkpointing --models gpt2 --steps 5

Per model (random weights from a config, AdamW), in one process: no checkpointing; Hugging Face's
checkpointing of every layer and of every second and third layer (`every_n_layers`); per-layer
selective checkpointing with a fixed save list, through Hugging Face's checkpointing and PyTorch's
selective-checkpoint policies: every matmul's output saved, or torchtitan's list (matmuls and
attention kernels saved, but every second matmul recomputed); the planner (`planner.auto`, no units
named) at each of their measured peaks, a quarter of the way from the peak of checkpointing every
layer to the unplanned peak, and at fixed memory + 50% of the activations. Each method is measured
on the loop as a user writes it (`loss = model(**batch).loss; loss.backward(); optimizer.step();
optimizer.zero_grad()`): its peak by live storages, and its step time relative to the unplanned step's
as the median ratio of --steps steps, each to a step of no checkpointing taken just before it (every
method's pair of steps in turn, --steps times, so that the machine's drift over the run falls on all
methods alike), in a process where the C library keeps the memory it is given back (`KEEP_FREED`, as
CUDA's caching allocator keeps it): otherwise it returns freed pages to the system at moments that
differ between two methods doing the same work, and the page faults that follow decide the comparison
(no fault in a backward under Hugging Face's checkpointing, 16,000 to 235,000 under the same
recomputation by a plan, in one run of GPT-2). The peak is measured a second way in a fresh process
started with MALLOC_MMAP_THRESHOLD_=65536 (so that freed tensors go back to the system): the rise of
the process's high-water mark over a steady-state step, plans read from the files the first process wrote.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import planner
from bench.baselines_report import tradeoff_plot
from bench.selective import SELECTIVE, selective
from planner.core.graph import Category
from planner.measurement import high_water_mark
from planner.step import paired_ratio, preserved, timed_ms
from planner.tracking import StorageTracker, tensors_in
from planner.core.plan import Plan

HF_EVERY = (1, 2, 3)  # Hugging Face's every_n_layers
# Sequences of 512 tokens and a vocabulary of 8192: activations outweigh the logits, as in full-size
# models (with GPT-2's 50,257 tokens at 256 dimensions, the loss's logits-sized tensors set the peak).
BATCH, LENGTH, VOCAB = 4, 512, 8192
KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}  # glibc's settings


def gpt2():
    import transformers as hf

    config = hf.GPT2Config(n_layer=6, n_embd=256, n_head=8, n_positions=1024, vocab_size=VOCAB, use_cache=False)
    return hf.GPT2LMHeadModel(config), _tokens()


def llama():
    import transformers as hf

    config = hf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=VOCAB, use_cache=False)
    return hf.LlamaForCausalLM(config), _tokens()


def _tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


MODELS = {"gpt2": gpt2, "llama": llama}


def build(name: str):
    torch.manual_seed(0)
    model, batch = MODELS[name]()
    return model, batch, torch.optim.AdamW(model.parameters(), lr=1e-4)


def user_step(model, batch, optimizer) -> None:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_bytes(model, batch, optimizer) -> tuple[int, int | None]:
    """(live storages, rise of the high-water mark) of a steady-state step of the user's loop, both
    with what existed before it; the model and optimizer are left as they were."""
    with preserved(model, optimizer):
        # the warm-up runs under a tracker too, as the measured step will (see planner.measurement._warm_up)
        with StorageTracker("cpu") as warm:
            user_step(model, batch, optimizer)
        warm.stop_tracking()
        existing = [*model.parameters(), *model.buffers(), *tensors_in(optimizer.state), *tensors_in(batch)]
        before = sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in existing}.values())
        tracker = StorageTracker("cpu", existing)
        with high_water_mark() as rise, tracker:
            user_step(model, batch, optimizer)
        tracker.stop_tracking()
    return before + tracker.peak_bytes, None if rise() is None else before + rise()


def hf_checkpointing(model, every: int | None, kind: str | None = None) -> None:
    """Hugging Face's checkpointing of every `every`-th layer (selective with a `SELECTIVE` kind), or none."""
    if every is None:
        model.activation_checkpointing_disable()
        return
    kwargs = {"use_reentrant": False} | ({"context_fn": selective(kind)} if kind else {})
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)


class Method:
    """Something that changes how the model trains: `on()` and `off()` switch it."""

    def __init__(self, name: str, on, off, plan=None) -> None:
        self.name, self.on, self.off, self.plan = name, on, off, plan


def hf_method(model, every: int, kind: str | None = None) -> Method:
    label = f"selective per layer, {kind}" if kind else "every layer" if every == 1 else f"every_n_layers={every}"
    return Method(f"HF checkpointing, {label}", lambda: hf_checkpointing(model, every, kind),
                  lambda: hf_checkpointing(model, None))


def plan_method(model, plan, label: str) -> Method:
    handle = planner.apply(model, plan)
    handle.remove()
    return Method(f"planner at {label}", handle.install, handle.remove, plan)


def measure(name: str, steps: int) -> dict:
    model, batch, optimizer = build(name)
    started = time.perf_counter()
    graph = planner.profile(model, batch, optimizer=optimizer)
    unplanned, _ = peak_bytes(model, batch, optimizer)
    grads = sum(b.bytes for b in graph.blocks if b.category is Category.GRADIENTS)
    fixed = graph.fixed.total + grads
    methods = [hf_method(model, every) for every in HF_EVERY] + [hf_method(model, 1, kind) for kind in SELECTIVE]
    rows = [{"method": "no checkpointing", "peak_bytes": unplanned, "predicted_bytes": planner.simulate(graph).peak_bytes}]
    budgets = []
    for method in methods:
        method.on()
        rows.append({"method": method.name, "peak_bytes": peak_bytes(model, batch, optimizer)[0]})
        method.off()
        budgets.append((rows[-1]["peak_bytes"], f"{method.name}'s peak"))
    every_layer = budgets[0][0]
    budgets.append((int(every_layer + 0.25 * (unplanned - every_layer)), "a quarter of the way from every layer's peak"))
    budgets.append((int(fixed + 0.5 * (unplanned - fixed)), "fixed + 50% of activations"))
    for budget, label in budgets:
        try:
            handle = planner.auto(model, batch, budget, optimizer=optimizer)
        except ValueError as err:
            rows.append({"method": f"planner at {label}", "budget_bytes": budget, "refused": str(err)})
            continue
        handle.remove()
        methods.append(plan_method(model, handle.plan, label))
        method = methods[-1]
        method.on()
        rows.append({
            "method": method.name, "budget_bytes": budget, "peak_bytes": peak_bytes(model, batch, optimizer)[0],
            "predicted_bytes": handle.plan.predicted_peak_bytes, "predicted_overhead": handle.plan.overhead_pct / 100,
            "plan": _summary(handle.plan),
        })
        method.off()
    by_name = {r["method"]: r for r in rows}
    for method, ratio in zip(methods, step_ratios(model, batch, optimizer, methods, steps)):
        by_name[method.name]["step_ratio"] = ratio
    return {"model": name, "units": len(graph.units), "fixed_bytes": fixed, "rows": rows,
            "plans": {m.name: m.plan.to_dict() for m in methods if m.plan is not None},
            "seconds": time.perf_counter() - started}


def step_ratios(model, batch, optimizer, methods: list[Method], steps: int) -> list[float]:
    """Per method, the median ratio of its step time to that of the unplanned step taken just before
    (`paired_ratio`); the methods in turns, so that the machine's drift over the run falls on all alike."""
    plain, under = [[] for _ in methods], [[] for _ in methods]
    step = lambda: timed_ms(lambda: user_step(model, batch, optimizer), torch.device("cpu"))
    with preserved(model, optimizer):
        for _ in range(steps + 1):  # the first, a warm-up of each
            for method, before, after in zip(methods, plain, under):
                before.append(step())
                method.on()
                after.append(step())
                method.off()
    return [paired_ratio(before[1:], after[1:]) for before, after in zip(plain, under)]


def _summary(plan) -> str:
    regions = sum(c.action.value == "recompute" for c in plan.choices)
    kept = collections.Counter(k.op.split(".")[-1] for c in plan.choices for k in c.save_ops)
    masks = kept.pop("bernoulli_", 0)  # each kept with the `empty_like` that made it and the `div_` that scaled it
    kept = +(kept - collections.Counter({"empty_like": masks, "div_": masks}))
    items = [f"{n} × {op}" for op, n in sorted(kept.items())] + ([f"{masks} dropout masks"] if masks else [])
    return f"{regions} region{'s' if regions != 1 else ''}" + (", keeping " + ", ".join(items) if items else "")


def high_water_marks(result: dict, directory: Path) -> None:
    """Each method's peak measured again by the high-water mark, in a fresh process per method."""
    path = directory / f"{result['model']}.json"
    path.write_text(json.dumps(result))
    env = {k: v for k, v in os.environ.items() if k not in KEEP_FREED} | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    for row in result["rows"]:
        if "peak_bytes" not in row:
            continue
        out = subprocess.run([sys.executable, "-m", "bench.hf_checkpointing", "--hwm", str(path), row["method"]],
                             env=env, capture_output=True, text=True, check=True).stdout
        row["hwm_bytes"] = int(out.split()[-1])


def hwm_of(path: Path, method_name: str) -> int:
    result = json.loads(path.read_text())
    model, batch, optimizer = build(result["model"])
    if method_name in result["plans"]:
        planner.apply(model, Plan.from_dict(result["plans"][method_name]))
    elif method_name.startswith("HF"):
        kind = next((k for k in SELECTIVE if method_name.endswith(k)), None)
        every = int(method_name.rsplit("=", 1)[1]) if "every_n_layers" in method_name else 1
        hf_checkpointing(model, every, kind)
    return peak_bytes(model, batch, optimizer)[1]


def table(results: list[dict]) -> str:
    lines = ["| model | method | peak MiB (live / high-water) | predicted MiB | overhead predicted / measured | plan |",
             "|---|---|---|---|---|---|"]
    for result in results:
        for row in result["rows"]:
            mib = lambda key: f"{row[key] / 2**20:.1f}" if row.get(key) is not None else "—"  # noqa: E731
            if "refused" in row:
                lines.append(f"| {result['model']} | {row['method']} ({mib('budget_bytes')} MiB) | refused | | | "
                             f"{row['refused'][:120]} |")
                continue
            predicted = f"{100 * row['predicted_overhead']:+.0f}%" if "predicted_overhead" in row else "—"
            overhead = f"{predicted} / {100 * (row['step_ratio'] - 1):+.0f}%" if "step_ratio" in row else "—"
            lines.append(f"| {result['model']} | {row['method']} | {mib('peak_bytes')} / {mib('hwm_bytes')} | "
                         f"{mib('predicted_bytes')} | {overhead} | {row.get('plan', '')} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Step time against measured peak: a point per method, the planner's points joined."""
    rows = [r for r in result["rows"] if "peak_bytes" in r]
    methods = {"planner (no units named)": [(r["peak_bytes"] / 2**20, r["step_ratio"]) for r in rows
                                            if r["method"].startswith("planner")]}
    for r in rows:
        if not r["method"].startswith("planner"):
            methods[r["method"]] = [(r["peak_bytes"] / 2**20, r.get("step_ratio", 1.0))]
    tradeoff_plot(methods, f"{result['model']}: overhead against peak", "measured peak (MiB, live storages)", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench/hf_checkpointing.json"))
    parser.add_argument("--hwm", nargs=2, metavar=("RESULT", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hwm:
        print(hwm_of(Path(args.hwm[0]), args.hwm[1]))
        return
    if any(os.environ.get(k) != v for k, v in KEEP_FREED.items()):  # the settings apply from a process's start
        os.execve(sys.executable, [sys.executable, "-m", "bench.hf_checkpointing", *sys.argv[1:]], os.environ | KEEP_FREED)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models.split(","):
            result = measure(name, args.steps)
            high_water_marks(result, Path(directory))
            results.append(result)
            print(table([result]), flush=True)
    args.out.write_text(json.dumps(results, indent=1))
    for result in results:
        plot(result, args.out.with_name(f"tradeoff_hf_checkpointing_{result['model']}.png"))
    print(f"wrote {args.out} and tradeoff_hf_checkpointing_*.png beside it")


if __name__ == "__main__":
    main()
