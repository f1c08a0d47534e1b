"""The synthetic world: procedural industrial products with exact defect masks, in MVTec AD layout.

Files: ``primitives`` (layers, grid, coverage, noise), ``shading`` (light, shading, backgrounds), ``products`` (the 13
products and the pretraining / benchmark split), ``defects`` (the 7 defect types), ``render`` (one sample),
``appearance`` (the wider "web photo" appearance of the pretraining corpus), ``world`` (the tree on disk, seed
streams, the oracle sampler).

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

Products are split once, in ``products``, into ``PRETRAIN_PRODUCTS`` (the mini prior learns them) and
``BENCHMARK_PRODUCTS`` (held out; few-shot methods are evaluated on them).
"""
from .appearance import Appearance, sample_appearance
from .defects import DEFECTS
from .primitives import Grid, Layers, Part, aa, hard_cut, lerp, noise, polyline_alpha, rotate
from .products import ALL_PRODUCTS, BENCHMARK_PRODUCTS, DEFECT_TYPES, PRETRAIN_PRODUCTS, PRODUCTS, ProductSpec
from .render import MAX_DEFECT_ATTEMPTS, MIN_VISIBLE_FRACTION, VISIBLE_LEVEL, InvisibleDefect, Rendered, render
from .shading import Light, compose, plain_background, sample_light
from .world import (WEB_ATTEMPTS, WORLD_VERSION, OracleSampler, WorldConfig, build_world, render_web, sample_rng,
                    write_product)

__all__ = ["ALL_PRODUCTS", "Appearance", "InvisibleDefect", "BENCHMARK_PRODUCTS", "DEFECTS", "DEFECT_TYPES", "Grid", "Layers", "Light",
           "MAX_DEFECT_ATTEMPTS", "MIN_VISIBLE_FRACTION", "OracleSampler", "PRETRAIN_PRODUCTS", "PRODUCTS", "Part",
           "ProductSpec", "Rendered", "VISIBLE_LEVEL", "WEB_ATTEMPTS", "WORLD_VERSION", "WorldConfig", "aa", "build_world", "compose",
           "hard_cut", "lerp", "noise", "plain_background", "polyline_alpha", "render", "render_web", "rotate", "sample_appearance",
           "sample_light", "sample_rng", "write_product"]
