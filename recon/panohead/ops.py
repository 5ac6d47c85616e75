"""StyleGAN2 building-block maths as plain tensor ops (no custom CUDA kernels).

These reproduce the *reference* paths of NVIDIA's bias_act / upfirdn2d /
conv2d_resample, operation for operation, so results match the official code to
rounding on CPU (PanoHead's CPU path already uses those reference paths).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SQRT2 = math.sqrt(2.0)


def setup_filter(taps=(1, 3, 3, 1)) -> torch.Tensor:
    """Separable FIR taps -> normalised 2-D filter [fh, fw] (outer product / sum)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = f.ger(f)  # 4 taps < 8, so the official code keeps it non-separable
    return f / f.sum()


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, act: str = "linear",
             gain: float | None = None, clamp: float | None = None, dim: int = 1) -> torch.Tensor:
    """x + b, activation, * gain, clamp to +-clamp. lrelu uses alpha 0.2, default gain sqrt(2)."""
    if b is not None:
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
        gain = SQRT2 if gain is None else gain
    elif act == "linear":
        gain = 1.0 if gain is None else gain
    else:
        raise ValueError(f"unsupported activation {act!r}")
    if float(gain) != 1:
        x = x * float(gain)
    if clamp is not None and clamp >= 0:
        x = x.clamp(-float(clamp), float(clamp))
    return x


def upfirdn2d(x: torch.Tensor, f: torch.Tensor | None, up: int = 1, down: int = 1,
              padding=(0, 0, 0, 0), gain: float = 1.0) -> torch.Tensor:
    """Zero-insert upsample, pad (x0, x1, y0, y1; negative crops), FIR filter, decimate."""
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    b, c, h, w = x.shape
    px0, px1, py0, py1 = padding
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    f = f * (gain ** (f.ndim / 2))
    f = f.to(x.dtype).flip(list(range(f.ndim)))  # convolution, not correlation
    f = f[None, None].repeat([c, 1] + [1] * f.ndim)
    x = F.conv2d(x, f, groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """FIR upsampling by `up` keeping the image centred (the skip-image path)."""
    fh, fw = f.shape
    p = [(fw + up - 1) // 2, (fw - up) // 2, (fh + up - 1) // 2, (fh - up) // 2]
    return upfirdn2d(x, f, up=up, padding=p, gain=up * up)


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor | None = None, up: int = 1,
                    padding: int = 0, groups: int = 1, flip_weight: bool = True) -> torch.Tensor:
    """2-D convolution with optional FIR upsampling (the cases StyleGAN2's generator uses:
    up 1 with symmetric padding, and up 2 = transposed conv + FIR)."""
    out_ch, in_per_group, kh, kw = w.shape
    px0 = px1 = py0 = py1 = padding
    if up > 1:
        fh, fw = f.shape
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
        if kh == 1 and kw == 1:
            x = F.conv2d(x, w if flip_weight else w.flip([2, 3]), groups=groups)
            return upfirdn2d(x, f, up=up, padding=(px0, px1, py0, py1), gain=up * up)
        # Transposed convolution wants [in, out/groups, kh, kw] per group.
        if groups == 1:
            w = w.transpose(0, 1)
        else:
            w = w.reshape(groups, out_ch // groups, in_per_group, kh, kw).transpose(1, 2)
            w = w.reshape(groups * in_per_group, out_ch // groups, kh, kw)
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        if flip_weight:  # the transposed conv already flips; correlation semantics need a flip
            w = w.flip([2, 3])
        x = F.conv_transpose2d(x, w, stride=up, padding=[pyt, pxt], groups=groups)
        return upfirdn2d(x, f, padding=(px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt), gain=up * up)
    if not flip_weight and (kh > 1 or kw > 1):
        w = w.flip([2, 3])
    return F.conv2d(x, w, padding=[py0, px0], groups=groups)


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                     noise: torch.Tensor | None = None, up: int = 1, padding: int = 0,
                     resample_filter: torch.Tensor | None = None, demodulate: bool = True,
                     flip_weight: bool = True, fused_modconv: bool = True) -> torch.Tensor:
    """StyleGAN2 modulated convolution. x [B, I, H, W], weight [O, I, k, k], styles [B, I]."""
    batch = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    if x.dtype == torch.float16 and demodulate:
        # Pre-normalise to keep fp16 in range (the official fp16 path does this too).
        weight = weight * (1 / math.sqrt(in_ch * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    w = dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)  # [B, O, I, k, k]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [B, O]
    if demodulate and fused_modconv:
        w = w * dcoefs.reshape(batch, -1, 1, 1, 1)

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, padding=padding, flip_weight=flip_weight)
        if demodulate and noise is not None:
            x = torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch, -1, 1, 1))
        elif demodulate:
            x = x * dcoefs.to(x.dtype).reshape(batch, -1, 1, 1)
        elif noise is not None:
            x = x + noise.to(x.dtype)
        return x

    # One grouped convolution: the batch becomes the group dimension.
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_ch, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, padding=padding, groups=batch, flip_weight=flip_weight)
    x = x.reshape(batch, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise.to(x.dtype)  # keep fp16 blocks in fp16 (the official code adds in place)
    return x
