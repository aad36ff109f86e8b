"""The command line, through its entry point."""

import subprocess
import sys

import numpy as np
from astropy.table import Table


def run(*args):
    return subprocess.run([sys.executable, "-m", "sedppl.cli", *args], capture_output=True, text=True, timeout=600)


def test_demo_writes_physical_outputs(tmp_path):
    r = run("demo", "--out", str(tmp_path), "--z", "0.1")
    assert r.returncode == 0, r.stderr
    spec = Table.read(tmp_path / "demo_spectrum.ecsv")
    phot = Table.read(tmp_path / "demo_photometry.ecsv")
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert np.all(np.isfinite(spec["model"])) and np.all(spec["model"] > 0)
    mag = dict(zip(phot["band"], phot["mag_ab"]))
    # an evolved, dusty galaxy at z = 0.1: red optical colours (g-r in 0.5-1.1, r-z in 0.2-0.9)
    assert 0.5 < mag["decam_g"] - mag["decam_r"] < 1.1
    assert 0.2 < mag["decam_r"] - mag["decam_z"] < 0.9
    # the fit with the shipped posterior: the surviving mass (truth 10.594, printed by the demo) within
    # 0.2 dex; the posterior-predictive chi2/dof near 1 (S/N 10 per pixel, model = truth up to the fit)
    post = Table.read(tmp_path / "demo_posterior.ecsv")
    assert abs(post["log_stellar_mass_p50"][0] - 10.594) < 0.2
    assert 0.7 < post["chi2_dof"][0] < 2.0 and not post["poor_fit"][0]
    assert (tmp_path / "demo_fit.png").stat().st_size > 50_000


def test_bad_redshift_exit_code(tmp_path):
    r = run("demo", "--out", str(tmp_path), "--z", "3")
    assert r.returncode == 2
    assert "outside the model's range" in r.stderr


def test_info():
    r = run("info")
    assert r.returncode == 0 and "BC03+MILES" in r.stdout and "sdss2010-r" in r.stdout


