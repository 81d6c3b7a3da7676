"""The doctor's judgments, as data: what was gathered goes in, rows come out.

A row is (check, node, result, detail, fix): result is ok, warn (works, but slower or
less safe than it should), fail (the replica would hang or break) or skip (not run,
because a check it needs failed). Every warn or fail row says how to fix it. These are
pure functions of the gathered facts (`cluster.node_facts`), Ray's free resources and the
probes' timings (`cluster.collective_probe`), so each is tested without a cluster;
`cluster.doctor` gathers, with deadlines, and calls them. Nodes are named by labels such as
"10.0.0.2 stage 1" that the caller builds.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.node_facts import NodeFacts
from cluster.placement import stages_that_fit
from cluster.plan import Plan, gib

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(frozen=True)
class Check:
    check: str
    node: str
    result: str  # OK, WARN, FAIL or SKIP
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class NodeResources:
    """A live Ray node's resources: in total, and free right now."""

    label: str
    total: dict[str, float]
    free: dict[str, float]



def plan_row(plan: Plan) -> Check:
    biggest = max(plan.ranks, key=lambda r: r.total_bytes)
    return Check("plan", "cluster", OK,
                 f"tp={plan.tp} x pp={plan.pp}, layers per stage {list(plan.partition)}, "
                 f"{plan.num_kv_blocks} KV blocks; up to {gib(biggest.total_bytes)} per rank "
                 f"(weights {gib(biggest.weight_bytes)}, KV cache {gib(biggest.kv_cache_bytes)})")


def placement_rows(tp: int, pp: int, bundle: dict[str, float],
                   nodes: list[NodeResources]) -> tuple[list[Check], bool]:
    """Whether each stage's TP group fits on a node now, from the free resources Ray reports,
    before any placement group exists (one that cannot be placed waits forever)."""
    room = {n.label: stages_that_fit(n.free, tp, bundle) for n in nodes}
    fits = sum(room.values()) >= pp
    unit = "GPU" if "GPU" in bundle else "CPU"
    rows = []
    for n in nodes:
        capacity = stages_that_fit(n.total, tp, bundle)
        free = ", ".join(f"{n.free.get(k, 0):g} of {n.total.get(k, 0):g} {k}s free" for k in bundle)
        if capacity == 0:
            rows.append(Check("placement", n.label, OK, f"{free}: holds no stage of tp={tp} {unit}s"))
        elif room[n.label] < capacity and not fits:
            rows.append(Check(
                "placement", n.label, FAIL,
                f"{free}: room for {room[n.label]} of its {capacity} stage(s) of tp={tp}; other work holds the rest",
                f"free them on {n.label} (`ray list actors` and `ray list placement-groups` show what "
                "holds them) or wait for that work to end; or add nodes"))
        else:
            rows.append(Check("placement", n.label, OK, f"{free}: room for {room[n.label]} stage(s) of tp={tp} now"))
    summary = f"{pp} stage(s) of {tp} {unit}s (+1 CPU each), each stage on one node: room for {sum(room.values())} now"
    if fits:
        rows.append(Check("placement", "cluster", OK, summary))
    else:
        rows.append(Check("placement", "cluster", FAIL,
                          summary + "; the replica's placement groups would wait until the deadline",
                          "free GPUs on the nodes marked above, add nodes, or lower parallel.pipeline_parallel_size"))
    return rows, fits


def version_rows(driver_label: str, driver: dict[str, str], nodes: dict[str, dict[str, str]]) -> list[Check]:
    """Every node that hosts ranks runs what the driver runs (pickled steps, weights and
    process groups cross between them)."""
    rows = []
    for label, found in nodes.items():
        differ = [k for k in driver if found.get(k) != driver[k]]
        if not differ:
            rows.append(Check("versions", label, OK, ", ".join(f"{k} {v}" for k, v in found.items())))
            continue
        detail = "; ".join(f"{k} {found.get(k)} here, {driver[k]} on the driver ({driver_label})" for k in differ)
        fixes = []
        if packages := [k for k in differ if k in ("torch", "ray", "transformers")]:
            fixes.append("pip install " + " ".join(f"{k}=={driver[k]}" for k in packages))
        if "python" in differ:
            fixes.append(f"use Python {driver['python']}")
        if "tensorfleet" in differ:
            fixes.append("sync the driver's tensorfleet checkout to it (`ray up` does, into ~/tensorfleet)")
        rows.append(Check("versions", label, FAIL, detail,
                          f"on {label}: {'; '.join(fixes)}; then restart Ray there so new workers load it"))
    return rows


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def cuda_rows(nodes: dict[str, NodeFacts], device: str) -> list[Check]:
    rows = []
    for label, f in nodes.items():
        if not f.gpus:
            if device == "cuda":
                rows.append(Check("cuda", label, FAIL, "no NVIDIA GPU here (nvidia-smi is missing or fails)",
                                  "install the NVIDIA driver on this node, or keep it out of the cluster"))
            else:
                rows.append(Check("cuda", label, OK, "no NVIDIA GPU; the replica runs on CPU"))
            continue
        gpus = f"{len(f.gpus)} x {f.gpus[0].name}, driver {f.driver} (CUDA up to {f.driver_cuda})"
        if device != "cuda":
            rows.append(Check("cuda", label, WARN, f"{gpus}, but the replica runs on CPU",
                              "set parallel.device: cuda (auto picks CPU when the driver's machine has no GPU)"))
        elif f.torch_cuda is None:
            rows.append(Check("cuda", label, FAIL, f"{gpus}, but torch {f.versions.get('torch')} is a CPU build",
                              f"install torch's CUDA build on this node (CUDA {f.driver_cuda} or older), e.g. "
                              "pip install torch --index-url https://download.pytorch.org/whl/cu128"))
        elif f.driver_cuda and _version(f.torch_cuda) > _version(f.driver_cuda):
            rows.append(Check("cuda", label, FAIL, f"{gpus}; torch is built for CUDA {f.torch_cuda}, newer than the driver supports",
                              f"upgrade the NVIDIA driver, or install a torch built for CUDA {f.driver_cuda} or older"))
        else:
            rows.append(Check("cuda", label, OK, f"{gpus}; torch built for CUDA {f.torch_cuda}"))
    return rows


