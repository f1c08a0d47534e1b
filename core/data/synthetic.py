"""The synthetic world: procedural industrial products with exact defect masks, in MVTec AD layout.

Every image is drawn in three stages, so that defects follow the product's surface and shading:

1. ``draw`` (per product): from sampled variation parameters and a coordinate grid, the product's
   *layers*: albedo (colour), height (relief), coverage ``fg`` over the background, removable parts.
2. a defect (optional) edits the layers: it darkens / tints the albedo, cuts or raises the height,
   removes a part, or re-draws the product with locally warped coordinates (bent). Each defect
   returns its coverage ``alpha``; outside ``alpha > 0`` the layers are bit-identical to the clean ones.
3. ``compose``: Lambert + specular shading of the height field under a sampled light, composited over the
   background, plus sensor noise drawn from the same seed as the clean render.

The mask is ``alpha > 0`` grown by one pixel (shading reads height gradients of the neighbours), so
every pixel that differs from the clean render of the same sample lies inside the mask — the tests
check exactly that.

Products are split once, here, into ``PRETRAIN_PRODUCTS`` (the mini prior learns them) and
``BENCHMARK_PRODUCTS`` (held out; few-shot methods are evaluated on them).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

WORLD_VERSION = 1
DEFECT_TYPES = ("scratch", "crack", "hole", "stain", "contamination", "missing", "bent")


# ============================================================================ primitives

@dataclasses.dataclass
class Part:
    """A removable part: its coverage, and what shows where it is gone (None: the background)."""

    alpha: np.ndarray
    albedo_under: np.ndarray | None = None
    height_under: np.ndarray | None = None


@dataclasses.dataclass
class Layers:
    albedo: np.ndarray          # (R, R, 3) float, linear-ish colour in [0, 1]
    height: np.ndarray          # (R, R) relief in pixel units (gradients give normals)
    fg: np.ndarray              # (R, R) product coverage in [0, 1]
    surface: np.ndarray         # (R, R) bool, where surface defects may be centred
    parts: dict[str, Part]
    gloss: float = 0.2
    grow_surface: bool = False  # contamination may extend the coverage (objects) or not (textures)

    def copy(self) -> "Layers":
        return Layers(self.albedo.copy(), self.height.copy(), self.fg.copy(), self.surface, self.parts,
                      self.gloss, self.grow_surface)


class Grid:
    """Pixel-centre coordinates in [-1, 1]; ``px`` is one pixel in those units."""

    def __init__(self, resolution: int):
        self.R = resolution
        c = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2 - 1
        self.Y, self.X = np.meshgrid(c, c, indexing="ij")
        self.px = 2.0 / resolution


def aa(d: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased coverage of the region ``d < 0`` (d: signed distance). Exactly 0 beyond half a pixel."""
    return np.clip(0.5 - d / px, 0.0, 1.0).astype(np.float32)