def test_simulate_writes_mocks_that_read_back(tmp_path):
    from sedppl.mocks import read_mocks

    out = tmp_path / "m.fits"
    r = run("simulate", "--model", "phot", "--n", "6", "--snr-photometry", "25", "--seed", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    mock = read_mocks(out)
    assert mock.obs.band_flux.shape == (6, 5) and mock.obs.bands[0] == "sdss_u"
    # redshift drawn from the prior (0.01-0.2) and left free for the fit
    assert mock.obs.redshift is None and bool(((mock.truth["redshift"] > 0.01) & (mock.truth["redshift"] < 0.2)).all())
    # S/N per band is the requested 25
    snr = (mock.photometry * mock.obs.band_ivar.sqrt()).numpy()
    np.testing.assert_allclose(snr, 25.0, rtol=1e-4)
    assert {"log_mass", "log_stellar_mass", "sfr_100myr", "tau_ism"} <= set(mock.truth)
    assert not (tmp_path / "m.fits.tmp").exists()


def test_simulate_bad_arguments(tmp_path):
    r = run("simulate", "--model", "phot", "--z", "0.5", "--out", str(tmp_path / "x.fits"))
    assert r.returncode == 2 and "outside the model's range" in r.stderr
    r = run("simulate", "--n", "0", "--out", str(tmp_path / "x.fits"))
    assert r.returncode == 2 and "--n" in r.stderr


def test_simulate_then_fit_with_the_shipped_posterior(tmp_path):
    mocks = tmp_path / "m.fits"
    assert run("simulate", "--model", "phot", "--n", "40", "--z", "0.08", "--seed", "9", "--out", str(mocks)).returncode == 0
    r = run("fit", str(mocks), "--method", "npe", "--model", "phot", "--draws", "200", "--chunk", "15",
            "--out", str(tmp_path / "fit"))
    assert r.returncode in (0, 3), r.stderr
    table = Table.read(tmp_path / "fit" / "summary.fits")
    truth = Table.read(mocks, hdu="TRUTH")
    assert len(table) == 40 and len(list((tmp_path / "fit" / "chunks").glob("posterior_*.nc"))) == 3
    # medians track the truth: log stellar mass over 4 dex of prior, correlation > 0.95
    assert np.corrcoef(table["log_stellar_mass_p50"], truth["log_stellar_mass"])[0, 1] > 0.95
    # chi2 per band against the median posterior-predictive model, with no parameters subtracted from
    # the 5 bands' dof: a 13-parameter model fits them more closely than noise alone (the truth's expected
    # chi2/dof is 1), and more so the closer the posterior is to the exact one (these 40 mocks: median
    # 0.40 with the ugriz posterior shipped until 2026-11-29, 0.29 with its successor)
    assert 0.15 < np.median(table["chi2_dof"]) < 3.0
    # a rerun finds every chunk done and rewrites the same table
    r2 = run("fit", str(mocks), "--draws", "200", "--chunk", "15", "--out", str(tmp_path / "fit"))
    assert r2.returncode in (0, 3)
    assert np.array_equal(Table.read(tmp_path / "fit" / "summary.fits")["log_mass_p50"], table["log_mass_p50"])


def test_fit_rejects_missing_and_unknown_input(tmp_path):
    r = run("fit", str(tmp_path / "nope.fits"))
    assert r.returncode == 2 and "no such file" in r.stderr
    bad = tmp_path / "t.ecsv"
    Table({"a": [1.0]}).write(bad)
    r = run("fit", str(bad))
    assert r.returncode == 2 and "not a sedppl mock" in r.stderr


def test_fit_compile_needs_this_process(tmp_path):
    mocks = tmp_path / "m.fits"
    assert run("simulate", "--model", "phot", "--n", "3", "--out", str(mocks)).returncode == 0
    r = run("fit", str(mocks), "--compile", "--workers", "2", "--out", str(tmp_path / "fit"))
    assert r.returncode == 2 and "--compile" in r.stderr and "--workers 1" in r.stderr


def test_fit_nuts_and_compare_through_the_entry_point(tmp_path):
    """`fit --method nuts` and `compare` on a photometry mock with tiny NUTS settings: the outputs
    exist with the convergence columns (short chains do not converge: exit code 4); `fit --method hmc`
    writes the same table (finite per-galaxy R-hat from 2 chains) and its draws; and the comparison
    reports every requested parameter with finite shifts and widths."""
    import json

    mocks = tmp_path / "m.fits"
    assert run("simulate", "--model", "phot", "--n", "2", "--z", "0.1", "--seed", "3", "--out", str(mocks)).returncode == 0
    tiny = ["--draws", "20", "--warmup", "20", "--chains", "1", "--max-tree-depth", "4"]
    r = run("fit", str(mocks), "--method", "nuts", "--model", "phot", *tiny, "--out", str(tmp_path / "nuts"))
    assert r.returncode == 4 and "ESS < 100" in r.stderr, r.stderr  # 20 draws of one chain: ESS < 100
    table = Table.read(tmp_path / "nuts" / "summary.ecsv")
    assert len(table) == 2 and {"rhat_max", "ess_bulk_min", "divergences", "chi2_dof"} <= set(table.colnames)
    assert np.all(table["chi2_dof"] > 0.01)
    r = run("fit", str(mocks), "--method", "hmc", "--model", "phot", "--draws", "30", "--warmup", "30",
            "--chains", "2", "--max-steps", "8", "--out", str(tmp_path / "hmc"))
    assert r.returncode in (0, 4) and "fitted with HMC" in r.stdout, r.stderr  # 30 draws may not converge
    hmc = Table.read(tmp_path / "hmc" / "summary.ecsv")
    assert len(hmc) == 2 and np.all(np.isfinite(hmc["rhat_max"])) and np.all(hmc["chi2_dof"] > 0.01)
    assert (tmp_path / "hmc" / "chunks" / "hmc_00000.nc").exists()
    r = run("compare", str(mocks), "--galaxy", "1", "--model", "phot", "--npe-draws", "1000", *tiny,
            "--params", "log_stellar_mass,tau_ism", "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert set(rec["shift"]) == {"log_stellar_mass", "tau_ism"}
    assert all(np.isfinite(v) for v in rec["shift"].values()) and 0.4 < rec["c2st_accuracy"] <= 1.0
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    r = run("compare", str(mocks), "--galaxy", "5", "--out", str(tmp_path / "cmp2"))
    assert r.returncode == 2 and "--galaxy 5" in r.stderr


def test_train_emulator_and_fit_with_the_emulated_sps(tmp_path):
    """`sedppl train emulator` (tiny budget, ``--schedule cosine``, ``--hidden``) writes an emulator and its card for the
    model's grid widened to 2000 A - 6 um (``--rest-range``);
    `sedppl fit --sps emulated` fits mocks with the shipped emulator (medians track the truth as with
    the exact synthesis)."""
    import json

    r = run("train", "emulator", "--model", "phot", "--n-train", "300", "--n-components", "8", "--max-epochs", "1",
            "--rest-range", "2000", "60000", "--schedule", "cosine", "--hidden", "32", "32", "--out", str(tmp_path / "emu"))
    assert r.returncode == 0, r.stderr
    card = json.loads((tmp_path / "emu.json").read_text())
    assert card["n_train"] == 300 and card["param_names"][-1] == "ln_t_univ_gyr" and len(card["wave"]) > 3000
    assert card["hidden"] == [32, 32]
    assert card["wave"][0] <= 2000 and card["wave"][-1] >= 60000  # the photometry grid widened to 2000 A - 6 um
    mocks = tmp_path / "m.fits"
    assert run("simulate", "--model", "phot", "--n", "20", "--z", "0.08", "--seed", "4", "--out", str(mocks)).returncode == 0
    r = run("fit", str(mocks), "--model", "phot", "--sps", "emulated", "--draws", "200", "--out", str(tmp_path / "fit"))
    assert r.returncode in (0, 3), r.stderr
    table = Table.read(tmp_path / "fit" / "summary.fits")
    truth = Table.read(mocks, hdu="TRUTH")
    assert np.corrcoef(table["log_stellar_mass_p50"], truth["log_stellar_mass"])[0, 1] > 0.95
    # chi2/dof as in test_simulate_then_fit_with_the_shipped_posterior (these 20 mocks: median 0.41 with the
    # ugriz posterior shipped until 2026-11-29, 0.36 with its successor)
    assert 0.15 < np.median(table["chi2_dof"]) < 3.0


def test_train_an_ensemble_posterior_and_fit_with_it(tmp_path):
    """`sedppl train posterior --ensemble 2` (tiny budget) writes two members with refitted base widths,
    an index with the mixture's calibration, and `sedppl fit --posterior` takes the index: one summary row per galaxy, finite medians."""
    import json

    out = tmp_path / "ens"
    r = run("train", "posterior", "--model", "phot", "--n-sims", "300", "--max-epochs", "1", "--ensemble", "2",
            "--n-calibration", "10", "--n-base-fit", "200", "--out", str(out))
    assert r.returncode == 0, r.stderr
    index = json.loads(out.with_suffix(".json").read_text())
    assert index["ensemble"] == ["ens_member0", "ens_member1"] and index["calibration"]["n_sims"] == 10
    for m in index["ensemble"]:  # each member's base width refitted on 200 fresh simulations, and saved so
        card = json.loads((tmp_path / f"{m}.json").read_text())
        assert card["base_scale_sims"] == 200 and 0.3 < card["base_scale"] < 3.0
    assert all((tmp_path / f"{m}.safetensors").exists() for m in index["ensemble"])
    mocks = tmp_path / "m.fits"
    assert run("simulate", "--model", "phot", "--n", "6", "--z", "0.08", "--seed", "4", "--out", str(mocks)).returncode == 0
    r = run("fit", str(mocks), "--model", "phot", "--posterior", str(out.with_suffix(".json")), "--draws", "50",
            "--out", str(tmp_path / "fit"))
    assert r.returncode in (0, 3), r.stderr  # 3: a one-epoch posterior may fail the predictive check
    table = Table.read(tmp_path / "fit" / "summary.fits")
    assert len(table) == 6 and np.all(np.isfinite(table["log_stellar_mass_p50"]))


def test_fit_with_importance_sampling(tmp_path):
    """`sedppl fit --importance 500` corrects the shipped posterior by importance sampling: the table gains
    the weights' Pareto k-hat and ESS (finite, ESS at most the 500 proposal draws) and medians that track
    the truth; --importance with another method is an error."""
    mocks = tmp_path / "m.fits"
    assert run("simulate", "--model", "phot", "--n", "6", "--z", "0.08", "--seed", "5", "--out", str(mocks)).returncode == 0
    r = run("fit", str(mocks), "--model", "phot", "--draws", "200", "--importance", "500", "--out", str(tmp_path / "fit"))
    assert r.returncode in (0, 3), r.stderr
    table = Table.read(tmp_path / "fit" / "summary.fits")
    assert np.all(np.isfinite(table["is_pareto_k"])) and np.all((table["is_ess"] > 1) & (table["is_ess"] <= 500))
    truth = Table.read(mocks, hdu="TRUTH")
    assert np.corrcoef(table["log_stellar_mass_p50"], truth["log_stellar_mass"])[0, 1] > 0.9
    r = run("fit", str(mocks), "--model", "phot", "--method", "nuts", "--importance", "500", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--importance" in r.stderr


def test_train_vae_through_the_entry_point(tmp_path):
    """`sedppl train vae` (tiny budget) on mock spectra writes the VAE and a card that records its
    training; a file without spectra is refused with exit code 2 and a message."""
    import json

    mocks = tmp_path / "m.fits"
    assert run("simulate", "--model", "specphot", "--n", "24", "--z", "0.1", "--snr", "5", "--seed", "2",
               "--out", str(mocks)).returncode == 0
    r = run("train", "vae", "--model", "specphot", "--spectra", str(mocks), "--max-epochs", "1", "--n-sims", "64",
            "--n-latent", "1", "--out", str(tmp_path / "vae"))
    assert r.returncode == 0, r.stderr
    card = json.loads((tmp_path / "vae.json").read_text())
    assert card["epochs"] == 1 and card["n_train"] + card["n_valid"] == 24 and "residual_latent" in card["sites"]
    assert (tmp_path / "vae.safetensors").exists() and not (tmp_path / "vae.ckpt").exists()
    phot = tmp_path / "p.fits"
    assert run("simulate", "--model", "phot", "--n", "3", "--z", "0.1", "--out", str(phot)).returncode == 0
    r = run("train", "vae", "--model", "specphot", "--spectra", str(phot), "--out", str(tmp_path / "v2"))
    assert r.returncode == 2 and "spectra" in r.stderr


def test_fit_a_catalog_with_milky_way_extinction(tmp_path):
    """Mock ugriz fluxes reddened by E(B-V) = 0.15, fitted with --ebv-column (or --ebv 0.15), give the
    unreddened mocks' table (same seed: medians of log M* and tau_ism within 0.01); left uncorrected,
    the fit puts the Galaxy's dust into tau_ism (median up by ~A_V / 1.086)."""
    import torch

    from sedppl.extinction import deredden
    from sedppl.mocks import read_mocks

    mocks = tmp_path / "m.fits"
    assert run("simulate", "--model", "phot", "--n", "6", "--z", "0.08", "--seed", "4", "--out", str(mocks)).returncode == 0
    obs = read_mocks(mocks).obs
    boost = (deredden(obs, torch.full((6,), 0.15)).band_flux / obs.band_flux).numpy()
    flux, err = obs.band_flux.numpy(), obs.band_ivar.numpy() ** -0.5
    bands = ",".join(obs.bands)
    for name, scale, ebv in (("clean", 1.0, 0.0), ("red", 1 / boost, 0.15)):
        Table({f"f{k}": flux[:, k] * scale[:, k] if name == "red" else flux[:, k] for k in range(5)}
              | {f"e{k}": err[:, k] * scale[:, k] if name == "red" else err[:, k] for k in range(5)}
              | {"z": obs.redshift.numpy(), "ebv": np.full(6, ebv)}).write(tmp_path / f"{name}.ecsv")
    cols = ["--bands", bands, "--flux-columns", ",".join(f"f{k}" for k in range(5)),
            "--error-columns", ",".join(f"e{k}" for k in range(5)), "--z-column", "z",
            "--model", "phot", "--draws", "300", "--no-draws"]
    tables = {}
    for tag, src, extra in (("clean", "clean", []), ("column", "red", ["--ebv-column", "ebv"]),
                            ("value", "red", ["--ebv", "0.15"]), ("none", "red", [])):
        r = run("fit", str(tmp_path / f"{src}.ecsv"), *cols, *extra, "--out", str(tmp_path / tag))
        assert r.returncode in (0, 3), r.stderr
        tables[tag] = Table.read(tmp_path / tag / "summary.fits")
    for tag in ("column", "value"):
        np.testing.assert_allclose(tables[tag]["log_stellar_mass_p50"], tables["clean"]["log_stellar_mass_p50"],
                                   atol=0.01)
        np.testing.assert_allclose(tables[tag]["tau_ism_p50"], tables["clean"]["tau_ism_p50"], atol=0.01)
    shift = np.median(tables["none"]["tau_ism_p50"] - tables["clean"]["tau_ism_p50"])
    # A_V = 3.1 x 0.15 = 0.47 mag is tau_V = 0.43, which the fit takes as the galaxy's own ISM dust
    assert 0.2 < shift < 0.7
    r = run("fit", str(tmp_path / "red.ecsv"), *cols, "--ebv", "0.1,0.2", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "2 values of E(B-V) for 6 galaxies" in r.stderr
    r = run("fit", str(mocks), "--ebv-column", "ebv", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "--ebv-column names a catalog column" in r.stderr


def test_fit_smc_through_the_entry_point(tmp_path):
    """`fit --method smc` on two photometry mocks (2 runs x 64 particles): the table has the convergence
    columns and each galaxy's log evidence with its spread between runs (< 1 nat), the true stellar mass
    lies within 3 half-widths of the 16-84% interval of the median, chi2/dof is sane, the draws are written,
    and a rerun resumes (reads the finished chunk back: the same table)."""
    mocks = tmp_path / "m.fits"
    assert run("simulate", "--model", "phot", "--n", "2", "--z", "0.1", "--seed", "6", "--out", str(mocks)).returncode == 0
    args = ["fit", str(mocks), "--method", "smc", "--model", "phot", "--draws", "64", "--chains", "2",
            "--out", str(tmp_path / "smc")]
    r = run(*args)
    assert r.returncode in (0, 4) and "fitted with SMC" in r.stdout and "2 runs x 64 particles" in r.stdout, r.stderr
    table = Table.read(tmp_path / "smc" / "summary.ecsv")
    truth = Table.read(mocks, hdu="TRUTH")
    assert {"rhat_max", "ess_bulk_min", "log_evidence", "log_evidence_sd", "chi2_dof"} <= set(table.colnames)
    assert np.all(np.isfinite(table["log_evidence"])) and np.all(table["log_evidence_sd"] < 1.0)
    half = (table["log_stellar_mass_p84"] - table["log_stellar_mass_p16"]) / 2
    assert np.all(np.abs(table["log_stellar_mass_p50"] - truth["log_stellar_mass"]) < 3 * half)
    assert np.all((table["chi2_dof"] > 0.01) & (table["chi2_dof"] < 5))
    assert (tmp_path / "smc" / "chunks" / "smc_00000.nc").exists()
    r = run(*args)
    assert r.returncode in (0, 4)
    again = Table.read(tmp_path / "smc" / "summary.ecsv")
    assert np.array_equal(again["log_evidence"], table["log_evidence"])
