"""What ``bench.vs_litellm``'s report makes of the phases' results: the mesh's ratios to each
LiteLLM strategy, issue 13's goals met or not in this run, and the script that plots
both (run in the comparison's virtual environment, where matplotlib is).

Why a module of its own: the judgement of a run, apart from the measuring
(``bench.vs_litellm_phases``); ``bench.c32_tail`` checks the same concurrency-32 goal.
"""

from __future__ import annotations

from typing import Any

from bench.vs_litellm_phases import BURST
from bench.vs_litellm_systems import BACKENDS, STRATEGIES

C32_GOAL = 1.1
"""The most the router's p99 time to first token at concurrency 32 may be over the
baseline's, as a factor (issue 13)."""


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Ours against each LiteLLM strategy, and each against the HTTP baseline measured
    beside it."""
    added = {name: {f"{c}_{q}": round(r["router"][c][f"ttft_ms_{q}"]
                                      - r["baseline"][c][f"ttft_ms_{q}"], 3)
                    for c in ("c1", "c32") for q in ("p50", "p99")}
             for name, r in results.items()}
    out: dict[str, Any] = {"added_ttft_ms": added}
    for strategy in STRATEGIES:
        theirs = added[f"litellm-{strategy}"]
        out[f"mesh_over_litellm-{strategy}"] = {
            "added_ttft_c1_p50": round(added["mesh"]["c1_p50"] / theirs["c1_p50"], 3)
            if theirs["c1_p50"] > 0 else None,
            "tokens_per_s": round(results["mesh"]["ceiling"]["tokens_per_s"]
                                  / results[f"litellm-{strategy}"]["ceiling"]["tokens_per_s"],
                                  3),
            "cpu_per_token": round(
                results["mesh"]["ceiling"]["router_cpu_s_per_1k_tokens"]
                / results[f"litellm-{strategy}"]["ceiling"]["router_cpu_s_per_1k_tokens"], 3)}
    return out


def goals(results: dict[str, Any], ratio: dict[str, Any]) -> dict[str, bool]:
    """Issue 13's goals, each met or not in this run (ours against LiteLLM's two)."""
    mesh, added = results["mesh"], ratio["added_ttft_ms"]["mesh"]
    fails = [results[f"litellm-{s}"]["failures"] for s in STRATEGIES]

    def failed(f: dict[str, dict[str, int]]) -> int:
        return sum(phase[k] for phase in f.values() for k in ("failed", "hung", "wrong"))

    return {
        "c1_added_at_most_a_fifth_of_litellms": all(
            (r := ratio[f"mesh_over_litellm-{s}"]["added_ttft_c1_p50"]) is not None
            and r <= 0.2 for s in STRATEGIES),
        "c1_added_at_most_2_ms": added["c1_p50"] <= 2.0,
        "c32_p99_at_most_baseline_plus_10_percent": mesh["router"]["c32"]["ttft_ms_p99"]
        <= C32_GOAL * mesh["baseline"]["c32"]["ttft_ms_p99"],
        "burst_within_one_of_even": all(abs(n - BURST / BACKENDS) <= 1
                                        for n in mesh["burst"]["per_backend"]),
        "no_failed_stream_where_litellm_fails": failed(mesh["failures"]) == 0
        and any(failed(f) > 0 for f in fails),
    }


PLOT = """
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data, out = json.load(open(sys.argv[1])), sys.argv[2]
systems = [s for s in ("mesh", "litellm-simple-shuffle", "litellm-least-busy")]
added = data["ratios"]["added_ttft_ms"]
fig, ax = plt.subplots(figsize=(7, 3.5))
keys = ["c1_p50", "c1_p99", "c32_p50", "c32_p99"]
for i, s in enumerate(systems):
    ax.bar([k + i * 0.27 for k in range(4)], [added[s][k] for k in keys], 0.27, label=s)
ax.set_xticks([k + 0.27 for k in range(4)], ["c=1 p50", "c=1 p99", "c=32 p50", "c=32 p99"])
ax.set_ylabel("added time to first token (ms)")
ax.set_title("Added latency over the backend's own HTTP server (lower is better)")
ax.legend()
fig.tight_layout(); fig.savefig(out + "/vs-litellm-latency.png", dpi=120)
fig, ax = plt.subplots(figsize=(7, 3.5))
for i, s in enumerate(systems):
    f = data["results"][s]["failures"]
    counts = [f["killed_mid_stream"]["completed"], f["killed_mid_stream"]["failed"]
              + f["killed_mid_stream"]["hung"] + f["killed_mid_stream"]["wrong"],
              f["after_an_idle_kill"]["completed"], f["after_an_idle_kill"]["failed"]
              + f["after_an_idle_kill"]["hung"] + f["after_an_idle_kill"]["wrong"]]
    ax.bar([k + i * 0.27 for k in range(4)], counts, 0.27, label=s)
ax.set_xticks([k + 0.27 for k in range(4)], ["mid-stream kill: ok", "not ok",
                                              "after idle kill: ok", "not ok"])
ax.set_ylabel("streams (of 30)")
ax.set_title("A backend SIGKILLed under 30 streams, then a second one idle")
ax.legend()
fig.tight_layout(); fig.savefig(out + "/vs-litellm-failures.png", dpi=120)
"""
