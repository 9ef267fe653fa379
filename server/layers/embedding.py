"""VocabEmbedding: the token embedding, its rows split over the tensor-parallel ranks (vocab-parallel)."""
import torch
import torch.nn.functional as F

from server.layers.partition import Axes, Partition, Partitioned, Shard
from server.tensor_parallel import TensorParallel


def vocab_shard(vocab_size: int, tp: TensorParallel) -> Shard:
    """This rank's rows of the vocabulary; the last rank's run past it when the vocabulary does not split evenly
    (the embedding's rows there stay zero, lm_head's logits there are cut off after the gather)."""
    size = -(-vocab_size // tp.size)
    return Shard(vocab_size, tp.rank * size, size)


class VocabEmbedding(Partitioned):
    AXES = {"weight": Axes(out=0)}

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        super().__init__(hidden_size, vocab_size, Partition((vocab_shard(vocab_size, tp),), Shard.whole(hidden_size)))
        self.tp = tp
        self.weight = torch.nn.Parameter(torch.zeros(self.out_features, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, D]; each rank looks up the ids in its rows, zeros for the rest, and the sum is the row
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        shard = self.partition.outs[0]
        local = input_ids - shard.start
        outside = (local < 0) | (local >= shard.size)
        x = F.embedding(local.clamp(0, shard.size - 1), self.weight).masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)
