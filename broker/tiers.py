"""One name, one model: which model answers a name (a model id or a tier) that workers of
several models serve. Pure, no I/O but a warning in the log: tested without sockets
(tests/test_jobs.py).

Every worker serves its model under the model's id and its tiers. Two Macs may give one
tier to different models (a node's default model takes ``standard``, and so may a 32B
model on another Mac); a client that asks for ``standard`` must then not get one model
now and another the next time. The rule depends on nothing but the live workers, so
every coordinator, before and after a failover, decides alike:

1. a name that is a model's own id is that model;
2. otherwise, the model that most live workers serve under the name;
3. a tie goes to the model whose id sorts first.

The other models get none of that name's requests while it is ambiguous; the broker warns
once (:func:`warn_ambiguous`), and ``mlx-stack mesh status`` and ``/v1/models`` mark the name.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sized

from mlx_stack.broker.state import WorkerState
from mlx_stack.common.logs import log_event
from mlx_stack.common.status import ModelEntry

log = logging.getLogger("broker")


def choose(name: str, counts: Mapping[str, int]) -> str:
    """The model that answers ``name``, from how many live workers of each model serve it
    (at least one model)."""
    if name in counts:
        return name
    return min(counts, key=lambda model: (-counts[model], model))


def candidates(name: str, workers: Iterable[WorkerState]) -> list[WorkerState]:
    """The workers that may take a job for ``name``: those of the one model it resolves
    to, never a mix of two."""
    serving = [w for w in workers if name in w.names]
    if not serving:
        return []
    model = choose(name, Counter(w.info.model_id for w in serving))
    return [w for w in serving if w.info.model_id == model]


def entries(workers: Iterable[WorkerState],
            queues: Mapping[str, Sized] | None = None) -> list[ModelEntry]:
    """Every name a request may use with the model it resolves to, that model's workers,
    nodes and context length, the name's queue (from ``queues``) and, for an ambiguous
    name, every model that serves it. Sorted by name."""
    by_name: dict[str, dict[str, list[WorkerState]]] = {}
    for worker in workers:
        for name in worker.names:
            by_name.setdefault(name, {}).setdefault(worker.info.model_id, []).append(worker)
    found: dict[str, ModelEntry] = {}
    for name, models in by_name.items():
        model = choose(name, {m: len(ws) for m, ws in models.items()})
        chosen = models[model]
        lengths = [w.info.context_length for w in chosen if w.info.context_length > 0]
        found[name] = ModelEntry(
            id=name, model_id=model, engine=chosen[0].info.engine, workers=len(chosen),
            nodes=sorted({w.info.node_id for w in chosen}),
            context_length=min(lengths, default=0),
            queued=len(queues.get(name, ())) if queues else 0,
            ambiguous=sorted(models) if len(models) > 1 else [])
    for entry in sorted(found.values(), key=lambda e: e.id):
        if entry.is_tier and entry.model_id in found:
            found[entry.model_id].tiers.append(entry.id)
    return sorted(found.values(), key=lambda e: e.id)


def warn_ambiguous(workers: Iterable[WorkerState], warned: set[str]) -> set[str]:
    """Warn once of each name that workers of several models serve (``warned``: those
    already warned of, until they are no longer ambiguous): only one of them gets its
    requests, and the user should give the others another tier. Returns the names
    ambiguous now."""
    found = {e.id: e for e in entries(workers) if e.ambiguous}
    for name in found.keys() - warned:
        entry = found[name]
        log_event(log, "name_ambiguous", logging.WARNING, name=name,
                  models=",".join(entry.ambiguous), routed_to=entry.model_id,
                  fix=f"give one of them another tier: --model SPEC=TIER on its node "
                  f"(or serve in its config.toml's [models]), so '{name}' names one model")
    return set(found)
