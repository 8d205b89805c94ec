"""The numpy sampler against an analytic Gaussian energy whose reverse-step distribution is known."""

import numpy as np
import pytest

from vertrefine.sampler import SamplerSettings, diffuse, refine_latents, reverse_step
from vertrefine.schedule import DiffusionSchedule

SCHEDULE = DiffusionSchedule()
CENTRE = np.array([0.5, -1.0, 2.0], dtype=np.float32)
WIDTH = 0.5


def gaussian_energy(z, t):
    """E(y) = ||y - m||^2 / (2 s^2): returns (E, dE/dz) for a batch, as the ONNX energy does."""
    diff = z - CENTRE
    return (diff**2).sum(1) / (2 * WIDTH**2), diff / WIDTH**2


def test_reverse_step_samples_the_known_conditional():
    t = 5
    sigma2 = SCHEDULE.sigmas[t + 1] ** 2
    z_next = np.tile(np.array([[1.0, 0.0, -1.0]], dtype=np.float32), (4000, 1))
    settings = SamplerSettings(langevin_steps=1500, step_size=1e-3, noise_scale=1.0)
    z_t = reverse_step(gaussian_energy, z_next, t, SCHEDULE, settings, np.random.default_rng(0))
    y = z_t * SCHEDULE.a_s[t + 1]  # the sampled z~_t
    precision = 1 / WIDTH**2 + 1 / sigma2
    mean = (CENTRE / WIDTH**2 + z_next[0] / sigma2) / precision
    # Langevin with step h samples variance 1 / (P (1 - h P / 4)) instead of 1 / P.
    variance = 1 / (precision * (1 - settings.step_size * precision / 4))
    assert np.allclose(y.mean(0), mean, atol=4 * np.sqrt(variance / len(y)))
    assert np.allclose(y.var(0), variance, rtol=0.07)


def test_code_style_chains_are_near_deterministic_and_start_independent():
    t = 3
    z_next = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    runs = [
        reverse_step(gaussian_energy, z_next, t, SCHEDULE, SamplerSettings(init=init), np.random.default_rng(seed))
        for init, seed in (("previous", 0), ("noise", 1))
    ]
    precision = 1 / WIDTH**2 + 1 / SCHEDULE.sigmas[t + 1] ** 2
    mode = (CENTRE / WIDTH**2 + z_next / SCHEDULE.sigmas[t + 1] ** 2) / precision / SCHEDULE.a_s[t + 1]
    for z in runs:
        assert np.allclose(z, mode, atol=0.01)


def test_refine_is_seeded_batched_and_moves_towards_low_energy():
    z0 = np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32) * 3
    settings = SamplerSettings(t_refine=6)
    first = refine_latents(gaussian_energy, z0, SCHEDULE, settings, np.random.default_rng(7))
    again = refine_latents(gaussian_energy, z0, SCHEDULE, settings, np.random.default_rng(7))
    assert np.array_equal(first, again)
    assert first.shape == z0.shape and first.dtype == np.float32
    assert np.linalg.norm(first - CENTRE, axis=1).mean() < np.linalg.norm(z0 - CENTRE, axis=1).mean()


def test_every_row_shares_one_energy_call_per_langevin_step():
    calls = []

    def counting_energy(z, t):
        calls.append((z.shape, t.copy()))
        return gaussian_energy(z, t)

    settings = SamplerSettings(t_refine=4, langevin_steps=7)
    refine_latents(counting_energy, np.zeros((5, 3), np.float32), SCHEDULE, settings, np.random.default_rng(0))
    assert len(calls) == 4 * 7
    assert all(shape == (5, 3) for shape, _ in calls)
    assert [int(t[0]) for _, t in calls[::7]] == [3, 2, 1, 0] and all(len(set(t)) == 1 for _, t in calls)


def test_zero_steps_of_diffusion_return_the_latent_and_bad_settings_are_refused():
    z0 = np.ones((2, 3), dtype=np.float32)
    z = refine_latents(gaussian_energy, z0, SCHEDULE, SamplerSettings(t_refine=0), np.random.default_rng(0))
    assert np.allclose(z, z0 * SCHEDULE.a_s_cum[0], atol=0.05)
    assert diffuse(z0, 6, SCHEDULE, np.random.default_rng(0)).shape == (2, 3)
    with pytest.raises(ValueError):
        SamplerSettings(init="random")
    with pytest.raises(ValueError):
        refine_latents(gaussian_energy, z0, SCHEDULE, SamplerSettings(t_refine=21), np.random.default_rng(0))


