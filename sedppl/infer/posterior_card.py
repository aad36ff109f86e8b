"""The card of an amortized posterior: what it was trained on and how well it does.

Stored as JSON beside the weights (:meth:`sedppl.infer.npe.NeuralPosterior.save`);
:meth:`~sedppl.infer.npe.NeuralPosterior.load` refuses a card whose version, sites or
checksum do not match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CARD_VERSION = 1


@dataclass
class PosteriorCard:
    """What a posterior was trained on and how well it does.

    Attributes:
        model: Name of the model (e.g. ``SpecPhotModel``).
        sites: [[name, event_shape], ...] of the latent sites, in order.
        bands: Filters of the photometry ([] for none).
        wave: Observed wavelengths of the spectrum (vacuum A) before binning ([] for none).
        bin_factor: Native pixels per spectral bin.
        redshift_range: Redshifts of the training draws.
        redshift_given: True if the redshift is a condition (given), False if inferred.
        conditions: The :class:`ObservingConditions` of training, as a dict.
        context, transforms, hidden: Sizes of the encoder output and of the flow.
        conditional_affine: Whether the flow starts with an elementwise affine map whose
            shift and scale the context predicts (see :class:`ConditionalAffine`).
        interleaved_transforms: Further spline coupling transforms on the base side of the flow
            whose two groups are the even and the odd parameters (see
            :func:`sedppl.infer.npe.interleaved_coupling`), so that neighbouring sites such as
            ``tau_ism`` and ``dust_index`` are conditioned on each other (0: none).
        whiten: Whether the flow's coordinates are prior-whitened (:mod:`sedppl.infer.whitening`)
            rather than the plain unconstrained ones.
        distance_inputs: Whether the encoder also sees log10 z and the distance-corrected
            amplitudes (see :class:`~sedppl.infer.encoder.DataEncoder`).
        n_sims_log_z: Of the simulations, how many had redshifts drawn uniformly in log z
            (the rest uniformly in z).
        initialised_from: Posterior whose weights started the training ("" for none), with
            its own epochs and seconds; the figures here count only this training.
        n_train, n_valid, epochs, train_seconds, simulation_seconds: Training budget (seconds of
            optimisation, and of simulation in the run that finished; 2-core CPU unless stated).
        total_train_seconds: Seconds of optimisation of this training and of every warm-start stage
            before it (``train_seconds`` plus the starting posterior's own total).
        schedule, lr: Learning-rate schedule ("plateau" or "cosine", see
            :func:`sedppl.infer.npe_training.train_npe`) and its starting rate.
        valid_loss: Best validation loss (mean -log q of the unconstrained, standardised theta).
        start_valid_loss: After a warm start, the starting network's loss on the same validation
            set (NaN without one); ``valid_loss`` never exceeds it.
        base_scale: Standard deviation s of the flow's base distribution N(0, s^2 I), fitted after
            training by maximum likelihood on fresh simulations (1.0: not fitted; see
            :func:`sedppl.infer.npe_calibration.fit_base_scale`).
        base_scale_sims: Simulations the base scale was fitted on (0: not fitted).
        calibration: Figures measured on held-out simulations (filled by the calibration step).
        sha256: Checksum of the weights file.
        version: Card format version.
    """

    model: str
    sites: list
    bands: list = field(default_factory=list)
    wave: list = field(default_factory=list)
    bin_factor: int = 8
    redshift_range: list = field(default_factory=lambda: [0.0, 1.0])
    redshift_given: bool = True
    conditions: dict = field(default_factory=dict)
    context: int = 64
    transforms: int = 6
    hidden: list = field(default_factory=lambda: [128, 128])
    conditional_affine: bool = False
    interleaved_transforms: int = 0
    whiten: bool = False
    distance_inputs: bool = False
    n_sims_log_z: int = 0
    initialised_from: str = ""
    n_train: int = 0
    n_valid: int = 0
    epochs: int = 0
    train_seconds: float = 0.0
    simulation_seconds: float = 0.0
    total_train_seconds: float = 0.0
    schedule: str = "plateau"
    lr: float = 1e-3
    valid_loss: float = float("nan")
    start_valid_loss: float = float("nan")
    base_scale: float = 1.0
    base_scale_sims: int = 0
    calibration: dict = field(default_factory=dict)
    sha256: str = ""
    version: int = CARD_VERSION

    @property
    def spectrum_bins(self) -> int:
        """Spectral bins the encoder sees (pixels // bin_factor; 0 without a spectrum)."""
        return len(self.wave) // self.bin_factor if self.wave else 0
