"""The 13 products (8 objects, 5 textures), the defect types each one has, and the pretraining / benchmark split.

Each product: ``sample(rng) -> params`` draws its natural variation; ``draw(g, X, Y, params) -> Layers`` renders
its layers on the coordinates (X, Y) (warped by the bent defect, posed by the web appearance).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import cv2
import numpy as np

from .primitives import Grid, Layers, Part, aa, lerp, noise, rotate

DEFECT_TYPES = ("scratch", "crack", "hole", "stain", "contamination", "missing", "bent")


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