def memory_rows(nodes: dict[str, NodeFacts], needs: dict[str, list[tuple[str, int, int | None]]]) -> list[Check]:
    """Free memory against the plan: `needs[label]` lists the ranks the node will host as
    (rank name, bytes the plan gives it, its GPU index or None when not known yet). On
    GPUs each rank's GPU must have its share free; on CPU the node's RAM holds them all."""
    rows = []
    for label, f in nodes.items():
        ranks = needs.get(label, [])
        if not ranks:
            continue
        if not f.gpus:
            need = sum(n for _, n, _ in ranks)
            detail = f"{gib(f.ram_available_bytes)} of RAM available; its {len(ranks)} rank(s) need {gib(need)}"
            rows.append(Check("memory", label, OK, detail) if need <= f.ram_available_bytes else Check(
                "memory", label, FAIL, detail, "free RAM on this node, or lower engine.num_kv_blocks / max_num_seqs"))
            continue
        by_index = {g.index: g for g in f.gpus}
        spare = sorted(f.gpus, key=lambda g: -g.free_bytes)  # ranks not placed yet get the freest GPUs
        short = []
        for (rank, need, index), fallback in zip(ranks, spare):
            gpu = by_index.get(index, fallback)
            if gpu.free_bytes < need:
                short.append(f"GPU {gpu.index} has {gib(gpu.free_bytes)} free, rank {rank} needs {gib(need)}")
        if short:
            rows.append(Check("memory", label, FAIL, "; ".join(short),
                              "free those GPUs (nvidia-smi lists what holds them), or lower "
                              "engine.gpu_memory_utilization or engine.num_kv_blocks"))
        else:
            rows.append(Check("memory", label, OK, f"every rank's GPU has its share free (up to "
                              f"{gib(max(n for _, n, _ in ranks))} per rank)"))
    return rows


def model_rows(reference: dict[str, int], nodes: dict[str, NodeFacts]) -> list[Check]:
    """The model's files readable on every node that hosts ranks, at the path the workers
    get, and the same size as the reference copy (`reference`: name -> bytes)."""
    rows = []
    for label, f in nodes.items():
        m = f.model
        where = f"{m.path} on {label}"
        if m.error:
            rows.append(Check("model files", label, FAIL, m.error,
                              f"copy the model to {where}, or mount shared storage at that path on every node"))
            continue
        differ = [f"{name} is {size:,} bytes here, {reference[name]:,} on the reference copy"
                  for name, size in m.sizes.items() if name in reference and reference[name] != size]
        if differ:
            rows.append(Check("model files", label, FAIL, "; ".join(differ),
                              f"copy the model to {where} again: this copy is incomplete or another model"))
        else:
            total = sum(m.sizes.values())
            rows.append(Check("model files", label, OK,
                              f"{m.path}: {len(m.sizes)} files readable ({total / 2**20:.1f} MiB)"))
    return rows


def auth_rows(driver: NodeFacts, nodes: dict[str, NodeFacts]) -> list[Check]:
    """Token auth on, and every node's processes holding the driver's token (compared by
    fingerprint: a SHA-256 prefix, never the token)."""
    rows = []
    want = (driver.auth_mode, driver.token_fingerprint)
    for label, f in nodes.items():
        have = (f.auth_mode, f.token_fingerprint)
        if have != want:
            rows.append(Check(
                "ray auth", label, FAIL,
                f"{f.auth_mode}, token {f.token_fingerprint or 'none'} here; {driver.auth_mode}, token "
                f"{driver.token_fingerprint or 'none'} on the driver (SHA-256 prefixes)",
                "give every node the cluster's token (the same ~/.ray/auth_token, or RAY_AUTH_TOKEN / "
                "RAY_AUTH_TOKEN_PATH) and RAY_AUTH_MODE=token, then restart Ray there"))
        elif f.auth_mode != "token":
            rows.append(Check("ray auth", label, WARN,
                              "token auth is off: whoever reaches the cluster's ports can run code on it",
                              "create a token (`ray get-auth-token --generate`), copy it to every node and "
                              "start Ray with RAY_AUTH_MODE=token"))
        else:
            rows.append(Check("ray auth", label, OK, f"token auth, the driver's token ({f.token_fingerprint})"))
    return rows
