"""One GPU's worth of the model: a plain object the Ray actor wraps (and tests drive directly).

The driver talks to it through a handful of named calls, in order:
    init_groups(init_method) -> load() -> allocate_kv(num_blocks) -> step(StepInput[, handoff]) ...
A worker sits at (stage, tp_rank) of the mesh; it builds only its stage's layers and only
its TP slice of them, and allocates KV blocks only for those layers and its KV heads.
"""

import os
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.attention import PagedAttention, build_attention_metadata
from actors.checkpoint import load_checkpoint
from actors.comm import ParallelContext, init_parallel
from actors.grammar import GrammarVocabulary, tokenizer_json
from actors.model_shape import ModelShape
from actors.models.llama import LlamaStage
from actors.sampler import Sampler
from actors.sampling_state import SequenceStates
from actors.sharding import layer_partition, stage_layers
from actors.step_io import RankStats, SampledToken, StageHandoff, StepInput, StepOutput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SamplerVocabulary:
    """What the sampling rank knows of the tokenizer, from the driver that loaded it."""

    eos_token_ids: tuple[int, ...] = ()  # masked until a sequence's min_tokens
    # The tokenizer as Hugging Face tokenizers JSON, for grammar masks; None: the replica
    # serves no structured outputs.
    tokenizer_json: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, tokenizer: Any, eos_token_ids: Iterable[int]) -> "SamplerVocabulary":
        return cls(tuple(eos_token_ids), tokenizer_json(tokenizer) if tokenizer is not None else None)


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of a replica needs to know (the same for all of them)."""

    model_path: str  # the checkpoint: a Hugging Face folder or a .gguf file
    shape: ModelShape
    tp: int
    pp: int
    layer_partition: list[int] | None
    dtype: str  # a key of DTYPES
    device: str  # "cpu" or "cuda"
    max_model_len: int
    block_size: int
    collective_timeout_s: float = 60.0
    cpu_threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
    model_name: str = ""  # the served name, a label on the rank's metrics
    tensor_split: tuple[float, ...] | None = None  # TP ranks' weights for heads and MLP columns; None: even
    vocabulary: SamplerVocabulary = field(default_factory=SamplerVocabulary)


@dataclass
class FlatBatch:
    """A step's sequences flattened into one row per new token."""

    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)  # new tokens per sequence
    context_lens: list[int] = field(default_factory=list)  # tokens in the KV cache after this step
    tables: list[list[int]] = field(default_factory=list)  # block table per sequence
    sample_rows: list[int] = field(default_factory=list)  # row of the last token of each sampling sequence

    def add(self, token_ids: list[int], start_pos: int, table: list[int], sample: bool) -> None:
        self.token_ids += token_ids
        self.positions += range(start_pos, start_pos + len(token_ids))
        self.query_lens.append(len(token_ids))
        self.context_lens.append(start_pos + len(token_ids))
        self.tables.append(table)
        if sample:
            self.sample_rows.append(len(self.token_ids) - 1)


