"""Rendering one sample: product layers, an optional defect, shading; the mask and the clean render beside it."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from .appearance import Appearance
from .defects import DEFECTS
from .primitives import Grid
from .products import PRODUCTS
from .shading import compose, plain_background, sample_light


MAX_DEFECT_ATTEMPTS = 20
VISIBLE_LEVEL = 6            # grey levels: a pixel differs visibly from the clean render
MIN_VISIBLE_FRACTION = 0.3   # of the mask's pixels


class InvisibleDefect(RuntimeError):
    """No attempt produced a visible defect (in the benchmark's look: a world bug; in a web look: too dark a photo)."""


@dataclasses.dataclass
class Rendered:
    image: np.ndarray        # (R, R, 3) uint8
    mask: np.ndarray         # (R, R) bool
    clean: np.ndarray        # the same sample without its defect (equal to image for normals)


def render(product: str, rng: np.random.Generator, resolution: int = 128, defect: str | None = None,
           appearance: Appearance | None = None) -> Rendered:
    """One sample of ``product`` (variation drawn from ``rng``), with ``defect`` if given.

    ``appearance`` re-photographs the same sample (pose, colour, background, light, noise, colour mode; see
    ``appearance.py``); None is the benchmark's look. The rng draws are the same either way.
    """
    spec = PRODUCTS[product]
    if defect is not None and defect not in spec.defects:
        raise ValueError(f"'{product}' has no defect type '{defect}'. It has: {', '.join(spec.defects)}.")
    g = Grid(resolution)
    params = spec.sample(rng)
    light = sample_light(rng)
    background = plain_background(g, rng, params["bg"], params["tint"])
    noise_field = rng.normal(0, 0.012, (resolution, resolution, 3)).astype(np.float32)
    defect_seed = rng.integers(2**63)
    gray = spec.grayscale
    if appearance is not None:
        spec = appearance.wrap(spec)
        light = appearance.relight(light)
        background = appearance.backdrop(g, background)
        if appearance.noise_sigma != 0.012:
            noise_field = noise_field * np.float32(appearance.noise_sigma / 0.012)
        gray = gray if appearance.grayscale is None else appearance.grayscale
    layers = spec.draw(g, g.X, g.Y, params)
    clean = compose(layers, light, background, noise_field)
    if defect is None:
        return Rendered(_gray(clean, gray), np.zeros((resolution, resolution), bool), _gray(clean, gray))
    min_pixels = max(4, (resolution // 64) ** 2 * 4)
    for attempt in range(MAX_DEFECT_ATTEMPTS):
        edited = layers.copy()
        alpha = DEFECTS[defect](edited, np.random.default_rng([defect_seed, attempt]), g, spec, params)
        image = compose(edited, light, background, noise_field)
        # one pixel of growth: shading differentiates the height field, which reaches the neighbours
        mask = cv2.dilate((alpha > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        visible = np.abs(_gray(image, gray).astype(np.int16) - _gray(clean, gray)).max(-1) > VISIBLE_LEVEL
        # redraw a defect that fell off the product or is too faint to see (a person would not label it)
        if mask.sum() >= min_pixels and visible[mask].mean() >= MIN_VISIBLE_FRACTION:
            break
    else:
        raise InvisibleDefect(f"No visible '{defect}' on '{product}' after {MAX_DEFECT_ATTEMPTS} attempts"
                              f"{' (world bug)' if appearance is None else ' under ' + repr(appearance)}.")
    return Rendered(_gray(image, gray), mask, _gray(clean, gray))


def _gray(img: np.ndarray, gray: bool) -> np.ndarray:
    if not gray:
        return img
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return np.repeat(g[..., None], 3, axis=2)
