"""The "web photo" appearance of the pretraining corpus: the same products, photographed more widely.

Stable Diffusion has seen bottles, pills and carpets in every colour, size, pose, background and light on the web,
but rarely as the centred, evenly lit studio shots of an inspection benchmark. The mini prior's corpus imitates
that: each of its images is a benchmark sample (same product variation, same defect) re-photographed under an
:class:`Appearance` drawn by :func:`sample_appearance`:

- pose: zoom, rotation and shift of the product in the frame (a similarity transform of the drawing coordinates);
- colour and material: hue rotation, saturation and value of the albedo, a gloss multiplier;
- background (objects): a coloured, unevenly lit surface with a soft texture in place of the studio backdrop;
- lighting: light elevation, azimuth, ambient and intensity over a wider range; sensor noise from clean to grainy;
- colour mode: grayscale products are sometimes photographed in colour, colour products sometimes in grayscale.

Each factor keeps the benchmark's own value with probability ``keep`` (0.3), independently, so the benchmark's look
lies inside the corpus's distribution (fine-tuning can reach it) while almost no corpus image has all of it
(about 0.3^5 = 0.2 %): fine-tuning on a product's own normals still has something to learn.

``render(..., appearance=None)`` is bit-identical to the benchmark renderer; an appearance changes only how the
sample is shown, never which sample (product variation, light draw, defect) it is.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

from .primitives import Grid, Layers, Part, noise
from .products import ProductSpec
from .shading import Light

KEEP_BENCHMARK = 0.3


@dataclasses.dataclass(frozen=True)
class Appearance:
    scale: float = 1.0                      # > 1 zooms in
    angle: float = 0.0                      # radians, rotation of the product in the frame
    shift: tuple[float, float] = (0.0, 0.0)  # in [-1, 1] image units
    hue: float = 0.0                        # radians, rotation of the albedo's hue around the grey axis
    saturation: float = 1.0
    value: float = 1.0
    gloss: float = 1.0                      # multiplies the product's gloss
    light: tuple[float, float, float, float] | None = None   # (elevation, azimuth, ambient, intensity); None: as drawn
    background: tuple[float, float, float, float, float, int] | None = None  # (r, g, b, gradient, texture, seed)
    noise_sigma: float = 0.012              # sensor noise; 0.012 is the benchmark's
    grayscale: bool | None = None           # None: the product's own mode

    @classmethod
    def from_dict(cls, d: dict) -> "Appearance":
        """Inverse of ``dataclasses.asdict`` (JSON turns the tuples into lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def posed(self) -> bool:
        return (self.scale, self.angle, self.shift) != (1.0, 0.0, (0.0, 0.0))

    @property
    def recoloured(self) -> bool:
        return (self.hue, self.saturation, self.value, self.gloss) != (0.0, 1.0, 1.0, 1.0)

    # -- what render() applies ------------------------------------------------------------------

    def wrap(self, spec: ProductSpec) -> ProductSpec:
        """``spec`` whose ``draw`` poses and recolours the product (the bent defect re-draws through it too)."""
        if not (self.posed or self.recoloured):
            return spec
        inner = spec.draw

        def draw(g: Grid, X: np.ndarray, Y: np.ndarray, p: dict) -> Layers:
            if self.posed:
                c, s = np.cos(self.angle), np.sin(self.angle)
                x, y = X - np.float32(self.shift[0]), Y - np.float32(self.shift[1])
                X = ((c * x + s * y) / self.scale).astype(np.float32)
                Y = ((-s * x + c * y) / self.scale).astype(np.float32)
                g = copy.copy(g)
                g.px = g.px / self.scale  # one pixel in the product's own units
            layers = inner(g, X, Y, p)
            if self.recoloured:
                layers.albedo = self.recolour(layers.albedo)
                layers.gloss = layers.gloss * self.gloss
                layers.parts = {k: Part(v.alpha, None if v.albedo_under is None else self.recolour(v.albedo_under),
                                        v.height_under) for k, v in layers.parts.items()}
            return layers

        return dataclasses.replace(spec, draw=draw)

    def recolour(self, albedo: np.ndarray) -> np.ndarray:
        """Hue rotation about the grey axis, then saturation about the luminance, then value; clipped to [0, 1]."""
        a = np.asarray(albedo, np.float32)
        c, s = np.cos(self.hue), np.sin(self.hue)
        k = (1 - c) / 3
        r3 = s / np.sqrt(3)
        rot = np.array([[c + k, k - r3, k + r3], [k + r3, c + k, k - r3], [k - r3, k + r3, c + k]], np.float32)
        out = a @ rot.T
        lum = out @ np.array([0.299, 0.587, 0.114], np.float32)
        out = lum[..., None] + self.saturation * (out - lum[..., None])
        return np.clip(out * self.value, 0, 1).astype(np.float32)

    def relight(self, light: Light) -> Light:
        if self.light is None:
            return light
        el, az, ambient, intensity = self.light
        d = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], np.float32)
        return Light(d, ambient=ambient, intensity=intensity)

    def backdrop(self, g: Grid, background: np.ndarray) -> np.ndarray:
        if self.background is None:
            return background
        r, gr, b, gradient, texture, seed = self.background
        rng = np.random.default_rng(seed)
        ang = rng.uniform(0, 2 * np.pi)
        shade = 1 + gradient * (np.cos(ang) * g.X + np.sin(ang) * g.Y) + texture * noise(rng, g.R, 6, 3)
        return np.clip(np.array([r, gr, b], np.float32)[None, None, :] * shade[..., None], 0, 1).astype(np.float32)


def sample_appearance(rng: np.random.Generator, spec: ProductSpec, keep: float = KEEP_BENCHMARK) -> Appearance:
    """A web-photo appearance for ``spec``; each factor keeps the benchmark's value with probability ``keep``."""
    texture = spec.kind == "texture"
    kw: dict = {}
    if rng.random() >= keep:  # pose
        kw["scale"] = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))) if texture else float(rng.uniform(0.6, 1.3))
        kw["angle"] = float(rng.uniform(-np.pi, np.pi))
        lim = 1.0 if texture else 0.2
        kw["shift"] = (float(rng.uniform(-lim, lim)), float(rng.uniform(-lim, lim)))
    if rng.random() >= keep:  # colour and material
        kw["hue"] = float(rng.uniform(-np.pi, np.pi) if rng.random() < 0.5 else rng.normal(0, 0.3))
        kw["saturation"] = float(rng.uniform(0.4, 1.6))
        kw["value"] = float(rng.uniform(0.65, 1.3))
        kw["gloss"] = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    if not texture and rng.random() >= keep:  # background
        base = rng.uniform(0.05, 0.9)
        col = np.clip(base * (1 + rng.uniform(-0.5, 0.5, 3)), 0, 1)
        kw["background"] = (*(float(v) for v in col), float(rng.uniform(0, 0.3)), float(rng.uniform(0, 0.15)),
                            int(rng.integers(2**31)))
    if rng.random() >= keep:  # lighting and sensor
        kw["light"] = (float(rng.uniform(np.radians(20), np.radians(85))), float(rng.uniform(0, 2 * np.pi)),
                       float(rng.uniform(0.15, 0.6)), float(rng.uniform(0.7, 1.3)))
        kw["noise_sigma"] = float(rng.uniform(0.004, 0.03))
    if rng.random() >= keep:  # colour mode
        kw["grayscale"] = (rng.random() < 0.5) if spec.grayscale else (rng.random() < 0.15)
    return Appearance(**kw)


__all__ = ["Appearance", "KEEP_BENCHMARK", "sample_appearance"]
