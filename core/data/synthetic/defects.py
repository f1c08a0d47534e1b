"""The seven defect types. Each edits a product's layers and returns its coverage ``alpha``."""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from .primitives import Grid, Layers, Part, aa, hard_cut, lerp, noise, polyline_alpha
from .products import DEFECT_TYPES


# Each: (layers, rng, g, spec, params) -> alpha; edits layers in place; leaves them bit-identical where alpha == 0.


def _centre(rng, layers: Layers, g: Grid, near: np.ndarray | None = None) -> np.ndarray:
    region = layers.surface if near is None else near
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        ys, xs = np.nonzero(layers.fg > 0.5)
    i = rng.integers(len(ys))
    return np.array([g.X[ys[i], xs[i]], g.Y[ys[i], xs[i]]], np.float32)


def _curve(rng, start, length, bend, n=40):
    ang = rng.uniform(0, 2 * np.pi)
    d = np.array([np.cos(ang), np.sin(ang)])
    normal = np.array([-d[1], d[0]])
    t = np.linspace(-0.5, 0.5, n)[:, None]
    return start + t * length * d + (0.25 - t ** 2) * bend * normal


def scratch(layers, rng, g, spec, p):
    scale = g.R / 128
    pts = _curve(rng, _centre(rng, layers, g), rng.uniform(0.25, 0.6), rng.uniform(-0.3, 0.3))
    alpha = hard_cut(polyline_alpha(pts, rng.uniform(1.0, 1.8) * scale, g.R) * (layers.fg > 0.99))
    bright = rng.uniform() < 0.6
    layers.albedo = lerp(layers.albedo, np.clip(layers.albedo * (1.7 if bright else 0.4) + (0.15 if bright else 0), 0, 1), alpha)
    layers.height = layers.height - 1.2 * alpha
    return alpha


def crack(layers, rng, g, spec, p):
    scale = g.R / 128
    c = _centre(rng, layers, g)
    alpha = np.zeros(g.X.shape, np.float32)
    for branch in range(rng.integers(1, 3)):
        n = rng.integers(8, 16)
        ang = rng.uniform(0, 2 * np.pi)
        step = rng.uniform(0.03, 0.05)
        pts = [c]
        for _ in range(n):
            ang += rng.normal(0, 0.5)
            pts.append(pts[-1] + step * np.array([np.cos(ang), np.sin(ang)]))
        alpha = np.maximum(alpha, polyline_alpha(np.array(pts), rng.uniform(1.2, 2.2) * scale, g.R))
    alpha = hard_cut(alpha * (layers.fg > 0.99))
    layers.albedo = lerp(layers.albedo, layers.albedo * 0.15, alpha)
    layers.height = layers.height - 3.0 * alpha
    return alpha


def _blob(rng, g, centre, radius, roughness=0.35, cells=6):
    d = np.hypot(g.X - centre[0], g.Y - centre[1]) / radius
    wobble = noise(rng, g.R, cells) * roughness
    return hard_cut(aa((d - 1 - wobble) * radius, g.px * 1.5))


def hole(layers, rng, g, spec, p):
    radius = rng.uniform(0.05, 0.11)
    c = _centre(rng, layers, g)
    alpha = _blob(rng, g, c, radius, 0.25) * (layers.fg > 0.99)
    d = np.clip(np.hypot(g.X - c[0], g.Y - c[1]) / (radius * 1.3), 0, 1)
    interior = np.float32(rng.uniform(0.02, 0.08))
    layers.albedo = lerp(layers.albedo, interior + 0.25 * layers.albedo * d[..., None], alpha)
    layers.height = lerp(layers.height, layers.height - 6 * (1 - d ** 2), alpha)
    return alpha


STAIN_COLOURS = np.array([[0.45, 0.3, 0.12], [0.12, 0.1, 0.1], [0.8, 0.2, 0.15], [0.2, 0.35, 0.8], [0.95, 0.92, 0.8]], np.float32)


