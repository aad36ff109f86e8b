"""The embedding networks' scale-free inputs, and the encoder as one traced graph."""

import math

import pytest
import torch

from sedppl.infer.encoder import DataEncoder, amplitude, scale_free


def test_scale_free_inputs():
    gen = torch.Generator().manual_seed(2)
    f = 1 + torch.rand(3, 100, generator=gen)
    iv = 100 * torch.ones(3, 100)
    iv[0, :10] = 0
    ch, ls = scale_free(f, iv)
    ch2, ls2 = scale_free(1e3 * f, iv / 1e6)
    assert torch.allclose(ch, ch2, atol=1e-5) and torch.allclose(ls2 - ls, torch.full((3,), 3.0), atol=1e-5)
    assert torch.all(ch[0, :, :10] == 0)
    with pytest.raises(ValueError, match="no valid"):
        scale_free(f, torch.zeros_like(f))


def test_amplitude_known_values():
    """The plain mean of the valid values (masked ones ignored); a mean below twice its standard error is
    floored there; a galaxy with nothing valid gets 1 when allowed (float32, 1e-6 relative)."""
    flux = torch.tensor([[1.0, 2.0, 3.0, 1e6], [0.1, -0.1, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    ivar = torch.tensor([[100.0, 100.0, 100.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s = amplitude(flux, ivar, allow_empty=True)
    torch.testing.assert_close(s, torch.tensor([2.0, math.sqrt(2.0), 1.0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(scale_free(flux, ivar, allow_empty=True)[1], torch.log10(s))
    with pytest.raises(ValueError, match="no valid"):
        amplitude(flux, ivar)


def test_encoder_traces_as_one_graph():
    """The encoder with every input (spectrum, photometry, redshift, distance inputs) traces into a single
    graph (``fullgraph=True`` raises at a graph break): its input checks stand aside inside
    ``torch.compile``, where ``NeuralPosterior.inputs`` has checked first. Same context as eager (1e-6)."""
    torch.manual_seed(0)
    enc = DataEncoder(64, 5, (0.01, 0.5), out=16, distance_inputs=True).eval()
    x = {"spectrum": 1 + torch.rand(3, 64), "spectrum_ivar": torch.full((3, 64), 50.0),
         "photometry": 1 + torch.rand(3, 5), "photometry_ivar": torch.full((3, 5), 400.0),
         "redshift": torch.tensor([0.02, 0.1, 0.45])}
    x["photometry_ivar"][1] = 0  # one galaxy without photometry
    with torch.no_grad():
        traced = torch.compile(enc, backend="eager", fullgraph=True)(**x)
        torch.testing.assert_close(traced, enc(**x), atol=1e-6, rtol=0)
