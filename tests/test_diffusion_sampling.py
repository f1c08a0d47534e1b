"""Sampling loop, CFG, img2img starts, DDIM inversion, mask binarisation and decoder-feature hooks."""
import pytest
import torch
from diffusers import DDIMScheduler

from core.diffusion import (binarize, capture_outputs, cfg_eps, ddim_invert, img2img_start, isodata_threshold,
                            noise_to, sample, unet_up_blocks, vae_decoder_up_blocks)
from core.models import SD_V1_SCHEDULE


def _ddim():
    return DDIMScheduler.from_config(SD_V1_SCHEDULE)


def _cond(tiny, prompt="a photo of a screw"):
    with torch.no_grad():
        return tiny.encode_prompt([prompt]), tiny.encode_prompt([""])


def test_cfg_combines_the_two_branches(tiny):
    cond, uncond = _cond(tiny)
    z = torch.randn(1, 4, tiny.latent_size, tiny.latent_size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(300)
    with torch.no_grad():
        e_c = tiny.unet(z, t, cond).sample
        e_u = tiny.unet(z, t, uncond).sample
        got = cfg_eps(tiny.unet, cond, uncond, 7.5)(z, t)
    torch.testing.assert_close(got, e_u + 7.5 * (e_c - e_u), atol=1e-4, rtol=1e-4)


def test_img2img_strength_start_is_on_the_schedule_with_the_intended_snr():
    sched = _ddim()
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(1, 4, 64, 64, generator=g), torch.randn(1, 4, 64, 64, generator=g)
    z, ts = img2img_start(sched, z0, 50, eps, strength=0.75)
    t0 = int(ts[0])
    assert t0 <= 749 and t0 + 20 > 749  # the first of the 50 inference steps at or below T (1 - 0.25)
    assert len(ts) == sum(int(t) <= 749 for t in sched.timesteps)
    abar = sched.alphas_cumprod[t0]
    torch.testing.assert_close(z, abar.sqrt() * z0 + (1 - abar).sqrt() * eps)
    # signal-to-noise of the start, measured by regressing z on z0 and eps
    coef = torch.linalg.lstsq(torch.stack([z0.flatten(), eps.flatten()], 1), z.flatten()[:, None]).solution.flatten()
    assert abs((coef[0] / coef[1]) ** 2 - abar / (1 - abar)) < 1e-3


def test_img2img_explicit_signal_coefficient():
    sched = _ddim()
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 4, 32, 32, generator=g)
    z, ts = img2img_start(sched, z0, 25, eps, signal=0.098, noise_scale=1.0)  # SeaS's official start
    torch.testing.assert_close(z, 0.098 * z0 + eps)
    assert len(ts) == 25
    z_vp, _ = img2img_start(sched, z0, 25, eps, signal=0.6)
    torch.testing.assert_close(z_vp, 0.6 * z0 + 0.8 * eps)  # variance preserving by default
    with pytest.raises(ValueError, match="exactly one"):
        img2img_start(sched, z0, 25, eps)


def test_sample_callback_runs_before_every_step_and_can_replace_latents(tiny):
    cond, _ = _cond(tiny)
    sched = _ddim()
    sched.set_timesteps(5)
    z = torch.randn(1, 4, tiny.latent_size, tiny.latent_size, generator=torch.Generator().manual_seed(0))
    seen = []

    def record(step):
        seen.append((step.index, int(step.t), step.prev_x0 is None))

    with torch.no_grad():
        eps_fn = cfg_eps(tiny.unet, cond, None, 1.0)
        a = sample(eps_fn, sched, z, callback=record, progress=False)
        zero_last = sample(eps_fn, sched, z, progress=False,
                           callback=lambda s: torch.zeros_like(s.latents) if s.index == s.num_steps - 1 else None)
        t_last = sched.timesteps[-1]
        expected = sched.step(eps_fn(torch.zeros_like(z), t_last), t_last, torch.zeros_like(z)).prev_sample
    assert [s[0] for s in seen] == list(range(5))
    assert [s[1] for s in seen] == [int(t) for t in sched.timesteps]
    assert [s[2] for s in seen] == [True, False, False, False, False]
    torch.testing.assert_close(zero_last, expected)
    assert not torch.allclose(a, zero_last)


def test_blending_callback_keeps_the_background_of_the_noised_source(tiny):
    """Blended diffusion through the callback: outside the mask the latent follows the forward-noised source."""
    cond, _ = _cond(tiny)
    sched = _ddim()
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(3)
    src, eps = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    m = torch.zeros(1, 1, 16, 16)
    m[..., 4:10, 4:10] = 1
    seen = []

    def blend(step):
        bg = noise_to(sched, src, int(step.t), eps)
        seen.append((step.latents, bg))
        return m * step.latents + (1 - m) * bg

    with torch.no_grad():
        sample(cfg_eps(tiny.unet, cond, None, 1.0), sched, torch.randn(1, 4, 16, 16, generator=g), callback=blend,
               progress=False)
    assert len(seen) == 4


