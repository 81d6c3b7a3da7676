"""`tensorfleet plan`'s text: the cluster and budget, one row per rank (layers, heads, MLP
columns, memory), and how uneven the TP split is (`balance`)."""

from actors.sharding import RankShard, padded_vocab_size
from cluster.plan import GiB, Plan, gib, layer_params


def balance(plan: Plan) -> list[str]:
    """The TP split's imbalance in words (the same on every stage): each all-reduce waits
    for the rank with the most work, so a step pays for the largest share."""
    if plan.tp == 1:
        return []
    ranks = plan.stages[0].ranks
    how = (f"tensor_split [{', '.join(f'{w:g}' for w in plan.tensor_split)}]"
           if plan.tensor_split is not None else "as even as possible")

    def compare(what: str, unit: str, counts: list[int]) -> str:
        hi, lo = counts.index(max(counts)), counts.index(min(counts))
        if counts[hi] == counts[lo]:
            return f"{what} even ({counts[0]} {unit} per rank)"
        return (f"rank {hi} does {counts[hi] / counts[lo]:.2f}x the {what} work of rank {lo} "
                f"({counts[hi]} vs {counts[lo]} {unit})")

    layer = [layer_params(plan.shape, RankShard(r.heads, r.intermediate)) for r in ranks]
    hi, lo = layer.index(max(layer)), layer.index(min(layer))
    return [
        f"TP split ({how}): "
        + compare("attention", "query heads", [r.heads.num_heads for r in ranks]) + "; "
        + compare("MLP", "columns", [r.intermediate.size for r in ranks]) + ";",
        f"  per layer, rank {hi} holds {layer[hi] / layer[lo]:.2f}x the weights of rank {lo} "
        "(what a decode step reads); each all-reduce waits for the busiest rank",
    ]


def _span(start: int, count: int) -> str:
    return str(start) if count == 1 else f"{start}-{start + count - 1}"


def format_plan(plan: Plan) -> str:
    """A readable table: one row per GPU (stage, tp_rank), memory in GiB, then totals."""
    shape, dtype = plan.shape, str(plan.dtype).removeprefix("torch.")
    c = plan.cluster
    lines = [
        f"model: {shape.architecture}, {shape.num_hidden_layers} layers, "
        f"{shape.num_attention_heads} heads / {shape.num_key_value_heads} KV heads, "
        f"hidden {shape.hidden_size}, vocab {shape.vocab_size} "
        f"(padded to {padded_vocab_size(shape.vocab_size, plan.tp)}), {dtype}",
        f"layout: tensor_parallel_size={plan.tp} x pipeline_parallel_size={plan.pp} = "
        f"{plan.gpus} GPUs on {plan.nodes} node(s); cluster: {c.nodes} node(s) x "
        f"{c.gpus_per_node} GPUs x {gib(c.gpu_memory_bytes)}",
        f"memory per GPU in GiB (budget: gpu_memory_utilization={plan.gpu_memory_utilization}"
        f" x {gib(c.gpu_memory_bytes)} = {gib(plan.budget_bytes)})",
        "",
    ]
    header = ["stage", "layers", "tp_rank", "q_heads", "kv_heads", "mlp_cols",
              "weights", "activ", "kv_cache", "total"]
    rows = [header]
    for st in plan.stages:
        for r in st.ranks:
            h, cols = r.heads, r.intermediate
            rows.append([
                str(st.stage), _span(st.layers.start, len(st.layers)), str(r.tp_rank),
                _span(h.head_start, h.num_heads), _span(h.kv_head_start, h.num_kv_heads),
                _span(cols.start, cols.size),
                *(f"{n / GiB:.2f}" for n in
                  (r.weight_bytes, r.activation_bytes, r.kv_cache_bytes, r.total_bytes)),
            ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [v.ljust(w) if i in (1, 3, 4, 5) else v.rjust(w)
                 for i, (v, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    weights = sum(r.weight_bytes for r in plan.ranks)
    blocks = ", ".join(
        f"stage {st.stage}: " + " / ".join(f"{n / 2**20:.2f}" for n in sorted({r.kv_block_bytes for r in st.ranks}))
        + " MiB"
        for st in plan.stages
    )
    source = "engine.num_kv_blocks" if plan.num_kv_blocks_given else "sized from memory"
    lines += [
        "",
        f"weights: {gib(weights)} over {plan.gpus} GPUs (replicated norms included)",
        f"KV cache: {plan.num_kv_blocks} blocks ({source}) x block_size={plan.block_size} = "
        f"{plan.kv_tokens} tokens = {plan.kv_tokens // plan.max_model_len} full sequences of "
        f"max_model_len={plan.max_model_len}",
        f"bytes per KV block per GPU: {blocks}",
        *balance(plan),
        f"total: {plan.gpus} GPUs, {plan.nodes} node(s)" + (
            f" per replica; {plan.replicas} replicas: {plan.replicas * plan.gpus} GPUs" if plan.replicas > 1 else ""),
        "assumed:",
        *(f"  - {a}" for a in plan.assumptions),
    ]
    return "\n".join(lines)
