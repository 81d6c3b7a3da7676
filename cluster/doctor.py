"""Find what would make a replica hang or fail, in seconds, before it starts.

The usual multi-node failures (a placement group that waits forever, gloo or NCCL bound to
an interface the other node cannot reach, a worker node without the weights or with other
versions, a collective that times out after ten minutes) all look like a long hang once a
replica is starting. The doctor looks for each one directly, every probe with a deadline:

1. the plan, as `serve` makes it (`plan_replica`): the layout fits the cluster and memory;
2. placement: whether every stage's TP group fits on a node now, from the resources Ray
   reports free, before any placement group exists;
3. per node: a task pinned to each node that could host ranks, asking for no CPU so a busy
   node still answers (`cluster.node_facts`): versions, CUDA, free memory, model files,
   the collectives' interface, the Ray token;
4. links: one probe actor per rank, placed by the replica's own `place_workers`
   (`cluster.collective_probe`): TCP between the nodes' collectives' addresses, then the
   real process groups and a timed all-reduce per TP group and send/recv per pipeline edge.

Steps 3 and 4 run at the same time. What fails becomes a row naming the node and the fix
(`cluster.doctor_checks`, `cluster.doctor_links`); a check that needs a failed one is
skipped, never waited for. Nothing is left behind: the probes and their placement groups
are removed before `diagnose` returns.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import ray
from ray._private.state import available_resources_per_node  # DeveloperAPI: free resources per node
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.loader import CheckpointError
from actors.model_shape import ModelShapeError
from actors.sharding import ShardingError
from actors.worker import WorkerSpec
from cluster.collective_probe import CollectiveProbe, Site
from cluster.config import TensorfleetConfig
from cluster.doctor_checks import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    NodeResources,
    auth_rows,
    cuda_rows,
    memory_rows,
    model_rows,
    placement_rows,
    plan_row,
    version_rows,
)
from cluster.doctor_links import collective_rows, interface_rows, reachability_row
from cluster.node_facts import NodeFacts, node_facts
from cluster.placement import (
    PlacementError,
    WorkerGroup,
    place_workers,
    rank_bundle,
    rendezvous_address,
    stages_that_fit,
)
from cluster.plan import Plan, PlanError
from cluster.ray_executor import uses_gpus
from cluster.replica import plan_replica

NODE_FACTS_DEADLINE_S = 30.0  # a node's first task starts a Python worker (the facts import no torch)
PLACEMENT_DEADLINE_S = 60.0  # the groups are placed at once (it fits); starting probes (torch) takes the time
CALL_DEADLINE_S = 10.0  # a probe's quick calls (where it is, listen, connect)
CONNECT_TIMEOUT_S = 2.0
GROUP_TIMEOUT_S = 10.0  # the probes' process groups: a stuck collective raises after this
COLLECTIVES_DEADLINE_S = 30.0  # building the groups and timing them, all ranks together
RELEASE_DEADLINE_S = 10.0  # the probes' resources back in Ray's books

_remote_node_facts = ray.remote(node_facts)


class DoctorError(RuntimeError):
    """The doctor found a problem; the message carries its table."""


@dataclass(frozen=True)
class Report:
    rows: tuple[Check, ...]
    seconds: float

    @property
    def failures(self) -> list[Check]:
        return [r for r in self.rows if r.result == FAIL]

    @property
    def ok(self) -> bool:
        return not self.failures


def diagnose(cfg: TensorfleetConfig) -> Report:
    """Run every check against the connected Ray cluster. Seconds on a healthy or a broken
    cluster alike; a node or probe that does not answer costs its deadline, never more."""
    start = time.monotonic()
    try:
        plan, spec = plan_replica(cfg)
    except (PlanError, ModelShapeError, ShardingError, CheckpointError) as e:
        row = Check("plan", "driver", FAIL, str(e),
                    "change the config as the message says (`tensorfleet plan CONFIG` shows the layout)")
        return Report((row,), time.monotonic() - start)
    rows = [plan_row(plan), *_diagnose(plan, spec)]
    return Report(tuple(rows), time.monotonic() - start)


def format_report(report: Report) -> str:
    """The table: check, node, result, detail; each warn or fail row's fix below it."""
    header = Check("check", "node", "result", "detail")
    rows = [header, *report.rows]
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("check", "node", "result")]
    indent = " " * (sum(widths) + 2 * len(widths))
    lines = []
    for r in rows:
        cells = (r.check, r.node, r.result)
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + r.detail)
        if r.fix:
            lines.append(f"{indent}fix: {r.fix}")
    counts = Counter(r.result for r in report.rows)
    lines.append(f"\ndoctor: {counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail, {counts[SKIP]} skipped "
                 f"in {report.seconds:.1f} s")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Node:
    node_id: str
    ip: str
    resources: NodeResources


