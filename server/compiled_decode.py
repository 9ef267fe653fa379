"""CompiledDecode: on CPU, the decode step (forward and logits) compiled by torch.compile into Inductor's C++.

A CPU decode step is ~120 small matrix-vector products and ~1,000 small ops. Compiled as one graph with the
weights frozen into it, Inductor fuses the small ops into a few C++ loops and multiplies by its own GEMM
templates over prepacked weights, which read a float32 or int8 weight at close to the memory bandwidth where
ATen's kernels reach half of it. The price: a compile at start (about a minute on two cores for the default
model, less from Inductor's on-disk cache on the next start) and the weights held twice, packed for the graph
and as they are for the eager steps (prefill, LoRA batches).

One graph serves every decode batch: shapes are dynamic, and a batch of one row or a context of one block is
padded to two (slot -1, which the KV write skips; the padding block, masked), so no size is specialized.
The attention is one opaque op (kernels/paged_attention.py: decode_attention) that writes the cache in place.
"""
import logging
import time
import types

import torch

from server.layers.attention import AttentionGroup, AttentionMetadata

log = logging.getLogger("lmserve.engine")

# Compiled and eager sum in other orders (Inductor's GEMMs, fused norms); a larger gap means a miscompile.
# 16-bit and quantized layers (which compute in bfloat16 on CPU) round in other places too.
FLOAT32_TOLERANCE, TOLERANCE = 1e-3, 5e-2


class _DecodeStep(torch.nn.Module):
    """The model's forward and logits for a batch of single-query decodes, as the graph Inductor compiles."""

    def __init__(self, model, windows: tuple):
        super().__init__()
        self.model = model
        self.windows = windows   # the attention windows the layers use (None: full attention), one mask each

    def forward(self, input_ids, positions, kv_caches, slot_mapping, block_tables, masks):
        group = AttentionGroup(slice(None), block_tables, positions.view(-1, 1))   # every row
        group._masks.update(zip(self.windows, masks))
        hidden = self.model(input_ids, positions, kv_caches, AttentionMetadata(slot_mapping, [group]))
        return self.model.compute_logits(hidden)


def _with_own_forward(module: torch.nn.Module) -> torch.nn.Module:
    """module, its forward a copy of its class's with a code object of its own. Dynamo keeps compiled graphs per
    code object and tells them apart by guards; with the guards on modules skipped, another engine's graph (its
    weights frozen in) would otherwise serve this one."""
    f = type(module).forward
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    module.forward = types.MethodType(own, module)
    return module


class CompiledDecode:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, pad_block: int):
        self.model, self.kv_caches, self.block_size, self.pad_block = model, kv_caches, block_size, pad_block
        self.windows = tuple(dict.fromkeys(model.config.sliding_windows))
        self.step = torch.compile(_with_own_forward(_DecodeStep(model, self.windows)), dynamic=False, options={
            "max_autotune": True,    # time Inductor's C++ GEMM templates against ATen's kernels, per shape, once
            "compile_threads": 1,    # the engine core is a daemonic process: no compile worker pool
            # the model's modules do not change after load: guarding each of its hundreds of tensors per call
            # would cost a millisecond a step (which is why each step module needs a forward of its own)
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        })

    def serves(self, batch) -> bool:
        """A batch of decodes only (one group of single queries, each sampled), base model only."""
        groups = batch.meta.groups
        return (len(groups) == 1 and groups[0].shape == (1, 1) and batch.lora_slots is None
                and len(batch.sample_seqs) == 1 and not batch.prompt_scoring)

    def run(self, batch) -> torch.Tensor:
        """The logits [B, V] (float32) of a batch serves() accepted, its K/V written to the cache."""
        group = batch.meta.groups[0]
        return self._run(batch.input_ids, batch.positions, batch.meta.slot_mapping, group.block_tables)

    @torch.inference_mode()
    def _run(self, input_ids, positions, slot_mapping, block_tables) -> torch.Tensor:
        width = block_tables.shape[1]
        if width < 2:   # one block would specialize the graph to it: a second one, the padding block (masked)
            block_tables = torch.cat([block_tables, block_tables.new_full((1, 2 - width), self.pad_block)], dim=1)
        group = AttentionGroup(slice(0, 1), block_tables, positions.view(-1, 1))
        masks = [group.mask(w, self.block_size) for w in self.windows]
        # The context is dynamic (a block more must not recompile); the rest of the graph keeps static shapes.
        torch._dynamo.mark_dynamic(block_tables, 1)
        for m in masks:
            torch._dynamo.mark_dynamic(m, 3)
        # Freezing (the weights become constants, prepacked for the GEMM templates) is read from Inductor's config
        # as it stands on the compiling thread, not from torch.compile's options.
        with torch._inductor.config.patch(freezing=True):
            return self.step(input_ids, positions, self.kv_caches, slot_mapping, block_tables, masks)

    @torch.inference_mode()
    def check_against_eager(self, width: int = 3) -> float:
        """Runs the compiled step and the eager forward on the same made-up rows (slot -1: nothing written) and
        returns the largest logit difference relative to the logits' scale."""
        vocab = self.model.config.vocab_size
        input_ids = torch.tensor([7919 % vocab])
        positions = torch.tensor([width * self.block_size - 3])
        slots = torch.tensor([-1])
        tables = torch.full((1, width), self.pad_block)
        compiled = self._run(input_ids, positions, slots, tables)
        meta = AttentionMetadata(slots, [AttentionGroup(slice(0, 1), tables, positions.view(-1, 1))])
        eager = self.model.compute_logits(self.model(input_ids, positions, self.kv_caches, meta))
        scale = eager.abs().max().clamp_min(1e-6)
        return ((compiled - eager).abs().max() / scale).item()


def build_compiled_decode(model, kv_caches: list[torch.Tensor], block_size: int,
                          pad_block: int) -> CompiledDecode | None:
    """Compiles the step (a warm-up run: one batch serves every later shape) and checks it against the eager
    forward; None (decode runs eagerly) when compiling fails or the graph computes something else, logged as an
    error."""
    start = time.perf_counter()
    compiled = CompiledDecode(model, kv_caches, block_size, pad_block)
    try:
        error = compiled.check_against_eager()
    except Exception:
        log.exception("compiling the decode step failed; decoding eagerly")
        return None
    full_precision = model.quant is None and kv_caches[0].dtype == torch.float32
    if not error <= (FLOAT32_TOLERANCE if full_precision else TOLERANCE):
        log.error("the compiled decode step differs from the eager forward by %.2e of the logits' scale; "
                  "decoding eagerly", error)
        return None
    log.info("decode step compiled in %.1f s; compiled vs eager %.1e", time.perf_counter() - start, error)
    return compiled