def test_ddim_inversion_then_sampling_reconstructs_the_latent(tiny):
    """Plain inversion carries the eps(z_t) ~ eps(z_{t-1}) approximation: on the random tiny U-Net (whose eps changes
    much faster with t than a trained one) the measured error after 50 steps was 0.3-1.3 relative. Fixed-point
    inversion removes it: measured 7e-4 with 3 iterations, 7e-6 with 6; the bound is 1e-3 with 4."""
    cond, _ = _cond(tiny)
    sched = _ddim()
    z0 = torch.randn(1, 4, tiny.latent_size, tiny.latent_size, generator=torch.Generator().manual_seed(4))
    eps_fn = cfg_eps(tiny.unet, cond, None, 1.0)

    def reconstruct(zT):
        sched.set_timesteps(50)
        return sample(eps_fn, sched, zT, progress=False)

    with torch.no_grad():
        plain = reconstruct(ddim_invert(eps_fn, sched, z0, 50, progress=False))
        zT = ddim_invert(eps_fn, sched, z0, 50, fixed_point_iters=4, progress=False)
        exact = reconstruct(zT)
        other = reconstruct(torch.randn_like(zT))
    rel = lambda x: ((x - z0).norm() / z0.norm()).item()
    assert rel(exact) < 1e-3, rel(exact)
    assert rel(exact) < rel(plain) / 10
    assert rel(other) > 0.5
    assert rel(zT) > 0.5  # a genuinely different (noised) latent, not z0 carried through


def test_ddim_inversion_is_exact_for_a_constant_noise_predictor():
    """With eps independent of z the approximation vanishes: inversion then sampling is the identity."""
    sched = _ddim()
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    const = lambda z, t: torch.full_like(z, 0.1)
    zT = ddim_invert(const, sched, z0, 20, progress=False)
    sched.set_timesteps(20)
    torch.testing.assert_close(sample(const, sched, zT, progress=False), z0, atol=1e-4, rtol=1e-4)


def test_ddim_inversion_trajectory_has_every_level(tiny):
    cond, _ = _cond(tiny)
    z0 = torch.randn(1, 4, tiny.latent_size, tiny.latent_size)
    with torch.no_grad():
        path = ddim_invert(cfg_eps(tiny.unet, cond, None, 1.0), _ddim(), z0, 10, return_trajectory=True,
                           progress=False)
    assert len(path) == 11 and path[0] is z0


def test_isodata_threshold_hand_worked_cases():
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    assert isodata_threshold(x).item() == pytest.approx(0.5)
    # means of {1,2} and {10,11,12}: (1.5 + 11) / 2 = 6.25 once the split settles
    y = torch.tensor([[1.0, 2.0, 10.0, 11.0, 12.0]])
    assert isodata_threshold(y).item() == pytest.approx(6.25)
    const = torch.full((1, 4, 4), 0.3)
    assert not binarize(const, "isodata").any()
    batch = torch.stack([torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 10.0, 10.0, 10.0])])
    assert binarize(batch, "isodata").tolist() == [[False, False, True, True], [False, True, True, True]]


def test_fixed_threshold_binarisation():
    x = torch.tensor([0.1, 0.2, 0.21, 0.9])
    assert binarize(x, 0.2).tolist() == [False, False, True, True]
    with pytest.raises(ValueError):
        binarize(x, "otsu")


