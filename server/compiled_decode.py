"""CompiledDecode: on CPU, the decode step of a request decoding alone (forward and logits) compiled by
torch.compile into Inductor's C++.

A CPU decode step is ~120 small matrix-vector products and ~1,000 small ops. Compiled as one graph with the
weights frozen into it, Inductor fuses the small ops into a few C++ loops and multiplies one row by its own GEMV
templates over prepacked weights, which read an int8 or float32 weight at close to the memory bandwidth where
ATen's kernels reach half of it or less. The price: a compile at start (less from Inductor's disk cache; the load
log says how long) and one more copy of the weights, frozen and packed for the graph, beside the eager steps'
(kernels/float_matmul_cpu.py).

A model quantized by --quant int8/int4 has lm_head rounded to int8 for this step (server/loader.py, int8_lm_head):
the graph reads its int8 codes, a quarter of the float32 bytes, in a multiply-and-sum loop Inductor writes; the
eager steps multiply by the same rounded weight in float.

The graph serves batches of one decode row: for several rows Inductor picks ATen's GEMMs anyway, and a dynamic
row count would lose the templates. The context is dynamic (a context of one block is padded to two with the
padding block, masked, so one block does not specialize it): one graph serves every length. The attention's
reads and products are traced too, the block gather fused into them, and its K/V write, one index_copy_ into the
layer's cache that Inductor does in place (kernels/paged_attention.py). Once checked, the graph may not
recompile: a step that would recompile fails instead, and the model runner goes eager for good.
"""
import logging
import time
import types

import torch

from batching.kv_cache import zero_blocks
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

    def forward(self, input_ids, positions, kv_caches, slot_mapping, block_tables, masks, lm_head_codes=None,
                lm_head_scales=None):
        group = AttentionGroup(slice(None), block_tables, positions.view(-1, 1))   # every row
        group._masks.update(zip(self.windows, masks))
        hidden = self.model(input_ids, positions, kv_caches, AttentionMetadata(slot_mapping, [group]))
        if lm_head_codes is None:
            return self.model.compute_logits(hidden)
        # lm_head rounded to int8 (server/layers/linear.py, Linear.round_to_int8): its codes come in as inputs, not
        # weights frozen in, which Inductor would fold back into a float copy; it fuses the conversion into one
        # multiply-and-sum loop over the int8 codes. The hidden state is returned too: as an output it is stored
        # once, where otherwise the final norm would be recomputed inside the sum of every vocabulary row.
        return (hidden.float()[:, None, :] * lm_head_codes.float()).sum(-1) * lm_head_scales, hidden


def _with_own_forward(module: torch.nn.Module) -> torch.nn.Module:
    """module, its forward a copy of its class's with a code object of its own. Dynamo keeps compiled graphs per
    code object and tells them apart by guards; with the guards on modules skipped, another engine's graph (its
    weights frozen in) would otherwise serve this one."""
    f = type(module).forward
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    module.forward = types.MethodType(own, module)
    return module


