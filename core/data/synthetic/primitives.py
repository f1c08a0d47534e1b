"""Primitives of the synthetic world: layers, the coordinate grid, anti-aliased coverage, value noise, polylines."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np


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
