"""The state of a batched HMC run on disk, so that a long run survives a crash and resumes.

:func:`sedppl.infer.hmc.sample_hmc` writes its whole state (positions, potentials and
gradients, step sizes and their dual-averaging state, mass matrices, the warmup window so
far, the draws, the random generator) with :func:`write_state` every few iterations, and
reads it back with :func:`read_state`, which refuses a file written for another run.
Files hold tensors and plain numbers only and are read with ``torch.load(weights_only=True)``:
loading one cannot run code.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def write_state(state: dict, path: str | os.PathLike) -> None:
    """Save ``state`` (tensors and numbers) to ``path``: ``torch.save`` to a temporary file beside
    it, then a rename, so that a crash mid-write leaves the previous checkpoint intact."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_state(path: str | os.PathLike, settings: dict, start: Tensor, potential) -> dict | None:
    """The state saved in ``path``, checked against the run that wants to continue it.

    Arguments:
        path: The checkpoint file.
        settings: The run's settings ({"targets", "dimensions", "num_warmup", "num_samples",
            "trajectory_length", "target_accept", "max_steps"}); each must equal the saved one,
            except that ``num_samples`` may exceed it (the run goes on to more draws).
        start: The run's starting points (B, D); equal to the saved ones within 1e-4.
        potential: The run's potential, evaluated again at the saved positions: it must give
            the saved potentials within 1e-3 + 1e-6 |U| (nats), or the file belongs to another
            observation or model.

    Returns:
        The saved state (a dict of tensors and numbers), or None if there is no such file.
    """
    if not os.path.exists(path):
        return None
    state = torch.load(path, weights_only=True)
    for k, v in settings.items():
        if k == "num_samples":  # a run may be extended to more draws (not cut below those it has)
            if state["iteration"] > state["num_warmup"] + v:
                raise ValueError(f"checkpoint {os.fspath(path)} already holds "
                                 f"{state['iteration'] - state['num_warmup']} draws, more than num_samples = {v}")
            continue
        if state.get(k) != v:
            raise ValueError(f"checkpoint {os.fspath(path)} was written with {k} = {state.get(k)}, this run has "
                             f"{v}; remove the file or pass the run's original settings")
    if state["start"].shape != start.shape or not torch.allclose(state["start"], start.to(state["start"].dtype),
                                                                 rtol=1e-4, atol=1e-4):
        raise ValueError(f"checkpoint {os.fspath(path)} was written for other starting points (another "
                         "observation, model or seed?); remove it or rerun with the original inputs")
    with torch.no_grad():
        again = potential(state["u"]).to(state["pot"].dtype)
    off = (again - state["pot"]).abs() > 1e-3 + 1e-6 * state["pot"].abs()
    if bool(off.any()):
        i = int(off.nonzero()[0, 0])
        raise ValueError(f"checkpoint {os.fspath(path)} was written for another potential (another observation "
                         f"or model?): at its saved position target {i} had potential {float(state['pot'][i]):.6g}, "
                         f"here {float(again[i]):.6g}; remove it or rerun with the original inputs")
    return state


def saved_start(checkpoint: str | os.PathLike | None) -> Tensor | None:
    """The starting points recorded in an existing checkpoint file (None without one)."""
    if checkpoint is None or not os.path.exists(checkpoint):
        return None
    return torch.load(checkpoint, weights_only=True)["start"]