def test_a_step_size_beyond_the_schedules_stability_diverges_and_the_rows_are_returned_as_nan():
    """Each Langevin step of reverse step t scales the distance to its mode by 1 - h (1/sigma_{t+1}^2 + k) / 2
    (k: the energy's curvature): above 4 / (1/sigma_1^2 + k) the last reverse step diverges."""
    import warnings

    from vertrefine.sampler import diverged

    z0 = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
    bound = 4 / (1 / SCHEDULE.sigmas[1] ** 2 + 1 / WIDTH**2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a diverging chain overflows silently: no numpy warning reaches users
        stable = refine_latents(
            gaussian_energy, z0, SCHEDULE, SamplerSettings(t_refine=6, step_size=0.9 * bound), np.random.default_rng(0)
        )
        # just past the bound the chain grows 1.4x a step (300 steps diverge, 10 do not yet: hence the measured
        # ranges of a bundle); 0.5 and 1.0 diverge at once, and with 300 steps overflow float32
        for step_size, steps in ((1.2 * bound, 300), (0.5, 10), (0.5, 300), (1.0, 10), (1.0, 300)):
            settings = SamplerSettings(t_refine=6, langevin_steps=steps, step_size=step_size)
            z = refine_latents(gaussian_energy, z0, SCHEDULE, settings, np.random.default_rng(0))
            assert np.isnan(z).all() and diverged(z).all(), (step_size, steps)
    assert np.isfinite(stable).all() and not diverged(stable).any()


def test_one_diverging_row_leaves_the_other_rows_as_they_would_be():
    def stiff_first_row(z, t):
        energy, grad = gaussian_energy(z, t)
        grad = grad.copy()
        grad[0] *= 1e4  # row 0's energy is far too steep for the step size: only its chain diverges
        return energy, grad

    z0 = np.random.default_rng(4).standard_normal((3, 3)).astype(np.float32)
    settings = SamplerSettings(t_refine=4, noise_scale=0.0)
    z = refine_latents(stiff_first_row, z0, SCHEDULE, settings, np.random.default_rng(1))
    plain = refine_latents(gaussian_energy, z0, SCHEDULE, settings, np.random.default_rng(1))
    assert np.isnan(z[0]).all()
    np.testing.assert_array_equal(z[1:], plain[1:])


def test_diverged_flags_non_finite_and_exploding_latents():
    from vertrefine.sampler import LATENT_RMS_LIMIT, diverged

    z = np.zeros((5, 2, 4, 4, 4), np.float32)
    z[1, 0, 0, 0, 0] = np.nan
    z[2, 1, 1, 1, 1] = np.inf
    z[3] = 1.01 * LATENT_RMS_LIMIT  # every value a little outside the prior's reach
    z[4] = 3.0  # large, but inside
    assert diverged(z).tolist() == [False, True, True, True, False]
    assert diverged(np.full((2, 3), 3e38, np.float32)).all()  # squares overflow float32: still diverged
    start = np.zeros_like(z)
    start[3] = 2.0  # a chain that started far out may end far out: relative to its start
    assert diverged(z, start).tolist() == [False, True, True, False, False]


def test_forward_diffusion_uses_the_schedules_noise_scale_and_manifests_need_the_chain():
    """The noise scale of q(z_t | z_0) is the training schedule's: a bundle cannot state a second one."""
    z0 = np.ones((2, 3), dtype=np.float32)
    quiet = DiffusionSchedule(noise_scale=0.0)
    assert np.allclose(diffuse(z0, 6, quiet, np.random.default_rng(0)), quiet.a_s_cum[6])
    noisy = diffuse(z0, 6, SCHEDULE, np.random.default_rng(0))
    assert not np.allclose(noisy, SCHEDULE.a_s_cum[6])
    keys = SamplerSettings.manifest_keys()
    assert set(keys) == {"t_refine", "langevin_steps", "step_size", "noise_scale", "init"}
    old = {"t_refine": 3, "langevin_steps": 5, "step_size": 0.01, "noise_scale": 0.01, "init": "noise"}
    settings = SamplerSettings.from_manifest({**old, "diffusion_noise_scale": 1.0, "threshold": 0.5}, t_refine=2)
    assert (settings.t_refine, settings.langevin_steps, settings.init, settings.guidance) == (2, 5, "noise", 0.0)