def rotate(X: np.ndarray, Y: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(theta), np.sin(theta)
    return c * X + s * Y, -s * X + c * Y


def noise(rng: np.random.Generator, R: int, cells: int, octaves: int = 1, persistence: float = 0.5) -> np.ndarray:
    """Smooth value noise, roughly unit variance: bicubic upsampling of random grids, summed over octaves."""
    out = np.zeros((R, R), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        c = max(2, min(R, cells * 2 ** o))
        g = rng.standard_normal((c + 2, c + 2)).astype(np.float32)
        up = cv2.resize(g, (R + 2 * R // c, R + 2 * R // c), interpolation=cv2.INTER_CUBIC)
        off = R // c
        out += amp * up[off:off + R, off:off + R]
        total += amp * amp
        amp *= persistence
    return out / np.sqrt(total)


def polyline_alpha(points: np.ndarray, width_px: float, R: int, ss: int = 4) -> np.ndarray:
    """Coverage of a polyline (points in [-1, 1] coords) of the given width, 4x supersampled."""
    canvas = np.zeros((R * ss, R * ss), np.float32)
    pts = ((points + 1) / 2 * R * ss).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [pts], False, 1.0, thickness=max(1, int(round(width_px * ss))), lineType=cv2.LINE_8)
    return cv2.resize(canvas, (R, R), interpolation=cv2.INTER_AREA)


def lerp(a: np.ndarray, b: np.ndarray | float, t: np.ndarray) -> np.ndarray:
    """a where t == 0 bit-exactly, b where t == 1."""
    if a.ndim == 3 and t.ndim == 2:
        t = t[..., None]
    return a + (b - a) * t


def hard_cut(a: np.ndarray, lo: float = 0.1) -> np.ndarray:
    """Zero faint coverage so the mask does not include invisible fringes."""
    return np.where(a < lo, 0.0, a).astype(np.float32)


# ============================================================================ shading

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


# ============================================================================ products
# Each product: sample(rng) -> params, draw(g, X, Y, params) -> Layers; (X, Y) may be warped (bent).


def _surface(fg: np.ndarray, R: int, margin_px: int = 3) -> np.ndarray:
    k = max(1, margin_px * R // 128)
    return cv2.erode((fg > 0.99).astype(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8)) > 0


def _jitter_color(rng, base, amount=0.06):
    return np.clip(np.asarray(base, np.float32) + rng.uniform(-amount, amount, 3), 0, 1).astype(np.float32)


# --- objects ---------------------------------------------------------------------------

def bottle_sample(rng):
    return {"r": rng.uniform(0.74, 0.86), "cx": rng.uniform(-0.04, 0.04), "cy": rng.uniform(-0.04, 0.04),
            "glass": _jitter_color(rng, rng.choice([[0.35, 0.22, 0.1], [0.2, 0.32, 0.16]]), 0.04),
            "ripple": rng.uniform(14, 20), "phase": rng.uniform(0, 2 * np.pi), "inner": rng.uniform(0.3, 0.36),
            "bg": 0.06, "tint": 0.02, "seed": int(rng.integers(2**31))}


def bottle_draw(g, X, Y, p):
    x, y = X - p["cx"], Y - p["cy"]
    r = np.hypot(x, y)
    fg = aa(r - p["r"], g.px)
    rn = r / p["r"]
    band = 0.8 + 0.2 * np.cos(rn * p["ripple"] + p["phase"])
    albedo = p["glass"][None, None, :] * band[..., None]
    inner = aa(r - p["inner"] * p["r"], g.px)
    albedo = lerp(albedo, np.float32(0.03), inner)
    height = 10 * np.sqrt(np.clip(1 - rn ** 2, 0, 1)) + 1.2 * np.cos(rn * p["ripple"] * 1.3 + p["phase"]) - 6 * inner
    rim = np.clip((rn - 0.55) / 0.45, 0, 1)
    theta0 = np.random.default_rng(p["seed"]).uniform(0, 2 * np.pi)
    dtheta = np.angle(np.exp(1j * (np.arctan2(y, x) - theta0)))
    chunk = aa(np.abs(dtheta) - 0.45, g.px * 2 / max(p["r"], 0.1)) * aa(0.62 - rn, g.px) * fg
    surface = _surface(fg, g.R) & (inner < 0.01)
    return Layers(albedo.astype(np.float32), height.astype(np.float32), fg, surface,
                  {"rim_chunk": Part(chunk)}, gloss=0.35, grow_surface=True)


def metal_nut_sample(rng):
    return {"rot": rng.uniform(0, 2 * np.pi), "cx": rng.uniform(-0.05, 0.05), "cy": rng.uniform(-0.05, 0.05),
            "ro": rng.uniform(0.5, 0.56), "ri": rng.uniform(0.2, 0.25), "tab": rng.uniform(0.8, 0.86),
            "tw": rng.uniform(0.12, 0.15), "metal": _jitter_color(rng, [0.62, 0.62, 0.66], 0.05),
            "bg": 0.1, "tint": 0.02, "seed": int(rng.integers(2**31))}


def metal_nut_draw(g, X, Y, p):
    x, y = rotate(X - p["cx"], Y - p["cy"], p["rot"])
    r = np.hypot(x, y)
    ring = aa(r - p["ro"], g.px)
    hole = aa(r - p["ri"], g.px)
    parts = {}
    tabs = np.zeros_like(r)
    for k in range(4):
        tx, ty = rotate(x, y, k * np.pi / 2)
        d = np.maximum(np.abs(ty) - p["tw"], np.maximum(tx - p["tab"], -tx + p["ro"] - 0.05))
        t = aa(d, g.px)
        parts[f"tab{k}"] = Part(t * (1 - hole))
        tabs = np.maximum(tabs, t)
    fg = np.maximum(ring, tabs) * (1 - hole)
    brushed = noise(np.random.default_rng(p["seed"]), g.R, 24, 2)
    albedo = p["metal"][None, None, :] * (0.92 + 0.06 * brushed)[..., None]
    height = 3 * ring + 2 * tabs - 0.8 * np.cos(r * 12) * ring
    return Layers(albedo.astype(np.float32), height.astype(np.float32), fg.astype(np.float32),
                  _surface(fg, g.R), parts, gloss=0.6, grow_surface=True)


def pill_sample(rng):
    return {"rot": rng.uniform(-0.15, 0.15), "a": rng.uniform(0.72, 0.8), "b": rng.uniform(0.4, 0.46),
            "cx": rng.uniform(-0.04, 0.04), "cy": rng.uniform(-0.04, 0.04),
            "white": _jitter_color(rng, [0.9, 0.88, 0.84], 0.03), "speck_seed": int(rng.integers(2**31)),
            "bg": 0.08, "tint": 0.02}


def pill_draw(g, X, Y, p):
    x, y = rotate(X - p["cx"], Y - p["cy"], p["rot"])
    e = np.sqrt((x / p["a"]) ** 2 + (y / p["b"]) ** 2)
    fg = aa((e - 1) * p["b"], g.px)
    srng = np.random.default_rng(p["speck_seed"])
    speck = noise(srng, g.R, 40) > 2.0
    albedo = np.where(speck[..., None], np.array([0.7, 0.2, 0.15], np.float32), p["white"][None, None, :])
    emboss = aa(np.maximum(np.abs(x) - 0.18, np.abs(y) - 0.05), g.px)
    height = 9 * np.sqrt(np.clip(1 - e ** 2, 0, 1)) - 1.5 * emboss
    return Layers(albedo.astype(np.float32), height.astype(np.float32), fg, _surface(fg, g.R), {},
                  gloss=0.15, grow_surface=True)


def screw_sample(rng):
    return {"rot": rng.uniform(0, 2 * np.pi), "cx": rng.uniform(-0.1, 0.1), "cy": rng.uniform(-0.1, 0.1),
            "len": rng.uniform(0.62, 0.7), "w": rng.uniform(0.085, 0.1), "pitch": rng.uniform(30, 36),
            "phase": rng.uniform(0, 2 * np.pi), "grey": rng.uniform(0.5, 0.6), "bg": 0.8, "tint": 0.0}


def screw_draw(g, X, Y, p):
    x, y = rotate(X - p["cx"], Y - p["cy"], p["rot"])
    half = p["len"]
    taper = np.clip((half - x) / 0.15, 0.2, 1.0)  # pointed tip at +x
    shaft = aa(np.maximum(np.abs(y) - p["w"] * taper, np.maximum(x - half, -x - half + 0.2)), g.px)
    head = aa(np.hypot(x + half - 0.1, y) - 2.2 * p["w"], g.px)
    fg = np.maximum(shaft, head)
    thread = np.cos(x * p["pitch"] + p["phase"] + 6 * y)
    height = shaft * (3 + 1.5 * thread) + head * 4 * np.sqrt(np.clip(1 - (np.hypot(x + half - 0.1, y) / (2.2 * p["w"])) ** 2, 0, 1))
    albedo = np.full(g.X.shape + (3,), p["grey"], np.float32) * (0.9 + 0.1 * thread * shaft)[..., None]
    tip = Part(shaft * aa(half - 0.22 - x, g.px))
    return Layers(albedo.astype(np.float32), height.astype(np.float32), fg.astype(np.float32),
                  _surface(fg, g.R, 1), {"tip": tip}, gloss=0.5, grow_surface=True)


def cable_sample(rng):
    return {"rot": rng.uniform(-0.25, 0.25), "cx": rng.uniform(-0.03, 0.03), "cy": rng.uniform(-0.03, 0.03),
            "R0": rng.uniform(0.82, 0.88), "rw": rng.uniform(0.26, 0.29), "rc": rng.uniform(0.13, 0.15),
            "shell": _jitter_color(rng, [0.55, 0.55, 0.58], 0.04), "seed": int(rng.integers(2**31)),
            "bg": 0.05, "tint": 0.02}


CABLE_COLOURS = np.array([[0.2, 0.55, 0.2], [0.15, 0.3, 0.65], [0.45, 0.28, 0.12]], np.float32)


def cable_draw(g, X, Y, p):
    x, y = rotate(X - p["cx"], Y - p["cy"], p["rot"])
    r = np.hypot(x, y)
    fg = aa(r - p["R0"], g.px)
    filler = np.array([0.25, 0.25, 0.27], np.float32)
    albedo = np.broadcast_to(p["shell"], g.X.shape + (3,)).copy()
    albedo = lerp(albedo, filler, aa(r - p["R0"] + 0.08, g.px))
    height = 4 * fg + 1.0 * aa(p["R0"] - 0.08 - r, g.px)
    strands = noise(np.random.default_rng(p["seed"]), g.R, 48) > 0.3
    parts = {}
    under_albedo, under_height = albedo.copy(), height.copy()
    for k in range(3):
        ang = np.pi / 2 + k * 2 * np.pi / 3
        cx, cy = 0.4 * np.cos(ang), 0.4 * np.sin(ang)
        d = np.hypot(x - cx, y - cy)
        wire = aa(d - p["rw"], g.px)
        core = aa(d - p["rc"], g.px)
        col = lerp(np.broadcast_to(CABLE_COLOURS[k], albedo.shape), np.where(strands[..., None], 0.85, 0.7) * np.array([0.85, 0.55, 0.3], np.float32), core)
        albedo = lerp(albedo, col, wire)
        height = lerp(height, 6 + 1.5 * core + 1.5 * np.sqrt(np.clip(1 - (d / p["rw"]) ** 2, 0, 1)), wire)
        parts[f"wire{k}"] = Part(wire, under_albedo, under_height - 1.5)
    return Layers(albedo.astype(np.float32), height.astype(np.float32), fg, _surface(fg, g.R), parts,
                  gloss=0.3, grow_surface=True)


def transistor_sample(rng):
    return {"rot": rng.uniform(-0.08, 0.08), "cx": rng.uniform(-0.05, 0.05), "cy": rng.uniform(-0.06, 0.02),
            "bw": rng.uniform(0.36, 0.42), "bh": rng.uniform(0.26, 0.3), "leg": rng.uniform(0.45, 0.55),
            "body": _jitter_color(rng, [0.1, 0.1, 0.11], 0.02), "metal": _jitter_color(rng, [0.75, 0.72, 0.6], 0.04),
            "bg": 0.72, "tint": 0.04}


def transistor_draw(g, X, Y, p):
    x, y = rotate(X - p["cx"], Y - p["cy"], p["rot"])
    by = -0.25
    body = aa(np.maximum(np.abs(x) - p["bw"], np.abs(y - by) - p["bh"]), g.px)
    parts = {}
    legs = np.zeros_like(x)
    for k, lx in enumerate((-0.25, 0.0, 0.25)):
        leg = aa(np.maximum(np.abs(x - lx * p["bw"] / 0.4) - 0.035, np.maximum(y - (by + p["bh"] + p["leg"]), -(y - by))), g.px)
        leg = leg * (1 - body)
        parts[f"leg{k}"] = Part(leg)
        legs = np.maximum(legs, leg)
    fg = np.maximum(body, legs)
    albedo = lerp(np.broadcast_to(p["metal"], x.shape + (3,)), p["body"], body)
    tabhole = aa(np.hypot(x, y - by + p["bh"] * 0.55) - 0.07, g.px) * body
    height = 5 * body + 2 * legs - 3 * tabhole
    surface = _surface(body, g.R, 4)
    return Layers(albedo.astype(np.float32), height.astype(np.float32), fg.astype(np.float32), surface, parts,
                  gloss=0.4, grow_surface=True)


def capsule_sample(rng):
    return {"rot": rng.uniform(-0.06, 0.06), "cx": rng.uniform(-0.05, 0.05), "cy": rng.uniform(-0.05, 0.05),
            "len": rng.uniform(0.7, 0.76), "rad": rng.uniform(0.25, 0.28),
            "left": _jitter_color(rng, [0.12, 0.12, 0.12], 0.02), "right": _jitter_color(rng, [0.85, 0.5, 0.15], 0.04),
            "bg": 0.78, "tint": 0.03}


def capsule_draw(g, X, Y, p):
    x, y = rotate(X - p["cx"], Y - p["cy"], p["rot"])
    core = p["len"] - p["rad"]
    d = np.hypot(np.clip(np.abs(x) - core, 0, None), y) - p["rad"]
    fg = aa(d, g.px)
    albedo = lerp(np.broadcast_to(p["left"], x.shape + (3,)), p["right"], aa(-x, g.px * 2))
    text = (np.abs(np.sin(x * 40)) > 0.6) & (np.abs(y) < 0.07) & (x > 0.12) & (x < 0.42)
    albedo = np.where(text[..., None], np.float32(0.15), albedo)
    height = 8 * np.sqrt(np.clip(-d / p["rad"] * (2 - (-d / p["rad"])), 0, 1)) - 0.6 * np.exp(-(x / 0.02) ** 2)
    return Layers(albedo.astype(np.float32), height.astype(np.float32), fg, _surface(fg, g.R), {},
                  gloss=0.5, grow_surface=True)


def hazelnut_sample(rng):
    return {"rot": rng.uniform(0, 2 * np.pi), "cx": rng.uniform(-0.06, 0.06), "cy": rng.uniform(-0.06, 0.06),
            "a": rng.uniform(0.6, 0.7), "b": rng.uniform(0.52, 0.6), "shell": _jitter_color(rng, [0.5, 0.3, 0.15], 0.05),
            "seed": int(rng.integers(2**31)), "bg": 0.04, "tint": 0.01}


def hazelnut_draw(g, X, Y, p):
    x, y = rotate(X - p["cx"], Y - p["cy"], p["rot"])
    tip = np.clip(x / p["a"], 0, 1) ** 3 * 0.18
    e = np.sqrt((x / (p["a"] + tip * 0.5)) ** 2 + (y / (p["b"] * (1 - tip))) ** 2)
    fg = aa((e - 1) * p["b"], g.px)
    nrng = np.random.default_rng(p["seed"])
    streak = noise(nrng, g.R, 6, 2)[..., None] * 0.12 + 0.08 * np.cos(np.arctan2(y, x) * 22 + 4 * noise(nrng, g.R, 3))[..., None]
    albedo = p["shell"][None, None, :] * (1 + streak)
    height = 9 * np.sqrt(np.clip(1 - e ** 2, 0, 1)) + 0.6 * streak[..., 0] * 5
    return Layers(np.clip(albedo, 0, 1).astype(np.float32), height.astype(np.float32), fg, _surface(fg, g.R), {},
                  gloss=0.2, grow_surface=True)


# --- textures ----------------------------------------------------------------------------

def _texture_layers(albedo, height, g, gloss, parts=None):
    ones = np.ones(g.X.shape, np.float32)
    return Layers(np.clip(albedo, 0, 1).astype(np.float32), height.astype(np.float32), ones,
                  np.ones(g.X.shape, bool), parts or {}, gloss=gloss, grow_surface=False)


def carpet_sample(rng):
    return {"rot": rng.uniform(-0.05, 0.05), "f": rng.uniform(38, 44), "px": rng.uniform(0, 7), "py": rng.uniform(0, 7),
            "col": _jitter_color(rng, [0.45, 0.35, 0.3], 0.05), "seed": int(rng.integers(2**31)), "bg": 0.0, "tint": 0.0}


def carpet_draw(g, X, Y, p):
    x, y = rotate(X, Y, p["rot"])
    n = noise(np.random.default_rng(p["seed"]), g.R, 16, 2)
    wx, wy = np.sin(x * p["f"] + p["px"] + 0.6 * n), np.sin(y * p["f"] + p["py"] + 0.6 * n)
    weave = np.where(np.sin((x + y) * p["f"] / 2) > 0, wx, wy)
    albedo = p["col"][None, None, :] * (1 + 0.15 * weave + 0.08 * n)[..., None]
    return _texture_layers(albedo, 1.5 * weave + 0.6 * n, g, 0.05)


def grid_sample(rng):
    return {"rot": rng.uniform(-0.06, 0.06), "s": rng.uniform(0.2, 0.24), "ox": rng.uniform(0, 1), "oy": rng.uniform(0, 1),
            "grey": rng.uniform(0.6, 0.7), "bg": 0.12, "tint": 0.0, "seed": int(rng.integers(2**31))}


def grid_draw(g, X, Y, p):
    x, y = rotate(X, Y, p["rot"])
    n = noise(np.random.default_rng(p["seed"]), g.R, 4) * 0.01
    u, v = x / p["s"] + p["ox"] + n, y / p["s"] + p["oy"] + n
    du, dv = np.abs(u - np.round(u)) * p["s"], np.abs(v - np.round(v)) * p["s"]
    w = 0.018
    fg = np.maximum(aa(du - w, g.px), aa(dv - w, g.px))
    albedo = np.full(x.shape + (3,), p["grey"], np.float32)
    height = 3 * np.maximum(np.clip(1 - du / (w + g.px), 0, 1), np.clip(1 - dv / (w + g.px), 0, 1))
    surface = np.ones(x.shape, bool)
    return Layers(albedo, height.astype(np.float32), fg.astype(np.float32), surface, {}, gloss=0.5, grow_surface=True)


def leather_sample(rng):
    return {"col": _jitter_color(rng, [0.42, 0.25, 0.14], 0.05), "seed": int(rng.integers(2**31)), "bg": 0.0, "tint": 0.0}


def leather_draw(g, X, Y, p):
    nrng = np.random.default_rng(p["seed"])
    cellular = np.abs(noise(nrng, g.R, 24, 1))
    grain = noise(nrng, g.R, 48, 2)
    height = -2.5 * np.exp(-cellular * 6) + 0.4 * grain
    albedo = p["col"][None, None, :] * (1 + 0.06 * grain - 0.15 * np.exp(-cellular * 6))[..., None]
    return _texture_layers(albedo, height, g, 0.12)


def wood_sample(rng):
    return {"rot": rng.uniform(-0.1, 0.1), "f": rng.uniform(16, 24), "ph": rng.uniform(0, 2 * np.pi),
            "col": _jitter_color(rng, [0.62, 0.42, 0.24], 0.05), "seed": int(rng.integers(2**31)), "bg": 0.0, "tint": 0.0}


def wood_draw(g, X, Y, p):
    x, y = rotate(X, Y, p["rot"])
    n = noise(np.random.default_rng(p["seed"]), g.R, 3, 2)
    rings = np.sin((x + 0.1 * n + 0.05 * y ** 2) * p["f"] + p["ph"])
    albedo = p["col"][None, None, :] * (0.85 + 0.15 * rings)[..., None]
    return _texture_layers(albedo, 0.5 * rings, g, 0.15)


def tile_sample(rng):
    return {"s": rng.uniform(0.45, 0.55), "ox": rng.uniform(0, 1), "oy": rng.uniform(0, 1),
            "col": _jitter_color(rng, [0.72, 0.72, 0.68], 0.04), "seed": int(rng.integers(2**31)), "bg": 0.0, "tint": 0.0}


def tile_draw(g, X, Y, p):
    u, v = X / p["s"] + p["ox"], Y / p["s"] + p["oy"]
    du, dv = np.abs(u - np.round(u)) * p["s"], np.abs(v - np.round(v)) * p["s"]
    grout = np.maximum(aa(du - 0.02, g.px), aa(dv - 0.02, g.px))
    speck = noise(np.random.default_rng(p["seed"]), g.R, 40)
    albedo = lerp(p["col"][None, None, :] * (1 + 0.12 * (speck > 1.2) - 0.2 * (speck < -1.4))[..., None], np.float32(0.35), grout)
    return _texture_layers(albedo, 2 * (1 - grout), g, 0.3)


@dataclasses.dataclass(frozen=True)
class ProductSpec:
    name: str
    kind: str  # "object" | "texture"
    sample: Callable[[np.random.Generator], dict]
    draw: Callable[..., Layers]
    defects: tuple[str, ...]
    grayscale: bool = False
    bent_part: str | None = None  # where a bend is centred (a part name) or None (anywhere on the surface)


PRODUCTS: dict[str, ProductSpec] = {s.name: s for s in [
    ProductSpec("bottle", "object", bottle_sample, bottle_draw, ("contamination", "crack", "missing", "stain")),
    ProductSpec("metal_nut", "object", metal_nut_sample, metal_nut_draw, ("bent", "missing", "scratch", "stain"), bent_part="tab"),
    ProductSpec("pill", "object", pill_sample, pill_draw, ("contamination", "crack", "scratch", "stain")),
    ProductSpec("screw", "object", screw_sample, screw_draw, ("bent", "contamination", "missing", "scratch"), grayscale=True, bent_part="tip"),
    ProductSpec("cable", "object", cable_sample, cable_draw, ("contamination", "crack", "missing", "stain")),
    ProductSpec("transistor", "object", transistor_sample, transistor_draw, ("bent", "hole", "missing", "scratch"), bent_part="leg"),
    ProductSpec("capsule", "object", capsule_sample, capsule_draw, ("crack", "hole", "scratch", "stain")),
    ProductSpec("hazelnut", "object", hazelnut_sample, hazelnut_draw, ("contamination", "crack", "hole", "stain")),
    ProductSpec("carpet", "texture", carpet_sample, carpet_draw, ("contamination", "crack", "hole", "stain")),
    ProductSpec("grid", "texture", grid_sample, grid_draw, ("bent", "contamination", "missing"), grayscale=True),
    ProductSpec("leather", "texture", leather_sample, leather_draw, ("crack", "hole", "scratch", "stain")),
    ProductSpec("wood", "texture", wood_sample, wood_draw, ("crack", "hole", "scratch", "stain")),
    ProductSpec("tile", "texture", tile_sample, tile_draw, ("contamination", "crack", "hole", "stain")),
]}

# The one place the split is defined. Every defect type of the benchmark also occurs in pretraining,
# so the mini prior knows what damage looks like on products it has not seen.
BENCHMARK_PRODUCTS: tuple[str, ...] = ("bottle", "pill", "cable", "carpet", "leather")
PRETRAIN_PRODUCTS: tuple[str, ...] = tuple(p for p in PRODUCTS if p not in BENCHMARK_PRODUCTS)
ALL_PRODUCTS: tuple[str, ...] = tuple(PRODUCTS)


# ============================================================================ defects
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


# ============================================================================ rendering

MAX_DEFECT_ATTEMPTS = 20
VISIBLE_LEVEL = 6            # grey levels: a pixel differs visibly from the clean render
MIN_VISIBLE_FRACTION = 0.3   # of the mask's pixels


@dataclasses.dataclass
class Rendered:
    image: np.ndarray        # (R, R, 3) uint8
    mask: np.ndarray         # (R, R) bool
    clean: np.ndarray        # the same sample without its defect (equal to image for normals)


def render(product: str, rng: np.random.Generator, resolution: int = 128, defect: str | None = None) -> Rendered:
    """One sample of ``product`` (variation drawn from ``rng``), with ``defect`` if given."""
    spec = PRODUCTS[product]
    if defect is not None and defect not in spec.defects:
        raise ValueError(f"'{product}' has no defect type '{defect}'. It has: {', '.join(spec.defects)}.")
    g = Grid(resolution)
    params = spec.sample(rng)
    light = sample_light(rng)
    background = plain_background(g, rng, params["bg"], params["tint"])
    noise_field = rng.normal(0, 0.012, (resolution, resolution, 3)).astype(np.float32)
    defect_seed = rng.integers(2**63)
    layers = spec.draw(g, g.X, g.Y, params)
    clean = compose(layers, light, background, noise_field)
    if defect is None:
        return Rendered(_gray(clean, spec), np.zeros((resolution, resolution), bool), _gray(clean, spec))
    min_pixels = max(4, (resolution // 64) ** 2 * 4)
    for attempt in range(MAX_DEFECT_ATTEMPTS):
        edited = layers.copy()
        alpha = DEFECTS[defect](edited, np.random.default_rng([defect_seed, attempt]), g, spec, params)
        image = compose(edited, light, background, noise_field)
        # one pixel of growth: shading differentiates the height field, which reaches the neighbours
        mask = cv2.dilate((alpha > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        visible = np.abs(_gray(image, spec).astype(np.int16) - _gray(clean, spec)).max(-1) > VISIBLE_LEVEL
        # redraw a defect that fell off the product or is too faint to see (a person would not label it)
        if mask.sum() >= min_pixels and visible[mask].mean() >= MIN_VISIBLE_FRACTION:
            break
    else:
        raise RuntimeError(f"No visible '{defect}' on '{product}' after {MAX_DEFECT_ATTEMPTS} attempts (world bug).")
    return Rendered(_gray(image, spec), mask, _gray(clean, spec))


def _gray(img: np.ndarray, spec: ProductSpec) -> np.ndarray:
    if not spec.grayscale:
        return img
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return np.repeat(g[..., None], 3, axis=2)


# ============================================================================ the world on disk

@dataclasses.dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    resolution: int = 128
    n_train_good: int = 200
    n_test_good: int = 30
    n_per_type: int = 15
    products: tuple[str, ...] = ALL_PRODUCTS

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["products"] = list(self.products)
        return {"version": WORLD_VERSION, **d, "benchmark_products": list(BENCHMARK_PRODUCTS),
                "pretrain_products": list(PRETRAIN_PRODUCTS)}


_STREAM = {"train": 0, "test": 1, "oracle": 2, "prior": 3}


def sample_rng(seed: int, product: str, stream: str, atype: str, index: int) -> np.random.Generator:
    """Independent, order-free stream per image: any image can be re-drawn alone."""
    t = 0 if atype == "good" else 1 + DEFECT_TYPES.index(atype)
    return np.random.default_rng([seed, ALL_PRODUCTS.index(product), _STREAM[stream], t, index])


def _write_png(path: Path, img: np.ndarray, gray: bool) -> None:
    arr = img[..., 0] if gray else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"Could not write '{path}'.")


def write_product(out: Path, product: str, cfg: WorldConfig) -> int:
    cv2.setNumThreads(1)
    spec = PRODUCTS[product]
    pdir = out / product
    jobs = [("train", "good", cfg.n_train_good), ("test", "good", cfg.n_test_good)]
    jobs += [("test", t, cfg.n_per_type) for t in spec.defects]
    n = 0
    for split, atype, count in jobs:
        (pdir / split / atype).mkdir(parents=True, exist_ok=True)
        if atype != "good":
            (pdir / "ground_truth" / atype).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            r = render(product, sample_rng(cfg.seed, product, split, atype, i), cfg.resolution,
                       None if atype == "good" else atype)
            _write_png(pdir / split / atype / f"{i:03d}.png", r.image, spec.grayscale)
            if atype != "good":
                m = (r.mask.astype(np.uint8) * 255)
                if not cv2.imwrite(str(pdir / "ground_truth" / atype / f"{i:03d}_mask.png"), m):
                    raise OSError(f"Could not write mask for '{product}/{atype}/{i:03d}'.")
            n += 1
    return n


def _write_product_job(args) -> int:
    return write_product(*args)


def build_world(out_dir: str | Path, cfg: WorldConfig = WorldConfig(), workers: int | None = None,
                progress: bool = True) -> Path:
    """Write the world to ``out_dir`` in MVTec AD layout, atomically; a finished identical world is reused.

    The tree is written under ``<out_dir>.partial-<pid>`` and renamed into place when complete, so an
    interrupted build never leaves a half-written world behind.
    """
    out = Path(out_dir).expanduser()
    unknown = [p for p in cfg.products if p not in PRODUCTS]
    if unknown:
        raise ValueError(f"Unknown synthetic product(s) {unknown}. Available: {', '.join(PRODUCTS)}.")
    if cfg.resolution < 64:
        raise ValueError(f"resolution={cfg.resolution} is too small for thin defects; use 128 (default), 256, or at least 64.")
    meta = cfg.to_json()
    if out.exists():
        existing = out / "world.json"
        if existing.is_file() and json.loads(existing.read_text()) == meta:
            return out
        raise FileExistsError(
            f"'{out}' exists but is not this synthetic world (seed={cfg.seed}, resolution={cfg.resolution}). "
            f"Fix: choose another out_dir, or delete '{out}'."
        )
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        jobs = [(tmp, p, cfg) for p in cfg.products]
        workers = workers or min(len(jobs), os.cpu_count() or 1)
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="synthetic world", unit="product", disable=not progress)
        if workers > 1:
            with mp.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_product_job, jobs):
                    bar.update()
        else:
            for j in jobs:
                _write_product_job(j)
                bar.update()
        bar.close()
        (tmp / "world.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class OracleSampler:
    """Unlimited extra real defects of a product, disjoint from the written test set (own seed stream).

    The downstream "oracle" arm trains on these in place of generated data: an upper bound for a generator.
    """

    def __init__(self, product: str, seed: int = 0, resolution: int = 128):
        if product not in PRODUCTS:
            raise ValueError(f"Unknown synthetic product '{product}'. Available: {', '.join(PRODUCTS)}.")
        self.product, self.seed, self.resolution = product, seed, resolution
        self.defects = PRODUCTS[product].defects

    def sample(self, anomaly_type: str, index: int) -> Rendered:
        return render(self.product, sample_rng(self.seed, self.product, "oracle", anomaly_type, index),
                      self.resolution, anomaly_type)

    def normal(self, index: int) -> Rendered:
        return render(self.product, sample_rng(self.seed, self.product, "oracle", "good", index), self.resolution)

    def iter(self, anomaly_type: str, n: int, start: int = 0) -> Iterator[Rendered]:
        for i in range(start, start + n):
            yield self.sample(anomaly_type, i)
