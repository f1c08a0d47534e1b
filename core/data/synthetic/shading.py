"""Shading: a sampled light, Lambert + Blinn specular shading of the height field, studio backgrounds."""
from __future__ import annotations

import dataclasses

import numpy as np

from .primitives import Grid, Layers, lerp


@dataclasses.dataclass
class Light:
    direction: np.ndarray
    ambient: float
    intensity: float


def sample_light(rng: np.random.Generator) -> Light:
    az = rng.uniform(0, 2 * np.pi)
    el = rng.uniform(np.radians(40), np.radians(70))
    d = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], np.float32)
    return Light(d, ambient=float(rng.uniform(0.3, 0.45)), intensity=float(rng.uniform(0.9, 1.1)))


def compose(layers: Layers, light: Light, background: np.ndarray, noise_field: np.ndarray) -> np.ndarray:
    """Shade the height field (Lambert + Blinn specular) and composite over the background; uint8 RGB.

    Element-wise arithmetic only (no BLAS matmul): the result of a pixel depends on its inputs alone,
    never on memory layout, so an edited copy of the layers renders bit-identically outside the edit.
    """
    # edits may promote a layer to float64; values they did not touch round-trip to float32 exactly
    albedo, height, fg = (a.astype(np.float32, copy=False) for a in (layers.albedo, layers.height, layers.fg))
    gy, gx = np.gradient(height)
    inv = 1.0 / np.sqrt(gx * gx + gy * gy + 1.0)
    nx, ny, nz = -gx * inv, -gy * inv, inv
    lx, ly, lz = (float(v) for v in light.direction)
    diffuse = np.clip(nx * lx + ny * ly + nz * lz, 0, None)
    hx, hy, hz = lx, ly, lz + 1.0
    hn = np.sqrt(hx * hx + hy * hy + hz * hz)
    c = np.clip((nx * hx + ny * hy + nz * hz) / hn, 0, None)
    c8 = (c * c) * (c * c)
    c8 = c8 * c8
    spec = (c8 * c8) * c8 * layers.gloss  # c**24 by exact products: pow() may differ by an ulp with alignment
    shade = light.intensity * (light.ambient + (1 - light.ambient) * diffuse)
    color = albedo * shade[..., None] + spec[..., None]
    img = lerp(background, color, fg) + noise_field
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def plain_background(g: Grid, rng: np.random.Generator, base: float, tint: float = 0.0) -> np.ndarray:
    """A studio background: base grey, slight colour tint, soft illumination gradient."""
    col = base + tint * rng.uniform(-1, 1, 3)
    ang = rng.uniform(0, 2 * np.pi)
    grad = 1 + 0.08 * (np.cos(ang) * g.X + np.sin(ang) * g.Y)
    return np.clip(col[None, None, :] * grad[..., None], 0, 1).astype(np.float32)