def _live_nodes() -> list[_Node]:
    free = available_resources_per_node()
    return [_Node(n["NodeID"], n["NodeManagerAddress"],
                  NodeResources(n["NodeManagerAddress"], n["Resources"], free.get(n["NodeID"], {})))
            for n in ray.nodes() if n.get("Alive")]


def _labels(nodes: list[_Node], stages: dict[str, list[int]]) -> dict[str, str]:
    """node id -> "10.0.0.2 stage 1" (the id's prefix too where simulated nodes share an IP)."""
    shared = Counter(n.ip for n in nodes)
    labels = {}
    for n in nodes:
        name = n.ip if shared[n.ip] == 1 else f"{n.ip} [{n.node_id[:6]}]"
        held = stages.get(n.node_id, [])
        if held:
            name += f" stage {held[0]}" if len(held) == 1 else f" stages {held[0]}-{held[-1]}"
        labels[n.node_id] = name
    return labels


def _diagnose(plan: Plan, spec: WorkerSpec) -> list[Check]:
    tp, pp, device = spec.tp, spec.pp, spec.device
    backend = "nccl" if device == "cuda" else "gloo"
    use_gpu = uses_gpus(spec)
    bundle = rank_bundle(use_gpu)
    nodes = _live_nodes()
    fits = sum(stages_that_fit(n.resources.free, tp, bundle) for n in nodes) >= pp
    candidates = [n for n in nodes if stages_that_fit(n.resources.total, tp, bundle) > 0]
    deadline = time.monotonic() + NODE_FACTS_DEADLINE_S
    pending = {n.node_id: _remote_node_facts.options(
        num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False),
    ).remote(spec.model_path, backend) for n in candidates}
    driver = node_facts(spec.model_path, backend)  # the reference, while the nodes answer

    group, sites, rows = None, [], []
    if fits:
        try:
            group = place_workers(CollectiveProbe, tp, pp, use_gpu=use_gpu, timeout_s=PLACEMENT_DEADLINE_S,
                                  make_args=lambda stage, tp_rank: (stage, tp_rank, tp, pp, device))
            sites = [ray.get([w.site.remote() for w in stage], timeout=CALL_DEADLINE_S) for stage in group.workers]
        except PlacementError as e:
            rows.append(Check("placement", "cluster", FAIL, str(e),
                              "other work took the resources meanwhile, or the probes started too slowly: "
                              "`ray status` shows the cluster; run the doctor again"))
        except RayError as e:
            rows.append(Check("placement", "cluster", FAIL, f"a probe worker failed to start: {_last_line(e)}",
                              "make every node's Python environment match the driver's"))
    try:
        stages: dict[str, list[int]] = {}
        for s, stage in enumerate(sites):
            stages.setdefault(stage[0].node_id, []).append(s)
        labels = _labels(nodes, stages)
        facts, silent = _gather(pending, deadline)
        hosts = list(stages) if sites else [n.node_id for n in candidates]
        checked = {labels[h]: facts[h] for h in hosts if h in facts}

        ordered = sorted(nodes, key=lambda n: hosts.index(n.node_id) if n.node_id in hosts else len(hosts))
        placement, _ = placement_rows(tp, pp, bundle, [
            NodeResources(labels[n.node_id], n.resources.total, n.resources.free) for n in ordered])
        rows = placement + rows
        rows += [Check("node", labels[h], FAIL, f"the doctor's probe {why}",
                       "check the node (`ray status`, its logs under /tmp/ray/session_latest/logs); a failed "
                       "import means its Python environment differs from the driver's")
                 for h, why in silent.items() if h in hosts]
        driver_label = _labels(nodes, {})[ray.get_runtime_context().get_node_id()]
        rows += version_rows(driver_label, driver.versions, {label: f.versions for label, f in checked.items()})
        rows += cuda_rows(checked, device)
        rows += memory_rows(checked, _needs(plan, sites, labels, hosts))
        reference = driver.model.sizes if not driver.model.error else next(
            (f.model.sizes for f in checked.values() if not f.model.error), {})
        rows += model_rows(reference, checked)
        interfaces = interface_rows(checked, spans_hosts=len({f.node_ip for f in checked.values()}) > 1)
        rows += interfaces
        rows += auth_rows(driver, checked)
        if not sites:
            rows.append(Check("collectives", "cluster", SKIP, "not run: no probes were placed"))
        elif any(r.result == FAIL for r in interfaces) or any(h not in facts for h in hosts):
            rows.append(Check("collectives", "cluster", SKIP, "not run: a node's interface or probe failed above"))
        else:
            rows += _links(group, sites, facts, labels, device)
    finally:
        if group is not None:
            group.shutdown()
            _wait_until_returned(nodes, bundle)
    return rows


