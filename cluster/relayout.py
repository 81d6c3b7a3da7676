"""Change a running replica's layout (the `parallel` section) or engine sizes (the `engine`
section) without failing a request.

A change is a mapping `{"parallel": {...}, "engine": {...}}` whose fields replace those of
the deployed config (Serve's `user_config`; `tensorfleet serve` sends the sections of the
edited YAML). It is checked completely before the running workers are touched:

1. the merged config validates (errors name the field, as for the YAML);
2. the planner accepts it against the model and the cluster's nodes (`cluster/plan.py`);
3. the new workers fit in what the cluster has free plus what the running workers will
   release (`cluster.placement.check_room`);
4. every request in flight fits the new limits (max_model_len, KV cache).

Only then does `Engine.relayout` pause after the step in flight, replace the workers and
resume every request on the new ones. A refusal raises `LayoutRefused` and changes nothing.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from actors.worker import WorkerSpec
from cluster.config import TensorfleetConfig, format_validation_error
from cluster.engine import Engine
from cluster.executor import InProcessExecutor
from cluster.placement import PlacementError
from cluster.plan import Plan, PlanError
from cluster.replica import build_executor, engine_limits, plan_replica

LAYOUT_SECTIONS = ("parallel", "engine")
Layout = dict[str, dict[str, Any]]


class LayoutRefused(ValueError):
    """A layout the replica will not take; the running one is untouched. The message says why."""


@dataclass(frozen=True)
class LayoutStatus:
    """What a replica runs, and the last change it refused (with why), for operators."""

    applied: Layout
    refused: Layout | None = None
    reason: str | None = None


def layout_of(cfg: TensorfleetConfig) -> Layout:
    return {section: getattr(cfg, section).model_dump() for section in LAYOUT_SECTIONS}


def with_layout(deployed: TensorfleetConfig, layout: Mapping[str, Any]) -> TensorfleetConfig:
    """The deployed config with the fields of `layout` in place of its own."""
    if not isinstance(layout, Mapping) or not all(isinstance(v, Mapping) for v in layout.values()):
        raise LayoutRefused(f"a layout is a mapping of sections ({', '.join(LAYOUT_SECTIONS)}) to fields")
    if others := sorted(set(layout) - set(LAYOUT_SECTIONS)):
        raise LayoutRefused(f"{', '.join(others)}: only {' and '.join(LAYOUT_SECTIONS)} change while serving; "
                            "other settings need a new deployment")
    data = deployed.model_dump()
    for section, fields in layout.items():
        data[section] = {**data[section], **fields}
    try:
        return TensorfleetConfig.model_validate(data)
    except ValidationError as e:
        raise LayoutRefused(format_validation_error(e, "(layout)")) from None


def plan_layout(engine: Engine, cfg: TensorfleetConfig) -> tuple[Plan, WorkerSpec]:
    """Steps 2-4 above for `cfg` on this engine's cluster; its plan, or `LayoutRefused`."""
    try:
        plan, spec = plan_replica(cfg)
        spec = replace(spec, vocabulary=engine.executor.spec.vocabulary)  # the same tokenizer
        if isinstance(engine.executor, InProcessExecutor):  # an engine without Ray
            if plan.gpus > 1:
                raise LayoutRefused(f"tp={plan.tp} x pp={plan.pp} needs Ray; this engine runs without it")
        else:
            from cluster.placement import check_room
            from cluster.ray_executor import uses_gpus

            check_room(plan.tp, plan.pp, use_gpu=uses_gpus(spec), released=engine.executor.group)
    except (PlanError, PlacementError) as e:
        raise LayoutRefused(str(e)) from None
    if misfits := engine.misfits(engine_limits(cfg), plan.num_kv_blocks):
        rid, why = next(iter(misfits.items()))
        raise LayoutRefused(f"{len(misfits)} request(s) in flight would not fit, e.g. {rid}: {why}")
    return plan, spec


async def relayout(engine: Engine, cfg: TensorfleetConfig, log: Callable[[str], None]) -> float:
    """Check `cfg`, then move the engine onto its workers; the seconds requests were paused."""
    plan, spec = plan_layout(engine, cfg)
    par = cfg.parallel
    log(f"re-laying out to tp={par.tensor_parallel_size} x pp={par.pipeline_parallel_size}; requests pause")
    return await engine.relayout(engine_limits(cfg), lambda: build_executor(cfg, plan, spec, log))