class CompiledDecode:
    """The compiled step over the model and its KV caches; the model runner asks serves() before each step."""

    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, pad_block: int):
        self.model, self.kv_caches, self.block_size, self.pad_block = model, kv_caches, block_size, pad_block
        self.windows = tuple(dict.fromkeys(model.config.sliding_windows))
        self.max_positions = model.model.layers[0].self_attn.rotary.cos.shape[0]
        self.checked = False   # set once the graph compiled and matched the eager forward: no recompiles after
        rows = model.lm_head.int8_rows
        self.lm_head_int8 = () if rows is None else (rows.codes, rows.scales)
        # fullgraph: a graph break would leave the model's inner frames compiled without module guards (below),
        # shared by every layer and engine; it fails the compile instead.
        self.step = torch.compile(_with_own_forward(_DecodeStep(model, self.windows)), dynamic=False, fullgraph=True,
                                  options={
            "max_autotune": True,    # time Inductor's C++ GEMM templates against ATen's kernels, per shape, once
            "compile_threads": 1,    # the engine core is a daemonic process: no compile worker pool
            # the model's modules do not change after load: guarding each of its hundreds of tensors per call
            # would cost a millisecond a step (which is why each step module needs a forward of its own)
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        })

    def serves(self, batch) -> bool:
        """One decode (a single query, sampled), base model, no prompt logprobs."""
        groups = batch.meta.groups
        return (len(groups) == 1 and groups[0].shape == (1, 1) and batch.lora_slots is None
                and len(batch.sample_seqs) == 1 and not batch.prompt_scoring)

    def run(self, batch) -> torch.Tensor:
        """The logits [1, V] (float32) of a batch serves() accepted, its K/V written to the cache."""
        group = batch.meta.groups[0]
        return self._run(batch.input_ids, batch.positions, batch.meta.slot_mapping, group.block_tables)

    @torch.inference_mode()
    def _run(self, input_ids, positions, slot_mapping, block_tables) -> torch.Tensor:
        # Inference tensors, always: Dynamo guards on the tensor kind, and the step's inputs come from outside
        # inference mode while the pads and masks are made inside it (a mix would compile a graph per mix).
        input_ids, positions, slot_mapping = input_ids.clone(), positions.clone(), slot_mapping.clone()
        width = block_tables.shape[1]
        if width < 2:   # one block would specialize the graph to it: a second one, the padding block (masked)
            block_tables = torch.cat([block_tables, block_tables.new_full((1, 2 - width), self.pad_block)], dim=1)
        else:
            block_tables = block_tables.clone()
        group = AttentionGroup(slice(0, 1), block_tables, positions.view(-1, 1))
        masks = [group.mask(w, self.block_size) for w in self.windows]
        # The context is dynamic (a block more must not recompile); the rest of the graph keeps static shapes.
        torch._dynamo.mark_dynamic(block_tables, 1)
        for m in masks:
            torch._dynamo.mark_dynamic(m, 3)
        # Freezing (the weights become constants, prepacked for the GEMM templates) is read from Inductor's config
        # as it stands on the compiling thread, not from torch.compile's options.
        with torch._inductor.config.patch(freezing=True), \
                torch.compiler.set_stance("fail_on_recompile" if self.checked else "default"):
            out = self.step(input_ids, positions, self.kv_caches, slot_mapping, block_tables, masks, *self.lm_head_int8)
            return out[0] if self.lm_head_int8 else out

    @torch.inference_mode()
    def check_against_eager(self, width: int = 3) -> float:
        """Compiles the step and compares it with the eager forward on a made-up context: the eager forward writes
        a prompt of about `width` blocks into blocks 0.. (no request holds any yet), then the next token decodes
        compiled (writing its K/V) and eagerly (writing the same slot again); returns the largest logit difference
        relative to the logits' scale. The blocks are zeroed after."""
        width = max(1, min(width, self.pad_block, (self.max_positions - 1) // self.block_size))
        n = min(width * self.block_size, self.max_positions) - 1   # prompt tokens; the decode's position
        vocab = self.model.config.vocab_size
        ids = torch.arange(1, n + 2) * 7919 % vocab
        table = torch.arange(width).view(1, width)
        slots = torch.arange(n + 1)   # blocks 0..width-1 in order: slot == position
        prompt = AttentionMetadata(slots[:n], [AttentionGroup(slice(0, n), table, slots[:n].view(1, n))])
        try:
            self.model(ids[:n], slots[:n], self.kv_caches, prompt)
            decode = (ids[n:], slots[n:], slots[n:], table)
            compiled = self._run(*decode)
            meta = AttentionMetadata(slots[n:], [AttentionGroup(slice(0, 1), table, slots[n:].view(1, 1))])
            eager = self.model.compute_logits(self.model(ids[n:], slots[n:], self.kv_caches, meta))
        finally:
            zero_blocks(self.kv_caches, list(range(width)))
        scale = eager.abs().max().clamp_min(1e-6)
        return ((compiled - eager).abs().max() / scale).item()


def build_compiled_decode(model, kv_caches: list[torch.Tensor], block_size: int,
                          pad_block: int) -> CompiledDecode | None:
    """Compiles the step and checks it against the eager forward; None (decode runs eagerly) when compiling fails
    or the graph computes something else, logged as an error."""
    start = time.perf_counter()
    try:
        compiled = CompiledDecode(model, kv_caches, block_size, pad_block)
        error = compiled.check_against_eager()
    except Exception:
        log.exception("compiling the decode step failed; decoding eagerly")
        return None
    full_precision = model.quant is None and kv_caches[0].dtype == torch.float32
    if not error <= (FLOAT32_TOLERANCE if full_precision else TOLERANCE):
        log.error("the compiled decode step differs from the eager forward by %.2e of the logits' scale; "
                  "decoding eagerly", error)
        return None
    compiled.checked = True
    log.info("decode step compiled in %.1f s; compiled vs eager %.1e", time.perf_counter() - start, error)
    return compiled
