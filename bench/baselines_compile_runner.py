"""Runs bench.baselines_compile in a subprocess with a time limit and turns its output into rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TIMEOUT_S = 150.0  # eager warm-up (~10 s) plus every compile; what did not finish by then is n/a


def compile_rows(name: str, budgets: tuple[float, ...], ref, row, log) -> list:
    """One row per activation_memory_budget, scaled to the reference measurement `ref`.

    Peak: the reference's tracked peak plus the RSS difference between compiled and eager.
    Step time: the reference's step time times compiled/eager in the subprocess.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "bench.baselines_compile", name, ",".join(map(str, budgets))]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        out, reason = done.stdout, f"failed: {_last_line(done.stderr)}" if done.returncode else ""
    except subprocess.TimeoutExpired as e:
        out, reason = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            f"did not compile within {TIMEOUT_S:.0f} s"
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    eager = next((r for r in results if r["label"] == "eager"), None)
    rows = []
    for budget in budgets:
        got = next((r for r in results if r["budget"] == budget), None)
        label = f"torch.compile, activation_memory_budget={budget:g}"
        if got is None or eager is None:
            rows.append(row(label, None, None, None, note=f"n/a ({reason or 'no result'})"))
            continue
        peak = ref.peak_bytes + got["rss_peak_bytes"] - eager["rss_peak_bytes"]
        rows.append(row(label, None, peak, ref.step_ms * got["step_ms"] / eager["step_ms"], note=(
            f"peak from RSS high-water mark; step time relative to eager in its own process; "
            f"compiled in {got['warmup_s']:.0f} s")))
    log(f"{name}: torch.compile {'ok' if not reason else reason}")
    return rows


def _last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1][:160] if lines else "no output"
