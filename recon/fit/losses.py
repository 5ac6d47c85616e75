"""Image losses and metrics of the fit stage (PSNR, SSIM, alpha IoU)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _gauss_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device="cpu") -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, window: int = 11) -> Tensor:
    """Mean SSIM of images a, b [B, H, W, C] in [0, 1] (Gaussian window 11, sigma 1.5,
    'valid' borders like the reference implementation used by 3DGS)."""
    a = a.permute(0, 3, 1, 2)
    b = b.permute(0, 3, 1, 2)
    C = a.shape[1]
    g = _gauss_window(window, dtype=a.dtype, device=a.device)
    kx = g.view(1, 1, 1, -1).expand(C, 1, 1, window)
    ky = g.view(1, 1, -1, 1).expand(C, 1, window, 1)

    def blur(x):
        return F.conv2d(F.conv2d(x, kx, groups=C), ky, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    s_aa = blur(a * a) - mu_a * mu_a
    s_bb = blur(b * b) - mu_b * mu_b
    s_ab = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (s_aa + s_bb + c2)
    return (num / den).mean()


def psnr(a: Tensor, b: Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 99.0 if mse <= 1e-10 else -10.0 * math.log10(mse)


def alpha_iou(pred: Tensor, target: Tensor, threshold: float = 0.5) -> float:
    p, t = pred > threshold, target > threshold
    union = int((p | t).sum())
    return 1.0 if union == 0 else int((p & t).sum()) / union