class Worker:
    def __init__(self, spec: WorkerSpec, stage: int, tp_rank: int):
        self.spec, self.stage, self.tp_rank = spec, stage, tp_rank
        if spec.cpu_threads:
            torch.set_num_threads(spec.cpu_threads)
        self.device = torch.device("cuda", torch.cuda.current_device()) if spec.device == "cuda" else torch.device("cpu")
        self.dtype = DTYPES[spec.dtype]
        self.partition = layer_partition(spec.shape.num_hidden_layers, spec.pp, spec.layer_partition)
        self.ctx = ParallelContext.single()
        self.model: LlamaStage | None = None
        self.num_kv_blocks = 0
        self.block_tables: dict[int, list[int]] = {}
        self.sampler = Sampler(self.device, spec.vocabulary.eos_token_ids)
        self.sequences = SequenceStates(None)  # the sampling rank's memory of each sequence
        self.steps = 0
        self.forward_seconds = 0.0

    # -- setup -------------------------------------------------------------------------

    def init_groups(self, init_method: str) -> None:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.ctx = init_parallel(
            stage=self.stage,
            tp_rank=self.tp_rank,
            tp_size=self.spec.tp,
            pp_size=self.spec.pp,
            init_method=init_method,
            backend=backend,
            timeout_s=self.spec.collective_timeout_s,
        )

    def load(self) -> dict[str, float]:
        """Build this rank's part of the model and read its slices of the checkpoint."""
        start = time.perf_counter()
        with torch.device(self.device):
            self.model = LlamaStage(
                self.spec.shape, self.ctx, stage_layers(self.partition, self.stage), self.dtype, self.spec.max_model_len,
                self.spec.tensor_split,
            ).eval()
        stats = load_checkpoint(self.model, self.spec.model_path)
        vocabulary = self.spec.vocabulary
        if self.ctx.is_sampling_rank and vocabulary.tokenizer_json is not None:
            self.sequences = SequenceStates(
                GrammarVocabulary(vocabulary.tokenizer_json, self.spec.shape.vocab_size, vocabulary.eos_token_ids))
        return {"weight_bytes": self.weight_bytes(), "bytes_read": stats.bytes_read, "largest_read": stats.largest_read,
                "seconds": time.perf_counter() - start}

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _attention_layers(self) -> list[PagedAttention]:
        return [m for m in self.model.modules() if isinstance(m, PagedAttention)]

    def kv_block_bytes(self) -> int:
        """Bytes one KV block costs on this rank: K and V, every layer of the stage."""
        layers = self._attention_layers()
        a = layers[0]
        return 2 * len(layers) * self.spec.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def free_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def allocate_kv(self, num_blocks: int) -> int:
        slots = num_blocks * self.spec.block_size
        for a in self._attention_layers():
            a.kv_cache = torch.zeros(2, slots, a.num_kv_heads, a.head_dim, dtype=self.dtype, device=self.device)
        self.num_kv_blocks = num_blocks
        self.block_tables.clear()
        self.sequences.release(list(self.sequences.states))
        return num_blocks * self.kv_block_bytes()

    # -- steps ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, step: StepInput, prev: StageHandoff | None = None) -> StageHandoff | StepOutput | None:
        """This stage's part of one step: batch = prepare(step), hidden = forward(batch),
        then hand the hidden states to the next stage, or sample.

        Stage s > 0 is called with stage s - 1's handoff for the same step, once that stage
        has returned it: the hidden states are then already on their way over the PP edge.
        A stage before the last returns the handoff for the next; TP rank 0 of the last
        stage returns the sampled tokens, its other ranks None. Either carries how long each
        stage worked on the step (waiting for the previous stage's tensors excluded)."""
        if prev is not None and prev.step_id != step.step_id:
            raise RuntimeError(f"stage {self.stage} got step {step.step_id} with the handoff of step {prev.step_id}")
        start, waited = time.perf_counter(), self.ctx.pp.stats.p2p_seconds
        for seq_id in step.released:
            self.block_tables.pop(seq_id, None)
        self.sequences.release(step.released)
        tokens = self._run(step) if step.seqs else []  # no sequences: only releases, or a probe
        busy_s = (prev.busy_s if prev else ()) + (time.perf_counter() - start - (self.ctx.pp.stats.p2p_seconds - waited),)
        if not self.ctx.is_last_stage:
            return StageHandoff(step.step_id, busy_s)
        return StepOutput(step.step_id, tokens, busy_s) if tokens is not None else None

    def _run(self, step: StepInput) -> list[SampledToken] | None:
        """Forward this stage's layers over the step's tokens; on the last stage, sample
        (on the sampling rank, TP rank 0: the others return None)."""
        sampled = [s for s in step.seqs if s.sample]
        masks = None
        if self.ctx.is_sampling_rank:
            for s in step.seqs:
                self.sequences.absorb(s)
            masks = self.sequences.start_masks(sampled)  # runs beside the forward pass
        batch = self._prepare(step)
        start, p2p_before = time.perf_counter(), self.ctx.tp.stats.p2p_seconds
        try:
            hidden = self._forward(batch)
            if not self.ctx.is_last_stage:
                self.ctx.pp.send_next(hidden)
                return None
            logits = self.model.compute_logits(hidden[batch.sample_rows])
            if logits is None:  # not TP rank 0: the logits were gathered there
                return None
            return self.sampler(logits, self.sequences.rows(sampled), masks.result() if masks is not None else None)
        finally:
            self.steps += 1
            self.forward_seconds += time.perf_counter() - start - (self.ctx.tp.stats.p2p_seconds - p2p_before)

    def _prepare(self, step: StepInput) -> FlatBatch:
        """Extend the block tables by the blocks each sequence gained and flatten the
        sequences' new tokens into one batch."""
        batch = FlatBatch()
        for s in step.seqs:
            table = self.block_tables.setdefault(s.seq_id, [])
            table.extend(s.new_blocks)
            batch.add(s.token_ids, s.start_pos, table, s.sample)
        return batch

    def _forward(self, batch: FlatBatch) -> torch.Tensor:
        """[num_tokens, hidden] after this stage's layers (after the final norm on the last)."""
        meta = build_attention_metadata(batch.query_lens, batch.context_lens, batch.tables, self.spec.block_size,
                                        self.device)
        pos = torch.tensor(batch.positions, device=self.device)
        if self.ctx.is_first_stage:
            x = torch.tensor(batch.token_ids, device=self.device)
        else:
            x = self.ctx.pp.recv_prev((len(batch.token_ids), self.spec.shape.hidden_size), self.dtype, self.device)
        return self.model(x, pos, meta)

    @torch.inference_mode()
    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor] | None:
        """Logits at every position of each prompt (a prefill in scratch blocks), on TP rank
        0 of the last stage; for `tensorfleet verify` and the parity tests. Needs
        allocate_kv with enough blocks for all prompts, and no running sequences."""
        bs = self.spec.block_size
        tables, next_block = [], 0
        for p in prompts:
            n = -(-len(p) // bs)
            tables.append(list(range(next_block, next_block + n)))
            next_block += n
        if next_block > self.num_kv_blocks:
            raise ValueError(f"prompts need {next_block} KV blocks, {self.num_kv_blocks} allocated")
        batch = FlatBatch()
        for p, table in zip(prompts, tables):
            batch.add(p, 0, table, sample=False)
        hidden = self._forward(batch)
        if not self.ctx.is_last_stage:
            self.ctx.pp.send_next(hidden)
            self.ctx.pp.finish_sends()  # a one-off call: its caller may stop the ranks next
            return None
        logits = self.model.compute_logits(hidden)
        return list(logits.cpu().split(batch.query_lens)) if logits is not None else None

    def rank_stats(self) -> RankStats:
        s = self.ctx.tp.stats
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:  # ru_maxrss is in KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return RankStats(
            stage=self.stage, tp_rank=self.tp_rank, steps=self.steps, forward_s=self.forward_seconds,
            all_reduces=s.all_reduces, all_reduce_s=s.all_reduce_seconds, p2p_s=s.p2p_seconds,
            weight_bytes=self.weight_bytes() if self.model is not None else 0,
            kv_cache_bytes=self.num_kv_blocks * self.kv_block_bytes() if self.model is not None else 0,
            peak_memory_bytes=peak,
        )
