"""GPTQ (Frantar et al. 2022) for one linear layer: quantize columns in order and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Lazy-batch form: errors are applied within a block of `block_size` columns as each column is done, and to the
rest of the matrix once per block. act-order quantizes columns by decreasing Hessian diagonal and records the
group of each input channel in g_idx, so the weights stay in their original order.
"""
import torch

from server.quantization.rtn import find_params, pack_gptq, quantize_column


class GPTQ:
    def __init__(self, weight: torch.Tensor):
        # weight: [N, K] (nn.Linear layout)
        self.weight = weight
        self.columns = weight.shape[1]
        self.hessian = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=weight.device)
        self.num_samples = 0

    def add_batch(self, x: torch.Tensor):
        # x: [..., K] inputs of the layer; H = 2/n * sum x x^T, kept as a running mean
        x = x.reshape(-1, self.columns).float()
        n = x.shape[0]
        self.hessian *= self.num_samples / (self.num_samples + n)
        self.num_samples += n
        x = x * (2 / self.num_samples) ** 0.5
        self.hessian += x.t() @ x

    def quantize(self, bits: int, group_size: int, act_order: bool, sym: bool = False, damp: float = 0.01,
                 block_size: int = 128) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Returns the GPTQ checkpoint tensors and the dequantized weight [N, K] (what the layer now computes)."""
        W = self.weight.float().clone()
        H = self.hessian.clone()
        K = self.columns
        gs = K if group_size == -1 else group_size
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
        W, H = W[:, perm], H[perm][:, perm]
        H += damp * torch.mean(torch.diag(H)) * torch.eye(K, device=W.device)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        codes = torch.zeros_like(W)
        dequant = torch.zeros_like(W)
        scales, zeros = [], []
        for i1 in range(0, K, block_size):
            i2 = min(i1 + block_size, K)
            W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
            err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                col = i1 + i
                if col % gs == 0:  # a new group starts: its grid comes from the (error-updated) weights
                    group = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                    scale, zero = find_params(group, bits, sym)
                    scales.append(scale)
                    zeros.append(zero)
                w, d = W1[:, i], Hinv1[i, i]
                q = quantize_column(w, scale, zero, bits)
                codes[:, col] = q
                dequant[:, col] = scale * (q - zero)
                e = (w - dequant[:, col]) / d
                W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]
                err1[:, i] = e
            W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]

        inverse = torch.argsort(perm)
        g_idx = (torch.arange(K, device=W.device) // gs)[inverse]   # the group each original column was quantized in
        codes, dequant = codes[:, inverse], dequant[:, inverse]
        return pack_gptq(codes, torch.stack(scales), torch.stack(zeros), g_idx, bits), dequant
