"""Time to first token of the mesh at two commits, in one run, printed as JSON.

    .venv/bin/python -m bench.ab_commits BEFORE [AFTER] [--streams 200]

A change worth a tenth of a millisecond is smaller than the drift of a shared VM between
two runs a minute apart. So both commits run at once, each as its own mesh (a broker,
a gateway and three synthetic workers of ``bench.vs_litellm``'s timing), beside the
HTTP baseline (``bench/http_backend.py``), and the streams are interleaved: one to each
system in turn, rotating who goes first. Each system's figure is then taken over the
same minutes. ``AFTER`` defaults to the working tree (uncommitted changes included);
a commit is exported with ``git archive`` into a temporary directory and its roles run
from there, with this checkout's virtual environment.

Two meshes share the two cores, so the absolute added times are higher than in
``bench.vs_litellm`` (one mesh): compare the two commits with each other, and quote
``bench.vs_litellm`` for the mesh against the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.routing import interleaved, pct, provenance
from bench.vs_litellm_systems import BACKENDS, RATE, SLOTS, TOKENS, TTFT, Systems
from testkit.harness import ROOT, Cluster


def checkout(rev: str, into: Path) -> Path:
    """The tree of ``rev`` exported into ``into`` (``rev`` "WORKTREE": this checkout)."""
    if rev == "WORKTREE":
        return ROOT
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "xf", "-", "-C", str(into)], input=archive, check=True)
    return into


def mesh(tmp: Path, root: Path) -> tuple[Cluster, str]:
    cluster = Cluster(tmp, env={"MLX_STACK_HEARTBEAT_INTERVAL": "0.5"}, root=root)
    try:
        cluster.broker()
        for _ in range(BACKENDS):
            cluster.worker("--engine", "synthetic", "--model", "syn", "--slots", str(SLOTS),
                           "--rate", str(RATE), "--ttft", str(TTFT))
        return cluster, cluster.gateway()
    except BaseException:  # e.g. a commit of another protocol version never answers
        cluster.close()
        raise


def figures(ttfts: list[float], base: list[float]) -> dict[str, float]:
    out = {}
    for q in (0.5, 0.9, 0.99):
        name = f"p{round(q * 100)}"
        out[f"ttft_ms_{name}"] = round(pct(ttfts, q), 3)
        out[f"added_ms_{name}"] = round(pct(ttfts, q) - pct(base, q), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="a commit (or WORKTREE)")
    parser.add_argument("after", nargs="?", default="WORKTREE",
                        help="a commit, or WORKTREE (default): this checkout as it is")
    parser.add_argument("--streams", type=int, default=200, help="streams per system")
    args = parser.parse_args()
    report: dict[str, Any] = {"benchmark": "ab_commits", "command": " ".join(sys.argv),
                              **provenance(), "streams": args.streams, "tokens": TOKENS}
    with tempfile.TemporaryDirectory() as tmp:
        systems = Systems(Path(tmp))
        meshes: list[Cluster] = []
        try:
            base, _ = systems.backend()
            urls = [base]
            for i, rev in enumerate((args.before, args.after)):
                cluster, url = mesh(Path(tmp) / f"mesh-{i}",
                                    checkout(rev, Path(tmp) / f"tree-{i}"))
                meshes.append(cluster)
                urls.append(url)
            runs = asyncio.run(interleaved(urls, args.streams, TOKENS))
            ttfts = [[r.ttft * 1000 for r in system] for system in runs]
        finally:
            for cluster in meshes:
                cluster.close()
            systems.close()
    report["http_ttft_ms_p50"] = round(pct(ttfts[0], 0.5), 3)
    revs = {"before": args.before, "after": args.after}
    report["results"] = {which: {"rev": rev, **figures(t, ttfts[0])}
                         for (which, rev), t in zip(revs.items(), ttfts[1:], strict=True)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
