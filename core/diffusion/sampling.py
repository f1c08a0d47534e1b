"""Sampling, image-to-image starts and DDIM inversion over any diffusers scheduler.

One narrow contract, as in k-diffusion: a noise predictor ``eps_fn(z_t, t) -> eps`` (CFG, attention control and
feature capture live inside it). Notation (DDIM, Song et al. 2021): abar_t = ``scheduler.alphas_cumprod[t]``,
z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """What the per-step callback sees before the denoiser call of step ``index`` at timestep ``t``."""

    index: int
    t: torch.Tensor
    latents: torch.Tensor                 # z_t, about to be denoised
    prev_eps: torch.Tensor | None         # eps predicted at the previous step (None at the first)
    prev_x0: torch.Tensor | None          # the previous step's prediction of z_0
    num_steps: int


class StepCallback(Protocol):
    def __call__(self, step: Step) -> torch.Tensor | None: ...


# The keys that describe a model's training noise schedule. Everything else in a saved scheduler config belongs to
# the class that wrote it: a DDPMScheduler saves its own ``timestep_spacing: leading``, which a sampler built from
# that file with ``from_config`` would silently inherit.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "clip_sample", "set_alpha_to_one", "steps_offset", "rescale_betas_zero_snr")
SAMPLERS = ("dpmsolver++", "ddim", "ddpm")


def inference_scheduler(train_config, kind: str, timestep_spacing: str, **options):
    """A sampler over a model's training noise schedule, with its timestep spacing set explicitly.

    kind: ``dpmsolver++`` (DPM-Solver++, 2nd-order multistep), ``ddim`` or ``ddpm``; timestep_spacing: ``linspace``
    (DPM-Solver's own default: SD v1-4's scheduler file leaves it in place, 25 steps run 999, 959, ..., 40),
    ``leading`` (DDIM / DDPM's default: 961, ..., 1 with ``steps_offset`` 1) or ``trailing``. Only
    :data:`SCHEDULE_KEYS` are taken from ``train_config``, so a reloaded model samples exactly like a fresh one.
    """
    import inspect

    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = {"dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
               "ddim": (DDIMScheduler, {}), "ddpm": (DDPMScheduler, {})}
    if kind not in classes:
        raise ValueError(f"Unknown sampler '{kind}'. Use one of: {', '.join(SAMPLERS)}.")
    if timestep_spacing not in ("linspace", "leading", "trailing"):
        raise ValueError(f"timestep_spacing must be linspace, leading or trailing, got '{timestep_spacing}'.")
    cls, fixed = classes[kind]
    accepted = inspect.signature(cls.__init__).parameters
    schedule = {k: v for k, v in dict(train_config).items() if k in SCHEDULE_KEYS and k in accepted}
    return cls(**schedule, **fixed, timestep_spacing=timestep_spacing, **options)


def cfg_eps(unet: torch.nn.Module, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> EpsFn:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + s (eps_c - eps_u), one batched call [uncond; cond].

    With ``uncond=None`` or ``scale == 1`` only the conditional branch runs.
    """
    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if uncond is None or scale == 1.0:
            return unet(z, t, encoder_hidden_states=cond).sample
        e_u, e_c = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        return e_u + scale * (e_c - e_u)
    return eps_fn


def predict_x0(scheduler, z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """z_0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar = scheduler.alphas_cumprod.to(z_t.device, z_t.dtype)[int(t)]
    return (z_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def noise_to(scheduler, z0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(z_t | z_0) to training timestep ``t``: sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps."""
    abar = scheduler.alphas_cumprod.to(z0.device, z0.dtype)[int(t)]
    return abar.sqrt() * z0 + (1 - abar).sqrt() * noise


def previous_latent(scheduler, z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, kind: str = "ddpm",
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """One step z_t -> z_{t-1} on the training schedule, per row (t: (B,) training timesteps).

    ddpm: a sample of the posterior q(z_{t-1} | z_t, z_0 = x0_hat) (Ho et al. 2020, Eq. 6-7, variance beta~_t):
        mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_hat + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) z_t,
        z_{t-1} = mean + sqrt(beta~_t) noise, beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t; no noise at t = 0.
        ``DDPMScheduler.step`` on a scheduler without inference timesteps, with ``noise`` as its variance noise.
    ddim: the deterministic (eta = 0) step sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1}) eps.
    abar_{-1} = 1.
    """
    abar = scheduler.alphas_cumprod.to(z_t.device, torch.float32)
    t = t.to(z_t.device).long()
    view = (-1,) + (1,) * (z_t.dim() - 1)
    a_t = abar[t].view(view)
    a_prev = torch.where(t > 0, abar[(t - 1).clamp(min=0)], torch.ones_like(abar[t])).view(view)
    x0 = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if kind == "ddim":
        return (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(z_t.dtype)
    if kind != "ddpm":
        raise ValueError(f"previous_latent kind must be 'ddpm' or 'ddim', got '{kind}'.")
    beta = 1 - a_t / a_prev
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * z_t
    var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
    if noise is None:
        noise = torch.randn_like(z_t)
    return (mean + (t > 0).view(view) * var.sqrt() * noise).to(z_t.dtype)


def img2img_timesteps(scheduler, num_inference_steps: int, t_start: int) -> torch.Tensor:
    """The inference timesteps at or below ``t_start`` (the schedule an img2img run continues with)."""
    scheduler.set_timesteps(num_inference_steps)
    ts = scheduler.timesteps
    kept = ts[ts <= t_start]
    if len(kept) == 0:
        raise ValueError(f"t_start={t_start} is below every inference timestep ({ts.min().item()}..{ts.max().item()}).")
    return kept


def img2img_start(scheduler, z0: torch.Tensor, num_inference_steps: int, noise: torch.Tensor,
                  strength: float | None = None, signal: float | None = None,
                  noise_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Start latent and remaining timesteps for denoising from a noised clean latent ``z0``.

    Exactly one of:
    - ``strength`` in (0, 1]: t_start = strength * T (CUT writes T (1 - gamma), i.e. strength = 1 - gamma); the
      latent is noised to the first inference timestep at or below t_start, so the start lies on the schedule.
    - ``signal``: an explicit signal coefficient, z = signal * z_0 + noise_scale * eps (noise_scale defaults to
      sqrt(1 - signal^2)), followed by the full schedule (SeaS's official start is signal ~0.098, noise_scale 1).
    """
    if (strength is None) == (signal is None):
        raise ValueError("Give exactly one of strength= or signal=.")
    if strength is not None:
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        T = scheduler.config.num_train_timesteps
        ts = img2img_timesteps(scheduler, num_inference_steps, int(round(strength * T)) - 1)
        return noise_to(scheduler, z0, int(ts[0]), noise), ts
    scale = (1 - signal ** 2) ** 0.5 if noise_scale is None else noise_scale
    scheduler.set_timesteps(num_inference_steps)
    return signal * z0 + scale * noise, scheduler.timesteps


def sample(eps_fn: EpsFn, scheduler, latents: torch.Tensor, timesteps: Sequence | torch.Tensor | None = None,
           callback: StepCallback | None = None, step_kwargs: dict | Callable[[int], dict] | None = None,
           progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """Run ``scheduler`` from ``latents`` over ``timesteps`` (default: ``scheduler.timesteps``).

    ``callback(Step)`` runs before each denoiser call and may return replacement latents (blending with a noised
    normal image, latent optimisation, recording intermediates). ``step_kwargs``: extra arguments of
    ``scheduler.step`` (e.g. ``eta``), or a function of the step index giving them (e.g. per-item ``variance_noise``,
    so that a stochastic sampler's result does not depend on how items are batched). Returns the final z_0 estimate.
    """
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    z, prev_eps, prev_x0 = latents, None, None
    n = len(timesteps)
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
        if callback is not None:
            new = callback(Step(i, t, z, prev_eps, prev_x0, n))
            if new is not None:
                z = new
        eps = eps_fn(z, t)
        kwargs = step_kwargs(i) if callable(step_kwargs) else (step_kwargs or {})
        out = scheduler.step(eps, t, z, **kwargs)
        prev_eps, prev_x0 = eps, getattr(out, "pred_original_sample", None)
        z = out.prev_sample
    return z


def ddim_invert(eps_fn: EpsFn, scheduler, z0: torch.Tensor, num_inference_steps: int | None = None,
                fixed_point_iters: int = 0, return_trajectory: bool = False,
                progress: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """Deterministic DDIM inversion: run the eta = 0 DDIM update backwards, from z_0 to z_T.

    Mirrors ``DDIMScheduler.step`` on the same timesteps: the sampler's last step goes from t_1 to the final level
    abar_final (``final_alpha_cumprod``), so inversion starts there. Each step uses eps evaluated at the *target*
    timestep on the current latent (the usual approximation eps(z_{t_i}, t_i) ~ eps(z_{t_{i-1}}, t_i)).
    ``fixed_point_iters`` > 0 removes that approximation by iterating z_{t_i} <- step(z_{t_{i-1}}, eps(z_{t_i}, t_i))
    (one extra denoiser call each), which makes sampling from the result retrace the inversion path closely.
    With ``return_trajectory`` returns [z at abar_final, z_{t_1}, ..., z_{t_N}].
    """
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    ts = scheduler.timesteps.flip(0)  # ascending
    abars = scheduler.alphas_cumprod.to(z0.device, torch.float64)
    a_prev = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64, device=z0.device)
    z, path = z0, [z0]
    for t in tqdm(ts, desc="DDIM inversion", disable=not progress, leave=False):
        a_t = abars[int(t)]
        c_x0, c_eps = (a_t / a_prev).sqrt().to(z.dtype), ((1 - a_t).sqrt() - (a_t * (1 - a_prev) / a_prev).sqrt()).to(z.dtype)
        # z_{t_i} = sqrt(abar_i) * x0_hat + sqrt(1 - abar_i) * eps,  x0_hat = (z - sqrt(1 - abar_prev) eps) / sqrt(abar_prev)
        z_next = c_x0 * z + c_eps * eps_fn(z, t)
        for _ in range(fixed_point_iters):
            z_next = c_x0 * z + c_eps * eps_fn(z_next, t)
        z, a_prev = z_next, a_t
        path.append(z)
    return path if return_trajectory else z