def _wait_until_returned(nodes: list[_Node], bundle: dict[str, float]) -> None:
    """Ray hands a killed actor's and a removed placement group's resources back a moment
    later; wait (bounded) until the nodes have what they had free before the probes, so
    that what runs next (serve's placement, another doctor) finds them free."""
    deadline = time.monotonic() + RELEASE_DEADLINE_S
    while time.monotonic() < deadline:
        free = available_resources_per_node()
        if all(free.get(n.node_id, {}).get(k, 0) >= n.resources.free.get(k, 0) for n in nodes for k in bundle):
            return
        time.sleep(0.1)


def _gather(pending: dict[str, ray.ObjectRef], deadline: float) -> tuple[dict[str, NodeFacts], dict[str, str]]:
    """Each node's facts, or why there are none (it did not answer in time, or failed)."""
    refs = list(pending.values())
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(deadline - time.monotonic(), 0))
    facts, silent = {}, {}
    for node_id, ref in pending.items():
        if ref not in ready:
            silent[node_id] = f"did not answer within {NODE_FACTS_DEADLINE_S:g} s"
            ray.cancel(ref, force=True)
            continue
        try:
            facts[node_id] = ray.get(ref)
        except RayError as e:
            silent[node_id] = f"failed: {_last_line(e)}"
    return facts, silent


def _needs(plan: Plan, sites: list[list[Site]], labels: dict[str, str],
           hosts: list[str]) -> dict[str, list[tuple[str, int, int | None]]]:
    """Per node label, the ranks it will host: (name, planned bytes, GPU index if known).
    Before placement a node is assumed to host one stage of the hungriest ranks."""
    if not sites:
        need = max(r.total_bytes for r in plan.ranks)
        return {labels[h]: [("of a stage", need, None)] * plan.tp for h in hosts}
    needs: dict[str, list[tuple[str, int, int | None]]] = {}
    for r in plan.ranks:
        site = sites[r.stage][r.tp_rank]
        needs.setdefault(labels[site.node_id], []).append(
            (f"{r.stage}.{r.tp_rank}", r.total_bytes, site.gpu_ids[0] if site.gpu_ids else None))
    return needs


def _links(group: WorkerGroup, sites: list[list[Site]], facts: dict[str, NodeFacts], labels: dict[str, str],
           device: str) -> list[Check]:
    """TCP between every two nodes hosting ranks, then the timed collectives when all connect."""
    first = {}  # node id -> a probe on it
    for stage_sites, workers in zip(sites, group.workers):
        for site, w in zip(stage_sites, workers):
            first.setdefault(site.node_id, w)
    rows = []
    if len(first) > 1:
        listening = dict(zip(first, ray.get([w.listen.remote() for w in first.values()], timeout=CALL_DEADLINE_S)))
        pairs = [(a, b) for a in first for b in first if a != b and listening[b] is not None]
        errors = ray.get([first[a].connect.remote(*listening[b], CONNECT_TIMEOUT_S) for a, b in pairs],
                         timeout=CONNECT_TIMEOUT_S + CALL_DEADLINE_S)
        rows = [reachability_row(labels[a], facts[a], labels[b], facts[b], *listening[b], error)
                for (a, b), error in zip(pairs, errors)]
    if any(r.result == FAIL for r in rows):
        return [*rows, Check("collectives", "cluster", SKIP, "not run: the nodes do not reach each other")]
    if len(group.flat) == 1:
        return rows
    try:
        init_method = rendezvous_address(group.workers[0][0], timeout_s=CALL_DEADLINE_S)
        timings = ray.get([w.measure.remote(init_method, GROUP_TIMEOUT_S) for w in group.flat],
                          timeout=COLLECTIVES_DEADLINE_S)
    except (GetTimeoutError, PlacementError):
        return [*rows, Check("collectives", "cluster", FAIL,
                             f"the probes' process groups and collectives did not finish within "
                             f"{COLLECTIVES_DEADLINE_S:g} s", "look for a stuck or overloaded node in `ray status` "
                             "and the probes' logs; the replica's steps would time out the same way")]
    except RayError as e:
        return [*rows, Check("collectives", "cluster", FAIL, f"a probe's collective failed: {_last_line(e)}",
                             "the TCP checks passed, so look at the probes' logs for the backend's error")]
    stage_nodes = [stage[0].node_id for stage in sites]
    return rows + collective_rows([labels[n] for n in stage_nodes], sites, timings,
                                  [facts[n] for n in stage_nodes], device)


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
