"""The Hugging Face baselines: `generate` with static batching, in one process or sharded
with transformers' own tensor parallelism (`tp_plan="auto"`) under torchrun.

Static batching as well as it goes: all requests arrive at once, prompts are sorted by
length and left-padded into batches, each batch decodes greedily (EOS ignored) to its
longest output. A streamer stamps every decode step, so each request's TTFT, inter-token
and end-to-end latency count up to its own last useful token (generous: a real static
server answers when the whole batch is done); only the tokens asked for count as output.

Under torchrun (what `deploy.bench.compare` launches):

    torchrun --nproc-per-node 2 -m deploy.bench.hf --model DIR --workload SPEC.json \
        --batch-size 32 --out hf_tp.json

each rank loads its shards (`DistributedConfig(tp_plan="auto")`, gloo on CPU, NCCL on
GPUs), runs the same batches, and rank 0 writes the summary, every rank's parameter count
(to show the weights really are split) and the greedy tokens of the first two requests
(to show the sharded model computes what the single-process one does).
"""

import argparse
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from deploy.bench.stats import RequestRecord, summarize
from deploy.bench.workload import Workload, WorkloadSpec, make_workload

CHECK_REQUESTS = 2  # requests whose greedy tokens the TP run reports, for the equality check
CHECK_TOKENS = 16


class StepClock(BaseStreamer):
    """Time of each decode step: `generate` puts the prompt first, then each step's tokens."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def greedy_generate(model, prompts: list[list[int]], new_tokens: int, device: torch.device,
            streamer: BaseStreamer | None = None) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding, as generate expects
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0, streamer=streamer)
    return out[:, width:].cpu()


def run_static(model, work: Workload, batch_size: int, device: torch.device) -> tuple[list[RequestRecord], float]:
    """The whole workload in static batches, after a short warm-up; (records, seconds)."""
    greedy_generate(model, [work.prompts[0][:8]], 2, device)
    order = sorted(range(len(work.prompts)), key=lambda i: len(work.prompts[i]))
    start = time.perf_counter()
    records = [RequestRecord(len(p), n, start=start) for p, n in zip(work.prompts, work.output_lens)]
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        clock = StepClock()
        greedy_generate(model, [work.prompts[i] for i in idx], max(work.output_lens[i] for i in idx), device, clock)
        for i in idx:
            records[i].chunk_times = clock.times[: work.output_lens[i]]
            records[i].output_tokens = work.output_lens[i]
    return records, time.perf_counter() - start


def static_batches(model, work: Workload, batch_sizes: Iterable[int], device: torch.device,
                   log: Callable[[str], None] = print) -> dict[int, dict]:
    """The workload's summary at each static batch size (the best is the comparison's)."""
    by_size = {}
    for bs in batch_sizes:
        start = time.perf_counter()
        by_size[bs] = summarize(*run_static(model, work, bs, device))
        seconds = time.perf_counter() - start
        log(f"  HF static batch {bs}: {by_size[bs]['output_tok_s']:.1f} output tok/s ({seconds:.0f} s)")
    return by_size


def check_tokens(model, work: Workload, device: torch.device) -> list[list[int]]:
    """Greedy tokens of the first requests, each alone (no padding)."""
    return [greedy_generate(model, [p], CHECK_TOKENS, device)[0].tolist() for p in work.prompts[:CHECK_REQUESTS]]


def local_params(model) -> int:
    """Parameters this process holds: a DTensor's local shard, not its global shape."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def main_tp(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(
        args.model, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32).eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(model.parameters()).device
    work = make_workload(WorkloadSpec.from_json(json.loads(args.workload.read_text())))
    params = [None] * world
    dist.all_gather_object(params, local_params(model))
    tokens = check_tokens(model, work, device)
    records, seconds = run_static(model, work, args.batch_size, device)
    if rank == 0:
        result = {"world_size": world, "batch_size": args.batch_size, "threads_per_rank": torch.get_num_threads(),
                  "params_full": sum(p.numel() for p in model.parameters()), "params_per_rank": params,
                  "check_tokens": tokens, **summarize(records, seconds)}
        args.out.write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="HF tp_plan='auto' static-batching benchmark; run under torchrun")
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--workload", type=Path, required=True, help="a WorkloadSpec as JSON")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    main_tp(parser.parse_args())
