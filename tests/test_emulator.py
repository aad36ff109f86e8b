"""Emulator: a small one trained in CI on the exact BC03 synthesis beats a stated floor;
files load without pickle, checksums and ranges are enforced; training resumes."""

import json
import warnings

import numpy as np
import pytest
import torch

from sedppl.dust import calzetti, transmission
from sedppl.emulator import EmulatorCard, SpectrumEmulator, fractional_errors
from sedppl.emulator_training import (_loss_function, _targets, cosine_rate, fit_network, fit_pca, simulate,
                                      train_emulator)
from sedppl.sps.grid import log_wave_grid, rebin_grid
from sedppl.sps.synthesis import StellarSynthesis

NAMES = ["age_gyr", "log_tau_gyr", "log_z", "av"]
LOW, HIGH = [2.0, -1.0, -1.0, 0.0], [12.0, 1.0, 0.3, 1.5]
N_BINS = 24


@pytest.fixture(scope="module")
def simulator(grid):
    """Delayed-tau SFH (age, tau), constant Z, Calzetti dust: rest 2000-10000 A, per Msun formed;
    scalar output: log10 surviving mass fraction."""
    wave = log_wave_grid(2000.0, 10000.0, 2e-3)
    synth = StellarSynthesis(rebin_grid(grid, wave))
    w = torch.from_numpy(wave)

    def run(theta):
        age, log_tau, logz, av = theta.T
        u = torch.linspace(0, 1, N_BINS + 1)
        edges = age[:, None] * u  # Gyr of lookback time, 0 .. age
        t = age[:, None] - 0.5 * (edges[:, 1:] + edges[:, :-1])  # time since the start, Gyr
        sfr = t * torch.exp(-t / 10 ** log_tau[:, None])
        mass = sfr * torch.diff(edges) / (sfr * torch.diff(edges)).sum(-1, keepdim=True)
        pop = synth(mass, edges, logz[:, None].expand(-1, N_BINS))
        flux = (pop.young + pop.old) * transmission(calzetti(w.float(), av))
        return torch.log(flux), torch.log10(pop.surviving_mass)[:, None]

    return wave, run


def prior(n, gen):
    lo, hi = torch.tensor(LOW), torch.tensor(HIGH)
    return lo + (hi - lo) * torch.rand(n, 4, generator=gen)


def card_for(wave, **kw):
    return EmulatorCard(param_names=NAMES, param_low=LOW, param_high=HIGH, wave=wave.tolist(), air=False,
                        flux_unit="Lsun/A per Msun formed", scalar_names=["log_surviving_fraction"], **kw)


@pytest.fixture(scope="module")
def trained(simulator, tmp_path_factory):
    wave, run = simulator
    path = tmp_path_factory.mktemp("emu") / "tiny"
    emu = train_emulator(run, prior, card_for(wave, n_components=24, hidden=[128, 128]), path, n_train=6000,
                         n_valid=500, seed=0, schedule=((3e-3, 128), (1e-3, 256), (3e-4, 512)), patience=15, max_epochs=150,
                         progress=False)
    return emu, path


def test_tiny_emulator_beats_floor(simulator, trained):
    """Held-out draws (new seed): median |df/f| < 1% and 99th percentile < 10%, surviving
    fraction within 0.01 dex (measured 2026-11-25: 0.60%, 7.1%, 0.0023 dex). These floors are
    for a 6,000-spectrum, ~30-second CI training;
    the shipped emulators are held to 0.1% / 1% (issue 4)."""
    wave, run = simulator
    emu, _ = trained
    theta = prior(1000, torch.Generator().manual_seed(99))
    exact_log, exact_sc = simulate(run, theta, progress=False)
    with torch.no_grad():
        log_spec, sc = emu(theta)
    err = fractional_errors(log_spec, exact_log)
    print(f"tiny emulator: median {np.median(err):.4f}, p99 {np.percentile(err, 99):.4f}, "
          f"surviving fraction max {float((sc - exact_sc).abs().max()):.4f} dex; card {emu.card.accuracy}")
    assert np.median(err) < 0.01, np.median(err)
    assert np.percentile(err, 99) < 0.10, np.percentile(err, 99)
    assert float((sc - exact_sc).abs().max()) < 0.01
    # the card records validation accuracy consistent with this
    assert emu.card.accuracy["median_abs_frac"] < 0.01