def test_decoder_feature_hooks_return_up_block_outputs(tiny):
    cond, _ = _cond(tiny)
    L = tiny.latent_size
    z = torch.randn(1, 4, L, L)
    unet_names = unet_up_blocks(tiny.unet)
    with torch.no_grad(), capture_outputs(tiny.unet, unet_names) as feats:
        tiny.unet(z, torch.tensor(10), cond)
    chans = list(reversed(tiny.unet.config.block_out_channels))
    # up_blocks.i upsamples except the last: outputs at L/4, L/2, L, L for the four-level layout
    assert [tuple(feats[n].shape[1:]) for n in unet_names] == [
        (chans[0], L // 4, L // 4), (chans[1], L // 2, L // 2), (chans[2], L, L), (chans[3], L, L)]
    vae_names = vae_decoder_up_blocks(tiny.vae)
    with torch.no_grad(), capture_outputs(tiny.vae, vae_names) as vfeats:
        img = tiny.decode_latents(z)
    assert img.shape[-1] == tiny.resolution
    vch = list(reversed(tiny.vae.config.block_out_channels))
    assert [tuple(vfeats[n].shape[1:]) for n in vae_names] == [
        (vch[0], 2 * L, 2 * L), (vch[1], 4 * L, 4 * L), (vch[2], 4 * L, 4 * L)]
    assert not any(m._forward_hooks for m in tiny.vae.modules())


def test_feature_hooks_removed_after_error_and_unknown_names_rejected(tiny):
    with pytest.raises(RuntimeError):
        with capture_outputs(tiny.unet, ["up_blocks.0"]):
            raise RuntimeError("x")
    assert not any(m._forward_hooks for m in tiny.unet.modules())
    with pytest.raises(KeyError, match="up_blocks.9"):
        with capture_outputs(tiny.unet, ["up_blocks.9"]):
            pass


# ----------------------------------------------------------------------------- inference schedulers, x_{t-1} steps
def test_inference_scheduler_ignores_the_spacing_a_saved_ddpm_config_carries(tmp_path):
    from diffusers import DDPMScheduler

    from core.diffusion import inference_scheduler

    DDPMScheduler.from_config(SD_V1_SCHEDULE).save_pretrained(tmp_path)
    saved = DDPMScheduler.from_pretrained(tmp_path).config
    assert saved["timestep_spacing"] == "leading" and saved["steps_offset"] == 1  # what a reload hands over
    sched = inference_scheduler(saved, "dpmsolver++", "linspace")
    sched.set_timesteps(25)
    # linspace over [0, 999]: 999, 959, ..., 40 (SD v1-4's DPM-Solver++ schedule); "leading" would give 951, ..., 39
    expected = [round(999 * i / 25) for i in range(25, 0, -1)]
    assert sched.timesteps.tolist() == expected and expected[:2] == [999, 959] and expected[-1] == 40
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.solver_order == 2
    lead = inference_scheduler(saved, "dpmsolver++", "leading")
    lead.set_timesteps(25)
    assert lead.timesteps.tolist()[:2] == [951, 913]
    ddim = inference_scheduler(saved, "ddim", "leading")  # SD's DDIM: leading, steps_offset 1 -> 961, ..., 1
    ddim.set_timesteps(25)
    assert ddim.timesteps.tolist() == [40 * i + 1 for i in range(24, -1, -1)]


def test_previous_latent_ddpm_is_the_posterior_sample_of_diffusers_ddpm_step():
    from diffusers import DDPMScheduler

    from core.diffusion import previous_latent

    sched = DDPMScheduler.from_config(SD_V1_SCHEDULE)
    g = torch.Generator().manual_seed(3)
    z, eps = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    t = torch.tensor([0, 7, 900])  # per-row timesteps, t = 0 adds no noise
    for i in range(3):
        noise = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(10 + i))
        ref = sched.step(eps[i:i + 1], int(t[i]), z[i:i + 1], generator=torch.Generator().manual_seed(10 + i))
        got = previous_latent(sched, z[i:i + 1], eps[i:i + 1], t[i:i + 1], "ddpm", noise)
        torch.testing.assert_close(got, ref.prev_sample, atol=1e-6, rtol=1e-5)
    # hand-worked at t = 7: mean + sqrt(beta~) noise
    a = sched.alphas_cumprod
    beta = 1 - a[7] / a[6]
    x0 = (z[1] - (1 - a[7]).sqrt() * eps[1]) / a[7].sqrt()
    mean = a[6].sqrt() * beta / (1 - a[7]) * x0 + (1 - beta).sqrt() * (1 - a[6]) / (1 - a[7]) * z[1]
    noise = torch.ones(1, 4, 5, 6)
    torch.testing.assert_close(previous_latent(sched, z[1:2], eps[1:2], t[1:2], "ddpm", noise)[0],
                               mean + ((1 - a[6]) / (1 - a[7]) * beta).sqrt(), atol=1e-5, rtol=1e-5)
    ddim = previous_latent(sched, z, eps, t, "ddim")
    torch.testing.assert_close(ddim[1], a[6].sqrt() * x0 + (1 - a[6]).sqrt() * eps[1], atol=1e-5, rtol=1e-5)


def test_img2img_strength_start_lands_on_the_hand_worked_timestep():
    # 50 leading steps with offset 1: 981, 961, ..., 741, 721, ... The start is the first timestep at or below
    # round(strength * T) - 1: 0.742 -> 741 (on it), 0.741 -> 740 -> 721 (the next one down)
    z0 = torch.zeros(2, 4, 8, 6)
    eps = torch.ones(2, 4, 8, 6)
    for strength, first, count in ((0.742, 741, 38), (0.741, 721, 37), (1.0, 981, 50)):
        sched = _ddim()
        z, ts = img2img_start(sched, z0, 50, eps, strength=strength)
        assert int(ts[0]) == first and len(ts) == count
        torch.testing.assert_close(z, (1 - sched.alphas_cumprod[first]).sqrt() * eps)


def test_sample_hands_each_step_the_previous_steps_eps_and_x0(tiny):
    cond, _ = _cond(tiny)
    sched = _ddim()
    sched.set_timesteps(4)
    made, seen = [], []

    def eps_fn(z, t):
        e = cfg_eps(tiny.unet, cond.expand(2, -1, -1), None, 1.0)(z, t)
        made.append(e)
        return e

    z = torch.randn(2, 4, tiny.latent_size, tiny.latent_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sample(eps_fn, sched, z, callback=lambda s: seen.append((s.prev_eps, s.prev_x0, s.latents)), progress=False)
    assert seen[0][0] is None and seen[0][1] is None
    for i in range(1, 4):
        assert seen[i][0] is made[i - 1]
        t = sched.timesteps[i - 1]
        x0 = sched.step(made[i - 1], t, seen[i - 1][2]).pred_original_sample
        torch.testing.assert_close(seen[i][1], x0)


def test_ddim_inversion_starts_at_the_schedulers_final_level():
    # with set_alpha_to_one the sampler's last step goes to abar = 1, so the inversion's first step starts there:
    # z_{t_1} = sqrt(abar_{t_1}) z_0 + sqrt(1 - abar_{t_1}) eps, exactly
    sched = DDIMScheduler.from_config({**SD_V1_SCHEDULE, "set_alpha_to_one": True})
    z0 = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    const = lambda z, t: torch.full_like(z, 0.1)  # noqa: E731
    path = ddim_invert(const, sched, z0, 20, return_trajectory=True, progress=False)
    a1 = sched.alphas_cumprod[int(sched.timesteps[-1])].double()
    torch.testing.assert_close(path[1], a1.sqrt() * z0 + (1 - a1).sqrt() * 0.1)
    torch.testing.assert_close(sample(const, sched, path[-1], progress=False), z0, atol=1e-6, rtol=1e-6)


def test_isodata_threshold_per_map_of_a_batch_with_ties_and_single_members():
    # [0, 2, 4, 2]: the 2s sit exactly at the first threshold (the mean) and count below: (4/3 + 4) / 2 = 8/3;
    # [1, 10, 10, 10]: one value below: (1 + 10) / 2 = 5.5
    batch = torch.tensor([[0.0, 2.0, 4.0, 2.0], [1.0, 10.0, 10.0, 10.0]])
    assert isodata_threshold(batch).tolist() == pytest.approx([8 / 3, 5.5])
    assert isodata_threshold(torch.tensor([[0.0, 2.0, 4.0]])).item() == pytest.approx(2.5)
    # near-constant maps count as constant within 1e-6 of their scale (at least 1e-6), and then give their maximum
    big = torch.tensor([[1000.0, 1000.0 + 2 ** -13]])
    assert isodata_threshold(big).item() == big.max().item()
    small = torch.tensor([[0.0, 1.5e-6]])
    assert isodata_threshold(small).item() == pytest.approx(0.75e-6)


def test_previous_latent_at_t_1_steps_to_abar_0():
    from diffusers import DDPMScheduler

    from core.diffusion import previous_latent
    sched = DDPMScheduler.from_config(SD_V1_SCHEDULE)
    a = sched.alphas_cumprod
    z, eps = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    t = torch.tensor([1, 1])
    x0 = (z - (1 - a[1]).sqrt() * eps) / a[1].sqrt()
    torch.testing.assert_close(previous_latent(sched, z, eps, t, "ddim"), a[0].sqrt() * x0 + (1 - a[0]).sqrt() * eps)


def test_ddim_invert_by_default_evaluates_eps_on_the_current_latent():
    sched = _ddim()
    sched.set_timesteps(2)
    z0 = torch.randn(2, 4, 3, 5)
    eps_fn = lambda z, t: 0.1 * z + t / 1000        # noqa: E731
    abar = sched.alphas_cumprod.double()
    z, a_prev = z0.double(), torch.tensor(sched.final_alpha_cumprod).double()
    for t in sched.timesteps.flip(0):
        a_t = abar[int(t)]
        z = (a_t / a_prev).sqrt() * z + ((1 - a_t).sqrt() - (a_t * (1 - a_prev) / a_prev).sqrt()) * eps_fn(z, t)
        a_prev = a_t
    torch.testing.assert_close(ddim_invert(eps_fn, sched, z0, progress=False), z.float(), atol=1e-5, rtol=1e-5)