def stain(layers, rng, g, spec, p):
    radius = rng.uniform(0.07, 0.16)
    alpha = _blob(rng, g, _centre(rng, layers, g), radius, 0.5, 5) * (layers.fg > 0.99)
    # the colour most unlike the surface under the stain, mixed into the albedo before shading,
    # so the stain is lit like the surface it lies on
    under = layers.albedo[alpha > 0].mean(0) if (alpha > 0).any() else layers.albedo.mean((0, 1))
    far = np.argsort(-np.abs(STAIN_COLOURS - under).sum(1))[: 3]
    colour = STAIN_COLOURS[far[rng.integers(3)]]
    layers.albedo = lerp(layers.albedo, colour * (1 + 0.1 * noise(rng, g.R, 12))[..., None], alpha * rng.uniform(0.55, 0.85))
    return alpha


def contamination(layers, rng, g, spec, p):
    scale = g.R / 128
    c = _centre(rng, layers, g)
    if rng.uniform() < 0.5:  # fibre
        pts = _curve(rng, c, rng.uniform(0.2, 0.45), rng.uniform(-0.6, 0.6))
        alpha = hard_cut(polyline_alpha(pts, rng.uniform(1.5, 2.5) * scale, g.R))
    else:  # particle / smear
        alpha = _blob(rng, g, c, rng.uniform(0.04, 0.09), 0.45)
    if not layers.grow_surface:
        alpha = alpha * (layers.fg > 0.99)
    colour = np.float32(rng.choice([0.08, 0.9])) + rng.uniform(-0.05, 0.05, 3).astype(np.float32)
    texture = 1 + 0.15 * noise(rng, g.R, 30)
    layers.albedo = lerp(layers.albedo, np.clip(colour[None, None, :] * texture[..., None], 0, 1), alpha)
    layers.height = layers.height + 2.5 * alpha
    layers.fg = np.maximum(layers.fg, alpha)
    return alpha


def missing(layers, rng, g, spec, p):
    if layers.parts:
        name = sorted(layers.parts)[rng.integers(len(layers.parts))]
        part = layers.parts[name]
        alpha = hard_cut(part.alpha, 0.02)
    else:  # textures without parts (grid): a broken patch
        alpha = _blob(rng, g, _centre(rng, layers, g), rng.uniform(0.08, 0.14), 0.3) * (layers.fg > 0)
        part = Part(alpha)
    if part.albedo_under is None:
        layers.fg = layers.fg * (1 - alpha)
    else:
        layers.albedo = lerp(layers.albedo, part.albedo_under, alpha)
        layers.height = lerp(layers.height, part.height_under, alpha)
    return alpha


def bent(layers, rng, g, spec, p):
    """Re-draw the product with coordinates displaced inside a compact region (a bent tab, leg, tip or wire)."""
    if spec.bent_part:
        names = sorted(n for n in layers.parts if n.startswith(spec.bent_part))
        part = layers.parts[names[rng.integers(len(names))]].alpha
        # centre on the outer end of the part: the pixel of the part farthest from the product's centre
        ys, xs = np.nonzero(part > 0.5)
        far = np.argmax(np.hypot(g.X[ys, xs] - g.X[layers.fg > 0.5].mean(), g.Y[ys, xs] - g.Y[layers.fg > 0.5].mean()))
        c = np.array([g.X[ys[far], xs[far]], g.Y[ys[far], xs[far]]])
    else:
        c = _centre(rng, layers, g)
    sigma = rng.uniform(0.1, 0.16)
    w = np.exp(-((g.X - c[0]) ** 2 + (g.Y - c[1]) ** 2) / (2 * sigma ** 2))
    w = np.where(w < 0.05, 0.0, w).astype(np.float32)  # compact support: exact zero displacement outside
    ang = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0.08, 0.14)
    Xw = g.X + (amp * np.cos(ang)) * w
    Yw = g.Y + (amp * np.sin(ang)) * w
    warped = spec.draw(g, Xw.astype(np.float32), Yw.astype(np.float32), p)
    support = w > 0
    # the height is re-drawn on the whole support, so a support pixel next to the product counts too
    near = cv2.dilate(((layers.fg > 0) | (warped.fg > 0)).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    alpha = (support & near).astype(np.float32)
    layers.albedo = np.where(support[..., None], warped.albedo, layers.albedo)
    layers.height = np.where(support, warped.height, layers.height)
    layers.fg = np.where(support, warped.fg, layers.fg)
    return alpha


DEFECTS: dict[str, Callable] = {"scratch": scratch, "crack": crack, "hole": hole, "stain": stain,
                                "contamination": contamination, "missing": missing, "bent": bent}
assert set(DEFECTS) == set(DEFECT_TYPES)