def test_emulator_gradients_and_batching(trained):
    emu, _ = trained
    theta = prior(5, torch.Generator().manual_seed(1)).requires_grad_()
    log_spec, sc = emu(theta)
    (log_spec.sum() + sc.sum()).backward()
    assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0
    one = torch.stack([emu(t[None])[0][0] for t in theta.detach()])
    torch.testing.assert_close(one, emu(theta.detach())[0], rtol=1e-5, atol=1e-5)


def test_load_roundtrip_checksum_and_range(trained):
    emu, path = trained
    loaded = SpectrumEmulator.load(path)
    theta = prior(3, torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(theta)[0], emu(theta)[0])
    with pytest.warns(UserWarning, match="outside the trained range.*age_gyr"):
        loaded(torch.tensor([[13.5, 0.0, 0.0, 0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        loaded(torch.tensor([[5.0, float("nan"), 0.0, 0.5]]))
    with pytest.raises(ValueError, match="4 parameters"):
        loaded(torch.zeros(1, 3))
    # tampered weights fail the card's checksum
    sf = path.with_suffix(".safetensors")
    blob = bytearray(sf.read_bytes())
    blob[-1] ^= 0xFF
    bad = path.parent / "bad.safetensors"
    bad.write_bytes(bytes(blob))
    bad.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    with pytest.raises(ValueError, match="checksum"):
        SpectrumEmulator.load(bad)
    card = json.loads(path.with_suffix(".json").read_text())
    card["version"] = 99
    bad.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="version"):
        SpectrumEmulator.load(bad)


def test_training_resumes(simulator, tmp_path):
    """A run stopped after its first stage resumes from the checkpoint and ends like one
    uninterrupted run (same data, same seed)."""
    wave, run = simulator
    kw = dict(n_train=600, n_valid=100, seed=3, patience=3, max_epochs=5, progress=False)
    card = lambda: card_for(wave, n_components=8, hidden=[16])  # noqa: E731
    full = train_emulator(run, prior, card(), tmp_path / "full", schedule=((1e-3, 64), (3e-4, 128)), **kw)
    # interrupted: only the first stage, then the full schedule on the same path
    train_emulator(run, prior, card(), tmp_path / "part", schedule=((1e-3, 64),), **kw)
    state = json.loads((tmp_path / "part.ckpt" / "state.json").read_text())
    assert state["stage"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = train_emulator(run, prior, card(), tmp_path / "part", schedule=((1e-3, 64), (3e-4, 128)), **kw)
    theta = prior(50, torch.Generator().manual_seed(5))
    torch.testing.assert_close(resumed(theta)[0], full(theta)[0], rtol=1e-4, atol=1e-4)


def test_cosine_rate_falls_from_start_to_end():
    """The cosine stage's rate: the start value at epoch 0, the end value at the last epoch, never rising."""
    rates = [cosine_rate(1e-3, 1e-6, e, 20) for e in range(20)]
    assert rates[0] == pytest.approx(1e-3, rel=1e-12) and rates[-1] == pytest.approx(1e-6, rel=1e-9)
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_cosine_stage_runs_every_epoch_and_ends_lower(simulator):
    """A (rate, batch, final rate) stage runs all ``max_epochs`` epochs whatever ``patience`` says, and on the
    same epochs and batches its best validation loss is below that of a constant rate (fixed seed; the
    rate's decay is what early stopping on a constant rate cannot give)."""
    wave, run = simulator
    theta = prior(700, torch.Generator().manual_seed(2))
    log_flux, scalars = simulate(run, theta, progress=False)
    fits = {}
    for name, stage in (("cosine", (3e-3, 64, 1e-5)), ("constant", (3e-3, 64))):
        torch.manual_seed(0)
        emu = SpectrumEmulator(card_for(wave, n_components=8, hidden=[32, 32]))
        fit_pca(emu, theta[:600], log_flux[:600], scalars[:600])
        x, y = emu.standardise(theta), _targets(emu, log_flux, scalars)
        calls = []
        network = emu.network
        emu.network = lambda z, network=network, calls=calls: calls.append(len(z)) or network(z)
        fits[name] = fit_network(emu, x[:600], y[:600], x[600:], y[600:], schedule=(stage,), patience=1,
                                 max_epochs=25, progress=False)
        with torch.no_grad():
            assert fits[name] == pytest.approx(float(_loss_function(emu)(network(x[600:]), y[600:])), rel=1e-6)
        if name == "cosine":
            assert calls.count(100) == 25  # one validation pass per epoch: every epoch ran
    assert fits["cosine"] < fits["constant"], fits


@pytest.mark.parametrize("chunks,overlap", [([], 0), ([120, 200], 0), ([120, 200], 20)])
def test_training_loss_is_the_mean_square_log_spectrum_error(chunks, overlap):
    """The training loss (a C K x C K quadratic form for C wavelength chunks, with cross terms where chunks
    overlap) equals the mean square error of the rebuilt natural-log spectrum over pixels plus that of the
    scalars, computed directly (float32, rtol 1e-5)."""
    from sedppl.emulator_training import _loss_function

    torch.manual_seed(0)
    card = EmulatorCard(param_names=["a", "b"], param_low=[0, 0], param_high=[1, 1], wave=list(range(300)),
                        scalar_names=["s"], n_components=10, chunks=chunks, chunk_overlap=overlap)
    emu = SpectrumEmulator(card)
    kc = 10 * emu.n_chunks
    emu.basis.copy_(torch.randn(kc, 300) / 10)  # not orthonormal: the quadratic form must not assume it
    emu.log_sd.copy_(torch.rand(300) + 0.5)
    emu.out_scale.copy_(torch.rand(kc + 1) + 0.5)
    pred, target = torch.randn(64, kc + 1), torch.randn(64, kc + 1)
    d = (pred - target) * emu.out_scale
    direct = torch.mean((emu.rebuild(d[:, :kc]) - emu.log_mean) ** 2) + torch.mean(d[:, kc:] ** 2)
    torch.testing.assert_close(_loss_function(emu)(pred, target), direct, rtol=1e-5, atol=0)


def test_wavelength_chunks_have_their_own_principal_components(tmp_path):
    """Log spectra of rank 3 in each of two wavelength chunks, with independent coefficients (rank 6 in
    all): three components a chunk (card ``chunks``) rebuild them to float32 precision (< 1e-4 in ln
    flux), while three global components cannot (> 0.1). The chunked emulator has one network per chunk,
    survives a save/load round trip, and batching equals looping."""
    from sedppl.emulator_training import _targets, fit_pca

    gen = torch.Generator().manual_seed(4)
    n, length, cut = 400, 200, 90
    shapes = torch.randn(6, length, generator=gen)
    shapes[:3, cut:] = 0.0
    shapes[3:, :cut] = 0.0
    log_flux = torch.randn(n, 6, generator=gen) @ shapes + 1.0
    theta = torch.rand(n, 2, generator=gen)
    kw = dict(param_names=["a", "b"], param_low=[0, 0], param_high=[1, 1], wave=list(range(1000, 1000 + length)),
              scalar_names=["s"], n_components=3, hidden=[8])
    scalars = theta[:, :1]
    errors = {}
    for chunks in ([], [cut]):
        emu = SpectrumEmulator(EmulatorCard(**kw, chunks=chunks))
        fit_pca(emu, theta, log_flux, scalars)
        kc = 3 * emu.n_chunks
        target = _targets(emu, log_flux, scalars) * emu.out_scale + emu.out_shift
        errors[len(chunks)] = float((emu.rebuild(target[:, :kc]) - log_flux).abs().max())
    assert errors[1] < 1e-4 and errors[0] > 0.1, errors
    assert emu.n_chunks == 2 and len(emu.mlp) == 2 and emu.network(torch.zeros(5, 2)).shape == (5, 7)
    emu.save(tmp_path / "chunked")
    loaded = SpectrumEmulator.load(tmp_path / "chunked")
    torch.testing.assert_close(loaded(theta[:7])[0], emu(theta[:7])[0])
    one = torch.cat([emu(t[None])[0] for t in theta[:7]])
    torch.testing.assert_close(one, emu(theta[:7])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunks must be increasing"):
        SpectrumEmulator(EmulatorCard(**kw, chunks=[150, 90]))


def test_metallicity_grid_inputs_carry_the_kinks(simulator, trained, grid, tmp_path):
    """The synthesis interpolates linearly in log Z between the grid's metallicities, so the spectrum is
    piecewise linear in log Z with kinks at the nodes (-0.7, -0.4 and 0.0 lie inside this prior). The
    same tiny training with the hat weights of log Z on the grid as extra inputs (card ``grid_inputs``,
    ``input_grid``) must beat the plain one on the same 1,000 held-out draws: median |df/f| lower by 15%
    or more (measured 0.505% against 0.664%, 24% lower; a 3 x 256 network on 40,000 draws of the ugriz
    model's 7-bin histories: 0.165% against 0.324%). The features themselves: theta, then exactly the synthesis' interpolation weights
    (clamped to the grid outside it); a grid that is not increasing is refused."""
    from sedppl.sps.synthesis import linear_interp_weights

    wave, run = simulator
    plain, _ = trained
    nodes = [float(v) for v in grid.log_metallicities]
    card = card_for(wave, n_components=24, hidden=[128, 128], grid_inputs=[2], input_grid=nodes)
    hat = train_emulator(run, prior, card, tmp_path / "hat", n_train=6000, n_valid=500, seed=0,
                         schedule=((3e-3, 128), (1e-3, 256), (3e-4, 512)), patience=15, max_epochs=150,
                         progress=False)
    theta = prior(1000, torch.Generator().manual_seed(99))
    exact_log, _ = simulate(run, theta, progress=False)
    with torch.no_grad():
        e_plain = np.median(fractional_errors(plain(theta)[0], exact_log))
        e_hat = np.median(fractional_errors(hat(theta)[0], exact_log))
    print(f"median |df/f|: plain {e_plain:.5f}, with log Z grid inputs {e_hat:.5f}")
    assert e_hat < 0.85 * e_plain, (e_hat, e_plain)
    x = hat.features(theta[:5])
    assert x.shape == (5, 4 + len(nodes))
    torch.testing.assert_close(x[:, :4], theta[:5])
    torch.testing.assert_close(x[:, 4:], linear_interp_weights(torch.tensor(nodes), theta[:5, 2]))
    edge = hat.features(torch.tensor([[5.0, 0.0, nodes[-1] + 0.5, 0.5]]))  # beyond the grid: its last node
    assert float(edge[0, -1]) == 1.0 and float(edge[0, 4:-1].abs().sum()) == 0.0
    loaded = SpectrumEmulator.load(tmp_path / "hat")
    torch.testing.assert_close(loaded(theta[:5])[0], hat(theta[:5])[0])
    with pytest.raises(ValueError, match="increasing input_grid"):
        SpectrumEmulator(card_for(wave, grid_inputs=[2], input_grid=nodes[::-1]))


def test_overlapping_chunks_blend_without_a_step(simulator, tmp_path):
    """Two chunks trained apart make independent errors, so abutting chunks put a step in the emulated
    spectrum at the cut: the change of ln(emulated / exact) from the last pixel of one chunk to the
    first of the next is, in the median over held-out draws, more than 5x the median change between
    neighbouring pixels within 25-60 pixels of the cut (measured 25x). Chunks that overlap by 20 pixels
    on either side and blend linearly leave no step: the change across the cut is within 1.5x of that
    median (measured 0.8x); the blend's weights change by 1/40 a pixel. The blending weights sum to 1
    and are 0 outside each chunk's span. A small budget (2,000 draws, 2 x 64 networks, 30 epochs)
    keeps the errors large."""
    wave, run = simulator
    cut = len(wave) // 2
    theta = prior(500, torch.Generator().manual_seed(11))
    exact_log, _ = simulate(run, theta, progress=False)
    ratios = {}
    for overlap in (0, 20):
        card = card_for(wave, n_components=12, hidden=[64, 64], chunks=[cut], chunk_overlap=overlap)
        emu = train_emulator(run, prior, card, tmp_path / f"ov{overlap}", n_train=2000, n_valid=200, seed=1,
                             schedule=((3e-3, 128),), patience=30, max_epochs=30, progress=False)
        w = emu.blend_weights()
        torch.testing.assert_close(w.sum(0), torch.ones(len(wave), dtype=torch.float64), rtol=0, atol=1e-12)
        for c, (lo, hi) in enumerate(emu.spans()):
            assert (w[c, :lo] == 0).all() and (w[c, hi:] == 0).all() and (w[c] >= 0).all()
        with torch.no_grad():
            err = (emu(theta)[0] - exact_log).numpy()
        step = np.median(np.abs(np.diff(err, axis=1)), axis=0)  # pixel i -> i + 1, median over draws
        typical = np.median(step[np.r_[cut - 60:cut - 25, cut + 25:cut + 60]])
        ratios[overlap] = step[cut - 1] / typical
        if overlap:
            assert float(np.abs(np.diff(w.numpy(), axis=1)).max()) <= 1 / (2 * overlap) + 1e-12
    print("change across the cut / typical change:", ratios)
    assert ratios[0] > 5 and ratios[20] < 1.5, ratios
